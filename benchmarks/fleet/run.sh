#!/usr/bin/env bash
# Fleet rollout benchmark (not a test): wall time of sidecar.intercept.site for N Podman systemd hosts
# (default 6 12 24), then of the idempotent re-run, which must report changed=0. Prints a table.
# Ansible reaches the hosts over SSH as operators do (scripts/ssh-hosts.sh: a key for the run, user
# sidecar-ops with sudo, pipelining, a master connection per host); SIDECAR_BENCH_CONNECTION=podman
# uses `podman exec` instead, for comparison.
#
#   bash benchmarks/fleet/run.sh [N ...]
#   SIDECAR_BENCH_SERIAL='[1, "25%"]' SIDECAR_BENCH_FORKS=12 bash benchmarks/fleet/run.sh 6 12
#   SIDECAR_BENCH_RERUNS=3 ...       how many times the re-run is timed (default 3; the table shows the
#                                    median, the changed count is the sum over them)
#   SIDECAR_BENCH_KEEP=1 ...         keep the hosts of the last size (and their inventory in .cache/fbench)
#                                    for profiling; the next run of the benchmark removes them
#   SIDECAR_BENCH_FULL_RERUN=1 ...   also times a third run with sidecar_rollout_skip_unchanged=false
#                                    (every task of the roles again, as before the unchanged hosts were skipped)
#
# Containers are named fbench-N on the Podman network sidecar-fbench; both are removed on exit,
# also on failure or Ctrl-C. Half the hosts run redirect, half tproxy. Probes go only to these hosts.
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "$0")/../../scripts/env.sh"
# shellcheck source=scripts/ssh-hosts.sh
. "$(dirname "$0")/../../scripts/ssh-hosts.sh"

SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(6 12 24)
for n in "${SIZES[@]}"; do
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 2 ] && [ "$n" -le 64 ] || die "host count must be 2..64, got '$n'"
done
SERIAL="${SIDECAR_BENCH_SERIAL:-[1, \"25%\"]}"
FORKS="${SIDECAR_BENCH_FORKS:-12}"
RERUNS="${SIDECAR_BENCH_RERUNS:-3}"
[[ "$RERUNS" =~ ^[1-9]$ ]] || die "SIDECAR_BENCH_RERUNS must be 1..9, got '$RERUNS'"
CONNECTION="${SIDECAR_BENCH_CONNECTION:-ssh}"
case "$CONNECTION" in ssh|podman) ;; *) die "SIDECAR_BENCH_CONNECTION must be ssh or podman, got '$CONNECTION'" ;; esac
SUITE="${SIDECAR_BENCH_SUITE:-bookworm}"
IMAGE="${SIDECAR_LAB_IMAGE:-localhost/sidecar-lab}:$SUITE"
NET=sidecar-fbench
# a fixed subnet that no test scenario uses (Podman's next free one could be a scenario's fixed subnet)
SUBNET="${SIDECAR_BENCH_SUBNET:-10.89.90.0/24}"
WORK="$SIDECAR_REPO/.cache/fbench"
RESULTS="$WORK/results.txt"

cleanup() {
  podman ps -a --filter label=sidecar.fbench=1 --format '{{.Names}}' | xargs -r podman rm -f -t 1 >/dev/null 2>&1 || true
  podman network exists "$NET" 2>/dev/null && podman network rm -f "$NET" >/dev/null 2>&1 || true
}
DONE=0  # with SIDECAR_BENCH_KEEP=1 the hosts stay only after a run that finished
trap '[ "${SIDECAR_BENCH_KEEP:-0}" = 1 ] && [ "$DONE" = 1 ] || cleanup' EXIT
trap 'cleanup; exit 130' INT TERM

inotify_in_use() {  # inotify instances open now (all users: rootful Podman hosts all count as root's)
  { find /proc/[0-9]*/fd -lname 'anon_inode:inotify' 2>/dev/null || true; } | wc -l  # (processes come and go)
}

