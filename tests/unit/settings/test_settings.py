"""The one validator of the public settings (plugins/module_utils/settings.py), called directly:
what a user writes in inventory or with -e becomes typed canonical values, or errors that name the
variable and the value."""

from __future__ import annotations

import pytest

from ansible_collections.sidecar.intercept.plugins.module_utils.settings import (
    DEFAULTS,
    _overlap,
    effective,
    resolve,
    validate,
)


def ok(**raw):
    settings, errors, _warnings = validate(raw)
    assert not errors, errors
    return settings


def bad(**raw):
    settings, errors, _warnings = validate(raw)
    assert settings is None and errors, "accepted %r" % (raw,)
    return "; ".join(errors)


def test_defaults_resolve_to_the_design_values():
    s = ok()
    assert s["mode"] == "redirect" and s["state"] == "present"
    assert s["inbound_ports"] == "*"
    assert s["inbound_exclude_ports"] == [22]
    assert s["outbound_include_cidrs"] == "*"
    assert s["outbound_exclude_cidrs"] == {"ipv4": [], "ipv6": []}
    assert (s["inbound_port"], s["outbound_port"], s["admin_port"]) == (15006, 15001, 15000)
    assert (s["proxy_uid"], s["proxy_gid"]) == (1337, 1337)
    assert (s["tproxy_mark"], s["tproxy_mark_hex"], s["tproxy_table"]) == (1337, "0x539", 133)
    assert s["ipv6"] == "auto"


@pytest.mark.parametrize("value,ports", [
    ("22", [22]),                      # -e sidecar_inbound_exclude_ports=22
    (22, [22]),                        # -e '{"sidecar_inbound_exclude_ports": 22}'
    ("22,2222", [22, 2222]),           # -e sidecar_inbound_exclude_ports=22,2222
    ("22, 2222", [22, 2222]),
    ("[22, 2222]", [22, 2222]),        # -e sidecar_inbound_exclude_ports=[22,2222] arrives as a string
    (["2222", 22, 22], [22, 2222]),    # strings from YAML, duplicates
    ([], []),
    ("", []),
])
def test_port_lists_from_strings_and_scalars(value, ports):
    assert ok(sidecar_inbound_exclude_ports=value)["inbound_exclude_ports"] == ports


def test_a_string_is_never_read_character_by_character():
    # the old template looped over "22,2222" and excluded the ports 2, 2 and 2 (SSH captured)
    assert ok(sidecar_outbound_exclude_ports="5432")["outbound_exclude_ports"] == [5432]


@pytest.mark.parametrize("name,value,message", [
    ("sidecar_inbound_exclude_ports", "0022", 'sidecar_inbound_exclude_ports="0022": leading zeros'),
    ("sidecar_inbound_exclude_ports", [22, "ssh"], 'sidecar_inbound_exclude_ports=[22, "ssh"]: "ssh" is not a port'),
    ("sidecar_inbound_exclude_ports", [0], "sidecar_inbound_exclude_ports=[0]: 0 is out of range"),
    ("sidecar_outbound_exclude_ports", "70000", 'sidecar_outbound_exclude_ports="70000": 70000 is out of range'),
    ("sidecar_inbound_ports", [8080, True], "true is not a port"),
    ("sidecar_inbound_ports", ["*", 8080], "'*' (every port) cannot be combined"),
    ("sidecar_inbound_port", "15006.5", '"15006.5" is not a port'),
    ("sidecar_inbound_port", 0, "sidecar_inbound_port=0: 0 is out of range"),
    ("sidecar_outbound_port", 15006, "sidecar_outbound_port=15006: the same port as sidecar_inbound_port"),
    ("sidecar_admin_port", 15001, "sidecar_admin_port=15001: the same port as sidecar_outbound_port"),
    ("sidecar_proxy_uid", 0, "sidecar_proxy_uid=0: 0 is out of range"),
    ("sidecar_proxy_gid", "01337", "leading zeros"),
    ("sidecar_proxy_uid", 4294967295, "out of range"),
    ("sidecar_tproxy_mark", 0, "sidecar_tproxy_mark=0: 0 is out of range"),
    ("sidecar_tproxy_mark", "0x1ffffffff", "out of range"),
    ("sidecar_tproxy_mark", "mark", '"mark" is not a firewall mark'),
    ("sidecar_tproxy_table", 254, "table 254 is the kernel's 'main' table"),
    ("sidecar_tproxy_table", 255, "'local' table"),
    ("sidecar_ipv6", "maybe", 'sidecar_ipv6="maybe": must be auto, true or false'),
    ("sidecar_mode", "ebpf", 'sidecar_mode="ebpf": must be one of redirect, tproxy'),
    ("sidecar_state", "gone", "must be one of present, absent"),
    ("sidecar_capture_backend", "nftables-ish", "must be one of auto, legacy, nft, plain, nftables"),
])
def test_bad_values_are_named(name, value, message):
    assert message in bad(**{name: value})


