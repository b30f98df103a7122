"""Real connections between the two hosts prove what the capture does (and does not) intercept.

Each check sends a handful of HTTP requests to the test apps (python3 http.server) on the peer host
and reads the proxies' access logs (JSON lines in the journal) written since the check started.
"""

import json
import time

import pytest
import testinfra


def _peer(host):
    names = ["redirect-bookworm", "redirect-trixie", "tproxy-bookworm", "tproxy-trixie",
             "nftables-redirect", "nftables-tproxy"]
    me = host.backend.get_hostname()
    prefix = me.split("-")[0]
    other = [n for n in names if n.startswith(prefix + "-") and n != me][0]
    return testinfra.get_host("podman://" + other)


def _ip(h):
    return h.check_output("ip -4 -o addr show dev eth0 scope global | awk '{print $4}' | head -1").split("/")[0]


def _ip6(h):
    out = h.check_output("ip -6 -o addr show dev eth0 scope global | awk '{print $4}' | head -1").strip()
    assert out, ("no global IPv6 address on eth0 of %s: run the scenario through scripts/test.sh, which "
                 "creates its dual-stack network" % h.backend.get_hostname())
    return out.split("/")[0]


def _cursor(h):
    """Journal cursor after everything logged so far (earlier checks' lines are flushed first)."""
    _settle()
    out = h.check_output("journalctl -u sidecar-proxy.service -n 0 --show-cursor --no-pager || true")
    return out.strip().rsplit("cursor: ", 1)[-1] if "cursor: " in out else ""


def _log_since(h, cursor):
    after = "--after-cursor '%s'" % cursor if cursor else ""
    out = h.check_output("journalctl -u sidecar-proxy.service %s -o cat --no-pager || true" % after)
    entries = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                pass
    return entries


def _get(h, addr, port):
    cmd = ("python3 -c \"import urllib.request,sys; "
           "print(urllib.request.urlopen('http://%s:%d/', timeout=5).status)\"" % (addr, port))
    return h.run(cmd)


def _ok(h, addr, port):
    r = _get(h, addr, port)
    assert r.stdout.strip() == "200", "GET http://%s:%d/ from %s: rc=%s %s" % (
        addr, port, h.backend.get_hostname(), r.rc, r.stderr.strip().splitlines()[-1:])


def _settle():
    time.sleep(1.5)  # the access log line is written when the connection closes


def test_inbound_is_intercepted_with_original_destination(host):
    peer = _peer(host)
    since = _cursor(host)
    addr = _ip(host)
    for _attempt in range(3):
        _ok(peer, addr, 8080)
    _settle()
    inbound = [e for e in _log_since(host, since) if e.get("direction") == "inbound"]
    assert any(e.get("dst") == "%s:8080" % addr for e in inbound), inbound


def test_outbound_is_intercepted_with_original_destination(host):
    peer = _peer(host)
    since = _cursor(host)
    addr = _ip(peer)
    _ok(host, addr, 8080)
    _settle()
    outbound = [e for e in _log_since(host, since) if e.get("direction") == "outbound"]
    assert any(e.get("dst") == "%s:8080" % addr for e in outbound), outbound


def _ssh_banner(h, addr):
    cmd = ("python3 -c \"import socket; s = socket.create_connection(('%s', 22), timeout=5); "
           "print(s.recv(256).decode(errors='replace').strip())\"" % addr)
    return h.run(cmd)


@pytest.mark.parametrize("port", [22, 9090])
def test_excluded_inbound_ports_and_ssh_are_not_captured(host, port):
    peer = _peer(host)
    since = _cursor(host)
    addr = _ip(host)
    if port == 22:  # the host's real sshd (the lab images run one)
        r = _ssh_banner(peer, addr)
        assert r.stdout.startswith("SSH-2.0-"), "sshd on %s:22 from %s: rc=%s %s %s" % (
            addr, peer.backend.get_hostname(), r.rc, r.stdout.strip(), r.stderr.strip().splitlines()[-1:])
    else:
        _ok(peer, addr, port)
    _settle()
    assert [e for e in _log_since(host, since) if e.get("dst", "").endswith(":%d" % port)] == []


def test_excluded_outbound_port_and_cidr_are_not_captured(host):
    peer = _peer(host)
    since = _cursor(host)
    alias = peer.check_output(r"ip -4 -o addr show dev eth0 | grep -o '10\.89\.7[123]\.24[0-9]' | head -1")
    _ok(host, _ip(peer), 9090)
    _ok(host, alias, 8080)
    _settle()
    outbound = [e for e in _log_since(host, since) if e.get("direction") == "outbound"]
    assert outbound == [], outbound


