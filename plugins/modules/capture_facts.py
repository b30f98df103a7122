#!/usr/bin/python
# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: capture_facts
short_description: Report the traffic capture state of a host
version_added: 0.1.0
description:
  - Reports the iptables backend in use, the owned chains (by name prefix) with their rules and packet
    and byte counters per family and table, the jumps into them, and the policy routing rules and
    routes that TPROXY capture uses.
  - Read-only; sets the fact C(sidecar_capture).
author:
  - sidecar.intercept developers (@sidecar)
options:
  prefix:
    description: Name prefix of the owned chains.
    type: str
    default: SIDECAR_
  backend:
    description: iptables backend to read; C(auto) detects it like M(sidecar.intercept.iptables_chains).
    type: str
    choices: [auto, legacy, nft, plain, nftables]
    default: auto
  table:
    description: Routing table whose routes are reported (the TPROXY table).
    type: int
    default: 133
  require_backend:
    description:
      - Fail when no iptables tools exist for O(backend). With C(false) the facts report C(backend=null)
        and the host facts only.
    type: bool
    default: true
  config_dir:
    description:
      - Where the capture role wrote its rules files and C(capture.json); the deployed capture found
        there is compared with the kernel (C(deployment)).
    type: path
    default: /etc/sidecar-intercept
  proxy_uid:
    description: The proxy's UID; C(host.accounts.uid) names the account that owns it on the host.
    type: int
  proxy_gid:
    description: The proxy's GID; C(host.accounts.gid) names the group that owns it on the host.
    type: int
  families:
    description: Address families to report.
    type: list
    elements: str
    choices: [ipv4, ipv6]
    default: [ipv4, ipv6]
  rollout:
    description:
      - Also compare the host with its last verified rollout, as M(sidecar.intercept.rollout_state) with
        O(sidecar.intercept.rollout_state#module:state=query) does, in the same module run (read-only).
        The record's digest is returned, not compared (RV(rollout.digest)).
      - C(sidecar.intercept.site) reads an unchanged host with this one call.
    type: dict
    suboptions:
      path:
        description: The record M(sidecar.intercept.rollout_state) wrote.
        type: path
        required: true
      files:
        description: Glob patterns of the files the rollout owns, as recorded.
        type: list
        elements: str
        default: []
      ready_url:
        description: An HTTP URL on a loopback address that must answer 200, asked only when nothing else differs.
        type: str
      timeout:
        description: Seconds to wait for O(rollout.ready_url).
        type: float
        default: 3
attributes:
  check_mode:
    support: full
    description: Read-only, runs the same in check mode.
  diff_mode:
    support: none
    description: Reads only; there is nothing to show a diff of.
  facts:
    support: full
    description: Returns everything under C(ansible_facts.sidecar_capture).
  platform:
    support: full
    platforms: posix
    description: Linux hosts with iptables and iproute2.
"""

EXAMPLES = r"""
- name: Read the capture state
  sidecar.intercept.capture_facts:

- name: Show the packet counters of the inbound chain
  ansible.builtin.debug:
    var: ansible_facts.sidecar_capture.ipv4.tables.nat.chains.SIDECAR_INBOUND
"""

RETURN = r"""
rollout:
  description: With O(rollout) - the comparison with the last verified rollout.
  returned: when O(rollout) is given
  type: dict
  contains:
    digest:
      description: The digest of the recorded rollout (null when there is no record).
      type: str
    reasons:
      description: Every difference found except the digest, one line each (empty when none).
      type: list
      elements: str
  sample: {digest: 3f5a..., reasons: ["/etc/sidecar-proxy/config.json changed"]}
ansible_facts:
  description: Facts under the key C(sidecar_capture).
  returned: always
  type: dict
  contains:
    sidecar_capture:
      description:
        - Backend, then one entry per family, then C(host) - what the settings resolve against -
          C(ipv6.enabled) (the kernel has IPv6 on), C(ipv6.global) (a global IPv6 address exists),
          C(ssh_ports) (TCP ports sshd listens on), C(fwmarks) (every fwmark policy rule) and C(tools)
          (whether the iptables and nft commands exist), C(firewall) (host firewalls that filter inbound
          traffic - ufw, firewalld, an iptables INPUT or nftables input chain with policy drop - one line
          each), C(accounts) (the user and group names of
          O(proxy_uid) and O(proxy_gid) on the host, null when no account has them or they were not given).
        - C(nftables) (when C(nft) exists) - the table C(inet sidecar_intercept) of the native backend,
          its chains with each rule's counters and its sets.
        - C(deployment) - the capture the role deployed (O(config_dir)) against the kernel -
          C(deployed), C(backend), C(mode), C(intact) and C(drift), the list of differences in the
          owned chains or table and the TPROXY policy routing (empty when intact).
      type: dict
      returned: always
      sample:
        backend: nft
        ipv4:
          tables:
            nat:
              chains:
                SIDECAR_OUTPUT:
                  - {rule: "-m owner --uid-owner 1337 -j RETURN", packets: 12, bytes: 720}
              jumps:
                - {chain: OUTPUT, rule: "-p tcp -j SIDECAR_OUTPUT", packets: 40, bytes: 2400}
          rules: [{priority: 32765, fwmark: "0x539", table: "133"}]
          routes: [{type: local, dst: default, dev: lo}]
          passthrough_address: true
        nftables:
          present: true
          chains:
            SIDECAR_OUTPUT:
              - {rule: "meta skuid 1337 counter return", packets: 12, bytes: 720}
          sets:
            inbound_exclude_ports: ["22"]
        deployment:
          deployed: true
          backend: nft
          mode: tproxy
          intact: false
          drift: ["nat: rewrite chain SIDECAR_INBOUND", "ipv4: no ip rule fwmark 0x539 lookup 133"]
        host:
          ipv6: {enabled: true, global: true}
          ssh_ports: [22, 2222]
          fwmarks: [{family: ipv4, fwmark: "0x539", mask: "0xfff", not: false, table: "133", priority: 32765}]
          tools: {iptables: true, nft: true}
          firewall: ["ufw (iptables-nft)", "iptables-nft filter INPUT policy DROP"]
          accounts: {uid: sidecar-proxy, gid: sidecar-proxy}
"""

import grp
import json
import os
import pwd

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables import (
    RulesError,
    current_state,
    desired_from_rules,
    owned_chains,
    plan,
)
from ansible_collections.sidecar.intercept.plugins.module_utils.command import run
from ansible_collections.sidecar.intercept.plugins.module_utils.rollout import problems, query
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables_backend import (
    detect_backend,
    save,
)
from ansible_collections.sidecar.intercept.plugins.module_utils.nftables import (
    NftError,
    canonical,
    chain_diff,
    table_facts,
)

NFT_TABLE = ("inet", "sidecar_intercept")


# Each read of the kernel once per module run: the host facts, the per-family facts and the deployment
# ask for the same ip rules, routes and iptables-save output (this module only reads).
_READS = {}


def _ip_json(module, args):
    key = ("ip",) + tuple(args)
    if key not in _READS:
        _READS[key] = _ip_json_read(module, args)
    return _READS[key]


def _ip_json_read(module, args):
    ip = module.get_bin_path("ip")
    if not ip:
        return []
    rc, out, _err = run(module, [ip, "-json"] + args, check_rc=False)
    if rc != 0 or not out.strip():
        return []
    try:
        return json.loads(out)
    except ValueError:
        return []


def _saved(module, family, backend):
    """iptables-save -c of one family (RuntimeError when it cannot be read)."""
    key = ("save", family, backend)
    if key not in _READS:
        try:
            _READS[key] = save(module, family, backend, counters=True, fail=False)
        except RuntimeError as exc:
            _READS[key] = exc
    if isinstance(_READS[key], RuntimeError):
        raise _READS[key]
    return _READS[key]


def _ssh_ports():
    """TCP ports that an sshd process listens on (from /proc: socket inodes of sshd's open files)."""
    inodes = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % pid) as fh:
                if fh.read().strip() != "sshd":
                    continue
            for fd in os.listdir("/proc/%s/fd" % pid):
                target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address, state 0A = LISTEN, inode
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def _host_facts(module):
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as fh:
            v6_enabled = fh.read().strip() == "0"
    except OSError:
        v6_enabled = False
    try:
        with open("/proc/net/if_inet6") as fh:
            # columns: address, ifindex, prefix length, scope (00 = global), flags, device
            v6_global = any(len(line.split()) >= 6 and line.split()[3] == "00" for line in fh)
    except OSError:
        v6_global = False
    fwmarks = []
    for flag in ("-4", "-6"):
        for r in _ip_json(module, [flag, "rule", "show"]):
            if "fwmark" in r:
                fwmarks.append({"family": "ipv6" if flag == "-6" else "ipv4", "fwmark": r.get("fwmark"),
                                "mask": r.get("fwmask"), "not": bool(r.get("not")), "table": str(r.get("table")),
                                "priority": r.get("priority")})
    tools = {"iptables": bool(module.get_bin_path("iptables-save")), "nft": bool(module.get_bin_path("nft"))}
    return {"ipv6": {"enabled": v6_enabled, "global": v6_enabled and v6_global},
            "ssh_ports": _ssh_ports(), "fwmarks": fwmarks, "tools": tools, "firewall": _firewall(module)}


_IPTABLES_XT = {"%s %s" % (f, t) for f in ("ip", "ip6") for t in ("filter", "nat", "mangle", "raw", "security")}


def _firewall(module):
    """Host firewalls that filter inbound traffic, one line each (what the settings name to the user)."""
    found = []
    tools = [t for t in ("iptables-legacy-save", "iptables-nft-save") if module.get_bin_path(t)] or [
        t for t in ("iptables-save",) if module.get_bin_path(t)]  # (the plain tool is one of those where they exist)
    for tool in tools:
        path = module.get_bin_path(tool)
        rc, out, _err = module.run_command([path, "-t", "filter"], environ_update=dict(LANG="C", LC_ALL="C"))
        if rc != 0:
            continue
        chains = [line[1:].split() for line in out.splitlines() if line.startswith(":")]
        names = {c[0] for c in chains}
        if any(n.startswith("ufw-") for n in names):
            found.append("ufw (%s)" % tool[:-5])
        if "INPUT_ZONES" in names or "INPUT_direct" in names:
            found.append("firewalld, iptables backend (%s)" % tool[:-5])
        if any(c[0] == "INPUT" and len(c) > 1 and c[1] == "DROP" for c in chains):
            found.append("%s filter INPUT policy DROP" % tool[:-5])
    path = module.get_bin_path("nft")
    if path:
        rc, out, _err = module.run_command([path, "list", "ruleset"], environ_update=dict(LANG="C", LC_ALL="C"))
        table = chain = None
        for line in out.splitlines() if rc == 0 else []:
            text = line.strip()
            if text.startswith("table "):
                table, chain = " ".join(text.split()[1:3]), None
                if table == "inet firewalld":
                    found.append("firewalld (nftables table inet firewalld)")
            elif text.startswith("chain "):
                chain = text.split()[1]
            elif table and chain and "hook input" in text and "policy drop" in text and table not in _IPTABLES_XT:
                found.append("nftables table %s chain %s: input policy drop" % (table, chain))
    return sorted(set(found))


def _accounts(uid, gid):
    """Names of the user that has uid and the group that has gid on this host (None: none, or not asked)."""
    out = {"uid": None, "gid": None}
    try:
        out["uid"] = pwd.getpwuid(uid).pw_name if uid is not None else None
    except KeyError:
        pass
    try:
        out["gid"] = grp.getgrgid(gid).gr_name if gid is not None else None
    except KeyError:
        pass
    return out


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _deployment(module, config_dir, nft_listing):
    """The deployed capture (capture.json and the rules files the role wrote) against the kernel."""
    try:
        conf = json.loads(_read(os.path.join(config_dir, "capture.json")))
    except (OSError, ValueError):
        return {"deployed": False, "intact": False, "drift": []}
    drift = []
    try:
        if conf["backend"] == "nftables":
            desired = canonical(_read(os.path.join(config_dir, "rules.nft")))
            if nft_listing is None:
                drift.append("table inet sidecar_intercept is missing")
            else:
                current = canonical(nft_listing)
                if current != desired:
                    drift += chain_diff(desired, current) or ["table inet sidecar_intercept differs"]
        else:
            for family in conf["families"]:
                desired = desired_from_rules(_read(os.path.join(config_dir, "rules." + family.replace("ip", ""))))
                current = current_state(_saved(module, family, conf["backend"]), desired)
                drift += plan(desired, current, "present", conf.get("jump_position", "first"))[0]
    except (OSError, KeyError, RulesError, NftError, RuntimeError) as exc:
        drift.append("cannot compare: %s" % exc)
    if conf.get("mode") == "tproxy":
        table = str(conf["table"])
        mark, _sep, mask = conf["mark"].partition("/")
        want = (int(mark, 16), int(mask or "0xffffffff", 16))
        for family in conf.get("families", []):
            flag = "-6" if family == "ipv6" else "-4"
            rules = [r for r in _ip_json(module, [flag, "rule", "show"])
                     if str(r.get("table")) == table and "fwmark" in r
                     and (int(str(r["fwmark"]), 16), int(str(r.get("fwmask", "0xffffffff")), 16)) == want]
            if not rules:
                drift.append("%s: no ip rule fwmark %s lookup %s" % (family, conf["mark"], table))
            routes = [r for r in _ip_json(module, [flag, "route", "show", "table", table]) if r.get("type") == "local"]
            if not routes:
                drift.append("%s: no local default route in table %s" % (family, table))
    return {"deployed": True, "backend": conf.get("backend"), "mode": conf.get("mode"),
            "intact": not drift, "drift": drift}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            prefix=dict(type="str", default="SIDECAR_"),
            backend=dict(type="str", choices=["auto", "legacy", "nft", "plain", "nftables"], default="auto"),
            table=dict(type="int", default=133),
            families=dict(type="list", elements="str", choices=["ipv4", "ipv6"], default=["ipv4", "ipv6"]),
            require_backend=dict(type="bool", default=True),
            config_dir=dict(type="path", default="/etc/sidecar-intercept"),
            proxy_uid=dict(type="int"),
            proxy_gid=dict(type="int"),
            rollout=dict(type="dict", options=dict(
                path=dict(type="path", required=True),
                files=dict(type="list", elements="str", default=[]),
                ready_url=dict(type="str"),
                timeout=dict(type="float", default=3.0),
            )),
        ),
        supports_check_mode=True,
    )
    _READS.clear()  # (one run per process under Ansible; tests run main() many times)
    p = module.params
    rollout = p["rollout"]
    if rollout:
        found = problems(rollout["path"], rollout["files"], rollout["ready_url"], rollout["timeout"])
        if found:
            module.fail_json(msg="rollout: " + "; ".join(found))
    backend = detect_backend(module, p["backend"], required=p["require_backend"])
    host = _host_facts(module)
    host["accounts"] = _accounts(p["proxy_uid"], p["proxy_gid"])
    facts = {"backend": backend, "host": host}
    for family in (p["families"] if backend else []):
        flag = "-6" if family == "ipv6" else "-4"
        rules = [r for r in _ip_json(module, [flag, "rule", "show"]) if str(r.get("table")) == str(p["table"])]
        routes = _ip_json(module, [flag, "route", "show", "table", str(p["table"])])
        if backend == "nftables":
            tables = {}  # one inet table for both families: facts["nftables"]
        else:
            try:
                tables = owned_chains(_saved(module, family, backend), p["prefix"])
            except RuntimeError as exc:
                facts[family] = {"available": False, "error": str(exc)}
                continue
        entry = {
            # with nftables one inet table serves both families; IPv6 is there when the kernel has it
            "available": True if backend != "nftables" or family == "ipv4" else host["ipv6"]["enabled"],
            "tables": tables,
            "rules": rules,
            "routes": routes,
        }
        if family == "ipv6":
            addrs = _ip_json(module, ["-6", "addr", "show", "dev", "lo"])
            entry["passthrough_address"] = any(
                a.get("local") == "::6" for i in addrs for a in i.get("addr_info", []))
        facts[family] = entry
    nft = module.get_bin_path("nft")
    listing = None
    if nft:
        rc, out, _err = run(module, [nft, "list", "table"] + list(NFT_TABLE), check_rc=False)
        listing = out if rc == 0 else None
        facts["nftables"] = dict(table_facts(out), present=True) if rc == 0 else {"present": False, "chains": {}, "sets": {}}
    facts["deployment"] = _deployment(module, p["config_dir"], listing)
    result = {"changed": False, "ansible_facts": {"sidecar_capture": facts}}
    if rollout:
        reasons, record = query(module, rollout["path"], rollout["files"], rollout["ready_url"], rollout["timeout"])
        result["rollout"] = {"digest": record.get("digest"), "reasons": reasons}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
