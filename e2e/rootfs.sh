#!/usr/bin/env bash
# A Debian rootfs with Debian's rabbitmq-server for each RabbitMQ generation of versions.env, built
# once per machine into $WARREN_CACHE/rootfs/rabbitmq-<generation>/ with the exact version it holds
# in rabbitmq-<generation>.version beside it. The tier-2 harness runs nodes from these under chroot
# (the host's Erlang cannot run 4.x, and sid's binaries need a newer glibc), and e2e/images.sh packs
# them as the node's images, so the tests and the pods run the same bits.
#
#   e2e/rootfs.sh [GENERATION...]     default: every generation of RABBITMQ_GENERATIONS, in parallel,
#                                     and the Python rootfs of the Celery worker's image
#   e2e/rootfs.sh python              the Python rootfs only
#
# A rootfs is built in a temporary directory and renamed when complete, so an interrupted build is
# never mistaken for a finished one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
rootfs_dir=$cache/rootfs
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

component=rootfs
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"

var() { local name="RABBITMQ_${1//./_}_$2"; echo "${!name:-}"; }

# version_at_least A B: whether version A >= B (dpkg's ordering).
version_at_least() { dpkg --compare-versions "$1" ge "$2"; }

build_generation() {
  local generation=$1 suite pinned minimum
  suite=$(var "$generation" SUITE)
  pinned=$(var "$generation" VERSION)
  minimum=$(var "$generation" MINIMUM)
  [[ -n $suite && -n $pinned ]] || die "versions.env names no suite or version for generation $generation"
  local root=$rootfs_dir/rabbitmq-$generation version_file=$rootfs_dir/rabbitmq-$generation.version
  if [[ -d $root && -f $version_file ]]; then
    local have
    have=$(cat "$version_file")
    # A pinned generation must hold exactly the pinned version; a moving one (with a minimum) any
    # release from the minimum on.
    if [[ -n $minimum ]] && version_at_least "$have" "$minimum"; then return 0; fi
    if [[ -z $minimum && $have == "$pinned" ]]; then return 0; fi
    log "$generation: cached rootfs holds $have, versions.env wants ${minimum:+at least }${minimum:-$pinned}: rebuilding"
  fi
  mkdir -p "$rootfs_dir"
  local work=$rootfs_dir/.build-$generation
  rm -rf "$work" "$work.log"
  log "$generation: debootstrap $suite with rabbitmq-server (a few minutes, once per machine)"
  local start=$SECONDS
  nice -n 10 debootstrap --variant=minbase "$suite" "$work" "$mirror" > "$work.log" 2>&1 ||
    die "$generation: debootstrap $suite failed; see $work.log"
  # No service may start inside the rootfs while packages install.
  printf '#!/bin/sh\nexit 101\n' > "$work/usr/sbin/policy-rc.d"
  chmod +x "$work/usr/sbin/policy-rc.d"
  # /proc in a mount namespace of its own: it goes away with the command, nothing to unmount.
  # sid's Release file can be older than this machine's clock says it may be: don't check its date.
  unshare --mount --propagation private sh -c '
    mount -t proc proc "$1/proc" &&
    exec nice -n 10 chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive sh -c "
      apt-get -q -o Acquire::Check-Valid-Until=false update &&
      apt-get -q install -y --no-install-recommends rabbitmq-server"' sh "$work" >> "$work.log" 2>&1 ||
    die "$generation: installing rabbitmq-server from $suite failed; see $work.log"
  local installed upstream
  installed=$(chroot "$work" dpkg-query -W -f '${Version}' rabbitmq-server)
  upstream=${installed%%-*}
  if [[ -n $minimum ]]; then
    version_at_least "$upstream" "$minimum" ||
      die "$generation: Debian $suite now ships rabbitmq-server $installed, older than $minimum: this generation needs another suite (versions.env)"
    [[ $upstream == "$pinned" ]] ||
      log "$generation: $suite ships rabbitmq-server $upstream (versions.env recorded $pinned); using it"
  else
    [[ $upstream == "$pinned" ]] ||
      die "$generation: Debian $suite ships rabbitmq-server $installed, versions.env pins $pinned"
  fi
  # The official image runs RabbitMQ as rabbitmq 999:999 with HOME /var/lib/rabbitmq; the pods do too.
  local old_uid old_gid
  old_uid=$(chroot "$work" id -u rabbitmq); old_gid=$(chroot "$work" id -g rabbitmq)
  sed -i "s/^rabbitmq:x:$old_uid:$old_gid:/rabbitmq:x:999:999:/" "$work/etc/passwd"
  sed -i "s/^rabbitmq:x:$old_gid:/rabbitmq:x:999:/" "$work/etc/group"
  rm -rf "$work"/var/lib/rabbitmq/* "$work"/var/lib/rabbitmq/.erlang.cookie "$work"/var/log/rabbitmq/* \
    "$work"/var/cache/apt/archives/*.deb "$work"/var/lib/apt/lists/* "$work"/usr/share/doc \
    "$work"/usr/share/man "$work"/usr/share/locale "$work/usr/sbin/policy-rc.d"
  chown -R 999:999 "$work"/var/lib/rabbitmq "$work"/var/log/rabbitmq "$work"/etc/rabbitmq
  # minbase writes no /etc/hosts: the mount point for the one a pod (or the tier-2 harness) provides.
  printf '127.0.0.1 localhost\n' > "$work/etc/hosts"
  rm -rf "$root"
  mv "$work" "$root"
  echo "$upstream" > "$version_file"
  mv "$work.log" "$root.log"
  log "$generation: rabbitmq-server $upstream from $suite ready ($((SECONDS - start)) s, $(du -sm "$root" | cut -f1) MB)"
}

# Debian's python3 (the Celery worker's image, e2e/images.sh): minbase $PYTHON_SUITE with python3,
# nothing else; Celery itself comes from PyPI, pinned, when the image is packed.
build_python() {
  local root=$rootfs_dir/python-$PYTHON_SUITE
  [[ -d $root ]] && return 0
  mkdir -p "$rootfs_dir"
  local work=$rootfs_dir/.build-python-$PYTHON_SUITE start=$SECONDS
  rm -rf "$work" "$work.log"
  log "python: debootstrap $PYTHON_SUITE with python3 (once per machine)"
  nice -n 10 debootstrap --variant=minbase --include=python3 "$PYTHON_SUITE" "$work" "$mirror" > "$work.log" 2>&1 ||
    die "python: debootstrap $PYTHON_SUITE failed; see $work.log"
  rm -rf "$work"/var/cache/apt/archives/*.deb "$work"/var/lib/apt/lists/* "$work"/usr/share/doc \
    "$work"/usr/share/man "$work"/usr/share/locale
  printf '127.0.0.1 localhost\n' > "$work/etc/hosts"
  mv "$work" "$root"
  mv "$work.log" "$root.log"
  log "python: $(chroot "$root" python3 --version) from $PYTHON_SUITE ready ($((SECONDS - start)) s)"
}

if [[ ${1:-} == python ]]; then
  build_python
  exit
fi
generations=("$@")
# shellcheck disable=SC2206
[[ ${#generations[@]} -gt 0 ]] || generations=($RABBITMQ_GENERATIONS)
if [[ ${#generations[@]} -eq 1 ]]; then
  build_generation "${generations[0]}"
  exit
fi
# Downloads and unpacking overlap well: build the generations (and, with all of them, the Python
# rootfs) side by side.
pids=()
build_python &
pids+=($!)
for generation in "${generations[@]}"; do
  build_generation "$generation" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
exit "$failed"
