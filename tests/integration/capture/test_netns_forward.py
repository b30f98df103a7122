"""Forwarded traffic, DNAT-published ports, bridge capture and foreign marks on real netfilter (root only).

Topology, one network namespace each (names fwd-<role>-<random>), IPv4 and IPv6:

    client --(net 1)-- vm --(net 2)-- backend
                        |
                      bridge (net 3, MASQUERADE, a Docker-like DNAT of port 18080 to the container's :80)
                        |
                    container

The vm namespace is the captured host: the rules are rendered from roles/capture/templates/rules.j2
(through tests/golden/regen.py, the same rendering as the golden files) and applied with the
iptables_chains module. Stand-in proxy listeners on the vm answer "proxy <original destination>";
servers on the backend and the container answer "direct <port>". Every namespace is deleted in a
finally block (the fixture), every connection has a timeout.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import uuid

import pytest

import test_netns
from test_netns import ROOT, SERVER, ask, run_module, sh

pytestmark = test_netns.pytestmark  # root, iproute2 and iptables

_spec = importlib.util.spec_from_file_location("golden_regen", ROOT / "tests" / "golden" / "regen.py")
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)

ADDR = {
    "ipv4": {"client": "10.232.1.1", "vm1": "10.232.1.2", "vm2": "10.232.2.1", "backend": "10.232.2.2",
             "vm3": "10.232.3.1", "container": "10.232.3.2", "net2": "10.232.2.0/24", "net1": "10.232.1.0/24",
             "net3": "10.232.3.0/24", "plen": "24"},
    "ipv6": {"client": "fd00:232:1::1", "vm1": "fd00:232:1::2", "vm2": "fd00:232:2::1", "backend": "fd00:232:2::2",
             "vm3": "fd00:232:3::1", "container": "fd00:232:3::2", "net2": "fd00:232:2::/64",
             "net1": "fd00:232:1::/64", "net3": "fd00:232:3::/64", "plen": "64"},
}
PUBLISHED = 18080  # the vm's published port, DNAT'ed to the container's :80

ECHO = textwrap.dedent("""
    import socket, sys, threading
    fam = socket.AF_INET6 if sys.argv[1] == "ipv6" else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(sys.argv[2])))
    s.listen(16)
    print("ready", flush=True)
    def serve(c):
        with c:
            while True:
                data = c.recv(100)
                if not data:
                    return
                c.sendall(b"echo " + data)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

# A client that keeps one connection open: prints each answer, sends the next line when told on stdin.
LONG = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    for line in sys.stdin:
        try:
            s.sendall(line.strip().encode())
            print(s.recv(100).decode() or "closed", flush=True)
        except OSError as exc:
            print(type(exc).__name__, flush=True)