start_hosts() {
  local n="$1" i state limit need
  # each systemd host takes about 6 inotify instances; past fs.inotify.max_user_instances its systemd
  # never finishes booting ("Failed to create inotify object: Too many open files")
  limit="$(cat /proc/sys/fs/inotify/max_user_instances)"
  need=$(( $(inotify_in_use) + 8 * n ))
  [ "$need" -le "$limit" ] || die "$n hosts need about $need inotify instances, fs.inotify.max_user_instances is $limit: raise it first (sysctl -w fs.inotify.max_user_instances=$(( need * 2 )))"
  podman network exists "$NET" || podman network create --subnet "$SUBNET" --label sidecar.fbench=1 "$NET" >/dev/null
  for i in $(seq 1 "$n"); do
    podman run -d --name "fbench-$i" --hostname "fbench-$i" --network "$NET" --label sidecar.fbench=1 \
      --systemd=always --cap-add NET_ADMIN,NET_RAW --security-opt unmask=/proc/sys \
      "$IMAGE" /sbin/init >/dev/null
  done
  for i in $(seq 1 "$n"); do
    for _ in $(seq 1 120); do
      state="$(podman exec "fbench-$i" systemctl is-system-running 2>/dev/null || true)"
      case "$state" in
        running|degraded) break ;;
      esac
      sleep 0.5
    done
    case "$state" in
      running|degraded) ;;
      *) die "fbench-$i did not finish booting in 60 s (systemctl is-system-running: ${state:-no answer})" ;;
    esac
  done
  if [ "$CONNECTION" = ssh ]; then
    # shellcheck disable=SC2046  # a word list by design
    ssh_hosts_authorize "$WORK/ssh/id_ed25519.pub" $(seq -f 'fbench-%g' 1 "$n") || die "SSH access failed"
  fi
}

