"""The support claim is what the tests run: meta/runtime.yml's oldest ansible-core is the one the
matrix venv (tests/requirements-matrix.txt) installs, the newest is the tools venv's, and README's
matrix names both."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]


def pin(path: Path, name: str) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(re.escape(name) + r"==([0-9.]+)\s*(;.*)?$", line.strip())
        if m and (m.group(2) is None or '>= "3.12"' in m.group(2)):
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in {path.name}")


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_oldest_claimed_release_is_the_matrix_venvs() -> None:
    claim = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text(encoding="utf-8"))["requires_ansible"]
    m = re.fullmatch(r">=([0-9]+\.[0-9]+)\.0", claim)
    assert m, f"requires_ansible {claim!r}: expected '>=X.Y.0'"
    assert minor(pin(ROOT / "tests" / "requirements-matrix.txt", "ansible-core")) == m.group(1)


def test_readme_states_the_matrix_that_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Support matrix"):]
    section = section[:section.index("\n## ")]
    oldest = minor(pin(ROOT / "tests" / "requirements-matrix.txt", "ansible-core"))
    assert f"| {oldest} |" in section and "| 3.11 |" in section
    assert "| 2.21 |" in section and "| 3.12 |" in section
