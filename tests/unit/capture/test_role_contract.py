"""The shared settings' one definition has design.md's defaults, and the capture role's own settings
carry its prefix."""

from __future__ import annotations

from pathlib import Path

import yaml

from ansible_collections.sidecar.intercept.plugins.module_utils.settings import DEFAULTS

ROLE = Path(__file__).resolve().parents[3] / "roles" / "capture"
DESIGN = {
    "sidecar_state": "present", "sidecar_mode": "redirect", "sidecar_inbound_ports": "*",
    "sidecar_inbound_exclude_ports": [22], "sidecar_outbound_include_cidrs": ["*"],
    "sidecar_outbound_exclude_cidrs": [], "sidecar_outbound_exclude_ports": [],
    "sidecar_proxy_uid": 1337, "sidecar_proxy_gid": 1337, "sidecar_inbound_port": 15006,
    "sidecar_outbound_port": 15001, "sidecar_admin_port": 15000, "sidecar_tproxy_mark": 1337,
    "sidecar_tproxy_mask": 0xfff,
    "sidecar_tproxy_table": 133, "sidecar_ipv6": "auto",
}


def test_shared_defaults_match_design():
    for name, value in DESIGN.items():
        assert DEFAULTS[name] == value, name


def test_role_only_settings_are_prefixed():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert all(n.startswith("sidecar_capture_") for n in defaults), defaults
