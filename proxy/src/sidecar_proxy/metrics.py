"""Counters kept by the data plane and their Prometheus / JSON renderings."""

from __future__ import annotations

import bisect
from typing import Any

DIRECTIONS = ("inbound", "outbound")
FLOWS = ("upstream", "downstream")
ERROR_KINDS = (
    "loop",
    "connect_refused",
    "connect_timeout",
    "connect_error",
    "original_dst",
    "limit",
    "upstream_reset",
    "downstream_reset",
    "idle_timeout",
    "drain",
    "accept",
)
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Plain counters; the event loop is single-threaded so no locking is needed."""

    def __init__(self) -> None:
        self.connections_total = dict.fromkeys(DIRECTIONS, 0)
        self.connections_active = dict.fromkeys(DIRECTIONS, 0)
        self.bytes_total = {(d, f): 0 for d in DIRECTIONS for f in FLOWS}
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.connect_buckets = [0] * len(BUCKETS)
        self.connect_count = 0
        self.connect_sum = 0.0
        self.reloads = 0
        self.reload_failures = 0
        self.access_log_dropped = 0
        self.reload_last_error: str | None = None
        self.admin_rejected = 0
        self.metrics_rejected = 0
        self.buffer_waits = 0
        # gauges the server sets before rendering
        self.buffered_bytes = 0
        self.buffer_budget = 0
        self.buffer_waiting = 0
        self.workers = 1  # processes forwarding (the supervisor sets it; workers.py)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe_connect(self, seconds: float) -> None:
        i = bisect.bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            self.connect_buckets[i] += 1
        self.connect_count += 1
        self.connect_sum += seconds

    # the data plane's counters and gauges, which a worker publishes and its supervisor sums (workers.py)
    COUNTERS = ("connections_total", "bytes_total", "errors", "connect_buckets", "connect_count",
                "connect_sum", "access_log_dropped", "buffer_waits")
    GAUGES = ("connections_active", "buffered_bytes", "buffer_waiting")

    def snapshot(self) -> dict[str, Any]:
        """The data-plane fields as JSON-ready values (bytes_total keyed "direction_flow")."""
        snap: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS + self.GAUGES}
        snap["bytes_total"] = {f"{d}_{f}": v for (d, f), v in self.bytes_total.items()}
        return snap

    def absorb(self, snap: dict[str, Any], gauges: bool = True) -> None:
        """Add a snapshot() of another process to these figures (counters always, gauges if asked)."""
        for name in self.COUNTERS + (self.GAUGES if gauges else ()):
            value, mine = snap.get(name), getattr(self, name)
            if isinstance(mine, dict):
                keys = {k: f"{k[0]}_{k[1]}" for k in mine} if name == "bytes_total" else {k: k for k in mine}
                for key, text in keys.items():
                    mine[key] += (value or {}).get(text, 0)
            elif isinstance(mine, list):
                setattr(self, name, [a + b for a, b in zip(mine, value or [0] * len(mine), strict=True)])
            else:
                setattr(self, name, mine + (value or 0))

    def prometheus(self, ready: bool, draining: bool) -> str:
        lines = [
            "# HELP sidecar_proxy_connections_total Connections accepted by the proxy.",
            "# TYPE sidecar_proxy_connections_total counter",
        ]
        for d in DIRECTIONS:
            lines.append(f'sidecar_proxy_connections_total{{direction="{d}"}} {self.connections_total[d]}')
        lines += [
            "# HELP sidecar_proxy_connections_active Connections currently open.",
            "# TYPE sidecar_proxy_connections_active gauge",
        ]
        for d in DIRECTIONS:
            lines.append(f'sidecar_proxy_connections_active{{direction="{d}"}} {self.connections_active[d]}')
        lines += [
            "# HELP sidecar_proxy_bytes_total Bytes forwarded (upstream: client to destination; "
            "downstream: destination to client).",
            "# TYPE sidecar_proxy_bytes_total counter",
        ]
        for (d, f), v in self.bytes_total.items():
            lines.append(f'sidecar_proxy_bytes_total{{direction="{d}",flow="{f}"}} {v}')
        lines += [
            "# HELP sidecar_proxy_errors_total Connection errors by kind.",
            "# TYPE sidecar_proxy_errors_total counter",
        ]
        for kind, v in self.errors.items():
            lines.append(f'sidecar_proxy_errors_total{{kind="{kind}"}} {v}')
        lines += [
            "# HELP sidecar_proxy_upstream_connect_seconds Time to connect to the original destination.",
            "# TYPE sidecar_proxy_upstream_connect_seconds histogram",
        ]
        acc = 0
        for le, n in zip(BUCKETS, self.connect_buckets, strict=True):
            acc += n
            lines.append(f'sidecar_proxy_upstream_connect_seconds_bucket{{le="{le}"}} {acc}')
        lines.append(f'sidecar_proxy_upstream_connect_seconds_bucket{{le="+Inf"}} {self.connect_count}')
        lines.append(f"sidecar_proxy_upstream_connect_seconds_sum {self.connect_sum:.6f}")
        lines.append(f"sidecar_proxy_upstream_connect_seconds_count {self.connect_count}")
        lines += [
            "# HELP sidecar_proxy_ready 1 when all listeners are bound and the proxy is not draining.",
            "# TYPE sidecar_proxy_ready gauge",
            f"sidecar_proxy_ready {int(ready and not draining)}",
            "# HELP sidecar_proxy_reloads_total Configuration reloads (SIGHUP), by result.",
            "# TYPE sidecar_proxy_reloads_total counter",
            f'sidecar_proxy_reloads_total{{result="ok"}} {self.reloads}',
            f'sidecar_proxy_reloads_total{{result="failed"}} {self.reload_failures}',
            "# HELP sidecar_proxy_access_log_dropped_total Access-log lines dropped because the log sink "
            "could not keep up.",
            "# TYPE sidecar_proxy_access_log_dropped_total counter",
            f"sidecar_proxy_access_log_dropped_total {self.access_log_dropped}",
            "# HELP sidecar_proxy_admin_rejected_total Admin connections reset because "
            "admin_max_connections were open.",
            "# TYPE sidecar_proxy_admin_rejected_total counter",
            f"sidecar_proxy_admin_rejected_total {self.admin_rejected}",
            "# HELP sidecar_proxy_metrics_rejected_total Connections to the metrics listener reset because "
            "admin_max_connections were open there.",
            "# TYPE sidecar_proxy_metrics_rejected_total counter",
            f"sidecar_proxy_metrics_rejected_total {self.metrics_rejected}",
            "# HELP sidecar_proxy_buffer_bytes Bytes of copy buffers (or pipe capacity) flows hold now.",
            "# TYPE sidecar_proxy_buffer_bytes gauge",
            f"sidecar_proxy_buffer_bytes {self.buffered_bytes}",
            "# HELP sidecar_proxy_buffer_budget_bytes The buffer_budget setting.",
            "# TYPE sidecar_proxy_buffer_budget_bytes gauge",
            f"sidecar_proxy_buffer_budget_bytes {self.buffer_budget}",
            "# HELP sidecar_proxy_buffer_waiting_flows Flows not reading because the budget is spent.",
            "# TYPE sidecar_proxy_buffer_waiting_flows gauge",
            f"sidecar_proxy_buffer_waiting_flows {self.buffer_waiting}",
            "# HELP sidecar_proxy_buffer_waits_total Times a flow had to wait for the buffer budget.",
            "# TYPE sidecar_proxy_buffer_waits_total counter",
            f"sidecar_proxy_buffer_waits_total {self.buffer_waits}",
            "# HELP sidecar_proxy_workers Worker processes forwarding (the workers setting).",
            "# TYPE sidecar_proxy_workers gauge",
            f"sidecar_proxy_workers {self.workers}",
        ]
        return "\n".join(lines) + "\n"

    def stats(self) -> dict[str, Any]:
        return {
            "connections_total": dict(self.connections_total),
            "connections_active": dict(self.connections_active),
            "bytes_total": {f"{d}_{f}": v for (d, f), v in self.bytes_total.items()},
            "errors": dict(self.errors),
            "upstream_connect": {
                "count": self.connect_count,
                "sum_seconds": round(self.connect_sum, 6),
                "buckets": {str(le): n for le, n in zip(BUCKETS, self.connect_buckets, strict=True)},
            },
            "reloads": {"ok": self.reloads, "failed": self.reload_failures,
                        "last_error": self.reload_last_error},
            "access_log_dropped": self.access_log_dropped,
        }
