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
    choices: [auto, legacy, nft, plain]
    default: auto
  table:
    description: Routing table whose routes are reported (the TPROXY table).
    type: int
    default: 133
  fwmark:
    description:
      - The TPROXY mark and mask (C(0x539/0xfff)). When given, each family reports under
        C(fwmark_conflicts) the host's C(ip rule) entries with a fwmark selector that would also match
        packets carrying this mark and that lead to another table than O(table) (policy routing of
        other software, such as WireGuard, Tailscale or a VPN).
    type: str
  families:
    description: Address families to report.
    type: list
    elements: str
    choices: [ipv4, ipv6]
    default: [ipv4, ipv6]
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
ansible_facts:
  description: Facts under the key C(sidecar_capture).
  returned: always
  type: dict
  contains:
    sidecar_capture:
      description: Backend, then one entry per family.
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
          rules: [{priority: 32765, fwmark: "0x539", fwmask: "0xfff", table: "133"}]
          fwmark_conflicts: [{priority: 100, fwmark: "0x1", fwmask: "0x1", table: "200"}]
          routes: [{type: local, dst: default, dev: lo}]
          passthrough_address: true
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables import (
    owned_chains,
)
from ansible_collections.sidecar.intercept.plugins.module_utils.iproute import (
    IprouteError,
    fwmarks_overlap,
    parse_fwmark,
)
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables_backend import (
    detect_backend,
    run,
    save,
)


def _ip_json(module, args):
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


def fwmark_conflicts(rules, mark, table):
    """The entries of ``ip -json rule show`` whose fwmark selector overlaps `mark` ((mark, mask)) and whose
    table is not ours. A "not fwmark" rule matches the packets without that mark; it is not a collision."""
    found = []
    for rule in rules:
        if rule.get("fwmark") is None or "not" in rule or str(rule.get("table")) == str(table):
            continue
        try:
            theirs = parse_fwmark("%s/%s" % (rule["fwmark"], rule.get("fwmask", "0xffffffff")))
        except IprouteError:
            continue
        if fwmarks_overlap(mark, theirs):
            found.append(rule)
    return found


def main():
    module = AnsibleModule(
        argument_spec=dict(
            prefix=dict(type="str", default="SIDECAR_"),
            backend=dict(type="str", choices=["auto", "legacy", "nft", "plain"], default="auto"),
            table=dict(type="int", default=133),
            families=dict(type="list", elements="str", choices=["ipv4", "ipv6"], default=["ipv4", "ipv6"]),
            fwmark=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    mark = None
    if p["fwmark"]:
        try:
            mark = parse_fwmark(p["fwmark"])
        except IprouteError as exc:
            module.fail_json(msg=str(exc))
    backend = detect_backend(module, p["backend"])
    facts = {"backend": backend}
    for family in p["families"]:
        flag = "-6" if family == "ipv6" else "-4"
        all_rules = _ip_json(module, [flag, "rule", "show"])
        rules = [r for r in all_rules if str(r.get("table")) == str(p["table"])]
        routes = _ip_json(module, [flag, "route", "show", "table", str(p["table"])])
        try:
            tables = owned_chains(save(module, family, backend, counters=True, fail=False), p["prefix"])
        except RuntimeError as exc:
            facts[family] = {"available": False, "error": str(exc)}
            continue
        entry = {
            "available": True,
            "tables": tables,
            "rules": rules,
            "routes": routes,
        }
        if mark is not None:
            entry["fwmark_conflicts"] = fwmark_conflicts(all_rules, mark, p["table"])
        if family == "ipv6":
            addrs = _ip_json(module, ["-6", "addr", "show", "dev", "lo"])
            entry["passthrough_address"] = any(
                a.get("local") == "::6" for i in addrs for a in i.get("addr_info", []))
        facts[family] = entry
    module.exit_json(changed=False, ansible_facts={"sidecar_capture": facts})


if __name__ == "__main__":
    main()
