#!/usr/bin/env bash
# The local lab: N Podman systemd hosts with sidecar.intercept deployed by playbooks/site.yml, and
# real requests between them that show the interception at work.
#
#   scripts/lab.sh [up]      build the image (once), start the hosts, deploy, demonstrate (default)
#   scripts/lab.sh demo      send the demo requests again and print the evidence
#   scripts/lab.sh status    list the lab hosts
#   scripts/lab.sh down      remove every container, network and image the lab made
#
# Settings (environment): SIDECAR_LAB_HOSTS (3), SIDECAR_LAB_SUITE (bookworm|trixie),
# SIDECAR_LAB_MODES (modes given to the hosts in turn; default "redirect redirect tproxy"),
# SIDECAR_LAB_NAME (network and host name prefix, default sidecar-lab), SIDECAR_LAB_SUBNET,
# SIDECAR_PROMETHEUS_PORT (the lab's Prometheus on 127.0.0.1, default 19090).
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "$0")/env.sh"
# shellcheck source=scripts/ssh-hosts.sh
. "$(dirname "$0")/ssh-hosts.sh"

HOSTS="${SIDECAR_LAB_HOSTS:-3}"
SUITE="${SIDECAR_LAB_SUITE:-bookworm}"
read -r -a MODES <<<"${SIDECAR_LAB_MODES:-redirect redirect tproxy}"
NET="${SIDECAR_LAB_NAME:-sidecar-lab}"  # the network, and the hosts' name prefix
SUBNET="${SIDECAR_LAB_SUBNET:-10.89.77.0/24}"
IMAGE="${SIDECAR_LAB_IMAGE:-localhost/sidecar-lab}:$SUITE"
LABDIR="$SIDECAR_REPO/.cache/lab"
KEY="$LABDIR/ssh/id_ed25519"  # the SSH key of the lab (a new one at each start_hosts)
INVENTORY="$LABDIR/inventory.yml"
APP_PORT=8080

if ! [[ "$HOSTS" =~ ^[0-9]+$ ]] || [ "$HOSTS" -lt 2 ] || [ "$HOSTS" -gt 50 ]; then
  die "SIDECAR_LAB_HOSTS must be a number from 2 to 50, got '$HOSTS'"
fi
for m in "${MODES[@]}"; do
  case "$m" in redirect|tproxy) ;; *) die "SIDECAR_LAB_MODES: unknown mode '$m' (expected redirect or tproxy)" ;; esac
done

name() { echo "$NET-$1"; }
mode_of() { echo "${MODES[$(( ($1 - 1) % ${#MODES[@]} ))]}"; }
ip_of() { podman inspect --format "{{ (index .NetworkSettings.Networks \"$NET\").IPAddress }}" "$(name "$1")"; }

start_hosts() {
  podman network exists "$NET" || podman network create --subnet "$SUBNET" --label sidecar.lab=1 "$NET" >/dev/null
  local i n
  for i in $(seq 1 "$HOSTS"); do
    n="$(name "$i")"
    if podman container exists "$n"; then
      [ "$(podman inspect --format '{{.State.Running}}' "$n")" = true ] || podman start "$n" >/dev/null
      continue
    fi
    log "starting $n ($IMAGE)"
    podman run -d --name "$n" --hostname "$n" --network "$NET" --label sidecar.lab=1 \
      --systemd=always --cap-add NET_ADMIN,NET_RAW --security-opt unmask=/proc/sys \
      "$IMAGE" /sbin/init >/dev/null
  done
  # wait until systemd inside each host has finished booting
  for i in $(seq 1 "$HOSTS"); do
    for _ in $(seq 1 60); do
      state="$(podman exec "$(name "$i")" systemctl is-system-running 2>/dev/null || true)"
      case "$state" in running|degraded) break ;; esac
      sleep 0.5
    done
  done
  # Ansible reaches the hosts over SSH, with a key made for this run (scripts/ssh-hosts.sh)
  local hosts=()
  for i in $(seq 1 "$HOSTS"); do hosts+=("$(name "$i")"); done
  KEY="$(ssh_hosts_key "$LABDIR/ssh")" || die "could not make an SSH key in $LABDIR/ssh"
  ssh_hosts_authorize "$KEY.pub" "${hosts[@]}" || die "could not give the lab hosts SSH access"
}

write_inventory() {
  mkdir -p "$LABDIR"
  {
    echo "# written by scripts/lab.sh"
    echo "sidecar_lab:"
    echo "  vars:"
    ssh_hosts_vars "$KEY" "    "
    echo "    ansible_python_interpreter: /usr/bin/python3"
    echo "    sidecar_proxy_metrics_address: 0.0.0.0  # scraped by the lab's Prometheus"
    echo "    sidecar_rollout_probe_peer: next"
    echo "  hosts:"
    for i in $(seq 1 "$HOSTS"); do
      echo "    $(name "$i"):"
      echo "      ansible_host: $(ip_of "$i")"
      echo "      sidecar_mode: $(mode_of "$i")"
    done
  } >"$INVENTORY"
}

