"""Build (or take) the sidecar-proxy zipapp on the Ansible controller, with the standard library only.

Run by the proxy role with ``ansible_playbook_python -I -S`` (no site-packages: no pip, setuptools or
wheel can be used, so none is needed); needs no network:

    build_zipapp.py --source DIR [--out DIR]     build from the proxy source (pyproject.toml, src/)
    build_zipapp.py --package FILE [--out DIR]   take a prebuilt .pyz, or turn a pure-Python
                                                 sidecar-proxy wheel (.whl) into one

Prints one JSON object: path, filename, sha256, version.  The archive holds the package's files and a
``__main__.py`` that calls the ``sidecar-proxy`` entry point, so ``python3 sidecar-proxy.pyz`` runs the
proxy on any host with Python 3.10+ and nothing else installed.  It is reproducible: entries are
sorted, stored uncompressed, with a fixed timestamp and mode, so the same source gives the same bytes
(and sha256) on any controller, and the role uses the digest to decide whether a host needs a release.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import zipfile

PACKAGE = "sidecar_proxy"
DISTRIBUTION = "sidecar-proxy"
# 1980-01-01, the earliest timestamp a zip file can hold
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
ENTRY_RE = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*)$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")


class BuildError(Exception):
    pass


def version_of(init_source: bytes, where: str) -> str:
    """__version__ of the package's __init__.py (the one place the version is written)."""
    try:
        tree = ast.parse(init_source)
    except SyntaxError as exc:
        raise BuildError(f"{where}: {exc}") from None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            version = node.value.value
            if not VERSION_RE.match(version):
                raise BuildError(f"{where}: __version__ {version!r} is not a valid version")
            return version
    raise BuildError(f"{where} sets no __version__ string")


