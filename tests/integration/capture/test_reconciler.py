"""The reconciler (`sidecar-capture repair` / `watch`, roles/capture/files/sidecar-capture.py) on real
netfilter in throwaway network namespaces (fw-*): each kind of firewall reload that removes or reorders
the capture is repaired, nothing foreign is touched, a stopped capture (fail open: the proxy is down)
is never added back, and the watch loop repairs a reload within 10 s. All three backends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
COMMAND = ROOT / "roles" / "capture" / "files" / "sidecar-capture.py"
LIB = ROOT / "plugins" / "module_utils"
GOLDEN = ROOT / "tests" / "golden" / "cases"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft")
    or not shutil.which("iptables-nft") or not shutil.which("iptables-legacy"),
    reason="needs root, iproute2, nft and iptables (legacy + nft)")

# A firewall and a container engine already on the host (what a reload puts back).
FOREIGN = [
    "-t filter -P INPUT DROP",
    "-t filter -A INPUT -i lo -j ACCEPT",
    "-t filter -A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT",
    "-t nat -N DOCKER",
    "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
    "-t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
    "-t nat -A DOCKER -p tcp -m tcp --dport 18080 -j DNAT --to-destination 10.89.82.9:80",
    "-t mangle -A PREROUTING -p udp -m udp --dport 5353 -j MARK --set-xmark 0x7/0xff",
]
FOREIGN_NFT = """flush ruleset
table inet filter {
\tchain input {
\t\ttype filter hook input priority filter; policy drop;
\t\tiif "lo" accept
\t\ttcp dport 8080 accept
\t}
}
"""


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30, **kw)


@pytest.fixture
def ns():
    name = "fw-rc-" + uuid.uuid4().hex[:8]
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", name, check=False)


def ipt(backend, family="ipv4", action=""):
    base = {"ipv4": "iptables", "ipv6": "ip6tables"}[family] + "-" + backend
    return base + ("-" + action if action else "")


class Host:
    def __init__(self, name, tmp_path, backend, case, mode):
        self.name, self.dir, self.backend = name, tmp_path, backend
        conf = {"backend": backend, "families": ["ipv4", "ipv6"], "mode": mode, "mark": "0x539/0xfff",
                "table": 133, "jump_position": "first", "dir": str(tmp_path)}
        (tmp_path / "capture.json").write_text(json.dumps(conf))
        if backend == "nftables":
            shutil.copy(GOLDEN / ("%s.nft" % case), tmp_path / "rules.nft")
        else:
            for fam in ("ipv4", "ipv6"):
                shutil.copy(GOLDEN / ("%s.%s.rules" % (case, fam)), tmp_path / ("rules.%s" % fam.replace("ip", "")))
        self.env = dict(os.environ, SIDECAR_CAPTURE_CONFIG=str(tmp_path / "capture.json"), SIDECAR_CAPTURE_LIB=str(LIB),
                        SIDECAR_CAPTURE_STATE=str(tmp_path / "active"), SIDECAR_CAPTURE_LOCK=str(tmp_path / "lock"))

    def x(self, *args, check=True, **kw):
        return sh("ip", "netns", "exec", self.name, *args, check=check, **kw)

    def cmd(self, action):
        return self.x(sys.executable, str(COMMAND), action, check=False, env=self.env)

    @staticmethod
    def iptables_view(text):
        """Rules and non-default policies per table (iptables-nft makes empty base chains as it needs them)."""
        view, table = [], None
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and " ACCEPT " not in line and "SIDECAR_" not in line:
                view.append("%s %s" % (table, line.split("[", 1)[0].strip()))
            elif line.startswith("-A") and "SIDECAR_" not in line:
                view.append("%s %s" % (table, line))
        return view

    def foreign(self):
        """Everything that is not ours: iptables-save of both tools and families (counters and comments
        dropped, our chains and jumps filtered out), nft tables other than ours, ip rules not ours."""
        views = []
        for backend in ("legacy", "nft"):
            for fam in ("ipv4", "ipv6"):
                views.append(self.iptables_view(self.x(ipt(backend, fam, "save")).stdout))
        xt = {"table %s %s" % (f, t) for f in ("ip", "ip6") for t in ("filter", "nat", "mangle", "raw", "security")}
        tables = [t for t in self.x("nft", "list", "tables").stdout.splitlines()
                  if "sidecar_intercept" not in t and t not in xt]  # (iptables-nft's: seen by iptables-nft-save)
        for t in tables:
            views.append(self.x("nft", "list", *t.split()).stdout)
        views.append([r for r in self.x("ip", "rule").stdout.splitlines() if "lookup 133" not in r])
        return views


def install_foreign(host):
    if host.backend == "nftables":
        host.x("nft", "-f", "-", input=FOREIGN_NFT)
        return
    for rule in FOREIGN:
        host.x(ipt(host.backend), *rule.split())


def started(host):
    install_foreign(host)
    out = host.cmd("start")
    assert out.returncode == 0, out.stderr
    assert host.cmd("check").returncode == 0, host.cmd("check").stdout


def repaired(host, expect):
    """The capture is broken (check says so), one repair puts it back, and a second finds nothing."""
    drift = host.cmd("check")
    assert drift.returncode == 1, "the reload did not break the capture"
    assert expect in drift.stdout, drift.stdout
    foreign = host.foreign()
    out = host.cmd("repair")
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout, out.stdout
    assert host.cmd("check").returncode == 0, host.cmd("check").stdout
    assert host.foreign() == foreign, "the repair touched something that is not ours"
    again = host.cmd("repair")
    assert again.returncode == 0 and again.stdout == "", again.stdout


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_iptables_restore_of_a_saved_ruleset(ns, tmp_path, backend):
    """iptables-restore (without --noflush) of the ruleset saved before the capture: our chains and jumps are gone."""
    host = Host(ns, tmp_path, backend, "tproxy-ports", "tproxy")
    install_foreign(host)
    saved = {fam: host.x(ipt(backend, fam, "save")).stdout for fam in ("ipv4", "ipv6")}
    assert host.cmd("start").returncode == 0
    for fam in ("ipv4", "ipv6"):
        host.x(ipt(backend, fam, "restore"), input=saved[fam])
    repaired(host, "create chain SIDECAR_INBOUND")


@pytest.mark.parametrize("backend", ["nft", "nftables"])
def test_nft_f_of_a_full_ruleset_with_flush_ruleset(ns, tmp_path, backend):
    """`nft -f` of a firewall's whole ruleset (flush ruleset first): the table of iptables-nft or ours is gone."""
    host = Host(ns, tmp_path, backend, "redirect-outbound", "redirect")
    started(host)
    host.x("nft", "-f", "-", input=FOREIGN_NFT)
    repaired(host, "table inet sidecar_intercept is missing" if backend == "nftables" else "create chain SIDECAR_OUTPUT")


