"""The data plane: one edge-triggered epoll loop, zero-copy splice forwarding, admin HTTP.

Every socket is non-blocking and registered once with EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET, so the loop
never re-arms interest.  Each connection has two flows (client->upstream, upstream->client); a flow
moves bytes src -> pipe -> dst with os.splice (the bytes never enter Python) and holds at most one
pipe's worth in flight, which is the per-connection memory bound and the backpressure: when the pipe
is full the flow stops reading until the destination drains it.  Pipes come from a small pool and
go back as soon as a flow is idle, so an idle connection holds no pipe and no buffer.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from . import __version__, netutil
from .accesslog import AccessLog
from .config import Config, ConfigError, build
from .metrics import Metrics

log = logging.getLogger("sidecar_proxy")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
SOCK_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | select.EPOLLET
READ_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
WRITE_EVENTS = EPOLLOUT | EPOLLHUP | EPOLLERR
SHUT_EVENTS = EPOLLRDHUP | EPOLLHUP | EPOLLERR

# Forwarding technique, measured (proxy/README.md): recv_into/send through a pooled 256 KiB buffer beat
# splice through a pipe on the benchmark VM, so copying is the default; splice stays selectable
# (Config.forward, SIDECAR_PROXY_FORWARD; buffer and pipe sizes are Config.copy_buf / pipe_size).
SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if hasattr(os, "splice") else 0
POOL_KEEP = 64
BUF_KEEP = 16
SMALL_BUF = 16 << 10  # what a flow gets once half the buffer budget is held (at most the copy size)
SMALL_KEEP = 256
LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {l_onoff=1, l_linger=0}

CONNECTING, OPEN, CLOSED = 0, 1, 2


class PipePool:
    """Non-blocking pipes for splice, reused; only pipes that are empty come back.

    `used` is the capacity of the pipes flows hold now; get() hands out none that would take it past
    `budget` (the flow then waits for one to come back)."""

    def __init__(self, size: int, keep: int, budget: int) -> None:
        self.size = size
        self.keep = keep
        self.budget = budget
        self.used = 0
        self.free: list[tuple[int, int, int]] = []
        self.created = 0

    def room(self) -> bool:
        return self.used + self.size <= self.budget

    def get(self) -> tuple[int, int, int] | None:
        if self.used + self.size > self.budget:
            return None
        if self.free:
            pipe = self.free.pop()
        else:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # unprivileged users may be over pipe-user-pages-soft
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
            pipe = (r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ))
            self.created += 1
        self.used += self.size
        return pipe

    def put(self, pipe: tuple[int, int, int]) -> None:
        self.used -= self.size
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: tuple[int, int, int]) -> None:
        """A pipe that still holds bytes: closed, not reused."""
        self.used -= self.size
        os.close(pipe[0])
        os.close(pipe[1])


class BufferPool:
    """Copy buffers, reused like pipes, within a global budget of bytes held by flows.

    While less than half the budget is held a flow gets a full `size` buffer; above that it gets a
    `small` one (slower, but a blocked reader then pins 16 KiB, not 256 KiB); when not even that fits
    get() returns None and the flow waits (reads nothing) until buffers come back. Pooled free
    buffers are outside the budget (at most `keep` of each size)."""

    def __init__(self, size: int, keep: int, budget: int) -> None:
        self.size = size
        self.small = min(SMALL_BUF, size)
        self.keep = keep
        self.free: list[bytearray] = []
        self.small_free: list[bytearray] = []
        self.used = 0
        self.set_budget(budget)

    def set_budget(self, budget: int) -> None:
        self.budget = budget
        self.big_below = budget // 2 - self.size  # a big buffer only while this leaves half the budget
        self.small_below = budget - self.small

    def room(self) -> bool:
        return self.used <= self.small_below

    def get(self) -> bytearray | None:
        used = self.used
        if used <= self.big_below:
            buf = self.free.pop() if self.free else bytearray(self.size)
        elif used <= self.small_below:
            buf = self.small_free.pop() if self.small_free else bytearray(self.small)
        else:
            return None
        self.used = used + len(buf)
        return buf

    def put(self, buf: bytearray) -> None:
        n = len(buf)
        self.used -= n
        if n == self.size:
            if len(self.free) < self.keep:
                self.free.append(buf)
        elif len(self.small_free) < SMALL_KEEP:
            self.small_free.append(buf)


class Flow:
    """One direction of a connection: src socket -> (pipe | buffer) -> dst socket."""

    __slots__ = ("conn", "src", "dst", "pipe", "buf", "start", "pending", "eof", "done", "nbytes", "key",
                 "upstream_side", "wblocked", "shut_seen", "waiting")

    def __init__(self, conn: Conn, src: int, dst: int, key: tuple[str, str], upstream_side: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int, int] | None = None
        self.buf: bytearray | None = None
        self.start = 0
        self.pending = 0
        self.eof = False
        self.done = False
        self.nbytes = 0
        self.key = key
        self.upstream_side = upstream_side  # True: src is the upstream socket
        self.wblocked = False  # buffer full and dst returned EAGAIN: only EPOLLOUT on dst helps
        self.shut_seen = False  # an event reported FIN/HUP/ERR on src: always read until EAGAIN/EOF
        self.waiting = False  # in Server.waiters: no buffer/pipe left in the budget, src not read


class Conn:
    __slots__ = ("srv", "direction", "csock", "usock", "cfd", "ufd", "src", "dst", "t0", "last", "state",
                 "up", "down", "t_connect")

    def __init__(self, srv: Server, direction: str, csock: socket.socket, src: netutil.Addr,
                 dst: netutil.Addr, usock: socket.socket) -> None:
        self.srv = srv
        self.direction = direction
        self.csock = csock
        self.usock = usock
        self.cfd = csock.fileno()
        self.ufd = usock.fileno()
        self.src = src
        self.dst = dst
        self.t0 = time.time()
        self.t_connect = time.monotonic()
        self.last = srv.now
        self.state = CONNECTING
        self.up = Flow(self, self.cfd, self.ufd, (direction, "upstream"), False)
        self.down = Flow(self, self.ufd, self.cfd, (direction, "downstream"), True)


class Listener:
    __slots__ = ("direction", "family", "port", "tproxy", "sock", "fd")

    def __init__(self, direction: str, family: int, port: int, tproxy: bool, sock: socket.socket) -> None:
        self.direction = direction
        self.family = family
        self.port = port
        self.tproxy = tproxy
        self.sock = sock
        self.fd = sock.fileno()

    @property
    def spec(self) -> tuple[str, int, int, bool]:
        return (self.direction, self.family, self.port, self.tproxy)


def listener_specs(cfg: Config) -> list[tuple[str, int, int, bool]]:
    families = [socket.AF_INET] + ([socket.AF_INET6] if cfg.ipv6 else [])
    specs: list[tuple[str, int, int, bool]] = []
    for fam in families:
        specs.append(("inbound", fam, cfg.inbound_port, cfg.mode == "tproxy"))
        specs.append(("outbound", fam, cfg.outbound_port, False))
    return specs


class AdminConn:
    __slots__ = ("sock", "data", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.data = b""
        self.deadline = deadline


class Server:
    def __init__(self, cfg: Config, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}
        self.metrics = Metrics()
        self.ep = select.epoll()
        self.now = time.monotonic()
        self.conns: dict[int, tuple[Conn, bool]] = {}  # fd -> (conn, is_client_side)
        self.connecting: set[Conn] = set()
        self.active = 0
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.listeners: dict[tuple[str, int, int, bool], Listener] = {}
        self.paused: set[Listener] = set()
        self.admin_paused = False
        self.admin_sock: socket.socket | None = None
        self.admin_conns: dict[int, AdminConn] = {}
        # the forwarding technique and sizes are fixed for the process (environment, not reloaded)
        self.splice = cfg.forward == "splice" and hasattr(os, "splice")
        self.pump_impl = self.pump_splice if self.splice else self.pump_copy
        self.pipes = PipePool(cfg.pipe_size, POOL_KEEP, cfg.buffer_budget)
        self.buffers = BufferPool(cfg.copy_buf, BUF_KEEP, cfg.buffer_budget)
        self.waiters: collections.deque[Flow] = collections.deque()  # flows waiting for the budget
        self.local = netutil.LocalAddresses()
        self.ready = False
        self.draining = False
        self.drain_deadline = 0.0
        self.stopping = False
        self.signals: list[int] = []  # signal numbers, appended by the handler
        self.log_lines: list[str] = []
        self.access: AccessLog | None = None
        self.own_ports: set[int] = set()
        self.pt_v4: str | None = None
        self.pt_v6: str | None = None
        self.started = time.time()
        self.sig_r = -1

    # ------------------------------------------------------------------ setup / config
    def apply(self, cfg: Config, initial: bool) -> None:
        """Bind what the config needs; on failure leave the previous state untouched."""
        wanted = listener_specs(cfg)
        new: dict[tuple[str, int, int, bool], Listener] = {}
        admin: socket.socket | None = None
        admin_fam = socket.AF_INET6 if ":" in cfg.admin_address else socket.AF_INET
        admin_changed = initial or (cfg.admin_address, cfg.admin_port) != (self.cfg.admin_address,
                                                                           self.cfg.admin_port)
        # a listener that goes away but whose port a new one needs (mode change, swapped ports) must
        # close first; it is rebound if the new configuration cannot be applied
        needed = {(spec[1], spec[2]) for spec in wanted if spec not in self.listeners}
        if admin_changed:
            needed.add((admin_fam, cfg.admin_port))
        early = [lst for spec, lst in self.listeners.items()
                 if spec not in wanted and (lst.family, lst.port) in needed]
        for lst in early:
            self.close_listener(lst)
        try:
            for spec in wanted:
                if spec in self.listeners:
                    continue
                new[spec] = self.bind_listener(spec)
            if admin_changed:
                admin = netutil.listen_socket(admin_fam, cfg.admin_address, cfg.admin_port, False, 128)
            # stdout stays one sink (two writer threads could interleave partial writes); a file is
            # reopened on every reload, which is what log rotation needs
            keep = self.access is not None and cfg.access_log == "-" and self.access.path == "-"
            access = self.access if keep else self.open_access_log(cfg.access_log, cfg.access_log_queue)
        except OSError:
            for lst in new.values():
                lst.sock.close()
            if admin is not None:
                admin.close()
            for old in early:
                try:
                    self.add_listener(self.bind_listener(old.spec))
                except OSError as exc:
                    log.error("cannot rebind %s listener on port %d: %s", old.direction, old.port, exc)
            raise
        # commit
        for spec, lst in list(self.listeners.items()):
            if spec not in wanted:
                self.close_listener(lst)
        for lst in new.values():
            self.add_listener(lst)
        if admin is not None:
            if self.admin_sock is not None:
                self.handlers.pop(self.admin_sock.fileno(), None)
                self.ep.unregister(self.admin_sock)
                self.admin_sock.close()
            self.admin_sock = admin
            self.ep.register(admin.fileno(), EPOLLIN)
            self.handlers[admin.fileno()] = self.admin_accept
        if self.access is not None and self.access is not access:
            self.flush_access_log()
            self.access.close()  # its thread writes what is queued, then closes a file (not stdout)
        self.access = access
        self.cfg = cfg
        self.buffers.set_budget(cfg.buffer_budget)
        self.pipes.budget = cfg.buffer_budget
        self.own_ports = {cfg.inbound_port, cfg.outbound_port, cfg.admin_port}
        self.local.clear()
        v4, v6 = cfg.passthrough_source_v4, cfg.passthrough_source_v6
        self.pt_v4 = v4 if netutil.can_bind(socket.AF_INET, v4) else None
        self.pt_v6 = v6 if netutil.can_bind(socket.AF_INET6, v6) else None
        if self.pt_v4 is None:
            log.warning("passthrough source %s is not assigned here; inbound upstream source left unbound",
                        cfg.passthrough_source_v4)
        logging.getLogger().setLevel(cfg.log_level.upper())

    @staticmethod
    def bind_listener(spec: tuple[str, int, int, bool]) -> Listener:
        direction, fam, port, tproxy = spec
        host = "::" if fam == socket.AF_INET6 else "0.0.0.0"
        return Listener(direction, fam, port, tproxy, netutil.listen_socket(fam, host, port, tproxy))

    def add_listener(self, lst: Listener) -> None:
        self.listeners[lst.spec] = lst
        self.ep.register(lst.fd, EPOLLIN)
        self.handlers[lst.fd] = self.make_acceptor(lst)

    @staticmethod
    def open_access_log(path: str, limit: int) -> AccessLog | None:
        return AccessLog(path, limit) if path else None

    def close_listener(self, lst: Listener) -> None:
        self.handlers.pop(lst.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(lst.fd)
        lst.sock.close()
        self.listeners.pop(lst.spec, None)

    def reload(self) -> None:
        if self.draining:
            log.warning("reload ignored while draining")
            return
        try:
            cfg = build(self.config_path, self.overrides)
            self.apply(cfg, initial=False)
        except (ConfigError, OSError) as exc:
            self.reload_failed(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - no file may stop the proxy: keep running, say why
            self.reload_failed(f"{type(exc).__name__}: {exc}"[:500])
            return
        self.metrics.reloads += 1
        log.info("configuration reloaded (%d active connections kept)", self.active)

    def reload_failed(self, why: str) -> None:
        self.metrics.reload_failures += 1
        self.metrics.reload_last_error = why
        log.error("reload failed, keeping the running configuration: %s", why)

    # ------------------------------------------------------------------ accept
    def make_acceptor(self, lst: Listener) -> Callable[[int], None]:
        lsock = lst.sock
        direction = lst.direction
        get_dst = netutil.original_dst_tproxy if lst.tproxy else netutil.original_dst_redirect
        metrics = self.metrics
        inbound = direction == "inbound"

        def on_accept(_events: int) -> None:
            for _attempt in range(128):
                try:
                    csock, src = lsock.accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # out of fds/memory: stop polling this listener until the next sweep instead
                        # of spinning on a level-triggered event that cannot be served
                        metrics.error("accept")
                        log.error("accept failed, pausing the listener: %s", exc)
                        self.paused.add(lst)
                        with contextlib.suppress(OSError, ValueError):
                            self.ep.modify(lst.fd, 0)
                        return
                    continue
                metrics.connections_total[direction] += 1
                try:
                    dst = get_dst(csock)
                except OSError as exc:
                    metrics.error("original_dst")
                    log.debug("no original destination for %s: %s", src, exc)
                    self.reset_close(csock)
                    self.access_entry(direction, src, None, 0, 0, 0.0, "original_dst")
                    continue
                if dst[1] in self.own_ports and self.local.is_local(dst[0]):
                    metrics.error("loop")
                    self.reset_close(csock)
                    self.access_entry(direction, src, dst, 0, 0, 0.0, "loop")
                    continue
                if self.active >= self.cfg.max_connections:
                    metrics.error("limit")
                    self.reset_close(csock)
                    self.access_entry(direction, src, dst, 0, 0, 0.0, "limit")
                    continue
                self.start_upstream(direction, inbound, csock, src, dst)

        return on_accept

    def start_upstream(self, direction: str, inbound: bool, csock: socket.socket, src: netutil.Addr,
                       dst: netutil.Addr) -> None:
        fam = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        try:
            usock = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self.metrics.error("connect_error")
            log.error("cannot create upstream socket: %s", exc)
            self.reset_close(csock)
            return
        csock.setblocking(False)  # (TCP_NODELAY comes from the listener)
        usock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if inbound:
            pt = self.pt_v6 if fam == socket.AF_INET6 else self.pt_v4
            if pt is not None:
                try:
                    usock.setsockopt(netutil.SOL_IP, netutil.IP_BIND_ADDRESS_NO_PORT, 1)
                    usock.bind((pt, 0))
                except OSError as exc:
                    log.debug("passthrough bind %s failed: %s", pt, exc)
        conn = Conn(self, direction, csock, src, dst, usock)
        self.active += 1
        self.metrics.connections_active[direction] += 1
        err = usock.connect_ex(dst)
        if err not in (0, errno.EINPROGRESS):
            self.connect_failed(conn, err)
            return
        self.conns[conn.ufd] = (conn, False)
        self.ep.register(conn.ufd, SOCK_EVENTS)
        self.connecting.add(conn)

    def connect_failed(self, conn: Conn, err: int) -> None:
        kind = "connect_refused" if err == errno.ECONNREFUSED else "connect_error"
        if err == errno.ETIMEDOUT:
            kind = "connect_timeout"
        self.metrics.error(kind)
        log.debug("connect to %s failed: %s", netutil.fmt(conn.dst), os.strerror(err))
        self.finish(conn, kind, rst_client=True)

    def connected(self, conn: Conn, events: int) -> None:
        # a connect that failed reports EPOLLERR (and HUP); only then is SO_ERROR worth a syscall
        err = 0
        if events & (EPOLLERR | EPOLLHUP):
            err = conn.usock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.connect_failed(conn, err)
            return
        self.connecting.discard(conn)
        self.metrics.observe_connect(time.monotonic() - conn.t_connect)
        conn.state = OPEN
        self.conns[conn.cfd] = (conn, True)
        # registering reports the client socket's current readiness as an event, which starts the
        # client->upstream flow; the upstream->client flow starts on upstream's next EPOLLIN edge
        self.ep.register(conn.cfd, SOCK_EVENTS)
        if events & READ_EVENTS:  # the upstream spoke first, in the same event as the connect
            if events & SHUT_EVENTS:
                conn.down.shut_seen = True
            self.pump(conn.down)

    # ------------------------------------------------------------------ forwarding
    def on_sock_event(self, conn: Conn, client_side: bool, events: int) -> None:
        if conn.state == CONNECTING:
            self.connected(conn, events)
            return
        if events & READ_EVENTS:
            f = conn.up if client_side else conn.down
            if events & SHUT_EVENTS:
                f.shut_seen = True
            # a flow whose buffer is full waits for its destination, not for more input
            if not f.wblocked or events & SHUT_EVENTS:
                self.pump(f)
        if conn.state == OPEN and events & WRITE_EVENTS:
            # edge-triggered events carry every ready bit; only a flow that has bytes waiting for this
            # socket cares that it is writable (anything else would be a wasted EAGAIN syscall)
            f = conn.down if client_side else conn.up
            if f.pending or events & (EPOLLERR | EPOLLHUP):
                self.pump(f)

    def pump(self, f: Flow) -> None:
        if f.done:
            return
        f.wblocked = False
        self.pump_impl(f)

    def pump_splice(self, f: Flow) -> None:
        conn = f.conn
        splice = os.splice
        moved = 0
        pipe = f.pipe
        try:
            while True:
                if f.pending:
                    assert pipe is not None
                    try:
                        while f.pending:
                            n = splice(pipe[0], f.dst, f.pending, flags=SPLICE_FLAGS)
                            f.pending -= n
                            f.nbytes += n
                            moved += n
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        self.flow_error(f, exc, writing=True)
                        return
                if f.eof:
                    if not f.pending:
                        self.half_close(f)
                    return
                if pipe is None:
                    pipe = f.pipe = self.pipes.get()
                    if pipe is None:
                        self.wait_budget(f)
                        return
                room = pipe[2] - f.pending
                if room <= 0:
                    f.wblocked = True
                    return  # pipe full and dst blocked: wait for EPOLLOUT on dst (backpressure)
                try:
                    n = splice(f.src, pipe[1], room, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    if not f.pending:
                        self.pipes.put(pipe)
                        f.pipe = None
                    return
                except OSError as exc:
                    self.flow_error(f, exc, writing=False)
                    return
                if n == 0:
                    f.eof = True
                else:
                    f.pending += n
        finally:
            if moved:
                self.metrics.bytes_total[f.key] += moved
                conn.last = self.now

    def pump_copy(self, f: Flow) -> None:
        conn = f.conn
        moved = 0
        drained = False
        try:
            while True:
                if f.pending:
                    assert f.buf is not None
                    try:
                        while f.pending:
                            n = os.write(f.dst, memoryview(f.buf)[f.start:f.start + f.pending])
                            f.start += n
                            f.pending -= n
                            f.nbytes += n
                            moved += n
                    except BlockingIOError:
                        f.wblocked = True
                        return
                    except OSError as exc:
                        self.flow_error(f, exc, writing=True)
                        return
                if f.eof:
                    self.half_close(f)
                    return
                if drained:
                    # The last read came back short, so the socket was empty then; anything arriving
                    # since raises a new edge-triggered EPOLLIN. Skipping the read that would only
                    # say EAGAIN saves a syscall per message. Not once FIN/HUP/ERR was seen: that
                    # state raises no new edge, so it must be read until EOF.
                    if f.buf is not None:
                        self.buffers.put(f.buf)
                        f.buf = None
                    return
                if f.buf is None:
                    f.buf = self.buffers.get()
                    if f.buf is None:
                        self.wait_budget(f)
                        return
                try:
                    n = os.readv(f.src, [f.buf])
                except BlockingIOError:
                    self.buffers.put(f.buf)
                    f.buf = None
                    return
                except OSError as exc:
                    self.flow_error(f, exc, writing=False)
                    return
                if n == 0:
                    f.eof = True
                else:
                    f.start = 0
                    f.pending = n
                    drained = n < len(f.buf) and not f.shut_seen
        finally:
            if moved:
                self.metrics.bytes_total[f.key] += moved
                conn.last = self.now

    def wait_budget(self, f: Flow) -> None:
        """The buffer budget is spent: f reads nothing until buffers come back (wake_waiters)."""
        if not f.waiting:
            f.waiting = True
            self.waiters.append(f)
            self.metrics.buffer_waits += 1

    def wake_waiters(self) -> None:
        """Pump waiting flows, oldest first, while the budget has room."""
        waiters = self.waiters
        pool: BufferPool | PipePool = self.pipes if self.splice else self.buffers
        for _turn in range(len(waiters)):
            if not pool.room():
                return
            f = waiters.popleft()
            f.waiting = False
            if f.conn.state == OPEN and not f.done:
                self.pump(f)

    def half_close(self, f: Flow) -> None:
        """src sent FIN and everything reached dst: pass the FIN on."""
        f.done = True
        if f.pipe is not None:
            self.pipes.put(f.pipe)
            f.pipe = None
        if f.buf is not None:
            self.buffers.put(f.buf)
            f.buf = None
        conn = f.conn
        other = conn.down if f is conn.up else conn.up
        if other.done:
            # both directions have ended: dst's input was read to EOF, so close() sends a plain FIN and
            # the shutdown() would be a wasted system call
            self.finish(conn, "closed")
            return
        dst_sock = conn.csock if f.upstream_side else conn.usock
        with contextlib.suppress(OSError):
            dst_sock.shutdown(socket.SHUT_WR)

    def flow_error(self, f: Flow, exc: OSError, writing: bool) -> None:
        # reading src failed: src's peer reset; writing dst failed: dst's peer is gone.
        upstream_failed = f.upstream_side != writing
        kind = "upstream_reset" if upstream_failed else "downstream_reset"
        self.metrics.error(kind)
        log.debug("%s on %s: %s", kind, netutil.fmt(f.conn.dst), exc)
        self.finish(f.conn, kind, rst_client=True, rst_upstream=True)

    # ------------------------------------------------------------------ teardown
    @staticmethod
    def reset_close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        sock.close()

    def finish(self, conn: Conn, reason: str, rst_client: bool = False, rst_upstream: bool = False) -> None:
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        self.connecting.discard(conn)
        self.conns.pop(conn.cfd, None)
        self.conns.pop(conn.ufd, None)
        for f in (conn.up, conn.down):
            if f.pipe is not None:
                if f.pending:
                    self.pipes.discard(f.pipe)
                else:
                    self.pipes.put(f.pipe)
                f.pipe = None
            if f.buf is not None:
                self.buffers.put(f.buf)
                f.buf = None
        # closing an fd removes it from the epoll set (we never dup them)
        if rst_client:
            self.reset_close(conn.csock)
        else:
            conn.csock.close()
        if rst_upstream:
            self.reset_close(conn.usock)
        else:
            conn.usock.close()
        self.active -= 1
        self.metrics.connections_active[conn.direction] -= 1
        if self.access is not None:
            self.access_entry(conn.direction, conn.src, conn.dst, conn.up.nbytes, conn.down.nbytes,
                              (time.time() - conn.t0) * 1000.0, reason, conn.t0)

    def access_entry(self, direction: str, src: Any, dst: netutil.Addr | None, bytes_in: int,
                     bytes_out: int, duration_ms: float, reason: str, t0: float | None = None) -> None:
        if self.access is None:
            return
        start = datetime.datetime.fromtimestamp(t0 if t0 is not None else time.time(), datetime.timezone.utc)
        self.log_lines.append(json.dumps({
            "start_time": start.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "direction": direction,
            "src": netutil.fmt(src),
            "dst": netutil.fmt(dst) if dst is not None else None,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration_ms": round(duration_ms, 3),
            "reason": reason,
        }, separators=(",", ":")))

    def flush_access_log(self) -> None:
        if not self.log_lines:
            return
        lines, self.log_lines = self.log_lines, []
        if self.access is not None:
            self.metrics.access_log_dropped += self.access.submit(lines)

    # ------------------------------------------------------------------ timers
    def sweep(self) -> None:
        now = self.now
        if self.paused:
            for lst in self.paused:
                if self.listeners.get(lst.spec) is lst:
                    with contextlib.suppress(OSError, ValueError):
                        self.ep.modify(lst.fd, EPOLLIN)
            self.paused.clear()
        if self.admin_paused and self.admin_sock is not None:
            self.admin_paused = False
            with contextlib.suppress(OSError, ValueError):
                self.ep.modify(self.admin_sock.fileno(), EPOLLIN)
        if self.connecting:
            limit = self.cfg.connect_timeout
            for conn in [c for c in self.connecting if now - c.t_connect >= limit]:
                self.metrics.error("connect_timeout")
                self.finish(conn, "connect_timeout", rst_client=True, rst_upstream=True)
        idle = self.cfg.idle_timeout
        expired = [c for c, side in self.conns.values() if side and now - c.last >= idle]
        for conn in expired:
            self.metrics.error("idle_timeout")
            self.finish(conn, "idle_timeout")
        for fd, ac in list(self.admin_conns.items()):
            if now >= ac.deadline:
                self.admin_close(fd)
        waiters = self.waiters
        if waiters and not (self.pipes if self.splice else self.buffers).room():
            # nothing was woken, so closed connections still sit in the queue: drop them
            live = [f for f in waiters if f.conn.state == OPEN and not f.done]
            if len(live) != len(waiters):
                waiters.clear()
                waiters.extend(live)

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

    # ------------------------------------------------------------------ main loop
    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def on_signal_fd(self, _events: int) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.sig_r, 64):
                pass

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.drain_deadline = self.now + self.cfg.drain_timeout
        for lst in list(self.listeners.values()):
            self.close_listener(lst)
        log.info("draining: listeners closed, %d active connections, deadline %.1fs",
                 self.active, self.cfg.drain_timeout)

    def run(self) -> int:
        raise_nofile_limit()
        try:
            self.apply(self.cfg, initial=True)
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        self.ep.register(self.sig_r, EPOLLIN)
        self.handlers[self.sig_r] = self.on_signal_fd
        self.ready = True
        log.info("sidecar-proxy %s ready: mode=%s inbound=%d outbound=%d admin=%s:%d forwarding=%s",
                 __version__, self.cfg.mode, self.cfg.inbound_port, self.cfg.outbound_port,
                 self.cfg.admin_address, self.cfg.admin_port, "splice" if self.splice else "copy")
        self.flush_access_log()
        sys.stderr.flush()
        conns = self.conns
        handlers = self.handlers
        poll = self.ep.poll
        next_sweep = time.monotonic() + 0.25
        on_sock_event = self.on_sock_event
        waiters = self.waiters
        while True:
            events = poll(0.25 if not self.draining else 0.05, 1024)
            self.now = now = time.monotonic()
            for fd, ev in events:
                hit = conns.get(fd)
                if hit is not None:
                    on_sock_event(hit[0], hit[1], ev)
                else:
                    h = handlers.get(fd)
                    if h is not None:
                        h(ev)
            if waiters:
                self.wake_waiters()
            if self.log_lines:
                self.flush_access_log()
            if self.signals:
                sigs, self.signals = self.signals, []
                for sig in sigs:
                    if sig == signal.SIGHUP:
                        self.reload()
                    else:
                        self.begin_drain()
            if now >= next_sweep:
                next_sweep = now + 0.25
                self.sweep()
                if self.log_lines:
                    self.flush_access_log()
            if self.draining and (self.active == 0 or now >= self.drain_deadline):
                break
        if self.active:
            log.warning("drain deadline reached, closing %d connections", self.active)
            for conn, side in list(conns.values()):
                if side or conn.state == CONNECTING:
                    self.metrics.error("drain")
                    self.finish(conn, "drain", rst_client=True, rst_upstream=True)
            for conn in list(self.connecting):
                self.finish(conn, "drain", rst_client=True, rst_upstream=True)
        self.flush_access_log()
        if self.access is not None:
            self.access.close(wait=2.0)
        log.info("stopped")
        return 0


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20,
                                                        hard))
