# -*- coding: utf-8 -*-
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""capture_facts' rollout option: the comparison with the last verified rollout in the same module run
that reads the capture state (site.yml reads an unchanged host with this one call).

Both modules run for real, as Ansible runs them (a process with the arguments file), on real files in a
temporary directory; capture_facts only reads the host. The record holds no unit, so no systemd is needed."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading

import pytest

MODULES = "ansible_collections.sidecar.intercept.plugins.modules."


def run(module, args, tmp_path):
    path = tmp_path / ("args-%s.json" % module)
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    out = subprocess.run([sys.executable, "-m", MODULES + module, str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    return json.loads(out.stdout)


@pytest.fixture
def host(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.json").write_text('{"mode": "redirect"}\n')
    (etc / "rules.v4").write_text("*nat\nCOMMIT\n")
    return tmp_path


def rollout(host, **kw):
    r = {"path": str(host / "rollout.json"), "files": [str(host / "etc" / "*")]}
    r.update(kw)
    return r


def facts(host, **kw):
    return run("capture_facts", {"require_backend": False, "families": ["ipv4"], "rollout": rollout(host, **kw)},
               host)


def record(host, digest="d1"):
    result = run("rollout_state", {"state": "present", "digest": digest, "path": str(host / "rollout.json"),
                                   "files": [str(host / "etc" / "*")]}, host)
    assert result.get("changed"), result


@pytest.fixture
def ready_server():
    """A loopback HTTP server answering /ready with 200; yields its URL."""
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:%d/ready" % server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_record_the_host_is_not_in_sync(host):
    result = facts(host)
    assert not result.get("failed"), result
    assert result["rollout"] == {"digest": None,
                                 "reasons": ["no record of a verified rollout at %s" % (host / "rollout.json")]}
    assert "host" in result["ansible_facts"]["sidecar_capture"]      # the capture facts come in the same run


def test_an_unchanged_host_reports_the_recorded_digest_and_no_reason(host, ready_server):
    record(host, digest="d1")
    result = facts(host, ready_url=ready_server)
    assert result["rollout"] == {"digest": "d1", "reasons": []}
    assert result["changed"] is False


def test_a_changed_file_and_a_proxy_that_is_not_ready_are_reasons(host):
    record(host)
    url = "http://127.0.0.1:%d/ready" % closed_port()
    # everything else the same: the readiness is asked, and the closed port answers nothing
    result = facts(host, ready_url=url, timeout=2)
    assert result["rollout"]["digest"] == "d1"
    (reason,) = result["rollout"]["reasons"]
    assert reason.startswith("proxy not ready (GET %s:" % url), reason
    (host / "etc" / "config.json").write_text('{"mode": "tproxy"}\n')
    (host / "etc" / "extra").write_text("x\n")
    (host / "etc" / "rules.v4").unlink()
    result = facts(host, ready_url=url)
    # a difference in the files: the readiness is not asked (the host goes through anyway)
    assert result["rollout"]["reasons"] == ["%s changed" % (host / "etc" / "config.json"),
                                            "%s is new" % (host / "etc" / "extra"),
                                            "%s is gone" % (host / "etc" / "rules.v4")]


@pytest.mark.parametrize("bad, message", [
    ({"path": "rollout.json"}, "rollout: path must be absolute, got 'rollout.json'"),
    ({"files": ["etc/*"]}, "rollout: files must be absolute glob patterns, got 'etc/*'"),
    ({"ready_url": "http://10.0.0.1:15000/ready"},
     "rollout: ready_url must be an http URL on a loopback address, got 'http://10.0.0.1:15000/ready'"),
])
def test_bad_rollout_input_is_named(host, bad, message):
    result = facts(host, **bad)
    assert result.get("failed") and result["msg"] == message, result
