"""module_utils/explain.py: the verdict for one connection, evaluated from rules recorded on a real
host (explain/*: `iptables-nft-save -c` of nat + mangle with a Docker-like DNAT chain, and
`nft list table inet sidecar_intercept`, taken from the golden cases in a network namespace)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.sidecar.intercept.plugins.module_utils import explain as ex

REC = Path(__file__).resolve().parent / "explain"
HOST4 = ["10.89.0.2", "127.0.0.1"]
HOST6 = ["fd00:89::2", "::1"]


def ipt(name):
    return ex.from_iptables((REC / name).read_text())


def nft():
    return ex.from_nft((REC / "tproxy-outbound.nft.list").read_text())


def run(chains, endpoint, direction, local, **kw):
    family, addr, port = ex.parse_endpoint(endpoint)
    return ex.explain(chains, family, addr, port, direction, local, **kw)


# (rules, destination, direction, kwargs, verdict, owned chain of the deciding rule, words of the reason)
CASES = [
    # redirect mode, iptables (nft backend), outbound include 10.0.0.0/8 + 192.168.1.10, excludes 53, 443, 10.96/12
    ("redirect-outbound.ipv4.save", "10.89.0.2:8080", "inbound", {}, "captured", "SIDECAR_IN_REDIRECT", "15006"),
    ("redirect-outbound.ipv4.save", "10.89.0.2:22", "inbound", {}, "excluded_port", "SIDECAR_INBOUND", "port 22"),
    ("redirect-outbound.ipv4.save", "10.89.0.2:18080", "inbound", {}, "bypass", "DOCKER", "DNAT"),
    ("redirect-outbound.ipv4.save", "172.17.0.5:8080", "inbound", {}, "forwarded", None, "forwarded"),
    ("redirect-outbound.ipv4.save", "10.1.2.3:5432", "outbound", {}, "captured", "SIDECAR_REDIRECT", "15001"),
    ("redirect-outbound.ipv4.save", "10.96.0.10:5432", "outbound", {}, "excluded_cidr", "SIDECAR_OUTPUT", "10.96.0.10"),
    ("redirect-outbound.ipv4.save", "10.1.2.3:443", "outbound", {}, "excluded_port", "SIDECAR_OUTPUT", "port 443"),
    ("redirect-outbound.ipv4.save", "10.1.2.3:5432", "outbound", {"uid": 1337, "gid": 1337}, "owner",
     "SIDECAR_OUTPUT", "UID 1337"),
    ("redirect-outbound.ipv4.save", "10.1.2.3:5432", "outbound", {"uid": 0, "gid": 1337}, "owner",
     "SIDECAR_OUTPUT", "GID 1337"),
    ("redirect-outbound.ipv4.save", "127.0.0.1:8080", "outbound", {}, "loopback", "SIDECAR_OUTPUT", "loopback"),
    ("redirect-outbound.ipv4.save", "10.89.0.2:8080", "outbound", {}, "loopback", "SIDECAR_OUTPUT", "loopback"),
    ("redirect-outbound.ipv4.save", "8.8.8.8:80", "outbound", {}, "not_captured", None, "no rule"),
    # tproxy mode, iptables, IPv6
    ("tproxy-defaults.ipv6.save", "[fd00:89::2]:8080", "inbound", {}, "captured", "SIDECAR_TPROXY", "TPROXY"),
    ("tproxy-defaults.ipv6.save", "[fd00:89::2]:22", "inbound", {}, "excluded_port", "SIDECAR_INBOUND", "port 22"),
    ("tproxy-defaults.ipv6.save", "[fd00:89::2]:8080", "inbound", {"src": "::1"}, "loopback", "SIDECAR_INBOUND",
     "loopback"),
    ("tproxy-defaults.ipv6.save", "[fd00:99::7]:80", "outbound", {}, "captured", "SIDECAR_REDIRECT", "15001"),
    ("tproxy-defaults.ipv6.save", "[fd00:99::9]:8080", "inbound", {}, "forwarded", None, "forwarded"),
]


@pytest.mark.parametrize("rules, dest, direction, kw, verdict, chain, words", CASES,
                         ids=["%s-%s-%s-%s" % (c[0].split(".")[0], c[1], c[2], c[4]) for c in CASES])
def test_iptables_verdicts(rules, dest, direction, kw, verdict, chain, words):
    local = HOST6 if "ipv6" in rules else HOST4
    out = run(ipt(rules), dest, direction, local, **kw)
    assert out["verdict"] == verdict, out
    assert out["captured"] is (verdict == "captured")
    assert (out["rule"] or {}).get("chain") == chain, out
    assert words in out["reason"], out["reason"]
    assert out["notes"] == []


NFT_CASES = [
    # tproxy mode, native nftables: outbound include 10.0.0.0/8 and fd00::/8, exclude 10.0.0.1 and port 5432
    ("10.89.0.2:8080", "inbound", {}, "captured", "SIDECAR_TPROXY", "TPROXY"),
    ("[fd00:89::2]:8080", "inbound", {}, "captured", "SIDECAR_TPROXY", "TPROXY"),
    ("10.89.0.2:22", "inbound", {}, "excluded_port", "SIDECAR_INBOUND", "port 22"),
    ("10.3.3.3:80", "outbound", {}, "captured", "SIDECAR_REDIRECT", "15001"),
    ("10.0.0.1:80", "outbound", {}, "excluded_cidr", "SIDECAR_OUTPUT", "10.0.0.1"),
    ("10.3.3.3:5432", "outbound", {}, "excluded_port", "SIDECAR_OUTPUT", "5432"),
    ("10.3.3.3:80", "outbound", {"uid": 1337}, "owner", "SIDECAR_OUTPUT", "UID 1337"),
    ("192.168.5.5:80", "outbound", {}, "not_captured", None, "no rule"),
    ("172.17.0.9:80", "inbound", {}, "forwarded", None, "forwarded"),
]


@pytest.mark.parametrize("dest, direction, kw, verdict, chain, words", NFT_CASES,
                         ids=["%s-%s-%s" % (c[0], c[1], c[3]) for c in NFT_CASES])
def test_nftables_verdicts(dest, direction, kw, verdict, chain, words):
    out = run(nft(), dest, direction, HOST4 + HOST6, **kw)
    assert out["verdict"] == verdict, out
    assert (out["rule"] or {}).get("chain") == chain, out
    assert words in out["reason"], out["reason"]
    assert out["notes"] == []


def test_the_path_lists_every_rule_met_with_its_counters():
    out = run(ipt("redirect-outbound.ipv4.save"), "10.89.0.2:8080", "inbound", HOST4)
    assert [(s["chain"], s["index"]) for s in out["path"]] == [
        ("PREROUTING", 1), ("PREROUTING", 2), ("SIDECAR_INBOUND", 2), ("SIDECAR_IN_REDIRECT", 3)]
    assert all(s["counters"] == [0, 0] for s in out["path"])
    # the Docker jump is not ours, the jump into SIDECAR_INBOUND is
    assert [s["owned"] for s in out["path"]] == [False, True, True, True]


def test_a_connections_first_packet_passes_the_midstream_returns():
    """The RETURNs for packets without SYN (or with ACK) are evaluated, not noted: a new connection's
    first packet is a SYN, so they never decide; a rule that wanted other flags would."""
    text = (REC / "redirect-outbound.ipv4.save").read_text()
    assert "! --tcp-flags SYN SYN -j RETURN" in text and "tcp flags ! syn" in (REC / "tproxy-outbound.nft.list").read_text()
    flipped = text.replace("-A SIDECAR_IN_REDIRECT -p tcp -m tcp ! --tcp-flags SYN SYN -j RETURN",
                           "-A SIDECAR_IN_REDIRECT -p tcp -m tcp --tcp-flags SYN SYN -j RETURN")
    out = run(ex.from_iptables(flipped), "10.89.0.2:8080", "inbound", HOST4)
    assert out["verdict"] != "captured" and out["rule"]["chain"] == "SIDECAR_IN_REDIRECT", out
    assert out["notes"] == []


def test_a_match_explain_cannot_evaluate_is_named():
    text = (REC / "redirect-outbound.ipv4.save").read_text().replace(
        "[0:0] -A SIDECAR_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "[0:0] -A SIDECAR_INBOUND -p tcp -m recent --rcheck -j RETURN")
    out = run(ex.from_iptables(text), "10.89.0.2:8080", "inbound", HOST4)
    assert out["verdict"] == "captured"
    assert "--rcheck" in out["notes"][0] and "taken as not matching" in out["notes"][0]


@pytest.mark.parametrize("value, message", [
    ("10.0.0.5", "expected IP:PORT"),
    ("10.0.0.500:80", "is not an IP address"),
    ("10.0.0.5:0", "port 0 is not in 1-65535"),
    ("fd00::5:80", "expected IP:PORT"),
])
def test_bad_destination_names_the_value(value, message):
    with pytest.raises(ex.ExplainError) as exc:
        ex.parse_endpoint(value)
    assert message in str(exc.value) and repr(value) in str(exc.value)
