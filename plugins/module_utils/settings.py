# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one definition of the collection's public settings, their defaults and their validation.

`SETTINGS` lists every setting that more than one part of the collection reads (both roles, the
playbooks, the golden files, the tests): name, type, default, choices and the text that the roles'
argument_specs show (`tests/unit/settings/sync_specs.py` writes those entries from here and a test keeps
them in step). Nothing else defines a default for them.

`validate(raw)` turns what the user wrote (inventory, group_vars, `-e`) into typed, canonical values
or a list of errors that each name the variable and the value. `resolve(settings, host)` adds what
depends on the host (address families, iptables backend, the management ports to keep out of capture).
Both are pure functions: the `sidecar.intercept.settings` action plugin runs them on the controller,
the unit tests call them directly.
"""

from __future__ import annotations

import ipaddress
import json
import re

UNSET = object()

MAX_ID = 4294967294          # uid_t/gid_t: (uint32)-1 is "no id"
MAX_U32 = 0xFFFFFFFF
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
IPV6_CHOICES = ("auto", True, False)
BACKENDS = ("auto", "legacy", "nft", "plain", "nftables")


class Setting:
    """One public setting: name, argument_specs type, default, choices and description."""

    def __init__(self, name, kind, default, description, choices=None, elements=None, roles=("capture", "proxy")):
        self.name = name
        self.kind = kind
        self.default = default
        self.description = description
        self.choices = choices
        self.elements = elements
        self.roles = roles

    def spec(self):
        """The argument_specs entry of this setting."""
        text = [self.description] if isinstance(self.description, str) else list(self.description)
        out = {"description": text, "type": self.kind}
        if self.elements:
            out["elements"] = self.elements
        if self.choices:
            out["choices"] = list(self.choices)
        out["default"] = self.default
        return out


CAPTURE = ("capture",)
BOTH = ("capture", "proxy")

SETTINGS = [
    Setting("sidecar_state", "str", "present",
            "C(present) installs; C(absent) removes everything the collection added and nothing else.",
            choices=("present", "absent")),
    Setting("sidecar_mode", "str", "redirect",
            ["How inbound traffic reaches the proxy: nat C(redirect), or mangle C(tproxy) (its listener then "
             "has IP_TRANSPARENT, set by systemd on the socket unit; the proxy needs no capability in either "
             "mode). Outbound is always nat REDIRECT."],
            choices=("redirect", "tproxy")),
    Setting("sidecar_inbound_ports", "raw", "*",
            ["Inbound destination ports to capture, or C(*) for every TCP port.",
             "A list, or a string of ports separated by commas (C(8080,9090)), as C(-e) gives it."],
            roles=CAPTURE),
    Setting("sidecar_inbound_exclude_ports", "raw", [22],
            ["Inbound destination ports never captured. The port Ansible connects to and the ports sshd "
             "listens on are never captured either, whether listed here or not.",
             "A list, or a string of ports separated by commas (C(22,2222))."],
            roles=CAPTURE),
    Setting("sidecar_outbound_include_cidrs", "raw", ["*"],
            ["Outbound destinations (IPv4/IPv6 networks or addresses) to capture; C(*) means all.",
             "A list, or a string separated by commas."],
            roles=CAPTURE),
    Setting("sidecar_outbound_exclude_cidrs", "raw", [],
            ["Outbound destinations never captured (checked before the includes).",
             "A list, or a string separated by commas."],
            roles=CAPTURE),
    Setting("sidecar_inbound_exclude_cidrs", "raw", [],
            ["Sources (IPv4/IPv6 networks or addresses) whose inbound connections are never captured "
             "(Kuma's C(--exclude-inbound-ips)).",
             "A list, or a string separated by commas."],
            roles=CAPTURE),
    Setting("sidecar_outbound_include_ports", "raw", "*",
            ["Capture outbound connections only to these destination ports (Istio's C(-q)), or C(*) for "
             "every port. Combines with the include/exclude CIDRs: a connection is captured when both match.",
             "A list, or a string of ports separated by commas."],
            roles=CAPTURE),
    Setting("sidecar_outbound_exclude_ports", "raw", [],
            ["Outbound destination ports never captured.",
             "A list, or a string of ports separated by commas."],
            roles=CAPTURE),
    Setting("sidecar_proxy_uid", "int", 1337,
            ["Fixed UID of the proxy (1-4294967294). Its traffic is never captured (owner match), so it "
             "must be the same on every host; the proxy role fails if another account has it."]),
    Setting("sidecar_proxy_gid", "int", 1337,
            "Fixed GID of the proxy (1-4294967294); its traffic is never captured (owner match)."),
    Setting("sidecar_inbound_port", "int", 15006,
            "Port of the proxy's inbound listener (REDIRECT or TPROXY target), 1-65535."),
    Setting("sidecar_outbound_port", "int", 15001,
            "Port of the proxy's outbound listener (REDIRECT target), 1-65535."),
    Setting("sidecar_admin_port", "int", 15000,
            "Port of the proxy's admin endpoint (C(/ready), C(/metrics), C(/stats)) on 127.0.0.1.",
            roles=("proxy",)),
    Setting("sidecar_proxy_metrics_address", "str", "",
            ["An address of the host (C(0.0.0.0) for every IPv4 address, C(::) for every IPv6 one) where the "
             "proxy also serves its metrics read-only (C(GET /metrics) only, Prometheus text) for a scraper on "
             "another host; the admin endpoint stays on 127.0.0.1. Empty (default): no such listener.",
             "Its port O(sidecar_proxy_metrics_port) is then never captured inbound, so scrapes reach the "
             "listener directly."]),
    Setting("sidecar_proxy_metrics_port", "int", 15090,
            "Port of the metrics listener (used only with O(sidecar_proxy_metrics_address)), 1-65535."),
    Setting("sidecar_tproxy_mark", "raw", 1337,
            ["Firewall mark of TPROXY-captured packets (the policy routing selector), 1-4294967295, "
             "decimal or C(0x) hexadecimal."],
            roles=CAPTURE),
    Setting("sidecar_tproxy_mask", "raw", 0xFFF,
            ["The mark bits the collection owns (packet mark and connection mark), decimal or C(0x) "
             "hexadecimal. The rules set and match only these bits, so the bits other software uses survive "
             "(kube-proxy 0x4000, Tailscale 0xff0000, WireGuard). The default 0xfff is the mask Istio ambient "
             "uses with the same mark (0x539/0xfff); O(sidecar_tproxy_mark) must lie inside it, and no other "
             "C(ip rule fwmark) of the host may match it (checked before the host changes)."],
            roles=CAPTURE),
    Setting("sidecar_tproxy_table", "int", 133,
            "Routing table with the local default route for TPROXY-marked packets (not 0, 253, 254, 255).",
            roles=CAPTURE),
    Setting("sidecar_ipv6", "raw", "auto",
            ["Capture and listen on IPv6 too: C(auto) (when the host has a global IPv6 address), C(true) "
             "or C(false) (C(yes)/C(no) work too)."]),
    Setting("sidecar_capture_bridge_interfaces", "list", [],
            ["Interfaces (container bridges, e.g. C(docker0), C(cni-podman0), C(br-+) as a wildcard) whose "
             "routed TCP traffic is captured as outbound, like the host's own connections (Istio "
             "C(--kube-virt-interfaces), Kuma C(--vnet)). Each entry is C(IFACE) or C(IFACE:CIDR); traffic from "
             "IFACE to CIDR (the bridge's own network) is not captured. The outbound include/exclude settings apply.",
             "Empty (default) - forwarded traffic of bridges and routing is never captured."],
            roles=CAPTURE, elements="str"),
    Setting("sidecar_capture_firewall_check", "raw", True,
            ["In C(redirect) mode, refuse a host whose firewall filters inbound traffic (ufw, firewalld, an "
             "iptables INPUT or nftables input chain with policy drop), naming it: REDIRECT rewrites the "
             "destination port to O(sidecar_inbound_port) before the firewall sees it, so a default-deny "
             "firewall drops every captured connection, and firewalld (which accepts every redirected "
             "connection) would let ports closed in its zone through the proxy. C(tproxy) mode keeps the "
             "port, so the firewall decides as before: use it on such hosts.",
             "C(false) skips the check (you opened the proxy's inbound port and accept that every captured "
             "port is then reachable). C(true)/C(false), C(yes)/C(no) work too."],
            roles=CAPTURE),
    Setting("sidecar_capture_backend", "str", "auto",
            ["How the rules reach the kernel. C(legacy), C(nft) (iptables over nf_tables) and C(plain) (the "
             "C(iptables) binaries as installed) load iptables-restore text into owned chains; C(nftables) "
             "loads one native table C(inet sidecar_intercept) with C(nft -f) and needs no iptables binary.",
             "C(auto) picks C(legacy) when iptables-legacy already holds rules, else C(nft); C(plain) when "
             "only the plain iptables binaries exist; C(nftables) on a host with C(nft) and no iptables."],
            choices=BACKENDS, roles=CAPTURE),
]

BY_NAME = {s.name: s for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS}

_DECIMAL = re.compile(r"^[1-9][0-9]*$")
_HEX = re.compile(r"^0[xX][0-9a-fA-F]+$")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class Problems:
    """Collects error messages; each names the variable and the value."""

    def __init__(self):
        self.errors = []
        self.warnings = []

    def add(self, name, value, why):
        self.errors.append("%s=%s: %s" % (name, _show(value), why))


def _show(value):
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _integer(name, value, low, high, problems, what="an integer", allow_hex=False, whole=UNSET):
    """An int from an int or a decimal string (leading zeros refused: iptables would read octal).

    whole: the whole value the user wrote when value is one element of it (the error shows it).
    """
    problems = _Named(problems, value if whole is UNSET else whole)
    if isinstance(value, bool):
        problems.add(name, value, "%s is not %s" % (_show(value), what))
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if allow_hex and _HEX.match(text):
            number = int(text, 16)
        elif _DECIMAL.match(text):
            number = int(text)
        elif text == "0":
            number = 0
        elif re.match(r"^0[0-9]+$", text):
            problems.add(name, value, "leading zeros are ambiguous (octal for iptables); write %s" % int(text, 10))
            return None
        else:
            problems.add(name, value, "%s is not %s" % (_show(value), what))
            return None
    else:
        problems.add(name, value, "%s is not %s" % (_show(value), what))
        return None
    if not low <= number <= high:
        problems.add(name, value, "%d is out of range (%d-%d)" % (number, low, high))
        return None
    return number


class _Named:
    """Problems.add that always shows one given value (the whole list, not the bad element)."""

    def __init__(self, problems, shown):
        self.problems = problems
        self.shown = shown

    def add(self, name, _value, why):
        self.problems.add(name, self.shown, why)


def _port(name, value, problems, whole=UNSET):
    return _integer(name, value, 1, 65535, problems, what="a port (an integer 1-65535)", whole=whole)


def _items(name, value, problems):
    """A list from a list, a single value, or a string separated by commas/whitespace ('22,2222')."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                problems.add(name, value, "looks like a list but is not valid JSON")
                return []
            if isinstance(parsed, list):
                return parsed
        return [t for t in re.split(r"[\s,]+", text) if t]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    problems.add(name, value, "expected a list or a string separated by commas")
    return []


