#!/usr/bin/python
# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nft_table
short_description: Verify and enforce one owned nftables table
version_added: 0.2.0
description:
  - Takes the desired table as nft script text (one C(table FAMILY NAME { ... }) definition, written
    the way C(nft list table) prints it) and compares it with what the kernel has, after
    canonicalisation (indentation, counter values, handles, the order of set elements).
  - Replaces the table atomically with one C(nft -f) transaction (create, delete, define), checked
    with C(nft -c) first. No other table is read, changed or deleted.
  - O(state=absent) deletes the table, and nothing else.
author:
  - sidecar.intercept developers (@sidecar)
options:
  rules:
    description: The desired table definition (required with O(state=present)).
    type: str
  name:
    description: Table name; with O(rules) it must match the definition.
    type: str
    default: sidecar_intercept
  family:
    description: Table family; with O(rules) it must match the definition.
    type: str
    choices: [inet, ip, ip6]
    default: inet
  state:
    description: C(present) enforces the table; C(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  test_only:
    description: Only check that the kernel and nft accept the table (C(nft -c)); changes nothing.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Reports drift and the change it would make without changing anything.
  diff_mode:
    support: full
    description: Shows the table before and after, in canonical form.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with nftables (C(nft) 1.0 or later).
notes:
  - Needs root (CAP_NET_ADMIN). Counters of the table start from zero when it is rewritten.
requirements:
  - nftables (the C(nft) command)
"""

EXAMPLES = r"""
- name: Own one inet table
  sidecar.intercept.nft_table:
    rules: "{{ lookup('ansible.builtin.template', 'rules.nft.j2') }}"

- name: Delete it again
  sidecar.intercept.nft_table:
    name: sidecar_intercept
    state: absent
"""

RETURN = r"""
changes:
  description: Human-readable list of the differences found (and fixed unless in check mode).
  returned: always
  type: list
  elements: str
  sample: ["rewrite chain SIDECAR_OUTPUT"]
payload:
  description: The nft -f transaction that was (or would be) applied.
  returned: always
  type: str
  sample: "table inet sidecar_intercept\ndelete table inet sidecar_intercept\ntable inet sidecar_intercept {...}\n"
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sidecar.intercept.plugins.module_utils.command import run
from ansible_collections.sidecar.intercept.plugins.module_utils.nftables import (
    NftError,
    canonical,
    chain_diff,
    payload,
    render,
    table_header,
)


def listed(module, nft, family, name):
    """Canonical lines of the table as the kernel has it, or None when it does not exist."""
    rc, out, err = run(module, [nft, "list", "table", family, name], check_rc=False)
    if rc != 0:
        if "No such file or directory" in err or "does not exist" in err:
            return None
        module.fail_json(msg="nft list table %s %s failed (rc=%d): %s" % (family, name, rc, err.strip()))
    return canonical(out)


def apply(module, nft, text, test=False, what=None):
    args = [nft, "-c", "-f", "-"] if test else [nft, "-f", "-"]
    rc, out, err = run(module, args, data=text, check_rc=False)
    if rc != 0:
        module.fail_json(msg="%s%s rejected the rules (nothing was changed): %s"
                         % (what + ": " if what else "", " ".join(args), (err or out).strip()), rc=rc, payload=text)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            rules=dict(type="str"),
            name=dict(type="str", default="sidecar_intercept"),
            family=dict(type="str", choices=["inet", "ip", "ip6"], default="inet"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            test_only=dict(type="bool", default=False),
        ),
        required_if=[("state", "present", ("rules",))],
        supports_check_mode=True,
    )
    p = module.params
    nft = module.get_bin_path("nft")
    if not nft:
        module.fail_json(msg="nft is not installed (install the nftables package)")
    family, name = p["family"], p["name"]
    desired = None
    if p["rules"] is not None:
        try:
            desired = canonical(p["rules"])
            family, name = table_header(desired)
        except NftError as exc:
            module.fail_json(msg="invalid rules: %s" % exc)
        if (family, name) != (p["family"], p["name"]):
            module.fail_json(msg="the rules define table %s %s, not %s %s" % (family, name, p["family"], p["name"]))
    text = payload(family, name, p["rules"]) if desired else ""
    if p["test_only"]:
        apply(module, nft, text, test=True, what="preflight: the kernel or nft lack something these rules need")
        module.exit_json(changed=False, changes=[], payload=text)

    current = listed(module, nft, family, name)
    if p["state"] == "present":
        changes = [] if current == desired else (
            ["create table %s %s" % (family, name)] if current is None else chain_diff(desired, current))
        if current != desired and not changes:
            changes = ["rewrite table %s %s" % (family, name)]
        after = desired
    else:
        changes = ["delete table %s %s" % (family, name)] if current is not None else []
        text = "delete table %s %s\n" % (family, name) if changes else ""
        after = None
    result = dict(changed=bool(changes), changes=changes, payload=text if changes else "")
    if module._diff:
        header = "table %s %s" % (family, name)
        result["diff"] = dict(before=render(current or []), after=render(after or []),
                              before_header=header, after_header=header)
    if changes and not module.check_mode:
        apply(module, nft, text, test=True, what="check before apply")
        apply(module, nft, text)
        again = listed(module, nft, family, name)
        if again != after:
            module.fail_json(msg="rules applied but the kernel lists them differently (not written the way "
                                 "nft list prints them?): %s"
                                 % "; ".join(chain_diff(after, again) if after and again else ["table missing"]),
                             listed=render(again or []), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
