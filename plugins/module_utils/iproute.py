# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared code for the ip_rule and ip_route modules.

Everything here is pure: validation of user input, canonical forms of what ``ip -json`` prints,
and the argument lists for ``ip``. Only ``IpCommand`` runs commands, through
``module.run_command`` with a list and the C locale.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import json
import os
import re

TABLE_MAX = 4294967295
MARK_MAX = 0xFFFFFFFF
# Names iproute2 knows without any file (lib/rt_names.c).
BUILTIN_TABLES = {'unspec': 0, 'default': 253, 'main': 254, 'local': 255}
BUILTIN_PROTOS = {
    'unspec': 0, 'redirect': 1, 'kernel': 2, 'boot': 3, 'static': 4, 'gated': 8, 'ra': 9,
    'mrt': 10, 'zebra': 11, 'bird': 12, 'dnrouted': 13, 'xorp': 14, 'ntk': 15, 'dhcp': 16,
    'keepalived': 18, 'babel': 42, 'openr': 99, 'bgp': 186, 'isis': 187, 'ospf': 188, 'rip': 189,
    'eigrp': 192,
}
SCOPES = {'global': 0, 'universe': 0, 'site': 200, 'link': 253, 'host': 254, 'nowhere': 255}
ROUTE_TYPES = ('unicast', 'local', 'blackhole', 'unreachable', 'prohibit')
# Types that take no device and no gateway.
REJECT_TYPES = ('blackhole', 'unreachable', 'prohibit')
FAMILIES = {'ipv4': 4, 'ipv6': 6}
RT_TABLES_FILES = ('/etc/iproute2/rt_tables', '/usr/share/iproute2/rt_tables',
                   '/usr/lib/iproute2/rt_tables')
RT_TABLES_DIRS = ('/etc/iproute2/rt_tables.d', '/usr/share/iproute2/rt_tables.d',
                  '/usr/lib/iproute2/rt_tables.d')
_IFNAME_RE = re.compile(r'^[^\s/:]{1,15}$')
_NAME_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_.-]*$')
# Keys of ``ip -json rule show`` that this code understands; any other key is a selector or
# action we do not manage, so a rule carrying it never counts as "the same rule".
_RULE_KNOWN_KEYS = frozenset((
    'priority', 'src', 'srclen', 'dst', 'dstlen', 'fwmark', 'fwmask', 'iif', 'oif',
    'iif_detached', 'oif_detached', 'table', 'protocol', 'flags',
))


class IprouteError(Exception):
    """Bad input or unexpected ``ip`` output; the message names the value."""


# ---------------------------------------------------------------- names (tables, protocols)

def read_names(files, dirs, opener=open):
    """Parse iproute2 ``id name`` files (rt_tables, rt_protos) into {name: id}."""
    names = {}
    paths = list(files)
    for d in dirs:
        try:
            paths.extend(os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith('.conf'))
        except OSError:
            continue
    for path in paths:
        try:
            with opener(path) as fh:
                lines = fh.read().splitlines()
        except (IOError, OSError):
            continue
        for line in lines:
            fields = line.split('#', 1)[0].split()
            if len(fields) < 2:
                continue
            try:
                num = int(fields[0], 0)
            except ValueError:
                continue
            names.setdefault(fields[1], num)
    return names


def table_names():
    names = dict(BUILTIN_TABLES)
    names.update(read_names(RT_TABLES_FILES, RT_TABLES_DIRS))
    return names


def parse_table(value, names=None, what='table'):
    """Turn a table given as int, digits or name into its number (1..2^32-1)."""
    names = BUILTIN_TABLES if names is None else names
    if isinstance(value, bool):
        raise IprouteError("%s: %r is not a table number or name" % (what, value))
    if isinstance(value, int):
        num = value
    else:
        text = str(value).strip()
        if re.match(r'^(0x[0-9a-fA-F]+|[0-9]+)$', text):
            num = int(text, 0)
        elif text in names:
            num = names[text]
        else:
            raise IprouteError(
                "%s: '%s' is neither a number (1-%d) nor a table name known to iproute2 (%s)"
                % (what, value, TABLE_MAX, ', '.join(sorted(n for n in names if names[n]))))
    if not 1 <= num <= TABLE_MAX:
        raise IprouteError("%s: '%s' is out of range (1-%d)" % (what, value, TABLE_MAX))
    return num