def _unique_list(name, value, problems, parse, star=None):
    """Unique parsed items of a list setting, or '*' alone when star (the words for "every ...", "other
    ...") is given; parse(item) returns the item or None after adding a problem."""
    items = _items(name, value, problems)
    if star and any(i == "*" for i in items):
        if len(items) > 1:
            problems.add(name, value, "'*' (every %s) cannot be combined with %s" % star)
            return None
        return "*"
    out = []
    for item in items:
        parsed = parse(item)
        if parsed is not None and parsed not in out:
            out.append(parsed)
    return out


def _port_list(name, value, problems, star=False):
    """Sorted unique ports; with star=True, '*' (alone) means all and returns '*'."""
    ports = _unique_list(name, value, problems, lambda item: _port(name, item, problems, whole=value),
                         ("port", "other ports") if star else None)
    return ports if ports in (None, "*") else sorted(ports)


def _network(name, item, value, problems):
    if not isinstance(item, str) or not item.strip():
        problems.add(name, value, "%s is not an IPv4/IPv6 address or network" % _show(item))
        return None
    text = item.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            problems.add(name, value, "%s is not an IPv4/IPv6 address or network (%s)" % (text, exc))
            return None
        problems.add(name, value, "%s has host bits set; write the network %s" % (text, loose.compressed))
        return None


