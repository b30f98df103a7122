#!/usr/bin/python3
# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""sidecar-capture: the host-side command of the capture (sidecar-capture.service runs it at boot).

    sidecar-capture start    load the rules files the role wrote, add the TPROXY policy routing
    sidecar-capture stop     remove exactly what start added
    sidecar-capture check    exit 1 (and say what differs) when the kernel's capture is not intact
    sidecar-capture repair   when started and not stopped since: put back what check finds missing
    sidecar-capture watch    repair every SIDECAR_CAPTURE_INTERVAL seconds (sidecar-capture-watch.service)
    sidecar-capture adopt    record that the capture is started (the watch unit runs it: systemd starts
                             that unit only while sidecar-capture.service is active)

It reads /etc/sidecar-intercept/capture.json (written by the role). The iptables backends use the
very code of the iptables_chains module (its module_utils/iptables.py, installed beside this
command): the same canonical comparison and the same --noflush payloads, so boot and Ansible can
never disagree. The nftables backend is a plain `nft -f` of rules.nft (it replaces the table in one
transaction), compared with module_utils/nftables.py like the nft_table module does. Standard library only.

repair is the reconciler: a firewall reload (ufw reload, firewall-cmd --reload, `nft -f` with flush
ruleset, iptables-restore of a saved ruleset, a container engine re-inserting its chains) may delete or
reorder our jumps, chains, table or TPROXY routes. It only ever repairs a capture that `start` put in
place and `stop` has not removed since (a marker under /run, written and removed under the same lock),
so a fail-open capture that was removed because the proxy is down is never added back. It prints one
line per repair (to the journal under systemd) and nothing while the capture is intact.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

CONFIG = os.environ.get("SIDECAR_CAPTURE_CONFIG", "/etc/sidecar-intercept/capture.json")
sys.path.insert(0, os.environ.get("SIDECAR_CAPTURE_LIB", "/usr/local/lib/sidecar-intercept"))
import iptables as ipt  # noqa: E402  (module_utils/iptables.py of the collection)
import nftables as nftu  # noqa: E402  (module_utils/nftables.py of the collection)

ENV = dict(os.environ, LANG="C", LC_ALL="C")
NFT_TABLE = ["inet", "sidecar_intercept"]
# "started and not stopped since" (repair acts only then) and the lock start/stop/repair take
MARKER = os.environ.get("SIDECAR_CAPTURE_STATE", "/run/sidecar-capture.active")
LOCK = os.environ.get("SIDECAR_CAPTURE_LOCK", "/run/sidecar-capture.lock")


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


def rules_drift(conf):
    """What differs between the rules files and the kernel (owned chains, jumps and their place, the table)."""
    if conf["backend"] != "nftables":
        return iptables(conf, "present", check_only=True)
    with open(os.path.join(conf["dir"], "rules.nft"), encoding="utf-8") as fh:
        desired = nftu.canonical(fh.read())
    listed = run(["nft", "list", "table"] + NFT_TABLE, check=False)
    if listed.returncode != 0:
        return ["table inet sidecar_intercept is missing"]
    current = nftu.canonical(listed.stdout)
    if current == desired:
        return []
    return ["table inet sidecar_intercept: %s" % c for c in nftu.chain_diff(desired, current)] or [
        "table inet sidecar_intercept differs"]


def _ip_json(args):
    out = run(["ip", "-j"] + args, check=False)
    try:
        return json.loads(out.stdout or "[]") if out.returncode == 0 else []
    except ValueError:
        return []


def has_fwmark_rule(conf, flag):
    """True when the family (flag -4/-6) has our `ip rule fwmark MARK/MASK lookup TABLE`."""
    mark, _sep, mask = conf["mark"].partition("/")
    want = (int(mark, 16), int(mask or "0xffffffff", 16))
    return any(str(r.get("table")) == str(conf["table"]) and "fwmark" in r
               and (int(str(r["fwmark"]), 16), int(str(r.get("fwmask", "0xffffffff")), 16)) == want
               for r in _ip_json([flag, "rule", "show"]))


