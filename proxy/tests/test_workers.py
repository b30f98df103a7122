"""Workers: the `workers` setting, the CPU count for "auto", and a supervisor with 2 real worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PROXY_UID, SRC, Topo, connect, recv_all
from test_activation import passed_set

from sidecar_proxy.accesslog import AccessLog
from sidecar_proxy.config import ConfigError, validate
from sidecar_proxy.workers import available_cpus, cgroup_cpus, quota_cpus


# ---------------------------------------------------------------------------- setting and CPU count
@pytest.mark.parametrize("value", [0, -1, 1025, "many", "2", True, 1.5, None])
def test_a_bad_workers_value_is_named(value: Any) -> None:
    named = r"invalid value for 'workers': " + json.dumps(value).replace(".", r"\.")
    with pytest.raises(ConfigError, match=named):
        validate({"workers": value})


@pytest.mark.parametrize("value", ["auto", 1, 2, 1024])
def test_good_workers_values(value: Any) -> None:
    assert validate({"workers": value}).workers == value


def test_check_config_names_a_bad_workers_value(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"workers": "lots"}')
    res = subprocess.run([sys.executable, "-m", "sidecar_proxy", "--check-config", str(path)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert res.returncode == 1
    assert "invalid value for 'workers': \"lots\" (must be \"auto\" or an integer 1-1024)" in res.stderr


@pytest.mark.parametrize(("cpu_max", "cpus"), [
    ("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("200000 100000", 2),
    ("100001 100000", 2), ("", None), ("garbage", None), ("0 100000", None),
])
def test_quota_parser(cpu_max: str, cpus: int | None) -> None:
    assert quota_cpus(cpu_max) == cpus


def fake_cgroup(tmp_path: Path, limits: dict[str, str]) -> tuple[str, str]:
    """A cgroup v2 tree under tmp_path with cpu.max files, and a /proc/self/cgroup naming /a/b."""
    for rel, text in limits.items():
        d = tmp_path / "root" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text)
    (tmp_path / "root" / "a" / "b").mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    return str(proc), str(tmp_path / "root")


def test_auto_honours_the_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    proc, root = fake_cgroup(tmp_path, {"a/b": "max 100000\n", "a": "50000 100000\n"})
    assert cgroup_cpus(proc, root) == 1  # a parent's quota binds the child too
    assert available_cpus(proc, root) == 1
    proc, root = fake_cgroup(tmp_path / "2", {"a/b": "max 100000\n"})
    assert cgroup_cpus(proc, root) is None
    assert available_cpus(proc, root) == affinity  # no quota: the affinity mask
    proc, root = fake_cgroup(tmp_path / "3", {"a/b": f"{(affinity + 8) * 100000} 100000\n"})
    assert available_cpus(proc, root) == affinity  # a quota above the CPUs there does not add any
    assert available_cpus(str(tmp_path / "missing"), root) == affinity


# ---------------------------------------------------------------------------- one sink, several writers
def test_writers_sharing_a_pipe_never_interleave_mid_line() -> None:
    r, w = os.pipe()
    got = bytearray()

    def read() -> None:
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    sinks = [AccessLog("-", 64 << 20, whole_lines=True) for _ in range(3)]
    for sink in sinks:
        sink.fd = w  # (stdout stands for the journal's stream: any shared pipe)
    lines = {n: [json.dumps({"w": n, "i": i, "pad": "x" * (100 + i % 500)}) for i in range(3000)]
             for n in range(3)}
    threads = [threading.Thread(target=sink.submit, args=(lines[n],)) for n, sink in enumerate(sinks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sink in sinks:
        assert sink.wait_empty(10)
    os.close(w)
    reader.join(10)
    os.close(r)
    seen = [json.loads(line) for line in got.decode().splitlines()]  # a torn line would not parse
    assert len(seen) == 9000
    for n in range(3):
        assert [x["i"] for x in seen if x["w"] == n] == list(range(3000))


# ---------------------------------------------------------------------------- real workers
def current(proxy: Any) -> list[dict[str, Any]]:
    return [w for w in proxy.stats()["worker_processes"] if w["position"] is not None]


def pids(proxy: Any) -> set[int]:
    return {w["pid"] for w in current(proxy)}


def wait_workers(proxy: Any, count: int = 2, other_than: set[int] | frozenset[int] = frozenset()) -> set[int]:
    """Wait until `count` current workers, none of them in `other_than`, are ready; their pids."""
    def ok() -> bool:
        now = current(proxy)
        return (len(now) == count and all(w["ready"] for w in now) and not pids(proxy) & other_than
                and proxy.admin("/ready")[0] == 200)

    proxy.wait_until(ok, timeout=10)
    return pids(proxy)


def roundtrip(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    return recv_all(s)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def only(proc_pids: set[int], keep: int) -> Any:
    """Stop every worker but `keep`: new connections can only land on that one."""
    stopped = [p for p in proc_pids if p != keep]
    for p in stopped:
        os.kill(p, signal.SIGSTOP)
    try:
        for p in stopped:  # (kill() returns before the process has stopped: it could still accept)
            deadline = time.monotonic() + 5
            while state(p) != "T" and time.monotonic() < deadline:
                time.sleep(0.01)
        yield
    finally:
        for p in stopped:
            os.kill(p, signal.SIGCONT)


def test_two_workers_take_both_listeners_and_the_figures_are_their_sums(topo: Topo, start_proxy: Any,
                                                                         serve: Any) -> None:
    # the proxy and both captures in one namespace: inbound from the other side, outbound from here
    topo.capture(topo.cns, sidecar_proxy_uid=PROXY_UID)
    proxy = start_proxy(topo.cns, {"workers": 2, "metrics_address": "127.0.0.1"}, as_uid=PROXY_UID)
    app = serve(topo.cns, socket.AF_INET, 8080)
    far = serve(topo.sns, socket.AF_INET, 7070)
    workers = wait_workers(proxy)
    supervisor = proxy.proc.pid
    assert all(int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == supervisor
               for p in workers)
    payload = b"w" * 10000
    for keep in sorted(workers):
        with only(workers, keep):
            for _ in range(3):
                with connect(topo.sns, socket.AF_INET, (topo.c4, 8080)) as s:
                    assert roundtrip(s, payload) == payload
                with connect(topo.cns, socket.AF_INET, (topo.s4, 7070)) as s:
                    assert roundtrip(s, payload) == payload
    assert len(app.peers) == 6 and len(far.peers) == 6  # one upstream per client connection
    proxy.wait_until(lambda: proxy.stats()["connections_total"] == {"inbound": 6, "outbound": 6})
    rows = {w["pid"]: w for w in current(proxy)}
    assert set(rows) == workers and supervisor not in rows
    for row in rows.values():  # each worker took 3 of each
        assert row["connections_total"] == {"inbound": 3, "outbound": 3}
    stats = proxy.stats()
    assert stats["workers"] == 2
    assert stats["bytes_total"]["inbound_upstream"] == 6 * len(payload)
    assert stats["bytes_total"]["outbound_downstream"] == 6 * len(payload)
    metrics = proxy.metrics()
    assert 'sidecar_proxy_connections_total{direction="inbound"} 6' in metrics
    assert 'sidecar_proxy_connections_total{direction="outbound"} 6' in metrics
    assert "sidecar_proxy_upstream_connect_seconds_count 12" in metrics
    assert "sidecar_proxy_workers 2" in metrics and "sidecar_proxy_ready 1" in metrics
    with connect(topo.cns, socket.AF_INET, ("127.0.0.1", 15090)) as s:  # the metrics listener: the same sums
        scraped = roundtrip(s, b"GET /metrics HTTP/1.0\r\n\r\n").decode()
    assert 'sidecar_proxy_connections_total{direction="outbound"} 6' in scraped
    proxy.wait_until(lambda: len(proxy.access_log()) == 12)  # both workers' lines, whole, in one file
    assert sorted(e["direction"] for e in proxy.access_log()) == ["inbound"] * 6 + ["outbound"] * 6


def test_a_read_counts_every_connection_that_ended_before_it(topo: Topo, start_proxy: Any,
                                                              serve: Any) -> None:
    # A worker publishes its figures in batches; a /stats or /metrics read must still count a connection
    # whose access-log line is already written (the rollout probe checks both one after the other).
    topo.capture(topo.cns, sidecar_proxy_uid=PROXY_UID)
    proxy = start_proxy(topo.cns, {"workers": 2}, as_uid=PROXY_UID)
    serve(topo.sns, socket.AF_INET, 7070)
    workers = wait_workers(proxy)
    keep = min(workers)
    made = 0
    with only(workers, keep):
        for _round in range(5):
            time.sleep(0.3)  # the worker goes idle
            for _ in range(2):  # two quick connections: the second ends right after a publication
                with connect(topo.cns, socket.AF_INET, (topo.s4, 7070)) as s:
                    assert roundtrip(s, b"x") == b"x"
                made += 1
            proxy.wait_until(lambda n=made: len(proxy.access_log()) == n)
            assert proxy.stats()["connections_total"]["outbound"] == made
            assert f'sidecar_proxy_connections_total{{direction="outbound"}} {made}' in proxy.metrics()


def test_reload_replaces_all_workers_and_a_bad_file_keeps_them(topo: Topo, start_proxy: Any, serve: Any,
                                                               tmp_path: Path) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"workers": 2})
    serve(topo.sns, socket.AF_INET, 8080)
    old = wait_workers(proxy)
    live = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
    live.sendall(b"before")
    assert live.recv(6) == b"before"
    first_log = Path(proxy.cfg["access_log"])
    second_log = tmp_path / "second.log"
    proxy.rewrite(access_log=str(second_log), idle_timeout=77, workers=3)
    proxy.signal(signal.SIGHUP)
    new = wait_workers(proxy, other_than=old)  # (still 2: the count is read at start)
    assert proxy.stats()["reloads"]["ok"] == 1 and proxy.stats()["config"]["idle_timeout"] == 77
    assert "workers changed from 2 to 3: that takes effect at the next start" in proxy.log_path.read_text()
    # the connection in flight went on through its (replaced, draining) worker
    live.sendall(b"after")
    live.shutdown(socket.SHUT_WR)
    assert recv_all(live) == b"after"
    live.close()
    for keep in sorted(new):  # every new worker writes to the new file
        with only(new, keep), connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
            assert roundtrip(s, b"new") == b"new"
    proxy.wait_until(lambda: len(second_log.read_text().splitlines()) == 2 if second_log.exists() else False)
    proxy.wait_until(lambda: len(first_log.read_text().splitlines()) == 1)  # the drained worker's line
    proxy.wait_until(lambda: not (pids(proxy) ^ new) and len(proxy.stats()["worker_processes"]) == 2)
    # a bad file: nothing changes, the same workers keep serving
    proxy.path.write_text('{"workers": "many"}')
    proxy.signal(signal.SIGHUP)
    proxy.wait_until(lambda: proxy.stats()["reloads"]["failed"] == 1)
    assert pids(proxy) == new and proxy.admin("/ready")[0] == 200
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
        assert roundtrip(s, b"kept") == b"kept"
    assert "invalid value for 'workers': \"many\"" in proxy.log_path.read_text()


def test_a_killed_worker_is_replaced_and_connections_keep_succeeding(topo: Topo, start_proxy: Any,
                                                                     serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"workers": 2})
    serve(topo.sns, socket.AF_INET, 8080)
    before = wait_workers(proxy)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    made = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # meanwhile, and after: every connection is served
        with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
            assert roundtrip(s, b"%d" % made) == b"%d" % made
        made += 1
        now = current(proxy)
        if len(now) == 2 and victim not in {w["pid"] for w in now} and all(w["ready"] for w in now):
            break
    after = wait_workers(proxy, other_than={victim})
    assert len(after & before) == 1
    for keep in sorted(after):
        with only(after, keep), connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
            assert roundtrip(s, b"again") == b"again"
    proxy.wait_until(lambda: proxy.stats()["connections_total"]["inbound"] >= made + 2)
    assert f"(pid {victim}) died (signal 9); starting another in" in proxy.log_path.read_text()


def test_sigterm_drains_every_worker(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"workers": 2, "drain_timeout": 10})
    serve(topo.sns, socket.AF_INET, 8080)
    workers = wait_workers(proxy)
    flights = []
    for keep in sorted(workers):  # one connection in flight on each worker
        with only(workers, keep):
            s = connect(topo.cns, socket.AF_INET, (topo.s4, 8080))
            s.sendall(b"one")
            assert s.recv(3) == b"one"
            flights.append(s)
    proxy.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proxy.proc.poll() is None  # still draining
    for s in flights:
        s.sendall(b"two")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"two"
        s.close()
    assert proxy.proc.wait(10) == 0
    for p in workers:
        assert not Path(f"/proc/{p}").exists() or state(p) == "Z"
    assert sorted(e["reason"] for e in proxy.access_log()) == ["closed", "closed"]


def test_two_workers_on_socket_activated_listeners(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.redirect_inbound()
    passed = passed_set(topo.sns, tproxy=False)
    try:
        proxy = start_proxy(topo.sns, {"ipv6": True, "workers": 2}, passed=passed)
        serve(topo.sns, socket.AF_INET, 8080)
        workers = wait_workers(proxy)
        for keep in sorted(workers):
            with only(workers, keep), connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
                assert roundtrip(s, b"activated") == b"activated"
        assert {x["activated"] for x in proxy.stats()["listeners"]} == {"inbound", "outbound"}
        proxy.wait_until(lambda: all(w["connections_total"]["inbound"] == 1 for w in current(proxy)))
        assert "socket activation: 4 passed sockets" in proxy.log_path.read_text()
    finally:
        for _, s in passed:
            s.close()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.parametrize("workers", [1, 2])
def test_an_idle_proxy_sleeps_after_serving(topo: Topo, start_proxy: Any, workers: int) -> None:
    # Only a worker shortens its poll timeout to publish figures; a single process (or the supervisor)
    # that did so after its first event polled with a zero timeout forever, a busy loop on an idle host.
    proxy = start_proxy(topo.sns, {"workers": workers})
    if workers > 1:
        wait_workers(proxy)
    for _ in range(3):
        proxy.stats()  # events on the admin socket (the supervisor's, with workers)
    time.sleep(0.3)
    before = cpu_ticks(proxy.proc.pid)
    time.sleep(2.0)
    used = (cpu_ticks(proxy.proc.pid) - before) / os.sysconf("SC_CLK_TCK")
    assert used < 0.2, f"the idle proxy (pid {proxy.proc.pid}) used {used:.2f} s of CPU in 2 s"
