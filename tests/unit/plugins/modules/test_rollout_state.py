# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""rollout_state on real files in a temporary directory, a real HTTP server on loopback for /ready,
and recorded ``systemctl show`` output for the units (the Molecule fleet scenario runs it on systemd)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import http.server
import json
import os
import threading

import pytest

from ansible_collections.sidecar.intercept.plugins.modules import rollout_state as module_under_test
from ansible_collections.sidecar.intercept.tests.unit.plugins.modules.recorded import run_case

UNITS = ['sidecar-proxy-inbound.socket', 'sidecar-proxy.service']


def show(states):
    """What `systemctl show --property=Id,ActiveState -- UNITS` prints."""
    return ''.join('Id=%s\nActiveState=%s\n\n' % (name, states[name]) for name in UNITS)


def systemctl(states):
    return {'command': ['/usr/sbin/systemctl', 'show', '--property=Id,ActiveState', '--'] + UNITS,
            'out': show(states)}


@pytest.fixture
def host(tmp_path):
    """A host's owned files: a config, a release behind a `current` link, two units."""
    etc = tmp_path / 'etc' / 'sidecar-proxy'
    units = tmp_path / 'etc' / 'systemd' / 'system'
    release = tmp_path / 'opt' / 'releases' / 'r1'
    for d in (etc, units, release, tmp_path / 'state'):
        d.mkdir(parents=True)
    (etc / 'config.json').write_text('{"mode": "redirect"}\n')
    (release / 'sidecar-proxy.pyz').write_bytes(b'PK zip')
    (release / '__pycache__').mkdir()
    (release / '__pycache__' / 'x.pyc').write_bytes(b'cache')
    os.symlink('releases/r1', str(tmp_path / 'opt' / 'current'))
    for name in UNITS:
        (units / name).write_text('[Unit]\n')
    return tmp_path


def args(host, **kw):
    a = {'path': str(host / 'state' / 'rollout.json'), 'digest': 'd1',
         'files': [str(host / 'etc' / 'sidecar-proxy' / '**'), str(host / 'opt' / 'current'),
                   str(host / 'opt' / 'current' / '**'), str(host / 'etc' / 'systemd' / 'system' / 'sidecar-*'),
                   str(host / 'state' / '*')]}
    a.update(kw)
    return a


def run(monkeypatch, a, calls=(), check_mode=False, diff=False):
    case = {'args': a, 'run_command_calls': list(calls), 'check_mode': check_mode, 'diff': diff}
    result, failed, remaining = run_case(case, module_under_test.main, monkeypatch)
    assert not remaining, remaining
    return result, failed


def record(monkeypatch, host, digest='d1'):
    result, failed = run(monkeypatch, args(host, state='present', digest=digest),
                         [systemctl({u: 'active' for u in UNITS})])
    assert not failed, result
    return result


def test_present_records_files_links_and_units_then_is_idempotent(monkeypatch, host):
    result = record(monkeypatch, host)
    assert result['changed']
    rec = json.loads((host / 'state' / 'rollout.json').read_text())
    assert rec == result['record']
    files = rec['files']
    assert files[str(host / 'opt' / 'current')] == 'link:releases/r1'
    assert files[str(host / 'etc' / 'sidecar-proxy' / 'config.json')].startswith('sha256:')
    assert not any('__pycache__' in p or p.endswith('rollout.json') for p in files)
    assert rec['units'] == {u: 'active' for u in UNITS}
    assert oct(os.stat(str(host / 'state' / 'rollout.json')).st_mode & 0o777) == '0o600'
    assert not record(monkeypatch, host)['changed']


def test_check_mode_and_diff_write_nothing(monkeypatch, host):
    result, failed = run(monkeypatch, args(host, state='present'), [systemctl({u: 'active' for u in UNITS})],
                         check_mode=True, diff=True)
    assert not failed and result['changed']
    assert result['diff']['before'] == '' and '"digest": "d1"' in result['diff']['after']
    assert not (host / 'state' / 'rollout.json').exists()


def test_query_in_sync(monkeypatch, host):
    record(monkeypatch, host)
    result, failed = run(monkeypatch, args(host), [systemctl({u: 'active' for u in UNITS})])
    assert not failed and not result['changed']
    assert result['in_sync'] and result['reasons'] == []


def test_query_names_every_difference(monkeypatch, host):
    record(monkeypatch, host)
    (host / 'etc' / 'sidecar-proxy' / 'config.json').write_text('{"mode": "tproxy"}\n')
    (host / 'etc' / 'sidecar-proxy' / 'extra.json').write_text('{}\n')
    os.unlink(str(host / 'opt' / 'current'))
    os.symlink('releases/r2', str(host / 'opt' / 'current'))
    states = {'sidecar-proxy-inbound.socket': 'inactive', 'sidecar-proxy.service': 'active'}
    result, failed = run(monkeypatch, args(host, digest='d2'), [systemctl(states)])
    assert not failed and not result['in_sync']
    cfg = str(host / 'etc' / 'sidecar-proxy')
    assert result['reasons'] == [
        'the settings or the collection changed since the recorded rollout',
        cfg + '/config.json changed',
        cfg + '/extra.json is new',
        str(host / 'opt' / 'current') + ' changed',
        str(host / 'opt' / 'current' / 'sidecar-proxy.pyz') + ' is gone',
        'sidecar-proxy-inbound.socket is inactive (was active)',
    ]


def test_query_without_or_with_a_foreign_record(monkeypatch, host):
    result, _failed = run(monkeypatch, args(host))
    assert not result['in_sync'] and result['reasons'] == ['no record of a verified rollout at %s' % args(host)['path']]
    (host / 'state' / 'rollout.json').write_text('[1, 2]')
    result, _failed = run(monkeypatch, args(host))
    assert not result['in_sync'] and 'not one this collection wrote' in result['reasons'][0]


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b'ok\n')

    def log_message(self, *a):
        pass


@pytest.fixture
def ready_server():
    server = http.server.HTTPServer(('127.0.0.1', 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_query_asks_the_proxy_whether_it_is_ready(monkeypatch, host, ready_server):
    record(monkeypatch, host)
    url = 'http://127.0.0.1:%d/ready' % ready_server.server_address[1]
    result, _failed = run(monkeypatch, args(host, ready_url=url), [systemctl({u: 'active' for u in UNITS})])
    assert result['in_sync'], result
    monkeypatch.setattr(_Ready, 'status', 503)
    result, _failed = run(monkeypatch, args(host, ready_url=url), [systemctl({u: 'active' for u in UNITS})])
    assert not result['in_sync'] and result['reasons'] == ['proxy not ready (GET %s: 503)' % url]


@pytest.mark.parametrize('bad, msg', [
    ({'digest': ' '}, 'digest must not be empty'),
    ({'files': ['etc/*']}, "files must be absolute glob patterns, got 'etc/\\*'"),
    ({'ready_url': 'http://10.0.0.1:15000/ready'}, 'ready_url must be an http URL on a loopback address'),
    ({'timeout': 0}, 'timeout must be positive, got 0'),
])
def test_bad_input_is_named_before_anything_is_read(monkeypatch, host, bad, msg):
    import re
    result, failed = run(monkeypatch, args(host, state='present', **bad))
    assert failed and re.search(msg, result['msg']), result
    assert not (host / 'state' / 'rollout.json').exists()
