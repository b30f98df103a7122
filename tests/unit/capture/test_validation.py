"""Bad settings fail in the role's first tasks with a message naming the value (ansible-playbook on
localhost with --tags sidecar_capture_validate: only the argument spec and the semantic checks run, so
nothing on any host can change)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - sidecar.intercept.capture
"""

CASES = [
    ({"sidecar_inbound_ports": [8080, 70000]}, "port 70000 is not an integer between 1 and 65535"),
    ({"sidecar_outbound_exclude_ports": [0]}, "sidecar_outbound_exclude_ports: port 0"),
    ({"sidecar_outbound_exclude_cidrs": ["10.0.0.0/33"]}, "10.0.0.0/33 is not a valid IPv4"),
    ({"sidecar_outbound_exclude_cidrs": ["10.1.2.3/8"]}, "10.1.2.3/8 has host bits set"),
    ({"sidecar_outbound_include_cidrs": ["not-a-cidr"]}, "not-a-cidr is not a valid IPv4/IPv6"),
    ({"sidecar_ipv6": False, "sidecar_outbound_exclude_cidrs": ["fd00::/8"]}, "fd00::/8 is IPv6 but sidecar_ipv6 is False"),
    ({"sidecar_outbound_include_cidrs": ["10.0.0.0/8"], "sidecar_outbound_exclude_cidrs": ["10.0.0.0/8"]},
     "10.0.0.0/8 is in both"),
    ({"sidecar_inbound_ports": [22]}, "port 22 is in both sidecar_inbound_ports and sidecar_inbound_exclude_ports"),
    ({"sidecar_mode": "ebpf"}, "sidecar_mode.*ebpf|ebpf.*sidecar_mode"),
    ({"sidecar_outbound_port": 15006}, "both 15006"),
    ({"sidecar_tproxy_mark": 0x1539}, "sidecar_tproxy_mark: 0x1539 has bits outside sidecar_tproxy_mask 0xfff"),
    ({"sidecar_tproxy_mask": 0}, "sidecar_tproxy_mask: 0 is not a mask"),
    ({"sidecar_capture_bridge_interfaces": ["docker0:172.17.0.0"]}, "docker0:172.17.0.0 has no valid CIDR"),
    ({"sidecar_capture_bridge_interfaces": ["lo"]}, "lo does not start with an interface name"),
]

pytestmark = pytest.mark.skipif(not shutil.which("ansible-playbook") or not os.environ.get("ANSIBLE_COLLECTIONS_PATH"),
                                reason="needs ansible-playbook and the collection path (scripts/env.sh)")


def run(tmp_path, extra):
    play = tmp_path / "play.yml"
    play.write_text(PLAY)
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    env.pop("ANSIBLE_COLLECTIONS_PATHS", None)
    return subprocess.run(["ansible-playbook", "-i", "localhost,", str(play), "--tags", "sidecar_capture_validate",
                           "-e", json.dumps(extra)], capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.mark.parametrize("extra,message", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_input_fails_naming_the_value(tmp_path, extra, message):
    import re
    out = run(tmp_path, extra)
    assert out.returncode != 0, out.stdout
    assert re.search(message, out.stdout + out.stderr), out.stdout[-2000:]


def test_defaults_pass(tmp_path):
    out = run(tmp_path, {})
    assert out.returncode == 0, out.stdout[-2000:]