""")


class Lab:
    def __init__(self, family, backend="iptables"):
        self.family = family
        self.backend = backend  # how our rules are applied: iptables (iptables-nft) or native nftables
        self.a = ADDR[family]
        self.v6 = family == "ipv6"
        self.names = {}
        self.procs = []
        self.tag = uuid.uuid4().hex[:6]

    def ns(self, role):
        name = "fwd-%s-%s" % (role, self.tag)
        sh("ip", "netns", "add", name)
        self.names[role] = name
        self.run(role, "ip", "link", "set", "lo", "up")
        return name

    def run(self, role, *args, check=True):
        return sh("ip", "netns", "exec", self.names[role], *args, check=check)

    def ip(self, role, *args):
        return self.run(role, "ip", "-6" if self.v6 else "-4", *args)

    def ipt(self, role, *args):
        return self.run(role, ("ip6tables" if self.v6 else "iptables") + "-nft", "-w", "5", *args)

    def link(self, role_a, dev_a, addr_a, role_b, dev_b, addr_b):
        sh("ip", "link", "add", dev_a, "netns", self.names[role_a], "type", "veth", "peer", "name", dev_b,
           "netns", self.names[role_b])
        for role, dev, addr in ((role_a, dev_a, addr_a), (role_b, dev_b, addr_b)):
            if addr:
                self.run(role, "ip", "addr", "add", "%s/%s" % (addr, self.a["plen"]), "dev", dev, "nodad")
            self.run(role, "ip", "link", "set", dev, "up")

    def build(self):
        a, t = self.a, self.tag
        for role in ("client", "vm", "backend", "container"):
            self.ns(role)
        self.link("client", "fc" + t, a["client"], "vm", "fv" + t, a["vm1"])
        self.link("vm", "fw" + t, a["vm2"], "backend", "fb" + t, a["backend"])
        self.bridge = "fbr" + t
        self.run("vm", "ip", "link", "add", self.bridge, "type", "bridge")
        self.run("vm", "ip", "addr", "add", "%s/%s" % (a["vm3"], a["plen"]), "dev", self.bridge, "nodad")
        self.run("vm", "ip", "link", "set", self.bridge, "up")
        self.link("vm", "fp" + t, None, "container", "fk" + t, a["container"])
        self.run("vm", "ip", "link", "set", "fp" + t, "master", self.bridge)
        self.run("vm", "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        self.ip("client", "route", "add", a["net2"], "via", a["vm1"])
        self.ip("client", "route", "add", a["net3"], "via", a["vm1"])
        self.ip("backend", "route", "add", "default", "via", a["vm2"])
        self.ip("container", "route", "add", "default", "via", a["vm3"])
        # what Docker or Podman writes on a host: MASQUERADE for the bridge, a published port
        self.ipt("vm", "-t", "nat", "-A", "POSTROUTING", "-s", a["net3"], "!", "-o", self.bridge, "-j", "MASQUERADE")
        self.ipt("vm", "-t", "nat", "-N", "FWDDOCKER")
        self.ipt("vm", "-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "FWDDOCKER")
        dest = ("[%s]:80" if self.v6 else "%s:80") % a["container"]
        self.ipt("vm", "-t", "nat", "-A", "FWDDOCKER", "!", "-i", self.bridge, "-p", "tcp", "-m", "tcp", "--dport",
                 str(PUBLISHED), "-j", "DNAT", "--to-destination", dest)

    def capture(self, tmp_path, **settings):
        """Render the role's rules for these settings and apply them in the vm (plus the TPROXY routes)."""
        if self.backend == "nftables":
            rules = regen.render(settings, None, "rules.nft.j2")
            result = run_module(self.names["vm"], tmp_path, module="nft_table", rules=rules)
        else:
            rules = regen.render(settings, self.family)
            result = run_module(self.names["vm"], tmp_path, family=self.family, backend="nft", rules=rules)
        assert result["changed"] and not result.get("failed"), result
        if settings.get("sidecar_mode") == "tproxy":
            self.ip("vm", "rule", "add", "fwmark", regen.resolved(settings)["tproxy_fwmark"], "lookup", "133")
            self.ip("vm", "route", "add", "local", "default", "dev", "lo", "table", "133")
        return rules

    def start(self, role, script, *args):
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[role], sys.executable, "-c", script, *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def server(self, role, mode, port, label="proxy"):
        proc = self.start(role, SERVER, mode, str(port), self.family, label)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()

    def echo(self, role, port):
        proc = self.start(role, ECHO, self.family, str(port))
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()

    def ask(self, role, addr, port):
        return ask(self.names[role], self.family, addr, port)

    def cleanup(self):
        for p in self.procs:
            p.kill()
            p.wait(timeout=5)
        for name in self.names.values():
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture(params=[("ipv4", "iptables"), ("ipv6", "iptables"), ("ipv4", "nftables"), ("ipv6", "nftables")],
                ids="-".join)
def lab(request):
    lab = Lab(*request.param)
    try:
        lab.build()
        yield lab
    finally:
        lab.cleanup()


