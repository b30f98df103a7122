# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where plan() puts a missing jump (the behaviour on real netfilter: tests/integration/capture)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from pathlib import Path

import pytest

from ansible_collections.sidecar.intercept.plugins.module_utils.iptables import current_state, desired_from_rules, plan

GOLDEN = Path(__file__).resolve().parents[3] / "golden" / "cases"


@pytest.mark.parametrize("position", ["first", "append"])
def test_nat_prerouting_jumps_are_appended_others_follow_the_position(position):
    desired = desired_from_rules((GOLDEN / "redirect-bridges.ipv4.rules").read_text())
    _changes, payload = plan(desired, {}, "present", position)
    starts = ("-A PREROUTING", "-I PREROUTING", "-A OUTPUT", "-I OUTPUT")
    jumps = [line for line in payload.splitlines() if line.startswith(starts)]
    assert jumps == [
        "-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j SIDECAR_INBOUND",
        "-A PREROUTING -i docker0 -p tcp -m addrtype ! --dst-type LOCAL -j SIDECAR_BRIDGE",
        "-A PREROUTING -i br-+ -p tcp -m addrtype ! --dst-type LOCAL -j SIDECAR_BRIDGE",
        ("-I OUTPUT 1" if position == "first" else "-A OUTPUT") + " -p tcp -j SIDECAR_OUTPUT",
    ]


def test_mangle_prerouting_jump_follows_the_position():
    desired = desired_from_rules((GOLDEN / "tproxy-defaults.ipv4.rules").read_text())
    _changes, payload = plan(desired, {}, "present", "first")
    assert "-I PREROUTING 1 -p tcp -m addrtype --dst-type LOCAL -j SIDECAR_INBOUND" in payload.splitlines()


@pytest.mark.parametrize("position", ["first", "append"])
def test_a_jump_another_rule_was_put_before_is_moved_back_only_when_first(position):
    """A firewall reload or a container engine restart that inserts its rules at the top of a built-in chain
    (the behaviour on real netfilter: tests/integration/capture/test_reconciler.py)."""
    rules = (GOLDEN / "tproxy-defaults.ipv4.rules").read_text()
    desired = desired_from_rules(rules)
    saved = rules.replace("*nat\n", "*nat\n:DOCKER - [0:0]\n-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER\n"
                                    "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n", 1)
    assert saved != rules
    changes, payload = plan(desired, current_state(saved, desired), "present", position)
    if position == "append":
        assert changes == [] and payload == ""
    else:
        assert changes == ["nat: move jump -A OUTPUT -p tcp -j SIDECAR_OUTPUT to the top of OUTPUT"]
        assert payload.splitlines()[1:3] == ["-D OUTPUT -p tcp -j SIDECAR_OUTPUT", "-I OUTPUT 1 -p tcp -j SIDECAR_OUTPUT"]


def test_jumps_a_rule_was_appended_after_in_nat_prerouting_go_back_to_the_end_in_order():
    """A container engine that starts after the capture appends its DNAT jump after ours: the DNAT must win."""
    rules = (GOLDEN / "redirect-bridges.ipv4.rules").read_text()
    desired = desired_from_rules(rules)
    docker = "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
    saved = rules.replace("-A PREROUTING -i docker0", docker + "-A PREROUTING -i docker0", 1).replace(
        "*nat\n", "*nat\n:DOCKER - [0:0]\n", 1)
    for position in ("first", "append"):
        changes, payload = plan(desired, current_state(saved, desired), "present", position)
        assert [c.split(" -j ")[-1] for c in changes] == [
            "SIDECAR_INBOUND to the end of PREROUTING", "SIDECAR_BRIDGE to the end of PREROUTING",
            "SIDECAR_BRIDGE to the end of PREROUTING"], changes
        assert [line for line in payload.splitlines() if line.startswith("-A PREROUTING")] == [
            "-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j SIDECAR_INBOUND",
            "-A PREROUTING -i docker0 -p tcp -m addrtype ! --dst-type LOCAL -j SIDECAR_BRIDGE",
            "-A PREROUTING -i br-+ -p tcp -m addrtype ! --dst-type LOCAL -j SIDECAR_BRIDGE"]
    assert plan(desired, current_state(rules.replace("*nat\n", "*nat\n:DOCKER - [0:0]\n" + docker, 1), desired),
                "present", "first")[0] == []