def _cidr_list(name, value, problems, star=False):
    """Canonical networks ('10.0.0.0/8', 'fd00::/8': host addresses get /32 or /128), sorted, unique."""
    nets = _unique_list(name, value, problems, lambda item: _network(name, item, value, problems),
                        ("destination", "networks") if star else None)
    return nets if nets in (None, "*") else sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen))


_IFACE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}[+]?$")


def _bridges(name, value, problems):
    """[(iface, network or None)] from 'IFACE' or 'IFACE:CIDR' entries (the CIDR may be IPv6)."""
    out = []
    for entry in _items(name, value, problems):
        iface, sep, net = str(entry).partition(":")
        if not _IFACE.match(iface) or iface in ("lo", "lo+", "+"):
            problems.add(name, value, "%s does not start with an interface name (IFACE or IFACE:CIDR, not lo)"
                         % _show(entry))
            continue
        network = _network(name, net, value, problems) if sep else None
        if sep and network is None:
            continue
        out.append((iface, network))
    return out


def _bool_or_auto(name, value, problems, auto=True):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto" and auto:
            return "auto"
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    problems.add(name, value, "must be auto, true or false" if auto else "must be true or false")
    return None


def _metrics_address(name, value, problems):
    """'' (no metrics listener) or a canonical IP address."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            pass
    problems.add(name, value, "must be empty (no metrics listener) or an IP address of the host")
    return None


def _choice(name, value, problems):
    choices = BY_NAME[name].choices
    if isinstance(value, str) and value.strip() in choices:
        return value.strip()
    problems.add(name, value, "must be one of %s" % ", ".join(choices))
    return None


def validate(raw):
    """Typed, canonical settings from raw variables, or errors.

    raw: {name: value} of the variables the user set (missing names take the default).
    Returns (settings, errors, warnings); settings is None when there are errors.
    """
    p = Problems()
    v = {name: (raw[name] if name in raw and raw[name] is not UNSET else DEFAULTS[name]) for name in BY_NAME}
    out = {
        "state": _choice("sidecar_state", v["sidecar_state"], p),
        "mode": _choice("sidecar_mode", v["sidecar_mode"], p),
        "capture_backend": _choice("sidecar_capture_backend", v["sidecar_capture_backend"], p),
        "inbound_ports": _port_list("sidecar_inbound_ports", v["sidecar_inbound_ports"], p, star=True),
        "inbound_exclude_ports": _port_list("sidecar_inbound_exclude_ports", v["sidecar_inbound_exclude_ports"], p),
        "outbound_exclude_ports": _port_list("sidecar_outbound_exclude_ports", v["sidecar_outbound_exclude_ports"], p),
        "outbound_include_ports": _port_list("sidecar_outbound_include_ports", v["sidecar_outbound_include_ports"], p,
                                             star=True),
        "proxy_uid": _integer("sidecar_proxy_uid", v["sidecar_proxy_uid"], 1, MAX_ID, p, what="a non-root UID"),
        "proxy_gid": _integer("sidecar_proxy_gid", v["sidecar_proxy_gid"], 1, MAX_ID, p, what="a non-root GID"),
        "inbound_port": _port("sidecar_inbound_port", v["sidecar_inbound_port"], p),
        "outbound_port": _port("sidecar_outbound_port", v["sidecar_outbound_port"], p),
        "admin_port": _port("sidecar_admin_port", v["sidecar_admin_port"], p),
        "metrics_address": _metrics_address("sidecar_proxy_metrics_address", v["sidecar_proxy_metrics_address"], p),
        "metrics_port": _port("sidecar_proxy_metrics_port", v["sidecar_proxy_metrics_port"], p),
        "tproxy_mark": _integer("sidecar_tproxy_mark", v["sidecar_tproxy_mark"], 1, MAX_U32, p,
                                what="a firewall mark (1-4294967295, decimal or 0x hex)", allow_hex=True),
        "tproxy_table": _integer("sidecar_tproxy_table", v["sidecar_tproxy_table"], 1, MAX_U32 - 1, p,
                                 what="a routing table number"),
        "tproxy_mask": _integer("sidecar_tproxy_mask", v["sidecar_tproxy_mask"], 1, MAX_U32, p,
                                what="a mark mask (0x1-0xffffffff, decimal or 0x hex)", allow_hex=True),
        "ipv6": _bool_or_auto("sidecar_ipv6", v["sidecar_ipv6"], p),
        "capture_firewall_check": _bool_or_auto("sidecar_capture_firewall_check", v["sidecar_capture_firewall_check"],
                                                p, auto=False),
    }
    includes = _cidr_list("sidecar_outbound_include_cidrs", v["sidecar_outbound_include_cidrs"], p, star=True)
    excludes = _cidr_list("sidecar_outbound_exclude_cidrs", v["sidecar_outbound_exclude_cidrs"], p)
    inbound_excludes = _cidr_list("sidecar_inbound_exclude_cidrs", v["sidecar_inbound_exclude_cidrs"], p)
    bridges = _bridges("sidecar_capture_bridge_interfaces", v["sidecar_capture_bridge_interfaces"], p)
    mark, mask = out["tproxy_mark"], out["tproxy_mask"]
    if mark is not None and mask is not None and mark & ~mask:
        p.add("sidecar_tproxy_mark", v["sidecar_tproxy_mark"],
              "0x%x has bits outside sidecar_tproxy_mask 0x%x" % (mark, mask))

    table = out["tproxy_table"]
    if table in RESERVED_TABLES:
        p.add("sidecar_tproxy_table", v["sidecar_tproxy_table"],
              "table %d is the kernel's '%s' table" % (table, RESERVED_TABLES[table]))
    listeners = [("sidecar_inbound_port", out["inbound_port"]), ("sidecar_outbound_port", out["outbound_port"]),
                 ("sidecar_admin_port", out["admin_port"])]
    if out["metrics_address"]:
        listeners.append(("sidecar_proxy_metrics_port", out["metrics_port"]))
    for i, (a, pa) in enumerate(listeners):
        for b, pb in listeners[i + 1:]:
            if pa is not None and pa == pb:
                p.add(b, v[b], "the same port as %s (the proxy listens on each)" % a)
    if isinstance(out["inbound_ports"], list) and out["inbound_exclude_ports"]:
        both = sorted(set(out["inbound_ports"]) & set(out["inbound_exclude_ports"]))
        if both:
            p.add("sidecar_inbound_ports", v["sidecar_inbound_ports"],
                  "port(s) %s are also in sidecar_inbound_exclude_ports" % ", ".join(map(str, both)))
    if out["metrics_address"] and isinstance(out["inbound_ports"], list) and out["metrics_port"] in out["inbound_ports"]:
        p.add("sidecar_inbound_ports", v["sidecar_inbound_ports"],
              "port %d is the proxy's metrics listener (sidecar_proxy_metrics_port), which is never captured"
              % out["metrics_port"])
    if isinstance(out["outbound_include_ports"], list):
        if not out["outbound_include_ports"]:
            p.add("sidecar_outbound_include_ports", v["sidecar_outbound_include_ports"],
                  "an empty list would capture no outbound connection; use '*' for every port")
        both = sorted(set(out["outbound_include_ports"]) & set(out["outbound_exclude_ports"] or []))
        if both:
            p.add("sidecar_outbound_include_ports", v["sidecar_outbound_include_ports"],
                  "port(s) %s are also in sidecar_outbound_exclude_ports" % ", ".join(map(str, both)))
    if isinstance(includes, list) and excludes:
        for inc in includes:
            for exc in excludes:
                if inc.version == exc.version and inc.subnet_of(exc):
                    p.add("sidecar_outbound_include_cidrs", v["sidecar_outbound_include_cidrs"],
                          "%s is inside %s of sidecar_outbound_exclude_cidrs, so it would never be captured"
                          % (inc.compressed, exc.compressed))
    if isinstance(includes, list):
        for inc in includes:
            if inc.is_loopback or (inc.version == 6 and inc.subnet_of(ipaddress.ip_network("::1/128"))):
                p.add("sidecar_outbound_include_cidrs", v["sidecar_outbound_include_cidrs"],
                      "%s is loopback: connections to it never leave the host and are not captured "
                      "(loopback traffic always stays direct)" % inc.compressed)
    v6_nets = [n.compressed for n in (includes if isinstance(includes, list) else []) + (excludes or [])
               + (inbound_excludes or []) + [n for _iface, n in bridges if n] if n.version == 6]
    if out["ipv6"] is False and v6_nets:
        p.add("sidecar_ipv6", v["sidecar_ipv6"], "IPv6 networks %s are set but IPv6 capture is off" % ", ".join(v6_nets))
    if p.errors:
        return None, p.errors, p.warnings

    def split(nets):
        return {fam: [n.compressed for n in nets if n.version == ver] for fam, ver in (("ipv4", 4), ("ipv6", 6))}

    out["outbound_include_cidrs"] = "*" if includes == "*" else split(includes)
    out["outbound_exclude_cidrs"] = split(excludes)
    out["inbound_exclude_cidrs"] = split(inbound_excludes)
    out["tproxy_mark_hex"] = "0x%x" % out["tproxy_mark"]
    out["tproxy_mask_hex"] = "0x%x" % out["tproxy_mask"]
    out["tproxy_fwmark"] = "%s/%s" % (out["tproxy_mark_hex"], out["tproxy_mask_hex"])  # as ip rule takes it
    out["bridges"] = {}
    for iface, net in bridges:
        nets = out["bridges"].setdefault(iface, {"ipv4": [], "ipv6": []})
        if net is not None and net.compressed not in nets["ipv%d" % net.version]:
            nets["ipv%d" % net.version].append(net.compressed)
    return out, [], p.warnings


def resolve(settings, host=None, management_ports=()):
    """Add what depends on the host to validated settings.

    host: the host facts that `capture_facts` reports ({'backend', 'ipv6': {'global', 'enabled'},
    'ssh_ports': [...]}) or None (rendering without a host: golden files, benchmarks; IPv6 then
    follows the setting, 'auto' meaning both families).
    management_ports: the port(s) Ansible itself connects to.
    Returns (resolved, errors).
    """
    errors = []
    out = dict(settings)
    host = host or {}
    v6 = host.get("ipv6") or {}
    if settings["ipv6"] == "auto":
        want_v6 = bool(v6.get("global") and v6.get("enabled", True)) if host else True
    else:
        want_v6 = settings["ipv6"]
    if want_v6 and host and not v6.get("enabled", False) and settings["state"] == "present":
        errors.append("sidecar_ipv6=%s: IPv6 is not available on this host (disabled or missing: "
                      "net.ipv6.conf.all.disable_ipv6); set sidecar_ipv6 to auto or false" % _show(settings["ipv6"]))
    out["families"] = ["ipv4", "ipv6"] if want_v6 else ["ipv4"]
    out["backend"] = host.get("backend") or (settings["capture_backend"] if settings["capture_backend"] != "auto" else "nft")

    if settings["mode"] == "tproxy" and settings["state"] == "present":
        ours = (settings["tproxy_mark"], settings["tproxy_mask"])
        for rule in host.get("fwmarks") or []:
            theirs = None if rule.get("not") else _fwmark(rule)  # "not fwmark" matches other marks
            if theirs and str(rule.get("table")) != str(settings["tproxy_table"]) and _overlap(ours, theirs):
                errors.append("sidecar_tproxy_mark/sidecar_tproxy_mask=%s collides with the host's policy routing: "
                              "ip %s rule \"%s: fwmark %s%s lookup %s\" (another program's mark bits; choose a mark "
                              "and mask outside them)" % (settings["tproxy_fwmark"] if "tproxy_fwmark" in settings else "",
                                                          "-6" if rule.get("family") == "ipv6" else "-4",
                                                          rule.get("priority"), rule.get("fwmark"),
                                                          "/" + rule["mask"] if rule.get("mask") else "", rule.get("table")))

    firewalls = host.get("firewall") or []
    if (settings["mode"] == "redirect" and settings["state"] == "present" and settings["capture_firewall_check"]
            and firewalls):
        errors.append("sidecar_mode=redirect: this host's firewall filters inbound traffic (%s). REDIRECT rewrites "
                      "the destination port to the proxy's %d before the firewall sees it: a default-deny firewall "
                      "drops every captured connection, and firewalld, which accepts redirected connections, would "
                      "open the ports its zone keeps closed through the proxy. Use sidecar_mode=tproxy (the firewall "
                      "then decides on the app's port), or set sidecar_capture_firewall_check=false if you opened "
                      "port %d yourself" % ("; ".join(firewalls), settings["inbound_port"], settings["inbound_port"]))

    mgmt = []
    for port in list(management_ports) + list(host.get("ssh_ports") or []):
        try:
            port = int(port)
        except (TypeError, ValueError):
            continue
        if 1 <= port <= 65535 and port not in mgmt:
            mgmt.append(port)
    out["management_ports"] = sorted(mgmt)
    if isinstance(settings["inbound_ports"], list):
        cut = sorted(set(settings["inbound_ports"]) & set(mgmt))
        if cut:
            errors.append("sidecar_inbound_ports=%s: port(s) %s carry the management connection (Ansible's "
                          "port or sshd); capturing them could cut this very connection"
                          % (_show(settings["inbound_ports"]), ", ".join(map(str, cut))))
    # the proxy's metrics listener on a host address: scrapes from other hosts reach it directly
    metrics = [settings["metrics_port"]] if settings.get("metrics_address") else []
    out["inbound_exclude_ports"] = sorted(set(settings["inbound_exclude_ports"]) | set(mgmt) | set(metrics))
    out["user_inbound_exclude_ports"] = settings["inbound_exclude_ports"]
    return out, errors


def _fwmark(rule):
    """(mark, mask) of an `ip rule` fwmark selector as capture_facts reports it, or None."""
    try:
        mark = int(str(rule.get("fwmark")), 0)
        mask = int(str(rule.get("mask") or "0xffffffff"), 0)
    except ValueError:
        return None
    return mark, mask


def _overlap(a, b):
    """True when some packet mark matches both (mark, mask) selectors: the masks share bits and the marks
    agree on them. Disjoint masks (kube-proxy 0x4000, Tailscale 0xff0000 beside 0x539/0xfff) never collide."""
    common = a[1] & b[1]
    return bool(common) and (a[0] ^ b[0]) & common == 0


def account_warnings(settings, host, account=("sidecar-proxy", "sidecar-proxy")):
    """Warnings when the proxy's UID or GID belongs to another account of the host (e.g. nobody, 65534).

    The capture's owner match lets every process of that UID/GID bypass the proxy. host: capture_facts'
    host facts ('accounts': {'uid': name, 'gid': name}); account: the proxy's own user and group names.
    """
    out = []
    owners = (host or {}).get("accounts") or {}
    if settings.get("state") != "present":
        return out
    for key, kind, what, own in (("uid", "UID", "user", account[0]), ("gid", "GID", "group", account[1])):
        name = owners.get(key)
        if name and name != own:
            out.append("sidecar_proxy_%s=%d belongs to %s '%s' on this host, not to the proxy's own %s '%s': every "
                       "process with that %s bypasses the capture (the rules exclude the proxy by owner); give the "
                       "proxy a %s of its own" % (key, settings["proxy_" + key], what, name, what, own, kind, kind))
    return out


def effective(raw, host=None, management_ports=(), account=("sidecar-proxy", "sidecar-proxy")):
    """validate() then resolve(): (resolved or None, errors, warnings)."""
    settings, errors, warnings = validate(raw)
    if errors:
        return None, errors, warnings
    resolved, errors = resolve(settings, host, management_ports)
    warnings = list(warnings) + account_warnings(settings, host, account)
    return (None if errors else resolved), errors, warnings
