#!/usr/bin/python3
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Probe traffic for the sidecar.intercept fleet playbooks (stdlib only, Python 3.7+).

Subcommands (each prints one JSON object on stdout and exits 0 unless the arguments are bad;
the playbook decides what counts as a failure):

  serve --port P                 the probe application: a tiny TCP echo service (systemd unit
                                 sidecar-probe.service); replies "sidecar-probe <hostname> <line>"
  snapshot --admin-port N        the proxy's counters (/stats) and the host's clock, taken before
                                 probing
  connect --host H --port P      open --count connections to H:P, send one line, read the reply
                                 (--as-gid G: as the proxy's GID, bypassing this host's own capture)
  evidence --admin-port N --since T --expect DIRECTION=IP:PORT ...
                                 wait until the proxy's counters grew and its access log (journal
                                 of sidecar-proxy.service) has a line per expectation with that
                                 direction and original destination
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request

# access-log reasons that mean the destination never answered (connect_refused is an answer: the
# path there and back works, only nothing listens, as on a peer that has no probe app yet)
FAILED_REASONS = ("connect_timeout", "connect_error", "original_dst", "loop", "limit")


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- serve
class _Echo(socketserver.StreamRequestHandler):
    timeout = 10

    def handle(self) -> None:
        try:
            line = self.rfile.readline(256).decode("utf-8", "replace").strip()
            reply = f"sidecar-probe {socket.gethostname()} {line}\n"
            self.wfile.write(reply.encode())
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(port: int) -> int:
    servers = []
    v6 = socket.has_ipv6
    if v6:
        try:
            class _Server6(_Server):
                address_family = socket.AF_INET6

                def server_bind(self) -> None:
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    super().server_bind()

            servers.append(_Server6(("::", port), _Echo))
        except OSError:
            pass
    servers.append(_Server(("0.0.0.0", port), _Echo))
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


# ----------------------------------------------------------------------------- proxy admin
def stats(admin_port: int, timeout: float = 3.0) -> dict:
    url = f"http://127.0.0.1:{admin_port}/stats"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def counters(admin_port: int) -> dict:
    try:
        return dict(stats(admin_port).get("connections_total", {}))
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}


def snapshot(admin_port: int) -> int:
    emit({"time": round(time.time() - 1.0, 3), "connections_total": counters(admin_port)})
    return 0


# ----------------------------------------------------------------------------- connect
def open_socket(host: str, port: int, timeout: float, as_gid: int | None) -> socket.socket:
    """Connect; with as_gid (root only) the socket is created with that effective GID, so that an
    owner match for the proxy's GID lets it pass this host's own outbound capture: an inbound probe
    then tests the target's inbound path only, not the sender's outbound path too."""
    if as_gid is None or os.geteuid() != 0:
        return socket.create_connection((host, port), timeout=timeout)
    saved = os.getegid()
    os.setegid(as_gid)
    try:
        return socket.create_connection((host, port), timeout=timeout)
    finally:
        os.setegid(saved)


def connect(host: str, port: int, count: int, timeout: float, as_gid: int | None = None) -> int:
    results = []
    for i in range(count):
        t0 = time.monotonic()
        item = {"n": i, "ok": False, "reply": "", "error": ""}
        try:
            with open_socket(host, port, timeout, as_gid) as sock:
                item["local"] = "{}:{}".format(*sock.getsockname()[:2])
                sock.sendall(b"probe-%d\n" % i)
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while len(data) < 4096:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                item["reply"] = data.decode("utf-8", "replace").strip()
                item["ok"] = True
        except OSError as exc:
            item["error"] = f"{type(exc).__name__}: {exc}"
        item["ms"] = round((time.monotonic() - t0) * 1000.0, 1)
        results.append(item)
    emit({
        "target": f"{host}:{port}",
        "connected": sum(1 for r in results if r["ok"]),
        "replied": sum(1 for r in results if r["reply"].startswith("sidecar-probe")),
        "results": results,
    })
    return 0


