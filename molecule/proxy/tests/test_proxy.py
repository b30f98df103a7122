"""Verify the proxy role on the Molecule hosts (testinfra over `podman exec`).

The hosts run sidecar-proxy as deployed by converge + side_effect: Debian 12 in redirect mode,
Debian 13 in tproxy mode. Traffic stays inside each container (loopback only)."""

from __future__ import annotations

import json
import re

import pytest

CAP_NET_ADMIN = 1 << 12
SERVICE = "sidecar-proxy.service"

# a tiny echo server and a client inside the container; the client's connection to 127.0.0.1:PORT is
# redirected by the test's nat rule to the proxy's outbound listener, which forwards it to the server
ECHO = r"""
import socket, sys, threading
port = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(4); srv.settimeout(10)
def serve():
    conn, _ = srv.accept()
    with conn:
        data = conn.recv(65536)
        conn.sendall(b"echo:" + data)
threading.Thread(target=serve, daemon=True).start()
cli = socket.create_connection(("127.0.0.1", port), timeout=10)
cli.sendall(b"through-the-proxy")
cli.shutdown(socket.SHUT_WR)
reply = b""
while True:
    chunk = cli.recv(65536)
    if not chunk:
        break
    reply += chunk
print(reply.decode())
"""


def config(host):
    return json.loads(host.file("/etc/sidecar-proxy/config.json").content_string)


def main_pid(host) -> int:
    return int(host.check_output(f"systemctl show -p MainPID --value {SERVICE}"))


def admin(host, path: str) -> str:
    return host.check_output(
        "python3 -c 'import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "
        f"http://127.0.0.1:15000{path}"
    )


def test_service_enabled_and_running_as_proxy_user(host):
    svc = host.service("sidecar-proxy")
    assert svc.is_running
    assert svc.is_enabled
    status = host.file(f"/proc/{main_pid(host)}/status").content_string
    assert re.search(r"^Uid:\s+1337\s+1337\s+1337\s+1337$", status, re.MULTILINE)
    assert re.search(r"^Gid:\s+1337\s+1337\s+1337\s+1337$", status, re.MULTILINE)
    user = host.user("sidecar-proxy")
    assert user.uid == 1337 and user.gid == 1337
    assert user.shell == "/usr/sbin/nologin"


def test_memory_of_the_service_is_bounded(host):
    # MemoryMax (sidecar_proxy_memory_max, default 512M) as systemd applies it to the running unit
    limit = host.check_output("systemctl show -p MemoryMax --value sidecar-proxy.service").strip()
    assert limit == str(512 * 1024 * 1024)


def test_no_capability_in_either_mode(host):
    # the TPROXY listener's IP_TRANSPARENT is set by systemd on the socket unit (Transparent=yes)
    status = host.file(f"/proc/{main_pid(host)}/status").content_string
    caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.MULTILINE)}
    assert caps["CapEff"] == caps["CapAmb"] == caps["CapBnd"] == caps["CapPrm"] == 0
    assert CAP_NET_ADMIN & caps["CapBnd"] == 0


def test_listeners_are_socket_units_passed_to_the_proxy(host):
    mode = config(host)["mode"]
    for direction, port in (("inbound", 15006), ("outbound", 15001)):
        unit = f"sidecar-proxy-{direction}.socket"
        assert host.service(unit).is_running and host.service(unit).is_enabled
        text = host.file(f"/etc/systemd/system/{unit}").content_string
        assert f"ListenStream=0.0.0.0:{port}" in text
        assert ("Transparent=yes" in text) == (mode == "tproxy" and direction == "inbound")
    listeners = json.loads(admin(host, "/stats"))["listeners"]
    assert listeners and all(x["activated"] == x["direction"] for x in listeners), listeners
    assert {x["tproxy"] for x in listeners if x["direction"] == "inbound"} == {mode == "tproxy"}
    # the listening socket belongs to systemd (pid 1); the proxy's copy is not listed: root in these
    # containers lacks CAP_SYS_PTRACE to read the fds of UID 1337 (/stats "activated" above shows it)
    ss = host.check_output("ss -Hltnp 'sport = :15006'")
    assert '("systemd",pid=1,' in ss, ss