@pytest.mark.parametrize("value,message", [
    (["010.0.0.0/8"], "010.0.0.0/8 is not an IPv4/IPv6 address or network"),   # octal for iptables
    (["10.0.0.0/33"], "10.0.0.0/33 is not an IPv4/IPv6"),
    (["10.1.2.3/8"], "10.1.2.3/8 has host bits set; write the network 10.0.0.0/8"),
    (["fd00::1/64"], "fd00::1/64 has host bits set; write the network fd00::/64"),
    (["not-a-cidr"], "not-a-cidr is not an IPv4/IPv6"),
    ([None], "null is not an IPv4/IPv6"),
])
def test_bad_networks_are_named(value, message):
    assert message in bad(sidecar_outbound_exclude_cidrs=value)
    assert "sidecar_outbound_exclude_cidrs=" in bad(sidecar_outbound_exclude_cidrs=value)


def test_networks_are_canonical_split_by_family_and_sorted():
    s = ok(sidecar_outbound_include_cidrs="192.168.1.10, 10.0.0.0/8,FD00:0:0::/8,fd00::/8",
           sidecar_outbound_exclude_cidrs=["FD00:0001:0000::/64", "10.96.0.0/12"])
    assert s["outbound_include_cidrs"] == {"ipv4": ["10.0.0.0/8", "192.168.1.10/32"], "ipv6": ["fd00::/8"]}
    assert s["outbound_exclude_cidrs"] == {"ipv4": ["10.96.0.0/12"], "ipv6": ["fd00:1::/64"]}


def test_any_spelling_of_an_ipv6_network_gives_the_same_settings():
    spellings = ["fd00:1::/64", "FD00:1::/64", "fd00:0001:0000:0000::/64", "fd00:1:0:0:0:0:0:0/64"]
    assert len({str(ok(sidecar_outbound_exclude_cidrs=[s])["outbound_exclude_cidrs"]) for s in spellings}) == 1


def test_conflicts():
    assert "port(s) 22 are also in sidecar_inbound_exclude_ports" in bad(sidecar_inbound_ports=[22, 8080])
    msg = bad(sidecar_outbound_include_cidrs=["10.1.0.0/16"], sidecar_outbound_exclude_cidrs=["10.0.0.0/8"])
    assert "10.1.0.0/16 is inside 10.0.0.0/8 of sidecar_outbound_exclude_cidrs" in msg
    assert "10.0.0.0/8 is inside" in bad(sidecar_outbound_include_cidrs=["10.0.0.0/8"],
                                         sidecar_outbound_exclude_cidrs=["10.0.0.0/8"])
    assert "127.1.2.3/32 is loopback" in bad(sidecar_outbound_include_cidrs=["127.1.2.3/32"])
    assert "::1/128 is loopback" in bad(sidecar_outbound_include_cidrs=["::1"])
    msg = bad(sidecar_ipv6=False, sidecar_outbound_exclude_cidrs=["fd00::/8"])
    assert "sidecar_ipv6=false: IPv6 networks fd00::/8 are set but IPv6 capture is off" in msg


def test_every_error_is_reported_at_once():
    msg = bad(sidecar_inbound_port=0, sidecar_mode="x", sidecar_outbound_exclude_cidrs=["1.2.3.4/8"])
    assert "sidecar_inbound_port=0" in msg and "sidecar_mode=" in msg and "1.2.3.4/8" in msg


@pytest.mark.parametrize("value,expected", [
    ("auto", "auto"), (True, True), (False, False), ("yes", True), ("no", False), ("True", True),
    ("false", False), ("on", True), ("off", False), (1, True), (0, False),
])
def test_ipv6_spellings(value, expected):
    assert ok(sidecar_ipv6=value)["ipv6"] == expected


@pytest.mark.parametrize("value,number,hexa", [(1337, 1337, "0x539"), ("1337", 1337, "0x539"),
                                               ("0x539", 1337, "0x539"), ("0X4000", 16384, "0x4000")])
