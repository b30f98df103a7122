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
