# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""iptables_chains and capture_facts driven by recorded iptables-save output (test_iptables_chains.yaml):
each case runs the real module with run_command patched to check every command and answer from the
recording."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.sidecar.intercept.plugins.modules import (
    capture_facts,
    iptables_chains,
)

with open(os.path.join(os.path.dirname(__file__), "test_iptables_chains.yaml")) as _fh:
    CASES = yaml.safe_load(_fh)

MODULES = {"iptables_chains": iptables_chains.main, "capture_facts": capture_facts.main}


class _Exit(Exception):
    def __init__(self, result):
        super().__init__(result)
        self.result = result


class _Fail(_Exit):
    pass


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case(case, monkeypatch):
    calls = list(case.get("calls", []))

    def fake_run_command(self, args, **kwargs):
        assert calls, "unexpected command %r" % (args,)
        expected = calls.pop(0)
        assert args == expected["command"]
        assert kwargs.get("environ_update", {}).get("LC_ALL") == "C"
        if "stdin" in expected:
            assert kwargs.get("data") == expected["stdin"]
        return expected.get("rc", 0), expected.get("out", ""), expected.get("err", "")

    def fake_exit(self, **kwargs):
        raise _Exit(kwargs)

    def fake_fail(self, msg, **kwargs):
        kwargs["msg"] = msg
        raise _Fail(kwargs)

    monkeypatch.setattr(basic.AnsibleModule, "run_command", fake_run_command)
    monkeypatch.setattr(basic.AnsibleModule, "exit_json", fake_exit)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fake_fail)
    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", lambda self, name, *a, **k: "/usr/sbin/" + name)
    args = dict(case["args"])
    args["_ansible_check_mode"] = case.get("check_mode", False)
    args["_ansible_diff"] = case.get("diff", False)
    with patch_module_args(args), pytest.raises(_Exit) as exc:
        MODULES[case.get("module", "iptables_chains")]()
    result = exc.value.result
    expected = case["expect"]
    assert isinstance(exc.value, _Fail) == expected.get("failed", False), result
    if "msg" in expected:
        assert re.search(expected["msg"], result["msg"]), result["msg"]
    for key in ("changed", "changes", "payload", "backend"):
        if key in expected:
            assert result.get(key) == expected[key], key
    for text in expected.get("diff_before_contains", []):
        assert text in result["diff"]["before"]
    for text in expected.get("diff_after_contains", []):
        assert text in result["diff"]["after"]
    if "facts" in expected:
        facts = result["ansible_facts"]["sidecar_capture"]
        for path, value in expected["facts"].items():
            node = facts
            for part in path.split("."):
                node = node[int(part)] if isinstance(node, list) else node[part]
            assert node == value, path
    assert calls == [], "commands not run: %r" % calls
