# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pure helpers behind ip_rule and ip_route: validation and canonical forms."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.sidecar.intercept.plugins.module_utils import iproute
from ansible_collections.sidecar.intercept.plugins.module_utils.iproute import IprouteError


@pytest.mark.parametrize('value, expected', [
    (1337, (0x539, 0xFFFFFFFF)),
    ('1337', (0x539, 0xFFFFFFFF)),
    ('0x539', (0x539, 0xFFFFFFFF)),
    ('0X539/0xFFFFFFFF', (0x539, 0xFFFFFFFF)),
    ('1337/65535', (0x539, 0xFFFF)),
    ('0', (0, 0xFFFFFFFF)),
    ('0xffffffff/0x1', (0xFFFFFFFF, 1)),
])
def test_parse_fwmark(value, expected):
    assert iproute.parse_fwmark(value) == expected


@pytest.mark.parametrize('value', ['', 'abc', '0x', '1/2/3', '-1', '0x100000000', '1/0x100000000', True, '1.5'])
def test_parse_fwmark_rejects(value):
    with pytest.raises(IprouteError, match="fwmark: '?%s" % str(value).replace('.', r'\.')):
        iproute.parse_fwmark(value)


def test_format_fwmark_is_canonical():
    assert iproute.format_fwmark(*iproute.parse_fwmark('1337')) == '0x539'
    assert iproute.format_fwmark(*iproute.parse_fwmark('0x539/0xff00')) == '0x539/0xff00'
    assert iproute.format_fwmark(None, None) is None


@pytest.mark.parametrize('value, expected', [
    (133, 133), ('133', 133), ('0x85', 133), ('main', 254), ('local', 255), ('default', 253),
    (4294967295, 4294967295), ('sidecar', 133),
])
def test_parse_table(value, expected):
    names = dict(iproute.BUILTIN_TABLES, sidecar=133)
    assert iproute.parse_table(value, names) == expected


@pytest.mark.parametrize('value, message', [
    (0, "table: '0' is out of range"),
    ('unspec', "table: 'unspec' is out of range"),
    (4294967296, "table: '4294967296' is out of range"),
    ('-5', "table: '-5' is neither"),
    ('nope', "table: 'nope' is neither"),
    (False, 'table: False is not'),
])
def test_parse_table_rejects(value, message):
    with pytest.raises(IprouteError, match=message):
        iproute.parse_table(value)


def test_read_names_merges_files_and_dirs(tmp_path):
    main = tmp_path / 'rt_tables'
    main.write_text(u'# reserved\n255\tlocal\n254 main\n\n  133  sidecar # TPROXY\nbroken line\nxx name\n')
    d = tmp_path / 'rt_tables.d'
    d.mkdir()
    (d / 'b.conf').write_text(u'200 two\n')
    (d / 'a.conf').write_text(u'0x65 hexa\n133 duplicate\n')
    (d / 'ignored.txt').write_text(u'7 seven\n')
    names = iproute.read_names([str(main), str(tmp_path / 'missing')], [str(d), str(tmp_path / 'nodir')])
    assert names == {'local': 255, 'main': 254, 'sidecar': 133, 'hexa': 101, 'duplicate': 133, 'two': 200}


def test_table_label():
    assert iproute.table_label(254) == 'main'
    assert iproute.table_label(133) == '133'
    assert iproute.table_label(133, {'sidecar': 133}) == 'sidecar'


@pytest.mark.parametrize('value, family, expected', [
    ('default', 'ipv4', '0.0.0.0/0'),
    ('default', 'ipv6', '::/0'),
    ('10.0.0.1', 'ipv4', '10.0.0.1/32'),
    ('FD00:0::/64', 'ipv6', 'fd00::/64'),
    (' 10.0.0.0/8 ', 'ipv4', '10.0.0.0/8'),
])
def test_parse_prefix(value, family, expected):
    assert str(iproute.parse_prefix(value, family, 'dst')) == expected


@pytest.mark.parametrize('value, family, message', [
    ('10.0.0.1/8', 'ipv4', "dst: '10.0.0.1/8' is not a valid CIDR"),
    ('10.0.0.0/8', 'ipv6', "dst: '10.0.0.0/8' is an IPv4 prefix but family is ipv6"),
    ('::/0', 'ipv4', "dst: '::/0' is an IPv6 prefix"),
    ('host.example', 'ipv4', "dst: 'host.example' is not a valid CIDR"),
    ('10.0.0.0/8', 'inet', "family: 'inet' is not one of"),
])
def test_parse_prefix_rejects(value, family, message):
    with pytest.raises(IprouteError, match=message):
        iproute.parse_prefix(value, family, 'dst')


