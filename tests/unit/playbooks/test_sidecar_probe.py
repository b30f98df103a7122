"""Unit tests of playbooks/files/sidecar_probe.py: the probe app, the connect probe and the evidence
check, against loopback only, with recorded proxy /stats answers and access-log lines."""
from __future__ import annotations

import http.server
import importlib.util
import json
import os
import socket
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "playbooks" / "files" / "sidecar_probe.py"
spec = importlib.util.spec_from_file_location("sidecar_probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

# recorded access-log lines of sidecar-proxy (journalctl -o cat), one per finished connection
RECORDED_LOG = [
    ('{"start_time":"2026-11-26T21:30:00.100Z","direction":"outbound","src":"10.89.0.2:40112",'
     '"dst":"10.89.0.3:15080","bytes_in":8,"bytes_out":40,"duration_ms":1.2,"reason":"closed"}'),
    ('{"start_time":"2026-11-26T21:30:00.200Z","direction":"inbound","src":"10.89.0.3:51200",'
     '"dst":"10.89.0.2:15080","bytes_in":8,"bytes_out":40,"duration_ms":0.9,"reason":"closed"}'),
    "sidecar-proxy: listening on 15006 (not an access-log line)",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def admin():
    """A fake proxy admin endpoint whose /stats counters the test sets."""
    state = {"connections_total": {"inbound": 0, "outbound": 0}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(state).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def run(capsys, argv):
    assert probe.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_serve_and_connect_round_trip(capsys):
    port = free_port()
    threading.Thread(target=probe.serve, args=(port,), daemon=True).start()
    for _attempt in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            threading.Event().wait(0.05)
    out = run(capsys, ["connect", "--host", "127.0.0.1", "--port", str(port), "--count", "3", "--timeout", "2"])
    assert out["connected"] == 3 and out["replied"] == 3
    assert out["results"][0]["reply"].startswith("sidecar-probe ") and out["results"][0]["reply"].endswith(" probe-0")


def test_connect_refused_is_reported_not_raised(capsys):
    out = run(capsys, ["connect", "--host", "127.0.0.1", "--port", str(free_port()), "--timeout", "1"])
    assert out["connected"] == 0 and "ConnectionRefusedError" in out["results"][0]["error"]


def test_evidence_intercepted(capsys, admin, monkeypatch):
    port, state = admin
    state["connections_total"] = {"inbound": 7, "outbound": 9}
    monkeypatch.setattr(probe, "journal_lines", lambda since, unit: [
        json.loads(x) for x in RECORDED_LOG if x.startswith("{")])
    out = run(capsys, ["evidence", "--admin-port", str(port), "--since", "0", "--wait", "0",
                       "--before", '{"inbound": 5, "outbound": 7}',
                       "--expect", "outbound=10.89.0.3:15080", "--expect", "inbound=10.89.0.2:15080"])
    assert out["intercepted"] is True, out["problems"]
    assert out["delta"] == {"inbound": 2, "outbound": 2}


def test_evidence_names_what_is_missing(capsys, admin, monkeypatch):
    port, state = admin
    state["connections_total"] = {"inbound": 5, "outbound": 8}
    monkeypatch.setattr(probe, "journal_lines", lambda since, unit: [json.loads(RECORDED_LOG[0])])
    out = run(capsys, ["evidence", "--admin-port", str(port), "--since", "0", "--wait", "0",
                       "--before", '{"inbound": 5, "outbound": 7}',
                       "--expect", "outbound=10.89.0.3:15080", "--expect", "inbound=10.89.0.2:15080"])
    assert out["intercepted"] is False
    assert "inbound connection counter grew by 0, expected at least 1" in out["problems"]
    assert "no inbound access-log line with dst=10.89.0.2:15080" in out["problems"]


def test_evidence_without_proxy(capsys):
    out = run(capsys, ["evidence", "--admin-port", str(free_port()), "--since", "0", "--wait", "0",
                       "--no-log", "--expect", "inbound=10.0.0.1:1"])
    assert out["intercepted"] is False and out["problems"][0].startswith("proxy admin /stats unreachable")


def test_journal_parsing_skips_non_json(monkeypatch):
    class Done:
        stdout = "\n".join(RECORDED_LOG).encode()

    monkeypatch.setattr(probe.subprocess, "run", lambda *a, **k: Done)
    entries = probe.journal_lines(0, "sidecar-proxy.service")
    assert [e["direction"] for e in entries] == ["outbound", "inbound"]


@pytest.mark.parametrize("argv, message", [
    (["connect", "--host", "h", "--port", "70000"], "port out of range: 70000"),
    (["connect", "--host", "h", "--port", "1", "--count", "50"], "--count must be 1..20, got 50"),
    (["evidence", "--admin-port", "1", "--since", "0", "--expect", "sideways=1.2.3.4:5"], "'sideways=1.2.3.4:5'"),
    (["evidence", "--admin-port", "1", "--since", "0", "--before", "{nope"], "--before is not JSON"),
])
def test_bad_arguments_name_the_value(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        probe.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="setegid needs root")
def test_connect_as_gid_restores_the_gid(capsys):
    port = free_port()
    threading.Thread(target=probe.serve, args=(port,), daemon=True).start()
    threading.Event().wait(0.2)
    before = os.getegid()
    out = run(capsys, ["connect", "--host", "127.0.0.1", "--port", str(port), "--as-gid", "1337", "--timeout", "2"])
    assert out["replied"] == 1
    assert os.getegid() == before


def test_evidence_upstream_timeout_is_not_interception(capsys, admin, monkeypatch):
    """A tproxy host whose replies are dropped: the proxy logs the outbound connection, but the
    destination never answered, so the outbound path does not work."""
    port, state = admin
    state["connections_total"] = {"inbound": 0, "outbound": 1}
    timed_out = json.loads(RECORDED_LOG[0])
    timed_out["reason"] = "connect_timeout"
    monkeypatch.setattr(probe, "journal_lines", lambda since, unit: [timed_out])
    out = run(capsys, ["evidence", "--admin-port", str(port), "--since", "0", "--wait", "0",
                       "--before", '{"outbound": 0}', "--expect", "outbound=10.89.0.3:15080"])
    assert out["intercepted"] is False
    assert out["problems"] == [
        "outbound connection to 10.89.0.3:15080 reached the proxy but got no answer upstream (connect_timeout)"]


@pytest.mark.parametrize("argv, message", [
    (["local", "--admin-port", "1", "--port", "15080", "--count", "0"], "--count must be 1..20, got 0"),
    (["local", "--admin-port", "1", "--port", "15080", "--avoid", "10.0.0.300/8"], "'10.0.0.300/8'"),
    (["local", "--admin-port", "1", "--port", "15080", "--prefix", "bad/name"], "'bad/name'"),
])
def test_local_bad_arguments_name_the_value(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        probe.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_pick_network_is_link_local_and_avoids_what_is_used():
    import ipaddress
    used = [ipaddress.ip_network("169.254.0.0/17"), ipaddress.ip_network("169.254.169.0/24")]
    seen = set()
    for seed in range(200):
        net = probe.pick_network(used, seed)
        assert net.prefixlen == 30 and net.subnet_of(ipaddress.ip_network("169.254.0.0/16"))
        assert not any(net.overlaps(u) for u in used), (seed, net)
        seen.add(net)
    assert len(seen) > 100  # different runs (PIDs) start at different places


def test_pick_network_fails_when_everything_is_used():
    import ipaddress
    with pytest.raises(RuntimeError, match="no free link-local /30"):
        probe.pick_network([ipaddress.ip_network("169.254.0.0/16")], 1)


def test_evidence_reads_an_access_log_file(capsys, admin, tmp_path):
    port, state = admin
    state["connections_total"] = {"inbound": 1, "outbound": 1}
    log = tmp_path / "access.log"
    log.write_text("\n".join(RECORDED_LOG) + "\n")
    out = run(capsys, ["evidence", "--admin-port", str(port), "--since", "0", "--wait", "0",
                       "--before", '{"inbound": 0, "outbound": 0}', "--log-file", str(log),
                       "--expect", "outbound=10.89.0.3:15080", "--expect", "inbound=10.89.0.2:15080"])
    assert out["intercepted"] is True, out["problems"]


# ----------------------------------------------------------------------------- trace parsers
# recorded `xtables-monitor --trace` (iptables-nft 1.8.9) of an outbound SYN captured by our rules, with a
# second packet (another TRACE user's) that our marker chain SCTRACE_4242 did not mark
RECORDED_XTABLES = """\
PACKET: 2 562e1a2a OUT=va SRC=10.250.0.1 DST=10.250.0.9 LEN=60 TOS=0x0 TTL=64 ID=62624 DF SPORT=43634 DPORT=8080 SYN
 TRACE: 2 562e1a2a raw:SCTRACE_4242:rule:0x2:CONTINUE  -4 -t raw -A SCTRACE_4242 -p tcp -m tcp --dport 8080 -j TRACE
 TRACE: 2 562e1a2a raw:OUTPUT:policy:ACCEPT
PACKET: 2 562e1a2a OUT=va SRC=10.250.0.1 DST=10.250.0.9 LEN=60 TOS=0x0 TTL=64 ID=62624 DF SPORT=43634 DPORT=8080 SYN
 TRACE: 2 562e1a2a nat:OUTPUT:rule:0x9:JUMP:SIDECAR_OUTPUT  -4 -t nat -A OUTPUT -p tcp -j SIDECAR_OUTPUT
 TRACE: 2 562e1a2a nat:SIDECAR_OUTPUT:rule:0x14:JUMP:SIDECAR_REDIRECT  -4 -t nat -A SIDECAR_OUTPUT -j SIDECAR_REDIRECT
 TRACE: 2 562e1a2a nat:SIDECAR_REDIRECT:rule:0x17:ACCEPT  -4 -t nat -A SIDECAR_REDIRECT -p tcp -j REDIRECT --to-ports 15001
PACKET: 2 0badf00d OUT=va SRC=10.250.0.1 DST=10.250.0.7 LEN=60 SPORT=40000 DPORT=443 SYN
 TRACE: 2 0badf00d nat:OUTPUT:rule:0x9:JUMP:SIDECAR_OUTPUT  -4 -t nat -A OUTPUT -p tcp -j SIDECAR_OUTPUT
"""
# an excluded port: RETURN is printed as a verdict code
RECORDED_XTABLES_RETURN = """\
PACKET: 2 52846582 IN=spr7h SRC=169.254.7.2 DST=10.250.0.1 LEN=60 SPORT=52528 DPORT=22 SYN
 TRACE: 2 52846582 nat:SCTRACE_7:rule:0x2:CONTINUE  -4 -t nat -A SCTRACE_7 -s 169.254.7.2/32 -d 10.250.0.1/32 -p tcp -j TRACE
 TRACE: 2 52846582 nat:PREROUTING:rule:0x7:JUMP:SIDECAR_INBOUND  -4 -t nat -A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j SIDECAR_INBOUND
 TRACE: 2 52846582 nat:SIDECAR_INBOUND:rule:0xa:0xfffffffb  -4 -t nat -A SIDECAR_INBOUND -p tcp -m tcp --dport 22 -j RETURN
 TRACE: 2 52846582 nat:PREROUTING:policy:ACCEPT
"""
# recorded `nft -a monitor trace` (nftables 1.0.6) of an inbound SYN, TPROXY mode, marked by table sidecar_trace_99
_T = "trace id 1c068fe0 "
_PKT = 'packet: iif "spr99h" ip saddr 169.254.43.226 ip daddr 10.250.0.1 tcp sport 60732 tcp dport 8080 tcp flags == syn'
RECORDED_NFT = "\n".join([
    _T + "inet sidecar_trace_99 prerouting " + _PKT,
    _T + "inet sidecar_trace_99 prerouting rule ip daddr 10.250.0.1 tcp dport 8080 ip saddr 169.254.43.226 "
    "tcp flags & (syn | ack) == syn meta nftrace set 1 # handle 2 (verdict continue)",
    _T + "inet sidecar_trace_99 prerouting policy accept",
    _T + "inet sidecar_intercept MANGLE_PREROUTING " + _PKT,
    _T + "inet sidecar_intercept MANGLE_PREROUTING rule fib daddr type local meta l4proto tcp "
    "counter packets 3 bytes 180 jump SIDECAR_INBOUND # handle 7 (verdict jump SIDECAR_INBOUND)",
    _T + "inet sidecar_intercept SIDECAR_INBOUND rule meta l4proto tcp counter packets 3 bytes 180 "
    "jump SIDECAR_TPROXY # handle 12 (verdict jump SIDECAR_TPROXY)",
    _T + "inet sidecar_intercept SIDECAR_TPROXY rule ip daddr != 127.0.0.1 meta l4proto tcp counter packets 1 bytes 60 "
    "meta mark set meta mark & 0xfffff539 | 0x00000539 tproxy ip to :15006 accept # handle 16 (verdict accept)",
    _T + "ip filter INPUT rule tcp dport 8080 counter packets 0 bytes 0 accept # handle 4 (verdict accept)",
    "trace id 77777777 inet firewalld filter_INPUT rule ct state established accept (verdict accept)",
]) + "\n"


def test_xtables_trace_parser_keeps_only_our_marked_packet_and_names_the_verdicts():
    got = probe.parse_xtables_trace(RECORDED_XTABLES, "SCTRACE_4242")
    assert [p["id"] for p in got["packets"]] == ["562e1a2a"]
    assert got["packets"][0]["packet"].startswith("OUT=va SRC=10.250.0.1 DST=10.250.0.9")
    steps = [(s["table"], s["chain"], s["handle"], s["verdict"], s["ours"], s["action"]) for s in got["steps"]]
    assert steps == [
        ("raw", "OUTPUT", "", "accept", False, ""),
        ("nat", "OUTPUT", "9", "jump SIDECAR_OUTPUT", True, ""),
        ("nat", "SIDECAR_OUTPUT", "20", "jump SIDECAR_REDIRECT", True, ""),
        ("nat", "SIDECAR_REDIRECT", "23", "accept", True, "REDIRECT"),
    ]
    assert got["steps"][-1]["rule"] == "-A SIDECAR_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
    assert got["steps"][0]["rule"] == "policy" and got["steps"][-1]["family"] == "ipv4"


def test_xtables_trace_parser_turns_verdict_codes_into_words():
    got = probe.parse_xtables_trace(RECORDED_XTABLES_RETURN, "SCTRACE_7")
    assert [(s["chain"], s["verdict"], s["action"]) for s in got["steps"]] == [
        ("PREROUTING", "jump SIDECAR_INBOUND", ""), ("SIDECAR_INBOUND", "return", "RETURN"),
        ("PREROUTING", "accept", "")]
    assert not any("SCTRACE" in s["rule"] for s in got["steps"])


def test_nft_trace_parser_keeps_only_our_marked_packet_and_shortens_counters():
    got = probe.parse_nft_trace(RECORDED_NFT, "sidecar_trace_99")
    assert [p["id"] for p in got["packets"]] == ["1c068fe0"]
    assert "ip saddr 169.254.43.226" in got["packets"][0]["packet"]
    steps = [(s["table"], s["chain"], s["handle"], s["verdict"], s["ours"], s["action"]) for s in got["steps"]]
    assert steps == [
        ("sidecar_intercept", "MANGLE_PREROUTING", "7", "jump SIDECAR_INBOUND", True, ""),
        ("sidecar_intercept", "SIDECAR_INBOUND", "12", "jump SIDECAR_TPROXY", True, ""),
        ("sidecar_intercept", "SIDECAR_TPROXY", "16", "accept", True, "TPROXY"),
        ("filter", "INPUT", "4", "accept", False, ""),
    ]
    assert got["steps"][0]["rule"] == "fib daddr type local meta l4proto tcp counter jump SIDECAR_INBOUND"
    assert "packets" not in got["steps"][2]["rule"]


# an iptables-nft IPv6 inbound trace read by `nft -a monitor trace` (xtables-monitor 1.8.9 had exited:
# "Parsing nftables rule failed"), recorded on Debian 12; plus a packet that is not ours
_T6 = "trace id 960f0c5d ip6 nat "
RECORDED_NFT_FROM_IPTABLES = "\n".join([
    _T6 + 'SCTRACE_27828 packet: iif "spr27828h" ether saddr 5a:ea:77:8f:30:bc ether daddr 72:91:2d:b5:52:9f '
    "ip6 saddr fd5c:9e0b:7a41:861c::2 ip6 daddr fd00:251::1 ip6 dscp cs0 ip6 ecn not-ect ip6 hoplimit 64 "
    "ip6 flowlabel 639694 ip6 length 40 tcp sport 37074 tcp dport 15080 tcp flags == syn tcp window 64800 ",
    _T6 + "SCTRACE_27828 rule ip6 saddr fd5c:9e0b:7a41:861c::2 ip6 daddr fd00:251::1 tcp flags syn / syn,ack "
    "tcp dport 15080 counter packets 0 bytes 0 meta nftrace set 1 # handle 25 (verdict continue)",
    _T6 + "PREROUTING rule meta l4proto tcp fib daddr type local counter packets 0 bytes 0 jump SIDECAR_INBOUND "
    "# handle 21 (verdict jump SIDECAR_INBOUND)",
    "trace id 11111111 ip6 nat PREROUTING rule meta l4proto tcp counter packets 0 bytes 0 jump SIDECAR_INBOUND "
    "# handle 21 (verdict jump SIDECAR_INBOUND)",
    _T6 + "SIDECAR_INBOUND rule meta l4proto tcp counter packets 0 bytes 0 jump SIDECAR_IN_REDIRECT "
    "# handle 7 (verdict jump SIDECAR_IN_REDIRECT)",
    _T6 + "SIDECAR_IN_REDIRECT rule meta l4proto tcp counter packets 0 bytes 0 redirect to :15006 "
    "# handle 10 (verdict accept)",
]) + "\n"


def test_nft_trace_parser_reads_an_iptables_nft_trace_marked_by_our_chain():
    got = probe.parse_nft_trace(RECORDED_NFT_FROM_IPTABLES, "", "SCTRACE_27828")
    assert [p["id"] for p in got["packets"]] == ["960f0c5d"]
    steps = [(s["family"], s["table"], s["chain"], s["handle"], s["verdict"], s["ours"], s["action"])
             for s in got["steps"]]
    assert steps == [
        ("ipv6", "nat", "PREROUTING", "21", "jump SIDECAR_INBOUND", True, ""),
        ("ipv6", "nat", "SIDECAR_INBOUND", "7", "jump SIDECAR_IN_REDIRECT", True, ""),
        ("ipv6", "nat", "SIDECAR_IN_REDIRECT", "10", "accept", True, "REDIRECT"),
    ]
    assert got["steps"][-1]["rule"] == "meta l4proto tcp counter redirect to :15006"
    # another run's chain marks nothing
    assert probe.parse_nft_trace(RECORDED_NFT_FROM_IPTABLES, "", "SCTRACE_1")["steps"] == []


def test_pick_network6_is_a_unique_local_64_and_avoids_what_is_used():
    import ipaddress
    base = probe.CANDIDATES6
    assert base.subnet_of(ipaddress.ip_network("fd00::/8")) and base.prefixlen == 48
    used = [ipaddress.ip_network("fd5c:9e0b:7a41::/49"), ipaddress.ip_network("10.0.0.0/8")]
    seen = set()
    for seed in range(200):
        net = probe.pick_network(used, seed, "ipv6")
        assert net.prefixlen == 64 and net.subnet_of(base) and not net.overlaps(used[0]), (seed, net)
        seen.add(net)
    assert len(seen) > 50  # different runs (PIDs) start at different places (half the seeds land in `used`)
    with pytest.raises(RuntimeError, match="no free unique-local /64"):
        probe.pick_network([base], 1, "ipv6")


def test_trace_parsers_without_our_marker_find_nothing():
    assert probe.parse_nft_trace(RECORDED_NFT, "sidecar_trace_1")["steps"] == []
    assert probe.parse_xtables_trace(RECORDED_XTABLES, "SCTRACE_1")["steps"] == []
    assert probe.parse_nft_trace("", "sidecar_trace_1") == {"packets": [], "steps": []}


@pytest.mark.parametrize("text,want", [
    ("10.0.0.5:8080", ("ipv4", "10.0.0.5", 8080)),
    ("[fd00::5]:443", ("ipv6", "fd00::5", 443)),
])
def test_trace_destination(text, want):
    assert probe.parse_destination(text) == want


@pytest.mark.parametrize("text", ["10.0.0.5", "10.0.0.5:0", "10.0.0.5:70000", "fd00::5:443", "host:80", "10.0.0.300:80"])
def test_trace_rejects_a_bad_destination_naming_it(capsys, text):
    with pytest.raises(SystemExit) as exc:
        probe.main(["trace", "--destination", text, "--direction", "inbound", "--backend", "nft"])
    assert exc.value.code == 2
    assert repr(text) in capsys.readouterr().err
