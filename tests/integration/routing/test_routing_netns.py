# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""ip_rule and ip_route against a real kernel: each test gets a fresh network namespace
(``srt-*``), runs the modules inside it and checks the kernel's state with ``ip -json``.
Nothing outside the namespace is touched; the namespace is deleted even when a test fails."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import ansible_collections

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which('ip') is None,
    reason='needs root and iproute2 to create network namespaces')

COLLECTIONS_ROOT = os.path.dirname(os.path.abspath(list(ansible_collections.__path__)[0]))
_COUNTER = itertools.count()
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [COLLECTIONS_ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
    LC_ALL='C.UTF-8', ANSIBLE_NOCOLOR='1')


def sh(*args, **kwargs):
    return subprocess.run(list(args), check=kwargs.pop('check', True), capture_output=True, text=True,
                          timeout=60, **kwargs)


class Netns:
    """A namespace with lo up and a veth pair v0 (10.9.0.1/24, fd00:9::1/64) <-> v1."""

    def __init__(self):
        self.name = 'srt-%d-%d' % (os.getpid(), next(_COUNTER))
        sh('ip', 'netns', 'add', self.name)
        for cmd in (['link', 'set', 'lo', 'up'],
                    ['link', 'add', 'v0', 'type', 'veth', 'peer', 'name', 'v1'],
                    # no link-local addresses appearing later: snapshots must be stable
                    ['link', 'set', 'v0', 'addrgenmode', 'none'], ['link', 'set', 'v1', 'addrgenmode', 'none'],
                    ['link', 'set', 'v0', 'up'], ['link', 'set', 'v1', 'up'],
                    ['addr', 'add', '10.9.0.1/24', 'dev', 'v0'],
                    ['-6', 'addr', 'add', 'fd00:9::1/64', 'dev', 'v0', 'nodad']):
            self.ip(*cmd)

    def ip(self, *args):
        return sh('ip', 'netns', 'exec', self.name, 'ip', *args).stdout

    def json(self, *args):
        out = sh('ip', 'netns', 'exec', self.name, 'ip', '-json', *args, check=False)
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []

    def snapshot(self):
        """Every rule and route of both families, as text: compared byte for byte."""
        return '\n'.join(self.ip(*cmd) for cmd in (
            ['-4', 'rule', 'show'], ['-6', 'rule', 'show'],
            ['-4', 'route', 'show', 'table', 'all'], ['-6', 'route', 'show', 'table', 'all']))

    def module(self, name, check=False, diff=True, **args):
        """Run the module's code in the namespace the way Ansible does: args file in, JSON out."""
        args = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
        with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as fh:
            json.dump({'ANSIBLE_MODULE_ARGS': args}, fh)
        try:
            proc = sh('ip', 'netns', 'exec', self.name, sys.executable, '-m',
                      'ansible_collections.sidecar.intercept.plugins.modules.%s' % name, fh.name,
                      check=False, env=ENV)
        finally:
            os.unlink(fh.name)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise AssertionError('module %s printed no JSON (rc=%d): %s %s'
                                 % (name, proc.returncode, proc.stdout, proc.stderr))

    def delete(self):
        sh('ip', 'netns', 'del', self.name, check=False)


@pytest.fixture
def ns():
    space = Netns()
    try:
        yield space
    finally:
        space.delete()


def fwmark_rules(ns, family='-4', mark='0x539'):
    return [r for r in ns.json(family, 'rule', 'show') if r.get('fwmark') == mark]


