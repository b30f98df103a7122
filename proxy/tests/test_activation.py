"""Socket activation: the LISTEN_* parser, and real sockets passed to proxy processes as systemd does."""

from __future__ import annotations

import signal
import socket
from typing import Any

import pytest
from conftest import PROXY_UID, Topo, connect, ns_socket, recv_all

from sidecar_proxy import activation
from sidecar_proxy.activation import ActivationError, parse, unset

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


# ---------------------------------------------------------------------------- parser
def test_no_variables_means_no_sockets() -> None:
    assert parse({}, 42) == []
    assert parse({"LISTEN_FDS": "2"}, 42) == []


def test_sockets_for_this_process_with_names() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "inbound:outbound:inbound"}
    assert parse(env, 42) == [(3, "inbound"), (4, "outbound"), (5, "inbound")]


def test_missing_names_are_unknown() -> None:
    assert parse({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, 7) == [(3, "unknown"), (4, "unknown")]


def test_variables_of_another_process_are_ignored() -> None:
    # inherited from a parent that was activated: they are not ours
    assert parse({"LISTEN_PID": "41", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, 42) == []


@pytest.mark.parametrize(("env", "named"), [
    ({"LISTEN_PID": "x1", "LISTEN_FDS": "1"}, "LISTEN_PID='x1'"),
    ({"LISTEN_PID": "5", "LISTEN_FDS": "two"}, "LISTEN_FDS='two'"),
    ({"LISTEN_PID": "5", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1'"),
    ({"LISTEN_PID": "5", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "inbound"}, "LISTEN_FDNAMES='inbound'"),
    ({"LISTEN_PID": "5", "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""}, "LISTEN_FDNAMES=''"),
])
def test_bad_variables_name_the_value(env: dict[str, str], named: str) -> None:
    with pytest.raises(ActivationError, match=named.replace("[", r"\[")):
        parse(env, 5)


def test_unset_removes_only_the_listen_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "PATH": "/bin"}
    unset(env)
    assert env == {"PATH": "/bin"}


def test_from_environment_unsets_even_when_not_ours() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert len(activation.Inherited.from_environment(env, pid=2)) == 0
    assert env == {}


# ---------------------------------------------------------------------------- real processes
def listening(ns: str, family: int, port: int, transparent: bool) -> socket.socket:
    """A listener made by 'systemd' (this root test), in the proxy's namespace."""
    s = ns_socket(ns, family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        s.setsockopt(*((41, IPV6_TRANSPARENT) if family == socket.AF_INET6 else (0, IP_TRANSPARENT)), 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(4096)
    return s


def passed_set(ns: str, tproxy: bool) -> list[tuple[str, socket.socket]]:
    return [(name, listening(ns, fam, port, tproxy and name == "inbound"))
            for fam in (socket.AF_INET, socket.AF_INET6)
            for name, port in (("inbound", 15006), ("outbound", 15001))]


def caps(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":") for line in f if line.startswith("Cap"))}


def roundtrip(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    return recv_all(s)


def test_tproxy_through_passed_sockets_needs_no_capability(topo: Topo, start_proxy: Any, serve: Any) -> None:
    topo.tproxy_inbound()
    passed = passed_set(topo.sns, tproxy=True)
    try:
        proxy = start_proxy(topo.sns, {"mode": "tproxy", "ipv6": True}, as_uid=PROXY_UID, caps=False,
                            passed=passed)
        assert caps(proxy.proc.pid)["CapEff"] == 0 and caps(proxy.proc.pid)["CapBnd"] == 0
        ports = {socket.AF_INET: 9090, socket.AF_INET6: 9091}
        servers = {family: serve(topo.sns, family, port) for family, port in ports.items()}
        for family, port in ports.items():
            with connect(topo.cns, family, (topo.ip(family)[1], port)) as s:
                assert roundtrip(s, b"activated") == b"activated"
        # through the proxy: the app sees the passthrough source
        assert [servers[f].peers[0][0] for f in servers] == ["127.0.0.6", "::6"]
        proxy.wait_until(lambda: len(proxy.access_log()) == 2)
        # the proxy bound nothing itself: its listeners are the passed sockets
        assert "socket activation: 4 passed sockets" in proxy.log_path.read_text()
        assert {(x["direction"], x["tproxy"]) for x in proxy.stats()["listeners"]} >= {
            ("inbound", True), ("outbound", False)}
    finally:
        for _, s in passed:
            s.close()


def test_without_transparent_a_tproxy_listener_is_refused_by_name(topo: Topo, start_proxy: Any) -> None:
    passed = passed_set(topo.sns, tproxy=False)
    try:
        with pytest.raises(RuntimeError, match=r"passed socket inbound on port 15006: .*Transparent=yes"):
            start_proxy(topo.sns, {"mode": "tproxy", "ipv6": True}, as_uid=PROXY_UID, caps=False,
                        passed=passed)
    finally:
        for _, s in passed:
            s.close()


def test_a_restart_on_passed_sockets_refuses_nothing(topo: Topo, start_proxy: Any, serve: Any) -> None:
    """Between two proxy processes the kernel queues connections; the next process serves them."""
    topo.redirect_inbound()
    passed = passed_set(topo.sns, tproxy=False)
    try:
        first = start_proxy(topo.sns, {"ipv6": True}, passed=passed)
        srv = serve(topo.sns, socket.AF_INET, 8080)
        with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:
            assert roundtrip(s, b"first") == b"first"
        first.signal(signal.SIGTERM)
        first.proc.wait(10)
        # no process listens now, but the socket does: this connection is queued, not refused
        waiting = connect(topo.cns, socket.AF_INET, (topo.s4, 8080), timeout=15)
        waiting.sendall(b"queued")
        waiting.shutdown(socket.SHUT_WR)
        second = start_proxy(topo.sns, {"ipv6": True}, passed=passed)
        assert recv_all(waiting) == b"queued"
        waiting.close()
        assert [p[0] for p in srv.peers] == ["127.0.0.6", "127.0.0.6"]
        second.wait_until(lambda: len(second.access_log()) == 1)
        assert second.access_log()[0]["dst"] == f"{topo.s4}:8080"
    finally:
        for _, s in passed:
            s.close()
