# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rules model: which capture rules exist for a configuration, decided once for every backend.

`build(settings)` takes resolved settings (module_utils/settings.py) and returns the owned chains, the
hooks that jump into them and their rules as plain data. The backends only render it:
roles/capture/templates/rules.j2 as iptables-restore text (one family at a time: rules that carry a
`family` belong to that family only), roles/capture/templates/rules.nft.j2 as one native nftables
table (v4 and v6 together, lists as named sets).

A rule is a dict; every key is optional except `verdict`:
  family   'ipv4' | 'ipv6'          the rule exists for that family only
  src      network                  source address (-s / ip saddr)
  dst      network, dst_not         destination is / is not (-d / ! -d / ip daddr [!=])
  iif, oif interface name           (-i / -o / iifname / oifname)
  proto    'tcp'                    (-p tcp / meta l4proto tcp)
  dports   [ports], set: name       one rule per port (iptables) or a named set (nftables)
  dsts     [networks], set: name    one rule per network (iptables) or a named set (nftables)
  srcs     [networks], set: name    the same for the source address
  uid, gid owner of the socket      (-m owner / meta skuid, skgid)
  ctstate  [states]                 (-m conntrack --ctstate / ct state)
  tcp_flags 'no-syn' | 'ack'        the SYN flag is not set / the ACK flag is set
                                    (-m tcp ! --tcp-flags SYN SYN / --tcp-flags ACK ACK;
                                    tcp flags ! syn / tcp flags ack)
  connmark mark/mask                the connection mark has these bits (-m connmark --mark / ct mark)
  verdict  'return' | 'accept' | 'jump' (target) | 'redirect' (port) | 'tproxy' (port, mark, mask)
           | 'mark' (mark, mask: set the packet mark's masked bits) | 'connmark' (the same for the
           connection mark)
