#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: ip_rule
short_description: Manage Linux policy routing rules (C(ip rule))
version_added: 0.1.0
description:
  - Adds or removes one policy routing rule for IPv4 or IPv6, such as the
    C(fwmark 1337 lookup 133) rule that TPROXY interception needs.
  - Reads the current rules with C(ip -json rule show) and compares them canonically
    (C(1337), C(0x539) and C(0x539/0xffffffff) are the same mark, C(main) and C(254) the same table),
    so a second run reports no change.
  - A rule matches when its selector (O(from), O(to), O(fwmark), O(iif), O(oif)) is exactly the
    desired one - a rule with any further selector (for example C(not), C(tos), C(uidrange),
    C(ipproto) or ports) never matches - and its table and priority equal the desired ones
    where those are set.
  - All input is validated before anything runs; an error names the bad value.
author:
  - sidecar.intercept developers (@sidecar)
options:
  family:
    description: Address family of the rule.
    type: str
    choices: [ipv4, ipv6]
    default: ipv4
  fwmark:
    description:
      - Firewall mark selector, as a decimal or hexadecimal number with an optional mask
        (C(1337), C(0x539), C(0x539/0xffff)). The mask defaults to C(0xffffffff).
    type: raw
  table:
    description:
      - Routing table to look up, as a number (1 to 4294967295) or a name that iproute2 knows
        (C(main), C(local), C(default) or a name from C(/etc/iproute2/rt_tables)).
      - Required when O(state=present). With O(state=absent) it narrows the rules removed.
    type: raw
  priority:
    description:
      - Rule priority (C(pref)), 0 to 4294967295.
      - When omitted, an existing rule with the same selector and table at any priority counts as
        present, and a new rule gets the priority the kernel chooses (one below the lowest
        existing non-zero priority). With O(state=absent), rules at every priority are removed.
    type: int
    aliases: [pref, preference]
  from:
    description: Source prefix selector (CIDR or address). Omitted, V(all) or a C(/0) prefix mean any source.
    type: str
    aliases: [src]
  to:
    description: Destination prefix selector (CIDR or address). Omitted, V(all) or a C(/0) prefix mean any destination.
    type: str
    aliases: [dst]
  iif:
    description: Incoming interface selector (C(lo) selects locally generated packets).
    type: str
  oif:
    description: Outgoing interface selector (only for sockets bound to a device).
    type: str
  state:
    description:
      - V(present) adds the rule when no matching rule exists.
      - V(absent) removes every matching rule, including duplicates.
    type: str
    choices: [present, absent]
    default: present
attributes:
  check_mode:
    support: full
    description: Reports what would change and changes nothing.
  diff_mode:
    support: full
    description: Shows the matching rules before and after, one C(ip rule) line each.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with iproute2 (the C(ip) command with C(-json) support, iproute2 4.13 or later).
notes:
  - Needs the C(NET_ADMIN) capability to change rules; reading works unprivileged.
  - Rules are not persistent across reboots; re-apply them at boot (the P(sidecar.intercept.capture#role) role does).
seealso:
  - module: sidecar.intercept.ip_route
  - name: ip-rule(8)
    description: The iproute2 manual page for policy routing rules.
    link: https://man7.org/linux/man-pages/man8/ip-rule.8.html
'''

EXAMPLES = r'''
- name: Route packets marked 1337 through table 133 (TPROXY policy routing)
  sidecar.intercept.ip_rule:
    fwmark: 1337
    table: 133

- name: The same for IPv6, at a fixed priority
  sidecar.intercept.ip_rule:
    family: ipv6
    fwmark: "0x539"
    table: 133
    priority: 32000

- name: Send traffic from one subnet to a dedicated table
  sidecar.intercept.ip_rule:
    from: 10.20.0.0/16
    iif: eth1
    table: main
    priority: 1000

- name: Remove every fwmark 1337 rule for table 133, whatever its priority
  sidecar.intercept.ip_rule:
    fwmark: 1337
    table: 133
    state: absent
'''

RETURN = r'''
rule:
  description: The desired rule in canonical form (marks in hex, tables as numbers, prefixes as CIDR).
  returned: always
  type: dict
  sample:
    priority: null
    from: null
    to: null
    fwmark: "0x539"
    iif: null
    oif: null
    table: 133
rules:
  description: The rules on the host that match the desired selector after the run (in check mode, the predicted ones).
  returned: always
  type: list
  elements: dict
  sample:
    - priority: 32765
      from: null
      to: null
      fwmark: "0x539"
      iif: null
      oif: null
      table: 133
commands:
  description: The C(ip) commands that were run (or would be run in check mode) to change the host.
  returned: always
  type: list
  elements: str
  sample: ["ip -4 rule add fwmark 0x539 table 133"]
diff:
  description: The matching rules before and after, one line each in the style of C(ip rule show).
  returned: when diff mode is enabled
  type: dict
  sample:
    before: ""
    after: "(kernel): from all fwmark 0x539 lookup 133\n"
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sidecar.intercept.plugins.module_utils.iproute import (
    IpCommand,
    desired_or_fail,
    public_rule,
    rule_args,
    rule_desired,
    rule_from_json,
    rule_matches,
    rule_text,
    table_names,
)


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            family=dict(type='str', default='ipv4', choices=['ipv4', 'ipv6']),
            fwmark=dict(type='raw'),
            table=dict(type='raw'),
            priority=dict(type='int', aliases=['pref', 'preference']),
            iif=dict(type='str'),
            oif=dict(type='str'),
            state=dict(type='str', default='present', choices=['present', 'absent']),
            to=dict(type='str', aliases=['dst']),
            **{'from': dict(type='str', aliases=['src'])}
        ),
        required_if=[('state', 'present', ['table'])],
        supports_check_mode=True,
    )
    params = module.params
    names = table_names()
    desired = desired_or_fail(module, rule_desired, names)
    if params['state'] == 'absent' and not any(desired[k] for k in ('from', 'to', 'fwmark', 'iif', 'oif')) \
            and desired['priority'] is None and desired['table'] is None:
        module.fail_json(msg='state=absent needs at least one of fwmark, from, to, iif, oif, priority or table;'
                             ' refusing to remove every rule')

    ip = IpCommand(module, params['family'])

    def current():
        found = ip.parsed(['rule', 'show'], rule_from_json, params['family'], names)
        return [r for r in found if rule_matches(r, desired, need_table=params['state'] == 'present')]

    before = current()
    changed = False
    if params['state'] == 'present':
        if not before:
            changed = True
            ip.change(['rule', 'add'] + rule_args(desired))
    else:
        # A selector-less rule never matches here unless the user asked for exactly that.
        for rule in before:
            changed = True
            ip.change(['rule', 'del'] + rule_args(rule))

    if module.check_mode:
        if params['state'] == 'present':
            after = before if before else [desired]
        else:
            after = []
    elif changed:
        after = current()
    else:
        after = before

    ip.exit(changed, before, after, rule_text, names,
            rule=public_rule(desired), rules=[public_rule(r) for r in after])


def main():
    run_module()


if __name__ == '__main__':
    main()
