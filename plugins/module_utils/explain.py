# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Explain one connection: which rules of the host it meets, and whether the proxy gets it.

Pure code (no commands run): the module `explain` passes the host's real rules (`iptables-save -c` of
nat and mangle, or `nft list table inet sidecar_intercept`), its local addresses and the connection;
unit tests pass recorded rules. Both backends are parsed into one form and walked the way netfilter
walks them for a new TCP connection:

  inbound   PREROUTING: mangle, then nat (the hook chains and every chain they jump to)
  outbound  OUTPUT: nat

A rule is {"chain", "index", "text", "counters": [packets, bytes] | None, "match": {...}, "verdict",
"target", "port", "unknown": [...]}; match keys: proto, src, dst (network, "neg"), iif, oif (name,
"neg"), dports ([ports] or set name, "neg"), uid, gid, local (addrtype/fib: the destination is a local
address, or not), ctstate ([states]), connmark ((mark, mask)), tcp_flags ((flags & mask) == comp; the
packet explained is a connection's first, a SYN). A rule with a match explain cannot evaluate is taken
as not matching, and said so in the notes.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

from ansible_collections.sidecar.intercept.plugins.module_utils.iptables import parse_save
from ansible_collections.sidecar.intercept.plugins.module_utils.nftables import table_facts

OWNED_PREFIX = "SIDECAR_"
LOOPBACK = {"ipv4": ipaddress.ip_network("127.0.0.0/8"), "ipv6": ipaddress.ip_network("::1/128")}
PASSTHROUGH = {"ipv4": "127.0.0.6", "ipv6": "::6"}
NFT_HOOKS = {"MANGLE_PREROUTING": ("mangle", "PREROUTING"), "NAT_PREROUTING": ("nat", "PREROUTING"),
             "NAT_OUTPUT": ("nat", "OUTPUT")}


class ExplainError(ValueError):
    """Bad input: a destination, source or rules text explain cannot use."""


def parse_endpoint(text):
    """'10.0.0.5:8080' or '[fd00::5]:8080' -> (family, address, port)."""
    text = str(text).strip()
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([0-9.]+):(\d+)$", text)
    if not m:
        raise ExplainError("explain=%r: expected IP:PORT (IPv4) or [IP]:PORT (IPv6), e.g. 10.0.0.5:8080" % text)
    try:
        addr = ipaddress.ip_address(m.group(1))
    except ValueError:
        raise ExplainError("explain=%r: %r is not an IP address" % (text, m.group(1)))
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ExplainError("explain=%r: port %d is not in 1-65535" % (text, port))
    return ("ipv6" if addr.version == 6 else "ipv4"), str(addr), port


# ----------------------------------------------------------------------------- iptables-save
def _ipt_rule(chain, index, spec, counters):
    tokens = shlex.split(spec)
    rule = {"chain": chain, "index": index, "text": "-A %s %s" % (chain, spec),
            "counters": list(counters) if counters else None, "match": {}, "verdict": None, "unknown": []}
    m = rule["match"]
    i, neg = 0, False
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t == "!":
            neg = True
            i += 1
            continue
        if t == "-p":
            m["proto"] = nxt
            i += 2
        elif t in ("-s", "-d"):
            m["src" if t == "-s" else "dst"] = {"net": nxt, "neg": neg}
            i += 2
        elif t in ("-i", "-o"):
            m["iif" if t == "-i" else "oif"] = {"name": nxt, "neg": neg}
            i += 2
        elif t == "-m":
            i += 2  # the match's options follow
        elif t == "--dport":
            m["dports"] = {"ports": [int(p) for p in nxt.split(":")[:1]], "neg": neg}
            i += 2
        elif t == "--dports":
            m["dports"] = {"ports": [int(p) for p in nxt.split(",")], "neg": neg}
            i += 2
        elif t in ("--uid-owner", "--gid-owner"):
            m["uid" if t == "--uid-owner" else "gid"] = {"id": int(nxt), "neg": neg}
            i += 2
        elif t == "--dst-type":
            m["local"] = (nxt == "LOCAL") != neg
            i += 2
        elif t == "--tcp-flags":  # --tcp-flags MASK COMP: (flags & MASK) == COMP
            comp = tokens[i + 2] if i + 2 < len(tokens) else ""
            m["tcp_flags"] = {"mask": set(nxt.split(",")), "comp": set(comp.split(",")) - {"NONE", ""}, "neg": neg}
            i += 3
        elif t == "--ctstate":
            m["ctstate"] = {"states": nxt.split(","), "neg": neg}
            i += 2
        elif t == "--mark" and chain and "connmark" in tokens:
            mark, _sep, mask = nxt.partition("/")
            m["connmark"] = {"mark": int(mark, 16), "mask": int(mask or "0xffffffff", 16), "neg": neg}
            i += 2
        elif t in ("-j", "-g"):
            target = nxt
            rule["target"] = target
            rule["verdict"] = {"RETURN": "return", "ACCEPT": "accept", "DROP": "drop", "REDIRECT": "redirect",
                               "TPROXY": "tproxy", "MARK": "mark", "CONNMARK": "connmark", "DNAT": "dnat",
                               "REJECT": "drop", "NOTRACK": "other", "CT": "other"}.get(target, "jump")
            i += 2
        elif t in ("--to-ports", "--on-port"):
            rule["port"] = int(nxt.split("-")[0])
            i += 2
        elif rule["verdict"] is not None:
            i += 1  # target options (--set-xmark, --on-ip, --tproxy-mark ...)
        elif t.startswith("--"):
            rule["unknown"].append(t + " " + nxt)
            i += 2
        else:
            rule["unknown"].append(t)
            i += 1
        neg = False
    return rule


def from_iptables(save_text):
    """Chains of `iptables-save -c` text (nat and mangle): {"mangle": {chain: [rules]}, "nat": {...}}."""
    out = {}
    for table, data in parse_save(save_text).items():
        if table not in ("nat", "mangle"):
            continue
        chains = {name: [] for name in data["order"]}
        for chain, spec, counters in data["rules"]:
            chains.setdefault(chain, [])
            chains[chain].append(_ipt_rule(chain, len(chains[chain]) + 1, spec, counters))
        out[table] = chains
    return out


# ----------------------------------------------------------------------------- nft list table
def _nft_set_values(value, sets):
    value = value.strip()
    if value.startswith("@"):
        return list(sets.get(value[1:], [])), value
    if value.startswith("{"):
        return [v.strip() for v in value.strip("{} ").split(",") if v.strip()], value
    return [value], value


def _nft_rule(chain, index, entry, sets):
    line = entry["rule"]
    rule = {"chain": chain, "index": index, "text": line,
            "counters": [entry["packets"], entry["bytes"]] if entry.get("packets") is not None else None,
            "match": {}, "verdict": None, "unknown": []}
    m = rule["match"]
    rest = line
    pats = [
        (r'^(iifname|oifname) (!= )?"([^"]+)"', lambda g: m.__setitem__(
            "iif" if g[0] == "iifname" else "oif", {"name": g[2].replace("*", "+"), "neg": bool(g[1])})),
        (r'^(ip|ip6) (saddr|daddr) (!= )?(@\S+|\{[^}]*\}|\S+)', lambda g: m.__setitem__(
            "src" if g[1] == "saddr" else "dst",
            {"nets": _nft_set_values(g[3], sets)[0], "family": "ipv6" if g[0] == "ip6" else "ipv4", "neg": bool(g[2])})),
        (r'^tcp dport (!= )?(@\S+|\{[^}]*\}|\d+)', lambda g: m.__setitem__(
            "dports", {"ports": [int(p) for p in _nft_set_values(g[1], sets)[0]], "neg": bool(g[0]), "proto": "tcp"})),
        (r'^meta l4proto (\S+)', lambda g: m.__setitem__("proto", g[0])),
        # `tcp flags ! syn`: the flag is not set; `tcp flags ack`: it is set
        (r'^tcp flags (! )?([a-z]+)(?= |$)', lambda g: m.__setitem__(
            "tcp_flags", {"mask": {g[1].upper()}, "comp": set() if g[0] else {g[1].upper()}, "neg": False})),
        (r'^meta (skuid|skgid) (!= )?(\d+)', lambda g: m.__setitem__(
            "uid" if g[0] == "skuid" else "gid", {"id": int(g[2]), "neg": bool(g[1])})),
        (r'^fib daddr type (!= )?local', lambda g: m.__setitem__("local", not g[0])),
        (r'^ct state (!= )?(\S+)', lambda g: m.__setitem__(
            "ctstate", {"states": [s.upper() for s in g[1].split(",")], "neg": bool(g[0])})),
        (r'^ct mark & (0x[0-9a-f]+) (==|!=) (0x[0-9a-f]+)', lambda g: m.__setitem__(
            "connmark", {"mask": int(g[0], 16), "mark": int(g[2], 16), "neg": g[1] == "!="})),
        (r'^counter( packets \d+ bytes \d+)?', lambda g: None),
        (r'^(ct|meta) mark set (?:(?:meta|ct) mark(?: [&|] 0x[0-9a-f]+)*|0x[0-9a-f]+)', lambda g: rule.__setitem__(
            "verdict", rule["verdict"] or ("connmark" if g[0] == "ct" else "mark"))),
        (r'^tproxy (ip |ip6 )?to (\S*):(\d+)', lambda g: rule.update(verdict="tproxy", port=int(g[2]))),
        (r'^redirect to :(\d+)', lambda g: rule.update(verdict="redirect", port=int(g[0]))),
        (r'^(return|accept|drop)', lambda g: rule.update(verdict=rule["verdict"] if rule["verdict"] == "tproxy" else g[0])),
        (r'^(jump|goto) (\S+)', lambda g: rule.update(verdict="jump", target=g[1])),
        (r'^# handle \d+', lambda g: None),
    ]
    while rest:
        for pat, act in pats:
            mm = re.match(pat, rest)
            if mm:
                act(mm.groups())
                rest = rest[mm.end():].strip()
                break
        else:
            word, _sep, rest = rest.partition(" ")
            rule["unknown"].append(word)
    return rule


def from_nft(listing):
    """Chains of `nft list table inet sidecar_intercept`, keyed by the iptables table they stand for."""
    facts = table_facts(listing)
    out = {"mangle": {}, "nat": {}}
    for name, entries in facts["chains"].items():
        table, hook = NFT_HOOKS.get(name, (None, None))
        rules = [_nft_rule(name, i + 1, e, facts["sets"]) for i, e in enumerate(entries)]
        if hook:  # a base chain of our table stands where iptables' built-in chain is
            out[table][hook] = rules
        else:  # regular chains are reachable from both
            out["mangle"][name] = rules
            out["nat"][name] = rules
    return out


# ----------------------------------------------------------------------------- evaluation
def _in_nets(addr, nets):
    a = ipaddress.ip_address(addr)
    for n in nets:
        try:
            if a in ipaddress.ip_network(n, strict=False):
                return True
        except ValueError:
            continue
    return False


def _iface_match(pattern, name):
    if name is None:
        return None
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def _matches(rule, pkt):
    """True / False, or None when a match cannot be evaluated for this connection."""
    m = rule["match"]
    if rule["unknown"]:
        return None
    if m.get("proto") not in (None, "tcp", "6"):
        return False
    for key in ("src", "dst"):
        if key in m:
            c = m[key]
            if "nets" in c:
                if c["family"] != pkt["family"]:
                    return False
                hit = _in_nets(pkt[key], c["nets"])
            else:
                net = ipaddress.ip_network(c["net"], strict=False)
                if (net.version == 6) != (pkt["family"] == "ipv6"):
                    return False
                hit = ipaddress.ip_address(pkt[key]) in net
            if hit == c["neg"]:
                return False
    for key in ("iif", "oif"):
        if key in m:
            hit = _iface_match(m[key]["name"], pkt.get(key))
            if hit is None or hit == m[key]["neg"]:
                return False
    if "dports" in m and (pkt["dport"] in m["dports"]["ports"]) == m["dports"]["neg"]:
        return False
    for key in ("uid", "gid"):
        if key in m:
            own = pkt.get(key)
            if own is None:  # inbound packets have no local socket owner
                return False
            if (own == m[key]["id"]) == m[key]["neg"]:
                return False
    if "local" in m and m["local"] != pkt["local"]:
        return False
    if "tcp_flags" in m:  # the packet explained is a connection's first: a SYN
        f = m["tcp_flags"]
        if ({"SYN"} & f["mask"] == f["comp"]) == f["neg"]:
            return False
    if "ctstate" in m and ("NEW" in m["ctstate"]["states"]) == m["ctstate"]["neg"]:
        return False
    if "connmark" in m and ((0 & m["connmark"]["mask"]) == m["connmark"]["mark"]) == m["connmark"]["neg"]:
        return False
    return True


def _reason(rule, pkt):
    """Why a RETURN (or ACCEPT) rule lets the connection bypass the proxy."""
    m = rule["match"]
    if "uid" in m or "gid" in m:
        return "owner", "the socket's owner (%s) is the proxy's: its own connections are never captured" % (
            "UID %d" % m["uid"]["id"] if "uid" in m else "GID %d" % m["gid"]["id"])
    if "src" in m and not m["src"]["neg"] and "oif" in m:
        return "loopback", "the proxy's inbound passthrough source on lo"
    if m.get("oif", {}).get("name") == "lo" or m.get("iif", {}).get("name") == "lo":
        return "loopback", "loopback traffic stays direct"
    if "dst" in m and not m["dst"]["neg"] and (
            _in_nets(pkt["dst"], [str(LOOPBACK[pkt["family"]])]) if pkt["family"] else False):
        return "loopback", "a loopback destination stays direct"
    if "dports" in m:
        return "excluded_port", "destination port %d is excluded" % pkt["dport"]
    if "src" in m:
        return "excluded_cidr", "source %s is in an excluded network" % pkt["src"]
    if "dst" in m:
        return "excluded_cidr", "destination %s is in an excluded network" % pkt["dst"]
    if "ctstate" in m:
        return "established", "an established connection the proxy does not hold"
    return "bypass", "rule returns"


def evaluate(chains, pkt, hooks):
    """Walk `hooks` ([(table, builtin chain)]) for packet pkt; the verdict with the rules it met."""
    path, notes = [], []
    result = {"verdict": "not_captured", "captured": False, "reason": "no rule captures it", "rule": None}

    def walk(table, chain, depth):
        for rule in chains.get(table, {}).get(chain, []):
            hit = _matches(rule, pkt)
            if hit is None:
                notes.append("%s rule %d (%s) has a match explain cannot evaluate (%s): taken as not matching" % (
                    chain, rule["index"], rule["text"], ", ".join(rule["unknown"])))
                continue
            if not hit:
                continue
            owned = (rule["chain"].startswith(OWNED_PREFIX) or rule["chain"] in NFT_HOOKS
                     or str(rule.get("target", "")).startswith(OWNED_PREFIX))
            step = {"table": table, "chain": rule["chain"], "index": rule["index"], "rule": rule["text"],
                    "counters": rule["counters"], "owned": owned}
            path.append(step)
            v = rule["verdict"]
            if v == "jump" and rule.get("target") in chains.get(table, {}) and depth < 16:
                end = walk(table, rule["target"], depth + 1)
                if end:
                    return end
                continue
            if v in ("redirect", "tproxy"):
                result.update(verdict="captured", captured=True, rule=step, port=rule.get("port"),
                              reason="%s to the proxy's port %s" % (v.upper(), rule.get("port")))
                return "stop"
            if v == "return":
                if owned:
                    code, text = _reason(rule, pkt)
                    result.update(verdict=code, rule=step, reason=text)
                elif chain in ("PREROUTING", "OUTPUT"):
                    result.update(verdict="bypass", rule=step, reason="RETURN by %s rule %d before the capture: %s" % (
                        chain, rule["index"], rule["text"]))
                return "return"
            if v in ("accept", "dnat", "drop"):
                result.update(verdict="bypass" if v != "drop" else "dropped", rule=step,
                              reason="%s by %s rule %d before the capture: %s" % (
                                  v.upper(), chain, rule["index"], rule["text"]))
                return "stop"
        return None

    for table, chain in hooks:
        if walk(table, chain, 0) == "stop":
            break
    if result["verdict"] == "not_captured" and pkt["direction"] == "inbound" and not pkt["local"]:
        result.update(verdict="forwarded",
                      reason="%s is not an address of this host: the connection is forwarded, never captured inbound"
                      % pkt["dst"])
    return dict(result, path=path, notes=notes)


def explain(chains, family, dst, dport, direction, local_addresses, src=None, uid=None, gid=None):
    """The verdict for a new TCP connection to dst:dport (see the module doc).

    direction: 'inbound' (from a remote client; src defaults to a documentation address) or
    'outbound' (opened by a process of this host with uid/gid; None: an application, not the proxy).
    """
    local = dst in local_addresses or _in_nets(dst, [str(LOOPBACK[family])])
    if direction == "inbound":
        src = src or ("192.0.2.1" if family == "ipv4" else "2001:db8::1")
        iif = "lo" if _in_nets(src, [str(LOOPBACK[family])]) else "eth0"
        pkt = {"family": family, "src": src, "dst": dst, "dport": dport, "direction": direction, "local": local,
               "iif": iif, "oif": None, "uid": None, "gid": None}
        hooks = [("mangle", "PREROUTING"), ("nat", "PREROUTING")]
    else:
        loop = local
        src = src or (dst if loop else ("192.0.2.2" if family == "ipv4" else "2001:db8::2"))
        pkt = {"family": family, "src": src, "dst": dst, "dport": dport, "direction": direction, "local": local,
               "iif": None, "oif": "lo" if loop else "eth0", "uid": uid, "gid": gid}
        hooks = [("nat", "OUTPUT")]
    out = evaluate(chains, pkt, hooks)
    out.update(direction=direction, family=family, destination="%s:%d" % (
        "[%s]" % dst if family == "ipv6" else dst, dport), source=src, local_destination=local)
    return out