Hooks (the jumps from the kernel's chains into ours) carry `proto`, optional `iif` and `local`
(True: addressed to the host itself, -m addrtype --dst-type LOCAL / fib daddr type local; False:
not addressed to it).
A rule whose `dports`, `dsts` or `srcs` list is empty does not exist; one with two lists exists once per
pair (iptables) or matches both sets (nftables). A list's set name is `dports_set`, `dsts_set`, `srcs_set`.
"""

from __future__ import annotations

ADDR = {
    "ipv4": {"loopback": "127.0.0.1/32", "passthrough": "127.0.0.6/32", "any": "0.0.0.0"},
    "ipv6": {"loopback": "::1/128", "passthrough": "::6/128", "any": "::"},
}
FAMILIES = ("ipv4", "ipv6")


def _per_family(rule, families):
    """One copy of rule per family, with the family's addresses filled in by name."""
    out = []
    for fam in families:
        r = dict(rule, family=fam)
        for key in ("src", "dst", "dst_not"):
            if key in r:
                r[key] = ADDR[fam][r[key]]
        out.append(r)
    return out


# Only the first packet of a connection, a SYN, is redirected or diverted to the proxy. A packet without
# SYN (or with ACK) that reaches these chains belongs to a connection that was open before connection
# tracking started: on a host without any conntrack rule (no firewall, no container engine) the
# capture's own rules switch tracking on, and the kernel then picks up the open connections in the
# middle of their stream (nf_conntrack_tcp_loose), their next packet looking like a new connection's
# first. Redirecting it cut them, the SSH connection Ansible uses among them. They stay direct.
MIDSTREAM = [
    {"proto": "tcp", "tcp_flags": "no-syn", "verdict": "return"},
    {"proto": "tcp", "tcp_flags": "ack", "verdict": "return"},
]


def _inbound_excludes(s, families):
    """Excluded ports and source networks: RETURN before anything is captured or diverted."""
    rules = [{"proto": "tcp", "dports": s["inbound_exclude_ports"], "dports_set": "inbound_exclude_ports",
              "verdict": "return"}]
    for fam in families:
        rules.append({"family": fam, "srcs": s["inbound_exclude_cidrs"][fam], "srcs_set": "inbound_exclude_" + fam[2:],
                      "verdict": "return"})
    return rules


def _inbound_redirect(s, families):
    rules = _inbound_excludes(s, families)
    if s["inbound_ports"] == "*":
        rules.append({"proto": "tcp", "verdict": "jump", "target": "SIDECAR_IN_REDIRECT"})
    else:
        rules.append({"proto": "tcp", "dports": s["inbound_ports"], "dports_set": "inbound_ports",
                      "verdict": "jump", "target": "SIDECAR_IN_REDIRECT"})
    return [
        {"name": "SIDECAR_INBOUND", "rules": rules},
        {"name": "SIDECAR_IN_REDIRECT",
         "rules": MIDSTREAM + [{"proto": "tcp", "verdict": "redirect", "port": s["inbound_port"]}]},
    ]


def _inbound_tproxy(s, families):
    """Connections TPROXY took carry our connection mark: their packets are diverted to the proxy's
    socket (DIVERT marks them for the policy route); every other known connection (the host's own,
    forwarded ones, those opened before the capture) returns untouched."""
    mark = {"mark": s["tproxy_mark_hex"], "mask": s["tproxy_mask_hex"]}
    inbound = [{"iif": "lo", "verdict": "return"}] + _inbound_excludes(s, families) + [
        {"proto": "tcp", "connmark": "%s/%s" % (mark["mark"], mark["mask"]), "verdict": "jump",
         "target": "SIDECAR_DIVERT"},
        {"proto": "tcp", "ctstate": ["RELATED", "ESTABLISHED"], "verdict": "return"},
    ]
    if s["inbound_ports"] == "*":
        inbound.append({"proto": "tcp", "verdict": "jump", "target": "SIDECAR_TPROXY"})
    else:
        inbound.append({"proto": "tcp", "dports": s["inbound_ports"], "dports_set": "inbound_ports",
                        "verdict": "jump", "target": "SIDECAR_TPROXY"})
    tproxy = list(MIDSTREAM)
    for fam in families:
        tproxy += _per_family({"dst_not": "loopback", "proto": "tcp", "verdict": "connmark", **mark}, [fam])
        tproxy += _per_family({"dst_not": "loopback", "proto": "tcp", "verdict": "tproxy", "port": s["inbound_port"],
                               "on_ip": ADDR[fam]["any"], **mark}, [fam])
    return [
        {"name": "SIDECAR_INBOUND", "rules": inbound},
        {"name": "SIDECAR_DIVERT", "rules": [dict(verdict="mark", **mark)]},
        {"name": "SIDECAR_TPROXY", "rules": tproxy},
    ]


def _outbound(s, families):
    rules = _per_family({"src": "passthrough", "oif": "lo", "verdict": "return"}, families)
    rules += [
        {"uid": s["proxy_uid"], "verdict": "return"},
        {"gid": s["proxy_gid"], "verdict": "return"},
        {"oif": "lo", "verdict": "return"},
    ]
    rules += _per_family({"dst": "loopback", "verdict": "return"}, families)
    bridge = []
    for iface, nets in s["bridges"].items():
        for fam in families:
            bridge += [{"family": fam, "dst": net, "iif": iface, "verdict": "return"} for net in nets[fam]]
    selection = _outbound_selection(s, families)
    return [
        {"name": "SIDECAR_OUTPUT", "rules": rules + selection},
        {"name": "SIDECAR_BRIDGE", "rules": (bridge + selection) if s["bridges"] else []},
        {"name": "SIDECAR_REDIRECT",
         "rules": MIDSTREAM + [{"proto": "tcp", "verdict": "redirect", "port": s["outbound_port"]}]},
    ]


def _outbound_selection(s, families):
    """Exclusions, then includes: shared by the host's own connections and opted-in bridges."""
    rules = []
    rules.append({"proto": "tcp", "dports": s["outbound_exclude_ports"], "dports_set": "outbound_exclude_ports",
                  "verdict": "return"})
    for fam in families:
        rules.append({"family": fam, "dsts": s["outbound_exclude_cidrs"][fam], "dsts_set": "outbound_exclude_" + fam[2:],
                      "verdict": "return"})
    ports = {} if s["outbound_include_ports"] == "*" else {
        "proto": "tcp", "dports": s["outbound_include_ports"], "dports_set": "outbound_include_ports"}
    if s["outbound_include_cidrs"] == "*":
        rules.append(dict(ports, verdict="jump", target="SIDECAR_REDIRECT"))
    else:
        for fam in families:
            rules.append(dict(ports, family=fam, dsts=s["outbound_include_cidrs"][fam],
                              dsts_set="outbound_include_" + fam[2:], verdict="jump", target="SIDECAR_REDIRECT"))
    return rules


def _exists(rule):
    return all(rule[key] for key in ("dports", "dsts", "srcs") if key in rule)


def build(s):
    """The capture for resolved settings s.

    Returns {"families": [...], "mode": ..., "tables": [{"name": "mangle"|"nat", "hooks": [...],
    "chains": [...]}]}: tables in the order they are written, each with its hook jumps
    ({"hook": "PREROUTING", "proto": "tcp", "target": chain}) and owned chains ({"name", "rules"}).
    Rules that cannot exist (an empty list) are left out.
    """
    families = list(s["families"])
    tables = []
    # inbound: only what is addressed to the host itself; forwarded traffic (containers, routing) is not ours
    inbound = {"hook": "PREROUTING", "proto": "tcp", "local": True, "target": "SIDECAR_INBOUND"}
    if s["mode"] == "tproxy":
        tables.append({"name": "mangle", "hooks": [inbound], "chains": _inbound_tproxy(s, families)})
        nat_hooks, nat_chains = [], []
    else:
        nat_hooks, nat_chains = [inbound], _inbound_redirect(s, families)
    nat_hooks += [{"hook": "PREROUTING", "iif": iface, "proto": "tcp", "local": False, "target": "SIDECAR_BRIDGE"}
                  for iface in s["bridges"]]
    nat_hooks.append({"hook": "OUTPUT", "proto": "tcp", "target": "SIDECAR_OUTPUT"})
    tables.append({"name": "nat", "hooks": nat_hooks, "chains": nat_chains + _outbound(s, families)})
    for table in tables:
        for chain in table["chains"]:
            chain["rules"] = [r for r in chain["rules"] if _exists(r)]
    return {"families": families, "mode": s["mode"], "tables": tables}


def sets(model):
    """The named sets the nftables backend declares: [{"name", "type", "interval", "elements"}], sorted by name."""
    found = {}
    for table in model["tables"]:
        for chain in table["chains"]:
            for rule in chain["rules"]:
                if "dports" in rule:
                    found[rule["dports_set"]] = {"name": rule["dports_set"], "type": "inet_service", "interval": False,
                                                 "elements": [str(p) for p in rule["dports"]]}
                for key in ("dsts", "srcs"):
                    if key in rule:
                        name = rule[key + "_set"]
                        found[name] = {"name": name, "type": "ipv4_addr" if rule["family"] == "ipv4" else "ipv6_addr",
                                       "interval": True, "elements": [nft_addr(n) for n in rule[key]]}
    return [found[k] for k in sorted(found)]


def nft_iface(name):
    """An interface name as nft matches it (iptables' wildcard suffix + is nft's *)."""
    return name[:-1] + "*" if name.endswith("+") else name


def nft_addr(network):
    """nft prints a host network without its prefix length (10.0.0.1/32 -> 10.0.0.1)."""
    addr, _sep, plen = network.partition("/")
    return addr if plen in ("32", "128") and (":" in addr) == (plen == "128") else network


def nft_mark(rule, key="meta mark"):
    """The value of nft's `meta mark set` (or `ct mark set`) for a rule's mark/mask, as `nft list` prints it.

    iptables' --set-xmark VALUE/MASK (and TPROXY's --tproxy-mark) keep the bits outside MASK; nft
    writes that as `meta mark & KEEP | VALUE` (with KEEP folded to ~MASK | VALUE), or just VALUE when
    MASK covers every bit.
    """
    value, mask = int(rule["mark"], 16), int(rule["mask"], 16)
    if mask == 0xFFFFFFFF:
        return "0x%08x" % value
    return "%s & 0x%08x | 0x%08x" % (key, (~mask & 0xFFFFFFFF) | value, value)


def nft_connmark(selector):
    """nft's match of a connection mark MARK/MASK, as `nft list` prints it."""
    mark, _sep, mask = selector.partition("/")
    return "ct mark & 0x%08x == 0x%08x" % (int(mask or "0xffffffff", 16), int(mark, 16))
