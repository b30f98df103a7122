#!/usr/bin/env bash
# Per-task cost of Ansible's connection to a lab host (not a test): the same playbook of TASKS trivial
# tasks on the same HOSTS Podman systemd hosts, over SSH (scripts/ssh-hosts.sh: pipelining and a master
# connection per host, as the fleet scenario, the lab and the fleet benchmark use) and over `podman exec`
# (containers.podman.podman), alternating for ROUNDS rounds in one run. Prints seconds per task and round.
#
#   bash benchmarks/connection/run.sh            (SIDECAR_CBENCH_HOSTS=2 TASKS=20 ROUNDS=3 FORKS=5
#                                                 CONNECTIONS="ssh podman")
# Each systemd host takes about 6 inotify instances: past about 15 hosts raise
# fs.inotify.max_user_instances first (benchmarks/fleet/run.sh names the value), or the hosts never boot.
#
# Containers cbench-N on the network sidecar-cbench (10.89.91.0/24) are removed on exit, also on failure.
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "$0")/../../scripts/env.sh"
# shellcheck source=scripts/ssh-hosts.sh
. "$(dirname "$0")/../../scripts/ssh-hosts.sh"

HOSTS="${SIDECAR_CBENCH_HOSTS:-2}" TASKS="${SIDECAR_CBENCH_TASKS:-20}" ROUNDS="${SIDECAR_CBENCH_ROUNDS:-3}"
FORKS="${SIDECAR_CBENCH_FORKS:-5}" CONNECTIONS="${SIDECAR_CBENCH_CONNECTIONS:-ssh podman}"
for v in "$HOSTS" "$TASKS" "$ROUNDS" "$FORKS"; do
  [[ "$v" =~ ^[0-9]+$ ]] && [ "$v" -ge 1 ] && [ "$v" -le 100 ] || die "host, task, round and fork counts must be 1..100, got '$v'"
done
for c in $CONNECTIONS; do
  case "$c" in ssh|podman) ;; *) die "SIDECAR_CBENCH_CONNECTIONS takes ssh and podman, not '$c'" ;; esac
done
IMAGE="${SIDECAR_LAB_IMAGE:-localhost/sidecar-lab}:bookworm"
NET=sidecar-cbench
WORK="$SIDECAR_REPO/.cache/cbench"

cleanup() {
  podman ps -a --filter label=sidecar.cbench=1 --format '{{.Names}}' | xargs -r podman rm -f -t 1 >/dev/null 2>&1 || true
  podman network exists "$NET" 2>/dev/null && podman network rm -f "$NET" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

sidecar_setup
bash "$SIDECAR_REPO/scripts/lab-image.sh" bookworm >/dev/null
cleanup
rm -rf "$WORK" && mkdir -p "$WORK"
podman network create --subnet 10.89.91.0/24 --label sidecar.cbench=1 "$NET" >/dev/null
names=()
for i in $(seq 1 "$HOSTS"); do
  names+=("cbench-$i")
  podman run -d --name "cbench-$i" --hostname "cbench-$i" --network "$NET" --label sidecar.cbench=1 \
    --systemd=always "$IMAGE" /sbin/init >/dev/null
done
key="$(ssh_hosts_key "$WORK/ssh")"
ssh_hosts_authorize "$key.pub" "${names[@]}" || die "SSH access failed"

for conn in ssh podman; do
  {
    echo "cbench:"
    echo "  vars:"
    if [ "$conn" = ssh ]; then ssh_hosts_vars "$key" "    "; else echo "    ansible_connection: containers.podman.podman"; fi
    echo "    ansible_python_interpreter: /usr/bin/python3"
    echo "    ansible_become: true"
    echo "  hosts:"
    for n in "${names[@]}"; do
      echo "    $n:"
      # (the podman connection takes ansible_host as the container's name)
      [ "$conn" = podman ] ||
        echo "      ansible_host: $(podman inspect --format "{{ (index .NetworkSettings.Networks \"$NET\").IPAddress }}" "$n")"
    done
  } >"$WORK/inventory-$conn.yml"
done
{
  echo "- name: Trivial tasks"
  echo "  hosts: cbench"
  echo "  gather_facts: false"
  echo "  tasks:"
  for t in $(seq 1 "$TASKS"); do
    echo "    - name: Task $t"
    echo "      ansible.builtin.command: /bin/true"
    echo "      changed_when: false"
  done
} >"$WORK/tasks.yml"

run() {  # run CONNECTION: seconds per task of one playbook run
  local t0 t1
  t0="$(date +%s.%N)"
  ANSIBLE_SSH_CONTROL_PATH_DIR="$WORK/cp" ansible-playbook --forks "$FORKS" -i "$WORK/inventory-$1.yml" "$WORK/tasks.yml" \
    >"$WORK/run-$1.log" 2>&1 || { tail -n 30 "$WORK/run-$1.log" >&2; die "the $1 run failed"; }
  t1="$(date +%s.%N)"
  awk -v a="$t0" -v b="$t1" -v n="$TASKS" 'BEGIN { printf "%.3f", (b - a) / n }'
}

# the first SSH run opens the master connections; measured runs reuse them, as a playbook does
case " $CONNECTIONS " in *" ssh "*) run ssh >/dev/null ;; esac
printf 'seconds per task (%s hosts, %s tasks, forks %s, %s cores); each column one round\n' "$HOSTS" "$TASKS" "$FORKS" "$(nproc)"
declare -A row=()
for _ in $(seq 1 "$ROUNDS"); do
  for c in $CONNECTIONS; do row[$c]+=" $(run "$c")"; done
done
for c in $CONNECTIONS; do printf '%-6s%s\n' "$c" "${row[$c]}"; done
