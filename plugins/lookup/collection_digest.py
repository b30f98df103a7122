# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
name: collection_digest
short_description: SHA-256 of the content of this collection that reaches the hosts
version_added: 0.1.0
description:
  - Returns one SHA-256 over the relative path and the bytes of every file under the collection's
    C(roles), C(plugins), C(playbooks) and C(proxy/src) directories and of C(galaxy.yml) when present
    (C(__pycache__) and C(.pyc) left out), read on the controller.
  - Two checkouts or installs with the same content give the same digest; any change to a role, a
    template, a module or the proxy's source gives another. C(sidecar.intercept.site) puts it into the
    digest of what a host should run, so that upgrading the collection re-runs the roles on every host.
author:
  - sidecar.intercept developers (@sidecar)
options: {}
'''

EXAMPLES = r'''
- name: Show the digest of the collection's content
  ansible.builtin.debug:
    msg: "{{ lookup('sidecar.intercept.collection_digest') }}"
'''

RETURN = r'''
_raw:
  description: One hexadecimal SHA-256 (a list of one string, as lookups return).
  type: list
  elements: str
'''

import hashlib
import os

from ansible.plugins.lookup import LookupBase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ('roles', 'plugins', 'playbooks', os.path.join('proxy', 'src'), 'galaxy.yml')


def collection_files(root):
    for part in PARTS:
        top = os.path.join(root, part)
        if os.path.isfile(top):
            yield part
            continue
        for current, dirs, names in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != '__pycache__')
            for name in sorted(names):
                if not name.endswith('.pyc'):
                    yield os.path.relpath(os.path.join(current, name), root)


def digest(root=ROOT):
    h = hashlib.sha256()
    for rel in collection_files(root):
        h.update(rel.encode('utf-8') + b'\0')
        with open(os.path.join(root, rel), 'rb') as f:
            data = f.read()
        h.update(str(len(data)).encode('ascii') + b'\0' + data)
    return h.hexdigest()


class LookupModule(LookupBase):
    _cache = None

    def run(self, terms, variables=None, **kwargs):
        # the content does not change during a run: hash it once per controller process
        if LookupModule._cache is None:
            LookupModule._cache = digest()
        return [LookupModule._cache]