def test_marks_in_the_form_the_kernel_prints(value, number, hexa):
    s = ok(sidecar_tproxy_mark=value, sidecar_tproxy_mask="0xffffffff")
    assert (s["tproxy_mark"], s["tproxy_mark_hex"]) == (number, hexa)


HOST_V6 = {"backend": "legacy", "ipv6": {"enabled": True, "global": True}, "ssh_ports": [22]}
HOST_V4 = {"backend": "nft", "ipv6": {"enabled": True, "global": False}, "ssh_ports": []}
HOST_NO_V6 = {"backend": "nft", "ipv6": {"enabled": False, "global": False}, "ssh_ports": []}


def test_families_follow_the_host_for_auto():
    assert effective({}, HOST_V6)[0]["families"] == ["ipv4", "ipv6"]
    assert effective({}, HOST_V4)[0]["families"] == ["ipv4"]
    assert effective({"sidecar_ipv6": True}, HOST_V4)[0]["families"] == ["ipv4", "ipv6"]
    assert effective({"sidecar_ipv6": "no"}, HOST_V6)[0]["families"] == ["ipv4"]
    assert effective({}, None)[0]["families"] == ["ipv4", "ipv6"]   # no host: render both


def test_ipv6_forced_on_a_host_without_ipv6_fails():
    resolved, errors, _w = effective({"sidecar_ipv6": "true"}, HOST_NO_V6)
    assert resolved is None and "sidecar_ipv6=true: IPv6 is not available on this host" in errors[0]
    # removal still works there
    assert effective({"sidecar_ipv6": "true", "sidecar_state": "absent"}, HOST_NO_V6)[0] is not None


def test_backend_comes_from_the_host():
    assert effective({}, HOST_V6)[0]["backend"] == "legacy"
    assert effective({"sidecar_capture_backend": "legacy"}, None)[0]["backend"] == "legacy"


def test_management_ports_are_never_captured():
    host = dict(HOST_V4, ssh_ports=[2222, 22])
    r, errors, _w = effective({"sidecar_inbound_exclude_ports": []}, host, management_ports=["2200"])
    assert not errors
    assert r["management_ports"] == [22, 2200, 2222]
    assert r["inbound_exclude_ports"] == [22, 2200, 2222]
    assert r["user_inbound_exclude_ports"] == []


def test_capturing_the_management_port_fails_before_the_change():
    r, errors, _w = effective({"sidecar_inbound_ports": [2222, 8080], "sidecar_inbound_exclude_ports": []},
                              dict(HOST_V4, ssh_ports=[2222]))
    assert r is None
    assert "sidecar_inbound_ports=[2222, 8080]: port(s) 2222 carry the management connection" in errors[0]


def test_resolve_is_pure():
    settings = ok()
    before = repr(settings)
    resolve(settings, HOST_V6, [22])
    assert repr(settings) == before


def test_defaults_table_covers_every_setting_once():
    assert len(DEFAULTS) == len(set(DEFAULTS))
    assert all(name.startswith("sidecar_") for name in DEFAULTS)


def test_inbound_exclude_cidrs_and_outbound_include_ports():
    s = ok(sidecar_inbound_exclude_cidrs="10.1.0.0/16,FD00:1::/64", sidecar_outbound_include_ports="443,80")
    assert s["inbound_exclude_cidrs"] == {"ipv4": ["10.1.0.0/16"], "ipv6": ["fd00:1::/64"]}
    assert s["outbound_include_ports"] == [80, 443]
    assert ok()["outbound_include_ports"] == "*" and ok()["inbound_exclude_cidrs"] == {"ipv4": [], "ipv6": []}
    assert "an empty list would capture no outbound connection" in bad(sidecar_outbound_include_ports=[])
    assert "port(s) 53 are also in sidecar_outbound_exclude_ports" in bad(
        sidecar_outbound_include_ports=[53, 80], sidecar_outbound_exclude_ports=[53])
    assert "10.1.2.3/16 has host bits set" in bad(sidecar_inbound_exclude_cidrs=["10.1.2.3/16"])
    assert "IPv6 networks fd00::/8 are set but IPv6 capture is off" in bad(
        sidecar_ipv6=False, sidecar_inbound_exclude_cidrs=["fd00::/8"])


