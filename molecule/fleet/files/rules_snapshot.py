#!/usr/bin/python3
"""Write (or compare with) a normalised view of the host's iptables rules, without the collection's.

Kept: every rule (-A) and every user chain, per table and family; dropped: counters, comments and
built-in chain headers (a table that appears empty after use is not a foreign change), and anything
named SIDECAR_. Usage: rules_snapshot.py FILE          write the snapshot
                       rules_snapshot.py --compare FILE  exit 1 and print a diff when different
"""
import difflib
import re
import subprocess
import sys

BUILTIN = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}


def view():
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        text = subprocess.run([cmd], stdout=subprocess.PIPE, check=True, env={"LC_ALL": "C", "PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}).stdout.decode()
        table = "?"
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                name = line[1:].split()[0]
                if name not in BUILTIN and "SIDECAR_" not in name:
                    out.append(f"{cmd} {table} chain {name}")
            elif line.startswith("-A") and "SIDECAR_" not in line:
                out.append("{} {} {}".format(cmd, table, re.sub(r"^\[\d+:\d+\] ", "", line)))
    return out


def main():
    if sys.argv[1] == "--compare":
        with open(sys.argv[2]) as f:
            before = f.read().splitlines()
        now = view()
        if before != now:
            sys.stdout.write("\n".join(difflib.unified_diff(before, now, "before", "after", lineterm="")) + "\n")
            return 1
        print(f"foreign rules identical ({len(now)} lines)")
        return 0
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(view()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
