"""The proxy role's controller-side build needs nothing but the Python standard library.

The build runs in a fresh `python -m venv --without-pip` venv (no pip, setuptools or wheel) with
`-I -S` (no site-packages at all), from copies of the proxy source with different file times:
both builds must give the same bytes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "roles" / "proxy" / "files" / "build_zipapp.py"
SOURCE = ROOT / "proxy"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A venv without pip, setuptools or wheel."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    for mod in ("pip", "setuptools", "wheel"):
        probe = subprocess.run([python, "-c", f"import {mod}"], capture_output=True, check=False)
        assert probe.returncode != 0, f"the bare venv can import {mod}"
    return python


def copy_source(dest: Path, mtime: int) -> Path:
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for dirpath, _dirs, files in os.walk(dest):
        for name in files:
            os.utime(os.path.join(dirpath, name), (mtime, mtime))
    return dest


def build(python: str, source: Path, out: Path) -> dict[str, str]:
    proc = subprocess.run([python, "-I", "-S", str(SCRIPT), "--source", str(source), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_build_is_reproducible_without_setuptools(bare_python: str, tmp_path: Path) -> None:
    first = build(bare_python, copy_source(tmp_path / "a", 1_700_000_000), tmp_path / "out-a")
    second = build(bare_python, copy_source(tmp_path / "b", 1_800_000_000), tmp_path / "out-b")
    assert first["sha256"] == second["sha256"]
    assert Path(first["path"]).read_bytes() == Path(second["path"]).read_bytes()


def test_build_is_a_runnable_zipapp_of_the_package(bare_python: str, tmp_path: Path) -> None:
    built = build(bare_python, SOURCE, tmp_path / "out")
    init = (SOURCE / "src" / "sidecar_proxy" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "(.+)"$', init, re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert built["version"] == version
    assert built["filename"] == f"sidecar-proxy-{version}.pyz"
    with zipfile.ZipFile(built["path"]) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    sources = sorted(f"sidecar_proxy/{p.name}" for p in (SOURCE / "src" / "sidecar_proxy").glob("*.py"))
    assert names == ["__main__.py", *sources]
    # the host runs it exactly so: its python3, isolated, nothing installed
    run = subprocess.run([bare_python, "-I", built["path"], "--version"], capture_output=True, text=True, check=False)
    assert (run.returncode, run.stdout.strip()) == (0, f"sidecar-proxy {version}")
    bad = tmp_path / "bad.json"
    bad.write_text('{"inbound_port": 70000}')
    check = subprocess.run([bare_python, "-I", built["path"], "--check-config", str(bad)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 1 and "70000" in check.stderr


def make_wheel(path: Path, version: str, name: str = "sidecar_proxy", purelib: bool = True,
               meta_version: str | None = None) -> Path:
    """A wheel as setuptools lays it out, written with zipfile (no setuptools needed)."""
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for src in sorted((SOURCE / "src" / "sidecar_proxy").glob("*.py")):
            text = src.read_bytes()
            if src.name == "__init__.py":
                text = re.sub(rb'__version__ = ".*"', f'__version__ = "{version}"'.encode(), text)
            zf.writestr(f"sidecar_proxy/{src.name}", text)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {meta_version or version}\n")
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: {str(purelib).lower()}\nTag: py3-none-any\n")
        zf.writestr(f"{info}/entry_points.txt", "[console_scripts]\nsidecar-proxy = sidecar_proxy.__main__:main\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def take(python: str, package: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-I", "-S", str(SCRIPT), "--package", str(package), "--out", str(out)],
                          capture_output=True, text=True, check=False)


def test_a_wheel_becomes_the_same_zipapp_as_its_source(bare_python: str, tmp_path: Path) -> None:
    init = (SOURCE / "src" / "sidecar_proxy" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "(.+)"$', init, re.MULTILINE).group(1)  # type: ignore[union-attr]
    wheel = make_wheel(tmp_path / f"sidecar_proxy-{version}-py3-none-any.whl", version)
    proc = take(bare_python, wheel, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout
    converted = json.loads(proc.stdout)
    assert converted["sha256"] == build(bare_python, SOURCE, tmp_path / "src-out")["sha256"]
    # a prebuilt zipapp is taken as it is
    again = take(bare_python, Path(converted["path"]), tmp_path / "unused")
    assert json.loads(again.stdout) == converted


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "is not a file"),
        ("other-dist", "is the distribution 'other_proxy', not sidecar-proxy"),
        ("not-purelib", "is not a pure-Python wheel"),
        ("version-mismatch", "says Version '9.9.9' but sidecar_proxy/__init__.py says '1.0.0'"),
        ("tarball", "is neither a zipapp (.pyz) nor a wheel (.whl)"),
    ],
)
def test_bad_prebuilt_packages_fail_naming_the_file(bare_python: str, tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / "sidecar_proxy-1.0.0-py3-none-any.whl"
    if case == "other-dist":
        make_wheel(path, "1.0.0", name="other_proxy")
    elif case == "not-purelib":
        make_wheel(path, "1.0.0", purelib=False)
    elif case == "version-mismatch":
        make_wheel(path, "1.0.0", meta_version="9.9.9")
    elif case == "tarball":
        path = tmp_path / "sidecar-proxy-1.0.0.tar.gz"
        path.write_bytes(b"not a zip")
    proc = take(bare_python, path, tmp_path / "out")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["failed"] is True
    assert message in result["msg"] and repr(str(path)) in result["msg"], result["msg"]


def test_bad_source_fails_with_a_clear_message(bare_python: str, tmp_path: Path) -> None:
    src = copy_source(tmp_path / "src", 1_700_000_000)
    init = src / "src" / "sidecar_proxy" / "__init__.py"
    init.write_text(init.read_text().replace("__version__ = ", "__version__ = '1.0 beta' or "))
    proc = subprocess.run([bare_python, "-I", "-S", str(SCRIPT), "--source", str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "sets no __version__ string" in json.loads(proc.stdout)["msg"]
    proc = subprocess.run([bare_python, "-I", "-S", str(SCRIPT), "--source", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "no proxy source at" in json.loads(proc.stdout)["msg"]


def test_role_minimum_python_matches_the_package() -> None:
    pyproject = (SOURCE / "pyproject.toml").read_text()
    wanted = re.search(r'^requires-python = ">=(\d+)\.(\d+)"$', pyproject, re.MULTILINE)
    assert wanted, "proxy/pyproject.toml has no requires-python = \">=X.Y\""
    role_vars = yaml.safe_load((ROOT / "roles" / "proxy" / "vars" / "main.yml").read_text())
    assert role_vars["_sidecar_proxy_min_python"] == [int(wanted.group(1)), int(wanted.group(2))]


def test_the_python_3_10_fallback_reads_the_scripts_table_like_tomllib(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("build_zipapp", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (SOURCE / "pyproject.toml").read_text()
    with_tomllib = mod.scripts_table(text)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError, as on 3.10
    assert mod.scripts_table(text) == with_tomllib == {"sidecar-proxy": "sidecar_proxy.__main__:main"}