@pytest.mark.parametrize('family, flag', [('ipv4', '-4'), ('ipv6', '-6')])
def test_rule_lifecycle(ns, family, flag):
    pristine = ns.snapshot()
    args = dict(family=family, fwmark=1337, table=133)

    res = ns.module('ip_rule', check=True, **args)
    assert res['changed'] and not res.get('failed'), res
    assert fwmark_rules(ns, flag) == [], 'check mode changed the kernel'
    assert ns.snapshot() == pristine

    res = ns.module('ip_rule', **args)
    assert res['changed'] and res['diff']['before'] == '', res
    assert [(r['table'], r.get('fwmask')) for r in fwmark_rules(ns, flag)] == [('133', None)]

    # canonical comparison: the same rule written differently is already there
    for mark in ('0x539', '0x539/0xffffffff', '1337'):
        res = ns.module('ip_rule', **dict(args, fwmark=mark))
        assert res['changed'] is False, (mark, res)

    # a duplicate at another priority, then absent removes both; check mode first
    ns.ip(flag, 'rule', 'add', 'fwmark', '1337', 'table', '133', 'priority', '100')
    assert len(fwmark_rules(ns, flag)) == 2
    res = ns.module('ip_rule', check=True, state='absent', **args)
    assert res['changed'] and len(res['commands']) == 2, res
    assert len(fwmark_rules(ns, flag)) == 2, 'check mode changed the kernel'
    res = ns.module('ip_rule', state='absent', **args)
    assert res['changed'] and res['rules'] == [] and res['diff']['after'] == '', res
    assert fwmark_rules(ns, flag) == []
    assert ns.module('ip_rule', state='absent', **args)['changed'] is False
    assert ns.snapshot() == pristine


def test_rule_selectors_priority_and_neighbours(ns):
    # a user's rule with an extra selector must not count as ours and must survive untouched
    ns.ip('-4', 'rule', 'add', 'not', 'fwmark', '1337', 'table', '133', 'priority', '300')
    ns.ip('-4', 'rule', 'add', 'from', '10.9.0.0/24', 'table', 'main', 'priority', '400')
    pristine = ns.snapshot()
    args = dict(fwmark='0x539/0xffff', table=133, priority=200, iif='lo', to='10.20.0.0/16')
    res = ns.module('ip_rule', **args)
    assert res['changed'], res
    mine = [r for r in ns.json('-4', 'rule', 'show') if r['priority'] == 200]
    assert mine == [{'priority': 200, 'src': 'all', 'dst': '10.20.0.0', 'dstlen': 16, 'fwmark': '0x539',
                     'fwmask': '0xffff', 'iif': 'lo', 'table': '133'}]
    assert ns.module('ip_rule', **args)['changed'] is False
    # the same rule at another priority is another rule
    assert ns.module('ip_rule', **dict(args, priority=201))['changed'] is True
    res = ns.module('ip_rule', state='absent', **dict(args, priority=None))
    assert res['changed'] and len(res['commands']) == 2, res
    assert ns.snapshot() == pristine


@pytest.mark.parametrize('family, flag, default', [('ipv4', '-4', '0.0.0.0/0'), ('ipv6', '-6', '::/0')])
def test_tproxy_local_route_lifecycle(ns, family, flag, default):
    pristine = ns.snapshot()
    args = dict(family=family, type='local', dst='default', dev='lo', table=133)
    res = ns.module('ip_route', check=True, **args)
    assert res['changed'] and res['routes'][0]['dst'] == default, res
    assert ns.json(flag, 'route', 'show', 'table', '133') == [], 'check mode changed the kernel'

    res = ns.module('ip_route', **args)
    assert res['changed'], res
    routes = ns.json(flag, 'route', 'show', 'table', '133')
    assert [(r['type'], r['dst'], r['dev']) for r in routes] == [('local', 'default', 'lo')]
    assert ns.module('ip_route', **dict(args, dst=default))['changed'] is False
    res = ns.module('ip_route', family=family, dst='default', table='133', state='absent')
    assert res['changed'] and res['routes'] == [], res
    assert ns.json(flag, 'route', 'show', 'table', '133') == []
    assert ns.module('ip_route', family=family, dst='default', table=133, state='absent')['changed'] is False
    assert ns.snapshot() == pristine


