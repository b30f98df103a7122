#!/usr/bin/env bash
# shellcheck shell=bash
# Reach the lab's Podman systemd hosts over SSH, as operators reach their VMs: a key pair made for each
# run, a sudo user `sidecar-ops` holding its public key on every host (what cloud-init user-data does
# on a VM; done here through `podman exec`, the one test shortcut), and the SSH settings Ansible uses.
# SSH_HOSTS_USER=root authorizes the key for root instead (the Molecule scenarios whose playbooks expect
# root, as they had with `podman exec`; no sudo on each task).
# Used by scripts/lab.sh, scripts/tooling.sh (matrix), benchmarks/fleet/run.sh, benchmarks/connection/run.sh
# and the Molecule scenarios that use SSH (molecule/shared/ssh_access.yml).
#
# Sourced:   ssh_hosts_key DIR                  a new key pair DIR/id_ed25519 (replaces an older one)
#            ssh_hosts_authorize PUBKEY HOST...  the user, its key and a running sshd on each host
#            ssh_hosts_vars KEY INDENT            the inventory variables for SSH with that key (YAML)
# Or run:    bash scripts/ssh-hosts.sh key DIR | authorize PUBKEY HOST...

SSH_HOSTS_USER="${SSH_HOSTS_USER:-sidecar-ops}"
# (.config/molecule/config.yml states the same options in YAML, for the Molecule scenarios)
SSH_HOSTS_ARGS="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ServerAliveInterval=15"

ssh_hosts_key() {  # ssh_hosts_key DIR: prints the private key's path
  mkdir -p "$1" && chmod 700 "$1" && rm -f "$1/id_ed25519" "$1/id_ed25519.pub" &&
    ssh-keygen -q -t ed25519 -N '' -C "sidecar-intercept-$(date +%s)" -f "$1/id_ed25519" &&
    echo "$1/id_ed25519"
}

ssh_hosts_authorize() {  # ssh_hosts_authorize PUBKEY HOST...: all hosts at once; fails if one fails
  local pub="$1" h pids=() rc=0
  shift
  [ -s "$pub" ] || { echo "ssh_hosts_authorize: no public key at $pub" >&2; return 1; }
  for h in "$@"; do
    podman exec -i -e "U=$SSH_HOSTS_USER" "$h" sh -c '
      set -e
      # until the boot is over, within 120 s (a boot can hang); a host started a moment ago may not
      # answer on its bus yet, which makes `systemctl` fail at once: then try again
      end=$(($(date +%s) + 120))
      while left=$((end - $(date +%s))); [ "$left" -gt 0 ]; do
        case "$(timeout "$left" systemctl is-system-running --wait 2>/dev/null)" in
          running|degraded) break ;;
        esac
        sleep 1
      done
      id "$U" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$U"
      home="$(getent passwd "$U" | cut -d: -f6)"
      install -d -m 0700 -o "$U" -g "$U" "$home/.ssh"
      cat >"$home/.ssh/authorized_keys"
      chown "$U:$U" "$home/.ssh/authorized_keys"
      chmod 0600 "$home/.ssh/authorized_keys"
      if [ "$U" != root ]; then
        echo "$U ALL=(ALL) NOPASSWD: ALL" >"/etc/sudoers.d/$U"
        chmod 0440 "/etc/sudoers.d/$U"
      fi
      systemctl enable --now ssh.service >/dev/null 2>&1 || true
      for _ in 1 2 3 4 5 6 7 8 9 10; do systemctl is-active --quiet ssh.service && exit 0; sleep 1; done
      echo "sshd is not active on $(hostname)" >&2; exit 1' <"$pub" &
    pids+=($!)
  done
  for h in "${pids[@]}"; do wait "$h" || rc=1; done
  [ "$rc" = 0 ] || echo "ssh_hosts_authorize: a host could not be prepared for SSH" >&2
  return "$rc"
}

ssh_hosts_vars() {  # ssh_hosts_vars KEY INDENT: the inventory variables for SSH with that key, as YAML
  local i="$2"
  printf '%sansible_connection: ansible.builtin.ssh\n' "$i"
  printf '%sansible_user: %s\n' "$i" "$SSH_HOSTS_USER"
  printf '%sansible_ssh_private_key_file: %s\n' "$i" "$1"
  # a lab host's key is new with each host; Ansible's default ssh_args keep a master connection per host
  printf '%sansible_ssh_common_args: %s\n' "$i" "$SSH_HOSTS_ARGS"
  printf '%sansible_ssh_pipelining: true\n' "$i"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -uo pipefail
  case "${1:-}" in
    key) ssh_hosts_key "$2" ;;
    authorize) shift; ssh_hosts_authorize "$@" ;;
    *) echo "usage: $0 key DIR | authorize PUBKEY HOST..." >&2; exit 2 ;;
  esac
fi
