"""Build (or describe) the sidecar-proxy wheel on the Ansible controller.

Run by the proxy role with ``ansible_playbook_python``; needs no network:

    build_wheel.py --source DIR [--out DIR]     build a wheel from the bundled proxy source
    build_wheel.py --wheel FILE                 describe a prebuilt wheel

Prints one JSON object: path, filename, sha256, version.  The build is reproducible
(SOURCE_DATE_EPOCH is fixed and only the package sources are copied), so the same source always
gives the same sha256 and the role can use the digest to decide whether a host needs a new release.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# 1980-01-01, the earliest timestamp a zip file can hold
REPRODUCIBLE_EPOCH = "315532800"


def fail(msg: str) -> None:
    print(json.dumps({"failed": True, "msg": msg}))
    sys.exit(1)


def describe(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        fail(f"sidecar_proxy_wheel: {path!r} is not a file")
    name = os.path.basename(path)
    if not name.endswith(".whl"):
        fail(f"sidecar_proxy_wheel: {path!r} is not a wheel (.whl)")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
            if not meta:
                fail(f"sidecar_proxy_wheel: {path!r} has no .dist-info/METADATA")
            text = zf.read(meta[0]).decode("utf-8", "replace")
    except zipfile.BadZipFile:
        fail(f"sidecar_proxy_wheel: {path!r} is not a valid wheel (bad zip file)")
    fields = dict(
        line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith(" ")
    )
    if fields.get("Name", "").replace("_", "-").lower() != "sidecar-proxy":
        fail(f"sidecar_proxy_wheel: {path!r} is the distribution {fields.get('Name')!r}, not sidecar-proxy")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "path": os.path.abspath(path),
        "filename": name,
        "sha256": digest.hexdigest(),
        "version": fields.get("Version", "unknown"),
    }


def build(source: str, out: str | None) -> dict[str, str]:
    if not os.path.isfile(os.path.join(source, "pyproject.toml")):
        fail(f"no proxy source at {source!r} (pyproject.toml missing); set sidecar_proxy_wheel to a prebuilt wheel")
    try:
        import setuptools  # noqa: F401
    except ImportError:
        fail(
            f"the controller's Python ({sys.executable}) has no setuptools, which building the "
            "sidecar-proxy wheel needs: install it into that environment (pip install setuptools) "
            "or set sidecar_proxy_wheel to a prebuilt wheel"
        )
    out = out or os.path.join(tempfile.gettempdir(), f"sidecar-proxy-wheels-{os.getuid()}")
    os.makedirs(out, mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sidecar-proxy-build-") as tmp:
        src = os.path.join(tmp, "src")
        # only what the package needs: build artefacts and caches in a checkout must not leak in
        shutil.copytree(
            source,
            src,
            ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "tests", "benchmarks", ".*"
            ),
        )
        dist = os.path.join(tmp, "dist")
        env = dict(os.environ, SOURCE_DATE_EPOCH=REPRODUCIBLE_EPOCH, PIP_NO_INDEX="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1", LC_ALL="C")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-q", "-w", dist, src]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wheels = [n for n in os.listdir(dist) if n.endswith(".whl")] if os.path.isdir(dist) else []
        if proc.returncode != 0 or len(wheels) != 1:
            fail("building the sidecar-proxy wheel failed: " + " ".join(cmd) + "\n"
                 + (proc.stdout + proc.stderr)[-3000:])
        info = describe(os.path.join(dist, wheels[0]))
        final_dir = os.path.join(out, info["sha256"][:16])
        os.makedirs(final_dir, exist_ok=True)
        final = os.path.join(final_dir, info["filename"])
        shutil.copyfile(info["path"], final + ".tmp")
        os.replace(final + ".tmp", final)
        info["path"] = final
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", help="the proxy source directory (with pyproject.toml)")
    g.add_argument("--wheel", help="a prebuilt sidecar-proxy wheel")
    p.add_argument("--out", help="where to keep built wheels (default: a per-user temp directory)")
    args = p.parse_args()
    info = describe(args.wheel) if args.wheel else build(args.source, args.out)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
