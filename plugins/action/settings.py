# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of sidecar.intercept.settings: validate and resolve the public settings once.

Runs on the controller: reads the sidecar_* variables of the host, validates them with
module_utils/settings.py (nothing on the host has changed when this fails), then reads the host's
capture facts with the capture_facts module (read-only) and resolves what depends on the host.

Within one play the host is read once: a later call (the roles after site.yml's own call) with the
same settings and the same connection port reuses the facts of the first (ansible_facts carries the
key of what they were resolved from). Different settings (the rollback's sidecar_state=absent), a
stricter require_backend or another play read the host again.
"""

from __future__ import annotations

import hashlib
import json

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase
from ansible_collections.sidecar.intercept.plugins.module_utils.settings import (
    SETTINGS,
    effective,
    validate,
)

_ARGS = frozenset(("gather", "require_backend", "rollout"))
_ROLLOUT_ARGS = frozenset(("path", "files"))


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False
    _supports_check_mode = True
    _supports_async = False

    @staticmethod
    def _rollout_problem(rollout, gather):
        """What is wrong with the rollout argument (None when it is good); the module checks the values."""
        if not isinstance(rollout, dict):
            return "rollout must be a dict with path and files, got %r" % (rollout,)
        unknown = sorted(set(rollout) - _ROLLOUT_ARGS)
        if unknown:
            return "unsupported parameters in rollout: %s" % ", ".join(unknown)
        if not rollout.get("path"):
            return "rollout needs a path (the record of the verified rollout)"
        files = rollout.get("files") or []
        if not isinstance(files, list):
            return "rollout.files must be a list of glob patterns, got %r" % (files,)
        if not gather:
            return "rollout needs gather=true (the host is compared in the same call)"
        return None

    def _raw_settings(self, task_vars):
        raw = {}
        for setting in SETTINGS:
            if setting.name in task_vars:
                raw[setting.name] = self._templar.template(task_vars[setting.name])
        return raw

    def _management_ports(self, task_vars):
        """The port of the connection Ansible uses to reach this host (ssh-like connections only)."""
        if "ssh" not in str(getattr(self._connection, "transport", "") or self._play_context.connection or ""):
            return []
        port = None
        try:
            port = self._connection.get_option("port")
        except (AnsibleError, KeyError, AttributeError):
            port = None
        if port is None:
            port = self._templar.template(task_vars.get("ansible_port", task_vars.get("ansible_ssh_port", 22)))
        return [port]

    def _proxy_account(self, task_vars):
        """The proxy's own user and group names (the proxy role's sidecar_proxy_user/_group, or their defaults)."""
        return tuple(str(self._templar.template(task_vars.get(name, "sidecar-proxy")))
                     for name in ("sidecar_proxy_user", "sidecar_proxy_group"))

    def _cache_key(self, raw, management, gather):
        """What the facts were resolved from: the raw settings, the connection's port and the play."""
        if not gather:
            return None
        get_play = getattr(self._task, "get_play", None)
        uuid = getattr(get_play(), "_uuid", None) if get_play else None
        if not isinstance(uuid, str):
            return None  # no play to scope the facts to: always read the host
        blob = json.dumps([uuid, raw, management], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = self._task.args
        unknown = sorted(set(args) - _ARGS)
        if unknown:
            return dict(result, failed=True, msg="unsupported parameters: %s" % ", ".join(unknown))
        gather = args.get("gather", True)
        rollout = args.get("rollout")
        if rollout is not None:
            problem = self._rollout_problem(rollout, gather)
            if problem:
                return dict(result, failed=True, msg=problem)
        raw = self._raw_settings(task_vars)

        settings, errors, warnings = validate(raw)
        if errors:
            return dict(result, failed=True, errors=errors,
                        msg="Invalid sidecar.intercept settings (nothing was changed): " + "; ".join(errors))
        management = self._management_ports(task_vars)
        require = bool(args.get("require_backend", True))
        key = self._cache_key(raw, management, gather)
        cached = (task_vars.get("ansible_facts") or {})
        record = (cached.get("sidecar_capture") or {}).get("resolved_from") or {}
        if (key and not rollout and record.get("key") == key and (record.get("require_backend") or not require)
                and "sidecar_settings" in cached):
            result.update(changed=False, cached=True, settings=cached["sidecar_settings"],
                          ansible_facts={"sidecar_settings": cached["sidecar_settings"],
                                         "sidecar_capture": cached["sidecar_capture"]})
            return result
        facts = {}
        host = None
        if gather:
            module_args = dict(backend=settings["capture_backend"], table=settings["tproxy_table"],
                               require_backend=require, proxy_uid=settings["proxy_uid"],
                               proxy_gid=settings["proxy_gid"])
            if rollout:
                module_args["rollout"] = dict(path=rollout["path"], files=list(rollout.get("files") or []),
                                              ready_url="http://127.0.0.1:%d/ready" % settings["admin_port"])
            cap = self._execute_module(module_name="sidecar.intercept.capture_facts", module_args=module_args,
                                       task_vars=task_vars)
            if cap.get("failed"):
                return dict(result, failed=True, msg=cap.get("msg", "capture_facts failed"), module_result=cap)
            facts["sidecar_capture"] = cap["ansible_facts"]["sidecar_capture"]
            if key:
                facts["sidecar_capture"] = dict(facts["sidecar_capture"],
                                                resolved_from={"key": key, "require_backend": require})
            host = dict(facts["sidecar_capture"]["host"], backend=facts["sidecar_capture"]["backend"])
            if not require:
                host["firewall"] = []  # the proxy role captures nothing: the host firewall does not concern it
        resolved, errors, warnings = effective(raw, host, management, self._proxy_account(task_vars))
        if errors:
            return dict(result, failed=True, errors=errors,
                        msg="sidecar.intercept settings do not fit %s (nothing was changed): %s"
                        % (task_vars.get("inventory_hostname", "this host"), "; ".join(errors)))
        facts["sidecar_settings"] = resolved
        result.update(changed=False, ansible_facts=facts, settings=resolved)
        if rollout:
            result["rollout"] = cap["rollout"]
        if warnings:
            result["warnings"] = warnings
        return result
