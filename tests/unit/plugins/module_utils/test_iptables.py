# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where plan() puts a missing jump (the behaviour on real netfilter: tests/integration/capture)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from pathlib import Path

import pytest

from ansible_collections.sidecar.intercept.plugins.module_utils.iptables import desired_from_rules, plan

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
