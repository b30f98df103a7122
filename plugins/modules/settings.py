#!/usr/bin/python
# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: settings
short_description: Validate and resolve the public sidecar.intercept settings of a host
version_added: 0.2.0
description:
  - Reads the public C(sidecar_*) variables of the host (inventory, group_vars, extra vars; the
    defaults come from the collection's one definition in C(module_utils/settings.py)), validates
    them and fails, naming each bad variable and value, before anything on the host changes.
  - Accepts what C(-e) gives for a list (C(22) or C(22,2222)); refuses leading zeros (C(0022),
    C(010.0.0.0/8), which iptables would read as octal); writes every network in canonical form
    (C(FD00:0:0::/64) becomes C(fd00::/64)) so that a re-run does not see drift.
  - Then reads the host's capture facts (M(sidecar.intercept.capture_facts), read-only) and resolves
    what depends on the host (the address families, the backend, the ports of the management
    connection - Ansible's port and the ports sshd listens on, which are never captured) and sets
    C(ansible_facts.sidecar_settings), which the roles and playbooks read instead of the raw variables.
  - This is an action plugin; it runs on the controller and calls capture_facts on the host.
  - The host is read once per play. A later call in the same play (the roles after the playbook's
    own call) with the same settings and the same connection port reuses the facts of the first
    (C(ansible_facts.sidecar_capture.resolved_from) records what they were resolved from); other
    settings (for example the rollback's C(sidecar_state=absent)), a stricter O(require_backend) or
    another play read the host again.
author:
  - sidecar.intercept developers (@sidecar)
options:
  gather:
    description: Read the host's capture facts and resolve the host-dependent values. Without it, IPv6
      C(auto) resolves to both families and the backend to the requested one.
    type: bool
    default: true
  require_backend:
    description:
      - Fail when the host has no iptables tools for the backend (the proxy role alone does not need them).
      - With C(false) the host firewall is not checked against C(sidecar_mode=redirect) either (the proxy role
        captures nothing).
    type: bool
    default: true
  rollout:
    description:
      - Also compare the host with its last verified rollout in the same call to the host (capture_facts'
        O(sidecar.intercept.capture_facts#module:rollout)); the proxy's readiness is asked at the resolved
        C(admin_port). Returns RV(rollout). The facts of an earlier call are not reused.
      - C(sidecar.intercept.site) reads an unchanged host with this one call.
    type: dict
    suboptions:
      path:
        description: The record M(sidecar.intercept.rollout_state) wrote.
        type: path
        required: true
      files:
        description: Glob patterns of the files the rollout owns.
        type: list
        elements: str
        default: []
attributes:
  action:
    support: full
    description: Runs on the controller; the host is only read, by capture_facts.
  async:
    support: none
    description: Runs in the foreground.
  check_mode:
    support: full
    description: Reads only.
  diff_mode:
    support: none
    description: Changes nothing.
  facts:
    support: full
    description: Sets C(ansible_facts.sidecar_settings) and C(ansible_facts.sidecar_capture).
  platform:
    support: full
    platforms: posix
    description: Linux hosts.
notes:
  - The full list of settings, defaults and checks is in the collection's README (Public settings).
"""

EXAMPLES = r"""
- name: Resolve the settings (fails on bad input before anything changes)
  sidecar.intercept.settings:

- name: Use them
  ansible.builtin.debug:
    msg: "{{ ansible_facts.sidecar_settings.families }} via {{ ansible_facts.sidecar_settings.backend }}"
"""

RETURN = r"""
rollout:
  description:
    - With O(rollout) - the digest of the recorded rollout (null without a record) and every other
      difference from it, as capture_facts returns them.
  returned: when O(rollout) is given and the settings are valid
  type: dict
  sample: {digest: 3f5a..., reasons: ["sidecar-proxy.service is failed (was active)"]}
cached:
  description: The facts were resolved earlier in this play from the same settings and were reused.
  returned: when reused
  type: bool
  sample: true
settings:
  description: The resolved settings (the same as C(ansible_facts.sidecar_settings)).
  returned: success
  type: dict
  sample:
    state: present
    mode: tproxy
    families: [ipv4, ipv6]
    backend: nft
    inbound_ports: "*"
    inbound_exclude_ports: [22, 2222]
    user_inbound_exclude_ports: [22]
    management_ports: [22, 2222]
    outbound_include_cidrs: "*"
    outbound_exclude_cidrs: {ipv4: [169.254.169.254/32], ipv6: []}
    outbound_exclude_ports: []
    proxy_uid: 1337
    proxy_gid: 1337
    inbound_port: 15006
    outbound_port: 15001
    admin_port: 15000
    metrics_address: ""
    metrics_port: 15090
    tproxy_mark: 1337
    tproxy_mark_hex: "0x539"
    tproxy_table: 133
    ipv6: auto
    capture_backend: auto
errors:
  description: Every problem found, each naming the variable and the value.
  returned: failure
  type: list
  elements: str
  sample: ['sidecar_inbound_exclude_ports="0022": leading zeros are ambiguous (octal for iptables); write 22']
"""
