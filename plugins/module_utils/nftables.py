# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Canonical comparison of one nftables table with `nft list table` output, and its nft -f payloads.

Pure functions (no commands run): unit tests drive them with recorded output.
"""

from __future__ import annotations

import re

_COUNTER = re.compile(r"\bcounter packets \d+ bytes \d+")
# "table F N" + "delete table F N" before the definition make a file that `nft -f` can load at any time
# (it replaces the table in one transaction); they are not part of the table itself.
_PREAMBLE = re.compile(r"^(delete )?table \S+ \S+$")
# nft prints a base chain's priority by name where it knows one for the hook (which differs between
# versions: 1.0.6 prints nat output -100 as "-100", 1.1 as "dstnat"); compare them as numbers.
_PRIORITY = re.compile(r"\bpriority ([a-z]+|-?\d+)(?: ([+-]) (\d+))?;")
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}


def _priority(match):
    base, sign, offset = match.groups()
    value = _PRIORITIES[base] if base in _PRIORITIES else int(base)
    if sign:
        value += int(offset) if sign == "+" else -int(offset)
    return "priority %d;" % value


_HANDLE = re.compile(r"\s+# handle \d+$")


class NftError(ValueError):
    """Raised on rules text that is not one table definition."""


def canonical(text):
    """The lines of a table listing or definition in a form that compares exactly.

    Comments, blank lines, indentation, counter values and handles are dropped; a set's elements
    (printed over several lines when long) become one sorted line.
    """
    lines = []
    pending = None
    for raw in text.splitlines():
        line = _HANDLE.sub("", raw.split("#", 1)[0] if raw.lstrip().startswith("#") else raw).strip()
        if not line:
            continue
        line = _PRIORITY.sub(_priority, _COUNTER.sub("counter", line))
        if _PREAMBLE.match(line):
            continue
        if pending is not None:
            pending += " " + line
            if "}" in line:
                lines.append(_sorted_elements(pending))
                pending = None
            continue
        if line.startswith("elements = {") and "}" not in line:
            pending = line
            continue
        if line.startswith("elements = {"):
            line = _sorted_elements(line)
        lines.append(line)
    if pending is not None:
        raise NftError("unterminated set elements: %r" % pending)
    return lines


def _sorted_elements(line):
    inner = line[line.index("{") + 1:line.rindex("}")]
    items = [i.strip() for i in inner.split(",") if i.strip()]
    return "elements = { %s }" % ", ".join(sorted(items))


def table_header(lines):
    """(family, name) of the table a canonical definition declares."""
    if not lines or not re.match(r"^table \S+ \S+ \{$", lines[0]) or lines[-1] != "}":
        raise NftError("the rules must be exactly one 'table FAMILY NAME { ... }' definition")
    _kw, family, name, _brace = lines[0].split()
    return family, name


def payload(family, name, rules_text):
    """An nft -f transaction that replaces the table atomically (creates it first so delete cannot fail)."""
    body = [line for line in rules_text.splitlines() if not _PREAMBLE.match(line.strip())]
    return "table %s %s\ndelete table %s %s\n%s\n" % (family, name, family, name, "\n".join(body).strip("\n"))


def render(lines):
    """Readable text of canonical lines (for diffs)."""
    out, depth = [], 0
    for line in lines:
        if line.startswith("}"):
            depth -= 1
        out.append("\t" * depth + line)
        if line.endswith("{"):
            depth += 1
    return "\n".join(out) + ("\n" if out else "")


def chain_diff(desired, current):
    """Human-readable list of differences, chain by chain (or set by set)."""
    def blocks(lines):
        found, name = {}, None
        for line in lines[1:-1]:
            m = re.match(r"^(chain|set) (\S+) \{$", line)
            if m:
                name = "%s %s" % m.groups()
                found[name] = []
            elif line == "}":
                name = None
            elif name:
                found[name].append(line)
        return found

    want, have = blocks(desired), blocks(current or [])
    changes = []
    for name in want:
        if name not in have:
            changes.append("add %s" % name)
        elif want[name] != have[name]:
            changes.append("rewrite %s" % name)
    changes.extend("delete %s" % name for name in have if name not in want)
    return changes


_COUNTS = re.compile(r"\bcounter packets (\d+) bytes (\d+)")


def _joined(text):
    """Stripped non-empty lines, a set's elements printed over several lines joined into one."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if lines and lines[-1].startswith("elements = {") and "}" not in lines[-1]:
            lines[-1] += " " + line
        else:
            lines.append(line)
    return lines


def table_facts(text):
    """Chains (rules with their counters) and sets of one `nft list table` listing."""
    chains, sets = {}, {}
    kind = name = None
    for line in _joined(text):
        m = re.match(r"^(chain|set) (\S+) \{$", line)
        if m:
            kind, name = m.groups()
            if kind == "chain":
                chains[name] = []
        elif line == "}":
            kind = name = None
        elif kind == "set" and line.startswith("elements = {"):
            sets[name] = _sorted_elements(line)[len("elements = { "):-2].split(", ")
        elif kind == "chain" and not line.startswith("type "):
            c = _COUNTS.search(line)
            chains[name].append({"rule": _COUNTER.sub("counter", line),
                                 "packets": int(c.group(1)) if c else None,
                                 "bytes": int(c.group(2)) if c else None})
    return {"chains": chains, "sets": sets}