def test_gateway_routes_replace_and_types(ns):
    pristine = ns.snapshot()
    base = dict(dst='10.10.0.0/16', dev='v0', metric=50, proto='static')
    assert ns.module('ip_route', via='10.9.0.2', **base)['changed'] is True
    assert ns.module('ip_route', via='10.9.0.2', **base)['changed'] is False
    # another gateway at the same metric replaces the route (check mode first)
    res = ns.module('ip_route', check=True, via='10.9.0.3', **base)
    assert res['changed'] and [r['via'] for r in res['routes']] == ['10.9.0.3'], res
    assert [r['gateway'] for r in ns.json('-4', 'route', 'show', '10.10.0.0/16')] == ['10.9.0.2']
    res = ns.module('ip_route', via='10.9.0.3', **base)
    assert res['changed'] and 'via 10.9.0.2' in res['diff']['before'] and 'via 10.9.0.3' in res['diff']['after']
    assert [r['gateway'] for r in ns.json('-4', 'route', 'show', '10.10.0.0/16')] == ['10.9.0.3']

    for rtype in ('blackhole', 'unreachable', 'prohibit'):
        dst = '198.51.100.0/24'
        assert ns.module('ip_route', type=rtype, dst=dst, table=134)['changed'] is True, rtype
        assert ns.module('ip_route', type=rtype, dst=dst, table=134)['changed'] is False, rtype
        assert [r['type'] for r in ns.json('-4', 'route', 'show', 'table', '134')] == [rtype]

    res = ns.module('ip_route', family='ipv6', dst='fd00:40::/64', via='fd00:9::2')
    assert res['changed'] and res['routes'][0]['metric'] == 1024, res
    assert ns.module('ip_route', family='ipv6', dst='fd00:40:0::/64', via='fd00:9:0::2')['changed'] is False

    for args in (dict(dst='10.10.0.0/16'), dict(dst='198.51.100.0/24', table=134),
                 dict(family='ipv6', dst='fd00:40::/64')):
        assert ns.module('ip_route', state='absent', **args)['changed'] is True, args
    assert ns.snapshot() == pristine


@pytest.mark.parametrize('name, args, message', [
    ('ip_rule', dict(fwmark='1337x', table=133), "fwmark: '1337x'"),
    ('ip_rule', dict(fwmark=1, table=133, to='fd00::/64'), "to: 'fd00::/64' is an IPv6 prefix"),
    ('ip_rule', dict(fwmark=1, table=4294967296), "table: '4294967296' is out of range"),
    ('ip_route', dict(dst='10.0.0.0/33', dev='lo'), "dst: '10.0.0.0/33'"),
    ('ip_route', dict(family='ipv6', type='local', dst='10.0.0.0/8', dev='lo'), "dst: '10.0.0.0/8' is an IPv4"),
])
def test_bad_input_fails_before_any_change(ns, name, args, message):
    pristine = ns.snapshot()
    res = ns.module(name, **args)
    assert res.get('failed') and message in res['msg'], res
    assert ns.snapshot() == pristine


@pytest.mark.skipif(shutil.which('ansible') is None, reason='ansible not on PATH')
def test_ansible_adhoc_end_to_end(ns):
    """The real path: ansible resolves the FQCN, ships the module and runs it (check, then real, then again)."""
    def adhoc(*extra):
        cmd = ['ip', 'netns', 'exec', ns.name, 'ansible', 'localhost', '-c', 'local', '-i', 'localhost,',
               '-e', 'ansible_python_interpreter=%s' % sys.executable, '-o',
               '-m', 'sidecar.intercept.ip_rule', '-a', 'fwmark=1337 table=133 family=ipv6'] + list(extra)
        proc = sh(*cmd, check=False, env=ENV)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.split('=>', 1)[1])

    assert adhoc('--check')['changed'] is True
    assert fwmark_rules(ns, '-6') == []
    assert adhoc()['changed'] is True
    assert len(fwmark_rules(ns, '-6')) == 1
    assert adhoc()['changed'] is False
