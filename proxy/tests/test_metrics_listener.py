"""Issue 14, the read-only metrics listener (`metrics_address`/`metrics_port`): served on a host address
for a scraper on another host, GET /metrics only (never the admin endpoints), capped on its own,
reloadable, and reachable through the capture rules because the collection excludes its port."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Topo, connect, in_ns, ns_socket
from test_robustness import run_cli

from sidecar_proxy.config import ConfigError, validate

PORT = 15090


def http(ns: str, addr: tuple[str, int], request: str, family: int = socket.AF_INET) -> tuple[int, str]:
    """One HTTP/1.0 request from namespace `ns`; (status, body)."""
    s = ns_socket(ns, family)
    try:
        s.settimeout(5)
        s.connect(addr)
        s.sendall(request.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def get(ns: str, addr: tuple[str, int], path: str, family: int = socket.AF_INET) -> tuple[int, str]:
    return http(ns, addr, f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n", family)


# ---------------------------------------------------------------------------- config (no root)
def test_metrics_listener_is_off_by_default_and_validated() -> None:
    cfg = validate({})
    assert (cfg.metrics_address, cfg.metrics_port) == ("", PORT)
    assert validate({"metrics_address": "10.1.2.3"}).metrics_address == "10.1.2.3"
    assert validate({"metrics_address": "FD00::1"}).metrics_address == "fd00::1"
    # the port of a listener that is off clashes with nothing
    assert validate({"metrics_port": 15000}).metrics_port == 15000
    for data, words in (
        ({"metrics_address": "10.1.2.300"}, ["'metrics_address'", '"10.1.2.300"']),
        ({"metrics_address": 7}, ["'metrics_address'", "7"]),
        ({"metrics_address": "0.0.0.0", "metrics_port": 0}, ["'metrics_port'", "0"]),
        ({"metrics_address": "0.0.0.0", "metrics_port": "15090"}, ["'metrics_port'", '"15090"']),
        ({"metrics_address": "0.0.0.0", "metrics_port": 15006},
         ["'metrics_port'", "same port as 'inbound_port'"]),
        ({"metrics_address": "0.0.0.0", "metrics_port": 15000}, ["'metrics_port'", "'admin_port'"]),
    ):
        with pytest.raises(ConfigError) as exc:
            validate(data)
        for word in words:
            assert word in str(exc.value), (data, str(exc.value))


def test_check_config_shows_the_metrics_listener(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"metrics_address": "10.1.2.3", "metrics_port": 9100}')
    res = run_cli("--check-config", str(path))
    assert res.returncode == 0, res.stderr
    assert 'metrics_address = "10.1.2.3"' in res.stdout and "metrics_port = 9100" in res.stdout, res.stdout
    path.write_text('{"metrics_address": "my-host"}')
    res = run_cli("--check-config", str(path))
    assert res.returncode == 1 and "'metrics_address'" in res.stderr and '"my-host"' in res.stderr, res.stderr


# ---------------------------------------------------------------------------- served (root, netns)
def test_metrics_served_on_host_address_admin_refused_there(topo: Topo, start_proxy: Any) -> None:
    proxy = start_proxy(topo.sns, {"metrics_address": topo.s4, "metrics_port": PORT})
    where = (topo.s4, PORT)
    status, body = get(topo.cns, where, "/metrics")
    assert status == 200
    assert "sidecar_proxy_ready 1" in body and 'sidecar_proxy_connections_total{direction="inbound"}' in body
    # the same source as the admin endpoint's /metrics: same series, in the same order
    names = [line.split(" ")[0] for line in body.splitlines()]
    assert names == [line.split(" ")[0] for line in proxy.metrics().splitlines()]
    assert http(topo.cns, where, "HEAD /metrics HTTP/1.0\r\n\r\n") == (200, "")
    # never the admin endpoints, nor any other method
    for path in ("/stats", "/ready", "/", "/metrics/../stats"):
        status, body = get(topo.cns, where, path)
        assert status == 404 and "only /metrics" in body, (path, status, body)
    assert http(topo.cns, where, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")[0] == 405
    # the admin endpoint stays on loopback: not reachable from the other host
    s = ns_socket(topo.cns)
    s.settimeout(3)
    with pytest.raises(ConnectionRefusedError):
        s.connect((topo.s4, proxy.admin_port))
    s.close()
    stats = proxy.stats()
    assert stats["metrics_listener"]["address"] == f"{topo.s4}:{PORT}"
    assert stats["config"]["metrics_address"] == topo.s4


def test_metrics_on_ipv6_wildcard(topo: Topo, start_proxy: Any) -> None:
    start_proxy(topo.sns, {"metrics_address": "::", "metrics_port": PORT, "ipv6": True})
    status, body = get(topo.cns, (topo.s6, PORT), "/metrics", socket.AF_INET6)
    assert status == 200 and "sidecar_proxy_ready 1" in body


def test_metrics_listener_cap_is_its_own(topo: Topo, start_proxy: Any) -> None:
    cap = 3
    proxy = start_proxy(topo.sns, {"metrics_address": topo.s4, "metrics_port": PORT,
                                   "admin_max_connections": cap})
    idle: list[socket.socket] = []
    try:
        for _ in range(cap + 5):
            s = ns_socket(topo.cns)
            s.settimeout(2)
            with contextlib.suppress(ConnectionResetError):
                s.connect((topo.s4, PORT))
            idle.append(s)
        proxy.wait_until(lambda: proxy.stats()["metrics_listener"]["rejected"] >= 5)
        # the local admin endpoint (health checks) still answers: the scrapers' cap is separate
        assert proxy.admin("/ready")[0] == 200
        stats = proxy.stats()
        assert stats["metrics_listener"] == {"address": f"{topo.s4}:{PORT}", "open": cap, "rejected": 5}
        assert stats["admin"]["rejected"] == 0
        assert "sidecar_proxy_metrics_rejected_total 5" in proxy.metrics()
    finally:
        for s in idle:
            s.close()
    # once the idle ones are gone, scrapes are served again
    proxy.wait_until(lambda: proxy.stats()["metrics_listener"]["open"] == 0)
    assert get(topo.cns, (topo.s4, PORT), "/metrics")[0] == 200


def test_metrics_listener_follows_reload(topo: Topo, start_proxy: Any) -> None:
    proxy = start_proxy(topo.sns, {})

    def refused() -> bool:
        s = ns_socket(topo.cns)
        s.settimeout(2)
        try:
            s.connect((topo.s4, PORT))
        except ConnectionRefusedError:
            return True
        finally:
            s.close()
        return False

    assert refused()
    proxy.rewrite(metrics_address=topo.s4, metrics_port=PORT)
    proxy.signal(signal.SIGHUP)
    proxy.wait_until(lambda: proxy.stats()["reloads"]["ok"] == 1)
    assert get(topo.cns, (topo.s4, PORT), "/metrics")[0] == 200
    # an address the host does not have: the reload fails and the running listener stays
    proxy.rewrite(metrics_address="10.231.255.254")
    proxy.signal(signal.SIGHUP)
    proxy.wait_until(lambda: proxy.stats()["reloads"]["failed"] == 1)
    assert "metrics listener 10.231.255.254:15090: Cannot assign requested address" in \
        proxy.stats()["reloads"]["last_error"]
    assert get(topo.cns, (topo.s4, PORT), "/metrics")[0] == 200
    proxy.rewrite(metrics_address="")
    proxy.signal(signal.SIGHUP)
    proxy.wait_until(lambda: proxy.stats()["reloads"]["ok"] == 2)
    assert refused()
    assert proxy.stats()["metrics_listener"]["address"] is None


def test_start_with_an_address_the_host_lacks_names_the_listener(topo: Topo, start_proxy: Any) -> None:
    with pytest.raises(RuntimeError) as exc:
        start_proxy(topo.sns, {"metrics_address": "10.231.255.254", "metrics_port": PORT})
    assert "cannot start: [Errno 99] metrics listener 10.231.255.254:15090: Cannot assign" in str(exc.value)


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_scrape_through_capture_reaches_listener_only_with_the_collections_exclusion(
        topo: Topo, start_proxy: Any, mode: str) -> None:
    """The capture rules of the collection's settings (metrics listener on) let a scrape from another
    host reach the listener; the same rules without the listener's port excluded send it into the
    proxy, which resets it (loop guard): the exclusion is what makes scraping work."""
    metrics = {"sidecar_proxy_metrics_address": topo.s4, "sidecar_proxy_metrics_port": PORT}
    topo.capture(topo.sns, sidecar_mode=mode, **metrics)
    rules = topo.sh(topo.sns, "iptables-save")
    assert f"--dport {PORT} -j RETURN" in rules, rules
    proxy = start_proxy(topo.sns, {"mode": mode, "metrics_address": topo.s4, "metrics_port": PORT})
    status, body = get(topo.cns, (topo.s4, PORT), "/metrics")
    assert status == 200 and "sidecar_proxy_ready 1" in body
    assert proxy.stats()["errors"]["loop"] == 0
    assert proxy.stats()["connections_total"]["inbound"] == 0  # not through the proxy


def test_scrape_without_the_exclusion_is_captured_and_reset(topo: Topo, start_proxy: Any) -> None:
    # control for the test above: the rules of settings without the listener capture port 15090
    topo.redirect_inbound()
    proxy = start_proxy(topo.sns, {"metrics_address": topo.s4, "metrics_port": PORT})
    with pytest.raises((ConnectionResetError, IndexError, ValueError)):
        get(topo.cns, (topo.s4, PORT), "/metrics")
    proxy.wait_until(lambda: proxy.stats()["errors"]["loop"] >= 1)


# ---------------------------------------------------------------------------- a real Prometheus (root, netns)
def prometheus_dir() -> Path:
    """Debian's Prometheus binaries, unpacked by scripts/prometheus.sh (apt-get download, once)."""
    found = shutil.which("prometheus")
    if found:
        return Path(found).parent
    res = subprocess.run(["bash", str(REPO / "scripts" / "prometheus.sh"), "bin"], capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"no Prometheus binary: {res.stderr.strip()[-300:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def test_real_prometheus_scrapes_the_listener_through_the_capture(topo: Topo, start_proxy: Any, serve: Any,
                                                                  tmp_path: Path) -> None:
    """Prometheus on another host (the client namespace) scrapes the proxy's metrics listener through the
    collection's capture rules, loads the shipped alerting rules, and sees the proxied connection."""
    bindir = prometheus_dir()
    topo.capture(topo.sns, sidecar_mode="redirect", sidecar_proxy_metrics_address=topo.s4,
                 sidecar_proxy_metrics_port=PORT)
    start_proxy(topo.sns, {"metrics_address": topo.s4, "metrics_port": PORT})
    serve(topo.sns, socket.AF_INET, 8080)
    with connect(topo.cns, socket.AF_INET, (topo.s4, 8080)) as s:  # one connection through the proxy
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    rules = REPO / "roles" / "proxy" / "files" / "prometheus" / "sidecar-intercept.rules.yml"
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "sidecar-proxy",
                            "static_configs": [{"targets": [f"{topo.s4}:{PORT}"]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    # in the client namespace: its 127.0.0.1:9090 is its own, nothing on the machine shares it
    prom = subprocess.Popen(["ip", "netns", "exec", topo.cns, str(bindir / "prometheus"),
                             f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             "--web.listen-address=127.0.0.1:9090", "--log.level=warn"],
                            stdout=log, stderr=log)

    def api(path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:9090/api/v1/{path}?{urllib.parse.urlencode(params)}"
        return in_ns(topo.cns, lambda: json.load(urllib.request.urlopen(url, timeout=3)))["data"]

    try:
        deadline, result = time.monotonic() + 40, []
        query = 'sidecar_proxy_connections_total{job="sidecar-proxy", direction="inbound"}'
        while time.monotonic() < deadline and prom.poll() is None:
            with contextlib.suppress(OSError, KeyError, ValueError):
                result = api("query", query=query)["result"]
                if result:
                    break
            time.sleep(0.5)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert result[0]["metric"]["instance"] == f"{topo.s4}:{PORT}" and result[0]["value"][1] == "1", result
        up = api("query", query='up{job="sidecar-proxy"}')["result"]
        assert [r["value"][1] for r in up] == ["1"], up
        groups = api("rules")["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        assert len(loaded) >= 10 and all(r["health"] != "err" for r in loaded), loaded
        assert [r["name"] for r in loaded if r["state"] == "firing"] == []
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
        log.close()
