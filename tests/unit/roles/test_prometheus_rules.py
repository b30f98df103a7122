"""The alerting rules shipped for Prometheus (roles/proxy/files/prometheus/) stay honest: every metric an
expression reads is one the proxy exposes (rendered by the proxy's own metrics code), and every alert
has a promtool unit test (tests/prometheus/; scripts/prometheus.sh runs promtool itself)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
RULES = sorted((ROOT / "roles" / "proxy" / "files" / "prometheus").glob("*.rules.yml"))
TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.test.yml"))


def exposed_metrics() -> set[str]:
    spec = importlib.util.spec_from_file_location("sidecar_metrics", ROOT / "proxy" / "src" / "sidecar_proxy" / "metrics.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.Metrics().prometheus(True, False)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def alerts() -> list[dict]:
    return [rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def test_rules_read_only_metrics_the_proxy_exposes():
    exposed = exposed_metrics()
    assert "sidecar_proxy_ready" in exposed and "sidecar_proxy_metrics_rejected_total" in exposed
    used = set()
    for rule in alerts():
        names = set(re.findall(r"\bsidecar_[a-z_]+\b", rule["expr"]))
        assert names or "up{" in rule["expr"], rule["alert"]
        used |= names
    assert used and used <= exposed, sorted(used - exposed)


def test_every_alert_has_severity_summary_and_a_promtool_test():
    tested = {case["alertname"] for path in TESTS for test in yaml.safe_load(path.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    firing = {case["alertname"] for path in TESTS for test in yaml.safe_load(path.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert set(names) <= tested and set(names) <= firing, sorted(set(names) - firing)
