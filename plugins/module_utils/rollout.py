# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The record of a verified rollout and the comparison of a host with it.

One implementation for sidecar.intercept.rollout_state (writes the record, answers a query) and
sidecar.intercept.capture_facts (answers the query in the same module run that reads the capture
state, so that an unchanged host costs site.yml one module run).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import glob
import hashlib
import json
import os
import socket
import tempfile
from urllib.parse import urlparse

RECORD_VERSION = 1
UNIT_DIR = '/systemd/system'
UNIT_SUFFIXES = ('.service', '.socket')
DIGEST_CHANGED = 'the settings or the collection changed since the recorded rollout'


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
    """None when URL (http, loopback) answers 200, else the problem in one line.

    One HTTP/1.0 GET on a plain socket: ansible.module_utils.urls (or http.client) would add about
    90 ms (40 ms) of imports to every run of capture_facts, which site.yml makes on every host."""
    parsed = urlparse(url)
    head = b''
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 80), timeout=timeout) as sock:
            sock.sendall(('GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' % (parsed.path or '/', parsed.netloc)).encode('ascii'))
            while b'\r\n' not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except (OSError, ValueError) as e:
        return 'proxy not ready (GET %s: %s)' % (url, e)
    fields = head.split(b'\r\n', 1)[0].split()
    status = fields[1].decode('ascii', 'replace') if len(fields) >= 2 and fields[0].startswith(b'HTTP/') else None
    return None if status == '200' else 'proxy not ready (GET %s: %s)' % (url, status or 'no HTTP answer')


def problems(path, files, ready_url, timeout):
    """Every bad value among the inputs, one message each (empty when all are good)."""
    found = []
    for pattern in files:
        if not pattern.startswith('/'):
            found.append('files must be absolute glob patterns, got %r' % pattern)
    if not path.startswith('/'):
        found.append('path must be absolute, got %r' % path)
    if timeout <= 0:
        found.append('timeout must be positive, got %r' % timeout)
    if ready_url is not None:
        parsed = urlparse(ready_url)
        host = (parsed.hostname or '')
        if parsed.scheme != 'http' or not (host == 'localhost' or host.startswith('127.') or host == '::1'):
            found.append('ready_url must be an http URL on a loopback address, got %r' % ready_url)
    return found


def query(module, path, files, ready_url=None, timeout=3.0, digest=None):
    """Compare the host with the record at PATH.

    Returns (reasons, record): every difference found, one line each, and the record as found ({} when
    there is none). With DIGEST None the digest is not compared here (the caller compares the record's);
    the proxy's readiness is asked only when nothing else differs.
    """
    record = read_record(path)
    if record is None:
        return ['no record of a verified rollout at %s' % path], {}
    if record.get('invalid') or record.get('version') != RECORD_VERSION:
        return ['the record at %s is not one this collection wrote' % path], {}
    # (hashed only when there is a record to compare with: a first rollout has none)
    current = owned_files(files, path)
    reasons = []
    if digest is not None and record.get('digest') != digest:
        reasons.append(DIGEST_CHANGED)
    was = record.get('files') or {}
    for name in sorted(set(was) | set(current)):
        if name not in current:
            reasons.append('%s is gone' % name)
        elif name not in was:
            reasons.append('%s is new' % name)
        elif was[name] != current[name]:
            reasons.append('%s changed' % name)
    recorded_units = record.get('units') or {}
    now = unit_states(module, sorted(recorded_units))
    for name, state in sorted(recorded_units.items()):
        if state == 'active' and now.get(name) != 'active':
            reasons.append('%s is %s (was active)' % (name, now.get(name)))
    if not reasons and ready_url:
        problem = check_ready(ready_url, timeout)
        if problem:
            reasons.append(problem)
    return reasons, record


def new_record(module, digest, files, path):
    current = owned_files(files, path)
    return {'version': RECORD_VERSION, 'digest': digest, 'files': current,
            'units': unit_states(module, unit_names(current))}


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