def test_legacy_is_not_affected_by_nft_flush_ruleset(ns, tmp_path):
    host = Host(ns, tmp_path, "legacy", "redirect-outbound", "redirect")
    started(host)
    host.x("nft", "-f", "-", input=FOREIGN_NFT)
    assert host.cmd("check").returncode == 0
    assert host.cmd("repair").stdout == ""


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_container_engine_restart_reinserts_its_chain_first(ns, tmp_path, backend):
    """A Docker restart deletes its jumps and inserts them at the top again: our nat OUTPUT jump is moved
    back to the top (jump_position=first); the nat PREROUTING jump stays after the DNAT jump (always appended)."""
    host = Host(ns, tmp_path, backend, "tproxy-ports", "tproxy")
    started(host)
    tool = ipt(backend)
    for chain, match in (("PREROUTING", "-m addrtype --dst-type LOCAL"),
                         ("OUTPUT", "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL")):
        host.x(tool, "-t", "nat", "-D", chain, *match.split(), "-j", "DOCKER")
        host.x(tool, "-t", "nat", "-I", chain, "1", *match.split(), "-j", "DOCKER")
    repaired(host, "nat: move jump -A OUTPUT -p tcp -j SIDECAR_OUTPUT to the top of OUTPUT")
    output = [r for r in host.x(ipt(backend, action="save"), "-t", "nat").stdout.splitlines() if r.startswith("-A OUTPUT")]
    assert output[0] == "-A OUTPUT -p tcp -j SIDECAR_OUTPUT", output
    assert "nat: move jump -A PREROUTING" not in host.cmd("check").stdout


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_container_engine_started_after_the_capture_appends_its_dnat_jump(ns, tmp_path, backend):
    """Redirect mode: a DNAT jump appended after our nat PREROUTING jump would lose published ports to the
    proxy; our jump goes back to the end, so the DNAT decides first."""
    host = Host(ns, tmp_path, backend, "redirect-defaults", "redirect")
    started(host)
    tool = ipt(backend)
    host.x(tool, "-t", "nat", "-D", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER")
    host.x(tool, "-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER")
    repaired(host, "move jump -A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j SIDECAR_INBOUND to the end")
    pre = [r for r in host.x(ipt(backend, action="save"), "-t", "nat").stdout.splitlines() if r.startswith("-A PREROUTING")]
    assert pre[-1].endswith("-j SIDECAR_INBOUND") and pre[0].endswith("-j DOCKER"), pre


@pytest.mark.parametrize("backend", ["nft", "nftables"])
def test_tproxy_routes_removed(ns, tmp_path, backend):
    """A network reload that drops the policy routing (ip rule, table 133) and ::6: put back, nothing else."""
    host = Host(ns, tmp_path, backend, "tproxy-ports", "tproxy")
    started(host)
    host.x("ip", "-4", "rule", "del", "fwmark", "0x539/0xfff", "lookup", "133")
    host.x("ip", "-6", "route", "flush", "table", "133")
    repaired(host, "ipv4: no ip rule fwmark 0x539/0xfff lookup 133")
    assert host.x("ip", "-4", "rule").stdout.count("lookup 133") == 1


@pytest.mark.parametrize("backend", ["nft", "nftables"])
def test_stopped_capture_is_never_added_back(ns, tmp_path, backend):
    """Fail open: the proxy is down, so the capture was stopped; a repair (or one racing the stop) adds nothing."""
    host = Host(ns, tmp_path, backend, "redirect-outbound", "redirect")
    started(host)
    assert host.cmd("stop").returncode == 0
    before = host.foreign()
    assert host.cmd("check").returncode == 1
    out = host.cmd("repair")
    assert out.returncode == 0 and out.stdout == ""
    assert host.cmd("check").returncode == 1
    assert host.foreign() == before
    assert "SIDECAR" not in host.x(ipt("nft", action="save")).stdout
    assert "sidecar_intercept" not in host.x("nft", "list", "tables").stdout


@pytest.mark.parametrize("backend", ["legacy", "nftables"])
def test_watch_repairs_a_reload_within_10_seconds(ns, tmp_path, backend):
    """The loop sidecar-capture-watch.service runs: a reload is repaired within 10 s and said so once."""
    host = Host(ns, tmp_path, backend, "redirect-outbound", "redirect")
    started(host)
    env = dict(host.env, SIDECAR_CAPTURE_INTERVAL="1")
    log = tmp_path / "watch.log"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", host.name, sys.executable, str(COMMAND), "watch"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.5)
        assert log.read_text() == "", "the watch loop logs while the capture is intact"
        if backend == "nftables":
            host.x("nft", "-f", "-", input=FOREIGN_NFT)
        else:
            saved = host.x(ipt(backend, action="save")).stdout
            host.x(ipt(backend, action="restore"), input="\n".join(
                line for line in saved.splitlines() if "SIDECAR_" not in line) + "\n")
        t0 = time.monotonic()
        while host.cmd("check").returncode != 0:
            assert time.monotonic() - t0 < 10, "not repaired within 10 s: %s" % log.read_text()
            time.sleep(0.2)
        time.sleep(1.5)
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sidecar-capture: repaired the capture: "), lines
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0