def proxies(lab, mode):
    """Stand-ins for the proxy's listeners on the vm: inbound (redirect or tproxy) and outbound."""
    lab.server("vm", mode, 15006)
    lab.server("vm", "redirect", 15001, "outbound")


def counter(lab, table, chain, spec):
    """Packets counted by the (foreign, counting-only) rule `spec` of table/chain in the vm."""
    out = lab.ipt("vm", "-t", table, "-L", chain, "-n", "-v", "-x").stdout
    rule = lab.ipt("vm", "-t", table, "-S", chain).stdout.splitlines()
    idx = [r.split(" ", 2)[2] for r in rule if r.startswith("-A ")].index(spec)
    return int(out.splitlines()[2 + idx].split()[0])


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_forwarded_connections_are_not_captured(lab, tmp_path, mode):
    """(a) A connection routed through the vm reaches the backend; the vm's own ports are still captured."""
    a = lab.a
    lab.capture(tmp_path, sidecar_mode=mode)
    proxies(lab, mode)
    lab.server("backend", "direct", 8080)
    lab.server("container", "direct", 8081)
    assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]  # the capture is on
    assert lab.ask("client", a["backend"], 8080) == "direct 8080"  # forwarded: untouched
    assert lab.ask("client", a["container"], 8081) == "direct 8081"  # routed into the bridge: untouched
    assert lab.ask("container", a["backend"], 8080) == "direct 8080"  # the container's own: untouched


@pytest.mark.parametrize("mode", [
    "redirect",
    pytest.param("tproxy", marks=pytest.mark.xfail(strict=True, reason=(
        "mangle PREROUTING (where TPROXY works) runs before nat PREROUTING, where the DNAT happens: "
        "the first packet to a published port looks like any packet addressed to the host and is "
        "diverted to the proxy; exclude published ports with sidecar_inbound_exclude_ports or list "
        "sidecar_inbound_ports (see the role README)"))),
])
def test_dnat_published_port_reaches_the_container(lab, tmp_path, mode):
    """(b) The vm's published port (a Docker-like DNAT rule installed before the capture) keeps
    reaching the container."""
    a = lab.a
    lab.capture(tmp_path, sidecar_mode=mode)
    proxies(lab, mode)
    lab.server("container", "direct", 80)
    assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]
    assert lab.ask("client", a["vm1"], PUBLISHED) == "direct 80"


def test_dnat_published_port_excluded_in_tproxy_mode(lab, tmp_path):
    """(b, tproxy) The documented way for tproxy mode: the published port excluded from the capture."""
    a = lab.a
    lab.capture(tmp_path, sidecar_mode="tproxy", sidecar_inbound_exclude_ports=[22, PUBLISHED])
    proxies(lab, "tproxy")
    lab.server("container", "direct", 80)
    assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]
    assert lab.ask("client", a["vm1"], PUBLISHED) == "direct 80"


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_connections_opened_before_the_capture_keep_working(lab, tmp_path, mode):
    """(c) Long-lived connections opened before the capture: forwarded to the backend, to the
    published port (DNAT to the container) and to an app on the vm itself."""
    a = lab.a
    lab.echo("backend", 8080)
    lab.echo("container", 80)
    lab.echo("vm", 9000)
    clients = [lab.start("client", LONG, a["backend"], "8080"),
               lab.start("client", LONG, a["vm1"], str(PUBLISHED)),
               lab.start("client", LONG, a["vm1"], "9000")]

    def round_trip(word):
        answers = []
        for c in clients:
            c.stdin.write(word + "\n")
            c.stdin.flush()
        for c in clients:
            answers.append(c.stdout.readline().strip())
        return answers

    assert round_trip("before") == ["echo before"] * 3
    lab.capture(tmp_path, sidecar_mode=mode)
    proxies(lab, mode)
    assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]
    assert round_trip("after") == ["echo after"] * 3


