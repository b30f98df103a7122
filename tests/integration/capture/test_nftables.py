"""The native nftables backend (nft_table module + rules.nft.j2, via the golden files) on real
netfilter in throwaway network namespaces (root only): check mode reports drift with a diff, bad rules
change nothing, and removal leaves every other table (a firewall's, iptables-nft's) byte-identical.
(Connections through REDIRECT and TPROXY over IPv4 and IPv6 on this backend: test_netns.py, which runs
the same checks on both backends.)

Namespaces are named scap-* and removed in a finally block (the fixture of test_netns.py); traffic
stays inside them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("capture_netns", HERE / "test_netns.py")
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)
sh, GOLDEN = netns.sh, netns.GOLDEN
ns = netns.ns  # the fixture

MODULE = "ansible_collections.sidecar.intercept.plugins.modules.nft_table"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
                                reason="needs root, iproute2 and nft")

# A host firewall of its own (policy accept so that the test traffic passes) and a table that
# iptables-nft made: neither may change.
FOREIGN = """
table inet filter {
    set allowed { type inet_service; elements = { 22, 8080 } }
    chain input { type filter hook input priority filter; policy accept; tcp dport @allowed counter accept; }
}
table ip nat {
    chain PREROUTING { type nat hook prerouting priority dstnat; policy accept; tcp dport 18080 counter dnat to 10.232.9.9:80; }
}
"""


def run_module(name, tmp_path, **args):
    path = tmp_path / ("args-%s.json" % uuid.uuid4().hex[:6])
    args.setdefault("_ansible_diff", True)
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    out = sh("ip", "netns", "exec", name, sys.executable, "-m", MODULE, str(path), check=False)
    return json.loads(out.stdout)


def ruleset(name):
    return sh("ip", "netns", "exec", name, "nft", "list", "ruleset").stdout


@pytest.mark.parametrize("case", ["redirect-outbound", "tproxy-ports", "tproxy-outbound", "redirect-ports"])
def test_apply_idempotent_drift_remove_leaves_other_tables(ns, tmp_path, case):
    name = ns()
    sh("ip", "netns", "exec", name, "nft", "-f", "-", input=FOREIGN)
    before = ruleset(name)
    rules = (GOLDEN / ("%s.nft" % case)).read_text()
    first = run_module(name, tmp_path, rules=rules)
    assert first["changed"] and not first.get("failed"), first
    assert first["changes"] == ["create table inet sidecar_intercept"]
    again = run_module(name, tmp_path, rules=rules)
    assert again["changed"] is False, again
    # drift: a rule deleted from a chain and a rule added to another; check mode reports, changes nothing
    listing = sh("ip", "netns", "exec", name, "nft", "-a", "list", "chain", "inet", "sidecar_intercept",
                 "SIDECAR_OUTPUT").stdout
    handle = [line.rsplit("# handle ", 1)[1] for line in listing.splitlines() if "skuid" in line][0]
    sh("ip", "netns", "exec", name, "nft", "delete", "rule", "inet", "sidecar_intercept", "SIDECAR_OUTPUT",
       "handle", handle)
    sh("ip", "netns", "exec", name, "nft", "add", "rule", "inet", "sidecar_intercept", "SIDECAR_REDIRECT", "return")
    drifted = ruleset(name)
    check = run_module(name, tmp_path, rules=rules, _ansible_check_mode=True)
    assert check["changed"], check
    assert set(check["changes"]) == {"rewrite chain SIDECAR_OUTPUT", "rewrite chain SIDECAR_REDIRECT"}, check
    assert "meta skuid 1337 counter return" in check["diff"]["after"]
    assert "meta skuid" not in check["diff"]["before"]
    assert ruleset(name) == drifted
    assert run_module(name, tmp_path, rules=rules)["changed"]
    assert run_module(name, tmp_path, rules=rules)["changed"] is False
    gone = run_module(name, tmp_path, state="absent")
    assert gone["changed"] and gone["changes"] == ["delete table inet sidecar_intercept"], gone
    assert run_module(name, tmp_path, state="absent")["changed"] is False
    assert ruleset(name) == before


def test_bad_rules_change_nothing(ns, tmp_path):
    name = ns()
    sh("ip", "netns", "exec", name, "nft", "-f", "-", input=FOREIGN)
    good = (GOLDEN / "redirect-defaults.nft").read_text()
    assert run_module(name, tmp_path, rules=good)["changed"]
    before = ruleset(name)
    bad = good.replace("redirect to :15006", "redirect to :99999")
    result = run_module(name, tmp_path, rules=bad)
    assert result.get("failed") and "nothing was changed" in result["msg"], result
    assert ruleset(name) == before
    other = run_module(name, tmp_path, rules=good.replace("table inet sidecar_intercept", "table inet other"))
    assert other.get("failed") and "not inet sidecar_intercept" in other["msg"], other