# One request from host A to host B's app; then the evidence from both proxies.
demo_pair() {
  local a="$1" b="$2" ipb body
  ipb="$(ip_of "$b")"
  body="$(podman exec "$(name "$a")" python3 -c "
import urllib.request, sys
print(urllib.request.urlopen('http://$ipb:$APP_PORT/', timeout=10).read().decode().strip())")" \
    || die "request from $(name "$a") to $ipb:$APP_PORT failed"
  printf '\n\033[1m%s -> %s:%s (%s, inbound mode %s): "%s"\033[0m\n' \
    "$(name "$a")" "$ipb" "$APP_PORT" "$(name "$b")" "$(mode_of "$b")" "$body"
  printf '  outbound proxy on %s logged:\n' "$(name "$a")"
  podman exec "$(name "$a")" journalctl -u sidecar-proxy -o cat --no-pager \
    | grep '"direction"' | grep '"outbound"' | grep "$ipb:$APP_PORT" | tail -n 1 | sed 's/^/    /' \
    || die "no outbound access-log line for $ipb:$APP_PORT on $(name "$a")"
  printf '  inbound proxy on %s logged:\n' "$(name "$b")"
  podman exec "$(name "$b")" journalctl -u sidecar-proxy -o cat --no-pager \
    | grep '"direction"' | grep '"inbound"' | grep "$ipb:$APP_PORT" | tail -n 1 | sed 's/^/    /' \
    || die "no inbound access-log line for $ipb:$APP_PORT on $(name "$b")"
}

demo() {
  local i
  log "demonstrating: each host requests the next host's app (http://<ip>:$APP_PORT/)"
  for i in $(seq 1 "$HOSTS"); do
    demo_pair "$i" $(( i % HOSTS + 1 ))
  done
  echo
  printf '\033[1mProxy counters on %s (from /metrics):\033[0m\n' "$(name 1)"
  podman exec "$(name 1)" python3 -c "
import urllib.request
for line in urllib.request.urlopen('http://127.0.0.1:15000/metrics', timeout=5).read().decode().splitlines():
    if line.startswith(('sidecar_proxy_connections_total', 'sidecar_proxy_bytes_total')):
        print('  ' + line)"
  echo
  # a real Prometheus (Debian's package) on this machine scrapes every proxy's metrics listener
  local targets=()
  for i in $(seq 1 "$HOSTS"); do targets+=("$(ip_of "$i"):15090"); done
  bash "$SIDECAR_REPO/scripts/prometheus.sh" scrape "$LABDIR/prometheus" "${targets[@]}"
  cat <<EOT

Interception works: every request above went app -> outbound proxy (:15001) -> network ->
inbound proxy (:15006) -> app, and both proxies logged the original destination.
Where to look next:
  ssh -i $KEY sidecar-ops@$(ip_of 1)
                                                        a shell on a lab host over SSH (or: podman exec -it $(name 1) bash)
  podman exec $(name 1) iptables-save -c                the rules and their packet counters
  podman exec $(name 1) journalctl -u sidecar-proxy     the proxy's log (one JSON line per connection)
  podman exec $(name 1) python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:15000/stats').read().decode())"
                                                        the proxy's JSON stats
  ansible-playbook -i $INVENTORY playbooks/verify.yml   read-only verification of every host
  scripts/lab.sh down                                   remove the lab
EOT
}

up() {
  sidecar_setup
  bash "$SIDECAR_REPO/scripts/lab-image.sh" "$SUITE"
  start_hosts
  write_inventory
  cd "$SIDECAR_REPO"
  log "installing the demo app (playbooks/lab/prepare.yml)"
  ansible-playbook -i "$INVENTORY" playbooks/lab/prepare.yml >"$LABDIR/prepare.log" 2>&1 \
    || { tail -n 40 "$LABDIR/prepare.log"; die "lab preparation failed (log: $LABDIR/prepare.log)"; }
  log "deploying sidecar.intercept with playbooks/site.yml (log: $LABDIR/site.log)"
  ansible-playbook -i "$INVENTORY" playbooks/site.yml >"$LABDIR/site.log" 2>&1 \
    || { tail -n 60 "$LABDIR/site.log"; die "site.yml failed (log: $LABDIR/site.log)"; }
  grep -A "$HOSTS" '^PLAY RECAP' "$LABDIR/site.log" | tail -n "$HOSTS"
  demo
}

down() {
  setup_podman
  log "removing the lab containers and network${1:+ (images kept)}"
  podman ps -a --filter label=sidecar.lab=1 --filter "name=^$NET-" --format '{{.Names}}' | xargs -r podman rm -f -t 2 >/dev/null
  podman network exists "$NET" && podman network rm -f "$NET" >/dev/null
  if [ "${1:-}" != "--keep-images" ]; then
    # without -f: an image that other containers (a Molecule run) still use is kept, not forced away
    if podman image exists "$IMAGE" && ! podman rmi "$IMAGE" >/dev/null 2>&1; then
      log "image $IMAGE is in use by other containers; kept"
    fi
  fi
  rm -rf "$LABDIR"
  log "lab removed"
}

case "${1:-up}" in
  up) up ;;
  demo) sidecar_setup; demo ;;
  status) setup_podman; podman ps -a --filter label=sidecar.lab=1 --filter "name=^$NET-" --format 'table {{.Names}}\t{{.Status}}\t{{.Networks}}' ;;
  down) down "${2:-}" ;;
  *) die "unknown command '$1' (expected up, demo, status or down)" ;;
esac