def mark_observers(lab, port):
    """Counting-only rules in the vm's mangle INPUT (after PREROUTING and routing) for packets to `port`."""
    specs = {
        "all": "-p tcp -m tcp --dport %d" % port,
        "ours": "-p tcp -m tcp --dport %d -m mark --mark 0x539/0xfff" % port,
        "kube": "-p tcp -m tcp --dport %d -m mark --mark 0x4000/0x4000" % port,
        "tailscale": "-p tcp -m tcp --dport %d -m mark --mark 0x80000/0xff0000" % port,
        "later": "-p tcp -m tcp --dport %d -m mark --mark 0x1000000/0x1000000" % port,
    }
    for spec in specs.values():
        lab.ipt("vm", "-t", "mangle", "-A", "INPUT", *spec.split())
    return specs


def test_tproxy_port_list_diverts_only_the_listed_ports(lab, tmp_path):
    """(d) With sidecar_inbound_ports [8080], packets of a connection to the vm's port 9000 are not
    marked (before: the established-connection divert marked and ACCEPTed every TCP packet)."""
    a = lab.a
    lab.capture(tmp_path, sidecar_mode="tproxy", sidecar_inbound_ports=[8080], sidecar_inbound_exclude_ports=[])
    proxies(lab, "tproxy")
    lab.echo("vm", 9000)
    listed, other = mark_observers(lab, 8080), mark_observers(lab, 9000)
    assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]
    client = lab.start("client", LONG, a["vm1"], "9000")
    for word in ("one", "two", "three"):
        client.stdin.write(word + "\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "echo " + word
    assert counter(lab, "mangle", "INPUT", listed["ours"]) == counter(lab, "mangle", "INPUT", listed["all"]) > 0
    assert counter(lab, "mangle", "INPUT", other["all"]) >= 4
    assert counter(lab, "mangle", "INPUT", other["ours"]) == 0


def test_tproxy_keeps_foreign_mark_bits_and_later_mangle_rules(lab, tmp_path):
    """(e) Mark bits of other software set before our rules (kube-proxy 0x4000, Tailscale 0x80000 in
    0xff0000) survive the divert, and a later mangle PREROUTING rule still sees every packet of a
    captured connection except the SYN that TPROXY takes (TPROXY's verdict ends the chain, as in
    Istio; the SYN's mark bits still survive). With the native nftables backend the accept after
    tproxy ends only our own base chain, so the host's later rule sees the SYNs too."""
    a = lab.a
    lab.capture(tmp_path, sidecar_mode="tproxy")
    proxies(lab, "tproxy")
    lab.ipt("vm", "-t", "mangle", "-I", "PREROUTING", "1", "-p", "tcp", "-j", "MARK", "--set-xmark", "0x4000/0x4000")
    lab.ipt("vm", "-t", "mangle", "-I", "PREROUTING", "1", "-p", "tcp", "-j", "MARK", "--set-xmark", "0x80000/0xff0000")
    lab.ipt("vm", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "MARK", "--set-xmark", "0x1000000/0x1000000")
    seen = mark_observers(lab, 8080)
    for _attempt in range(3):
        assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]
    total = counter(lab, "mangle", "INPUT", seen["all"])
    assert total >= 9
    assert counter(lab, "mangle", "INPUT", seen["ours"]) == total
    assert counter(lab, "mangle", "INPUT", seen["kube"]) == total
    assert counter(lab, "mangle", "INPUT", seen["tailscale"]) == total
    syns = 0 if lab.backend == "nftables" else 3
    assert counter(lab, "mangle", "INPUT", seen["later"]) == total - syns  # iptables: all but the 3 SYNs


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_bridge_opt_in_captures_container_outbound(lab, tmp_path, mode):
    """(f) With the bridge opted in, the container's outbound connection reaches the vm's outbound
    listener with its original destination; the bridge network itself and the vm's own ports are not
    taken as outbound."""
    a = lab.a
    lab.capture(tmp_path, sidecar_mode=mode, sidecar_capture_bridge_interfaces=["%s:%s" % (lab.bridge, a["net3"])])
    proxies(lab, mode)
    lab.server("backend", "direct", 8080)
    assert lab.ask("container", a["backend"], 8080) == "outbound %s 8080" % a["backend"]
    assert lab.ask("client", a["backend"], 8080) == "direct 8080"  # other forwarded traffic: untouched
    if mode == "redirect":  # tproxy: see test_tproxy_inbound_from_a_bridge_with_br_netfilter
        assert lab.ask("container", a["vm3"], 8080) == "proxy %s 8080" % a["vm3"]  # to the vm itself: inbound


