"""The access-log line encoder and the hand-over of lines to the writer thread."""

from __future__ import annotations

import datetime
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Topo, connect, recv_all

from sidecar_proxy.accesslog import LOG_DELAY, entry_line


def reference_line(t0: float, direction: str, src: str, dst: str | None, bytes_in: int, bytes_out: int,
                   duration_ms: float, reason: str) -> str:
    """The format as it was first written (json.dumps of a dict): entry_line must match it byte for byte."""
    start = datetime.datetime.fromtimestamp(t0, datetime.timezone.utc)
    return json.dumps({
        "start_time": start.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "direction": direction, "src": src, "dst": dst, "bytes_in": bytes_in, "bytes_out": bytes_out,
        "duration_ms": round(duration_ms, 3), "reason": reason,
    }, separators=(",", ":"))


EDGE_TIMES = [0.0, 1.0, 1764771233.0, 1764771233.9995, 1764771233.0005, 1764771233.9999995,
              1764771233.0000005, 1764771233.999, 1764771233.0015, 4102444799.9999996, 951782400.5]
ODD_TEXT = ["10.0.0.1:80", "[fd00::1]:443", "[fe80::1%eth0]:22", '[fe80::1%we"ird\\]:1', "\x01\x1f",
            "caf\u00e9", "\u2028", "\ud83d\ude00", ""]


@pytest.mark.parametrize("t0", EDGE_TIMES)
def test_entry_line_is_byte_for_byte_json_dumps_at_edges(t0: float) -> None:
    for dst in (None, "10.1.2.3:8080"):
        args = (t0, "inbound", "10.1.2.4:40000", dst, 46, 85, 0.4565, "closed")
        assert entry_line(*args) == reference_line(*args)


def test_entry_line_is_byte_for_byte_json_dumps_on_random_entries() -> None:
    rng = random.Random(12)
    now = time.time()
    for _ in range(20000):
        t0 = rng.choice([now + rng.uniform(-1e6, 1e6), float(rng.randrange(0, 4 * 10**9)) + rng.random(),
                         round(now, rng.randrange(0, 7))])
        args = (t0, rng.choice(["inbound", "outbound"]), rng.choice(ODD_TEXT),
                rng.choice([None, *ODD_TEXT]), rng.randrange(0, 1 << 40), rng.randrange(0, 1 << 40),
                rng.choice([0.0, rng.uniform(0, 1e7), rng.random() / 1000, float(rng.randrange(0, 10**6))]),
                rng.choice(["closed", "idle_timeout", "connect_refused", "drain", "loop"]))
        assert entry_line(*args) == reference_line(*args), args


def write_calls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise RuntimeError("no syscw")


def test_lines_of_many_connections_are_whole_in_order_and_written_in_batches(topo: Topo, start_proxy: Any,
                                                                            serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns)
    serve(topo.sns, socket.AF_INET, 8080)
    n = 150
    time.sleep(0.3)
    writes0 = write_calls(proxy.proc.pid)
    ports = []
    t0 = time.monotonic()
    for _ in range(n):  # one after the other: each connection ends in its own loop iteration
        with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
            ports.append(s.getsockname()[1])
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"x"
    elapsed = time.monotonic() - t0
    proxy.wait_until(lambda: len(proxy.access_log()) == n)  # every line whole (json.loads each)
    assert [e["src"] for e in proxy.access_log()] == [f"{topo.c4}:{p}" for p in ports]  # in order
    assert {e["reason"] for e in proxy.access_log()} == {"closed"}
    # forwarding writes 2 per connection (request, echo); the log's writer thread at most one per batch,
    # and a batch waits up to LOG_DELAY (one write per connection before batching: 3n)
    log_writes = write_calls(proxy.proc.pid) - writes0 - 2 * n
    assert log_writes <= elapsed / LOG_DELAY + 5 and log_writes < n / 2, (log_writes, elapsed)

    # many connections that end in one loop iteration: all their lines, whole, none lost
    socks = []
    for _ in range(200):
        s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
        s.sendall(b"y")
        assert s.recv(1) == b"y"
        socks.append(s)
    burst = {f"{topo.c4}:{s.getsockname()[1]}" for s in socks}
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    for s in socks:
        s.close()
    proxy.wait_until(lambda: len(proxy.access_log()) == n + 200)
    assert {e["src"] for e in proxy.access_log()[n:]} == burst
    assert _stat_dropped(proxy) == 0


def _stat_dropped(proxy: Any) -> int:
    return int(proxy.stats()["access_log_dropped"])