def routes_drift(conf):
    """What is missing of the TPROXY policy routing and of the IPv6 passthrough source ::6."""
    drift = []
    table = str(conf["table"])
    for family in conf["families"]:
        flag = "-6" if family == "ipv6" else "-4"
        if conf["mode"] == "tproxy":
            if not has_fwmark_rule(conf, flag):
                drift.append("%s: no ip rule fwmark %s lookup %s" % (family, conf["mark"], table))
            if not [r for r in _ip_json([flag, "route", "show", "table", table]) if r.get("type") == "local"]:
                drift.append("%s: no local default route in table %s" % (family, table))
        if family == "ipv6" and not [a for i in _ip_json(["-6", "addr", "show", "dev", "lo"])
                                     for a in i.get("addr_info", []) if a.get("local") == "::6"]:
            drift.append("ipv6: no passthrough source ::6 on lo")
    return drift


def routes(conf, state):
    """TPROXY policy routing per family (one fwmark rule, the local route) and the IPv6 passthrough source."""
    for family in conf["families"]:
        flag = "-6" if family == "ipv6" else "-4"
        if conf["mode"] == "tproxy":
            rule = ["rule", "del", "fwmark", conf["mark"], "lookup", str(conf["table"])]
            # a repair leaves an intact family's rule alone: deleting and adding it again opened a window
            # without it (seen as drift of the intact ipv6 rule while the ipv4 one was repaired)
            missing = not has_fwmark_rule(conf, flag)
            while (state != "present" or missing) and run(["ip", flag] + rule, check=False).returncode == 0:
                pass
            if state == "present":
                if missing:
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


class Locked:
    """The lock start, stop and repair take (so a repair never races a stop)."""

    def __enter__(self):
        self.fh = open(LOCK, "a", encoding="utf-8")  # held until __exit__
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def apply(conf, state):
    if conf["backend"] == "nftables":
        nftables(conf, state)
    else:
        iptables(conf, state)
    routes(conf, state)


def repair():
    """Put back what drifted when the capture is started; returns the repairs made (empty when intact)."""
    with Locked():
        if not os.path.exists(MARKER):
            return []
        with open(CONFIG, encoding="utf-8") as fh:
            conf = json.load(fh)
        rules, paths = rules_drift(conf), routes_drift(conf)
        if rules:
            if conf["backend"] == "nftables":
                nftables(conf, "present")
            else:
                iptables(conf, "present")
        if paths:
            routes(conf, "present")
        return rules + paths


def watch():
    """Repair every SIDECAR_CAPTURE_INTERVAL seconds (default 5) until SIGTERM; errors are reported, not fatal."""
    interval = float(os.environ.get("SIDECAR_CAPTURE_INTERVAL", "5"))
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(0))
    failing = None
    while True:
        try:
            repaired = repair()
            if repaired:
                print("sidecar-capture: repaired the capture: " + "; ".join(repaired), flush=True)
            failing = None
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            if str(exc) != failing:  # once per distinct failure, not every few seconds
                print("sidecar-capture: repair failed: %s" % exc, file=sys.stderr, flush=True)
            failing = str(exc)
        time.sleep(interval)


def main(argv):
    if len(argv) != 2 or argv[1] not in ("start", "stop", "check", "repair", "watch", "adopt"):
        print("usage: sidecar-capture start|stop|check|repair|watch|adopt", file=sys.stderr)
        return 2
    try:
        if argv[1] == "watch":
            watch()
        if argv[1] == "repair":
            for change in repair():
                print("repaired: " + change)
            return 0
        with open(CONFIG, encoding="utf-8") as fh:
            conf = json.load(fh)
        if argv[1] == "check":
            changes = rules_drift(conf) + routes_drift(conf)
            for change in changes:
                print("drift: " + change)
            return 1 if changes else 0
        with Locked():
            if argv[1] in ("start", "adopt"):
                if argv[1] == "start":
                    apply(conf, "present")
                with open(MARKER, "w", encoding="utf-8") as fh:
                    fh.write("%s\n" % argv[1])
            else:
                if os.path.exists(MARKER):
                    os.unlink(MARKER)
                apply(conf, "absent")
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        print("sidecar-capture %s: %s" % (argv[1], exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
