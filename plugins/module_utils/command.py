# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one command runner of the collection's modules: a list of arguments, the C locale, no shell."""

from __future__ import annotations

C_LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C", "LANGUAGE": "C"}


def run(module, args, data=None, check_rc=True):
    """module.run_command(args) in the C locale; with check_rc, a failure fails the module naming the command."""
    rc, out, err = module.run_command(list(args), data=data, environ_update=C_LOCALE, binary_data=data is not None)
    if check_rc and rc != 0:
        module.fail_json(msg="%s failed (rc=%d): %s" % (" ".join(args), rc, (err or out).strip()),
                         rc=rc, stdout=out, stderr=err, cmd=list(args))
    return rc, out, err
