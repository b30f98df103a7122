"""The asyncio benchmark contender (benchmarks/aio_proxy.py) forwards correctly (root only).

It is not part of the package, but its benchmark figures mean something only if it does the same job:
bulk integrity, half-close, backpressure, resets, TPROXY, SO_REUSEPORT workers. Each test runs on the
default asyncio loop and on uvloop; the uvloop cases skip when the interpreter has no uvloop
(AIO_PROXY_PYTHON=/path/to/python picks another interpreter for the proxy, e.g. the benchmark venv).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SRC, Topo, connect, recv_all

SCRIPT = SRC.parent / "benchmarks" / "aio_proxy.py"
PYTHON = os.environ.get("AIO_PROXY_PYTHON", sys.executable)
MiB = 1 << 20
LOOPS = [pytest.param("asyncio", id="asyncio"), pytest.param("uvloop", id="uvloop")]


def has_uvloop() -> bool:
    return subprocess.run([PYTHON, "-c", "import uvloop"], capture_output=True).returncode == 0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class AioProxy:
    def __init__(self, ns: str, loop: str, tmp: Path, *args: str) -> None:
        self.ns = ns
        self.log = tmp / f"aio-{loop}.stderr"
        with open(self.log, "wb") as err:
            cmd = ["ip", "netns", "exec", ns, PYTHON, str(SCRIPT), "--loop", loop, *args]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        while self.listeners() == 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aio_proxy did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def listeners(self) -> int:
        out = subprocess.run(["ip", "netns", "exec", self.ns, "ss", "-Hltn", "sport = :15006"],
                             capture_output=True, text=True).stdout
        return len(out.splitlines())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.log.read_text()


@pytest.fixture
def start_aio(tmp_path: Path) -> Iterator[Callable[..., AioProxy]]:
    started: list[AioProxy] = []

    def start(ns: str, loop: str, *args: str) -> AioProxy:
        if loop == "uvloop" and not has_uvloop():
            pytest.skip(f"uvloop not importable by {PYTHON}")
        p = AioProxy(ns, loop, tmp_path, *args)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            log = p.stop()
            assert "Traceback" not in log, log  # no exception escaped a callback


def digest_of(sock: socket.socket) -> str:
    h = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(buf)
        if not n:
            return h.hexdigest()
        h.update(view[:n])


@pytest.mark.parametrize("loop", LOOPS)
def test_64_mib_each_way_sha256(topo: Topo, start_aio: Any, serve: Any, loop: str) -> None:
    topo.redirect_inbound()
    start_aio(topo.sns, loop)
    block = os.urandom(MiB)
    count = 64
    want = hashlib.sha256(block * count).hexdigest()
    got: dict[str, str] = {}

    def sender(sock: socket.socket) -> None:
        for _ in range(count):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)

    def app(conn: socket.socket, _peer: Any) -> None:
        t = threading.Thread(target=sender, args=(conn,))
        t.start()
        got["server"] = digest_of(conn)
        t.join()
        conn.close()

    srv = serve(topo.sns, socket.AF_INET, 8080, app)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080), timeout=30) as s:
        t = threading.Thread(target=sender, args=(s,))
        t.start()
        got["client"] = digest_of(s)
        t.join()
    deadline = time.monotonic() + 10
    while "server" not in got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == {"client": want, "server": want}
    assert srv.peers[0][0] == "127.0.0.6"  # passthrough source, as sidecar-proxy


@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_both_ways(topo: Topo, start_aio: Any, serve: Any, loop: str) -> None:
    topo.redirect_inbound()
    start_aio(topo.sns, loop)

    def reply_after_eof(conn: socket.socket, _peer: Any) -> None:
        with conn:
            got = recv_all(conn)  # returns only when the client's FIN came through
            time.sleep(0.2)
            conn.sendall(b"got %d" % len(got))
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.5)

    serve(topo.sns, socket.AF_INET, 8080, reply_after_eof)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        s.sendall(b"x" * 1000000)
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert recv_all(s) == b"got 1000000"
        assert time.monotonic() - t0 < 0.6  # the server's FIN arrived before it closed the socket

    got: list[bytes] = []

    def server_first(conn: socket.socket, _peer: Any) -> None:
        with conn:
            conn.sendall(b"banner")
            conn.shutdown(socket.SHUT_WR)  # server done sending, still reading
            got.append(recv_all(conn))

    serve(topo.sns, socket.AF_INET, 8081, server_first)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8081)) as s:
        assert recv_all(s) == b"banner"
        s.sendall(b"client data")  # the half-open connection still carries data upstream
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == [b"client data"]


@pytest.mark.parametrize("loop", LOOPS)
def test_backpressure_bounds_memory(topo: Topo, start_aio: Any, serve: Any, loop: str) -> None:
    topo.redirect_inbound()
    proxy = start_aio(topo.sns, loop)
    total = 256 * MiB
    block = b"z" * MiB

    def flood(conn: socket.socket, _peer: Any) -> None:
        with conn:
            for _ in range(total // MiB):
                conn.sendall(block)
            conn.shutdown(socket.SHUT_WR)

    serve(topo.sns, socket.AF_INET, 8080, flood)
    base = rss_kb(proxy.proc.pid)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert s.recv(1)
        time.sleep(1.5)  # the client reads nothing: the server must be held back, not buffered
        assert proxy.proc.poll() is None, (proxy.proc.returncode, proxy.log.read_text())
        grown = rss_kb(proxy.proc.pid) - base
        n = 1
        while chunk := s.recv(MiB):
            n += len(chunk)
    assert n == total
    assert grown < 8 * 1024, f"RSS grew {grown} KiB while the client did not read"


@pytest.mark.parametrize("loop", LOOPS)
def test_resets(topo: Topo, start_aio: Any, serve: Any, loop: str) -> None:
    topo.redirect_inbound()
    start_aio(topo.sns, loop)
    # nothing listens upstream: the client is reset
    with pytest.raises(ConnectionResetError), connect(topo.cns, socket.AF_INET, (topo.s4, 7777)) as s:
        s.recv(1)

    def die(conn: socket.socket, _peer: Any) -> None:
        conn.sendall(b"d" * 200000)
        time.sleep(0.3)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST

    serve(topo.sns, socket.AF_INET, 8080, die)
    got = 0
    with pytest.raises(ConnectionResetError), connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        while chunk := s.recv(65536):  # a clean EOF would be wrong: the upstream reset
            got += len(chunk)
    assert got == 200000

    seen: list[str] = []

    def hold(conn: socket.socket, _peer: Any) -> None:
        try:
            while conn.recv(65536):
                pass
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    serve(topo.sns, socket.AF_INET, 8081, hold)
    s = connect(topo.cns, socket.AF_INET, (topo.s4, 8081))
    s.sendall(b"x")
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == ["reset"]


@pytest.mark.parametrize("loop", LOOPS)
def test_tproxy_and_reuseport_workers(topo: Topo, start_aio: Any, serve: Any, loop: str) -> None:
    topo.tproxy_inbound()
    proxy = start_aio(topo.sns, loop, "--mode", "tproxy", "--workers", "2")
    deadline = time.monotonic() + 10
    while proxy.listeners() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.listeners() == 2  # one SO_REUSEPORT listener per worker
    srv = serve(topo.sns, socket.AF_INET, 9090)
    for i in range(40):
        with connect(topo.cns, socket.AF_INET, (topo.s4, 9090)) as s:
            s.sendall(b"tproxy %d" % i)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"tproxy %d" % i
    assert len(srv.peers) == 40  # one upstream connection per client connection (no loop)
    # the parent stops its workers on SIGTERM
    children = Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children").read_text().split()
    assert len(children) == 2
    proxy.stop()
    for pid in children:
        with contextlib.suppress(FileNotFoundError):
            assert Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0
