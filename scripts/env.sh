# shellcheck shell=bash
# Sourced by the lab and test scripts: one place for paths, the tools venv, Podman's host quirks and
# the collection path. Everything is created on first use and reused afterwards.
SIDECAR_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIDECAR_CACHE="${SIDECAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-intercept}"
export SIDECAR_REPO SIDECAR_CACHE
mkdir -p "$SIDECAR_CACHE" "$SIDECAR_REPO/.cache"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the lab needs rootful Podman, network namespaces and iptables"

# Debian packages the lab and the tests need; installed only when missing.
SIDECAR_APT_PACKAGES="${SIDECAR_APT_PACKAGES:-podman runc debootstrap iptables nftables iproute2 git shellcheck}"
ensure_apt() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Podman on this kind of host: crun refuses the hybrid cgroup layout, and the default ulimits exceed
# the hard nofile limit (see shared/lab-facts.md). A containers.conf fixes both.
setup_podman() {
  local hn conf="$SIDECAR_CACHE/containers.conf"
  hn="$(ulimit -Hn)"
  [ "$hn" = unlimited ] && hn=1048576
  cat >"$conf.$$" <<CONF
[containers]
default_ulimits = ["nofile=${hn}:${hn}", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
  mv "$conf.$$" "$conf"
  export CONTAINERS_CONF="$conf"
}

# The controller's Python: ansible-core 2.20+ wants 3.12+; fall back to what the host has.
pick_python() {
  local c
  for c in python3.13 python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3" python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  die "no Python >= 3.10 with the venv module found (apt-get install python3-venv)"
}

# The tools venv, keyed by the requirements file so a change rebuilds it.
ensure_venv() {
  local req="$SIDECAR_REPO/tests/requirements.txt" py key
  py="$(pick_python)"
  key="$( (cat "$req"; "$py" -VV) | sha256sum | cut -c1-12)"
  SIDECAR_VENV="${SIDECAR_VENV:-$SIDECAR_CACHE/venv-$key}"
  if [ ! -x "$SIDECAR_VENV/bin/molecule" ]; then
    log "creating the tools venv $SIDECAR_VENV ($("$py" -V))"
    rm -rf "$SIDECAR_VENV"
    "$py" -m venv "$SIDECAR_VENV" || { ensure_apt python3-venv; "$py" -m venv "$SIDECAR_VENV"; }
    if ! { "$SIDECAR_VENV/bin/pip" install --disable-pip-version-check -U pip &&
           "$SIDECAR_VENV/bin/pip" install --disable-pip-version-check -r "$req"; } >"$SIDECAR_CACHE/pip.log" 2>&1; then
      tail -n 30 "$SIDECAR_CACHE/pip.log" >&2
      rm -rf "$SIDECAR_VENV"
      die "installing the tools venv failed (log: $SIDECAR_CACHE/pip.log)"
    fi
  fi
  export SIDECAR_VENV PATH="$SIDECAR_VENV/bin:$PATH"
}

# Make this checkout importable as the collection sidecar.intercept (for ansible and for pytest).
setup_collection_path() {
  local base="$SIDECAR_REPO/.cache/collections"
  mkdir -p "$base/ansible_collections/sidecar"
  ln -sfn "$SIDECAR_REPO" "$base/ansible_collections/sidecar/intercept"
  export ANSIBLE_COLLECTIONS_PATH="$base"
  export PYTHONPATH="$base${PYTHONPATH:+:$PYTHONPATH}"
}

sidecar_setup() {
  # shellcheck disable=SC2086  # a word list by design
  ensure_apt $SIDECAR_APT_PACKAGES
  setup_podman
  ensure_venv
  setup_collection_path
  export ANSIBLE_FORCE_COLOR="${ANSIBLE_FORCE_COLOR:-0}" ANSIBLE_NOCOLOR="${ANSIBLE_NOCOLOR:-1}"
}