# ----------------------------------------------------------------------------- evidence
def journal_lines(since: float, unit: str) -> list:
    cmd = ["journalctl", "--no-pager", "-o", "cat", "-u", unit, "--since", f"@{int(since)}"]
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=15,
                             env={"LC_ALL": "C", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    entries = []
    for line in out.stdout.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "direction" in obj:
            entries.append(obj)
    return entries


def evidence(admin_port: int, since: float, before: dict, expect: list, wait: float, unit: str,
             use_log: bool) -> int:
    wanted = []
    for spec in expect:
        direction, _sep, dst = spec.partition("=")
        wanted.append({"direction": direction, "dst": dst})
    need = {}
    for w in wanted:
        need[w["direction"]] = need.get(w["direction"], 0) + 1
    deadline = time.monotonic() + wait
    while True:
        now = counters(admin_port)
        delta = {}
        for d in need:
            try:
                delta[d] = int(now.get(d, 0)) - int(before.get(d, 0))
            except (TypeError, ValueError):
                delta[d] = 0
        counters_ok = "error" not in now and all(delta[d] >= n for d, n in need.items())
        found = []
        missing = []
        if use_log:
            entries = journal_lines(since, unit)
            for w in wanted:
                hit = [e for e in entries if e.get("direction") == w["direction"] and e.get("dst") == w["dst"]]
                good = [e for e in hit if e.get("reason") not in FAILED_REASONS]
                (found if good else missing).append(dict(w, lines=(good or hit)[-3:]))
        log_ok = not missing
        if (counters_ok and log_ok) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    problems = []
    if "error" in now:
        problems.append("proxy admin /stats unreachable: {}".format(now["error"]))
    for d, n in need.items():
        if delta.get(d, 0) < n:
            problems.append(f"{d} connection counter grew by {delta.get(d, 0)}, expected at least {n}")
    for m in missing:
        if m["lines"]:
            problems.append("{} connection to {} reached the proxy but got no answer upstream ({})".format(
                m["direction"], m["dst"], ", ".join(sorted({str(e.get("reason")) for e in m["lines"]}))))
        else:
            problems.append("no {} access-log line with dst={}".format(m["direction"], m["dst"]))
    emit({
        "intercepted": not problems,
        "problems": problems,
        "counters_before": before,
        "counters_after": now,
        "delta": delta,
        "log_checked": use_log,
        "found": found,
    })
    return 0


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar-probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("snapshot")
    p.add_argument("--admin-port", type=int, required=True)
    p = sub.add_parser("connect")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--as-gid", type=int, default=None, help="create the sockets with this effective GID (root)")
    p = sub.add_parser("evidence")
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--since", type=float, required=True)
    p.add_argument("--before", default="{}", help="connections_total from snapshot, as JSON")
    p.add_argument("--expect", action="append", default=[], help="DIRECTION=IP:PORT")
    p.add_argument("--wait", type=float, default=10.0)
    p.add_argument("--unit", default="sidecar-proxy.service")
    p.add_argument("--no-log", action="store_true", help="check counters only (access log disabled)")
    args = parser.parse_args(argv)
    for port in [getattr(args, "port", 1), getattr(args, "admin_port", 1)]:
        if not 1 <= port <= 65535:
            parser.error(f"port out of range: {port}")
    if args.cmd == "serve":
        return serve(args.port)
    if args.cmd == "snapshot":
        return snapshot(args.admin_port)
    if args.cmd == "connect":
        if not 1 <= args.count <= 20:
            parser.error(f"--count must be 1..20, got {args.count}")
        return connect(args.host, args.port, args.count, args.timeout, args.as_gid)
    for spec in args.expect:
        if spec.partition("=")[0] not in ("inbound", "outbound") or not spec.partition("=")[2]:
            parser.error(f"--expect must be inbound=IP:PORT or outbound=IP:PORT, got {spec!r}")
    try:
        before = json.loads(args.before)
    except ValueError:
        parser.error(f"--before is not JSON: {args.before!r}")
    return evidence(args.admin_port, args.since, before, args.expect, args.wait, args.unit, not args.no_log)


if __name__ == "__main__":
    sys.exit(main())
