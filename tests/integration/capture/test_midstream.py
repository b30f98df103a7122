"""Connections that were open before connection tracking started (root only).

A host without any netfilter rule that needs conntrack (no firewall, no container engine: a minimal
VM) does not track connections at all. The capture's nat/conntrack rules switch tracking on when they
are loaded, and the kernel then picks up the connections already open in the middle of their stream
(nf_conntrack_tcp_loose): the first packet it sees of each is treated like the first packet of a new
connection. Found in the fleet scenario over SSH: deploying the capture cut Ansible's own open SSH
connections (ControlPersist) to hosts that had no rules before; new connections worked. Before the fix
(only a SYN is redirected or diverted: rules.MIDSTREAM) 7 of the 8 untracked cases here failed.

Topology: a client namespace and a vm namespace joined by a veth, and NO rules in the vm before the
capture. Long-lived connections from the client: to the vm's port 22 (excluded, like sshd) and to its
port 9000 (a captured app port). After the capture is applied, each side speaks first once.
"""

from __future__ import annotations

import textwrap

import pytest

import test_netns
from test_netns_forward import LONG, Lab

pytestmark = test_netns.pytestmark

# An echo server that also pushes a line to every client when told on its stdin (the host speaks first).
PUSH = textwrap.dedent("""
    import socket, sys, threading
    fam = socket.AF_INET6 if sys.argv[1] == "ipv6" else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(sys.argv[2])))
    s.listen(16)
    conns = []
    def serve(c):
        with c:
            while True:
                data = c.recv(100)
                if not data:
                    return
                c.sendall(b"echo " + data)
    def accept():
        while True:
            c, _ = s.accept()
            conns.append(c)
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        for c in conns:
            try:
                c.sendall(b"push")
            except OSError:
                pass
""")

# A client that holds one connection: "send WORD" sends and prints the answer, "read" prints what arrives.
HOLD = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print("connected", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        try:
            if cmd[0] == "send":
                s.sendall(cmd[1].encode())
            print(s.recv(100).decode() or "closed", flush=True)
        except OSError as exc:
            print(type(exc).__name__, flush=True)
""")


class QuietLab(Lab):
    """The client and the vm only. `tracked`: the vm has a conntrack rule (as any firewall or container
    engine has) before the connections open - the control case; otherwise no rule at all."""

    def __init__(self, family, backend, tracked):
        super().__init__(family, backend)
        self.tracked = tracked

    def build(self):
        a, t = self.a, self.tag
        for role in ("client", "vm"):
            self.ns(role)
        self.link("client", "mc" + t, a["client"], "vm", "mv" + t, a["vm1"])
        if self.tracked:
            self.ipt("vm", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT")


@pytest.fixture(params=[("ipv4", "iptables", False), ("ipv4", "nftables", False), ("ipv4", "iptables", True)],
                ids=lambda p: "-".join(p[:2]) + ("-tracked" if p[2] else "-untracked"))
def quiet(request):
    lab = QuietLab(*request.param)
    try:
        lab.build()
        yield lab
    finally:
        lab.cleanup()


def hold(lab, port):
    proc = lab.start("client", HOLD, lab.a["vm1"], str(port))
    assert proc.stdout.readline().strip() == "connected", proc.stderr.read()
    return proc


def say(proc, line):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_open_connections_survive_the_first_capture_when_the_host_speaks_first(quiet, tmp_path, mode):
    """sshd (port 22, never captured) answers on a connection opened before any rule existed: its
    reply is the first packet conntrack sees, in OUTPUT, where the outbound chain redirected it."""
    lab, a = quiet, quiet.a
    server = lab.start("vm", PUSH, lab.family, "22")
    assert server.stdout.readline().strip() == "ready", server.stderr.read()
    ssh = hold(lab, 22)
    assert say(ssh, "send before") == "echo before"
    lab.capture(tmp_path, sidecar_mode=mode)
    lab.server("vm", mode, 15006)
    lab.server("vm", "redirect", 15001, "outbound")
    server.stdin.write("push\n")
    server.stdin.flush()
    assert say(ssh, "read") == "push"
    assert say(ssh, "send after") == "echo after"
    assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]  # and new ones are captured


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_open_connections_survive_the_first_capture_when_the_client_speaks_first(quiet, tmp_path, mode):
    """An app connection to a captured port (9000) opened before any rule existed keeps working."""
    lab, a = quiet, quiet.a
    lab.echo("vm", 9000)
    app = lab.start("client", LONG, a["vm1"], "9000")
    app.stdin.write("before\n")
    app.stdin.flush()
    assert app.stdout.readline().strip() == "echo before"
    lab.capture(tmp_path, sidecar_mode=mode)
    lab.server("vm", mode, 15006)
    lab.server("vm", "redirect", 15001, "outbound")
    app.stdin.write("after\n")
    app.stdin.flush()
    assert app.stdout.readline().strip() == "echo after"
    assert lab.ask("client", a["vm1"], 8080) == "proxy %s 8080" % a["vm1"]
