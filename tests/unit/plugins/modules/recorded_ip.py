# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the data-driven ip_rule / ip_route tests: each case runs the real module code with
``run_command`` patched to check each command and answer with the recorded output."""

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
    monkeypatch.setattr(basic.AnsibleModule, 'get_bin_path', lambda self, *a, **k: '/sbin/ip')
    names = case.get('rt_tables', {})
    monkeypatch.setattr(iproute, 'read_names', lambda *a, **k: dict(names))

    args = dict(case['args'])
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
    for key, value in expected.items():
        if key in ('failed', 'msg'):
            continue
        assert result.get(key) == value, 'key %s: %r != %r' % (key, result.get(key), value)
    assert not remaining, 'commands not run: %r' % (remaining,)
