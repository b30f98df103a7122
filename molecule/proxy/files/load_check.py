"""Continuous-load check for restarts, reloads, upgrades and rollbacks of sidecar-proxy (standard library only).

  app    --inbound-port P --outbound-port Q
         the test applications: each connection sends one id line; the app answers "<id> <peer ip>"
  client --path NAME --target IP:PORT --rate R --out FILE --stop FILE [--max-seconds S]
         opens R connections per second to TARGET until FILE exists; one JSON line per connection:
         id, t0, t1, local address, ok/error, the peer address the app saw
  report --results FILE... --journal HOST=FILE... --events FILE
         matches every connection with the proxy's access log (journal) of the host whose proxy it went
         through; prints the counts per host, path and event; exit 1 unless 0 failed and 0 bypassed

A connection is failed when it was refused, reset or timed out or got a wrong answer; it is bypassed when
the proxy's access log has no entry for it (same direction, source and destination), or, inbound, when the
app saw the client's address instead of the proxy's passthrough source.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import errno
import json
import os
import socket
import selectors
import sys
import time
from typing import Any

PASSTHROUGH = "127.0.0.6"


# ------------------------------------------------------------------------------------------- app
# One thread each, non-blocking sockets with selectors: on a busy host a thread per connection runs into
# the container's task limit ("can't start new thread") while connections queue during a restart.
def app(args: argparse.Namespace) -> int:
    sel = selectors.DefaultSelector()
    for host, port in (("0.0.0.0", args.inbound_port), ("127.0.0.1", args.outbound_port)):
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(4096)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ, None)
    bufs: dict[socket.socket, tuple[bytes, str]] = {}
    while True:
        for key, _ev in sel.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:  # a listener
                for _attempt in range(256):
                    try:
                        conn, peer = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    bufs[conn] = (b"", peer[0])
                    sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            data, peer = bufs[sock]
            try:
                chunk = sock.recv(256)
            except OSError:
                chunk = b""
            data += chunk
            if chunk and not data.endswith(b"\n"):
                bufs[sock] = (data, peer)
                continue
            sel.unregister(sock)
            del bufs[sock]
            if chunk:
                with contextlib.suppress(OSError):
                    sock.send(data.strip() + b" " + peer.encode() + b"\n")  # a short line: fits the buffer
            sock.close()


# ---------------------------------------------------------------------------------------- client
class Pending:
    __slots__ = ("rec", "sock", "reply", "deadline")

    def __init__(self, rec: dict[str, Any], sock: socket.socket, deadline: float) -> None:
        self.rec = rec
        self.sock = sock
        self.reply = b""
        self.deadline = deadline


def client(args: argparse.Namespace) -> int:
    ip, port = args.target.rsplit(":", 1)
    target = (ip, int(port))
    dst = f"{ip}:{port}"
    sel = selectors.DefaultSelector()
    pending: collections.deque[Pending] = collections.deque()  # in start order: the oldest time out first
    interval = 1.0 / args.rate
    stop_at = time.monotonic() + args.max_seconds
    with open(args.out, "w", buffering=1) as out:

        def finish(p: Pending, ok: bool, error: str = "") -> None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(p.sock)
            p.sock.close()
            p.rec["t1"] = time.time()
            words = p.reply.decode(errors="replace").split()
            if ok and len(words) == 2 and words[0] == p.rec["id"]:
                p.rec["ok"], p.rec["peer"] = True, words[1]
            else:
                p.rec["ok"] = False
                p.rec["error"] = error or f"answer {p.reply[:80]!r}"
            out.write(json.dumps(p.rec) + "\n")
            p.deadline = -1.0  # done

        n = 0
        nxt = time.monotonic()
        stopping = False
        while True:
            now = time.monotonic()
            if not stopping and (now >= stop_at or os.path.exists(args.stop)):
                stopping = True
            while not stopping and now >= nxt:
                cid = f"{args.path}-{os.getpid()}-{n}"
                n += 1
                nxt += interval
                rec: dict[str, Any] = {"id": cid, "path": args.path, "t0": time.time(), "dst": dst}
                sock = socket.socket()
                sock.setblocking(False)
                p = Pending(rec, sock, now + args.timeout)
                pending.append(p)
                err = sock.connect_ex(target)
                if err not in (0, errno.EINPROGRESS):
                    finish(p, False, f"connect: {os.strerror(err)}")
                    continue
                sel.register(sock, selectors.EVENT_WRITE, p)
            while pending and (pending[0].deadline < 0 or pending[0].deadline <= now):
                p = pending.popleft()
                if p.deadline >= 0:
                    finish(p, False, f"timeout after {args.timeout:g}s")
            if stopping and not pending:
                return 0
            for key, ev in sel.select(min(0.05, max(0.0, nxt - time.monotonic()))):
                p = key.data
                if ev & selectors.EVENT_WRITE:
                    err = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(p, False, f"connect: {os.strerror(err)}")
                        continue
                    local = p.sock.getsockname()
                    p.rec["src"] = f"{local[0]}:{local[1]}"
                    try:
                        p.sock.send(p.rec["id"].encode() + b"\n")
                    except OSError as exc:
                        finish(p, False, f"send: {exc}")
                        continue
                    sel.modify(p.sock, selectors.EVENT_READ, p)
                    continue
                try:
                    chunk = p.sock.recv(256)
                except OSError as exc:
                    finish(p, False, f"recv: {exc}")
                    continue
                p.reply += chunk
                if not chunk or p.reply.endswith(b"\n"):
                    finish(p, True)


# ---------------------------------------------------------------------------------------- report
def load_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [json.loads(x) for x in f if x.startswith("{")]


def ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def report(args: argparse.Namespace) -> int:
    events: list[tuple[str, float, float]] = []
    opened: dict[str, float] = {}
    with open(args.events, encoding="utf-8") as f:
        for line in f:
            name, what, when = line.split()
            if what == "start":
                opened[name] = float(when)
            else:
                events.append((name, opened.pop(name), float(when)))
    # access log entries per (host, direction, src, dst), in time order
    logs: dict[tuple[str, str, str, str], collections.deque[float]] = collections.defaultdict(collections.deque)
    for spec in args.journal:
        host, path = spec.split("=", 1)
        entries = [e for e in load_jsonl(path) if "direction" in e and e.get("dst")]
        for e in sorted(entries, key=lambda e: e["start_time"]):
            logs[(host, e["direction"], e["src"], e["dst"])].append(ts(e["start_time"]))
    conns: list[dict[str, Any]] = []
    for spec in args.results:
        host, path = spec.split("=", 1)  # the host whose proxy the connections go through
        for rec in load_jsonl(path):
            rec["host"] = host
            conns.append(rec)
    conns.sort(key=lambda r: r["t0"])

    def event_of(t: float) -> str:
        for name, start, end in events:
            if start <= t <= end:
                return name
        return "steady"

    table: dict[tuple[str, str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    examples: list[str] = []
    for rec in conns:
        key = (rec["host"], rec["path"], event_of(rec["t0"]))
        table[key]["total"] += 1
        if not rec["ok"]:
            table[key]["failed"] += 1
            if len(examples) < 20:
                examples.append(f"failed {rec['id']} at {rec['t0']:.3f}: {rec.get('error')}")
            continue
        direction = "inbound" if rec["path"] == "inbound" else "outbound"
        queue = logs.get((rec["host"], direction, rec.get("src", ""), rec["dst"]))
        logged = bool(queue)
        if queue:
            queue.popleft()
        direct = direction == "inbound" and rec.get("peer") != PASSTHROUGH
        if not logged or direct:
            table[key]["bypassed"] += 1
            if len(examples) < 20:
                examples.append(f"bypassed {rec['id']} src {rec.get('src')} (in access log: {logged}, app saw "
                                f"{rec.get('peer')})")
    order = {name: i for i, (name, _s, _e) in enumerate(events)}
    print(f"{'host':<16} {'path':<9} {'event':<22} {'total':>7} {'failed':>7} {'bypassed':>9}")
    totals = collections.Counter[str]()
    for (host, path, ev), c in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], -1))):
        print(f"{host:<16} {path:<9} {ev:<22} {c['total']:>7} {c['failed']:>7} {c['bypassed']:>9}")
        totals.update(c)
    for name, start, end in events:
        print(f"event {name}: {end - start:.1f}s")
    print(f"TOTAL connections={totals['total']} failed={totals['failed']} bypassed={totals['bypassed']}")
    for line in examples:
        print(line)
    paths = {(h, p) for (h, p, _e) in table}
    missing = [f"{h}/{p}/{name}" for h, p in sorted(paths) for name, _s, _e in events if not table[(h, p, name)]["total"]]
    if missing:
        print("no connection during: " + ", ".join(missing))
    return 0 if totals["total"] and not totals["failed"] and not totals["bypassed"] and not missing else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("app")
    a.add_argument("--inbound-port", type=int, required=True)
    a.add_argument("--outbound-port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--path", choices=("inbound", "outbound"), required=True)
    c.add_argument("--target", required=True)
    c.add_argument("--rate", type=float, default=100.0)
    c.add_argument("--timeout", type=float, default=30.0)
    c.add_argument("--out", required=True)
    c.add_argument("--stop", required=True)
    c.add_argument("--max-seconds", type=float, default=600.0)
    r = sub.add_parser("report")
    r.add_argument("--results", nargs="+", required=True, metavar="HOST=FILE")
    r.add_argument("--journal", nargs="+", required=True, metavar="HOST=FILE")
    r.add_argument("--events", required=True)
    args = p.parse_args(argv)
    return {"app": app, "client": client, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
