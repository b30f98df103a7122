# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Parsing of iptables-save output, canonical rule comparison and iptables-restore payloads.

Everything here is pure (no commands run), so unit tests drive it with recorded output.
"""

from __future__ import annotations

import shlex

BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

FAMILY_TOOLS = {"ipv4": "iptables", "ipv6": "ip6tables"}


class RulesError(ValueError):
    """Raised on input that is not iptables-restore text of the expected shape."""


def tool(family, backend, action):
    """Name of the binary, e.g. tool('ipv6', 'nft', 'save') -> 'ip6tables-nft-save'."""
    base = FAMILY_TOOLS[family]
    middle = "" if backend in (None, "", "plain") else "-" + backend
    suffix = "" if action == "" else "-" + action
    return base + middle + suffix


def canonical(rule):
    """Canonical text of one rule spec (without '-A CHAIN'), for comparison.

    iptables-save adds implicit matches ('-m tcp' after '-p tcp') and writes host addresses with
    their prefix length; counters ('[p:b]' or '-c p b') are dropped.
    """
    tokens = shlex.split(rule)
    out = []
    i = 0
    proto = None
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("[") and t.endswith("]") and ":" in t and i == 0:
            i += 1
            continue
        if t == "-c" and i + 2 < len(tokens) + 1:
            i += 3
            continue
        if t == "-p" and i + 1 < len(tokens):
            proto = tokens[i + 1]
        if t == "-m" and i + 1 < len(tokens) and tokens[i + 1] == proto:
            i += 2
            continue
        out.append(t)
        i += 1
    return " ".join(out)


def parse_save(text):
    """Parse iptables-save (or restore) text.

    Returns {table: {"chains": {name: policy-or-'-'}, "order": [names], "rules": [(chain, spec, counters)]}}.
    counters is (packets, bytes) when present ('-c' or '[p:b]' prefix), else None.
    """
    tables = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {"chains": {}, "order": [], "rules": []})
            continue
        if line == "COMMIT":
            current = None
            continue
        if current is None:
            raise RulesError("line outside a table: %r" % raw)
        if line.startswith(":"):
            parts = line[1:].split()
            name = parts[0]
            current["chains"][name] = parts[1] if len(parts) > 1 else "-"
            current["order"].append(name)
            continue
        counters = None
        if line.startswith("["):
            end = line.index("]")
            p, b = line[1:end].split(":")
            counters = (int(p), int(b))
            line = line[end + 1:].strip()
        tokens = shlex.split(line)
        if "-c" in tokens:
            k = tokens.index("-c")
            counters = (int(tokens[k + 1]), int(tokens[k + 2]))
            del tokens[k:k + 3]
        if len(tokens) < 2 or tokens[0] not in ("-A", "-I"):
            raise RulesError("unsupported rule line (only -A/-I): %r" % raw)
        chain = tokens[1]
        spec = tokens[2:]
        if tokens[0] == "-I" and spec and spec[0].isdigit():
            spec = spec[1:]
        current["rules"].append((chain, " ".join(shlex.quote(t) for t in spec), counters))
    return tables


def desired_from_rules(text):
    """Split rendered iptables-restore text into owned chains and jumps from built-in chains.

    Returns {table: {"chains": {name: [canonical specs]}, "jumps": [(builtin, canonical spec)]}}.
    """
    parsed = parse_save(text)
    desired = {}
    for table, data in parsed.items():
        builtins = BUILTIN_CHAINS.get(table)
        if builtins is None:
            raise RulesError("unknown table %r" % table)
        owned = [c for c in data["order"] if c not in builtins]
        entry = {"chains": {c: [] for c in owned}, "jumps": []}
        for chain, spec, _counters in data["rules"]:
            if chain in builtins:
                target = _target(spec)
                if target not in owned:
                    raise RulesError(
                        "rule in built-in chain %s of table %s must jump to an owned chain, got %r"
                        % (chain, table, spec))
                entry["jumps"].append((chain, canonical(spec)))
            elif chain in entry["chains"]:
                entry["chains"][chain].append(canonical(spec))
            else:
                raise RulesError("rule for undeclared chain %r in table %s" % (chain, table))
        desired[table] = entry
    return desired


def _target(spec):
    tokens = shlex.split(spec)
    for i, t in enumerate(tokens):
        if t in ("-j", "-g") and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


def current_state(save_text, desired):
    """What is on the host for the chains and jumps named in desired (from iptables-save text)."""
    parsed = parse_save(save_text)
    state = {}
    for table, want in desired.items():
        data = parsed.get(table, {"chains": {}, "order": [], "rules": []})
        chains = {}
        for name in want["chains"]:
            if name in data["chains"]:
                chains[name] = [canonical(s) for c, s, _n in data["rules"] if c == name]
        jumps = []
        behind = []
        ahead = []
        owned = set(want["chains"])
        foreign_before = set()
        for chain, spec, _n in data["rules"]:
            if chain not in BUILTIN_CHAINS[table]:
                continue
            if _target(spec) in owned:
                jumps.append((chain, canonical(spec)))
                if chain in foreign_before:
                    behind.append((chain, canonical(spec)))
            else:
                foreign_before.add(chain)
                ahead.extend(j for j in jumps if j[0] == chain and j not in ahead)
        # behind: jumps that another rule of the same built-in chain comes before (a firewall reload or a
        # container engine restart that inserted its rules at the top); ahead: jumps that another rule
        # comes after (a container engine that appended its DNAT jump after ours in nat PREROUTING)
        state[table] = {"chains": chains, "jumps": jumps, "behind": behind, "ahead": ahead}
    return state


def render_state(state):
    """Stable text of a state (owned chains + jumps), used for diffs."""
    lines = []
    for table in sorted(state):
        lines.append("*%s" % table)
        for chain, spec in state[table]["jumps"]:
            lines.append("-A %s %s" % (chain, spec))
        for name in state[table]["chains"]:
            lines.append(":%s" % name)
            for spec in state[table]["chains"][name]:
                lines.append("-A %s %s" % (name, spec))
    return "\n".join(lines) + ("\n" if lines else "")


# nat PREROUTING holds address translation, not filtering: a DNAT rule of a container engine or of
# kube-proxy (a published port) must see a connection before our REDIRECT does, because the first NAT
# target a connection meets decides its translation. So jumps there always go after the host's rules.
ALWAYS_APPENDED = frozenset([("nat", "PREROUTING")])


def plan(desired, current, state="present", jump_position="first"):
    """Compute the changes and an iptables-restore --noflush payload.

    Returns (changes, payload): changes is a list of human-readable strings, payload is '' when
    nothing has to change. Only owned chains are declared (which flushes them under --noflush)
    and only the jumps to owned chains are inserted or deleted; nothing else is touched.
    """
    changes = []
    out = []
    for table in sorted(desired):
        want = desired[table]
        have = current.get(table, {"chains": {}, "jumps": []})
        body = []
        rules = []
        if state == "present":
            for name, specs in want["chains"].items():
                if name not in have["chains"]:
                    changes.append("%s: create chain %s" % (table, name))
                elif have["chains"][name] != specs:
                    changes.append("%s: rewrite chain %s" % (table, name))
                else:
                    continue
                body.append(":%s - [0:0]" % name)
                rules.extend("-A %s %s" % (name, s) for s in specs)
            body.extend(rules)
            wanted_jumps = list(want["jumps"])
            seen = {}
            for jump in have["jumps"]:
                seen[jump] = seen.get(jump, 0) + 1
            for jump, count in seen.items():
                extra = count - (1 if jump in wanted_jumps else 0)
                for _extra in range(extra):
                    changes.append("%s: delete jump -A %s %s" % (table, jump[0], jump[1]))
                    body.append("-D %s %s" % jump)
            for jump in wanted_jumps:
                first = jump_position == "first" and (table, jump[0]) not in ALWAYS_APPENDED
                if jump not in seen:
                    changes.append("%s: add jump -A %s %s" % (table, jump[0], jump[1]))
                    body.append(("-I %s 1 %s" if first else "-A %s %s") % jump)
                elif first and jump in have.get("behind", ()):
                    # jump_position=first: another rule was put before ours; move ours back to the top
                    changes.append("%s: move jump -A %s %s to the top of %s" % (table, jump[0], jump[1], jump[0]))
                    body.append("-D %s %s" % jump)
                    body.append("-I %s 1 %s" % jump)
                elif (table, jump[0]) in ALWAYS_APPENDED and jump[0] in {j[0] for j in have.get("ahead", ())}:
                    # another rule (a DNAT jump) was appended after ours: ours go back to the end, in order
                    changes.append("%s: move jump -A %s %s to the end of %s" % (table, jump[0], jump[1], jump[0]))
                    body.append("-D %s %s" % jump)
                    body.append("-A %s %s" % jump)
        else:
            for jump in have["jumps"]:
                changes.append("%s: delete jump -A %s %s" % (table, jump[0], jump[1]))
                body.append("-D %s %s" % jump)
            present = [n for n in want["chains"] if n in have["chains"]]
            for name in present:
                body.append("-F %s" % name)
            for name in present:
                changes.append("%s: delete chain %s" % (table, name))
                body.append("-X %s" % name)
        if body:
            out.append("*%s" % table)
            out.extend(body)
            out.append("COMMIT")
    payload = "\n".join(out) + "\n" if out else ""
    return changes, payload


def after_state(desired, current, state="present"):
    """The state that plan() leads to (for the diff's 'after')."""
    if state != "present":
        return {t: {"chains": {}, "jumps": []} for t in desired}
    result = {}
    for table, want in desired.items():
        result[table] = {"chains": dict(want["chains"]), "jumps": list(want["jumps"])}
    return result


def owned_chains(save_text, prefix):
    """Owned chains (name starts with prefix) with rules and counters, plus jumps into them."""
    parsed = parse_save(save_text)
    facts = {}
    for table, data in parsed.items():
        names = [c for c in data["order"] if c.startswith(prefix)]
        if not names:
            continue
        chains = {}
        for name in names:
            chains[name] = [
                {"rule": canonical(s), "packets": n[0] if n else None, "bytes": n[1] if n else None}
                for c, s, n in data["rules"] if c == name]
        jumps = [
            {"chain": c, "rule": canonical(s), "packets": n[0] if n else None, "bytes": n[1] if n else None}
            for c, s, n in data["rules"]
            if c in BUILTIN_CHAINS.get(table, ()) and (_target(s) or "").startswith(prefix)]
        facts[table] = {"chains": chains, "jumps": jumps}
    return facts


def count_rules(save_text):
    """Number of rule lines in iptables-save output (used for backend detection)."""
    return sum(1 for line in save_text.splitlines() if line.startswith("-A ") or "] -A " in line)
