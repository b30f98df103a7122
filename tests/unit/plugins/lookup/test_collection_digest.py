# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""collection_digest over a copy of the collection's layout in a temporary directory, and over the
collection itself through the lookup."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

from ansible_collections.sidecar.intercept.plugins.lookup import collection_digest


def tree(tmp_path):
    for rel, text in {'roles/proxy/tasks/main.yml': '---\n', 'plugins/modules/m.py': 'x = 1\n',
                      'playbooks/site.yml': '---\n', 'proxy/src/p/__init__.py': '', 'galaxy.yml': 'version: 1\n',
                      'docs/notes.md': 'not shipped to hosts\n', 'proxy/tests/t.py': 'tests\n'}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_digest_follows_what_reaches_the_hosts_and_only_that(tmp_path):
    root = tree(tmp_path)
    first = collection_digest.digest(str(root))
    assert re.match('^[0-9a-f]{64}$', first)
    # docs, tests and byte-code caches do not count
    (root / 'docs' / 'notes.md').write_text('edited\n')
    (root / 'proxy' / 'tests' / 't.py').write_text('edited\n')
    (root / 'plugins' / 'modules' / '__pycache__').mkdir()
    (root / 'plugins' / 'modules' / '__pycache__' / 'm.cpython-311.pyc').write_bytes(b'\0')
    assert collection_digest.digest(str(root)) == first
    # a template, a module, the proxy's source, a file's name or the version do
    for rel, text in (('roles/proxy/tasks/main.yml', '---\n# edited\n'), ('plugins/modules/m.py', 'x = 2\n'),
                      ('proxy/src/p/__init__.py', '#\n'), ('galaxy.yml', 'version: 2\n')):
        before = collection_digest.digest(str(root))
        (root / rel).write_text(text)
        assert collection_digest.digest(str(root)) != before, rel
    before = collection_digest.digest(str(root))
    (root / 'plugins' / 'modules' / 'm.py').rename(root / 'plugins' / 'modules' / 'n.py')
    assert collection_digest.digest(str(root)) != before


def test_the_lookup_returns_the_digest_of_this_collection():
    lookup = collection_digest.LookupModule()
    assert lookup.run([]) == [collection_digest.digest()]
