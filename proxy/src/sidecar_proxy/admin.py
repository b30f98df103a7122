"""The admin HTTP endpoints (/ready, /metrics, /stats) served from the event loop."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import time
from collections.abc import Callable

from . import __version__
from .forwarding import EPOLLIN, EPOLLRDHUP, Forwarding
from .listeners import Listener


class AdminConn:
    __slots__ = ("sock", "data", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.data = b""
        self.deadline = deadline


class Admin(Forwarding):
    """Admin connections: capped, read until the request head, answered, closed; a mixin of Server."""

    admin_sock: socket.socket | None
    admin_conns: dict[int, AdminConn]
    admin_paused: bool
    handlers: dict[int, Callable[[int], None]]
    listeners: dict[tuple[str, int, int, bool], Listener]
    ready: bool
    draining: bool
    started: float

    # ------------------------------------------------------------------ admin HTTP
    def admin_accept(self, _events: int) -> None:
        assert self.admin_sock is not None
        for _attempt in range(16):
            try:
                sock, _addr = self.admin_sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.metrics.error("accept")
                    self.admin_paused = True  # level-triggered: do not spin, retry at the next sweep
                    with contextlib.suppress(OSError, ValueError):
                        self.ep.modify(self.admin_sock.fileno(), 0)
                return
            if len(self.admin_conns) >= self.cfg.admin_max_connections:
                # admin clients share the fd limit with the data path: the excess is reset at once
                self.metrics.admin_rejected += 1
                self.reset_close(sock)
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self.admin_conns[fd] = AdminConn(sock, self.now + 5.0)
            self.ep.register(fd, EPOLLIN | EPOLLRDHUP)
            self.handlers[fd] = self.admin_reader(fd)

    def admin_reader(self, fd: int) -> Callable[[int], None]:
        def on_read(_events: int) -> None:
            self.admin_read(fd)

        return on_read

    def admin_close(self, fd: int) -> None:
        ac = self.admin_conns.pop(fd, None)
        self.handlers.pop(fd, None)
        if ac is not None:
            ac.sock.close()

    def admin_read(self, fd: int) -> None:
        ac = self.admin_conns.get(fd)
        if ac is None:
            return
        try:
            chunk = ac.sock.recv(8192)
        except BlockingIOError:
            return
        except OSError:
            self.admin_close(fd)
            return
        if not chunk:
            self.admin_close(fd)
            return
        ac.data += chunk
        if b"\r\n\r\n" not in ac.data and b"\n\n" not in ac.data:
            if len(ac.data) > 16384:
                self.admin_close(fd)
            return
        line = ac.data.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        status, ctype, body = self.admin_response(method, path.split("?", 1)[0])
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            ac.sock.setblocking(True)
            ac.sock.settimeout(2.0)
            ac.sock.sendall(head + (body if method != "HEAD" else b""))
        except OSError:
            pass
        self.admin_close(fd)

    def admin_response(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/ready":
            if self.ready and not self.draining:
                return "200 OK", "text/plain", b"ready\n"
            why = b"draining\n" if self.draining else b"not ready\n"
            return "503 Service Unavailable", "text/plain", why
        if path == "/metrics":
            self.metrics.buffered_bytes = self.pipes.used if self.splice else self.buffers.used
            self.metrics.buffer_budget = self.cfg.buffer_budget
            self.metrics.buffer_waiting = len(self.waiters)
            text = self.metrics.prometheus(self.ready, self.draining)
            return "200 OK", "text/plain; version=0.0.4", text.encode()
        if path == "/stats":
            stats = self.metrics.stats()
            stats.update({
                "version": __version__,
                "mode": self.cfg.mode,
                "ready": self.ready and not self.draining,
                "draining": self.draining,
                "uptime_seconds": round(time.time() - self.started, 3),
                "forwarding": "splice" if self.splice else "copy",
                "pipes": {"created": self.pipes.created, "pooled": len(self.pipes.free)},
                "buffers": {"budget": self.cfg.buffer_budget,
                            "used": self.pipes.used if self.splice else self.buffers.used,
                            "waiting_flows": len(self.waiters), "waits": self.metrics.buffer_waits},
                "admin": {"max_connections": self.cfg.admin_max_connections,
                          "open": len(self.admin_conns), "rejected": self.metrics.admin_rejected},
                "listeners": [{"direction": lst.direction, "port": lst.port,
                               "family": "ipv6" if lst.family == socket.AF_INET6 else "ipv4",
                               "tproxy": lst.tproxy} for lst in self.listeners.values()],
                "config": {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
            })
            return "200 OK", "application/json", (json.dumps(stats, indent=1) + "\n").encode()
        return "404 Not Found", "text/plain", b"not found: try /ready /metrics /stats\n"
