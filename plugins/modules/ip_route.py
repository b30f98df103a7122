#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: ip_route
short_description: Manage Linux routes in any routing table (C(ip route))
version_added: 0.1.0
description:
  - Adds, replaces or removes one IPv4 or IPv6 route of type C(unicast), C(local), C(blackhole),
    C(unreachable) or C(prohibit) in any routing table, such as the C(local default dev lo table 133)
    route that TPROXY interception needs.
  - Reads the table with C(ip -json -details route show table T) and compares canonically
    (C(default) and C(0.0.0.0/0) are the same prefix, C(main) and C(254) the same table), so a
    second run reports no change.
  - An existing route matches when its destination, table and type are the desired ones and
    O(dev), O(via), O(metric), O(scope) and O(proto) are equal wherever they are set.
  - When no route matches, the module runs C(ip route replace), which adds the route or replaces the
    one with the same destination and metric (the kernel's identity of a route).
  - All input is validated before anything runs; an error names the bad value.
author:
  - sidecar.intercept developers (@sidecar)
options:
  family:
    description: Address family of the route.
    type: str
    choices: [ipv4, ipv6]
    default: ipv4
  dst:
    description: Destination, V(default) or a CIDR (a bare address means a host route). Host bits must be zero.
    type: str
    required: true
  type:
    description:
      - Route type. When omitted, V(unicast) for O(state=present).
      - With O(state=absent), only routes of this type are removed; when omitted, routes of any type to O(dst) are.
    type: str
    choices: [unicast, local, blackhole, unreachable, prohibit]
  dev:
    description: Output device. A V(unicast) route needs O(dev) or O(via); O(type=local) routes usually use C(lo).
    type: str
  via:
    description: Gateway address, of the same family as O(dst). Not for O(type=local) or reject routes.
    type: str
    aliases: [gateway]
  table:
    description:
      - Routing table, as a number (1 to 4294967295) or a name that iproute2 knows (C(main), C(local),
        C(default), names in C(/etc/iproute2/rt_tables)).
    type: raw
    default: main
  metric:
    description:
      - Route metric (priority), 0 to 4294967295; part of the route's identity.
      - When omitted, a matching route with any metric counts as present and a new route gets the
        kernel default (0 for IPv4, 1024 for IPv6); with O(state=absent), routes with every metric are removed.
    type: int
    aliases: [priority]
  scope:
    description:
      - Route scope (V(global), V(link), V(host), V(site), V(nowhere) or a number). Compared only when set.
      - IPv4 only; IPv6 routes have no scope, and setting it with O(family=ipv6) is an error.
    type: str
  proto:
    description: Routing protocol that owns the route (for example V(static), V(boot) or a number). Compared only when set.
    type: str
    aliases: [protocol]
  state:
    description:
      - V(present) makes sure a matching route exists.
      - V(absent) removes every matching route to O(dst) in O(table).
    type: str
    choices: [present, absent]
    default: present
attributes:
  check_mode:
    support: full
    description: Reports what would change and changes nothing.
  diff_mode:
    support: full
    description: Shows the routes to O(dst) in O(table) before and after, one line each.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with iproute2 (the C(ip) command with C(-json) support, iproute2 4.13 or later).
notes:
  - Needs the C(NET_ADMIN) capability to change routes.
  - Routes are not persistent across reboots; re-apply them at boot (the P(sidecar.intercept.capture#role) role does).
  - Multipath routes are reported and can be removed, but not created.
seealso:
  - module: sidecar.intercept.ip_rule
  - name: ip-route(8)
    description: The iproute2 manual page for routes.
    link: https://man7.org/linux/man-pages/man8/ip-route.8.html
'''

EXAMPLES = r'''
- name: Deliver every packet routed through table 133 locally (TPROXY)
  sidecar.intercept.ip_route:
    type: local
    dst: default
    dev: lo
    table: 133

- name: The same for IPv6
  sidecar.intercept.ip_route:
    family: ipv6
    type: local
    dst: default
    dev: lo
    table: 133

- name: A static route through a gateway with a metric
  sidecar.intercept.ip_route:
    dst: 10.30.0.0/16
    via: 192.0.2.1
    metric: 50
    proto: static

- name: Drop traffic to a prefix silently
  sidecar.intercept.ip_route:
    type: blackhole
    dst: 198.51.100.0/24

- name: Remove the TPROXY route again
  sidecar.intercept.ip_route:
    dst: default
    table: 133
    state: absent
'''

RETURN = r'''
route:
  description: The desired route in canonical form (CIDR destination, numeric table).
  returned: always
  type: dict
  sample:
    type: local
    dst: 0.0.0.0/0
    table: 133
    dev: lo
    via: null
    metric: null
    scope: null
    proto: null
routes:
  description:
    - The routes to O(dst) in O(table) after the run (in check mode, the predicted ones), in canonical form.
    - Each has the keys of RV(route) (with the metric, scope and protocol the kernel reports) and C(multipath).
  returned: always
  type: list
  elements: dict
  sample:
    - type: local
      dst: 0.0.0.0/0
      table: 133
      dev: lo
      via: null
      metric: 0
      scope: host
      proto: boot
      multipath: false
commands:
  description: The C(ip) commands that were run (or would be run in check mode) to change the host.
  returned: always
  type: list
  elements: str
  sample: ["ip -4 route replace local default table 133 dev lo"]
diff:
  description: The routes to O(dst) in O(table) before and after, one line each.
  returned: when diff mode is enabled
  type: dict
  sample:
    before: ""
    after: "local default dev lo table 133\n"
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sidecar.intercept.plugins.module_utils.iproute import (
    IpCommand,
    desired_or_fail,
    public_route,
    route_args,
    route_delete_args,
    route_desired,
    route_from_json,
    route_matches,
    route_text,
    table_names,
)


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            family=dict(type='str', default='ipv4', choices=['ipv4', 'ipv6']),
            dst=dict(type='str', required=True),
            type=dict(type='str', choices=['unicast', 'local', 'blackhole', 'unreachable', 'prohibit']),
            dev=dict(type='str'),
            via=dict(type='str', aliases=['gateway']),
            table=dict(type='raw', default='main'),
            metric=dict(type='int', aliases=['priority']),
            scope=dict(type='str'),
            proto=dict(type='str', aliases=['protocol']),
            state=dict(type='str', default='present', choices=['present', 'absent']),
        ),
        supports_check_mode=True,
    )
    params = module.params
    family = params['family']
    names = table_names()
    desired = desired_or_fail(module, route_desired, names)

    ip = IpCommand(module, family)

    def current():
        found = ip.parsed(['-details', 'route', 'show', 'table', str(desired['table'])],
                          route_from_json, family, desired['table'])
        return [r for r in found if r['dst'] == desired['dst']]

    before = current()
    matching = [r for r in before if route_matches(r, desired)]
    changed = False
    if params['state'] == 'present':
        if not matching:
            changed = True
            ip.change(['route', 'replace'] + route_args(desired))
    else:
        for route in matching:
            changed = True
            ip.change(['route', 'del'] + route_delete_args(route))

    if module.check_mode:
        after = _predict(before, matching, desired, params['state'])
    elif changed:
        after = current()
    else:
        after = before

    ip.exit(changed, before, after, route_text, names, route=public_route(desired), routes=after)


def _predict(before, matching, desired, state):
    """What check mode expects the table to hold for dst afterwards."""
    if state == 'absent':
        return [r for r in before if r not in matching]
    if matching:
        return before
    metric = desired['metric'] if desired['metric'] is not None else desired['family_default_metric']
    # replace swaps the route with the same destination and metric
    kept = [r for r in before if r['metric'] != metric]
    new = public_route(desired)
    new['metric'] = metric
    new['multipath'] = False
    return kept + [new]


def main():
    run_module()


if __name__ == '__main__':
    main()
