"""Command line: `sidecar-proxy` / `python -m sidecar_proxy`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import DEFAULT_PATH, ConfigError, build, describe


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar-proxy",
        description="Transparent TCP proxy for sidecar traffic interception (REDIRECT / TPROXY).",
    )
    p.add_argument("--config", metavar="FILE",
                   help=f"JSON config file (default: {DEFAULT_PATH} when it exists, else built-in defaults)")
    p.add_argument("--check-config", metavar="FILE", help="validate FILE and exit 0 (valid) or 1 (invalid)")
    p.add_argument("--mode", choices=("redirect", "tproxy"), help="how inbound traffic arrives")
    p.add_argument("--inbound-port", type=int, metavar="N")
    p.add_argument("--outbound-port", type=int, metavar="N")
    p.add_argument("--admin-port", type=int, metavar="N")
    p.add_argument("--access-log", metavar="PATH", help='"-" for stdout, "" to disable, or a file path')
    p.add_argument("--log-level", metavar="L", help="debug, info, warning, error, critical")
    p.add_argument("--version", action="version", version=f"sidecar-proxy {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.check_config is not None:
        try:
            checked = build(args.check_config, {})
        except ConfigError as exc:
            msg = str(exc)  # file-level problems already start with the path
            where = "" if msg.startswith(args.check_config) else f"{args.check_config}: "
            print(f"sidecar-proxy: {where}{msg}", file=sys.stderr)
            return 1
        except Exception as exc:  # noqa: BLE001 - a check must answer in one line, never a traceback
            print(f"sidecar-proxy: {args.check_config}: cannot check: {type(exc).__name__}: {exc}"[:500],
                  file=sys.stderr)
            return 1
        print(f"{args.check_config}: configuration is valid; effective settings:\n{describe(checked)}")
        return 0
    overrides = {
        "mode": args.mode,
        "inbound_port": args.inbound_port,
        "outbound_port": args.outbound_port,
        "admin_port": args.admin_port,
        "access_log": args.access_log,
        "log_level": args.log_level,
    }
    path = args.config
    if path is None and os.path.exists(DEFAULT_PATH):
        path = DEFAULT_PATH
    try:
        cfg = build(path, overrides)
    except ConfigError as exc:
        print(f"sidecar-proxy: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(stream=sys.stderr, level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import Server
    from .workers import Supervisor, worker_count

    count = worker_count(cfg.workers)
    if count > 1:
        return Supervisor(cfg, path, overrides, count).run()
    return Server(cfg, path, overrides).run()


if __name__ == "__main__":
    sys.exit(main())
