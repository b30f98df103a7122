"""Listeners: binding the inbound/outbound sockets and accepting connections onto the forwarding path."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable

from . import netutil
from .activation import Inherited
from .config import Config
from .forwarding import Forwarding

log = logging.getLogger("sidecar_proxy")


class Listener:
    __slots__ = ("direction", "family", "port", "tproxy", "sock", "fd", "inherited")

    def __init__(self, direction: str, family: int, port: int, tproxy: bool, sock: socket.socket,
                 inherited: str | None = None) -> None:
        self.direction = direction
        self.family = family
        self.port = port
        self.tproxy = tproxy
        self.sock = sock
        self.fd = sock.fileno()
        # the FileDescriptorName= of a socket passed by systemd (None: bound by this process)
        self.inherited = inherited

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


class Listeners(Forwarding):
    """Listener sockets and their accept handlers; a mixin of Server."""

    listeners: dict[tuple[str, int, int, bool], Listener]
    paused: set[Listener]
    handlers: dict[int, Callable[[int], None]]
    own_ports: set[int]
    local: netutil.LocalAddresses
    inherited: Inherited
    listen_events: int  # EPOLLIN; a worker adds EPOLLEXCLUSIVE (workers.py)

    def bind_listener(self, spec: tuple[str, int, int, bool]) -> Listener:
        """A passed (socket-activated) socket on the spec's family and port, else a socket bound here."""
        direction, fam, port, tproxy = spec
        hit = self.inherited.take(fam, port)
        if hit is None:
            host = "::" if fam == socket.AF_INET6 else "0.0.0.0"
            return Listener(direction, fam, port, tproxy, netutil.listen_socket(fam, host, port, tproxy))
        name, sock = hit
        try:
            netutil.adopt_listen_socket(sock, tproxy)
        except OSError as exc:
            self.inherited.put_back(name, sock)
            raise OSError(exc.errno, f"passed socket {name} on port {port}: {exc.strerror}") from None
        if name not in (direction, "unknown"):
            log.warning("passed socket %s on port %d serves the %s listener", name, port, direction)
        return Listener(direction, fam, port, tproxy, sock, inherited=name)

    def add_listener(self, lst: Listener) -> None:
        self.listeners[lst.spec] = lst
        self.ep.register(lst.fd, self.listen_events)
        self.handlers[lst.fd] = self.make_acceptor(lst)

    def close_listener(self, lst: Listener) -> None:
        self.handlers.pop(lst.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(lst.fd)
        if lst.inherited is not None:
            # systemd keeps its own copy listening; keep ours for a later configuration on this port
            self.inherited.put_back(lst.inherited, lst.sock)
        else:
            lst.sock.close()
        self.listeners.pop(lst.spec, None)

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
                        # (unregistered, not modified: an EPOLLEXCLUSIVE registration cannot be)
                        with contextlib.suppress(OSError, ValueError):
                            self.ep.unregister(lst.fd)
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
