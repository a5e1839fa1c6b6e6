#!/usr/bin/env bash
# A whole local cluster: a bridge for the pods, the control plane advertised on it, and one real
# node (e2e/node.sh).
#
#   e2e/cluster.sh start DIR   prints `export KUBECONFIG=DIR/admin.kubeconfig`
#   e2e/cluster.sh stop DIR    node first, then the control plane, then the bridge
#
# WARREN_NODE_NAME (bridge, node and cgroup name), WARREN_NODE_SUBNET (the pods' /24, default
# 10.244.2) and WARREN_NODE_PORT (kubelet) let two clusters (`make up` and `make test`) coexist.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export WARREN_NODE_NAME=${WARREN_NODE_NAME:-warren-e2e}
export WARREN_NODE_SUBNET=${WARREN_NODE_SUBNET:-10.244.2}
name=$WARREN_NODE_NAME

cache=${WARREN_CACHE:-$HOME/.cache/warren}
# One node per machine: two kube-proxies would rewrite each other's iptables chains.
active=$cache/node.active

start() {
  if [[ -f $active ]]; then
    local other
    other=$(cat "$active")
    if [[ -f $other/node/pids/kubelet ]] && kill -0 "$(cat "$other/node/pids/kubelet")" 2>/dev/null; then
      echo "a local node is already running from $other (\`make down\` stops the one of \`make up\`)" >&2
      exit 1
    fi
    # A run that was killed before it could stop: remove what it left, by its recorded pids.
    if [[ -d $other ]]; then
      echo "removing what an interrupted run left in $other" >&2
      (dir=$other; stop)
    fi
  fi
  mkdir -p "$dir" "$cache"
  dir=$(cd "$dir" && pwd)
  echo "$dir" > "$active"
  if ! ip link show "$name" > /dev/null 2>&1; then
    ip link add "$name" type bridge
    echo "$name" > "$dir/bridge"
  fi
  ip addr replace "$WARREN_NODE_SUBNET.1/24" dev "$name"
  ip link set "$name" up
  WARREN_ADVERTISE_ADDRESS=$WARREN_NODE_SUBNET.1 "$here/control-plane.sh" start "$dir" > /dev/null
  "$here/node.sh" start "$dir"
  echo "export KUBECONFIG=$dir/admin.kubeconfig"
}

stop() {
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd)
  local bridge=""
  [[ -f $dir/bridge ]] && bridge=$(cat "$dir/bridge")
  "$here/node.sh" stop "$dir"
  "$here/control-plane.sh" stop "$dir"
  [[ -z $bridge ]] || ip link delete "$bridge" 2>/dev/null || true
  [[ ! -f $active || $(cat "$active") != "$dir" ]] || rm -f "$active"
}

case ${1:-} in
  start) dir=${2:?usage: $0 start DIR}; start ;;
  stop) dir=${2:?usage: $0 stop DIR}; stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 1 ;;
esac
