"""The single-host verification (`sidecar_probe.py local`) on real netfilter (root only).

A namespace sh-<hex> stands in for the target host: the collection's rendered rules (golden files,
both modes, iptables and native nftables), the real proxy (proxy/src, UID 1337, access log in a file)
and the probe application on 15080. `local` then makes its own temporary namespace inside it, probes
inbound (from that namespace, through PREROUTING) and outbound (from the host, through OUTPUT), and
must find both in the proxy's counters and access log with the right original destination, and
remove its namespace. Everything is removed in a finally block; traffic stays in the namespaces.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SCRIPT = ROOT / "playbooks" / "files" / "sidecar_probe.py"
PROXY_SRC = ROOT / "proxy" / "src"
_spec = importlib.util.spec_from_file_location("capture_netns", HERE / "test_netns.py")
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)
sh = netns.sh

PYTHON = "/usr/bin/python3"  # UID 1337 must be able to run it (the test's own may live under /root)
# namespace names are machine-wide: SIDECAR_TEST_NETNS (default sh-) lets parallel runs use their own
NS = os.environ.get("SIDECAR_TEST_NETNS", "sh-")
PREFIX = NS + "probe-"  # the temporary namespaces `local` makes here

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables-nft") or not os.path.exists(PYTHON)
    or not shutil.which("setpriv"),
    reason="needs root, iproute2, iptables, setpriv and /usr/bin/python3")


@pytest.fixture
def host(tmp_path):
    """A namespace standing in for the target host; yields (name, procs, workdir)."""
    name = NS + uuid.uuid4().hex[:8]
    work = Path(sh("mktemp", "-d", "/tmp/sh-probe-XXXXXX").stdout.strip())
    os.chmod(work, 0o777)
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    procs = []
    try:
        yield name, procs, work
    finally:
        remove_host([name], procs, work, PREFIX)


def remove_host(namespaces, procs, work, prefix):
    """Stop the test's processes, kill what still runs in its namespaces and delete them, its work
    directory, and every namespace named `prefix`... that the probe under test may have left."""
    for p in procs:
        p.kill()
        p.wait(timeout=5)
    for ns in namespaces:
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(work, ignore_errors=True)
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        if line.startswith(prefix):
            sh("ip", "netns", "del", line.split()[0], check=False)


def start_proxy(name, mode, work, ipv6=False):
    cfg = {"mode": mode, "inbound_port": 15006, "outbound_port": 15001, "admin_port": 15000,
           "access_log": str(work / "access.log"), "ipv6": ipv6}
    (work / "proxy.json").write_text(json.dumps(cfg))
    os.chmod(work / "proxy.json", 0o644)
    cmd = ["ip", "netns", "exec", name, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups",
           "--inh-caps=+net_admin", "--ambient-caps=+net_admin", PYTHON, "-m", "sidecar_proxy",
           "--config", str(work / "proxy.json")]
    env = dict(os.environ, PYTHONPATH=str(PROXY_SRC), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    code = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:15000/ready', timeout=1)"
    for _attempt in range(50):
        if sh("ip", "netns", "exec", name, PYTHON, "-c", code, check=False).returncode == 0:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("proxy not ready")


def start_app(name):
    proc = subprocess.Popen(["ip", "netns", "exec", name, PYTHON, str(SCRIPT), "serve", "--port", "15080", "--notify"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def run_local(name, work, *extra):
    out = sh("ip", "netns", "exec", name, PYTHON, str(SCRIPT), "local", "--admin-port", "15000", "--port", "15080",
             "--count", "2", "--timeout", "3", "--log-file", str(work / "access.log"), "--prefix", PREFIX, *extra,
             check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def deploy(name, work, tmp_path, mode, backend):
    if backend == "nftables":
        result = netns.run_module(name, tmp_path, module="nft_table",
                                  rules=(netns.GOLDEN / ("%s-defaults.nft" % mode)).read_text())
    else:
        rules = (netns.GOLDEN / ("%s-defaults.ipv4.rules" % mode)).read_text()
        result = netns.run_module(name, tmp_path, family="ipv4", backend="nft", rules=rules)
    assert result["changed"] and not result.get("failed"), result
    if mode == "tproxy":
        netns.tproxy_routes(name, False)


@pytest.mark.parametrize("backend", ["iptables", pytest.param("nftables", marks=pytest.mark.skipif(
    not shutil.which("nft"), reason="needs nft"))])
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_local_probe_goes_through_the_proxy_with_the_original_destination(host, tmp_path, mode, backend):
    name, procs, work = host
    deploy(name, work, tmp_path, mode, backend)
    procs.append(start_proxy(name, mode, work))
    procs.append(start_app(name))
    out = run_local(name, work)
    assert out["intercepted"] is True, out["problems"]
    assert out["delta"]["inbound"] >= 2 and out["delta"]["outbound"] >= 2
    found = {f["direction"]: f for f in out["evidence"]["found"]}
    assert found["inbound"]["dst"] == "%s:15080" % out["host_address"]
    assert found["outbound"]["dst"] == "%s:15080" % out["netns_address"]
    # the inbound client was the temporary namespace (a remote client), not the host itself
    assert found["inbound"]["lines"][-1]["src"].startswith(out["netns_address"] + ":")
    assert out["inbound"]["replied"] == 2 and out["outbound"]["replied"] == 2
    assert out["removed"] is True and out["netns"].startswith(PREFIX)
    assert out["netns"] not in sh("ip", "netns", "list").stdout
    links = sh("ip", "-n", name, "-o", "link", "show").stdout
    assert "spr" not in links, links


def test_local_probe_without_capture_names_what_is_missing(host, tmp_path):
    """The proxy runs, the app answers, but no rules: the probes reach the app directly."""
    name, procs, work = host
    procs.append(start_proxy(name, "redirect", work))
    procs.append(start_app(name))
    out = run_local(name, work)
    assert out["intercepted"] is False
    assert "inbound connection counter grew by 0, expected at least 1" in out["problems"]
    assert "no outbound access-log line with dst=%s:15080" % out["netns_address"] in out["problems"]
    assert out["removed"] is True


def test_local_probe_avoids_the_hosts_networks_and_sweeps_a_killed_runs_leftovers(host, tmp_path):
    name, procs, work = host
    # a killed run: its namespace (named after a PID that no longer runs) and its host-side veth
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = "%s%d" % (PREFIX, dead.pid)
    sh("ip", "netns", "add", stale)
    sh("ip", "-n", name, "link", "add", "spr%dh" % dead.pid, "type", "veth", "peer", "name", "spr%dn" % dead.pid)
    # the host uses 169.254.0.0/17 itself (and --avoid takes 169.254.128.0/18): what is left is 169.254.192.0/18
    sh("ip", "-n", name, "link", "add", "shused0", "type", "veth", "peer", "name", "shused1")
    sh("ip", "-n", name, "addr", "add", "169.254.0.1/17", "dev", "shused0")
    procs.append(start_proxy(name, "redirect", work))
    procs.append(start_app(name))
    out = run_local(name, work, "--avoid", "169.254.128.0/18")
    assert stale in out["swept"] and "spr%dh" % dead.pid in out["swept"]
    assert stale not in sh("ip", "netns", "list").stdout
    assert out["network"].startswith("169.254.") and int(out["network"].split(".")[2]) >= 192, out["network"]
    assert out["removed"] is True


def test_cleanup_keeps_a_running_probes_namespace(host):
    name, procs, work = host
    alive = "%s%d" % (PREFIX, os.getpid())  # this test runs: not stale
    sh("ip", "netns", "add", alive)
    try:
        out = sh("ip", "netns", "exec", name, PYTHON, str(SCRIPT), "cleanup", "--prefix", PREFIX)
        assert alive not in json.loads(out.stdout)["removed"]
        assert alive in sh("ip", "netns", "list").stdout
    finally:
        sh("ip", "netns", "del", alive, check=False)


def test_local_probe_removes_its_namespace_when_interrupted(host, tmp_path):
    """SIGTERM (Ansible's timeout, a Ctrl-C on the controller) in the middle of the probes."""
    name, procs, work = host
    procs.append(start_proxy(name, "redirect", work))
    # no probe app and a long timeout: the inbound probe hangs until the signal
    sh("ip", "netns", "exec", name, "iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "15080", "-j", "DROP")
    proc = subprocess.Popen(["ip", "netns", "exec", name, PYTHON, str(SCRIPT), "local", "--admin-port", "15000",
                             "--port", "15080", "--count", "1", "--timeout", "20", "--prefix", PREFIX, "--no-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    for _attempt in range(50):
        if PREFIX in sh("ip", "netns", "list").stdout:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.terminate()
    stdout = proc.communicate(timeout=15)[0]
    out = json.loads(stdout)
    assert out["removed"] is True and out["intercepted"] is False
    assert any("signal" in p for p in out["problems"]), out["problems"]
    assert PREFIX not in sh("ip", "netns", "list").stdout
