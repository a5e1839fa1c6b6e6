#!/usr/bin/env bash
# A whole local cluster on this machine: a bridge standing for the machines' network, the control
# plane advertised on it, the host's parts (e2e/host.sh: scheduler, CoreDNS, Prometheus, a
# kube-proxy for the host's own clients) and N real nodes (e2e/node.sh), each in its own network
# namespace with its own containerd, kubelet, kube-proxy, pod subnet and local volumes.
#
#   e2e/cluster.sh start DIR   prints `export KUBECONFIG=DIR/admin.kubeconfig`
#   e2e/cluster.sh stop DIR    the nodes first, then the host's parts, the control plane, the bridge
#
# WARREN_CLUSTER_NAME (the bridge; nodes are NAME-1...NAME-N), WARREN_CLUSTER_NET (the first two
# octets: the bridge is NET.0.0/24, node N's pods NET.N.0/24), WARREN_NODES (default 3) and
# WARREN_NODE_VOLUMES (local PersistentVolumes per node, default 12).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=${WARREN_CLUSTER_NAME:-warren-e2e}
net=${WARREN_CLUSTER_NET:-10.244}
nodes=${WARREN_NODES:-3}
volumes=${WARREN_NODE_VOLUMES:-12}
component=cluster
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"
[[ $nodes =~ ^[1-9]$ ]] || die "WARREN_NODES must be 1 to 9: $nodes"

cache=${WARREN_CACHE:-$HOME/.cache/warren}
# One local cluster per machine: two host kube-proxies would rewrite each other's iptables chains.
active=$cache/cluster.active

running() { # DIR: whether a cluster's control plane still runs there
  [[ -f $1/pids/kube-apiserver ]] && kill -0 "$(cat "$1/pids/kube-apiserver")" 2>/dev/null
}

start() {
  if [[ -f $active ]]; then
    local other
    other=$(cat "$active")
    if running "$other"; then
      die "a local cluster is already running from $other (\`make down\` stops the one of \`make up\`)"
    fi
    # A run that was killed before it could stop: remove what it left, by its recorded pids.
    if [[ -d $other ]]; then
      log "removing what an interrupted run left in $other"
      (dir=$other; stop)
    fi
  fi
  mkdir -p "$dir" "$cache"
  dir=$(cd "$dir" && pwd)
  echo "$dir" > "$active"
  cat > "$dir/cluster.env" <<ENV
CLUSTER_NAME=$name
CLUSTER_NET=$net
CLUSTER_NODES=$nodes
CLUSTER_VOLUMES=$volumes
ENV
  ip link show "$name" > /dev/null 2>&1 && die "a link named $name exists: is another cluster running?"
  ip link add "$name" type bridge
  ip addr add "$net.0.1/24" dev "$name"
  ip link set "$name" up
  WARREN_ADVERTISE_ADDRESS=$net.0.1 "$here/control-plane.sh" start "$dir" > /dev/null
  "$here/host.sh" start "$dir"
  "$here/images.sh" build
  # The nodes start side by side (most of a node's start is importing the images into its containerd).
  local i pids=() failed=0
  for i in $(seq 1 "$nodes"); do
    "$here/node.sh" start "$dir" "$i" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || failed=1; done
  ((failed == 0)) || die "a node did not start; see $dir/nodes/*/logs"
  "$here/host.sh" wait "$dir"
  log "cluster $name ready in $SECONDS s: $nodes nodes"
  echo "export KUBECONFIG=$dir/admin.kubeconfig"
}

stop() {
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd)
  if [[ -f $dir/cluster.env ]]; then
    # shellcheck source=/dev/null
    source "$dir/cluster.env"
    local i
    for i in $(seq 1 "$CLUSTER_NODES"); do "$here/node.sh" stop "$dir" "$i" || true; done
    "$here/host.sh" stop "$dir" || true
    "$here/control-plane.sh" stop "$dir"
    ip link delete "$CLUSTER_NAME" 2>/dev/null || true
  else
    "$here/control-plane.sh" stop "$dir"
  fi
  [[ ! -f $active || $(cat "$active") != "$dir" ]] || rm -f "$active"
}

case ${1:-} in
  start) dir=${2:?usage: $0 start DIR}; start ;;
  stop) dir=${2:?usage: $0 stop DIR}; stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 1 ;;
esac
