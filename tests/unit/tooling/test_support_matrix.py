"""The support claim is what the tests run: every ansible-core minor release from meta/runtime.yml's
oldest to the tools venv's newest has a controller in the matrix (tests/requirements-matrix-X.Y.txt, run
by scripts/tooling.sh matrix, or tests/requirements.txt for the newest), each names the Python it runs
on, and README's matrix has a row for each."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
MATRIX = sorted((ROOT / "tests").glob("requirements-matrix-*.txt"))


def pin(path: Path, name: str) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(re.escape(name) + r"==([0-9.]+)\s*(;.*)?$", line.strip())
        if m and (m.group(2) is None or '>= "3.12"' in m.group(2)):
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in {path.name}")


def minor(version: str) -> tuple[int, int]:
    major, mnr = version.split(".")[:2]
    return int(major), int(mnr)


def python_of(path: Path) -> str:
    m = re.search(r"^# python: *([0-9]+\.[0-9]+)\s*$", path.read_text(encoding="utf-8"), re.M)
    assert m, f"{path.name} names no controller Python ('# python: X.Y')"
    return m.group(1)


def releases() -> dict[tuple[int, int], str]:
    """Each tested ansible-core minor release and the controller Python it runs on."""
    out = {minor(pin(p, "ansible-core")): python_of(p) for p in MATRIX}
    out[minor(pin(ROOT / "tests" / "requirements.txt", "ansible-core"))] = "3.12"
    return out


def test_each_matrix_file_is_named_after_its_release() -> None:
    assert MATRIX, "no tests/requirements-matrix-X.Y.txt"
    for p in MATRIX:
        assert p.name == "requirements-matrix-%d.%d.txt" % minor(pin(p, "ansible-core"))


def test_every_claimed_release_is_tested() -> None:
    claim = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text(encoding="utf-8"))["requires_ansible"]
    m = re.fullmatch(r">=([0-9]+)\.([0-9]+)\.0", claim)
    assert m, f"requires_ansible {claim!r}: expected '>=X.Y.0'"
    tested = releases()
    oldest, newest = (int(m.group(1)), int(m.group(2))), max(tested)
    assert min(tested) == oldest, f"the oldest tested release {min(tested)} is not the claimed {oldest}"
    missing = [(oldest[0], n) for n in range(oldest[1], newest[1] + 1) if (oldest[0], n) not in tested]
    assert not missing, f"claimed but not tested: {missing}"


def test_readme_states_the_matrix_that_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Support matrix"):]
    section = section[:section.index("\n## ")]
    for (major, mnr), python in releases().items():
        assert re.search(rf"^\| {major}\.{mnr} \| {re.escape(python)} \|", section, re.M), \
            f"README's support matrix has no row '| {major}.{mnr} | {python} |'"
