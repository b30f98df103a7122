"""Configuration: JSON file + CLI overrides, validated with messages that name the bad key and value."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

DEFAULT_PATH = "/etc/sidecar-proxy/config.json"

MODES = ("redirect", "tproxy")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the value."""


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str = "redirect"
    inbound_port: int = 15006
    outbound_port: int = 15001
    admin_address: str = "127.0.0.1"
    admin_port: int = 15000
    admin_allow_remote: bool = False
    admin_max_connections: int = 16
    # the read-only metrics listener (GET /metrics only): "" = off, else an address of the host
    metrics_address: str = ""
    metrics_port: int = 15090
    ipv6: bool = False
    passthrough_source_v4: str = "127.0.0.6"
    passthrough_source_v6: str = "::6"
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    drain_timeout: float = 20.0
    max_connections: int = 65536
    buffer_budget: int = 32 << 20
    access_log: str = "-"
    log_level: str = "info"
    # processes that accept and forward: a count, or "auto" (one per CPU available, workers.py); read
    # at start (a reload keeps the running count)
    workers: int | str = 1
    # tuning knobs outside the contract: environment variables, not file keys (ENV below)
    forward: str = "copy"
    copy_buf: int = 256 << 10
    pipe_size: int = 1 << 20
    access_log_queue: int = 8 << 20


# field -> environment variable that sets it (instead of the file)
ENV = {
    "forward": "SIDECAR_PROXY_FORWARD",
    "copy_buf": "SIDECAR_PROXY_COPY_BUF",
    "pipe_size": "SIDECAR_PROXY_PIPE_SIZE",
    "access_log_queue": "SIDECAR_PROXY_ACCESS_LOG_QUEUE",
}
KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in ENV)
FORWARDS = ("copy", "splice")


MIN_BUFFER_BUDGET = 1 << 20
MAX_WORKERS = 1024