@pytest.mark.parametrize("br_netfilter", [
    "0",
    pytest.param("1", marks=pytest.mark.xfail(strict=True, reason=(
        "with br_netfilter (bridge-nf-call-iptables=1, what Docker sets) a bridge port's packet passes "
        "PREROUTING in the bridge path; the socket TPROXY assigns there is dropped when the frame is "
        "passed up to IP (ip_rcv orphans it), so the SYN reaches the host's stack uncaptured and is refused"))),
])
def test_tproxy_inbound_from_a_bridge_with_br_netfilter(lab, tmp_path, br_netfilter):
    """A container's connection to the vm's own bridge address is inbound; in tproxy mode it is only
    captured when bridged frames skip iptables (a limitation of the kernel, not of the rules)."""
    a = lab.a
    lab.run("vm", "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=" + br_netfilter,
            "net.bridge.bridge-nf-call-ip6tables=" + br_netfilter)  # per network namespace
    lab.capture(tmp_path, sidecar_mode="tproxy")
    proxies(lab, "tproxy")
    assert lab.ask("container", a["vm3"], 8080) == "proxy %s 8080" % a["vm3"]


def test_bridge_opt_in_respects_outbound_excludes(lab, tmp_path):
    """(f) The outbound exclusions apply to bridge traffic as they do to the host's own."""
    a = lab.a
    lab.capture(tmp_path, sidecar_capture_bridge_interfaces=[lab.bridge], sidecar_outbound_exclude_ports=[8080])
    proxies(lab, "redirect")
    lab.server("backend", "direct", 8080)
    lab.server("backend", "direct", 8081)
    assert lab.ask("container", a["backend"], 8080) == "direct 8080"
    assert lab.ask("container", a["backend"], 8081) == "outbound %s 8081" % a["backend"]


def test_a_mark_that_collides_with_the_hosts_policy_routing_is_refused(lab, tmp_path):
    """(e) The host's ip rules (read by capture_facts on a real kernel) against our mark 0x539/0xfff in the
    settings resolver: only a rule that would match our mark and lead elsewhere is a collision; other
    software's disjoint or different marks, a "not fwmark" rule and our own table's rule are not."""
    for args in (["not", "fwmark", "0xca6c", "table", "51820"],        # wg-quick
                 ["fwmark", "0xca6c", "table", "51821"],               # WireGuard's mark, other value
                 ["fwmark", "0x80000/0xff0000", "table", "52"],        # Tailscale-like
                 ["fwmark", "0x4000/0x4000", "table", "53"],           # kube-proxy's bit
                 ["fwmark", "0x1/0x1", "table", "200"],                # shares bit 0 with 0x539
                 ["fwmark", "0x539", "table", "133"]):                 # ours (an older install)
        lab.ip("vm", "rule", "add", *args)
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"backend": "nft", "table": 133, "families": [lab.family]}}))
    out = sh("ip", "netns", "exec", lab.names["vm"], sys.executable, "-m",
             "ansible_collections.sidecar.intercept.plugins.modules.capture_facts", str(path), check=False)
    cap = json.loads(out.stdout)["ansible_facts"]["sidecar_capture"]
    host = dict(cap["host"], backend=cap["backend"])
    resolved, errors, _w = regen.effective({"sidecar_mode": "tproxy"}, host)
    assert resolved is None and len(errors) == 1, errors
    assert "fwmark 0x1/0x1 lookup 200" in errors[0], errors
