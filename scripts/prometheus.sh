#!/usr/bin/env bash
# Prometheus for the tests and the lab, from Debian's `prometheus` package.
#   scripts/prometheus.sh rules   promtool check rules + promtool test rules of the collection's alerting
#                                 rules (roles/proxy/files/prometheus/*.rules.yml, tests/prometheus/*.test.yml)
#   scripts/prometheus.sh bin     print the directory holding `prometheus` and `promtool`
#   scripts/prometheus.sh scrape DIR HOST:PORT...
#                                 run a real Prometheus (127.0.0.1:$SIDECAR_PROMETHEUS_PORT, default 19090,
#                                 state in DIR) with the shipped rules that scrapes the given proxies'
#                                 metrics listeners, print a query result per proxy and the alerts, stop it
# The package is downloaded with apt and unpacked into the cache, not installed: installing it would
# start a Prometheus server on the machine (its postinst starts the service) and pull in the web UI's
# JavaScript packages. The two binaries need only libc. A promtool already on PATH is used as it is.
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "$0")/env.sh"

prometheus_bin() {
  local version dir deb
  version="$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    apt-get update -qq >/dev/null
    version="$(apt-cache policy prometheus | awk '/Candidate:/ {print $2}')"
  fi
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then die "apt has no prometheus package"; fi
  dir="$SIDECAR_CACHE/prometheus-${version//[^A-Za-z0-9.+-]/_}"
  if [ ! -x "$dir/usr/bin/promtool" ] || [ ! -x "$dir/usr/bin/prometheus" ]; then
    log "unpacking Debian's prometheus $version into $dir"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    (cd "$dir.tmp" && apt-get download -q "prometheus=$version" >/dev/null 2>&1) ||
      die "apt-get download prometheus=$version failed"
    deb="$(ls "$dir.tmp"/prometheus_*.deb)"
    dpkg-deb -x "$deb" "$dir.tmp/root"
    rm -rf "$dir" && mv "$dir.tmp/root" "$dir" && rm -rf "$dir.tmp"
  fi
  printf '%s\n' "$dir/usr/bin"
}

rules() {
  local promtool rc=0 f
  if command -v promtool >/dev/null 2>&1; then
    promtool="$(command -v promtool)"
  else
    promtool="$(prometheus_bin)/promtool"
  fi
  "$promtool" --version 2>&1 | head -n 1
  cd "$SIDECAR_REPO"
  for f in roles/proxy/files/prometheus/*.rules.yml; do
    "$promtool" check rules "$f" || rc=1
  done
  for f in tests/prometheus/*.test.yml; do
    (cd "$(dirname "$f")" && "$promtool" test rules "$(basename "$f")") || rc=1
  done
  return "$rc"
}

scrape() {
  local dir="$1" bin port pid rc=0 t
  shift
  [ $# -gt 0 ] || die "usage: $0 scrape DIR HOST:PORT..."
  bin="$(prometheus_bin)"
  port="${SIDECAR_PROMETHEUS_PORT:-19090}"
  mkdir -p "$dir"
  rm -rf "$dir/prometheus-data"
  {
    echo "# written by scripts/prometheus.sh scrape"
    echo "global: {scrape_interval: 2s, evaluation_interval: 2s}"
    echo "rule_files: [\"$SIDECAR_REPO/roles/proxy/files/prometheus/sidecar-intercept.rules.yml\"]"
    echo "scrape_configs:"
    echo "  - job_name: sidecar-proxy"
    echo "    static_configs:"
    echo "      - targets:"
    for t in "$@"; do echo "          - \"$t\""; done
  } >"$dir/prometheus.yml"
  "$bin/promtool" check config "$dir/prometheus.yml" >/dev/null || die "bad $dir/prometheus.yml"
  "$bin/prometheus" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/prometheus-data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn >"$dir/prometheus.log" 2>&1 &
  pid=$!
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "kill $pid 2>/dev/null; wait $pid 2>/dev/null" EXIT
  python3 - "$port" "$#" <<'PY' || rc=$?
import json, sys, time, urllib.parse, urllib.request
port, want = sys.argv[1], int(sys.argv[2])
def query(q):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    return json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
deadline, up = time.monotonic() + 60, []
while time.monotonic() < deadline:  # bounded: every target scraped at least twice, or give up
    try:
        up = query('count_over_time(up{job="sidecar-proxy"}[1m]) >= 2 and up{job="sidecar-proxy"} == 1')
    except OSError:
        up = []
    if len(up) == want:
        break
    time.sleep(1)
print(f"Prometheus on 127.0.0.1:{port} scrapes {len(up)} of {want} proxies (job sidecar-proxy).")
q = 'sum by (instance) (sidecar_proxy_connections_total{job="sidecar-proxy"})'
print(f"  query: {q}")
for r in sorted(query(q), key=lambda r: r["metric"]["instance"]):
    print(f"    {r['metric']['instance']:<22} {r['value'][1]} connections")
url = f"http://127.0.0.1:{port}/api/v1/rules?type=alert"
groups = json.load(urllib.request.urlopen(url, timeout=5))["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
firing = [f"{r['name']} ({a['labels'].get('instance', '')})" for r in rules for a in r.get("alerts", [])
          if a["state"] == "firing"]
print(f"  alerting rules loaded: {len(rules)}; firing: {', '.join(firing) or 'none'}")
sys.exit(0 if len(up) == want else 1)
PY
  [ "$rc" -eq 0 ] || { tail -n 20 "$dir/prometheus.log" >&2; die "Prometheus did not scrape every proxy"; }
}

case "${1:-rules}" in
  rules) rules ;;
  bin) prometheus_bin ;;
  scrape) shift; scrape "$@" ;;
  *) die "usage: $0 [rules|bin|scrape DIR HOST:PORT...]" ;;
esac
