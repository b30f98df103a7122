"""Listeners: binding the inbound/outbound sockets and accepting connections onto the forwarding path."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable

from . import netutil
from .config import Config
from .forwarding import EPOLLIN, Forwarding

log = logging.getLogger("sidecar_proxy")


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


class Listeners(Forwarding):
    """Listener sockets and their accept handlers; a mixin of Server."""

    listeners: dict[tuple[str, int, int, bool], Listener]
    paused: set[Listener]
    handlers: dict[int, Callable[[int], None]]
    own_ports: set[int]
    local: netutil.LocalAddresses

    @staticmethod
    def bind_listener(spec: tuple[str, int, int, bool]) -> Listener:
        direction, fam, port, tproxy = spec
        host = "::" if fam == socket.AF_INET6 else "0.0.0.0"
        return Listener(direction, fam, port, tproxy, netutil.listen_socket(fam, host, port, tproxy))

    def add_listener(self, lst: Listener) -> None:
        self.listeners[lst.spec] = lst
        self.ep.register(lst.fd, EPOLLIN)
        self.handlers[lst.fd] = self.make_acceptor(lst)

    def close_listener(self, lst: Listener) -> None:
        self.handlers.pop(lst.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(lst.fd)
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
