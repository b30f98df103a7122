"""Fixtures: network namespaces with real REDIRECT / TPROXY rules, a proxy process, test servers.

Namespaces are named `spx-*`, veths `spx*`, addresses 10.231.0.0/16 and fd00:231::/64 exist only inside
namespaces created here. Everything is removed by finalizers, and stale `spx-` namespaces from an
interrupted earlier run are swept at session start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
REPO = HERE.parents[1]
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

CLONE_NEWNET = 0x40000000
PROXY_UID = 1337


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, input=input)


def can_netns() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root"
    for tool in ("ip", "iptables", "ip6tables"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def ns_pids(name: str) -> list[int]:
    out = _run("ip", "netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split()]


def delete_ns(name: str) -> None:
    for pid in ns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _run("ip", "netns", "del", name, check=False)


def _owner_alive(name: str) -> bool:
    """Namespaces are named spx-<pid of the pytest run>-<tag>-<side>: is that run still going?"""
    parts = name.split("-")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Remove namespaces left by an earlier, killed run; never those of a run still going."""
    out = _run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("spx-") and not _owner_alive(name):
            delete_ns(name)


@pytest.fixture(scope="session", autouse=True)
def _session_setup() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if can_netns() is None:
        sweep_stale()
    yield


# ---------------------------------------------------------------------------- namespace entry
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_ns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run fn in a short-lived thread that has entered netns `ns` (setns is per thread)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["v"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


def ns_socket(ns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket that lives in namespace `ns` (usable from any thread afterwards)."""
    return in_ns(ns, lambda: socket.socket(family, socket.SOCK_STREAM))  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- topology
class Topo:
    """Client namespace <-veth-> server namespace, both families, capture rules in the server ns."""

    def __init__(self) -> None:
        tag = f"{random.randrange(16**6):06x}"
        self.n = random.randrange(1, 250)
        self.cns = f"spx-{os.getpid()}-{tag}-c"
        self.sns = f"spx-{os.getpid()}-{tag}-s"
        self.cveth = f"spx{tag}c"
        self.sveth = f"spx{tag}s"
        self.c4 = f"10.231.{self.n}.1"
        self.s4 = f"10.231.{self.n}.2"
        self.c6 = f"fd00:231::{self.n:x}:1"
        self.s6 = f"fd00:231::{self.n:x}:2"
        self.created: list[str] = []

    def ip(self, family: int) -> tuple[str, str]:
        return (self.c6, self.s6) if family == socket.AF_INET6 else (self.c4, self.s4)

    def up(self) -> None:
        for ns in (self.cns, self.sns):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", self.cveth, "netns", self.cns, "type", "veth", "peer", "name", self.sveth,
             "netns", self.sns)
        ends = ((self.cns, self.cveth, self.c4, self.c6), (self.sns, self.sveth, self.s4, self.s6))
        for ns, dev, a4, a6 in ends:
            _run("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            _run("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        # the inbound passthrough source for IPv6, as the capture role adds it
        _run("ip", "-n", self.sns, "addr", "add", "::6/128", "dev", "lo", "nodad")
        _run("ip", "-n", self.cns, "addr", "add", "::6/128", "dev", "lo", "nodad")

    def down(self) -> None:
        for ns in self.created:
            delete_ns(ns)
        self.created.clear()

    def sh(self, ns: str, *cmd: str) -> str:
        return _run("ip", "netns", "exec", ns, *cmd).stdout

    def restore(self, ns: str, v4: str, v6: str) -> None:
        _run("ip", "netns", "exec", ns, "iptables-restore", "--noflush", input=v4)
        _run("ip", "netns", "exec", ns, "ip6tables-restore", "--noflush", input=v6)

    # The capture rules are the collection's own (tests/golden/regen.py renders roles/capture's template
    # from the one settings definition, exactly as the role does), not a copy: what the proxy is tested
    # behind is what hosts run.
    def capture(self, ns: str, **settings: Any) -> None:
        for family, restore in (("ipv4", "iptables-restore"), ("ipv6", "ip6tables-restore")):
            _run("ip", "netns", "exec", ns, restore, "--noflush", input=capture_rules(settings, family))
        if settings.get("sidecar_mode") == "tproxy":
            resolved = capture_settings(settings)
            for fam in ("-4", "-6"):
                _run("ip", "-n", ns, fam, "rule", "add", "fwmark", resolved["tproxy_fwmark"],
                     "lookup", str(resolved["tproxy_table"]))
                _run("ip", "-n", ns, fam, "route", "add", "local", "default", "dev", "lo",
                     "table", str(resolved["tproxy_table"]))

    def redirect_inbound(self, port: int = 15006) -> None:
        self.capture(self.sns, sidecar_mode="redirect", sidecar_inbound_port=port)

    def tproxy_inbound(self, port: int = 15006, mark: int = 1337, table: int = 133) -> None:
        self.capture(self.sns, sidecar_mode="tproxy", sidecar_inbound_port=port, sidecar_tproxy_mark=mark,
                     sidecar_tproxy_table=table)

    def redirect_outbound(self, port: int = 15001, uid: int = PROXY_UID) -> None:
        self.capture(self.cns, sidecar_outbound_port=port, sidecar_proxy_uid=uid)


def _regen() -> Any:
    import importlib.util
    spec = importlib.util.spec_from_file_location("golden_regen", REPO / "tests" / "golden" / "regen.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def capture_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The resolved settings (plugins/module_utils/settings.py) for these overrides."""
    resolved: dict[str, Any] = _regen().resolved(settings)
    return resolved


def capture_rules(settings: dict[str, Any], family: str) -> str:
    """The capture role's iptables-restore rules for these settings and family."""
    rules: str = _regen().render(settings, family)
    return rules


@pytest.fixture
def topo() -> Iterator[Topo]:
    why = can_netns()
    if why:
        pytest.skip(why)
    t = Topo()
    try:
        t.up()
        yield t
    finally:
        t.down()


# ---------------------------------------------------------------------------- proxy process
_PY_FOR_UID: dict[int, str] = {}


def python_for_uid(uid: int) -> str:
    """An interpreter (>= 3.10) that `uid` can run: ours may live under root's home (pyenv)."""
    if uid not in _PY_FOR_UID:
        for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
            res = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", cand, "-c",
                                  "import sys; assert sys.version_info >= (3, 10)"], capture_output=True)
            if res.returncode == 0:
                _PY_FOR_UID[uid] = cand
                break
        else:
            pytest.skip(f"no Python >= 3.10 usable by uid {uid}")
    return _PY_FOR_UID[uid]


