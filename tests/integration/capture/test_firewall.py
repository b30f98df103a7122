"""Host firewalls and the capture, on real netfilter in throwaway network namespaces (fw-*): what each mode
does behind a firewall that filters inbound traffic (default deny, the app port 8080 allowed, 9999 not).

- REDIRECT rewrites the destination port to the proxy's :15006 before the filter hook, so a firewall that
  allows only the app port drops every captured connection (iptables INPUT policy DROP as ufw writes it,
  an nft `inet filter` input chain with policy drop);
- firewalld accepts every DNAT'ed/redirected connection in its input chain (`ct status dnat accept`,
  unless StrictForwardPorts=yes), so REDIRECT gets through but makes a port the zone keeps closed
  reachable through the proxy (the proxy connects to the app over lo, which is always accepted);
- TPROXY keeps the destination port: the firewall decides on the app's port, 8080 reaches the proxy, 9999
  stays closed. An accept in our own nft table does not help: a drop in another table's base chain at the
  same hook still drops the packet (shown below).

Hence the roles refuse redirect mode on such a host (settings: capture_facts `host.firewall`), naming the
firewall and the fix (tproxy mode). IPv4; addresses 10.89.82.0/24."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("capture_netns", HERE / "test_netns.py")
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)
sh, start_server, ask, apply_capture, tproxy_routes = (netns.sh, netns.start_server, netns.ask, netns.apply_capture,
                                                       netns.tproxy_routes)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft") or not shutil.which("iptables-nft"),
    reason="needs root, iproute2, nft and iptables-nft")

ADDR_S, ADDR_C = "10.89.82.2", "10.89.82.1"

# A host firewall of each kind: loopback and known connections accepted, the app port 8080 allowed.
IPTABLES_DROP = [  # the shape ufw gives INPUT (default deny incoming, `ufw allow 8080/tcp`)
    "-P INPUT DROP",
    "-A INPUT -i lo -j ACCEPT",
    "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "-A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT",
]
NFT_DROP = """table inet filter {
\tchain input {
\t\ttype filter hook input priority filter; policy drop;
\t\tct state established,related accept
\t\tiif "lo" accept
\t\ttcp dport 8080 accept
\t}
}
"""
# The base of firewalld's own input chain (nftables backend, StrictForwardPorts=no): known connections,
# then every DNAT'ed connection, then lo, then the zone (8080 open), then reject.
FIREWALLD_LIKE = """table inet fw_firewalld_like {
\tchain filter_INPUT {
\t\ttype filter hook input priority filter + 10; policy accept;
\t\tct state established,related accept
\t\tct status dnat accept
\t\tiifname "lo" accept
\t\ttcp dport 8080 accept
\t\treject with icmpx admin-prohibited
\t}
}
"""


@pytest.fixture
def hosts():
    """A server and a client namespace joined by a veth pair (fw-fs-*, fw-fc-*)."""
    tag = uuid.uuid4().hex[:6]
    server, client = "fw-fs-" + tag, "fw-fc-" + tag
    made = []
    try:
        for name in (server, client):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "fws" + tag, "netns", server, "type", "veth", "peer", "name", "fwc" + tag, "netns", client)
        for name, dev, addr in ((server, "fws" + tag, ADDR_S), (client, "fwc" + tag, ADDR_C)):
            sh("ip", "netns", "exec", name, "ip", "addr", "add", addr + "/24", "dev", dev)
            sh("ip", "netns", "exec", name, "ip", "link", "set", dev, "up")
        yield server, client
    finally:
        for name in made:
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)


def firewall(server, kind):
    if kind == "iptables":
        for rule in IPTABLES_DROP:
            sh("ip", "netns", "exec", server, "iptables-nft", *rule.split())
    else:
        sh("ip", "netns", "exec", server, "nft", "-f", "-", input=NFT_DROP if kind == "nft" else FIREWALLD_LIKE)


def capture(server, tmp_path, kind, mode):
    backend = "iptables" if kind == "iptables" else "nftables"
    apply_capture(server, tmp_path, backend, "%s-defaults" % mode, "ipv4")
    if mode == "tproxy":
        tproxy_routes(server, False)


def run(server, client, tmp_path, kind, mode):
    """Firewall + capture + a proxy stand-in on :15006 and apps on 8080/9999; the answers to 8080 and 9999."""
    firewall(server, kind)
    capture(server, tmp_path, kind, mode)
    procs = [start_server(server, mode, 15006, "ipv4")]
    try:
        time.sleep(0.2)
        return ask(client, "ipv4", ADDR_S, 8080), ask(client, "ipv4", ADDR_S, 9999)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)


@pytest.mark.parametrize("kind", ["iptables", "nft"])
def test_redirect_behind_a_default_deny_firewall_drops_every_captured_connection(hosts, tmp_path, kind):
    """REDIRECT: the filter hook sees :15006, which the firewall does not allow: the allowed app port fails too."""
    server, client = hosts
    allowed, closed = run(server, client, tmp_path, kind, "redirect")
    assert "timed out" in allowed, allowed
    assert "timed out" in closed, closed


@pytest.mark.parametrize("kind", ["iptables", "nft", "firewalld"])
def test_tproxy_behind_a_firewall_keeps_its_decision(hosts, tmp_path, kind):
    """TPROXY: the filter hook sees the app's port: 8080 reaches the proxy with its original destination, 9999
    stays closed (dropped, or rejected by firewalld)."""
    server, client = hosts
    allowed, closed = run(server, client, tmp_path, kind, "tproxy")
    assert allowed == "proxy %s 8080" % ADDR_S
    assert "timed out" in closed or "No route to host" in closed, closed  # (firewalld rejects admin-prohibited)


def test_redirect_behind_firewalld_opens_the_ports_the_zone_keeps_closed(hosts, tmp_path):
    """firewalld accepts DNAT'ed connections (ct status dnat accept): with REDIRECT, 9999 - closed in the zone -
    reaches the proxy, which would connect to the app on 9999 over lo: the firewall is bypassed."""
    server, client = hosts
    allowed, closed = run(server, client, tmp_path, "firewalld", "redirect")
    assert allowed == "proxy %s 8080" % ADDR_S
    assert closed == "proxy %s 9999" % ADDR_S


def test_an_accept_in_our_own_table_does_not_override_another_tables_drop(hosts, tmp_path):
    """Opening :15006 for redirected packets in table inet sidecar_intercept is no fix for nftables: the other
    table's input chain with policy drop still sees and drops the packet."""
    server, client = hosts
    firewall(server, "nft")
    capture(server, tmp_path, "nft", "redirect")
    sh("ip", "netns", "exec", server, "nft", "-f", "-", input=(
        "table inet fw_open_proxy {\n\tchain input {\n\t\ttype filter hook input priority filter - 5; policy accept;\n"
        "\t\tct status dnat tcp dport 15006 counter accept\n\t}\n}\n"))
    proc = start_server(server, "redirect", 15006, "ipv4")
    try:
        time.sleep(0.2)
        assert "timed out" in ask(client, "ipv4", ADDR_S, 8080)
    finally:
        proc.kill()
        proc.wait(timeout=5)
    listing = sh("ip", "netns", "exec", server, "nft", "list", "table", "inet", "fw_open_proxy").stdout
    accepted = int(re.search(r"counter packets (\d+)", listing).group(1))
    assert accepted > 0, listing  # our accept saw the SYNs, the other table's policy drop still dropped them
