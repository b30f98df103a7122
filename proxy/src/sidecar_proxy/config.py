"""Configuration: JSON file + CLI overrides, validated with messages that name the bad key and value."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
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
    ipv6: bool = False
    passthrough_source_v4: str = "127.0.0.6"
    passthrough_source_v6: str = "::6"
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    drain_timeout: float = 20.0
    max_connections: int = 65536
    access_log: str = "-"
    log_level: str = "info"


KEYS = tuple(f.name for f in dataclasses.fields(Config))


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"invalid value for {key!r}: {json.dumps(value)} ({why})")


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _bad(key, value, "must be an integer 1-65535")
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, "must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise _bad(key, value, "must be a positive number of seconds")
    return float(value)


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


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _bad(key, value, "must be one of " + ", ".join(choices))
    return value


def validate(data: Any) -> Config:
    """Turn a mapping (parsed JSON) into a Config, or raise ConfigError naming the bad key/value."""
    if not isinstance(data, dict):
        raise ConfigError(f"configuration must be a JSON object, not {type(data).__name__}")
    for key in data:
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r} (known keys: {', '.join(KEYS)})")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "mode":
            out[key] = _choice(key, value, MODES)
        elif key in ("inbound_port", "outbound_port", "admin_port"):
            out[key] = _port(key, value)
        elif key == "admin_address":
            out[key] = _address(key, value)
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
        elif key == "max_connections":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(key, value, "must be a positive integer")
            out[key] = value
        elif key == "access_log":
            if not isinstance(value, str) or "\0" in value:
                raise _bad(key, value, 'must be "-" (stdout), "" (off) or a file path')
            out[key] = value
        elif key == "log_level":
            out[key] = _choice(key, value.lower() if isinstance(value, str) else value, LOG_LEVELS)
    cfg = Config(**out)
    ports = {"inbound_port": cfg.inbound_port, "outbound_port": cfg.outbound_port,
             "admin_port": cfg.admin_port}
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen:
            raise _bad(key, port, f"same port as {seen[port]!r}")
        seen[port] = key
    return cfg


def load_file(path: str) -> dict[str, Any]:
    """Read a JSON config file; raise ConfigError on I/O or syntax problems."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: configuration must be a JSON object, not {type(data).__name__}")
    return data


def build(path: str | None, overrides: dict[str, Any]) -> Config:
    """Config from an optional file plus overrides (CLI flags win)."""
    data: dict[str, Any] = load_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate(data)
