"""`sidecar_probe.py trace` (explain_trace) on real netfilter (root only).

A namespace tr-<hex> stands in for the target host, with the collection's rendered rules (golden files,
iptables-nft and native nftables, both modes), the real proxy (proxy/src, UID 1337) and a peer namespace
tr-<hex>p behind a veth pair (10.251.0.0/24) as the outbound destination. `trace` sends one real probe
(inbound from its own temporary namespace tr-tp-<pid>, outbound from the host) and must report the path
the kernel traced: our chain and the REDIRECT/TPROXY step, or the RETURN of an excluded port or owner.
Afterwards nothing temporary may be left: no trace table or chain, no TRACE rule, no namespace, no
monitor process, also when the probe fails or the run is interrupted. Traffic stays in the namespaces.
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
_spec = importlib.util.spec_from_file_location("capture_local_probe", HERE / "test_local_probe.py")
lp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lp)
netns, sh, SCRIPT, PYTHON = lp.netns, lp.sh, lp.SCRIPT, lp.PYTHON

# namespace names are machine-wide: SIDECAR_TEST_NETNS (default tr-) lets parallel runs use their own
NS = os.environ.get("SIDECAR_TEST_NETNS", "tr-")
PREFIX = NS + "tp-"  # the temporary namespaces `trace` makes here
PEER = "10.251.0.2"
HOST = "10.251.0.1"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables-nft") or not os.path.exists(PYTHON)
    or not shutil.which("setpriv") or not shutil.which("xtables-monitor"),
    reason="needs root, iproute2, iptables (with xtables-monitor), setpriv and /usr/bin/python3")
needs_nft = pytest.mark.skipif(not shutil.which("nft"), reason="needs nft")


@pytest.fixture
def host(tmp_path):
    """A namespace standing in for the target host, with a peer namespace; yields (name, procs, workdir)."""
    name = NS + uuid.uuid4().hex[:8]
    peer = name + "p"
    work = Path(sh("mktemp", "-d", "/tmp/tr-trace-XXXXXX").stdout.strip())
    os.chmod(work, 0o777)
    procs = []
    try:
        for ns in (name, peer):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "tra", "type", "veth", "peer", "name", "trb", "netns", peer)
        sh("ip", "-n", name, "addr", "add", HOST + "/24", "dev", "tra")
        sh("ip", "-n", peer, "addr", "add", PEER + "/24", "dev", "trb")
        sh("ip", "-n", name, "link", "set", "tra", "up")
        sh("ip", "-n", peer, "link", "set", "trb", "up")
        yield name, procs, work
    finally:
        lp.remove_host([name, peer], procs, work, PREFIX)


def start_peer_app(host_name):
    proc = subprocess.Popen(["ip", "netns", "exec", host_name + "p", PYTHON, str(SCRIPT), "serve", "--port", "15080",
                             "--notify"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def run_trace(name, destination, direction, backend, *extra, check=True):
    out = sh("ip", "netns", "exec", name, PYTHON, str(SCRIPT), "trace", "--destination", destination,
             "--direction", direction, "--backend", backend, "--timeout", "3", "--prefix", PREFIX, *extra,
             check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def leftovers(name):
    """Everything a trace could leave in the host namespace (empty when clean)."""
    left = []
    for cmd in (["iptables-nft-save"], ["ip6tables-nft-save"]):
        text = sh("ip", "netns", "exec", name, *cmd, check=False).stdout
        left += [ln for ln in text.splitlines() if "TRACE" in ln]
    if shutil.which("nft"):
        text = sh("ip", "netns", "exec", name, "nft", "list", "tables", check=False).stdout
        left += [ln for ln in text.splitlines() if "sidecar_trace_" in ln]
    left += [ln for ln in sh("ip", "netns", "list").stdout.splitlines() if ln.startswith(PREFIX)]
    left += [ln for ln in sh("ip", "-n", name, "-o", "link", "show").stdout.splitlines() if ": spr" in ln]
    for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
        try:
            comm = Path("/proc/%s/comm" % pid).read_text().strip()
        except OSError:
            continue
        if comm in ("nft", "xtables-monitor", "timeout"):
            left.append("process %s %s" % (pid, comm))
    return left


def deploy(name, work, tmp_path, mode, backend, procs, ipv6=False):
    lp.deploy(name, work, tmp_path, mode, "nftables" if backend == "nftables" else "iptables")
    procs.append(lp.start_proxy(name, mode, work, ipv6))


BACKENDS = [pytest.param("nft", id="iptables-nft"), pytest.param("nftables", marks=needs_nft, id="nftables")]


def ours(out):
    """Our steps that are rules (a base chain's policy of our nftables table is left out)."""
    return [s for s in out["steps"] if s["ours"] and s["rule"] not in ("policy", "verdict")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_trace_of_a_captured_inbound_connection(host, tmp_path, mode, backend):
    name, procs, work = host
    deploy(name, work, tmp_path, mode, backend, procs)
    procs.append(lp.start_app(name))  # the host's application on 15080, behind the proxy
    out = run_trace(name, HOST + ":15080", "inbound", backend)
    assert out["available"] is True, out
    assert out["tool"] == ("nft monitor trace" if backend == "nftables" else "xtables-monitor --trace")
    chains = [s["chain"] for s in ours(out)]
    assert "SIDECAR_INBOUND" in chains, out["steps"]
    want = "TPROXY" if mode == "tproxy" else "REDIRECT"
    last = ours(out)[-1]
    assert last["action"] == want and last["verdict"] == "accept", out["steps"]
    assert (want.lower() if backend == "nftables" else want) in last["rule"]
    # the probe was a real connection from the temporary namespace, and the proxy took it
    assert out["probe"]["ok"] is True, out["probe"]
    assert out["probe"]["source"].startswith("169.254.") and out["netns_removed"] is True
    assert out["left"] == [] and out["problems"] == []
    assert leftovers(name) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_of_an_excluded_inbound_port_ends_in_our_return(host, tmp_path, backend):
    """Port 22 is excluded; nothing listens there, so the probe itself fails (refused): still traced, still clean."""
    name, procs, work = host
    deploy(name, work, tmp_path, "redirect", backend, procs)
    out = run_trace(name, HOST + ":22", "inbound", backend)
    assert out["available"] is True, out
    mine = ours(out)
    assert mine[-1]["chain"] == "SIDECAR_INBOUND" and mine[-1]["action"] == "RETURN", out["steps"]
    assert not any(s["action"] in ("REDIRECT", "TPROXY") for s in out["steps"]), out["steps"]
    assert out["probe"]["ok"] is False and "refused" in out["probe"]["error"]
    assert leftovers(name) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_trace_of_a_captured_outbound_connection(host, tmp_path, mode, backend):
    name, procs, work = host
    deploy(name, work, tmp_path, mode, backend, procs)
    procs.append(start_peer_app(name))
    out = run_trace(name, PEER + ":15080", "outbound", backend)
    assert out["available"] is True, out
    chains = [s["chain"] for s in ours(out)]
    assert "SIDECAR_OUTPUT" in chains, out["steps"]
    assert ours(out)[-1]["action"] == "REDIRECT" and "15001" in ours(out)[-1]["rule"], out["steps"]
    assert out["probe"]["ok"] is True, out["probe"]
    assert out["left"] == [] and leftovers(name) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_of_the_proxys_own_outbound_connection_returns(host, tmp_path, backend):
    name, procs, work = host
    deploy(name, work, tmp_path, "redirect", backend, procs)
    procs.append(start_peer_app(name))
    out = run_trace(name, PEER + ":15080", "outbound", backend, "--uid", "1337", "--gid", "1337")
    mine = ours(out)
    assert mine[-1]["chain"] == "SIDECAR_OUTPUT" and mine[-1]["action"] == "RETURN", out["steps"]
    assert "1337" in mine[-1]["rule"]
    assert out["probe"]["ok"] is True and leftovers(name) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_is_cleaned_up_when_interrupted(host, tmp_path, backend):
    """SIGTERM while the probe hangs (its SYN is dropped): the namespace, marker and monitor all go."""
    name, procs, work = host
    deploy(name, work, tmp_path, "redirect", backend, procs)
    # the peer drops the probe's SYN: the outbound connect hangs until the signal
    sh("ip", "netns", "exec", name + "p", "iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "15080", "-j", "DROP")
    # and our capture lets the peer's address pass, so that the SYN really goes out
    if backend == "nft":
        sh("ip", "netns", "exec", name, "iptables-nft", "-t", "nat", "-I", "OUTPUT", "-d", PEER, "-j", "ACCEPT")
    else:
        sh("ip", "netns", "exec", name, "nft", "insert", "rule", "inet", "sidecar_intercept", "SIDECAR_OUTPUT",
           "ip", "daddr", PEER, "return")
    proc = subprocess.Popen(["ip", "netns", "exec", name, PYTHON, str(SCRIPT), "trace", "--destination",
                             PEER + ":15080", "--direction", "outbound", "--backend", backend, "--timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    time.sleep(2.5)  # past the monitor's start: the connect is waiting now
    assert leftovers(name), "the trace should be running"
    proc.terminate()
    out = json.loads(proc.communicate(timeout=15)[0])
    assert any("signal" in p for p in out["problems"]), out
    assert out["left"] == [] and leftovers(name) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inbound_trace_to_a_foreign_address_is_refused_before_anything_changes(host, tmp_path, backend):
    name, procs, work = host
    deploy(name, work, tmp_path, "redirect", backend, procs)
    out = run_trace(name, PEER + ":8080", "inbound", backend)
    assert out["available"] is False and "is not a (non-loopback) address of this host" in out["reason"]
    assert out["steps"] == [] and leftovers(name) == []


def test_legacy_and_missing_rules_say_why_there_is_no_trace(host):
    name, _procs, _work = host
    out = run_trace(name, HOST + ":8080", "inbound", "legacy")
    assert out["available"] is False and "kernel log" in out["reason"]
    out = run_trace(name, HOST + ":8080", "inbound", "none")
    assert out["available"] is False and "no capture rules" in out["reason"]
    assert leftovers(name) == []


def test_cleanup_removes_a_killed_traces_marker(host):
    """A run killed outright (SIGKILL) leaves its chain; the next trace or `cleanup` removes it."""
    name, _procs, _work = host
    dead = subprocess.Popen(["true"])
    dead.wait()
    chain = "SCTRACE_%d" % dead.pid
    sh("ip", "netns", "exec", name, "iptables-nft", "-t", "nat", "-N", chain)
    sh("ip", "netns", "exec", name, "iptables-nft", "-t", "nat", "-I", "PREROUTING", "-j", chain)
    out = json.loads(sh("ip", "netns", "exec", name, PYTHON, str(SCRIPT), "cleanup", "--prefix", PREFIX).stdout)
    assert "nat/" + chain in out["removed"]
    assert chain not in sh("ip", "netns", "exec", name, "iptables-nft-save").stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_of_a_captured_ipv6_outbound_connection(host, tmp_path, backend):
    name, procs, work = host
    sh("ip", "-n", name, "addr", "add", "fd00:251::1/64", "dev", "tra", "nodad")
    sh("ip", "-n", name + "p", "addr", "add", "fd00:251::2/64", "dev", "trb", "nodad")
    deploy(name, work, tmp_path, "redirect", backend, procs)
    if backend == "nft":
        rules = (netns.GOLDEN / "redirect-defaults.ipv6.rules").read_text()
        result = netns.run_module(name, tmp_path, family="ipv6", backend="nft", rules=rules)
        assert result["changed"] and not result.get("failed"), result
    procs.append(start_peer_app(name))
    out = run_trace(name, "[fd00:251::2]:15080", "outbound", backend)
    assert out["left"] == [] and leftovers(name) == []
    assert out["available"] is True, out
    if backend == "nft" and out["tool"] != "xtables-monitor --trace":
        # xtables-monitor 1.8.9 (Debian 12) exits on IPv6 TCP rules ("Parsing nftables rule failed"):
        # the same events were read with nft instead, and the result says so
        assert out["tool"].startswith("nft monitor trace (fallback"), out
        assert "Parsing nftables rule failed" in out["notes"][0], out
    assert out["problems"] == [], out
    assert {s["family"] for s in out["steps"]} <= {"ipv6", "inet"}
    assert "SIDECAR_OUTPUT" in [s["chain"] for s in ours(out)], out["steps"]
    assert ours(out)[-1]["action"] == "REDIRECT", out["steps"]
    assert out["left"] == [] and leftovers(name) == []


def add_ipv6(name, tmp_path, backend):
    """The host namespace's IPv6 address (fd00:251::1) and, on iptables-nft, the IPv6 rules."""
    sh("ip", "-n", name, "addr", "add", "fd00:251::1/64", "dev", "tra", "nodad")
    sh("ip", "-n", name + "p", "addr", "add", "fd00:251::2/64", "dev", "trb", "nodad")
    if backend == "nft":
        rules = (netns.GOLDEN / "redirect-defaults.ipv6.rules").read_text()
        result = netns.run_module(name, tmp_path, family="ipv6", backend="nft", rules=rules)
        assert result["changed"] and not result.get("failed"), result


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_of_a_captured_ipv6_inbound_connection(host, tmp_path, backend):
    """From the probe namespace's unique-local address to the host's IPv6 address, through PREROUTING."""
    name, procs, work = host
    add_ipv6(name, tmp_path, backend)
    deploy(name, work, tmp_path, "redirect", backend, procs, ipv6=True)
    procs.append(lp.start_app(name))
    out = run_trace(name, "[fd00:251::1]:15080", "inbound", backend)
    assert out["available"] is True, out
    assert {s["family"] for s in out["steps"]} <= {"ipv6", "inet"}, out["steps"]
    assert "SIDECAR_INBOUND" in [s["chain"] for s in ours(out)], out["steps"]
    last = ours(out)[-1]
    assert last["action"] == "REDIRECT" and last["verdict"] == "accept", out["steps"]
    assert out["probe"]["source"].startswith("fd5c:9e0b:7a41:"), out["probe"]
    assert out["probe"]["ok"] is True, out["probe"]
    if backend == "nft":
        assert out["tool"] == "xtables-monitor --trace" or out["tool"].startswith("nft monitor trace (fallback")
    assert out["problems"] == [], out
    assert out["netns_removed"] is True and out["left"] == [] and leftovers(name) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_of_an_excluded_ipv6_inbound_port_ends_in_our_return(host, tmp_path, backend):
    name, procs, work = host
    deploy(name, work, tmp_path, "redirect", backend, procs)
    add_ipv6(name, tmp_path, backend)
    out = run_trace(name, "[fd00:251::1]:22", "inbound", backend)
    assert out["available"] is True, out
    mine = ours(out)
    assert mine[-1]["chain"] == "SIDECAR_INBOUND" and mine[-1]["action"] == "RETURN", out["steps"]
    assert out["probe"]["ok"] is False and "refused" in out["probe"]["error"]
    assert leftovers(name) == []
