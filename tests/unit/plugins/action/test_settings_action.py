"""The sidecar.intercept.settings action: variables in, resolved settings out, with the host facts
that capture_facts reports (a recorded module result stands in for the host)."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest

from ansible_collections.sidecar.intercept.plugins.action.settings import ActionModule

CAPTURE = {"backend": "legacy", "host": {"ipv6": {"enabled": True, "global": False}, "ssh_ports": [2222],
                                         "fwmarks": [], "tools": {"iptables": True, "nft": False}}}


def action(args=None, transport="ssh", port=22):
    task = MagicMock(args=args or {}, async_val=0, check_mode=False, diff=False)
    connection = MagicMock(transport=transport)
    connection.get_option.return_value = port
    templar = MagicMock()
    templar.template.side_effect = lambda value: value
    act = ActionModule(task, connection, MagicMock(connection=transport), MagicMock(), templar, MagicMock())
    act._execute_module = MagicMock(return_value={"ansible_facts": {"sidecar_capture": CAPTURE}})
    return act


def test_resolves_against_the_host_facts():
    act = action()
    result = act.run(task_vars={"sidecar_inbound_exclude_ports": "22,9090", "inventory_hostname": "vm1"})
    assert not result.get("failed"), result
    s = result["ansible_facts"]["sidecar_settings"]
    assert s["backend"] == "legacy"           # what capture_facts detected, not the requested 'auto'
    assert s["families"] == ["ipv4"]          # no global IPv6 on the host
    assert s["management_ports"] == [22, 2222]
    assert s["inbound_exclude_ports"] == [22, 2222, 9090]
    assert result["ansible_facts"]["sidecar_capture"] == CAPTURE
    (call,) = act._execute_module.call_args_list
    assert call.kwargs["module_name"] == "sidecar.intercept.capture_facts"
    assert call.kwargs["module_args"]["backend"] == "auto"


def test_bad_input_fails_before_the_host_is_asked():
    act = action()
    result = act.run(task_vars={"sidecar_inbound_port": "0015006"})
    assert result["failed"] and 'sidecar_inbound_port="0015006": leading zeros' in result["msg"]
    act._execute_module.assert_not_called()


@pytest.mark.parametrize("transport", ["containers.podman.podman", "local"])
def test_only_ssh_connections_add_a_management_port(transport):
    result = action(transport=transport).run(task_vars={})
    assert result["ansible_facts"]["sidecar_settings"]["management_ports"] == [2222]  # sshd's port only


def test_unknown_parameters_are_refused():
    result = action(args={"gahter": False}).run(task_vars={})
    assert result["failed"] and "gahter" in result["msg"]


def _play(uuid):
    return MagicMock(_uuid=uuid)


def test_the_host_is_read_once_per_play_for_the_same_settings():
    act = action()
    act._task.get_play.return_value = _play("play-1")
    first = act.run(task_vars={"sidecar_mode": "tproxy"})
    assert act._execute_module.call_count == 1 and not first.get("cached")
    again = act.run(task_vars={"sidecar_mode": "tproxy", "ansible_facts": first["ansible_facts"]})
    assert again["cached"] and act._execute_module.call_count == 1
    assert again["ansible_facts"] == first["ansible_facts"]


@pytest.mark.parametrize("change", ["settings", "play", "stricter", "port"])
def test_the_host_is_read_again_when_the_inputs_differ(change):
    act = action(args={"require_backend": False})
    act._task.get_play.return_value = _play("play-1")
    first = act.run(task_vars={"sidecar_mode": "tproxy"})
    task_vars = {"sidecar_mode": "tproxy", "ansible_facts": first["ansible_facts"]}
    if change == "settings":
        task_vars["sidecar_state"] = "absent"          # the rollback inside the same play
    elif change == "play":
        act._task.get_play.return_value = _play("play-2")
    elif change == "stricter":
        act._task.args = {"require_backend": True}    # the proxy role's facts do not prove the tools
    else:
        act._connection.get_option.return_value = 2222
    again = act.run(task_vars=task_vars)
    assert not again.get("cached") and act._execute_module.call_count == 2


def test_a_stricter_first_read_serves_a_laxer_later_call():
    act = action()
    act._task.get_play.return_value = _play("play-1")
    first = act.run(task_vars={})
    act._task.args = {"require_backend": False}
    again = act.run(task_vars={"ansible_facts": first["ansible_facts"]})
    assert again["cached"] and act._execute_module.call_count == 1


def test_a_filtering_firewall_fails_the_capture_in_redirect_mode_not_the_proxy_role_alone():
    act = action()
    host = dict(CAPTURE["host"], firewall=["ufw (iptables-nft)"], accounts={"uid": "nobody", "gid": None})
    act._execute_module.return_value = {"ansible_facts": {"sidecar_capture": dict(CAPTURE, host=host)}}
    result = act.run(task_vars={"inventory_hostname": "vm1", "sidecar_proxy_uid": 65534})
    assert result["failed"] and "sidecar.intercept settings do not fit vm1 (nothing was changed)" in result["msg"]
    assert "this host's firewall filters inbound traffic (ufw (iptables-nft))" in result["msg"]
    assert act._execute_module.call_args.kwargs["module_args"]["proxy_uid"] == 65534
    lax = action(args={"require_backend": False})
    lax._execute_module.return_value = act._execute_module.return_value
    result = lax.run(task_vars={"inventory_hostname": "vm1", "sidecar_proxy_uid": 65534})
    assert not result.get("failed"), result
    assert result["warnings"] == [w for w in result["warnings"] if "belongs to user 'nobody'" in w] != []


def test_rollout_compares_the_host_in_the_same_call_at_the_resolved_admin_port():
    act = action(args={"rollout": {"path": "/etc/sidecar-intercept/rollout.json", "files": ["/etc/sidecar-proxy/**"]}})
    act._task.get_play.return_value = _play("play-1")
    compared = {"digest": "d1", "reasons": ["sidecar-proxy.service is failed (was active)"]}
    act._execute_module.return_value = {"ansible_facts": {"sidecar_capture": CAPTURE}, "rollout": compared}
    first = act.run(task_vars={"sidecar_admin_port": "15100"})
    assert not first.get("failed"), first
    assert first["rollout"] == compared
    (call,) = act._execute_module.call_args_list
    assert call.kwargs["module_args"]["rollout"] == {"path": "/etc/sidecar-intercept/rollout.json",
                                                     "files": ["/etc/sidecar-proxy/**"],
                                                     "ready_url": "http://127.0.0.1:15100/ready"}
    # facts of an earlier call in the play are not reused: the comparison needs the host
    again = act.run(task_vars={"sidecar_admin_port": "15100", "ansible_facts": first["ansible_facts"]})
    assert not again.get("cached") and again["rollout"] == compared and act._execute_module.call_count == 2


@pytest.mark.parametrize("rollout, message", [
    ({"files": []}, "rollout needs a path"),
    ({"path": "/r.json", "file": []}, "unsupported parameters in rollout: file"),
    ({"path": "/r.json", "files": "/etc/*"}, "rollout.files must be a list of glob patterns, got '/etc/*'"),
    ("/r.json", "rollout must be a dict with path and files, got '/r.json'"),
])
def test_a_bad_rollout_argument_fails_before_the_host_is_asked(rollout, message):
    act = action(args={"rollout": rollout})
    result = act.run(task_vars={})
    assert result["failed"] and message in result["msg"], result
    act._execute_module.assert_not_called()
