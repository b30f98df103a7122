#!/usr/bin/env python3
"""Inbound transparent TCP proxy on asyncio: a benchmark contender, not part of the sidecar-proxy package.

    python proxy/benchmarks/aio_proxy.py [--port 15006] [--mode redirect|tproxy] [--loop asyncio|uvloop]
                                         [--workers N] [--buffer BYTES]

The same job as sidecar-proxy's inbound listener (IPv4), built the idiomatic asyncio way so that
`run.py` can compare the techniques with sidecar-proxy's own epoll loop: `asyncio.BufferedProtocol`
(reads go straight into a pooled buffer, no bytes object per read), backpressure both ways,
half-close, resets, optionally on uvloop and in N processes with their own `SO_REUSEPORT` listeners.
The original destination comes from `sidecar_proxy.netutil` (`SO_ORIGINAL_DST` for REDIRECT, the
`IP_TRANSPARENT` listener's `getsockname()` for TPROXY); upstream connections are bound to the
passthrough source 127.0.0.6 when it exists, as sidecar-proxy's are. No metrics, no access log, no
reload: SIGTERM/SIGINT just stop it.

Buffer ownership: a transport may keep a view of the written bytes when the socket is full (asyncio
and uvloop both do, without copying). Every transport therefore has a write-buffer high-water mark of
0: anything left unsent pauses the protocol at once, which stops reading on the other socket, and it
resumes only when the transport's buffer is empty again. So each direction has at most one buffer in
flight, it goes back to the pool as soon as a write completes, and idle connections hold none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import resource
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from sidecar_proxy import netutil  # noqa: E402

LINGER_RST = struct.pack("ii", 1, 0)
CONNECT_TIMEOUT = 5.0
POOL_KEEP = 64  # free buffers kept for reuse
PASSTHROUGH_SOURCE = "127.0.0.6"


class Proxy:
    """What every connection of one worker shares."""

    def __init__(self, port: int, tproxy: bool, bufsize: int) -> None:
        self.port = port
        self.get_dst = netutil.original_dst_tproxy if tproxy else netutil.original_dst_redirect
        self.bufsize = bufsize
        self.pool: list[memoryview] = []
        self.local = netutil.LocalAddresses()
        can = netutil.can_bind(socket.AF_INET, PASSTHROUGH_SOURCE)
        self.source = PASSTHROUGH_SOURCE if can else None
        self.tasks: set[asyncio.Task[None]] = set()


class Side(asyncio.BufferedProtocol):
    """One socket of a proxied connection: reads into a pooled buffer, writes to the peer's transport."""

    peer: Side  # set before this side's transport can deliver data

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.view: memoryview | None = None  # the read buffer, held while its bytes are in flight
        self.eof = False  # this socket's peer sent FIN: it is not read any more
        self.blocked = False  # our transport holds unsent bytes (a view of the peer's buffer)
        self.lost = False
        self.early = 0  # bytes read before the upstream was connected

    # ------------------------------------------------------------------ transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check)
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=0)  # see the module docstring: buffer ownership

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.view is None:
            pool = self.proxy.pool
            self.view = pool.pop() if pool else memoryview(bytearray(self.proxy.bufsize))
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        assert self.view is not None
        peer = self.peer
        if peer.transport is None:  # no upstream yet (uvloop reads as soon as connection_made returns)
            self.early = nbytes
            assert self.transport is not None
            self.transport.pause_reading()
            return
        peer.transport.write(self.view[:nbytes])
        if not peer.blocked:  # written out at once: nothing refers to the buffer any more
            self.release()

    def eof_received(self) -> bool:
        if self.eof:
            return True
        self.eof = True
        peer = self.peer
        t = peer.transport
        if t is not None and not t.is_closing():  # (no upstream yet: Downstream.connect passes it on)
            t.write_eof()  # after whatever the transport still holds
        if peer.eof:  # both directions finished
            self.close()
            peer.close()
        return True  # keep the transport: the other direction may still flow

    def pause_writing(self) -> None:
        # our transport is full: stop reading the socket that feeds it
        self.blocked = True
        peer = self.peer
        if peer.transport is not None and not peer.eof:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        # our transport wrote everything out: the peer's buffer is free, read on
        self.blocked = False
        peer = self.peer
        peer.release()
        if peer.transport is not None and not peer.eof and not peer.lost:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer: Side | None = getattr(self, "peer", None)
        if peer is None or not peer.blocked:
            self.release()
        self.view = None  # still in flight in the peer's transport: dropped, not pooled
        if peer is None or peer.lost:
            return
        if exc is None:
            peer.close()  # both directions finished, or the peer was reset by us already
        else:
            peer.reset()  # a reset or an error on this socket resets the other one

    # ------------------------------------------------------------------ helpers
    def release(self) -> None:
        if self.view is not None:
            if len(self.proxy.pool) < POOL_KEEP:
                self.proxy.pool.append(self.view)
            self.view = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        t = self.transport
        if t is None:
            return
        with contextlib.suppress(OSError, AttributeError):
            t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        t.abort()