@pytest.mark.parametrize('ours, theirs, expected', [
    ((0x539, 0xFFF), (0x539, 0xFFFFFFFF), True),      # an exact-mark rule for our value
    ((0x539, 0xFFF), (0x1, 0x1), True),               # shares bit 0 with the same value
    ((0x539, 0xFFF), (0x2, 0x2), False),              # shares bit 1, our mark has it clear
    ((0x539, 0xFFF), (0x4000, 0x4000), False),        # kube-proxy: disjoint masks
    ((0x539, 0xFFF), (0x80000, 0xFF0000), False),     # Tailscale: disjoint masks
    ((0x539, 0xFFF), (0xCA6C, 0xFFFFFFFF), False),    # WireGuard 51820: overlapping masks, other value
    ((0x539, 0xFFFFFFFF), (0xC539, 0xFFFFFFFF), False),
])
def test_fwmarks_overlap(ours, theirs, expected):
    assert _overlap(ours, theirs) is expected
    assert _overlap(theirs, ours) is expected  # symmetric


def test_masked_mark_and_bridges():
    s = ok()
    assert (s["tproxy_mask"], s["tproxy_mask_hex"], s["tproxy_fwmark"]) == (0xFFF, "0xfff", "0x539/0xfff")
    assert ok(sidecar_tproxy_mark="0x10000", sidecar_tproxy_mask="0xf0000")["tproxy_fwmark"] == "0x10000/0xf0000"
    assert "sidecar_tproxy_mark=5433: 0x1539 has bits outside sidecar_tproxy_mask 0xfff" in bad(sidecar_tproxy_mark=0x1539)
    assert "sidecar_tproxy_mask=0: 0 is out of range" in bad(sidecar_tproxy_mask=0)
    b = ok(sidecar_capture_bridge_interfaces=["docker0:172.17.0.0/16", "docker0:FD00:17::/64", "br-+"])["bridges"]
    assert b == {"docker0": {"ipv4": ["172.17.0.0/16"], "ipv6": ["fd00:17::/64"]}, "br-+": {"ipv4": [], "ipv6": []}}
    assert '"lo" does not start with an interface name' in bad(sidecar_capture_bridge_interfaces=["lo"])
    assert "docker0:172.17.0.1/16 is not" in bad(sidecar_capture_bridge_interfaces="docker0:172.17.0.1/16") or \
        "172.17.0.1/16 has host bits set" in bad(sidecar_capture_bridge_interfaces="docker0:172.17.0.1/16")


def test_a_mark_that_collides_with_the_hosts_policy_routing_fails_before_the_change():
    host = dict(HOST_V4, fwmarks=[{"family": "ipv4", "fwmark": "0x1", "mask": "0x1", "table": "200", "priority": 100},
                                  {"family": "ipv4", "fwmark": "0x4000", "mask": "0x4000", "table": "main", "priority": 90},
                                  {"family": "ipv4", "fwmark": "0x539", "mask": "0xfff", "table": "133", "priority": 32765}])
    r, errors, _w = effective({"sidecar_mode": "tproxy"}, host)
    assert r is None and len(errors) == 1, errors
    assert 'collides with the host\'s policy routing: ip -4 rule "100: fwmark 0x1/0x1 lookup 200"' in errors[0]
    assert effective({"sidecar_mode": "redirect"}, host)[0] is not None       # no mark in redirect mode
    assert effective({"sidecar_mode": "tproxy", "sidecar_state": "absent"}, host)[0] is not None


def test_metrics_listener_is_off_by_default_and_its_port_never_captured_when_on():
    s = ok()
    assert (s["metrics_address"], s["metrics_port"]) == ("", 15090)
    resolved, errors = resolve(s, management_ports=[22])
    assert not errors and 15090 not in resolved["inbound_exclude_ports"]
    s = ok(sidecar_proxy_metrics_address=" 10.0.0.5 ", sidecar_proxy_metrics_port="9100")
    assert (s["metrics_address"], s["metrics_port"]) == ("10.0.0.5", 9100)
    resolved, errors = resolve(s, management_ports=[22])
    assert not errors
    assert resolved["inbound_exclude_ports"] == [22, 9100]
    assert resolved["user_inbound_exclude_ports"] == [22]
    assert ok(sidecar_proxy_metrics_address="FD00::0:5")["metrics_address"] == "fd00::5"