def scripts_table(pyproject: str) -> dict[str, str]:
    """[project.scripts] of pyproject.toml (tomllib where there is one: Python 3.11+)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: only simple `name = "module:func"` lines are understood
        table: dict[str, str] = {}
        section = None
        for raw in pyproject.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("["):
                section = line.strip("[] ")
            elif section == "project.scripts" and "=" in line:
                key, value = (part.strip().strip("\"'") for part in line.split("=", 1))
                table[key] = value
        return table
    try:
        data = tomllib.loads(pyproject)
    except tomllib.TOMLDecodeError as exc:
        raise BuildError(f"pyproject.toml: {exc}") from None
    return dict(data.get("project", {}).get("scripts", {}))


def main_module(entry: str, where: str) -> bytes:
    match = ENTRY_RE.match(entry.strip())
    if not match:
        raise BuildError(f"{where}: the {DISTRIBUTION} entry point {entry!r} is not 'module:function'")
    module, func = match.groups()
    return (f"# the {DISTRIBUTION} command: run this archive with python3\n"
            f"import sys\n\nfrom {module} import {func}\n\nsys.exit({func}())\n").encode()


def from_source(source: str) -> tuple[dict[str, bytes], str]:
    pyproject_path = os.path.join(source, "pyproject.toml")
    pkg_dir = os.path.join(source, "src", PACKAGE)
    if not os.path.isfile(pyproject_path) or not os.path.isdir(pkg_dir):
        raise BuildError(f"no proxy source at {source!r} (pyproject.toml or src/{PACKAGE}/ missing); "
                         "set sidecar_proxy_wheel to a prebuilt .pyz or wheel")
    with open(pyproject_path, encoding="utf-8") as fh:
        scripts = scripts_table(fh.read())
    if DISTRIBUTION not in scripts:
        raise BuildError(f"{pyproject_path}: [project.scripts] has no {DISTRIBUTION!r} entry")
    entries: dict[str, bytes] = {"__main__.py": main_module(scripts[DISTRIBUTION], pyproject_path)}
    for dirpath, dirnames, filenames in os.walk(pkg_dir):
        # only what the package needs: caches and editor files in a checkout must not leak in
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(dirpath, name)
            arcname = os.path.relpath(path, os.path.join(source, "src")).replace(os.sep, "/")
            with open(path, "rb") as fh:
                entries[arcname] = fh.read()
    init = f"{PACKAGE}/__init__.py"
    if init not in entries:
        raise BuildError(f"{pkg_dir} has no __init__.py")
    return entries, version_of(entries[init], os.path.join(pkg_dir, "__init__.py"))


def from_wheel(path: str, zf: zipfile.ZipFile) -> tuple[dict[str, bytes], str]:
    names = zf.namelist()
    info_dirs = sorted({n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")})
    if len(info_dirs) != 1:
        raise BuildError(f"sidecar_proxy_wheel: {path!r} is not a wheel (no single .dist-info directory)")
    info = info_dirs[0]

    def read(name: str) -> str:
        try:
            return zf.read(f"{info}/{name}").decode("utf-8", "replace")
        except KeyError:
            raise BuildError(f"sidecar_proxy_wheel: {path!r} has no {info}/{name}") from None

    meta = dict(line.split(": ", 1) for line in read("METADATA").splitlines() if ": " in line and line[:1] != " ")
    if meta.get("Name", "").replace("_", "-").lower() != DISTRIBUTION:
        raise BuildError(f"sidecar_proxy_wheel: {path!r} is the distribution {meta.get('Name')!r}, not {DISTRIBUTION}")
    if "Root-Is-Purelib: true" not in read("WHEEL") or any(n.split("/", 1)[0].endswith(".data") for n in names):
        raise BuildError(f"sidecar_proxy_wheel: {path!r} is not a pure-Python wheel with the package at its root")
    entry = None
    section = None
    for raw in read("entry_points.txt").splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[] ")
        elif section == "console_scripts" and "=" in line and line.split("=", 1)[0].strip() == DISTRIBUTION:
            entry = line.split("=", 1)[1].strip()
    if entry is None:
        raise BuildError(f"sidecar_proxy_wheel: {path!r} has no {DISTRIBUTION!r} console script")
    entries = {n: zf.read(n) for n in names if not n.endswith("/") and not n.startswith(info + "/")}
    entries["__main__.py"] = main_module(entry, path)
    init = f"{PACKAGE}/__init__.py"
    if init not in entries:
        raise BuildError(f"sidecar_proxy_wheel: {path!r} has no {init}")
    version = version_of(entries[init], f"{path}:{init}")
    if meta.get("Version") != version:
        raise BuildError(f"sidecar_proxy_wheel: {path!r} says Version {meta.get('Version')!r} but "
                         f"{init} says {version!r}")
    return entries, version


def from_package(path: str) -> tuple[dict[str, bytes], str]:
    if not os.path.isfile(path):
        raise BuildError(f"sidecar_proxy_wheel: {path!r} is not a file")
    if not path.endswith((".pyz", ".whl")):
        raise BuildError(f"sidecar_proxy_wheel: {path!r} is neither a zipapp (.pyz) nor a wheel (.whl)")
    try:
        with zipfile.ZipFile(path) as zf:
            if path.endswith(".whl"):
                return from_wheel(path, zf)
            names = set(zf.namelist())
            init = f"{PACKAGE}/__init__.py"
            if "__main__.py" not in names or init not in names:
                raise BuildError(f"sidecar_proxy_wheel: {path!r} is not a {DISTRIBUTION} zipapp "
                                 f"(no __main__.py or {init})")
            # taken as it is (its bytes are what the hosts run), only described
            return {}, version_of(zf.read(init), f"{path}:{init}")
    except zipfile.BadZipFile:
        raise BuildError(f"sidecar_proxy_wheel: {path!r} is not a zip archive") from None


def archive(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.create_system = 3  # Unix, whatever the controller is
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_STORED
            zf.writestr(info, entries[name])
    return buf.getvalue()


def publish(data: bytes, version: str, out: str | None) -> dict[str, str]:
    out = out or os.path.join(tempfile.gettempdir(), f"sidecar-proxy-builds-{os.getuid()}")
    sha256 = hashlib.sha256(data).hexdigest()
    filename = f"{DISTRIBUTION}-{version}.pyz"
    final_dir = os.path.join(out, sha256[:16])
    os.makedirs(final_dir, mode=0o700, exist_ok=True)
    final = os.path.join(final_dir, filename)
    fd, tmp = tempfile.mkstemp(dir=final_dir, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    return {"path": os.path.abspath(final), "filename": filename, "sha256": sha256, "version": version}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", help="the proxy source directory (with pyproject.toml and src/)")
    g.add_argument("--package", help="a prebuilt sidecar-proxy zipapp (.pyz) or pure-Python wheel (.whl)")
    p.add_argument("--out", help="where to keep built zipapps (default: a per-user temp directory)")
    args = p.parse_args()
    try:
        if args.package and args.package.endswith(".pyz"):
            version = from_package(args.package)[1]
            with open(args.package, "rb") as fh:
                data = fh.read()
            info = {"path": os.path.abspath(args.package), "filename": os.path.basename(args.package),
                    "sha256": hashlib.sha256(data).hexdigest(), "version": version}
        else:
            entries, version = from_package(args.package) if args.package else from_source(args.source)
            info = publish(archive(entries), version, args.out)
    except BuildError as exc:
        print(json.dumps({"failed": True, "msg": str(exc)}))
        sys.exit(1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