write_inventory() {
  local n="$1" i
  {
    echo "fbench:"
    echo "  vars:"
    if [ "$CONNECTION" = ssh ]; then
      ssh_hosts_vars "$WORK/ssh/id_ed25519" "    "
    else
      echo "    ansible_connection: containers.podman.podman"
    fi
    echo "    ansible_python_interpreter: /usr/bin/python3"
    echo "    sidecar_rollout_probe_peer: next"
    echo "  hosts:"
    for i in $(seq 1 "$n"); do
      echo "    fbench-$i:"
      # (the podman connection takes ansible_host as the container's name)
      [ "$CONNECTION" = podman ] ||
        echo "      ansible_host: $(podman inspect --format "{{ (index .NetworkSettings.Networks \"$NET\").IPAddress }}" "fbench-$i")"
      if [ $((i % 2)) -eq 1 ]; then echo "      sidecar_mode: redirect"; else echo "      sidecar_mode: tproxy"; fi
    done
  } >"$WORK/inventory-$n.yml"
}

hosts_cpu() {  # hosts_cpu N: CPU seconds the N hosts (their containers' cgroups) have used so far
  local i path total=0 usec
  for i in $(seq 1 "$1"); do
    path="$(podman inspect --format '{{.State.CgroupPath}}' "fbench-$i")"
    # cgroup v2, or the v2 hierarchy that hybrid v1 systems mount under unified/
    usec="$(cat "/sys/fs/cgroup$path/cpu.stat" "/sys/fs/cgroup/unified$path/cpu.stat" 2>/dev/null |
      awk '$1 == "usage_usec" {print $2; exit}')"
    total=$((total + ${usec:-0}))
  done
  awk -v u="$total" 'BEGIN {printf "%.1f\n", u / 1e6}'
}

# run_site N LABEL [EXTRA_VARS_JSON]: time one site.yml run; prints "seconds changed_total failed_total
# controller_cpu_seconds hosts_cpu_seconds" (the controller: ansible-playbook and its workers, user + system)
run_site() {
  local n="$1" tag="$2" t0 t1 log ctl h0 h1
  local -a extra=()
  [ -z "${3:-}" ] || extra=(-e "$3")
  log="$WORK/site-$n-$tag.log"
  h0="$(hosts_cpu "$n")"
  t0="$(date +%s.%N)"
  if ! ANSIBLE_FORKS="$FORKS" ANSIBLE_PIPELINING=true ANSIBLE_SSH_CONTROL_PATH_DIR="$WORK/cp" python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%.1f\n" % (r.ru_utime + r.ru_stime))
sys.exit(rc)' "$WORK/cpu-$n-$tag" ansible-playbook -i "$WORK/inventory-$n.yml" \
      -e "{\"sidecar_rollout_serial\": $SERIAL}" "${extra[@]}" sidecar.intercept.site >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "site.yml failed for $n hosts ($tag run, log: $log)"
  fi
  t1="$(date +%s.%N)"
  h1="$(hosts_cpu "$n")"
  ctl="$(cat "$WORK/cpu-$n-$tag")"
  awk -v t0="$t0" -v t1="$t1" -v ctl="$ctl" -v h0="$h0" -v h1="$h1" '
    /^PLAY RECAP/ {r = 1; next}
    r && /changed=/ {for (i = 1; i <= NF; i++) {split($i, kv, "="); if (kv[1] == "changed") c += kv[2]; if (kv[1] == "failed") f += kv[2]}}
    END {printf "%.1f %d %d %s %.1f\n", t1 - t0, c, f, ctl, h1 - h0}' "$log"
}

main() {
  sidecar_setup
  bash "$SIDECAR_REPO/scripts/lab-image.sh" "$SUITE" >/dev/null
  mkdir -p "$WORK"
  cleanup
  [ "$CONNECTION" = podman ] || ssh_hosts_key "$WORK/ssh" >/dev/null || die "could not make an SSH key"
  printf '%-6s | %-10s | %-14s | %-15s | %-16s | %-24s | %-s\n' hosts batches "first run (s)" "re-run (s), median" "re-run changed" \
    "re-runs' CPU s, controller/hosts" "full re-run (s), skip_unchanged=false" >"$RESULTS"
  printf '%s\n' "-------+------------+----------------+-----------------+------------------+----------------------" >>"$RESULTS"
  local n first again full
  for n in "${SIZES[@]}"; do
    log "rollout benchmark: $n hosts (serial $SERIAL, forks $FORKS)"
    start_hosts "$n"
    write_inventory "$n"
    first="$(run_site "$n" first)"
    # the re-run is short, so one busy second of the machine shows: time it RERUNS times, keep the median
    local -a times=() cpus=()
    local changed=0 i one
    for i in $(seq 1 "$RERUNS"); do
      one="$(run_site "$n" "again-$i")"
      times+=("${one%% *}")
      changed=$((changed + $(echo "$one" | cut -d' ' -f2)))
      cpus+=("$(echo "$one" | awk '{printf "%s/%s", $4, $5}')")
    done
    log "re-runs of $n hosts: ${times[*]} s wall; CPU s controller/hosts: ${cpus[*]}"
    again="$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}') $changed"
    full="-"
    if [ "${SIDECAR_BENCH_FULL_RERUN:-0}" = 1 ]; then
      full="$(run_site "$n" full '{"sidecar_rollout_skip_unchanged": false}')"
      full="${full%% *} (changed $(echo "$full" | cut -d' ' -f2))"
    fi
    batches="$(grep -c '^PLAY \[Sidecar rollout | Deploy' "$WORK/site-$n-first.log" || true)"
    printf '%-6s | %-10s | %-14s | %-15s | %-16s | %-24s | %-s\n' "$n" "$batches" "${first%% *}" "${again%% *}" \
      "$(echo "$again" | cut -d' ' -f2)" "${cpus[*]}" "$full" >>"$RESULTS"
    [ "${SIDECAR_BENCH_KEEP:-0}" = 1 ] && [ "$n" = "${SIZES[-1]}" ] || cleanup
  done
  echo
  echo "sidecar.intercept.site rollout wall time ($(nproc) cores, serial $SERIAL, forks $FORKS, image $IMAGE, over $CONNECTION)"
  cat "$RESULTS"
  DONE=1
}

main
