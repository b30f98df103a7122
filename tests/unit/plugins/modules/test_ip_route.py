# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""ip_route driven by recorded ``ip`` runs: every case in test_ip_route.yaml runs the real module code
with ``run_command`` patched to check each command and answer with the recorded output."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.sidecar.intercept.plugins.modules import ip_route as module_under_test
from ansible_collections.sidecar.intercept.tests.unit.plugins.modules.recorded import (
    check_case, load_cases, run_case)

CASES = load_cases('test_ip_route.yaml')


@pytest.mark.parametrize('case', CASES, ids=[c['id'] for c in CASES])
def test_ip_route(case, monkeypatch):
    result, failed, remaining = run_case(case, module_under_test.main, monkeypatch)
    check_case(case, result, failed, remaining)
