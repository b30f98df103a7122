"""Socket helpers: original destination, transparent listeners, address formatting."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = 24
SOL_IP = 0
SOL_IPV6 = 41

Addr = tuple[str, int]


def original_dst_redirect(sock: socket.socket) -> Addr:
    """The pre-NAT destination of a REDIRECTed connection (conntrack lookup)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return ip, port
    raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def original_dst_tproxy(sock: socket.socket) -> Addr:
    """On an IP_TRANSPARENT listener the accepted socket's local address is the original destination."""
    name = sock.getsockname()
    return name[0], name[1]


def fmt(addr: Addr) -> str:
    ip, port = addr[0], addr[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def transparent_option(family: int) -> tuple[int, int]:
    """(level, option) of IP_TRANSPARENT / IPV6_TRANSPARENT for a socket of `family`."""
    return (SOL_IPV6, IPV6_TRANSPARENT) if family == socket.AF_INET6 else (SOL_IP, IP_TRANSPARENT)


def listen_socket(family: int, host: str, port: int, transparent: bool, backlog: int = 4096) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            sock.setsockopt(*transparent_option(family), 1)
        # accepted sockets inherit TCP_NODELAY from the listener: one setsockopt fewer per connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def adopt_listen_socket(sock: socket.socket, transparent: bool) -> None:
    """Prepare a listening socket passed by the service manager as listen_socket() prepares its own.

    IP_TRANSPARENT cannot be set without CAP_NET_ADMIN: a TPROXY listener must come with it set
    (Transparent=yes in the socket unit), and an error names what is missing.
    """
    if transparent and not sock.getsockopt(*transparent_option(sock.family)):
        raise OSError(errno.EINVAL,
                      "TPROXY needs IP_TRANSPARENT on the listener (Transparent=yes in its socket unit)")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


class LocalAddresses:
    """Answers "is this IP one of this host's addresses?" by trying to bind it (cached)."""

    def __init__(self) -> None:
        self._cache: dict[str, bool] = {}

    def clear(self) -> None:
        self._cache.clear()

    def is_local(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.is_loopback or addr.is_unspecified:
            result = True
        else:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                return self.is_local(str(addr.ipv4_mapped))
            family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.bind((ip, 0))
                result = True
            except OSError:
                result = False
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[ip] = result
        return result


def can_bind(family: int, ip: str) -> bool:
    """True when `ip` is assigned on this host (used for the passthrough source)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            probe.bind((ip, 0))
        return True
    except OSError:
        return False
