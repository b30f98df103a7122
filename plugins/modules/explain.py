#!/usr/bin/python
# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Explain why a connection does or does not go through the proxy, from the host's real rules."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: explain
short_description: Explain whether a connection goes through the sidecar proxy, and why
version_added: "0.1.0"
description:
  - Reads the rules the host really has (C(iptables-save -c) of the nat and mangle tables, or
    C(nft list table inet sidecar_intercept) with the native nftables backend) and walks them the way
    netfilter does for a new TCP connection to O(destination).
  - Reports the verdict (captured, or the reason it bypasses the proxy), the rule that decided it,
    every rule the connection meets with its live counters, and the proxy's last access-log lines
    for that destination.
  - Read-only; runs the same in check mode.
options:
  destination:
    description: The connection's destination, C(IP:PORT) or C([IPv6]:PORT).
    type: str
    required: true
  direction:
    description:
      - C(inbound) (from a remote client to this host), C(outbound) (opened by a process of this host),
        or C(auto) (inbound when the destination is an address of this host, else outbound).
    type: str
    choices: [auto, inbound, outbound]
    default: auto
  source:
    description: The client's address (inbound) or the local address (outbound); optional.
    type: str
  uid:
    description: For outbound, the UID of the process that opens the connection (default an application, not the proxy).
    type: int
  gid:
    description: For outbound, the GID of that process.
    type: int
  backend:
    description: Where the rules are read; C(auto) reads the native table when it exists, else iptables.
    type: str
    choices: [auto, legacy, nft, plain, nftables]
    default: auto
  log_lines:
    description: How many of the proxy's last access-log lines for the destination to return (0 for none).
    type: int
    default: 5
  unit:
    description: The proxy's systemd unit (its access log is its journal).
    type: str
    default: sidecar-proxy.service
author:
  - sidecar.intercept developers (@sidecar)
attributes:
  check_mode:
    support: full
    description: Read-only, runs the same in check mode.
  diff_mode:
    support: none
    description: Reads only; there is nothing to show a diff of.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with iptables or nftables, iproute2 and systemd's journal.
"""

EXAMPLES = r"""
- name: Why does 10.0.0.5:8080 (not) go through the proxy?
  sidecar.intercept.explain:
    destination: 10.0.0.5:8080
  register: why

- name: An outbound connection the proxy itself opens
  sidecar.intercept.explain:
    destination: "[fd00::5]:443"
    direction: outbound
    uid: 1337
"""

RETURN = r"""
verdict:
  description: C(captured), or why not - C(excluded_port), C(excluded_cidr), C(owner), C(loopback), C(established),
    C(forwarded), C(bypass) (another rule decided first), C(dropped), C(not_captured).
  returned: always
  type: str
  sample: excluded_port
captured:
  description: Whether the proxy gets the connection.
  returned: always
  type: bool
reason:
  description: The verdict in words.
  returned: always
  type: str
  sample: destination port 22 is excluded
rule:
  description: The rule that decided (table, chain, index, rule text, counters as [packets, bytes], owned), or null.
  returned: always
  type: dict
path:
  description: Every rule the connection matches on its way, in order, with the same keys as RV(rule).
  returned: always
  type: list
  elements: dict
notes:
  description: Rules with matches explain cannot evaluate (taken as not matching).
  returned: always
  type: list
  elements: str
direction:
  description: inbound or outbound (after C(auto)).
  returned: always
  type: str
destination:
  description: The destination as explained.
  returned: always
  type: str
backend:
  description: Where the rules were read (legacy, nft, plain, nftables), or null without any.
  returned: always
  type: str
access_log:
  description: The proxy's last access-log lines (JSON objects) whose C(dst) is the destination.
  returned: always
  type: list
  elements: dict
"""

import json

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sidecar.intercept.plugins.module_utils.command import run
from ansible_collections.sidecar.intercept.plugins.module_utils.explain import (
    ExplainError,
    explain,
    from_iptables,
    from_nft,
    parse_endpoint,
)
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables_backend import detect_backend, save

NFT_TABLE = ["inet", "sidecar_intercept"]


def _local_addresses(module, family):
    path = module.get_bin_path("ip", required=True)
    rc, out, _err = run(module, [path, "-6" if family == "ipv6" else "-4", "-j", "addr", "show"], check_rc=False)
    try:
        links = json.loads(out) if rc == 0 and out.strip() else []
    except ValueError:
        links = []
    return [a.get("local") for link in links for a in link.get("addr_info", []) if a.get("local")]


def _access_log(module, unit, destination, count):
    path = module.get_bin_path("journalctl")
    if not path or count <= 0:
        return []
    rc, out, _err = run(module, [path, "--no-pager", "-o", "cat", "-u", unit, "-n", "5000"], check_rc=False)
    found = []
    for line in out.splitlines() if rc == 0 else []:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("dst") == destination:
            found.append(entry)
    return found[-count:]


def main():
    module = AnsibleModule(
        argument_spec=dict(
            destination=dict(type="str", required=True),
            direction=dict(type="str", choices=["auto", "inbound", "outbound"], default="auto"),
            source=dict(type="str"),
            uid=dict(type="int"),
            gid=dict(type="int"),
            backend=dict(type="str", choices=["auto", "legacy", "nft", "plain", "nftables"], default="auto"),
            log_lines=dict(type="int", default=5),
            unit=dict(type="str", default="sidecar-proxy.service"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        family, addr, port = parse_endpoint(p["destination"])
    except ExplainError as exc:
        module.fail_json(msg=str(exc))
    local = _local_addresses(module, family)
    direction = p["direction"]
    if direction == "auto":
        direction = "inbound" if addr in local else "outbound"
    chains, backend = {}, None
    nft = module.get_bin_path("nft")
    if p["backend"] in ("auto", "nftables") and nft:
        rc, out, _err = run(module, [nft, "list", "table"] + NFT_TABLE, check_rc=False)
        if rc == 0:
            chains, backend = from_nft(out), "nftables"
    if backend is None and p["backend"] != "nftables":
        backend = detect_backend(module, "auto" if p["backend"] == "auto" else p["backend"], required=False)
        if backend == "nftables":  # nft without the table: nothing of ours is there
            backend = None
        if backend:
            try:
                chains = from_iptables(save(module, family, backend, counters=True, fail=False))
            except RuntimeError as exc:
                module.fail_json(msg="reading the %s rules: %s" % (family, exc))
    result = explain(chains, family, addr, port, direction, local, src=p["source"], uid=p["uid"], gid=p["gid"])
    if backend is None:
        result["notes"].append("no capture rules found on this host (no iptables tools and no table inet sidecar_intercept)")
    result["backend"] = backend
    result["access_log"] = _access_log(module, p["unit"], result["destination"], p["log_lines"])
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
