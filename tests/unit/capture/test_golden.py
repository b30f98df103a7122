"""The rendered rules of both backends (roles/capture/templates/rules.j2, rules.nft.j2) equal the golden files byte for byte.

Regenerate after an intended change with: python tests/golden/regen.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("golden_regen", ROOT / "tests" / "golden" / "regen.py")
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)
EXPECTED = regen.expected()


@pytest.mark.parametrize("path", sorted(EXPECTED), ids=lambda p: p.name)
def test_golden(path):
    assert path.exists(), "missing golden file %s: run python tests/golden/regen.py" % path.name
    assert path.read_text() == EXPECTED[path], "%s differs: run python tests/golden/regen.py and review" % path.name


def test_no_stale_golden_files():
    cases = ROOT / "tests" / "golden" / "cases"
    on_disk = set(cases.glob("*.rules")) | set(cases.glob("*.nft"))
    assert on_disk == set(EXPECTED)