def table_label(num, names=None):
    """The name ``ip`` prints for a table number, for human-readable output."""
    names = BUILTIN_TABLES if names is None else names
    for name, n in sorted(names.items()):
        if n == num:
            return name
    return str(num)


def parse_proto(value, what='proto'):
    """Canonical protocol: a name when iproute2 has one for it, else the number as text."""
    if value is None:
        return None
    text = str(value).strip()
    if re.match(r'^[0-9]+$', text):
        num = int(text)
        if not 0 <= num <= 255:
            raise IprouteError("%s: '%s' is out of range (0-255)" % (what, value))
        for name, n in BUILTIN_PROTOS.items():
            if n == num:
                return name
        return text
    if not _NAME_RE.match(text):
        raise IprouteError("%s: '%s' is not a routing protocol name or number" % (what, value))
    return text


def parse_scope(value, what='scope'):
    if value is None:
        return None
    text = str(value).strip()
    if text in SCOPES:
        return 'global' if text == 'universe' else text
    if re.match(r'^[0-9]+$', text) and int(text) <= 255:
        num = int(text)
        for name, n in SCOPES.items():
            if n == num and name != 'universe':
                return name
        return text
    raise IprouteError("%s: '%s' is not one of %s or a number 0-255"
                       % (what, value, ', '.join(n for n in SCOPES if n != 'universe')))


# ---------------------------------------------------------------- addresses, marks, devices

def family_version(family):
    if family not in FAMILIES:
        raise IprouteError("family: '%s' is not one of ipv4, ipv6" % (family,))
    return FAMILIES[family]


def parse_prefix(value, family, what, allow_default=True):
    """A CIDR (or a bare address = host prefix, or 'default') of the right family."""
    version = family_version(family)
    text = str(value).strip()
    if allow_default and text in ('default', 'all', 'any'):
        return ipaddress.ip_network(u'0.0.0.0/0' if version == 4 else u'::/0')
    try:
        net = ipaddress.ip_network(u'%s' % text, strict=True)
    except ValueError as exc:
        raise IprouteError("%s: '%s' is not a valid CIDR (%s)" % (what, value, exc))
    if net.version != version:
        raise IprouteError("%s: '%s' is an IPv%d prefix but family is %s"
                           % (what, value, net.version, family))
    return net


def parse_address(value, family, what):
    version = family_version(family)
    try:
        addr = ipaddress.ip_address(u'%s' % str(value).strip())
    except ValueError:
        raise IprouteError("%s: '%s' is not a valid IP address" % (what, value))
    if addr.version != version:
        raise IprouteError("%s: '%s' is an IPv%d address but family is %s"
                           % (what, value, addr.version, family))
    return addr


def parse_fwmark(value, what='fwmark'):
    """'1337', 1337, '0x539' or '0x539/0xffff' -> (mark, mask); mask defaults to 0xffffffff."""
    if isinstance(value, bool):
        raise IprouteError("%s: %r is not a mark" % (what, value))
    text = str(value).strip()
    parts = text.split('/')
    if len(parts) > 2 or not all(re.match(r'^(0[xX][0-9a-fA-F]+|[0-9]+)$', p) for p in parts):
        raise IprouteError("%s: '%s' is not a mark (N, 0xHEX or MARK/MASK)" % (what, value))
    mark = int(parts[0], 0)
    mask = int(parts[1], 0) if len(parts) == 2 else MARK_MAX
    if mark > MARK_MAX or mask > MARK_MAX:
        raise IprouteError("%s: '%s' is out of range (0-0xffffffff)" % (what, value))
    return mark, mask


def fwmarks_overlap(a, b):
    """True when some packet mark matches both selectors (each a (mark, mask) pair): the two masks
    share bits and the marks agree on them. Disjoint masks (kube-proxy 0x4000, Tailscale 0xff0000 next to
    0x539/0xfff) never collide."""
    common = a[1] & b[1]
    return bool(common) and (a[0] ^ b[0]) & common == 0


def format_fwmark(mark, mask):
    if mark is None:
        return None
    if mask == MARK_MAX:
        return '0x%x' % mark
    return '0x%x/0x%x' % (mark, mask)