class Proxy:
    def __init__(self, ns: str, cfg: dict[str, Any], tmp: Path, as_uid: int | None = None,
                 env: dict[str, str] | None = None, nofile: int | None = None,
                 passed: list[tuple[str, socket.socket]] | None = None, caps: bool = True) -> None:
        self.ns = ns
        self.own_tmp = as_uid is not None
        if as_uid is not None:  # pytest's tmp dirs are private to root
            tmp = Path(tempfile.mkdtemp(prefix="spx-"))
            os.chmod(tmp, 0o777)
        self.cfg = {"access_log": str(tmp / "access.log"), **cfg}
        self.tmp = tmp
        self.path = tmp / "config.json"
        self.path.write_text(json.dumps(self.cfg))
        self.log_path = tmp / "proxy.stderr"
        self.admin_port = int(self.cfg.get("admin_port", 15000))
        cmd = ["ip", "netns", "exec", ns]
        if nofile is not None:
            cmd += ["prlimit", f"--nofile={nofile}:{nofile}"]
        if as_uid is not None:
            os.chmod(self.path, 0o644)
            cmd += ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups"]
            if caps:
                cmd += ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"]
            else:
                cmd += ["--inh-caps=-all", "--bounding-set=-all"]
        python = sys.executable if as_uid is None else python_for_uid(as_uid)
        pass_fds: tuple[int, ...] = ()
        if passed:
            # what systemd does for a socket-activated service: the sockets become fds 3.., and the
            # final process (LISTEN_PID) gets LISTEN_FDS / LISTEN_FDNAMES
            pass_fds = tuple(sock.fileno() for _, sock in passed)
            cmd += [python, str(HERE / "sd_launch.py"), ":".join(name for name, _ in passed),
                    ",".join(str(fd) for fd in pass_fds)]
        cmd += [python, "-m", "sidecar_proxy", "--config", str(self.path)]
        full_env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONDONTWRITEBYTECODE="1", **(env or {}))
        self.stderr = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr, env=full_env,
                                     pass_fds=pass_fds)
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}: {self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                status, _ = self.admin("/ready")
                if status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"proxy not ready: {self.log_path.read_text()}")

    def admin(self, path: str) -> tuple[int, str]:
        s = ns_socket(self.ns)
        try:
            s.settimeout(5)
            s.connect(("127.0.0.1", self.admin_port))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode()

    def stats(self) -> dict[str, Any]:
        status, body = self.admin("/stats")
        assert status == 200
        return json.loads(body)  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return self.admin("/metrics")[1]

    def access_log(self) -> list[dict[str, Any]]:
        p = Path(self.cfg["access_log"])
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def rewrite(self, **changes: Any) -> None:
        self.cfg.update(changes)
        self.path.write_text(json.dumps(self.cfg))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_until(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError("condition not reached in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.stderr.close()
        if self.own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(ns: str, cfg: dict[str, Any] | None = None, **kw: Any) -> Proxy:
        sub = tmp_path / f"p{len(started)}"
        sub.mkdir()
        p = Proxy(ns, cfg or {}, sub, **kw)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


# ---------------------------------------------------------------------------- test servers
class Server:
    """A threaded TCP server in a namespace; `handler(conn)` runs in a thread per connection."""

    def __init__(self, ns: str, family: int, port: int, handler: Callable[[socket.socket, Any], None],
                 host: str | None = None) -> None:
        self.sock = ns_socket(ns, family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        self.sock.listen(4096)
        self.handler = handler
        self.peers: list[Any] = []
        self.conns: list[socket.socket] = []
        self.closed = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn, peer)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


def echo(conn: socket.socket, _peer: Any) -> None:
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(ns: str, family: int, port: int, handler: Callable[[socket.socket, Any], None] = echo,
              **kw: Any) -> Server:
        s = Server(ns, family, port, handler, **kw)
        servers.append(s)
        return s

    try:
        yield start
    finally:
        for s in servers:
            s.close()


def connect(ns: str, family: int, addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    s = ns_socket(ns, family)
    s.settimeout(timeout)
    s.connect(addr)
    return s


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk
