#!/usr/bin/env bash
# Build the systemd host image for the lab and Molecule from Debian packages (no registry is reachable).
# Usage: scripts/lab-image.sh [bookworm|trixie|trixie-nft|bookworm-fw ...]   (default: bookworm)
# The image $SIDECAR_LAB_IMAGE:<name> (default localhost/sidecar-lab:<name>) carries the hash of its
# recipe as the label sidecar.recipe; it is rebuilt only when missing or when the recipe changed.
# Another SIDECAR_LAB_IMAGE (e.g. localhost/sidecar-lab-mine) builds and tests a changed recipe without
# replacing the images other runs use; the Molecule scenarios and the lab read the same variable.
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "$0")/env.sh"
ensure_apt podman runc debootstrap
setup_podman

# What goes into a lab host: systemd as init, Python for Ansible, and the network tools the roles use.
# No python3-venv: the proxy runs from a zipapp with the host's python3, so hosts need no venv or pip.
# The image "trixie-nft" is a native-nftables host: Debian 13 with nftables and without the iptables package.
# openssh-server: the fleet scenario, the lab and the fleet benchmark reach their hosts over SSH, as
# operators reach VMs (scripts/ssh-hosts.sh); each host makes its own host keys at its first start.
PACKAGES="systemd,systemd-sysv,dbus,python3,python3-apt,iptables,iproute2,sudo,procps,kmod,ca-certificates,openssh-server"
NFT_PACKAGES="${PACKAGES/iptables/nftables}"
# The image "bookworm-fw" is a host with firewalls and sshd (molecule/firewall): the bookworm image plus
# ufw (disabled until a scenario enables it), firewalld (masked: it runs only where a scenario unmasks it),
# nftables and openssh-server (host keys are made at first start, not kept in the image). It is built in
# a running container of the bookworm image (firewalld's polkitd does not configure under debootstrap).
FW_PACKAGES="ufw firewalld nftables openssh-server"
MIRROR="${SIDECAR_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
RECIPE_VERSION=3
IMAGE_NAME="${SIDECAR_LAB_IMAGE:-localhost/sidecar-lab}"

build() {  # build NAME SUITE PACKAGES
  local suite="$2" image="$IMAGE_NAME:$1" packages="$3" recipe have rootfs
  recipe="$(printf '%s\n' "$RECIPE_VERSION" "$suite" "$packages" "$MIRROR" "$(declare -f ssh_host_keys_at_boot)" |
    sha256sum | cut -c1-16)"
  have="$(podman image inspect --format '{{ index .Labels "sidecar.recipe" }}' "$image" 2>/dev/null || true)"
  if [ "$have" = "$recipe" ]; then
    log "image $image is up to date (recipe $recipe)"
    return 0
  fi
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/sidecar-rootfs-$suite.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$rootfs'" RETURN
  log "building $image with debootstrap (about a minute)"
  if ! debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap $suite failed"
  fi
  rm -f "$rootfs.log" "$rootfs/etc/hostname"
  ssh_host_keys_at_boot "$rootfs"
  # Containers have no consoles or hardware to wait for; mask what only slows boot or fails.
  for unit in systemd-remount-fs.service getty@tty1.service console-getty.service systemd-firstboot.service; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
  done
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  tar -C "$rootfs" -c . | podman import \
    --change 'CMD ["/sbin/init"]' \
    --change "LABEL sidecar.recipe=$recipe" \
    --change "LABEL sidecar.suite=$suite" \
    - "$image" >/dev/null
  log "built $image (recipe $recipe)"
}

derive() {  # derive NAME BASE PACKAGES FINISH: BASE's image plus apt packages, installed in a running container
  local image="$IMAGE_NAME:$1" base="$IMAGE_NAME:$2" packages="$3" finish="$4" recipe have ctr
  build "$2" "${2%%-*}" "$PACKAGES"
  recipe="$(printf '%s\n' "$(podman image inspect --format '{{ index .Labels "sidecar.recipe" }}' "$base")" \
    "$packages" "$MIRROR" "$(declare -f "$finish")" | sha256sum | cut -c1-16)"
  have="$(podman image inspect --format '{{ index .Labels "sidecar.recipe" }}' "$image" 2>/dev/null || true)"
  if [ "$have" = "$recipe" ]; then
    log "image $image is up to date (recipe $recipe)"
    return 0
  fi
  log "building $image from $base (apt-get install $packages)"
  ctr="$(podman run -d --systemd=always --cap-add NET_ADMIN,NET_RAW "$base" /sbin/init)"
  # shellcheck disable=SC2064
  trap "podman rm -f '$ctr' >/dev/null 2>&1 || true" RETURN
  podman exec "$ctr" sh -c 'systemctl is-system-running --wait >/dev/null 2>&1 || true'  # /tmp is mounted by then
  # (apt's _apt sandbox user cannot run gpgv in these containers: apt runs as root here)
  podman exec "$ctr" sh -c "echo 'deb $MIRROR ${2%%-*} main' >/etc/apt/sources.list &&
    apt-get -o APT::Sandbox::User=root update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o APT::Sandbox::User=root \
    install -y -qq --no-install-recommends $packages >/dev/null &&
    rm -rf /var/cache/apt/archives/*.deb /var/lib/apt/lists/*" || die "apt-get install in $base failed"
  podman exec "$ctr" sh -c "$(declare -f "$finish"); $finish /"
  podman stop -t 5 "$ctr" >/dev/null
  podman commit --change 'CMD ["/sbin/init"]' --change "LABEL sidecar.recipe=$recipe" "$ctr" "$image" >/dev/null
  log "built $image (recipe $recipe)"
}

# No host keys in an image (every host would share them): sshd makes its own at its first start.
ssh_host_keys_at_boot() {  # ssh_host_keys_at_boot ROOT
  rm -f "$1"/etc/ssh/ssh_host_*
  mkdir -p "$1/etc/systemd/system/ssh.service.d"
  printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    >"$1/etc/systemd/system/ssh.service.d/host-keys.conf"
}

finish_fw() {  # firewalld and sshd only where a scenario starts them; no host keys of this build's start
  systemctl disable firewalld.service ssh.service >/dev/null 2>&1 || true
  ln -sf /dev/null "$1/etc/systemd/system/firewalld.service"
  rm -f "$1"/etc/ssh/ssh_host_*
}

suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(bookworm)
for s in "${suites[@]}"; do
  case "$s" in
    bookworm|trixie) build "$s" "$s" "$PACKAGES" ;;
    trixie-nft) build "$s" trixie "$NFT_PACKAGES" ;;
    bookworm-fw) derive "$s" bookworm "$FW_PACKAGES" finish_fw ;;
    *) die "unknown image '$s' (expected bookworm, trixie, trixie-nft or bookworm-fw)" ;;
  esac
done
