#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: rollout_state
short_description: Record a host's verified rollout and tell whether the host is still exactly so
version_added: 0.1.0
description:
  - After a host was deployed and verified, O(state=present) writes a record of it - the digest of what
    was deployed (O(digest)), the checksum of every file the rollout owns (O(files)) and the state of the
    systemd units among those files.
  - O(state=query) (read-only) tells whether the host is still in that state - the same digest, no
    owned file changed, appeared or went away, every unit that was active still active, and the proxy
    ready (O(ready_url)) - and lists every difference. C(sidecar.intercept.site) skips the hosts that are
    so on a re-run, instead of running every task of the roles again.
  - All input is validated before anything runs; an error names the bad value.
author:
  - sidecar.intercept developers (@sidecar)
options:
  path:
    description: The record (JSON, mode 0600). Removing the capture removes its directory and so the record.
    type: path
    default: /etc/sidecar-intercept/rollout.json
  state:
    description: C(present) writes the record, C(query) compares the host with it.
    type: str
    choices: [present, query]
    default: query
  digest:
    description: What the host should run, as one string (the rollout digests the settings and the collection).
    type: str
    required: true
  files:
    description:
      - Glob patterns (C(**) recurses) of the files the rollout owns. Regular files are recorded by their
        SHA-256, symbolic links by their target; directories are walked by the patterns, not recorded;
        C(__pycache__) and the record itself are left out.
      - Files directly in a C(systemd/system) directory (C(/etc/systemd/system)) whose names end in C(.service) or C(.socket) are units; their
        C(ActiveState) is recorded too.
    type: list
    elements: str
    default: []
  ready_url:
    description: With O(state=query), an HTTP URL on a loopback address that must answer 200 (the proxy's C(/ready)).
    type: str
  timeout:
    description: Seconds to wait for O(ready_url).
    type: float
    default: 3
attributes:
  check_mode:
    support: full
    description: O(state=present) reports what it would write; O(state=query) reads only.
  diff_mode:
    support: full
    description: O(state=present) shows the record before and after.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with systemd.
'''

EXAMPLES = r'''
- name: Record the verified rollout
  sidecar.intercept.rollout_state:
    state: present
    digest: "{{ desired_digest }}"
    files: [/etc/sidecar-proxy/*, /etc/systemd/system/sidecar-*]

- name: Is the host still as it was rolled out
  sidecar.intercept.rollout_state:
    digest: "{{ desired_digest }}"
    files: [/etc/sidecar-proxy/*, /etc/systemd/system/sidecar-*]
    ready_url: http://127.0.0.1:15000/ready
  register: state

- name: Show why not
  ansible.builtin.debug:
    var: state.reasons
  when: not state.in_sync
'''

RETURN = r'''
in_sync:
  description: O(state=query) - the host is exactly as recorded (always true after O(state=present)).
  returned: always
  type: bool
  sample: false
reasons:
  description: O(state=query) - every difference found, one line each (empty when in sync).
  returned: always
  type: list
  elements: str
  sample: ["/etc/sidecar-proxy/config.json changed", "sidecar-proxy-inbound.socket is inactive (was active)"]
record:
  description: The record as written (O(state=present)) or as found (O(state=query), empty when there is none).
  returned: always
  type: dict
  sample:
    digest: 3f5a...
    files: {/etc/sidecar-proxy/config.json: "sha256:9c1e...", /opt/sidecar-proxy/current: "link:releases/0d41..."}
    units: {sidecar-proxy.service: active}
'''

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sidecar.intercept.plugins.module_utils.rollout import (
    new_record,
    problems,
    query,
    read_record,
    write_record,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type='path', default='/etc/sidecar-intercept/rollout.json'),
            state=dict(type='str', choices=['present', 'query'], default='query'),
            digest=dict(type='str', required=True),
            files=dict(type='list', elements='str', default=[]),
            ready_url=dict(type='str'),
            timeout=dict(type='float', default=3.0),
        ),
        supports_check_mode=True,
    )
    p = module.params
    found = problems(p['path'], p['files'], p['ready_url'], p['timeout'])
    if not p['digest'].strip():
        found.insert(0, 'digest must not be empty')
    if found:
        module.fail_json(msg='; '.join(found))

    if p['state'] == 'query':
        reasons, record = query(module, p['path'], p['files'], p['ready_url'], p['timeout'], digest=p['digest'])
        module.exit_json(changed=False, in_sync=not reasons, reasons=reasons, record=record)

    record = read_record(p['path'])
    new = new_record(module, p['digest'], p['files'], p['path'])
    changed = record != new
    result = dict(changed=changed, in_sync=True, reasons=[], record=new)
    if module._diff:
        result['diff'] = dict(before=json.dumps(record, indent=1, sort_keys=True) + '\n' if record else '',
                              after=json.dumps(new, indent=1, sort_keys=True) + '\n',
                              before_header=p['path'], after_header=p['path'])
    if changed and not module.check_mode:
        write_record(module, p['path'], new)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
