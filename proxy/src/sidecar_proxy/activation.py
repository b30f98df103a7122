"""Listening sockets handed over by the service manager (the sd_listen_fds protocol, standard library only).

systemd passes sockets that outlive the process: the file descriptors 3 .. 3+LISTEN_FDS-1, LISTEN_PID
(the process they are meant for) and LISTEN_FDNAMES (colon-separated FileDescriptorName= values). The
proxy takes them instead of binding its listeners, so a restart or an upgrade closes no listener: the
kernel queues new connections in the socket's backlog until the next process accepts them.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import MutableMapping

SD_LISTEN_FDS_START = 3
ENV_NAMES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """The LISTEN_* variables are present but wrong (named in the message)."""


def parse(env: MutableMapping[str, str], pid: int) -> list[tuple[int, str]]:
    """(fd, name) of the sockets passed to process `pid`; [] when none were passed to it.

    LISTEN_PID must equal `pid` (variables inherited from a parent are for the parent, not for us).
    A LISTEN_FDNAMES with another count than LISTEN_FDS is an error; missing names are "unknown", as
    sd_listen_fds_with_names() reports them.
    """
    raw_pid = env.get("LISTEN_PID")
    raw_fds = env.get("LISTEN_FDS")
    if raw_pid is None or raw_fds is None:
        return []
    try:
        listen_pid = int(raw_pid)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={raw_pid!r} is not a process id") from None
    if listen_pid != pid:
        return []
    try:
        count = int(raw_fds)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={raw_fds!r} is not a number") from None
    if count < 0 or count > 1024:
        raise ActivationError(f"LISTEN_FDS={raw_fds!r} is out of range (0..1024)")
    raw_names = env.get("LISTEN_FDNAMES")
    if raw_names is None:
        names = ["unknown"] * count
    else:
        names = raw_names.split(":") if raw_names else []
        if len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES={raw_names!r} names {len(names)} sockets, LISTEN_FDS={count}")
    return [(SD_LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def unset(env: MutableMapping[str, str]) -> None:
    """Remove the LISTEN_* variables, so that no child process takes them for its own."""
    for name in ENV_NAMES:
        env.pop(name, None)


class Inherited:
    """The passed sockets, looked up by (family, port); each one is handed out once."""

    def __init__(self, socks: list[tuple[str, socket.socket]]) -> None:
        self.socks = socks

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None,
                         pid: int | None = None) -> Inherited:
        """Take the passed sockets (and unset the variables); close-on-exec is set on each of them."""
        env = os.environ if env is None else env
        try:
            fds = parse(env, os.getpid() if pid is None else pid)
        finally:
            unset(env)
        socks: list[tuple[str, socket.socket]] = []
        for fd, name in fds:
            try:
                mode = os.fstat(fd).st_mode
            except OSError as exc:
                raise ActivationError(f"passed fd {fd} ({name}) is not open: {exc}") from None
            if not stat.S_ISSOCK(mode):
                raise ActivationError(f"passed fd {fd} ({name}) is not a socket")
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                raise ActivationError(
                    f"passed fd {fd} ({name}) is not a TCP socket ({sock.family!r}, {sock.type!r})")
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ActivationError(f"passed fd {fd} ({name}) is not listening")
            socks.append((name, sock))
        return cls(socks)

    def __len__(self) -> int:
        return len(self.socks)

    def describe(self) -> str:
        return ", ".join(f"{name}={sock.getsockname()[0]}:{sock.getsockname()[1]}"
                         for name, sock in self.socks)

    def put_back(self, name: str, sock: socket.socket) -> None:
        self.socks.append((name, sock))

    def take(self, family: int, port: int) -> tuple[str, socket.socket] | None:
        """The passed socket listening on `port` in `family`, removed from the pool; None if none."""
        for i, (name, sock) in enumerate(self.socks):
            if sock.family == family and sock.getsockname()[1] == port:
                del self.socks[i]
                return name, sock
        return None
