#!/usr/bin/python
# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: iptables_chains
short_description: Verify and enforce owned iptables chains and the jumps into them
version_added: 0.1.0
description:
  - Takes the desired rules as iptables-restore text (one or more tables) in which every non
    built-in chain declared with C(:NAME - [0:0]) is owned by the caller and every rule in a built-in
    chain is a jump into an owned chain.
  - Compares the owned chains and the jumps with what C(iptables-save) reports, rule by rule after
    canonicalisation (implicit C(-m tcp), counters), and reports drift with a diff.
  - Enforces the desired state atomically with one C(iptables-restore --noflush) transaction that is
    checked with C(--test) first. Only owned chains are flushed or deleted and only jumps into them
    are inserted or deleted; built-in chains, tables and foreign rules are never flushed.
  - Each jump exists exactly once; extra copies are deleted. New jumps are inserted first or appended.
author:
  - sidecar.intercept developers (@sidecar)
options:
  family:
    description: Address family, selects C(iptables-*) or C(ip6tables-*).
    type: str
    choices: [ipv4, ipv6]
    default: ipv4
  backend:
    description:
      - iptables backend. C(auto) picks C(legacy) when iptables-legacy already holds rules, else C(nft)
        (the istio-iptables rule). C(plain) uses C(iptables-save)/C(iptables-restore) as installed.
    type: str
    choices: [auto, legacy, nft, plain]
    default: auto
  rules:
    description: Desired owned chains and jumps in iptables-restore format.
    type: str
    required: true
  state:
    description: C(present) enforces the chains and jumps; C(absent) deletes the jumps and the owned chains.
    type: str
    choices: [present, absent]
    default: present
  test_only:
    description:
      - Only check that the kernel and the tools accept every rule (C(iptables-restore --test) of the
        whole ruleset as if nothing were installed); changes nothing. A preflight for modes that need
        TPROXY, C(socket), C(owner) or IPv6 NAT support.
    type: bool
    default: false
  jump_position:
    description:
      - Where a missing jump is added in its built-in chain.
      - Jumps in C(nat PREROUTING) are always appended, after the host's own rules there, so that a
        DNAT rule of a container engine or kube-proxy (a published port) translates a connection
        before an owned chain could redirect it.
    type: str
    choices: [first, append]
    default: first
attributes:
  check_mode:
    support: full
    description: Reports drift and the changes it would make without changing anything.
  diff_mode:
    support: full
    description: Shows the owned chains and jumps before and after, in canonical form.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with iptables (legacy or nft backend).
notes:
  - Needs root (CAP_NET_ADMIN).
requirements:
  - iptables 1.8 or later (iptables-save, iptables-restore)
"""

EXAMPLES = r"""
- name: Own two nat chains and jump into them from PREROUTING and OUTPUT
  sidecar.intercept.iptables_chains:
    family: ipv4
    rules: |
      *nat
      :SIDECAR_INBOUND - [0:0]
      :SIDECAR_OUTPUT - [0:0]
      -A PREROUTING -p tcp -j SIDECAR_INBOUND
      -A OUTPUT -p tcp -j SIDECAR_OUTPUT
      -A SIDECAR_INBOUND -p tcp -m tcp --dport 22 -j RETURN
      -A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN
      COMMIT

- name: Remove them again (only what the rules name)
  sidecar.intercept.iptables_chains:
    family: ipv4
    rules: "{{ lookup('ansible.builtin.file', '/etc/sidecar-intercept/rules.v4') }}"
    state: absent
"""

RETURN = r"""
backend:
  description: The iptables backend used.
  returned: always
  type: str
  sample: nft
changes:
  description: Human-readable list of the differences found (and fixed unless in check mode).
  returned: always
  type: list
  elements: str
  sample: ["nat: rewrite chain SIDECAR_OUTPUT", "nat: add jump -A OUTPUT -p tcp -j SIDECAR_OUTPUT"]
payload:
  description: The iptables-restore --noflush transaction that was (or would be) applied.
  returned: always
  type: str
  sample: "*nat\n-I OUTPUT 1 -p tcp -j SIDECAR_OUTPUT\nCOMMIT\n"
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables import (
    RulesError,
    after_state,
    current_state,
    desired_from_rules,
    plan,
    render_state,
)
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables_backend import (
    detect_backend,
    restore,
    save,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            family=dict(type="str", choices=["ipv4", "ipv6"], default="ipv4"),
            backend=dict(type="str", choices=["auto", "legacy", "nft", "plain"], default="auto"),
            rules=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            jump_position=dict(type="str", choices=["first", "append"], default="first"),
            test_only=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        desired = desired_from_rules(p["rules"])
    except RulesError as exc:
        module.fail_json(msg="invalid rules: %s" % exc)
    backend = detect_backend(module, p["backend"])
    if p["test_only"]:
        empty = {t: {"chains": {}, "jumps": []} for t in desired}
        _changes, payload = plan(desired, empty, "present", p["jump_position"])
        restore(module, p["family"], backend, payload, test=True,
                what="preflight: the kernel or the %s tools lack something these rules need" % backend)
        module.exit_json(changed=False, backend=backend, changes=[], payload=payload)
    current = current_state(save(module, p["family"], backend), desired)
    changes, payload = plan(desired, current, p["state"], p["jump_position"])
    result = dict(changed=bool(changes), backend=backend, changes=changes, payload=payload)
    if module._diff:
        result["diff"] = dict(
            before=render_state(current),
            after=render_state(after_state(desired, current, p["state"])),
            before_header="%s %s (%s)" % (p["family"], "owned chains", backend),
            after_header="%s %s (%s)" % (p["family"], "owned chains", backend),
        )
    if changes and not module.check_mode:
        restore(module, p["family"], backend, payload, test=True, what="check before apply")
        restore(module, p["family"], backend, payload)
        again = current_state(save(module, p["family"], backend), desired)
        left, _payload = plan(desired, again, p["state"], p["jump_position"])
        if left:
            module.fail_json(msg="rules applied but the host still differs (a rule is not in canonical "
                                 "iptables-save form?): %s" % "; ".join(left), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