@pytest.mark.parametrize("raw,message", [
    ({"sidecar_proxy_metrics_address": "10.0.0.300"},
     'sidecar_proxy_metrics_address="10.0.0.300": must be empty (no metrics listener) or an IP address'),
    ({"sidecar_proxy_metrics_address": True}, "sidecar_proxy_metrics_address=true: must be empty"),
    ({"sidecar_proxy_metrics_address": "0.0.0.0", "sidecar_proxy_metrics_port": 0},
     "sidecar_proxy_metrics_port=0: 0 is out of range"),
    ({"sidecar_proxy_metrics_address": "0.0.0.0", "sidecar_proxy_metrics_port": 15000},
     "sidecar_proxy_metrics_port=15000: the same port as sidecar_admin_port"),
    ({"sidecar_proxy_metrics_address": "0.0.0.0", "sidecar_inbound_ports": [8080, 15090]},
     "port 15090 is the proxy's metrics listener"),
])
def test_bad_metrics_listener_settings_are_named(raw, message):
    assert message in bad(**raw)


def test_metrics_port_is_free_while_the_listener_is_off():
    assert ok(sidecar_proxy_metrics_port=15000)["metrics_port"] == 15000
    assert ok(sidecar_inbound_ports=[15090])["inbound_ports"] == [15090]


def test_a_proxy_uid_or_gid_of_another_account_is_warned_about():
    """sidecar_proxy_uid=65534 (nobody) was accepted silently: every process of nobody bypassed the capture."""
    host = dict(HOST_V4, accounts={"uid": "nobody", "gid": "nogroup"})
    r, errors, warnings = effective({"sidecar_proxy_uid": 65534, "sidecar_proxy_gid": 65534}, host)
    assert r is not None and not errors
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("sidecar_proxy_uid=65534 belongs to user 'nobody' on this host, not to the "
                                  "proxy's own user 'sidecar-proxy'")
    assert "sidecar_proxy_gid=65534 belongs to group 'nogroup'" in warnings[1]
    own = dict(HOST_V4, accounts={"uid": "sidecar-proxy", "gid": "sidecar-proxy"})
    assert effective({}, own)[2] == []
    assert effective({}, dict(HOST_V4, accounts={"uid": None, "gid": None}))[2] == []  # first install
    assert effective({}, dict(HOST_V4, accounts={"uid": "envoy", "gid": "envoy"}), (), ("envoy", "envoy"))[2] == []
    assert effective({"sidecar_state": "absent"}, host)[2] == []


def test_capture_facts_names_the_owners_of_the_proxy_ids():
    import grp
    import pwd

    from ansible_collections.sidecar.intercept.plugins.modules.capture_facts import _accounts
    root = _accounts(0, 0)
    assert root == {"uid": pwd.getpwuid(0).pw_name, "gid": grp.getgrgid(0).gr_name}
    unused = next(i for i in range(4000000, 4000100) if not _has_id(i))
    assert _accounts(unused, unused) == {"uid": None, "gid": None}
    assert _accounts(None, None) == {"uid": None, "gid": None}


def _has_id(i):
    import grp
    import pwd
    try:
        pwd.getpwuid(i)
        return True
    except KeyError:
        try:
            grp.getgrgid(i)
            return True
        except KeyError:
            return False


def test_redirect_mode_behind_a_filtering_firewall_is_refused_naming_it():
    """REDIRECT behind ufw / nft policy drop dropped every captured connection, and behind firewalld opened the
    ports its zone keeps closed (tests/integration/capture/test_firewall.py): refused before the change."""
    host = dict(HOST_V4, firewall=["ufw (iptables-nft)", "iptables-nft filter INPUT policy DROP"])
    r, errors, _w = effective({}, host)
    assert r is None and len(errors) == 1, errors
    assert errors[0].startswith("sidecar_mode=redirect: this host's firewall filters inbound traffic (ufw (iptables-nft); "
                                "iptables-nft filter INPUT policy DROP). REDIRECT rewrites the destination port to "
                                "the proxy's 15006")
    assert "Use sidecar_mode=tproxy" in errors[0] and "sidecar_capture_firewall_check=false" in errors[0]
    assert effective({"sidecar_mode": "tproxy"}, host)[0] is not None
    assert effective({"sidecar_state": "absent"}, host)[0] is not None
    assert effective({"sidecar_capture_firewall_check": "no"}, host)[0] is not None
    assert effective({}, dict(HOST_V4, firewall=[]))[0] is not None
    assert 'sidecar_capture_firewall_check="auto": must be true or false' in bad(sidecar_capture_firewall_check="auto")
