#!/usr/bin/env bash
# `make deps`: what the tests need from Debian besides Rust and Go, installed when missing: tools
# for the control plane, the node's runtime (containerd, runc, CNI plugins, iptables, conntrack),
# debootstrap for the RabbitMQ rootfs (RabbitMQ itself runs from those, not from the host).
set -uo pipefail

# command-or-path:package
needed=(
  openssl:openssl curl:curl ss:iproute2 ip:iproute2 unshare:util-linux
  containerd:containerd runc:runc
  /usr/lib/cni/bridge:containernetworking-plugins iptables:iptables conntrack:conntrack
  debootstrap:debootstrap strip:binutils /etc/ssl/certs/ca-certificates.crt:ca-certificates
)

missing_packages() {
  local c missing=""
  for c in "${needed[@]}"; do
    { command -v "${c%%:*}" || test -e "${c%%:*}"; } > /dev/null || missing="$missing ${c##*:}"
  done
  echo "$missing"
}

# Installs PACKAGES without letting their maintainer scripts start services (containerd is started
# by the node scripts, for their run only).
install_without_starting_services() {
  local guard="" status
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
  fi
  # shellcheck disable=SC2086 # one word per package
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $1
  status=$?
  [ -z "$guard" ] || rm -f /usr/sbin/policy-rc.d
  return "$status"
}

missing=$(missing_packages)
if [ -n "$missing" ]; then
  install_without_starting_services "$missing" || exit 1
fi
command -v kubectl > /dev/null || { echo "kubectl is required"; exit 1; }
