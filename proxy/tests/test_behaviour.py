"""Bulk integrity, scale, failures, backpressure, loop guard, drain and reload (root only)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Topo, connect, ns_socket, recv_all

GiB = 1 << 30
MiB = 1 << 20


def _stat(proxy: Any, *keys: str) -> Any:
    v = proxy.stats()
    for k in keys:
        v = v[k]
    return v


def test_one_gib_each_way_sha256(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns)
    block = os.urandom(MiB)
    count = GiB // MiB
    want = hashlib.sha256()
    for _ in range(count):
        want.update(block)
    results: dict[str, str] = {}
    done = threading.Event()

    def sender(sock: socket.socket) -> None:
        for _ in range(count):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)

    def digest_of(sock: socket.socket) -> str:
        h = hashlib.sha256()
        buf = bytearray(MiB)
        view = memoryview(buf)
        while True:
            n = sock.recv_into(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])

    def app(conn: socket.socket, _peer: Any) -> None:
        t = threading.Thread(target=sender, args=(conn,))
        t.start()
        results["server_got"] = digest_of(conn)
        t.join()
        conn.close()
        done.set()

    serve(topo.sns, socket.AF_INET, 8080, app)
    t0 = time.monotonic()
    s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080), timeout=60)
    t = threading.Thread(target=sender, args=(s,))
    t.start()
    client_got = digest_of(s)
    t.join()
    s.close()
    assert done.wait(60)
    elapsed = time.monotonic() - t0
    assert results.get("server_got") == want.hexdigest()
    assert client_got == want.hexdigest()
    proxy.wait_until(lambda: len(proxy.access_log()) == 1)
    entry = proxy.access_log()[0]
    assert entry["bytes_in"] == GiB and entry["bytes_out"] == GiB and entry["reason"] == "closed"
    print(f"2 GiB through the proxy in {elapsed:.1f}s")


class EpollEcho:
    """A single-threaded echo server for thousands of connections."""

    def __init__(self, ns: str, port: int) -> None:
        self.lsock = ns_socket(ns)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("0.0.0.0", port))
        self.lsock.listen(8192)
        self.lsock.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self.conns: dict[int, socket.socket] = {}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            for fd, _ev in self.ep.poll(0.1):
                if fd == self.lsock.fileno():
                    while True:
                        try:
                            c, _ = self.lsock.accept()
                        except BlockingIOError:
                            break
                        c.setblocking(False)
                        self.conns[c.fileno()] = c
                        self.ep.register(c.fileno(), select.EPOLLIN)
                    continue
                c = self.conns[fd]
                try:
                    data = c.recv(4096)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        c.send(data)
                else:
                    self.ep.unregister(fd)
                    del self.conns[fd]
                    c.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        for c in self.conns.values():
            c.close()
        self.lsock.close()
        self.ep.close()


def test_5000_concurrent_connections(topo: Topo, start_proxy: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"access_log": ""})
    server = EpollEcho(topo.sns, 8080)
    clients: list[socket.socket] = []
    n = 5000
    try:
        def open_all() -> None:
            for _ in range(n):
                s = socket.socket()
                s.settimeout(10)
                s.connect((topo.s4, 8080))
                clients.append(s)

        from conftest import in_ns

        in_ns(topo.cns, open_all)
        for i, s in enumerate(clients):
            s.sendall(struct.pack("!I", i))
        for i, s in enumerate(clients):
            assert s.recv(4) == struct.pack("!I", i)
        active = _stat(proxy, "connections_active", "inbound")
        assert active == n
        rss_held = proxy.rss_kb()
        for s in clients:
            s.close()
        clients.clear()
        proxy.wait_until(lambda: _stat(proxy, "connections_active", "inbound") == 0, timeout=20)
        assert _stat(proxy, "connections_total", "inbound") == n
        assert sum(_stat(proxy, "errors").values()) == 0
        print(f"proxy RSS with {n} connections held: {rss_held / 1024:.1f} MiB")
    finally:
        for s in clients:
            s.close()
        server.close()


def test_upstream_refused_resets_client_promptly(topo: Topo, start_proxy: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns)
    t0 = time.monotonic()
    # nothing listens there; the reset may arrive while connect() is still checking its result
    with pytest.raises(ConnectionResetError), connect(topo.cns, socket.AF_INET, (topo.s4, 8089)) as s:
        s.sendall(b"hello?")
        s.recv(10)
        s.recv(10)
    assert time.monotonic() - t0 < 1.0
    assert _stat(proxy, "errors", "connect_refused") == 1
    proxy.wait_until(lambda: [e["reason"] for e in proxy.access_log()] == ["connect_refused"])


def test_upstream_dies_mid_stream(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns)

    def die(conn: socket.socket, _peer: Any) -> None:
        conn.sendall(b"d" * 200000)
        time.sleep(0.3)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST

    serve(topo.sns, socket.AF_INET, 8080, die)
    got = 0
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError), connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break  # a clean EOF would be wrong: the upstream reset
            got += len(chunk)
    assert got == 200000
    assert time.monotonic() - t0 < 2.0
    proxy.wait_until(lambda: _stat(proxy, "errors", "upstream_reset") == 1)


def test_client_reset_resets_upstream(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns)
    seen: list[str] = []

    def hold(conn: socket.socket, _peer: Any) -> None:
        try:
            while conn.recv(65536):
                pass
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    serve(topo.sns, socket.AF_INET, 8080, hold)
    s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
    s.sendall(b"x")
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    proxy.wait_until(lambda: seen == ["reset"])
    assert _stat(proxy, "errors", "downstream_reset") == 1


@pytest.mark.parametrize("splice", [pytest.param(True, id="splice"), pytest.param(False, id="copy")])
def test_slow_reader_keeps_memory_bounded(topo: Topo, start_proxy: Any, serve: Any, splice: bool) -> None:
    topo.redirect_inbound()
    env = {"SIDECAR_PROXY_FORWARD": "splice" if splice else "copy"}
    proxy = start_proxy(topo.sns, env=env)
    sent = [0]
    stop = threading.Event()

    def firehose(conn: socket.socket, _peer: Any) -> None:
        chunk = b"f" * MiB
        conn.settimeout(0.2)
        while not stop.is_set() and sent[0] < 2 * GiB:
            try:
                sent[0] += conn.send(chunk)
            except TimeoutError:
                continue
            except OSError:
                return

    serve(topo.sns, socket.AF_INET, 8080, firehose)
    s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    rss0 = proxy.rss_kb()
    peak = rss0
    received = 0
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:  # a reader that takes 16 KiB every 50 ms
        received += len(s.recv(16384))
        peak = max(peak, proxy.rss_kb())
        time.sleep(0.05)
    stop.set()
    s.close()
    in_flight = sent[0] - received
    # what the upstream could send is bounded by socket buffers + one pipe/buffer, not by the proxy's RSS
    assert in_flight < 64 * MiB, in_flight
    assert peak - rss0 < 8 * 1024, (rss0, peak)
    print(f"slow reader: sent {sent[0] / MiB:.1f} MiB, read {received / MiB:.2f} MiB, RSS {rss0}->{peak} kB")


def test_loop_guard(topo: Topo, start_proxy: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"ipv6": True})
    # a connection aimed at the proxy's own inbound port is redirected to itself
    for family in (socket.AF_INET, socket.AF_INET6):
        _, sip = topo.ip(family)
        # (the reset may already come with connect())
        with contextlib.suppress(ConnectionResetError), connect(topo.cns, family, (sip, 15006)) as s:
            assert s.recv(10) == b""
    # a local process talking to a listener directly (no NAT): original destination is the listener
    local = ("127.0.0.1", 15001)
    with contextlib.suppress(ConnectionResetError), connect(topo.sns, socket.AF_INET, local) as s:
        assert s.recv(10) == b""
    proxy.wait_until(lambda: _stat(proxy, "errors", "loop") == 3)
    assert _stat(proxy, "connections_active") == {"inbound": 0, "outbound": 0}
    assert 'sidecar_proxy_errors_total{kind="loop"} 3' in proxy.metrics()
    proxy.wait_until(lambda: [e["reason"] for e in proxy.access_log()] == ["loop"] * 3)


def test_connect_timeout(topo: Topo, start_proxy: Any) -> None:
    topo.redirect_inbound()
    topo.sh(topo.sns, "iptables", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "--dport", "8099", "-j", "DROP")
    proxy = start_proxy(topo.sns, {"connect_timeout": 0.5})
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError), connect(topo.cns, socket.AF_INET, (topo.s4, 8099)) as s:
        s.recv(10)
    assert 0.4 < time.monotonic() - t0 < 1.5
    assert _stat(proxy, "errors", "connect_timeout") == 1


def test_idle_timeout(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"idle_timeout": 0.5})
    serve(topo.sns, socket.AF_INET, 8080)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        s.sendall(b"ping")
        assert s.recv(10) == b"ping"
        t0 = time.monotonic()
        assert s.recv(10) == b""
        assert 0.3 < time.monotonic() - t0 < 2.0
    assert _stat(proxy, "errors", "idle_timeout") == 1
    proxy.wait_until(lambda: [e["reason"] for e in proxy.access_log()] == ["idle_timeout"])


def test_connection_limit(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"max_connections": 2})
    serve(topo.sns, socket.AF_INET, 8080)
    held = [connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) for _ in range(2)]
    for s in held:
        s.sendall(b"a")
        assert s.recv(1) == b"a"
    with pytest.raises((ConnectionResetError, AssertionError)), \
            connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        s.sendall(b"b")
        assert s.recv(1) == b"b"
    assert _stat(proxy, "errors", "limit") == 1
    for s in held:
        s.close()


def test_drain_lets_active_connections_finish(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"drain_timeout": 10})
    serve(topo.sns, socket.AF_INET, 8080)
    s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
    s.sendall(b"1")
    assert s.recv(1) == b"1"
    proxy.signal(signal.SIGTERM)
    proxy.wait_until(lambda: proxy.admin("/ready")[0] == 503)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        connect(topo.cns, socket.AF_INET, (topo.s4, 8080)).close()
    s.sendall(b"2")  # the active connection still works
    assert s.recv(1) == b"2"
    assert proxy.proc.poll() is None
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b""
    s.close()
    assert proxy.proc.wait(5) == 0
    assert [e["reason"] for e in proxy.access_log()] == ["closed"]


def test_drain_deadline_closes_stragglers(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"drain_timeout": 1})
    serve(topo.sns, socket.AF_INET, 8080)
    s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
    s.sendall(b"1")
    assert s.recv(1) == b"1"
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(5) == 0
    assert 0.8 < time.monotonic() - t0 < 3
    with pytest.raises(ConnectionResetError), s:
        s.recv(1)
    assert [e["reason"] for e in proxy.access_log()] == ["drain"]


def test_reload_keeps_live_connections(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns)
    serve(topo.sns, socket.AF_INET, 8080)
    s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
    s.sendall(b"before")
    assert s.recv(6) == b"before"
    proxy.rewrite(idle_timeout=123, outbound_port=15011, log_level="debug")
    proxy.signal(signal.SIGHUP)
    proxy.wait_until(lambda: _stat(proxy, "reloads", "ok") == 1)
    stats = proxy.stats()
    assert stats["config"]["idle_timeout"] == 123 and stats["config"]["outbound_port"] == 15011
    ports = {(x["direction"], x["port"]) for x in stats["listeners"]}
    assert ports == {("inbound", 15006), ("outbound", 15011)}
    s.sendall(b"after")
    assert s.recv(5) == b"after"
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s2:  # new connections still work
        s2.sendall(b"new")
        assert s2.recv(3) == b"new"
    # switching the inbound mode rebinds the inbound port as a transparent listener
    proxy.rewrite(mode="tproxy")
    proxy.signal(signal.SIGHUP)
    proxy.wait_until(lambda: _stat(proxy, "reloads", "ok") == 2)
    assert {(x["direction"], x["tproxy"]) for x in proxy.stats()["listeners"]} == {
        ("inbound", True), ("outbound", False)}
    s.sendall(b"mode!")
    assert s.recv(5) == b"mode!"
    # a bad file on reload keeps the running configuration
    proxy.path.write_text('{"inbound_port": "nope"}')
    proxy.signal(signal.SIGHUP)
    proxy.wait_until(lambda: _stat(proxy, "reloads", "failed") == 1)
    assert proxy.admin("/ready")[0] == 200
    s.sendall(b"still")
    assert s.recv(5) == b"still"
    s.close()
    assert "inbound_port" in proxy.log_path.read_text()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_fd_exhaustion_pauses_and_recovers(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"access_log": ""}, nofile=64)
    serve(topo.sns, socket.AF_INET, 8080)
    held: list[socket.socket] = []
    try:
        for _ in range(40):  # 2 fds each in the proxy: more than the proxy can hold
            # a reset from the proxy (no fd left for the upstream socket) is expected here
            with contextlib.suppress(OSError):
                held.append(connect(topo.cns, socket.AF_INET, (topo.s4, 8080), timeout=2))
        time.sleep(0.5)
        assert proxy.proc.poll() is None
        cpu0 = cpu_ticks(proxy.proc.pid)
        time.sleep(1.0)
        assert cpu_ticks(proxy.proc.pid) - cpu0 < 50  # no busy loop (10 ms ticks)
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        s.sendall(b"back")
        assert s.recv(4) == b"back"
    errors = _stat(proxy, "errors")
    assert errors["accept"] + errors["connect_error"] >= 1


def test_stalled_access_log_sink_does_not_stall_traffic(topo: Topo, start_proxy: Any, serve: Any,
                                                       tmp_path: Path) -> None:
    """The access log goes to a pipe nobody reads (journald stalled): connections keep flowing,
    the lines that do not fit the bounded queue are dropped and counted, the rest arrive later."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, not read: the pipe fills up
    try:
        topo.redirect_inbound()
        proxy = start_proxy(topo.sns, {"access_log": str(fifo)},
                            env={"SIDECAR_PROXY_ACCESS_LOG_QUEUE": "32768"})

        def reply(conn: socket.socket, _peer: Any) -> None:
            with conn:
                conn.sendall(b"ok")

        serve(topo.sns, socket.AF_INET, 8080, reply)
        total = 1200  # ~200 bytes a line: far more than the 64 KiB pipe plus the 32 KiB queue hold
        for _ in range(total):
            s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
            s.settimeout(5)  # a loop blocked on the log would hang here
            with s:
                assert recv_all(s) == b"ok"
        proxy.wait_until(lambda: _stat(proxy, "connections_active") == {"inbound": 0, "outbound": 0})
        dropped = _stat(proxy, "access_log_dropped")
        assert 0 < dropped < total
        assert f"sidecar_proxy_access_log_dropped_total {dropped}" in proxy.metrics()
        # once the reader drains the pipe, every line that was not dropped arrives, whole
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"\n") < total - dropped and time.monotonic() < deadline:
            select.select([reader], [], [], 0.2)
            with contextlib.suppress(BlockingIOError):
                data += os.read(reader, 1 << 20)
        lines = data.decode().splitlines()
        assert len(lines) == total - dropped
        assert all(json.loads(line)["reason"] == "closed" for line in lines)
    finally:
        os.close(reader)
