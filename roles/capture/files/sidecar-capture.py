#!/usr/bin/python3
# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""sidecar-capture: the host-side command of the capture (sidecar-capture.service runs it at boot).

    sidecar-capture start   load the rules files the role wrote, add the TPROXY policy routing
    sidecar-capture stop    remove exactly what start added
    sidecar-capture check   exit 1 (and say what differs) when the kernel's capture is not intact

It reads /etc/sidecar-intercept/capture.json (written by the role). The iptables backends use the
very code of the iptables_chains module (its module_utils/iptables.py, installed beside this
command): the same canonical comparison and the same --noflush payloads, so boot and Ansible can
never disagree. The nftables backend is a plain `nft -f` of rules.nft (it replaces the table in one
transaction). Standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CONFIG = os.environ.get("SIDECAR_CAPTURE_CONFIG", "/etc/sidecar-intercept/capture.json")
sys.path.insert(0, os.environ.get("SIDECAR_CAPTURE_LIB", "/usr/local/lib/sidecar-intercept"))
import iptables as ipt  # noqa: E402  (module_utils/iptables.py of the collection)

ENV = dict(os.environ, LANG="C", LC_ALL="C")
NFT_TABLE = ["inet", "sidecar_intercept"]


def run(args, data=None, check=True):
    out = subprocess.run(args, input=data, capture_output=True, text=True, env=ENV, check=False)
    if check and out.returncode != 0:
        raise RuntimeError("%s failed (rc=%d): %s" % (" ".join(args), out.returncode, (out.stderr or out.stdout).strip()))
    return out


def rules_file(conf, family):
    return os.path.join(conf["dir"], "rules." + family.replace("ip", ""))


def iptables(conf, state, check_only=False):
    """Plan and apply each family's rules file like the module does; returns the changes."""
    changes = []
    for family in conf["families"]:
        with open(rules_file(conf, family), encoding="utf-8") as fh:
            desired = ipt.desired_from_rules(fh.read())
        saved = run([ipt.tool(family, conf["backend"], "save")]).stdout
        found, payload = ipt.plan(desired, ipt.current_state(saved, desired), state, conf["jump_position"])
        changes += ["%s %s" % (family, c) for c in found]
        if payload and not check_only:
            restore = [ipt.tool(family, conf["backend"], "restore"), "--noflush", "-w", "5"]
            run(restore + ["--test"], data=payload)
            run(restore, data=payload)
    return changes


def nftables(conf, state):
    if state == "present":
        run(["nft", "-f", os.path.join(conf["dir"], "rules.nft")])
    elif run(["nft", "list", "table"] + NFT_TABLE, check=False).returncode == 0:
        run(["nft", "delete", "table"] + NFT_TABLE)


def routes(conf, state):
    """TPROXY policy routing per family (one fwmark rule, the local route) and the IPv6 passthrough source."""
    for family in conf["families"]:
        flag = "-6" if family == "ipv6" else "-4"
        if conf["mode"] == "tproxy":
            rule = ["rule", "del", "fwmark", conf["mark"], "lookup", str(conf["table"])]
            while run(["ip", flag] + rule, check=False).returncode == 0:
                pass
            if state == "present":
                run(["ip", flag, "rule", "add", "fwmark", conf["mark"], "lookup", str(conf["table"])])
                run(["ip", flag, "route", "replace", "local", "default", "dev", "lo", "table", str(conf["table"])])
            else:
                run(["ip", flag, "route", "del", "local", "default", "dev", "lo", "table", str(conf["table"])],
                    check=False)
        if family == "ipv6":
            if state == "present":
                run(["ip", "-6", "addr", "replace", "::6/128", "dev", "lo"])
            else:
                run(["ip", "-6", "addr", "del", "::6/128", "dev", "lo"], check=False)


def main(argv):
    if len(argv) != 2 or argv[1] not in ("start", "stop", "check"):
        print("usage: sidecar-capture start|stop|check", file=sys.stderr)
        return 2
    with open(CONFIG, encoding="utf-8") as fh:
        conf = json.load(fh)
    try:
        if argv[1] == "check":
            if conf["backend"] == "nftables":
                ok = run(["nft", "list", "table"] + NFT_TABLE, check=False).returncode == 0
                changes = [] if ok else ["table inet sidecar_intercept is missing"]
            else:
                changes = iptables(conf, "present", check_only=True)
            for change in changes:
                print("drift: " + change)
            return 1 if changes else 0
        state = "present" if argv[1] == "start" else "absent"
        if conf["backend"] == "nftables":
            nftables(conf, state)
        else:
            iptables(conf, state)
        routes(conf, state)
    except (RuntimeError, OSError, ValueError) as exc:
        print("sidecar-capture %s: %s" % (argv[1], exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
