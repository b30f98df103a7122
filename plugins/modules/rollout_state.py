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

import glob
import hashlib
import json
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.six.moves.urllib.parse import urlparse

try:
    from ansible.module_utils.urls import open_url
except ImportError:  # pragma: no cover - part of ansible-core
    open_url = None

RECORD_VERSION = 1
UNIT_DIR = '/systemd/system'
UNIT_SUFFIXES = ('.service', '.socket')


def file_entry(path):
    if os.path.islink(path):
        return 'link:' + os.readlink(path)
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 16), b''):
            digest.update(block)
    return 'sha256:' + digest.hexdigest()


def owned_files(patterns, record_path):
    found = {}
    for pattern in patterns:
        for path in glob.glob(pattern, recursive=True):
            if '__pycache__' in path.split(os.sep) or os.path.abspath(path) == os.path.abspath(record_path):
                continue
            if os.path.islink(path) or os.path.isfile(path):
                found[path] = file_entry(path)
    return dict(sorted(found.items()))


def unit_names(files):
    return sorted(os.path.basename(p) for p in files
                  if os.path.dirname(p).endswith(UNIT_DIR) and p.endswith(UNIT_SUFFIXES))


def unit_states(module, names):
    if not names:
        return {}
    systemctl = module.get_bin_path('systemctl', required=True)
    rc, out, err = module.run_command([systemctl, 'show', '--property=Id,ActiveState', '--'] + names,
                                      environ_update={'LC_ALL': 'C'})
    if rc != 0:
        module.fail_json(msg='systemctl show failed: %s' % (err.strip() or out.strip()), rc=rc)
    states, current = {}, {}
    for line in out.splitlines() + ['']:
        if not line.strip():
            if 'Id' in current:
                states[current['Id']] = current.get('ActiveState', 'unknown')
            current = {}
            continue
        key, value = line.split('=', 1) if '=' in line else (line, '')
        current[key] = value
    # systemctl show prints the blocks in the order asked; an alias would report its own Id
    return dict((name, states.get(name, 'unknown')) for name in names)


def read_record(path):
    try:
        with open(path) as f:
            record = json.load(f)
    except (IOError, OSError):
        return None
    except ValueError:
        return {'invalid': True}
    return record if isinstance(record, dict) else {'invalid': True}


def check_ready(url, timeout):
    try:
        resp = open_url(url, method='GET', timeout=timeout, validate_certs=False, follow_redirects='none')
        status = resp.getcode()
    except Exception as e:  # urllib raises HTTPError for 503, socket errors otherwise
        status = getattr(e, 'code', None)
        if status is None:
            return 'proxy not ready (GET %s: %s)' % (url, e)
    return None if status == 200 else 'proxy not ready (GET %s: %s)' % (url, status)


def differences(module, record, digest, files):
    if record is None:
        return ['no record of a verified rollout at %s' % module.params['path']]
    if record.get('invalid') or record.get('version') != RECORD_VERSION:
        return ['the record at %s is not one this collection wrote' % module.params['path']]
    reasons = []
    if record.get('digest') != digest:
        reasons.append('the settings or the collection changed since the recorded rollout')
    was = record.get('files') or {}
    for path in sorted(set(was) | set(files)):
        if path not in files:
            reasons.append('%s is gone' % path)
        elif path not in was:
            reasons.append('%s is new' % path)
        elif was[path] != files[path]:
            reasons.append('%s changed' % path)
    recorded_units = record.get('units') or {}
    now = unit_states(module, sorted(recorded_units))
    for name, state in sorted(recorded_units.items()):
        if state == 'active' and now.get(name) != 'active':
            reasons.append('%s is %s (was active)' % (name, now.get(name)))
    return reasons


def write_record(module, path, record):
    directory = os.path.dirname(path) or '.'
    if not os.path.isdir(directory):
        module.fail_json(msg='the directory of the record does not exist: %s' % directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.rollout-')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write('\n')
        module.atomic_move(tmp, path)
        # atomic_move gives a new file the umask's mode; the record is root's alone
        os.chmod(path, 0o600)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def validate(module):
    p = module.params
    if not p['digest'].strip():
        module.fail_json(msg='digest must not be empty')
    for pattern in p['files']:
        if not pattern.startswith('/'):
            module.fail_json(msg='files must be absolute glob patterns, got %r' % pattern)
    if not p['path'].startswith('/'):
        module.fail_json(msg='path must be absolute, got %r' % p['path'])
    if p['timeout'] <= 0:
        module.fail_json(msg='timeout must be positive, got %r' % p['timeout'])
    url = p['ready_url']
    if url is not None:
        parsed = urlparse(url)
        host = (parsed.hostname or '')
        if parsed.scheme != 'http' or not (host == 'localhost' or host.startswith('127.') or host == '::1'):
            module.fail_json(msg='ready_url must be an http URL on a loopback address, got %r' % url)


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
    validate(module)
    p = module.params
    files = owned_files(p['files'], p['path'])
    record = read_record(p['path'])

    if p['state'] == 'query':
        reasons = differences(module, record, p['digest'], files)
        if not reasons and p['ready_url']:
            problem = check_ready(p['ready_url'], p['timeout'])
            if problem:
                reasons.append(problem)
        module.exit_json(changed=False, in_sync=not reasons, reasons=reasons,
                         record=record if record and not record.get('invalid') else {})

    new = {'version': RECORD_VERSION, 'digest': p['digest'], 'files': files,
           'units': unit_states(module, unit_names(files))}
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
