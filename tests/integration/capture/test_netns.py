"""iptables_chains on real netfilter in throwaway network namespaces (root only).

Each test creates namespaces named scap-*, addresses in 10.232.0.0/16 and fd00:232::/64, runs the module
(python -m ... args.json, the way Ansible runs it) inside the namespace, sends a bounded number of
connections and deletes everything in a finally block.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "tests" / "golden" / "cases"
MODULE = "ansible_collections.sidecar.intercept.plugins.modules.iptables_chains"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables-nft-save"),
    reason="needs root, iproute2 and iptables (legacy + nft)")

FOREIGN = [
    "-t nat -N DOCKER",
    "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
    "-t nat -A DOCKER -p tcp -m tcp --dport 18080 -j DNAT --to-destination 10.232.9.9:80",
    "-t filter -A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT",
    "-t mangle -A PREROUTING -p udp -m udp --dport 5353 -j MARK --set-xmark 0x7/0xffffffff",
]
# An nft table that iptables-nft creates stays (empty) after removal; the host firewall here already
# has IPv6 rules in nat and mangle, as real hosts with a firewall do (see the role README).
FOREIGN6 = [
    "-t nat -A POSTROUTING -o scapnone -j MASQUERADE",
    "-t mangle -A PREROUTING -p udp -m udp --dport 5353 -j MARK --set-xmark 0x7/0xffffffff",
]


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30, **kw)


@pytest.fixture
def ns():
    names = []

    def make():
        name = "scap-" + uuid.uuid4().hex[:8]
        sh("ip", "netns", "add", name)
        names.append(name)
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        return name

    yield make
    for name in names:
        sh("ip", "netns", "pids", name, check=False)
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", name, check=False)


def run_module(name, tmp_path, module=None, **args):
    """Run a module of the collection (default iptables_chains) in namespace `name`; its result."""
    path = tmp_path / ("args-%s.json" % uuid.uuid4().hex[:6])
    args.setdefault("_ansible_diff", True)
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    target = MODULE if module is None else MODULE.rsplit(".", 1)[0] + "." + module
    out = sh("ip", "netns", "exec", name, sys.executable, "-m", target, str(path), check=False)
    return json.loads(out.stdout)


def save_all(name):
    out = []
    for b in ("legacy", "nft"):
        for t in ("iptables", "ip6tables"):
            text = sh("ip", "netns", "exec", name, "%s-%s-save" % (t, b)).stdout
            out.append([line for line in text.splitlines() if not line.startswith("#")])
    return out


@pytest.mark.parametrize("backend", ["nft", "legacy"])
@pytest.mark.parametrize("case", ["redirect-outbound", "tproxy-ports", "redirect-bridges", "tproxy-bridges"])
def test_apply_idempotent_drift_remove_leaves_foreign_rules(ns, tmp_path, backend, case):
    name = ns()
    for rule in FOREIGN:
        sh("ip", "netns", "exec", name, "iptables-%s" % backend, *rule.split())
    for rule in FOREIGN6:
        sh("ip", "netns", "exec", name, "ip6tables-%s" % backend, *rule.split())
    before = save_all(name)
    for family in ("ipv4", "ipv6"):
        rules = (GOLDEN / ("%s.%s.rules" % (case, family))).read_text()
        first = run_module(name, tmp_path, family=family, backend="auto", rules=rules)
        assert first["changed"] and not first.get("failed"), first
        assert first["backend"] == backend  # legacy when legacy holds rules, else nft
        again = run_module(name, tmp_path, family=family, backend="auto", rules=rules)
        assert again["changed"] is False, again
        # drift: delete the jump, duplicate nothing else; check mode sees it and changes nothing
        tool = ("ip6tables" if family == "ipv6" else "iptables") + "-" + backend
        sh("ip", "netns", "exec", name, tool, "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "SIDECAR_OUTPUT")
        sh("ip", "netns", "exec", name, tool, "-t", "nat", "-A", "SIDECAR_REDIRECT", "-j", "RETURN")
        check = run_module(name, tmp_path, family=family, backend=backend, rules=rules, _ansible_check_mode=True)
        assert check["changed"] and "-j RETURN" in check["diff"]["before"], check
        assert run_module(name, tmp_path, family=family, backend=backend, rules=rules)["changed"]
        assert run_module(name, tmp_path, family=family, backend=backend, rules=rules)["changed"] is False
        jumps = sh("ip", "netns", "exec", name, tool + "-save", "-t", "nat").stdout.count("-j SIDECAR_OUTPUT")
        assert jumps == 1
    for family in ("ipv4", "ipv6"):
        rules = (GOLDEN / ("%s.%s.rules" % (case, family))).read_text()
        gone = run_module(name, tmp_path, family=family, backend=backend, rules=rules, state="absent")
        assert gone["changed"], gone
    assert save_all(name) == before


SERVER = textwrap.dedent("""
    import socket, struct, sys
    mode, port, family = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    label = sys.argv[4] if len(sys.argv) > 4 else "proxy"  # which listener answered
    fam = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mode == "tproxy":
        s.setsockopt(socket.SOL_IP if fam == socket.AF_INET else 41, 19 if fam == socket.AF_INET else 75, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        if mode == "redirect":
            if fam == socket.AF_INET:
                raw = c.getsockopt(socket.SOL_IP, 80, 16)
                dport, = struct.unpack("!H", raw[2:4]); ip = socket.inet_ntoa(raw[4:8])
            else:
                raw = c.getsockopt(41, 80, 28)
                dport, = struct.unpack("!H", raw[2:4]); ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            answer = "%s %s %d" % (label, ip, dport)
        elif mode == "tproxy":
            ip, dport = c.getsockname()[:2]
            answer = "%s %s %d" % (label, ip, dport)
        else:
            answer = "direct %d" % port
        c.sendall(answer.encode()); c.close()
""")


def two_hosts(ns, family):
    """A server and a client namespace joined by a veth pair; returns (server, client, addr_s, addr_c)."""
    server, client = ns(), ns()
    veth_s, veth_c = "scaps" + uuid.uuid4().hex[:6], "scapc" + uuid.uuid4().hex[:6]
    sh("ip", "link", "add", veth_s, "netns", server, "type", "veth", "peer", "name", veth_c, "netns", client)
    v6 = family == "ipv6"
    addr_s, addr_c = ("fd00:232::2", "fd00:232::1") if v6 else ("10.232.0.2", "10.232.0.1")
    plen = "64" if v6 else "24"
    for n, dev, a in ((server, veth_s, addr_s), (client, veth_c, addr_c)):
        sh("ip", "netns", "exec", n, "ip", "addr", "add", "%s/%s" % (a, plen), "dev", dev, "nodad")
        sh("ip", "netns", "exec", n, "ip", "link", "set", dev, "up")
    return server, client, addr_s, addr_c


def tproxy_routes(server, v6):
    flag = "-6" if v6 else "-4"
    sh("ip", "netns", "exec", server, "ip", flag, "rule", "add", "fwmark", "0x539/0xfff", "lookup", "133")
    sh("ip", "netns", "exec", server, "ip", flag, "route", "add", "local", "default", "dev", "lo", "table", "133")


def start_server(name, mode, port, family):
    proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", SERVER, mode, str(port), family],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def ask(name, family, addr, port):
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); "
            "print(s.recv(200).decode())")
    out = sh("ip", "netns", "exec", name, sys.executable, "-c", code, addr, str(port), check=False)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


def apply_capture(name, tmp_path, backend, case, family):
    """Load the golden rules of `case` in namespace `name` with the module of `backend`."""
    if backend == "nftables":
        rules = (GOLDEN / ("%s.nft" % case)).read_text()
        result = run_module(name, tmp_path, module="nft_table", rules=rules)
    else:
        rules = (GOLDEN / ("%s.%s.rules" % (case, family))).read_text()
        result = run_module(name, tmp_path, family=family, backend="nft", rules=rules)
    assert result["changed"] and not result.get("failed"), result


@pytest.mark.parametrize("backend", ["iptables", pytest.param("nftables", marks=pytest.mark.skipif(
    not shutil.which("nft"), reason="needs nft"))])
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_inbound_capture_sees_original_destination_and_ssh_is_not_captured(ns, tmp_path, mode, family, backend):
    server, client, addr_s, addr_c = two_hosts(ns, family)
    v6 = family == "ipv6"
    procs = []
    try:
        apply_capture(server, tmp_path, backend, "%s-defaults" % mode, family)
        if mode == "tproxy":
            tproxy_routes(server, v6)
        procs.append(start_server(server, mode, 15006, family))
        procs.append(start_server(server, "direct", 22, family))
        time.sleep(0.2)
        for port in (8080, 8443):
            assert ask(client, family, addr_s, port) == "proxy %s %d" % (addr_s, port)
        assert ask(client, family, addr_s, 22) == "direct 22"
        # outbound: an app's connection to the peer reaches :15001 with its original destination;
        # the capturing host's proxy (UID 1337) is not captured, and in tproxy mode the replies pass
        # the mangle chain instead of being dropped by TPROXY
        procs.append(start_server(server, "redirect", 15001, family))
        procs.append(start_server(client, "direct", 7000, family))
        assert ask(server, family, addr_c, 7000) == "proxy %s 7000" % addr_c
        code = ("import encodings.idna,os,socket,sys; os.setgid(1337); os.setuid(1337); "
                "s=socket.create_connection((sys.argv[1], 7000), timeout=3); print(s.recv(200).decode())")
        out = sh("ip", "netns", "exec", server, sys.executable, "-c", code, addr_c, check=False)
        assert out.stdout.strip() == "direct 7000", out.stderr[-500:]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tproxy_reconnect_from_same_port_is_captured(ns, tmp_path, family):
    """The proxy's side closes first and keeps the connection in TIME_WAIT; a client that reconnects
    from the same source port must reach the proxy again, not the host's own stack (a socket-lookup
    DIVERT rule matched the TIME_WAIT socket and let such a SYN bypass TPROXY)."""
    server, client, addr_s, addr_c = two_hosts(ns, family)
    v6 = family == "ipv6"
    procs = []
    try:
        rules = (GOLDEN / ("tproxy-defaults.%s.rules" % family)).read_text()
        assert run_module(server, tmp_path, family=family, backend="nft", rules=rules)["changed"]
        tproxy_routes(server, v6)
        procs.append(start_server(server, "tproxy", 15006, family))
        procs.append(start_server(server, "direct", 8080, family))  # the app, on the wildcard address
        code = textwrap.dedent("""
            import socket, sys, time
            fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
            for attempt in range(10):
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.settimeout(3)
                s.bind((sys.argv[2], 40123))
                try:
                    s.connect((sys.argv[1], 8080))
                    print(s.recv(200).decode() or "empty")
                except OSError as exc:
                    print(type(exc).__name__, exc.errno)
                s.close()
                time.sleep(0.1)  # our side's LAST_ACK ends; the peer's TIME_WAIT stays
        """)
        out = sh("ip", "netns", "exec", client, sys.executable, "-c", code, addr_s, addr_c, check=False)
        assert out.stdout.splitlines() == ["proxy %s 8080" % addr_s] * 10, (out.stdout, out.stderr[-500:])
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)
