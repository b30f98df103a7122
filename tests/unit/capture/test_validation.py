"""End to end through ansible-playbook: the role's first task (the sidecar.intercept.settings action)
reads the variables as -e gives them and fails naming the value before any task touches the host.
Every other case of the validator is a plain pytest case in tests/unit/settings/test_settings.py."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - sidecar.intercept.capture
  post_tasks:
    - name: Show the resolved settings
      ansible.builtin.debug:
        msg: "RESOLVED {{ ansible_facts.sidecar_settings | to_json }}"
      tags: [sidecar_capture_validate]
    - name: The backend is the one the host facts detected
      ansible.builtin.assert:
        that: ansible_facts.sidecar_settings.backend == ansible_facts.sidecar_capture.backend
        fail_msg: "BACKEND MISMATCH {{ ansible_facts.sidecar_settings.backend }} != {{ ansible_facts.sidecar_capture.backend }}"
      tags: [sidecar_capture_validate]
"""

pytestmark = pytest.mark.skipif(not shutil.which("ansible-playbook") or not os.environ.get("ANSIBLE_COLLECTIONS_PATH"),
                                reason="needs ansible-playbook and the collection path (scripts/env.sh)")


def run(tmp_path, *extra):
    play = tmp_path / "play.yml"
    play.write_text(PLAY)
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    env.pop("ANSIBLE_COLLECTIONS_PATHS", None)
    args = ["ansible-playbook", "-i", "localhost,", str(play), "--tags", "sidecar_capture_validate",
            "-e", "ansible_python_interpreter={{ ansible_playbook_python }}"]
    for e in extra:
        args += ["-e", e]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_bad_value_from_the_command_line_fails_naming_it(tmp_path):
    out = run(tmp_path, "sidecar_inbound_exclude_ports=0022,2222", "sidecar_outbound_exclude_cidrs=010.0.0.0/8")
    assert out.returncode != 0, out.stdout
    assert 'sidecar_inbound_exclude_ports="0022,2222": leading zeros' in out.stdout
    assert 'sidecar_outbound_exclude_cidrs="010.0.0.0/8": 010.0.0.0/8 is not an IPv4/IPv6' in out.stdout
    assert "nothing was changed" in out.stdout
    assert "RESOLVED" not in out.stdout


def test_a_string_list_from_the_command_line_becomes_ports(tmp_path):
    out = run(tmp_path, "sidecar_inbound_exclude_ports=22,2222", "sidecar_ipv6=no")
    assert out.returncode == 0, out.stdout[-3000:]
    assert '\\"inbound_exclude_ports\\": [22, 2222]' in out.stdout or '"inbound_exclude_ports": [22, 2222]' in out.stdout, out.stdout[-3000:]
    assert '\\"families\\": [\\"ipv4\\"]' in out.stdout or '"families": ["ipv4"]' in out.stdout, out.stdout[-3000:]
