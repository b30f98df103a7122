#!/usr/bin/env python3
"""Per-connection cost of sidecar-proxy: system calls (strace -c -f) and Python time (cProfile).

    python proxy/benchmarks/profile_conn.py [--connections N] [--log] [--cprofile FILE | --cpu ROUNDS]
                                            [--baseline SRC]

Uses run.py's topology and capture (namespaces renamed with SIDECAR_BENCH_NS). sidecar-proxy runs on
the REDIRECT inbound path, access log off or (--log) as deployed (JSON lines on stdout into an AF_UNIX
stream socket, as journald reads it); a client in the load namespace opens N connections one after the
other (`GET /` with `Connection: close` to the HAProxy responder, what wrk does) while strace counts
the proxy's system calls, including its access-log thread. Prints the calls per connection. With
--cprofile the proxy runs under cProfile instead (no strace) and the top functions by own time are
printed. With --cpu R neither: R rounds, each of N connections with the access log off and on (and from
--baseline SRC too), alternating, report the proxy's CPU seconds (user + system, every thread, from
/proc/PID/stat) per 1,000 connections; CPU time depends far less on other load than wall time.
Run as root; not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run  # noqa: E402  (proxy/benchmarks/run.py: topology, capture, contenders)

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def clients(n: int) -> None:
    for _ in range(n):
        with socket.create_connection((run.S4, run.PORT_HTTP), timeout=5) as s:
            s.sendall(REQUEST)
            while s.recv(4096):
                pass


def strace_table(text: str, n: int) -> list[tuple[str, float]]:
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            rows.append((m.group(2), int(m.group(1)) / n))
    return sorted(rows, key=lambda r: -r[1])


def cpu_rounds(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix=f"{run.NS}-prof-"))
    specs = [c for c in run.CONTENDERS if c[0] in ("sidecar-proxy", "sidecar-proxy as deployed")]
    trees = [("", run.SRC)] + ([(" (baseline)", args.baseline.resolve())] if args.baseline else [])
    rows: dict[str, list[float]] = {}
    try:
        run.setup()
        with run.servers(work):
            for r in range(args.cpu):
                for suffix, src in trees if r % 2 == 0 else list(reversed(trees)):
                    for spec in specs if r % 2 == 0 else list(reversed(specs)):
                        c = run.Contender(*spec, work, src)
                        c.start()
                        try:
                            run.in_ns(run.CNS, lambda: clients(200))  # warm up
                            cpu0 = run.cpu_seconds(c.proc)
                            run.in_ns(run.CNS, lambda: clients(args.connections))
                            time.sleep(0.2)  # (the last batch of log lines)
                            used = run.cpu_seconds(c.proc) - cpu0
                        finally:
                            c.stop()
                        rows.setdefault(spec[0] + suffix, []).append(1000 * used / args.connections)
    finally:
        run.teardown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"proxy CPU seconds per 1,000 connections ({args.connections} one after the other per round, "
          f"median of {args.cpu} rounds):")
    for name, xs in rows.items():
        print(f"  {name:<36} {run.med(xs):.3f}   (rounds {min(xs):.3f}-{max(xs):.3f})")
    for suffix, _src in trees:
        off, on = rows.get("sidecar-proxy" + suffix), rows.get("sidecar-proxy as deployed" + suffix)
        if off and on:
            print(f"  logging{suffix}: +{100 * (run.med(on) / run.med(off) - 1):.1f}% CPU per connection")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--log", action="store_true", help="access log as deployed (stdout to a stream socket)")
    how = ap.add_mutually_exclusive_group()  # what to measure; system calls counted when none is given
    how.add_argument("--cprofile", metavar="FILE", help="run the proxy under cProfile, write stats to FILE")
    how.add_argument("--trace", metavar="FILE",
                     help="write every system call of the proxy to FILE (strace -f -tt) instead of counting")
    how.add_argument("--cpu", type=int, metavar="ROUNDS",
                     help="proxy CPU per 1,000 connections, log off and on")
    ap.add_argument("--baseline", type=Path, metavar="SRC",
                    help="(--cpu) also from this sidecar-proxy src tree")
    args = ap.parse_args()
    if args.cpu:
        return cpu_rounds(args)
    work = Path(tempfile.mkdtemp(prefix=f"{run.NS}-prof-"))
    name = "sidecar-proxy as deployed" if args.log else "sidecar-proxy"
    spec = next(c for c in run.CONTENDERS if c[0] == name)
    c = run.Contender(*spec, work)
    tracer: subprocess.Popen[str] | None = None
    try:
        run.setup()
        with run.servers(work):
            c.start()
            assert c.proc is not None
            if args.cprofile:
                # restart the same command under cProfile (SIGTERM drains, run() returns, stats are written)
                cmd = c.proc.args
                c.stop()
                assert isinstance(cmd, list)
                i = cmd.index("-m")
                cmd = [*cmd[:i], "-m", "cProfile", "-o", args.cprofile, *cmd[i:]]
                c.proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(run.SRC)),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                run.wait_listen(run.SNS, run.PROXY_PORT, c.proc)
                time.sleep(0.5)
            else:
                # `ip netns exec` and taskset exec the command: the proxy is this pid
                how = ["-tt", "-o", args.trace] if args.trace else ["-c"]
                tracer = subprocess.Popen(["strace", *how, "-f", "-p", str(c.proc.pid)],
                                          stderr=subprocess.PIPE, text=True)
                time.sleep(1.0)
            t0 = time.monotonic()
            run.in_ns(run.CNS, lambda: clients(args.connections))
            elapsed = time.monotonic() - t0
            time.sleep(0.5)
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                _out, err = tracer.communicate(timeout=30)
                if args.trace:
                    print(f"{name}: {args.connections} connections in {elapsed:.1f} s; system calls in "
                          f"{args.trace}")
                else:
                    print(f"{name}: {args.connections} connections in {elapsed:.1f} s; system calls per "
                          "connection (strace -c -f, every thread of the proxy):")
                    total = 0.0
                    for call, per in strace_table(err, args.connections):
                        if per >= 0.01:
                            print(f"  {call:<16} {per:6.2f}")
                        total += per
                    print(f"  {'total':<16} {total:6.2f}")
            c.stop()
            if args.cprofile:
                stats = pstats.Stats(args.cprofile)
                print(f"{name}: {args.connections} connections in {elapsed:.1f} s; cProfile, by own time:")
                stats.sort_stats("tottime").print_stats(25)
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
        c.stop()
        run.teardown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
