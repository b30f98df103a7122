"""site.yml records and skips only on a full run: no --tags, and no --skip-tags naming a tag of the
collection's tasks. The list of those tags (playbooks/vars/rollout.yml) must be every tag the roles and
playbooks use, and the rule is checked with real ansible-playbook runs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
ROLLOUT_VARS = ROOT / "playbooks" / "vars" / "rollout.yml"


def task_tags(node, found):
    if isinstance(node, dict):
        tags = node.get("tags")
        if tags is not None:
            found.update([tags] if isinstance(tags, str) else tags)
        for value in node.values():
            task_tags(value, found)
    elif isinstance(node, list):
        for item in node:
            task_tags(item, found)
    return found


def used_tags():
    found = set()
    for top in ("roles", "playbooks"):
        for path in sorted((ROOT / top).rglob("*.yml")):
            if "files" in path.relative_to(ROOT).parts or path.name == "argument_specs.yml":
                continue
            task_tags(yaml.safe_load(path.read_text()), found)
    return found


def test_the_list_of_task_tags_is_every_tag_used():
    listed = yaml.safe_load(ROLLOUT_VARS.read_text())["_sidecar_rollout_task_tags"]
    assert len(listed) == len(set(listed))
    assert set(listed) == used_tags()


@pytest.mark.skipif(not shutil.which("ansible-playbook"), reason="needs ansible-playbook")
@pytest.mark.parametrize(("args", "full"), [
    ([], True),
    (["--skip-tags", "molecule-notest,notest"], True),
    (["--skip-tags", "notest,verify"], False),
    (["--skip-tags", "always"], False),
    (["--tags", "proxy"], False),
    (["--tags", "all"], True),
])
def test_a_run_is_full_unless_tags_leave_out_tasks_of_the_collection(tmp_path, args, full):
    play = tmp_path / "play.yml"
    show = {"name": "Show", "ansible.builtin.debug": {"msg": "full run: {{ _sidecar_rollout_full_run | bool }}"}}
    play.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False, "vars_files": [str(ROLLOUT_VARS)],
        # one task tagged always, one untagged: at least one of them runs whatever the tags
        "tasks": [dict(show, tags=["always"]), show],
    }]))
    # the default callback: every supported ansible-core has it (json is ansible.posix's before 2.21)
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_NOCOLOR="1")
    res = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", *args, str(play)],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    msgs = re.findall(r'"msg": "full run: (\w+)"', res.stdout)
    assert msgs and all(m == str(full) for m in msgs), res.stdout
