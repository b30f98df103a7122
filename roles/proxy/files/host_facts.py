"""Run on the managed host by the proxy role's preflight (with sidecar_proxy_python): one round trip
that reports who owns the proxy's UID/GID and names, whether this Python can build a venv with pip,
and PID 1's hard open-files limit. Prints JSON. (IPv6 is resolved by the settings task, from
capture_facts.)"""
import glob
import grp
import importlib.util
import json
import os
import pwd
import sys

uid, gid, user, group = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


def entry(lookup, key):
    try:
        found = lookup(key)
    except (KeyError, OverflowError):
        return None
    return {"name": found[0], "id": found[2]}


def pid1_nofile_hard():
    try:
        with open("/proc/1/limits", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    hard = line.split()[4]
                    return int(hard) if hard.isdigit() else None
    except OSError:
        pass
    return None


def pip_wheel():
    """A pip wheel to install with, so that release venvs need no pip of their own (Debian's
    python3-pip-whl, a dependency of python3-venv, or ensurepip's bundled copy)."""
    found = glob.glob("/usr/share/python-wheels/pip-*.whl")
    spec = importlib.util.find_spec("ensurepip")
    if spec and spec.origin:
        found += glob.glob(os.path.join(os.path.dirname(spec.origin), "_bundled", "pip-*.whl"))

    def version(path):
        return tuple(int(x) if x.isdigit() else 0 for x in os.path.basename(path).split("-")[1].split("."))

    return max(found, key=version) if found else None


wheel = pip_wheel()
missing = [m for m in ("venv",) if importlib.util.find_spec(m) is None]
if wheel is None and importlib.util.find_spec("ensurepip") is None:
    missing.append("ensurepip")
print(json.dumps({
    "uid_owner": entry(pwd.getpwuid, uid),
    "gid_owner": entry(grp.getgrgid, gid),
    "user": entry(pwd.getpwnam, user),
    "group": entry(grp.getgrnam, group),
    "python": sys.executable,
    "python_version": ".".join(str(v) for v in sys.version_info[:3]),
    "venv_missing": missing,
    "pip_wheel": wheel,
    "nofile_hard": pid1_nofile_hard(),
}))