def check_ifname(value, what):
    text = str(value)
    if not _IFNAME_RE.match(text):
        raise IprouteError("%s: '%s' is not a valid interface name" % (what, value))
    return text


def net_text(net):
    """How ``ip`` prints a prefix: 'all'/'default' for /0 is left to the caller."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


# ---------------------------------------------------------------- running ip

class IpCommand:
    """Runs ``ip`` for one family; records the changing commands it ran or would run."""

    ENV = {'LC_ALL': 'C', 'LANG': 'C', 'LANGUAGE': 'C'}

    def __init__(self, module, family):
        self.module = module
        self.flag = '-%d' % family_version(family)
        self.ip = module.get_bin_path('ip', required=True)
        self.commands = []

    def run(self, args, check=True):
        cmd = [self.ip, self.flag] + list(args)
        rc, out, err = self.module.run_command(cmd, environ_update=self.ENV)
        if check and rc != 0:
            self.module.fail_json(msg='%s failed (rc=%d): %s' % (' '.join(cmd), rc, (err or out).strip()),
                                  cmd=cmd, rc=rc, stdout=out, stderr=err)
        return rc, out, err

    def json(self, args):
        """Run ``ip -json ARGS``; a table that does not exist yet reads as empty."""
        rc, out, err = self.run(['-json'] + list(args), check=False)
        if rc != 0:
            if 'table does not exist' in (err or ''):
                return []
            cmd = [self.ip, self.flag, '-json'] + list(args)
            self.module.fail_json(msg='%s failed (rc=%d): %s' % (' '.join(cmd), rc, (err or out).strip()),
                                  cmd=cmd, rc=rc, stdout=out, stderr=err)
        data, error = None, None
        try:
            data = loads_list(out)
        except IprouteError as exc:
            error = str(exc)
        if error:
            self.module.fail_json(msg=error, stdout=out)
        return data

    def change(self, args):
        """A command that changes the host: skipped in check mode, always recorded."""
        self.commands.append(' '.join(['ip', self.flag] + list(args)))
        if not self.module.check_mode:
            self.run(args)

    def parsed(self, args, parse, *parse_args):
        """``ip -json ARGS``, each object through ``parse``; objects it cannot parse are skipped
        (a selector or destination the module cannot express is not one it manages)."""
        found = []
        for raw in self.json(args):
            try:
                found.append(parse(raw, *parse_args))
            except IprouteError:
                continue
        return found

    def exit(self, changed, before, after, text, names, **fields):
        """exit_json with the commands, the given fields and, in diff mode, before/after as text lines."""
        result = dict(changed=changed, commands=self.commands, **fields)
        if self.module._diff:
            result['diff'] = dict(before=''.join(text(x, names) + '\n' for x in before),
                                  after=''.join(text(x, names) + '\n' for x in after))
        self.module.exit_json(**result)


def desired_or_fail(module, build, names):
    """Validate the parameters with ``build``; a bad value fails the module with its message."""
    desired, error = None, None
    try:
        desired = build(module.params, names)
    except IprouteError as exc:
        error = str(exc)
    if error:  # outside the except block: a validation error is a message, not a crash
        module.fail_json(msg=error)
    return desired


def loads_list(text):
    text = (text or '').strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise IprouteError('cannot parse ip -json output (%s): %s' % (exc, text[:200]))
    if not isinstance(data, list):
        raise IprouteError('ip -json output is not a list: %s' % text[:200])
    return data


# ---------------------------------------------------------------- rules

def _json_prefix(raw, key, family):
    value = raw.get(key)
    if value is None or value == 'all':
        return None
    length = raw.get(key + 'len')
    text = value if length is None else '%s/%s' % (value, length)
    return parse_prefix(text, family, 'ip rule output %s' % key, allow_default=False)


def rule_from_json(raw, family, names=None):
    """Canonical dict for one element of ``ip -json rule show``."""
    fwmark = None
    fwmask = MARK_MAX
    if raw.get('fwmark') is not None:
        fwmark, fwmask = parse_fwmark('%s/%s' % (raw['fwmark'], raw.get('fwmask', '0xffffffff')))
    table = raw.get('table')
    if table is not None:
        try:
            table = parse_table(table, names)
        except IprouteError:
            table = str(table)
    extra = dict((k, v) for k, v in raw.items() if k not in _RULE_KNOWN_KEYS)
    src = _json_prefix(raw, 'src', family)
    dst = _json_prefix(raw, 'dst', family)
    return {
        'priority': raw.get('priority'),
        'from': str(src) if src is not None else None,
        'to': str(dst) if dst is not None else None,
        'fwmark': format_fwmark(fwmark, fwmask),
        'iif': raw.get('iif'),
        'oif': raw.get('oif'),
        'table': table,
        'extra': extra,
    }


def rule_desired(params, names=None):
    """Validate the module parameters and return the canonical desired rule."""
    family = params['family']
    family_version(family)
    fwmark = None
    if params.get('fwmark') not in (None, ''):
        fwmark = format_fwmark(*parse_fwmark(params['fwmark']))
    src = dst = None
    if params.get('from') not in (None, ''):
        src = parse_prefix(params['from'], family, 'from', allow_default=True)
        src = None if src.prefixlen == 0 else str(src)
    if params.get('to') not in (None, ''):
        dst = parse_prefix(params['to'], family, 'to', allow_default=True)
        dst = None if dst.prefixlen == 0 else str(dst)
    table = None
    if params.get('table') not in (None, ''):
        table = parse_table(params['table'], names)
    priority = params.get('priority')
    if priority is not None and not 0 <= priority <= TABLE_MAX:
        raise IprouteError("priority: '%s' is out of range (0-%d)" % (priority, TABLE_MAX))
    iif = check_ifname(params['iif'], 'iif') if params.get('iif') else None
    oif = check_ifname(params['oif'], 'oif') if params.get('oif') else None
    return {'priority': priority, 'from': src, 'to': dst, 'fwmark': fwmark, 'iif': iif,
            'oif': oif, 'table': table, 'extra': {}}


SELECTOR_KEYS = ('from', 'to', 'fwmark', 'iif', 'oif')


def rule_matches(existing, desired, need_table=True):
    """Same selector (exactly, no extra selectors), same table when set, same priority when set."""
    if existing['extra']:
        return False
    for key in SELECTOR_KEYS:
        if existing[key] != desired[key]:
            return False
    if desired['table'] is not None or need_table:
        if existing['table'] != desired['table']:
            return False
    if desired['priority'] is not None and existing['priority'] != desired['priority']:
        return False
    return True


def rule_args(rule):
    """The ``ip rule add|del`` arguments that select exactly this rule."""
    args = []
    if rule.get('priority') is not None:
        args += ['priority', str(rule['priority'])]
    for key, word in (('from', 'from'), ('to', 'to'), ('fwmark', 'fwmark'), ('iif', 'iif'), ('oif', 'oif')):
        if rule.get(key) is not None:
            args += [word, str(rule[key])]
    if rule.get('table') is not None:
        args += ['table', str(rule['table'])]
    return args


def rule_text(rule, names=None):
    """One line in the style of ``ip rule show``, for diffs."""
    words = ['%s:' % rule['priority'] if rule.get('priority') is not None else '(kernel):']
    words += ['from', rule['from'] or 'all']
    if rule.get('to'):
        words += ['to', rule['to']]
    if rule.get('fwmark'):
        words += ['fwmark', rule['fwmark']]
    if rule.get('iif'):
        words += ['iif', rule['iif']]
    if rule.get('oif'):
        words += ['oif', rule['oif']]
    if rule.get('table') is not None:
        table = rule['table']
        words += ['lookup', table_label(table, names) if isinstance(table, int) else str(table)]
    return ' '.join(words)


def public_rule(rule):
    return dict((k, v) for k, v in rule.items() if k != 'extra')


# ---------------------------------------------------------------- routes

ROUTE_COMPARED = ('dev', 'via', 'metric', 'scope', 'proto')


def route_from_json(raw, family, table):
    """Canonical dict for one element of ``ip -json -details route show table T``."""
    version = family_version(family)
    dst = raw.get('dst', 'default')
    net = parse_prefix(dst, family, 'ip route output dst', allow_default=True)
    metric = raw.get('metric')
    if metric is None:
        metric = 0 if version == 4 else 1024
    via = raw.get('gateway')
    if via is None and isinstance(raw.get('via'), dict):
        via = raw['via'].get('host')
    return {
        'type': raw.get('type', 'unicast'),
        'dst': str(net),
        'table': table,
        'dev': raw.get('dev'),
        'via': str(ipaddress.ip_address(u'%s' % via)) if via else None,
        'metric': int(metric),
        'scope': parse_scope(raw['scope']) if raw.get('scope') is not None else None,
        'proto': parse_proto(raw['protocol']) if raw.get('protocol') is not None else None,
        'multipath': bool(raw.get('nexthops')),
    }


def route_desired(params, names=None):
    family = params['family']
    version = family_version(family)
    net = parse_prefix(params['dst'], family, 'dst', allow_default=True)
    rtype = params.get('type')
    if rtype is not None and rtype not in ROUTE_TYPES:
        raise IprouteError("type: '%s' is not one of %s" % (rtype, ', '.join(ROUTE_TYPES)))
    table = parse_table(params.get('table') if params.get('table') not in (None, '') else 'main', names)
    via = parse_address(params['via'], family, 'via') if params.get('via') else None
    dev = check_ifname(params['dev'], 'dev') if params.get('dev') else None
    metric = params.get('metric')
    if metric is not None and not 0 <= metric <= TABLE_MAX:
        raise IprouteError("metric: '%s' is out of range (0-%d)" % (metric, TABLE_MAX))
    if version == 6 and params.get('scope') is not None:
        raise IprouteError("scope: '%s' is set, but IPv6 routes have no scope" % params['scope'])
    if params.get('state', 'present') == 'present':
        rtype = rtype or 'unicast'
        if rtype in REJECT_TYPES and (dev or via):
            raise IprouteError("type '%s' routes take neither dev nor via (dev=%s, via=%s)"
                               % (rtype, dev, via))
        if rtype == 'unicast' and not (dev or via):
            raise IprouteError("a unicast route to '%s' needs dev or via" % params['dst'])
        if rtype == 'local' and via:
            raise IprouteError("type 'local' routes take no via ('%s')" % params['via'])
    return {
        'type': rtype,
        'dst': str(net),
        'table': table,
        'dev': dev,
        'via': str(via) if via is not None else None,
        'metric': metric,
        'scope': parse_scope(params.get('scope')),
        'proto': parse_proto(params.get('proto')),
        'family_default_metric': 0 if version == 4 else 1024,
    }


def route_matches(existing, desired):
    """Same dst; type, dev, via, metric, scope, proto equal wherever the desired route sets them."""
    if existing['dst'] != desired['dst'] or existing['table'] != desired['table']:
        return False
    if desired['type'] is not None and existing['type'] != desired['type']:
        return False
    if existing['multipath'] and (desired['dev'] or desired['via']):
        return False
    for key in ROUTE_COMPARED:
        if desired[key] is not None and existing[key] != desired[key]:
            return False
    return True


def _dst_word(dst):
    net = ipaddress.ip_network(u'%s' % dst)
    return 'default' if net.prefixlen == 0 else net_text(net)


def route_args(route):
    """``ip route replace|del`` arguments for this route (type first, as ip expects)."""
    args = [route['type'] or 'unicast', _dst_word(route['dst']), 'table', str(route['table'])]
    for key, word in (('dev', 'dev'), ('via', 'via'), ('metric', 'metric'), ('scope', 'scope'),
                      ('proto', 'proto')):
        if route.get(key) is not None:
            args += [word, str(route[key])]
    return args


def route_delete_args(route):
    """Select exactly one existing route: type, dst, table, metric (its identity) plus dev/via."""
    args = [route['type'], _dst_word(route['dst']), 'table', str(route['table'])]
    if route.get('dev') and not route.get('multipath'):
        args += ['dev', route['dev']]
    if route.get('via') and not route.get('multipath'):
        args += ['via', route['via']]
    args += ['metric', str(route['metric'])]
    return args


def route_text(route, names=None):
    words = [route['type'] or 'unicast', _dst_word(route['dst'])]
    for key, word in (('via', 'via'), ('dev', 'dev')):
        if route.get(key):
            words += [word, route[key]]
    words += ['table', table_label(route['table'], names)]
    for key in ('metric', 'scope', 'proto'):
        if route.get(key) is not None:
            words += [key, str(route[key])]
    if route.get('multipath'):
        words.append('(multipath)')
    return ' '.join(words)


def public_route(route):
    return dict((k, v) for k, v in route.items() if k not in ('family_default_metric',))