def test_rule_from_json_canonical_and_extra():
    rule = iproute.rule_from_json(
        {'priority': 50, 'src': 'fd00::1', 'dst': 'fd00:1::', 'dstlen': 64, 'fwmark': '0x7', 'fwmask': '0xff',
         'iif': 'lo', 'table': '7'}, 'ipv6')
    assert rule == {'priority': 50, 'from': 'fd00::1/128', 'to': 'fd00:1::/64', 'fwmark': '0x7/0xff',
                    'iif': 'lo', 'oif': None, 'table': 7, 'extra': {}}
    rule = iproute.rule_from_json({'priority': 3, 'not': None, 'src': 'all', 'table': 'main'}, 'ipv4')
    assert rule['table'] == 254 and rule['extra'] == {'not': None}
    # an action without a table (e.g. unreachable) keeps its key as an extra
    rule = iproute.rule_from_json({'priority': 4, 'src': 'all', 'action': 'unreachable'}, 'ipv4')
    assert rule['table'] is None and rule['extra'] == {'action': 'unreachable'}


def test_rule_args_and_text():
    rule = {'priority': 10, 'from': '10.0.0.0/8', 'to': None, 'fwmark': '0x539', 'iif': 'lo', 'oif': None,
            'table': 254}
    assert iproute.rule_args(rule) == ['priority', '10', 'from', '10.0.0.0/8', 'fwmark', '0x539', 'iif', 'lo',
                                       'table', '254']
    assert iproute.rule_text(rule) == '10: from 10.0.0.0/8 fwmark 0x539 iif lo lookup main'


def test_route_from_json_defaults_per_family():
    v4 = iproute.route_from_json({'dst': 'default', 'dev': 'lo', 'type': 'local'}, 'ipv4', 133)
    assert v4['metric'] == 0 and v4['dst'] == '0.0.0.0/0' and v4['scope'] is None
    v6 = iproute.route_from_json({'dst': 'fd00::1', 'gateway': 'FD00::2'}, 'ipv6', 254)
    assert v6 == {'type': 'unicast', 'dst': 'fd00::1/128', 'table': 254, 'dev': None, 'via': 'fd00::2',
                  'metric': 1024, 'scope': None, 'proto': None, 'multipath': False}
    routed = iproute.route_from_json({'dst': '10.0.0.0/8', 'via': {'family': 'inet', 'host': '10.1.1.1'},
                                      'protocol': '4', 'scope': 'link'}, 'ipv4', 254)
    assert routed['via'] == '10.1.1.1' and routed['proto'] == 'static' and routed['scope'] == 'link'


def test_route_args():
    route = {'type': 'local', 'dst': '0.0.0.0/0', 'table': 133, 'dev': 'lo', 'via': None, 'metric': None,
             'scope': None, 'proto': None}
    assert iproute.route_args(route) == ['local', 'default', 'table', '133', 'dev', 'lo']
    route.update(type='unicast', dst='10.0.0.1/32', dev=None, via='10.9.0.1', metric=5, scope='global',
                 proto='static', multipath=False)
    assert iproute.route_args(route) == ['unicast', '10.0.0.1', 'table', '133', 'via', '10.9.0.1', 'metric', '5',
                                         'scope', 'global', 'proto', 'static']
    assert iproute.route_delete_args(route) == ['unicast', '10.0.0.1', 'table', '133', 'via', '10.9.0.1',
                                                'metric', '5']


@pytest.mark.parametrize('value, expected', [('static', 'static'), ('4', 'static'), ('250', '250'), (None, None)])
def test_parse_proto(value, expected):
    assert iproute.parse_proto(value) == expected


@pytest.mark.parametrize('value, expected', [('host', 'host'), ('universe', 'global'), ('253', 'link'), ('7', '7')])
def test_parse_scope(value, expected):
    assert iproute.parse_scope(value) == expected


def test_loads_list_errors():
    assert iproute.loads_list('') == []
    with pytest.raises(IprouteError, match='cannot parse'):
        iproute.loads_list('[')
    with pytest.raises(IprouteError, match='not a list'):
        iproute.loads_list('{}')


@pytest.mark.parametrize('ours, theirs, expected', [
    ((0x539, 0xFFF), (0x539, 0xFFFFFFFF), True),      # an exact-mark rule for our value
    ((0x539, 0xFFF), (0x1, 0x1), True),               # shares bit 0 with the same value
    ((0x539, 0xFFF), (0x2, 0x2), False),              # shares bit 1, our mark has it clear
    ((0x539, 0xFFF), (0x4000, 0x4000), False),        # kube-proxy: disjoint masks
    ((0x539, 0xFFF), (0x80000, 0xFF0000), False),     # Tailscale: disjoint masks
    ((0x539, 0xFFF), (0xCA6C, 0xFFFFFFFF), False),    # WireGuard 51820: overlapping masks, other value
    ((0x539, 0xFFFFFFFF), (0xC539, 0xFFFFFFFF), False),
])
def test_fwmarks_overlap(ours, theirs, expected):
    assert iproute.fwmarks_overlap(ours, theirs) is expected
    assert iproute.fwmarks_overlap(theirs, ours) is expected  # symmetric
