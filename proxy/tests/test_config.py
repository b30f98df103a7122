"""Config validation and the command line (no root needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SRC

from sidecar_proxy.config import Config, ConfigError, build, validate
from sidecar_proxy.metrics import Metrics


def test_defaults_match_contract() -> None:
    cfg = validate({})
    assert cfg == Config()
    assert (cfg.mode, cfg.inbound_port, cfg.outbound_port) == ("redirect", 15006, 15001)
    assert (cfg.admin_address, cfg.admin_port) == ("127.0.0.1", 15000)
    assert (cfg.passthrough_source_v4, cfg.passthrough_source_v6) == ("127.0.0.6", "::6")
    assert (cfg.connect_timeout, cfg.idle_timeout, cfg.drain_timeout) == (5.0, 3600.0, 20.0)
    assert (cfg.max_connections, cfg.access_log, cfg.log_level, cfg.ipv6) == (65536, "-", "info", False)


def test_full_valid_file(tmp_path: Path) -> None:
    data = {"mode": "tproxy", "inbound_port": 16006, "outbound_port": 16001, "admin_address": "::1",
            "admin_port": 16000, "ipv6": True, "passthrough_source_v4": "127.0.0.7",
            "passthrough_source_v6": "::7", "connect_timeout": 1, "idle_timeout": 60.5,
            "drain_timeout": 3, "max_connections": 10, "access_log": "", "log_level": "DEBUG"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    cfg = build(str(path), {"inbound_port": 17006, "mode": None})
    assert cfg.inbound_port == 17006 and cfg.mode == "tproxy" and cfg.log_level == "debug"
    assert cfg.connect_timeout == 1.0 and cfg.admin_address == "::1"


@pytest.mark.parametrize(("data", "words"), [
    ({"mdoe": "redirect"}, ["unknown key", "'mdoe'"]),
    ({"mode": "nat"}, ["'mode'", '"nat"']),
    ({"inbound_port": 0}, ["'inbound_port'", "0"]),
    ({"outbound_port": 70000}, ["'outbound_port'", "70000"]),
    ({"admin_port": "15000"}, ["'admin_port'", '"15000"']),
    ({"admin_port": True}, ["'admin_port'", "true"]),
    ({"inbound_port": 15001}, ["'outbound_port'", "15001", "inbound_port"]),
    ({"admin_address": "localhost"}, ["'admin_address'", '"localhost"']),
    ({"passthrough_source_v4": "::6"}, ["'passthrough_source_v4'", '"::6"']),
    ({"passthrough_source_v6": "127.0.0.6"}, ["'passthrough_source_v6'"]),
    ({"ipv6": "yes"}, ["'ipv6'", '"yes"']),
    ({"connect_timeout": -1}, ["'connect_timeout'", "-1"]),
    ({"idle_timeout": "1h"}, ["'idle_timeout'", '"1h"']),
    ({"drain_timeout": 0}, ["'drain_timeout'"]),
    ({"max_connections": 0}, ["'max_connections'", "0"]),
    ({"access_log": 5}, ["'access_log'", "5"]),
    ({"log_level": "loud"}, ["'log_level'", '"loud"']),
])
def test_bad_values_name_key_and_value(data: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        validate(data)
    for w in words:
        assert w in str(exc.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar_proxy", *args], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=30)


@pytest.mark.parametrize(("text", "word"), [
    ('{"inbound_port": 99999}', "inbound_port"),
    ('{"mode": "redirect",}', "not valid JSON"),
    ('["mode"]', "JSON object"),
    ('{"colour": 1}', "colour"),
])
def test_check_config_rejects_bad_files(tmp_path: Path, text: str, word: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    res = run_cli("--check-config", str(path))
    assert res.returncode == 1
    assert word in res.stderr


def test_check_config_accepts_good_and_missing_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "good.json"
    path.write_text('{"mode": "tproxy", "ipv6": true}')
    assert run_cli("--check-config", str(path)).returncode == 0
    res = run_cli("--check-config", str(tmp_path / "nope.json"))
    assert res.returncode == 1 and "nope.json" in res.stderr


def test_start_with_bad_config_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"max_connections": -5}')
    res = run_cli("--config", str(path))
    assert res.returncode == 1 and "max_connections" in res.stderr
    res = run_cli("--config", str(tmp_path / "c.json"), "--inbound-port", "0")
    assert res.returncode != 0


def test_metric_names() -> None:
    m = Metrics()
    m.connections_total["inbound"] += 2
    m.error("loop")
    m.observe_connect(0.002)
    text = m.prometheus(True, False)
    for needle in ['sidecar_proxy_connections_total{direction="inbound"} 2',
                   'sidecar_proxy_connections_active{direction="outbound"} 0',
                   'sidecar_proxy_bytes_total{direction="inbound",flow="upstream"} 0',
                   'sidecar_proxy_errors_total{kind="loop"} 1',
                   'sidecar_proxy_errors_total{kind="connect_refused"} 0',
                   'sidecar_proxy_upstream_connect_seconds_bucket{le="0.0025"} 1',
                   'sidecar_proxy_upstream_connect_seconds_bucket{le="+Inf"} 1',
                   "sidecar_proxy_upstream_connect_seconds_count 1"]:
        assert needle in text


def test_tunables_come_from_the_environment_and_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{}")
    cfg = build(str(path), {}, env={"SIDECAR_PROXY_FORWARD": "splice", "SIDECAR_PROXY_COPY_BUF": "65536"})
    assert (cfg.forward, cfg.copy_buf, cfg.pipe_size) == ("splice", 65536, 1 << 20)
    assert build(str(path), {}, env={}) == Config()
    for var, value in (("SIDECAR_PROXY_COPY_BUF", "abc"), ("SIDECAR_PROXY_PIPE_SIZE", "12"),
                       ("SIDECAR_PROXY_FORWARD", "zerocopy"), ("SIDECAR_PROXY_ACCESS_LOG_QUEUE", "-1")):
        with pytest.raises(ConfigError) as exc:
            build(str(path), {}, env={var: value})
        assert var in str(exc.value) and value in str(exc.value)
    with pytest.raises(ConfigError, match="unknown key 'copy_buf'"):  # not a file key
        validate({"copy_buf": 4096})


def test_check_config_shows_effective_settings_and_tunables(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"idle_timeout": 42}')
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "SIDECAR_PROXY_COPY_BUF": "131072"}
    res = subprocess.run([sys.executable, "-m", "sidecar_proxy", "--check-config", str(path)],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0, res.stderr
    assert "  idle_timeout = 42.0\n" in res.stdout
    assert "  copy_buf = 131072  (environment SIDECAR_PROXY_COPY_BUF)\n" in res.stdout
    assert '  forward = "copy"  (environment SIDECAR_PROXY_FORWARD)' in res.stdout
    env["SIDECAR_PROXY_COPY_BUF"] = "1k"
    res = subprocess.run([sys.executable, "-m", "sidecar_proxy", "--check-config", str(path)],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 1 and "SIDECAR_PROXY_COPY_BUF" in res.stderr and "Traceback" not in res.stderr