class Downstream(Side):
    """The accepted client socket: finds the original destination and connects upstream."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()  # nothing to forward to until the upstream is connected
        proxy = self.proxy
        try:
            dst = proxy.get_dst(transport.get_extra_info("socket"))
        except OSError:
            self.reset()
            return
        if dst[1] == proxy.port and proxy.local.is_local(dst[0]):  # a client of our own port: loop
            self.reset()
            return
        up = Side(proxy)
        up.peer = self
        self.peer = up
        task = asyncio.get_running_loop().create_task(self.connect(dst, up))
        proxy.tasks.add(task)
        task.add_done_callback(proxy.tasks.discard)

    async def connect(self, dst: netutil.Addr, up: Side) -> None:
        # The loop's own connect (uvloop: libuv's). sock_connect on a socket made here, bound with
        # IP_BIND_ADDRESS_NO_PORT as sidecar-proxy does, then create_connection(sock=...) measured
        # 5,000 conn/s on uvloop against 8,000 for this; asyncio did 5,800 either way. The price: the
        # source port is picked at bind time, which caps concurrent upstream connections at one
        # ephemeral port range per source address.
        source = (self.proxy.source, 0) if self.proxy.source is not None else None
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: up, dst[0], dst[1], local_addr=source), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            up.lost = True
            self.reset()
            return
        if self.lost:
            up.reset()
            return
        t = up.transport
        assert t is not None and self.transport is not None
        if self.early:  # what was read before the upstream existed
            assert self.view is not None
            t.write(self.view[:self.early])
            self.early = 0
            if not up.blocked:
                self.release()
        if self.eof:  # the client's FIN came before the upstream existed
            if not t.is_closing():
                t.write_eof()
        elif not up.blocked:
            self.transport.resume_reading()


# ---------------------------------------------------------------------------------------- setup
def reuseport_listener(port: int, tproxy: bool) -> socket.socket:
    """netutil.listen_socket plus SO_REUSEPORT, which has to be set before bind (one per worker)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if tproxy:
            sock.setsockopt(netutil.SOL_IP, netutil.IP_TRANSPARENT, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(args: argparse.Namespace, lsock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    proxy = Proxy(args.port, args.mode == "tproxy", args.buffer)
    server = await loop.create_server(lambda: Downstream(proxy), sock=lsock, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def run_worker(args: argparse.Namespace, lsock: socket.socket) -> None:
    if args.loop == "uvloop":
        uvloop: Any = importlib.import_module("uvloop")  # only when asked for
        uvloop.run(serve(args, lsock))
    else:
        asyncio.run(serve(args, lsock))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=15006, help="listening port (default 15006)")
    ap.add_argument("--mode", choices=("redirect", "tproxy"), default="redirect")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes, each with its own SO_REUSEPORT listener (default 1: no fork)")
    ap.add_argument("--buffer", type=int, default=262144, help="read buffer per active direction (bytes)")
    args = ap.parse_args()
    if args.workers < 1 or args.buffer < 1:
        ap.error("--workers and --buffer must be positive")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tproxy = args.mode == "tproxy"
    if args.workers == 1:
        run_worker(args, netutil.listen_socket(socket.AF_INET, "0.0.0.0", args.port, tproxy))
        return 0
    children: list[int] = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run_worker(args, reuseport_listener(args.port, tproxy))
                code = 0
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:  # the first worker to exit takes the others with it
        pid, wstatus = os.wait()
        children.remove(pid)
        status = status or os.waitstatus_to_exitcode(wstatus)
        forward(signal.SIGTERM, None)
    return status


if __name__ == "__main__":
    sys.exit(main())
