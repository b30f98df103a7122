"""The admin HTTP endpoints (/ready, /metrics, /stats) served from the event loop, and the optional
read-only metrics listener (`metrics_address`: GET /metrics only, nothing else), both capped."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from . import __version__, netutil
from .config import Config
from .forwarding import EPOLLIN, EPOLLRDHUP, Forwarding
from .listeners import Listener
from .metrics import Metrics

log = logging.getLogger("sidecar_proxy")


class AdminConn:
    __slots__ = ("sock", "data", "deadline", "metrics_only")

    def __init__(self, sock: socket.socket, deadline: float, metrics_only: bool = False) -> None:
        self.sock = sock
        self.data = b""
        self.deadline = deadline
        self.metrics_only = metrics_only  # accepted on the metrics listener: GET /metrics only


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
    # the metrics listener (class defaults: nothing bound until metrics_commit binds one)
    metrics_sock: socket.socket | None = None
    metrics_bound: tuple[str, int] | None = None
    metrics_paused: bool = False
    metrics_open: int = 0  # its connections in admin_conns, capped apart from the admin ones

    # ------------------------------------------------------------------ what the endpoints report
    # (one process: its own figures; the supervisor of workers overrides these with the sums, workers.py)
    def is_ready(self) -> bool:
        return self.ready and not self.draining

    def current_metrics(self) -> Metrics:
        """The figures to report, gauges set."""
        self.metrics.buffered_bytes = self.pipes.used if self.splice else self.buffers.used
        self.metrics.buffer_budget = self.cfg.buffer_budget
        self.metrics.buffer_waiting = len(self.waiters)
        return self.metrics

    def extra_stats(self, stats: dict[str, Any]) -> None:
        """Add to /stats (the supervisor adds its workers)."""

    # ------------------------------------------------------------------ admin HTTP
    def admin_accept(self, _events: int) -> None:
        assert self.admin_sock is not None
        self.http_accept(self.admin_sock, metrics_only=False)

    def metrics_accept(self, _events: int) -> None:
        assert self.metrics_sock is not None
        self.http_accept(self.metrics_sock, metrics_only=True)

    def http_accept(self, listen: socket.socket, metrics_only: bool) -> None:
        """Accept admin or metrics clients, each listener capped at admin_max_connections on its own, so
        scrapers cannot lock out the local readiness check, nor either take the fds the data path needs."""
        for _attempt in range(16):
            try:
                sock, _addr = listen.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.metrics.error("accept")
                    # level-triggered: do not spin, retry at the next sweep
                    if metrics_only:
                        self.metrics_paused = True
                    else:
                        self.admin_paused = True
                    with contextlib.suppress(OSError, ValueError):
                        self.ep.modify(listen.fileno(), 0)
                return
            open_now = self.metrics_open if metrics_only else len(self.admin_conns) - self.metrics_open
            if open_now >= self.cfg.admin_max_connections:
                # admin clients share the fd limit with the data path: the excess is reset at once
                if metrics_only:
                    self.metrics.metrics_rejected += 1
                else:
                    self.metrics.admin_rejected += 1
                self.reset_close(sock)
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self.admin_conns[fd] = AdminConn(sock, self.now + 5.0, metrics_only)
            self.metrics_open += metrics_only
            self.ep.register(fd, EPOLLIN | EPOLLRDHUP)
            self.handlers[fd] = self.admin_reader(fd)

    def metrics_resume(self) -> None:
        """The sweep's retry after the metrics listener paused on a full fd table."""
        self.metrics_paused = False
        if self.metrics_sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.modify(self.metrics_sock.fileno(), EPOLLIN)

    def metrics_bind(self, cfg: Config) -> tuple[bool, socket.socket | None]:
        """(changed, new socket) for the metrics listener `cfg` asks for; binds nothing when it stays
        the same, and (True, None) when it goes away. Raises OSError when the address cannot be bound."""
        want = (cfg.metrics_address, cfg.metrics_port) if cfg.metrics_address else None
        if want == self.metrics_bound:
            return False, None
        if want is None:
            return True, None
        family = socket.AF_INET6 if ":" in want[0] else socket.AF_INET
        try:
            return True, netutil.listen_socket(family, want[0], want[1], False, 128)
        except OSError as exc:  # name the listener: "cannot start" alone would not say which one
            raise OSError(exc.errno, f"metrics listener {netutil.fmt(want)}: {exc.strerror}") from None

    def metrics_commit(self, cfg: Config, changed: bool, sock: socket.socket | None) -> None:
        """Swap in what metrics_bind returned; open metrics connections finish on the old socket."""
        if not changed:
            return
        if self.metrics_sock is not None:
            self.handlers.pop(self.metrics_sock.fileno(), None)
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(self.metrics_sock)
            self.metrics_sock.close()
        self.metrics_sock = sock
        self.metrics_paused = False
        self.metrics_bound = (cfg.metrics_address, cfg.metrics_port) if sock is not None else None
        if sock is not None:
            self.ep.register(sock.fileno(), EPOLLIN)
            self.handlers[sock.fileno()] = self.metrics_accept
            log.info("metrics listener on %s (GET /metrics only)",
                     netutil.fmt((cfg.metrics_address, cfg.metrics_port)))
        else:
            log.info("metrics listener closed")

    def admin_reader(self, fd: int) -> Callable[[int], None]:
        def on_read(_events: int) -> None:
            self.admin_read(fd)

        return on_read

    def admin_close(self, fd: int) -> None:
        ac = self.admin_conns.pop(fd, None)
        self.handlers.pop(fd, None)
        if ac is not None:
            self.metrics_open -= ac.metrics_only
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
        status, ctype, body = self.admin_response(method, path.split("?", 1)[0], ac.metrics_only)
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            ac.sock.setblocking(True)
            ac.sock.settimeout(2.0)
            ac.sock.sendall(head + (body if method != "HEAD" else b""))
        except OSError:
            pass
        self.admin_close(fd)

    def admin_response(self, method: str, path: str, metrics_only: bool = False) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if metrics_only and path != "/metrics":
            return "404 Not Found", "text/plain", b"not found: this listener serves only /metrics\n"
        if path == "/ready":
            if self.is_ready():
                return "200 OK", "text/plain", b"ready\n"
            why = b"draining\n" if self.draining else b"not ready\n"
            return "503 Service Unavailable", "text/plain", why
        if path == "/metrics":
            text = self.current_metrics().prometheus(self.is_ready(), self.draining)
            return "200 OK", "text/plain; version=0.0.4", text.encode()
        if path == "/stats":
            m = self.current_metrics()
            stats = m.stats()
            stats.update({
                "version": __version__,
                "mode": self.cfg.mode,
                "ready": self.is_ready(),
                "draining": self.draining,
                "uptime_seconds": round(time.time() - self.started, 3),
                "forwarding": "splice" if self.splice else "copy",
                "pipes": {"created": self.pipes.created, "pooled": len(self.pipes.free)},
                "buffers": {"budget": self.cfg.buffer_budget, "used": m.buffered_bytes,
                            "waiting_flows": m.buffer_waiting, "waits": m.buffer_waits},
                "admin": {"max_connections": self.cfg.admin_max_connections,
                          "open": len(self.admin_conns) - self.metrics_open,
                          "rejected": self.metrics.admin_rejected},
                "metrics_listener": {"address": self.metrics_bound and netutil.fmt(self.metrics_bound),
                                     "open": self.metrics_open, "rejected": self.metrics.metrics_rejected},
                "listeners": [{"direction": lst.direction, "port": lst.port,
                               "family": "ipv6" if lst.family == socket.AF_INET6 else "ipv4",
                               "tproxy": lst.tproxy, "activated": lst.inherited}
                              for lst in self.listeners.values()],
                "workers": m.workers,
                "config": {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
            })
            self.extra_stats(stats)
            return "200 OK", "application/json", (json.dumps(stats, indent=1) + "\n").encode()
        return "404 Not Found", "text/plain", b"not found: try /ready /metrics /stats\n"
