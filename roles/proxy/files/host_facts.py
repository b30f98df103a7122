"""Run on the managed host by the proxy role's preflight (with sidecar_proxy_python): one round trip
that reports who owns the proxy's UID/GID and names, this Python's version (it runs the proxy's
zipapp) and PID 1's hard open-files limit. Prints JSON. (IPv6 is resolved by the settings task, from
capture_facts.)"""
import grp
import json
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


print(json.dumps({
    "uid_owner": entry(pwd.getpwuid, uid),
    "gid_owner": entry(grp.getgrgid, gid),
    "user": entry(pwd.getpwnam, user),
    "group": entry(grp.getgrnam, group),
    "python": sys.executable,
    "python_version": ".".join(str(v) for v in sys.version_info[:3]),
    "python_version_info": list(sys.version_info[:3]),
    "nofile_hard": pid1_nofile_hard(),
}))
