# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one runner of the data-driven module tests (community.general's UTHelper is the model).

Every module's cases live in a YAML file beside its test, in one schema:

    - id: name-of-the-case
      module: capture_facts          # only when the file serves more than one module
      args: {...}                    # the module arguments
      check_mode: false              # optional
      diff: false                    # optional
      rt_tables: {name: number}      # optional: /etc/iproute2/rt_tables names
      run_command_calls:             # every command the module must run, in order
        - command: [/usr/sbin/ip, '-4', -json, rule, show]
          stdin: "..."               # optional: the exact input it must send
          rc: 0
          out: "..."                 # text, or YAML data printed as compact JSON (ip -json)
          err: ""
      output:                        # the result: each key must be equal, except
        failed: false
        msg: regex                   #   a regular expression the message must match
        diff_before_contains: [...]  #   texts the diff's before/after must contain
        diff_after_contains: [...]
        facts: {dotted.path: value}  #   values under ansible_facts.<fact>

``run_command`` is patched to check each command and answer with the recording; binaries are found
in /usr/sbin; an argument ending in ``_dir`` is relative to the repository.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re

import pytest
import yaml

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.sidecar.intercept.plugins.module_utils import iproute

SPECIAL = ('failed', 'msg', 'diff_before_contains', 'diff_after_contains', 'facts')
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..', '..'))


def load_cases(name):
    """The cases of the YAML file NAME beside this module."""
    with open(os.path.join(os.path.dirname(__file__), name)) as fh:
        return yaml.safe_load(fh)


class _Exit(Exception):
    def __init__(self, result):
        super(_Exit, self).__init__(result)
        self.result = result


class _Fail(_Exit):
    pass


def run_case(case, module_main, monkeypatch):
    """Run module_main() with the case's args; returns (result, failed, remaining_calls)."""
    calls = list(case.get('run_command_calls', []))

    def fake_run_command(self, args, **kwargs):
        assert calls, 'unexpected command %r' % (args,)
        expected = calls.pop(0)
        assert args == expected['command']
        assert kwargs.get('environ_update', {}).get('LC_ALL') == 'C'
        if 'stdin' in expected:
            assert kwargs.get('data') == expected['stdin']
        out = expected.get('out', '')
        if not isinstance(out, str):  # recorded JSON written as YAML data: print it the way ip -json does
            out = json.dumps(out, separators=(',', ':'))
        return expected.get('rc', 0), out, expected.get('err', '')

    def fake_exit(self, **kwargs):
        raise _Exit(kwargs)

    def fake_fail(self, msg, **kwargs):
        kwargs['msg'] = msg
        raise _Fail(kwargs)

    monkeypatch.setattr(basic.AnsibleModule, 'run_command', fake_run_command)
    monkeypatch.setattr(basic.AnsibleModule, 'exit_json', fake_exit)
    monkeypatch.setattr(basic.AnsibleModule, 'fail_json', fake_fail)
    monkeypatch.setattr(basic.AnsibleModule, 'get_bin_path', lambda self, name, *a, **k: '/usr/sbin/' + name)
    names = case.get('rt_tables', {})
    monkeypatch.setattr(iproute, 'read_names', lambda *a, **k: dict(names))

    args = dict(case['args'])
    for key, value in args.items():  # directories in a case are relative to the repository
        if key.endswith('_dir') and not os.path.isabs(value):
            args[key] = os.path.join(ROOT, value)
    args['_ansible_check_mode'] = case.get('check_mode', False)
    args['_ansible_diff'] = case.get('diff', False)
    with patch_module_args(args):
        with pytest.raises(_Exit) as exc:
            module_main()
    return exc.value.result, isinstance(exc.value, _Fail), calls


def check_case(case, result, failed, remaining):
    expected = case['output']
    assert failed == expected.get('failed', False), result
    if 'msg' in expected:
        assert re.search(expected['msg'], result['msg']), result['msg']
    for text in expected.get('diff_before_contains', []):
        assert text in result['diff']['before']
    for text in expected.get('diff_after_contains', []):
        assert text in result['diff']['after']
    if 'facts' in expected:
        (facts,) = result['ansible_facts'].values()
        for path, value in expected['facts'].items():
            node = facts
            for part in path.split('.'):
                node = node[int(part)] if isinstance(node, list) else node[part]
            assert node == value, path
    for key, value in expected.items():
        if key not in SPECIAL:
            assert result.get(key) == value, 'key %s: %r != %r' % (key, result.get(key), value)
    assert not remaining, 'commands not run: %r' % (remaining,)
