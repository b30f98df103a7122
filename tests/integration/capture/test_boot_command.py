"""sidecar-capture (roles/capture/files/sidecar-capture.py), the command sidecar-capture.service runs at
boot, on real netfilter in throwaway network namespaces: start loads the rules files, is idempotent
and repairs drift, check reports drift, stop removes exactly what start added, with both kinds of
backend. It imports the collection's module_utils/iptables.py (as installed on a host), so the boot
path plans with the same code as the iptables_chains module."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
COMMAND = ROOT / "roles" / "capture" / "files" / "sidecar-capture.py"
LIB = ROOT / "plugins" / "module_utils"

_spec = importlib.util.spec_from_file_location("capture_netns", HERE / "test_netns.py")
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)
sh, ns, GOLDEN = netns.sh, netns.ns, netns.GOLDEN

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft") or not shutil.which("iptables-nft"),
    reason="needs root, iproute2, nft and iptables")


def command(name, conf_dir, action):
    env = dict(os.environ, SIDECAR_CAPTURE_CONFIG=str(conf_dir / "capture.json"), SIDECAR_CAPTURE_LIB=str(LIB))
    return sh("ip", "netns", "exec", name, sys.executable, str(COMMAND), action, check=False, env=env)


def setup(tmp_path, backend, case, mode):
    conf = {"backend": backend, "families": ["ipv4", "ipv6"], "mode": mode, "mark": "0x539/0xfff", "table": 133,
            "jump_position": "first", "dir": str(tmp_path)}
    (tmp_path / "capture.json").write_text(json.dumps(conf))
    if backend == "nftables":
        shutil.copy(GOLDEN / ("%s.nft" % case), tmp_path / "rules.nft")
    else:
        for fam in ("ipv4", "ipv6"):
            shutil.copy(GOLDEN / ("%s.%s.rules" % (case, fam)), tmp_path / ("rules.%s" % fam.replace("ip", "")))


def state(name, backend):
    """What must be byte-identical after stop. With the iptables backend, the iptables view (iptables-nft
    keeps the empty base chains it once made in its nft tables; iptables-save does not show them)."""
    views = [["ip", "-4", "rule"], ["ip", "-6", "rule"], ["ip", "-6", "addr", "show", "dev", "lo"]]
    views += [["nft", "list", "ruleset"]] if backend == "nftables" else [["iptables-nft-save"], ["ip6tables-nft-save"]]
    return ["\n".join(line for line in sh("ip", "netns", "exec", name, *cmd).stdout.splitlines()
                      if not line.startswith("#")) for cmd in views]


@pytest.mark.parametrize("backend,case,mode", [("nft", "tproxy-ports", "tproxy"), ("nft", "redirect-outbound", "redirect"),
                                               ("nftables", "tproxy-ports", "tproxy"), ("nftables", "redirect-defaults", "redirect")])
def test_start_check_stop(ns, tmp_path, backend, case, mode):
    name = ns()
    for rule in netns.FOREIGN:
        sh("ip", "netns", "exec", name, "iptables-nft", *rule.split())
    for rule in netns.FOREIGN6:  # (iptables-nft keeps a table it made, empty, after removal)
        sh("ip", "netns", "exec", name, "ip6tables-nft", *rule.split())
    before = state(name, backend)
    setup(tmp_path, backend, case, mode)
    assert command(name, tmp_path, "check").returncode == 1
    for _attempt in range(2):
        out = command(name, tmp_path, "start")
        assert out.returncode == 0, out.stderr
        assert command(name, tmp_path, "check").returncode == 0
    saved = sh("ip", "netns", "exec", name, "iptables-nft-save").stdout
    if backend == "nft":
        assert saved.count("-j SIDECAR_OUTPUT") == 1
        sh("ip", "netns", "exec", name, "iptables-nft", "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "SIDECAR_OUTPUT")
        drift = command(name, tmp_path, "check")
        assert drift.returncode == 1 and "add jump -A OUTPUT -p tcp -j SIDECAR_OUTPUT" in drift.stdout, drift.stdout
        assert command(name, tmp_path, "start").returncode == 0
        assert command(name, tmp_path, "check").returncode == 0
    else:
        assert "SIDECAR" not in saved
        assert "table inet sidecar_intercept" in sh("ip", "netns", "exec", name, "nft", "list", "tables").stdout
    rules4 = sh("ip", "netns", "exec", name, "ip", "-4", "rule").stdout
    assert ("lookup 133" in rules4) == (mode == "tproxy")
    assert rules4.count("lookup 133") <= 1
    assert command(name, tmp_path, "stop").returncode == 0
    assert command(name, tmp_path, "stop").returncode == 0
    assert state(name, backend) == before