def _show(value: Any, limit: int = 60) -> str:
    """The value as JSON, shortened: a message stays one short line whatever the file holds."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):  # too deep to render, an int past the digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 13] + f"... ({len(text)} chars)"


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"invalid value for {key!r}: {_show(value)} ({why})")


def _int(key: str, value: Any, low: int, high: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(key, value, why)
    return value


def _port(key: str, value: Any) -> int:
    return _int(key, value, 1, 65535, "must be an integer 1-65535")


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, "must be a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond the float range
        raise _bad(key, value, "too large for a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise _bad(key, value, "must be a positive, finite number of seconds")
    return seconds


def _address(key: str, value: Any, version: int | None = None) -> str:
    if not isinstance(value, str):
        raise _bad(key, value, "must be an IP address string")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise _bad(key, value, "must be an IP address") from None
    if version is not None and addr.version != version:
        raise _bad(key, value, f"must be an IPv{version} address")
    return str(addr)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _bad(key, value, "must be one of " + ", ".join(choices))
    return value


def tunables(env: Mapping[str, str]) -> dict[str, Any]:
    """The ENV fields set in `env`, validated; a bad one raises ConfigError naming the variable."""
    out: dict[str, Any] = {}
    for field, var in ENV.items():
        if var not in env:
            continue
        text = env[var]
        if field == "forward":
            if text not in FORWARDS:
                why = "must be one of " + ", ".join(FORWARDS)
                raise ConfigError(f"invalid environment {var}={_show(text)} ({why})")
            out[field] = text
            continue
        low = 4096 if field != "access_log_queue" else 0
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= 1 << 30:
            why = f"must be a number of bytes {low}-{1 << 30}"
            raise ConfigError(f"invalid environment {var}={_show(text)} ({why})")
        out[field] = value
    return out


def validate(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Turn a mapping (parsed JSON) into a Config, or raise ConfigError naming the bad key/value.
    With `env`, the tuning fields (ENV) are read from it; without, they keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"configuration must be a JSON object, not {type(data).__name__}")
    for key in data:
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r} (known keys: {', '.join(KEYS)})")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "mode":
            out[key] = _choice(key, value, MODES)
        elif key in ("inbound_port", "outbound_port", "admin_port", "metrics_port"):
            out[key] = _port(key, value)
        elif key == "admin_address":
            out[key] = _address(key, value)
        elif key == "metrics_address":
            if value != "" and not (isinstance(value, str) and _is_ip(value)):
                raise _bad(key, value, 'must be "" (no metrics listener) or an IP address of the host')
            out[key] = "" if value == "" else _address(key, value)
        elif key == "passthrough_source_v4":
            out[key] = _address(key, value, 4)
        elif key == "passthrough_source_v6":
            out[key] = _address(key, value, 6)
        elif key == "ipv6":
            if not isinstance(value, bool):
                raise _bad(key, value, "must be true or false")
            out[key] = value
        elif key in ("connect_timeout", "idle_timeout", "drain_timeout"):
            out[key] = _seconds(key, value)
        elif key in ("max_connections", "admin_max_connections"):
            out[key] = _int(key, value, 1, 1 << 24, "must be an integer 1-16777216")
        elif key == "buffer_budget":
            out[key] = _int(key, value, MIN_BUFFER_BUDGET, 1 << 40,
                            f"must be a number of bytes, at least {MIN_BUFFER_BUDGET}")
        elif key == "admin_allow_remote":
            if not isinstance(value, bool):
                raise _bad(key, value, "must be true or false")
            out[key] = value
        elif key == "access_log":
            if not isinstance(value, str) or "\0" in value:
                raise _bad(key, value, 'must be "-" (stdout), "" (off) or a file path')
            out[key] = value
        elif key == "workers":
            if value != "auto":
                _int(key, value, 1, MAX_WORKERS, f'must be "auto" or an integer 1-{MAX_WORKERS}')
            out[key] = value
        elif key == "log_level":
            out[key] = _choice(key, value.lower() if isinstance(value, str) else value, LOG_LEVELS)
    if env is not None:
        out.update(tunables(env))
    cfg = Config(**out)
    if not cfg.admin_allow_remote and not ipaddress.ip_address(cfg.admin_address).is_loopback:
        raise _bad("admin_address", cfg.admin_address,
                   "not a loopback address; the admin endpoints have no authentication: "
                   'set "admin_allow_remote": true to listen there anyway')
    ports = {"inbound_port": cfg.inbound_port, "outbound_port": cfg.outbound_port,
             "admin_port": cfg.admin_port}
    if cfg.metrics_address:
        ports["metrics_port"] = cfg.metrics_port
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen:
            raise _bad(key, port, f"same port as {seen[port]!r}")
        seen[port] = key
    return cfg


def load_file(path: str) -> dict[str, Any]:
    """Read a JSON config file; raise ConfigError (one line naming the problem) for anything wrong
    with it: I/O, encoding, syntax, numbers the parser refuses, nesting too deep to parse."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = f"byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        raise ConfigError(f"{path}: not valid UTF-8 ({bad})") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON: arrays or objects nested too deeply") from None
    except ValueError as exc:  # int() past sys.get_int_max_str_digits()
        if "digits" in str(exc):
            limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
            raise ConfigError(f"{path}: not valid JSON: an integer with more than {limit} digits") from None
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: configuration must be a JSON object, not {type(data).__name__}")
    return data


def build(path: str | None, overrides: dict[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Config from an optional file plus overrides (CLI flags win) plus the environment's tunables
    (`env`, default os.environ)."""
    data: dict[str, Any] = load_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate(data, os.environ if env is None else env)


def describe(cfg: Config) -> str:
    """The effective configuration, one `key = value` line each, tunables with their variable."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = json.dumps(getattr(cfg, f.name))
        lines.append(f"  {f.name} = {value}" + (f"  (environment {ENV[f.name]})" if f.name in ENV else ""))
    return "\n".join(lines)