def test_proxy_traffic_is_not_looped(host):
    peer = _peer(host)
    since = _cursor(host)
    for _attempt in range(5):
        _ok(peer, _ip(host), 8080)
    _settle()
    entries = _log_since(host, since)
    # one access-log entry per client connection: no connection from the proxy came back into it
    assert len([e for e in entries if e.get("dst") == "%s:8080" % _ip(host)]) == 5, entries
    assert not [e for e in entries if e.get("src", "").startswith(("127.0.0.6", "127.0.0.1"))], entries
    metrics = host.check_output("python3 -c \"import urllib.request; "
                                "print(urllib.request.urlopen('http://127.0.0.1:15000/metrics').read().decode())\"")
    assert 'kind="loop"} 1' not in metrics


def test_only_one_jump_each(host):
    if host.backend.get_hostname().startswith("nftables-"):
        listing = host.check_output("nft list ruleset")
        assert listing.count("jump SIDECAR_OUTPUT") == 1 and listing.count("jump SIDECAR_INBOUND") == 1, listing
        assert "table inet filter" in listing and "dnat to 172.17.0.2:80" in listing  # foreign tables still there
        return
    backend = "legacy" if host.backend.get_hostname().endswith("trixie") else "nft"
    save = host.check_output("iptables-%s-save" % backend)
    assert save.count("-j SIDECAR_OUTPUT") == 1
    assert save.count("-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j SIDECAR_INBOUND") == 1
    assert "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER" in save  # foreign rules still there
    # redirect mode (the jump is in nat): ours after Docker's, so a published port's DNAT comes first
    nat = [line for line in save.split("*nat", 1)[1].splitlines() if line.startswith("-A PREROUTING")]
    ours = "-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j SIDECAR_INBOUND"
    if ours in nat:
        assert nat.index("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER") < nat.index(ours), nat


def test_ipv6_inbound_and_outbound_are_intercepted_with_original_destination(host):
    """sidecar_ipv6 is auto: the dual-stack network gives both hosts a global IPv6 address, so the
    ip6tables chains (and in tproxy mode the IPv6 policy routing) and the proxy's IPv6 listeners are on."""
    peer = _peer(host)
    since = _cursor(host)
    mine, theirs = _ip6(host), _ip6(peer)
    for _attempt in range(2):
        _ok(peer, "[%s]" % mine, 8080)
    _ok(host, "[%s]" % theirs, 8080)
    _settle()
    entries = _log_since(host, since)
    assert any(e.get("direction") == "inbound" and e.get("dst") == "[%s]:8080" % mine for e in entries), entries
    assert any(e.get("direction") == "outbound" and e.get("dst") == "[%s]:8080" % theirs for e in entries), entries
    assert not [e for e in entries if e.get("src", "").startswith(("[::6]", "[::1]"))], entries  # no loop


# The container in prepare.yml: network namespace scapctr behind the bridge docker0, MASQUERADE'd out,
# its :80 (a line echo server) published as the host's :18080.
_ASK = ("import socket, sys; c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); "
        "c.sendall(sys.argv[3].encode() + b'\\n'); print(c.makefile('rb').readline().decode().strip())")
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).status)"


def _in_container(h, script, *args):
    if h.backend.get_hostname().startswith("nftables-"):
        pytest.skip("the nftables scenario's hosts have no container network (only redirect and tproxy do)")
    return h.run("ip netns exec scapctr python3 -c %s" + " %s" * len(args), script, *args)


def test_forwarded_container_traffic_is_not_captured(host):
    """Outbound from a container on this host (forwarded, MASQUERADE) to the peer's published port
    reaches the peer's container; neither host's proxy sees that connection. The container's
    connection to the peer's own app port is forwarded here too, and captured inbound by the peer."""
    peer = _peer(host)
    since, peer_since = _cursor(host), _cursor(peer)
    ask = _in_container(host, _ASK, _ip(peer), "18080", "hello")
    assert ask.stdout.strip() == "ctr hello", (ask.rc, ask.stderr)
    get = _in_container(host, _GET, "http://%s:8080/" % _ip(peer))
    assert get.stdout.strip() == "200", (get.rc, get.stderr)
    _settle()
    mine = [e for e in _log_since(host, since) if e.get("direction")]
    theirs = _log_since(peer, peer_since)
    assert mine == [], mine  # forwarded through this host: neither outbound nor inbound capture
    assert [e for e in theirs if e.get("dst", "").endswith((":18080", ":80"))] == [], theirs
    # the peer's app port is captured as usual, from this host's (masqueraded) address
    assert any(e.get("direction") == "inbound" and e.get("dst") == "%s:8080" % _ip(peer)
               and e.get("src", "").startswith(_ip(host) + ":") for e in theirs), theirs
