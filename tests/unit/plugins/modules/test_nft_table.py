# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""nft_table driven by recorded nft runs (test_nft_table.yaml, run by recorded.py)."""

from __future__ import annotations

import pytest

from ansible_collections.sidecar.intercept.plugins.modules import nft_table
from ansible_collections.sidecar.intercept.tests.unit.plugins.modules.recorded import (
    check_case,
    load_cases,
    run_case,
)

CASES = load_cases("test_nft_table.yaml")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_nft_table(case, monkeypatch):
    result, failed, remaining = run_case(case, nft_table.main, monkeypatch)
    check_case(case, result, failed, remaining)
