"""Forwarding through real capture rules in network namespaces (root only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import PROXY_UID, SRC, Topo, connect, ns_socket, recv_all

FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


def fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def roundtrip(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    return recv_all(s)


@pytest.mark.parametrize("family", FAMILIES)
def test_redirect_inbound(topo: Topo, start_proxy: Any, serve: Any, family: int) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"ipv6": True})
    srv = serve(topo.sns, family, 8080)
    cip, sip = topo.ip(family)
    with connect(topo.cns, family, (sip, 8080)) as s:
        assert roundtrip(s, b"hello " * 1000) == b"hello " * 1000
    # the app saw the passthrough source, not the client
    assert srv.peers[0][0] == ("::6" if family == socket.AF_INET6 else "127.0.0.6")
    proxy.wait_until(lambda: len(proxy.access_log()) == 1)
    entry = proxy.access_log()[0]
    assert entry["direction"] == "inbound"
    assert entry["dst"] == fmt(sip, 8080)
    assert entry["src"].startswith(fmt(cip, 0)[:-1])
    assert entry["bytes_in"] == 6000 and entry["bytes_out"] == 6000
    assert entry["reason"] == "closed" and entry["duration_ms"] >= 0
    metrics = proxy.metrics()
    assert 'sidecar_proxy_connections_total{direction="inbound"} 1' in metrics
    assert 'sidecar_proxy_bytes_total{direction="inbound",flow="upstream"} 6000' in metrics
    assert 'sidecar_proxy_connections_active{direction="inbound"} 0' in metrics


@pytest.mark.parametrize("family", FAMILIES)
def test_tproxy_inbound(topo: Topo, start_proxy: Any, serve: Any, family: int) -> None:
    topo.tproxy_inbound()
    proxy = start_proxy(topo.sns, {"mode": "tproxy", "ipv6": True})
    srv = serve(topo.sns, family, 9090)
    cip, sip = topo.ip(family)
    for _ in range(3):
        with connect(topo.cns, family, (sip, 9090)) as s:
            assert roundtrip(s, b"tproxy!") == b"tproxy!"
    assert len(srv.peers) == 3  # exactly one upstream connection per client connection (no loop)
    proxy.wait_until(lambda: len(proxy.access_log()) == 3)
    assert {e["dst"] for e in proxy.access_log()} == {fmt(sip, 9090)}
    assert proxy.stats()["connections_total"]["inbound"] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_redirect_outbound_as_proxy_uid(topo: Topo, start_proxy: Any, serve: Any, family: int) -> None:
    topo.redirect_outbound()
    proxy = start_proxy(topo.cns, {"ipv6": True}, as_uid=PROXY_UID)
    srv = serve(topo.sns, family, 7070)
    cip, sip = topo.ip(family)
    with connect(topo.cns, family, (sip, 7070)) as s:
        assert roundtrip(s, b"out" * 5000) == b"out" * 5000
    assert srv.peers[0][0] == cip  # outbound upstream is not bound to a special source
    proxy.wait_until(lambda: len(proxy.access_log()) == 1)
    entry = proxy.access_log()[0]
    assert entry["direction"] == "outbound" and entry["dst"] == fmt(sip, 7070)
    assert proxy.stats()["connections_total"] == {"inbound": 0, "outbound": 1}


@pytest.mark.parametrize("forward", ["copy", "splice"])
def test_forwarding_techniques(topo: Topo, start_proxy: Any, serve: Any, forward: str) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {}, env={"SIDECAR_PROXY_FORWARD": forward})
    assert proxy.stats()["forwarding"] == forward
    serve(topo.sns, socket.AF_INET, 8080)
    payload = bytes(range(256)) * 4096
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        assert roundtrip(s, payload) == payload


def test_half_close_both_ways(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns)

    def reply_after_eof(conn: socket.socket, _peer: Any) -> None:
        with conn:
            got = recv_all(conn)  # returns only when the client's FIN came through
            time.sleep(0.2)
            conn.sendall(b"got %d" % len(got))
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.5)

    serve(topo.sns, socket.AF_INET, 8080, reply_after_eof)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        s.sendall(b"x" * 100000)
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert recv_all(s) == b"got 100000"
        assert time.monotonic() - t0 < 0.6  # FIN from the server arrived before it closed the socket

    got: list[bytes] = []

    def server_first(conn: socket.socket, _peer: Any) -> None:
        with conn:
            conn.sendall(b"banner")
            conn.shutdown(socket.SHUT_WR)  # server done sending, still reading
            got.append(recv_all(conn))

    serve(topo.sns, socket.AF_INET, 8081, server_first)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8081)) as s:
        assert recv_all(s) == b"banner"  # EOF seen while our side is still open
        s.sendall(b"client data")  # the half-open connection still carries data upstream
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
    proxy.wait_until(lambda: len(got) == 1)
    assert got == [b"client data"], proxy.access_log()


def test_defaults_without_config_file(topo: Topo) -> None:
    """`python -m sidecar_proxy` without a config: inbound REDIRECT :15006, outbound :15001, admin :15000."""
    proc = subprocess.Popen(["ip", "netns", "exec", topo.sns, sys.executable, "-m", "sidecar_proxy"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(SRC)), cwd="/")
    try:
        deadline = time.monotonic() + 10
        body = b""
        while time.monotonic() < deadline:
            s = ns_socket(topo.sns)
            try:
                s.connect(("127.0.0.1", 15000))
                s.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
                body = recv_all(s)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
            finally:
                s.close()
        stats = json.loads(body.partition(b"\r\n\r\n")[2])
        assert stats["ready"] is True and stats["mode"] == "redirect"
        ports = {(x["direction"], x["port"], x["tproxy"]) for x in stats["listeners"]}
        assert ports == {("inbound", 15006, False), ("outbound", 15001, False)}
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