def test_exposure_score_at_most_2(host):
    out = host.check_output(f"systemd-analyze security --no-pager {SERVICE}")
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    print(f"{host.backend.get_hostname()}: exposure {score}")
    assert score <= 2.0


def test_ready_metrics_and_stats(host):
    assert admin(host, "/ready").strip() == "ready"
    metrics = admin(host, "/metrics")
    assert "sidecar_proxy_connections_total" in metrics
    stats = json.loads(admin(host, "/stats"))
    assert stats["config"]["mode"] == config(host)["mode"]


def test_config_and_install_layout(host):
    f = host.file("/etc/sidecar-proxy/config.json")
    assert f.user == "root" and f.group == "sidecar-proxy" and f.mode == 0o640
    current = host.file("/opt/sidecar-proxy/current")
    assert current.is_symlink
    assert current.linked_to.startswith("/opt/sidecar-proxy/releases/")
    assert host.file(current.linked_to + "/.complete").exists
    releases = host.check_output("ls /opt/sidecar-proxy/releases").split()
    assert 1 <= len(releases) <= 2
    # the unit runs the current release with the rendered config
    unit = host.file("/etc/systemd/system/sidecar-proxy.service").content_string
    assert ("ExecStart=/usr/bin/python3 -I -u /opt/sidecar-proxy/current/sidecar-proxy.pyz "
            "--config /etc/sidecar-proxy/config.json") in unit
    # a release is the zipapp and its marker, nothing else (no venv, no wheel, no pip)
    assert sorted(host.check_output(f"ls -A {current.linked_to}").split()) == [".complete", "sidecar-proxy.pyz"]


def test_host_has_no_venv_support(host):
    # the images lack python3-venv (scripts/lab-image.sh): the role needs only python3 on the host
    assert not host.package("python3-venv").is_installed
    assert host.run("python3 -c 'import ensurepip'").rc != 0
    assert not host.run("ls -d /usr/share/python-wheels/pip-*.whl").succeeded


def test_bad_config_is_rejected_by_check_config(host):
    cmd = host.run(
        "tmp=$(mktemp) && echo '{\"inbound_port\": 70000}' > $tmp && "
        "python3 -I /opt/sidecar-proxy/current/sidecar-proxy.pyz --check-config $tmp; rc=$?; rm -f $tmp; exit $rc"
    )
    assert cmd.rc == 1
    assert "inbound_port" in cmd.stderr and "70000" in cmd.stderr


@pytest.mark.parametrize("port", [18081])
def test_real_connection_through_the_outbound_listener(host, port):
    before = json.loads(admin(host, "/stats"))
    rule = (f"-p tcp -d 127.0.0.1 --dport {port} -m owner ! --uid-owner 1337 "
            f"-m comment --comment sidecar-proxy-molecule -j REDIRECT --to-ports 15001")
    host.check_output(f"iptables -w -t nat -I OUTPUT 1 {rule}")
    try:
        reply = host.check_output(f"timeout 20 python3 -c '{ECHO}' {port}")
    finally:
        host.run(f"iptables -w -t nat -D OUTPUT {rule}")
    assert reply == "echo:through-the-proxy"
    journal = host.check_output(f"journalctl -u {SERVICE} --no-pager -o cat -n 50")
    lines = [json.loads(x) for x in journal.splitlines() if x.startswith("{")]
    assert any(e.get("direction") == "outbound" and e.get("dst") == f"127.0.0.1:{port}" for e in lines), journal
    after = json.loads(admin(host, "/stats"))
    assert json.dumps(after) != json.dumps(before)
    assert "sidecar-proxy-molecule" not in host.check_output("iptables -w -t nat -S OUTPUT")
