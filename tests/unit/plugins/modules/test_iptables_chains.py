# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""iptables_chains and capture_facts driven by recorded iptables-save output (test_iptables_chains.yaml,
run by recorded.py): each case runs the real module with run_command patched to check every command
and answer from the recording."""

from __future__ import annotations

import pytest

from ansible_collections.sidecar.intercept.plugins.modules import (
    capture_facts,
    iptables_chains,
)
from ansible_collections.sidecar.intercept.tests.unit.plugins.modules.recorded import (
    check_case,
    load_cases,
    run_case,
)

CASES = load_cases("test_iptables_chains.yaml")
MODULES = {"iptables_chains": iptables_chains.main, "capture_facts": capture_facts.main}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case(case, monkeypatch):
    result, failed, remaining = run_case(case, MODULES[case.get("module", "iptables_chains")], monkeypatch)
    check_case(case, result, failed, remaining)
