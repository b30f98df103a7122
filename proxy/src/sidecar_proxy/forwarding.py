"""Forwarding: upstream connect, the two flows of a connection (copy or splice), buffer budget, teardown.

Each connection has two flows (client->upstream, upstream->client); a flow moves bytes src -> buffer
(or pipe) -> dst and holds at most one buffer's worth in flight, which is the per-flow memory bound
and the backpressure. Buffers and pipes come from pools within a global budget (Config.buffer_budget)
and go back as soon as a flow is idle, so an idle connection holds neither.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from . import netutil
from .accesslog import LOG_DELAY, AccessLog, entry_line
from .config import Config
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

    def __init__(self, srv: Forwarding, direction: str, csock: socket.socket, src: netutil.Addr,
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


class Forwarding:
    """Upstream connect, the two flows of each connection, teardown and access-log lines.

    A mixin of Server (server.py), which owns the state declared here."""

    cfg: Config
    metrics: Metrics
    ep: select.epoll
    now: float
    conns: dict[int, tuple[Conn, bool]]
    connecting: set[Conn]
    active: int
    pipes: PipePool
    buffers: BufferPool
    waiters: collections.deque[Flow]
    splice: bool
    pump_impl: Callable[[Flow], None]
    access: AccessLog | None
    log_lines: list[str]
    log_due: float  # when the waiting lines go to the writer at the latest (Server.run)
    pt_v4: str | None
    pt_v6: str | None

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
        lines = self.log_lines
        if not lines:  # the first line of a batch: hand it to the writer LOG_DELAY from now at the latest
            self.log_due = self.now + LOG_DELAY
        lines.append(entry_line(t0 if t0 is not None else time.time(), direction, netutil.fmt(src),
                                netutil.fmt(dst) if dst is not None else None, bytes_in, bytes_out,
                                duration_ms, reason))

    def flush_access_log(self) -> None:
        if not self.log_lines:
            return
        lines, self.log_lines = self.log_lines, []
        if self.access is not None:
            self.metrics.access_log_dropped += self.access.submit(lines)
