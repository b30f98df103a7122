"""roles/capture: argument_specs and defaults in step; shared sidecar_* defaults equal design.md's."""

from __future__ import annotations

from pathlib import Path

import yaml

ROLE = Path(__file__).resolve().parents[3] / "roles" / "capture"
DESIGN = {
    "sidecar_state": "present", "sidecar_mode": "redirect", "sidecar_inbound_ports": "*",
    "sidecar_inbound_exclude_ports": [22], "sidecar_outbound_include_cidrs": ["*"],
    "sidecar_outbound_exclude_cidrs": [], "sidecar_outbound_exclude_ports": [],
    "sidecar_proxy_uid": 1337, "sidecar_proxy_gid": 1337, "sidecar_inbound_port": 15006,
    "sidecar_outbound_port": 15001, "sidecar_tproxy_mark": 1337, "sidecar_tproxy_mask": 0xfff,
    "sidecar_tproxy_table": 133,
    "sidecar_ipv6": "auto",
}


def _load(rel):
    return yaml.safe_load((ROLE / rel).read_text())


def test_argument_specs_and_defaults_in_step():
    defaults = _load("defaults/main.yml")
    options = _load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    for name, spec in options.items():
        assert spec.get("default") == defaults[name], name
        assert spec.get("description"), name


def test_shared_defaults_match_design():
    defaults = _load("defaults/main.yml")
    for name, value in DESIGN.items():
        assert defaults[name] == value, name
    role_only = [n for n in defaults if n not in DESIGN]
    assert all(n.startswith("sidecar_capture_") for n in role_only), role_only
