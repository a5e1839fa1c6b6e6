#!/usr/bin/env bash
# One real Kubernetes node of the local cluster, in its own network namespace, as a machine of its
# own: containerd + runc + CNI bridge (Debian's packages), kubelet and kube-proxy (built from the
# pinned k8s.io/kubernetes), the images of e2e/images.sh imported into its containerd, and local
# PersistentVolumes pinned to it, as on node-local disks.
#
#   e2e/node.sh start DIR N       node N (1, 2, ...) of the cluster in DIR (e2e/cluster.sh made DIR/cluster.env)
#   e2e/node.sh stop DIR N        remove every pod's containers and network, stop by pid, unmount, remove
#   e2e/node.sh power-off DIR N   a machine lost: its link cut, then its kubelet, kube-proxy, containerd,
#                                 shims and every container killed at once (SIGKILL, no preStop)
#   e2e/node.sh power-on DIR N    the machine back: link up, containerd, kube-proxy and kubelet started
#                                 again on the same disks (its pods come back with their volumes)
#
# Node N is named NAME-N, runs in the network namespace NAME-N, linked to the host's bridge NAME by a
# veth pair (host end NAME-N) at NET.0.(10+N); its pods get NET.N.0/24 on its own bridge cni0. Every
# node routes each other node's pod subnet to that node over the bridge, so cutting one link cuts
# one machine off. Its processes enter only the network namespace (nsenter --net): they share the
# host's mounts, as the kubelet and containerd must share theirs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
k8s_bin=$cache/bin/kubernetes-$KUBERNETES_VERSION
component=node
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"

setup() { # DIR N: the node's names and addresses
  dir=$(cd "$1" && pwd)
  index=$2
  [[ $index =~ ^[0-9]+$ ]] || die "node index must be a number: $index"
  [[ -f $dir/cluster.env ]] || die "no cluster in $dir (e2e/cluster.sh makes it)"
  # shellcheck source=/dev/null
  source "$dir/cluster.env"
  name=$CLUSTER_NAME-$index
  component=$name
  netns=$name
  address=$CLUSTER_NET.0.$((10 + index))
  gateway=$CLUSTER_NET.0.1
  subnet=$CLUSTER_NET.$index
  node=$dir/nodes/$index
  state=$node
  pki=$dir/pki
  server=https://$gateway:$(sed 's/.*://' "$dir/server")
  socket=$node/containerd.sock
}

# A command in the node's network namespace only (nsenter execs it: the recorded pid is its own).
in_node() { nsenter --net="/run/netns/$netns" -- "$@"; }

client_cert() { # stem subject: a client certificate for the node's part STEM, and its kubeconfig
  issue_cert "$pki" "$node/pki" "$1" "$2" "$client_auth"
  write_kubeconfig "$node/$1.kubeconfig" "$server" "$pki/ca.crt" "$1" "$node/pki/$1.crt" "$node/pki/$1.key"
}

admin() { kubectl --kubeconfig "$dir/admin.kubeconfig" "$@"; }

# The machine's network: its namespace, its link to the host's bridge, its pods' bridge address
# range, and a route to every other node's pods.
make_network() {
  ip netns add "$netns"
  ip link add "$name" type veth peer name eth0 netns "$netns"
  ip link set "$name" master "$CLUSTER_NAME" up
  ip -n "$netns" link set lo up
  ip -n "$netns" addr add "$address/24" dev eth0
  ip -n "$netns" link set eth0 up
  ip -n "$netns" route add default via "$gateway"
  local other
  for other in $(seq 1 "$CLUSTER_NODES"); do
    [[ $other == "$index" ]] || ip -n "$netns" route add "$CLUSTER_NET.$other.0/24" via "$CLUSTER_NET.0.$((10 + other))"
  done
  ip route replace "$subnet.0/24" via "$address"
  # Pods reach each other and the Services through this namespace's own routing and iptables.
  in_node sysctl -qw net.ipv4.ip_forward=1
  [[ -d /proc/sys/net/bridge ]] || modprobe br_netfilter
  in_node sysctl -qw net.bridge.bridge-nf-call-iptables=1
}

write_containerd_config() {
  mkdir -p "$node/containerd"/{root,state} "$node/cni/net.d" "$node/cni/ipam"
  cat > "$node/cni/net.d/10-pods.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$node/cni/ipam",
              "ranges": [[{"subnet": "$subnet.0/24", "gateway": "$subnet.1"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "loopback"}
  ]
}
CNI
  cat > "$node/containerd/config.toml" <<TOML
version = 2
root = "$node/containerd/root"
state = "$node/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.restart"]
[grpc]
  address = "$socket"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  # Lowering a process's oom_score_adj is refused on this machine (no CAP_SYS_RESOURCE), and the
  # sandbox asks for -998: clamp to what containerd itself has, as for rootless containerd.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node/cni/net.d"
TOML
}

start_containerd() {
  start_process containerd nsenter --net="/run/netns/$netns" -- containerd --config "$node/containerd/config.toml"
  wait_for containerd 30 ctr --address "$socket" version
}

write_kubelet_config() {
  client_cert kubelet "/O=system:nodes/CN=system:node:$name"
  # Pods get the cluster DNS and search path; no host resolver is handed down (no upstream here).
  : > "$node/resolv.conf"
  cat > "$node/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $address
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$name
containerRuntimeEndpoint: unix://$socket
clusterDNS: [$gateway]
clusterDomain: cluster.local
resolvConf: $node/resolv.conf
# The pods' logs under the node's own directory: a kubelet removes the log directories of pods it
# does not run, so nodes sharing /var/log/pods would remove each other's.
podLogsDir: $node/pod-logs
failSwapOn: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 40
YAML
}

start_kubelet() {
  # The cgroup parent under every controller hierarchy (cgroup v1, cgroupfs driver).
  local c
  for c in /sys/fs/cgroup/*/; do [[ -d $c ]] && mkdir -p "$c$name"; done
  start_process kubelet nsenter --net="/run/netns/$netns" -- "$k8s_bin/kubelet" --config "$node/kubelet.yaml" \
    --kubeconfig "$node/kubelet.kubeconfig" --root-dir "$node/kubelet" --cert-dir "$node/pki/kubelet-serving" \
    --hostname-override "$name" --node-ip "$address" --v=1
}

write_proxy_config() {
  client_cert kube-proxy /CN=system:kube-proxy
  cat > "$node/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $node/kube-proxy.kubeconfig}
hostnameOverride: $name
mode: iptables
clusterCIDR: $CLUSTER_NET.0.0/16
bindAddress: $address
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}

start_proxy() {
  start_process kube-proxy nsenter --net="/run/netns/$netns" -- "$k8s_bin/kube-proxy" --config "$node/kube-proxy.yaml" --v=1
}

make_volumes() {
  local i
  for i in $(seq -w 1 "$CLUSTER_VOLUMES"); do
    mkdir -p "$node/volumes/pv-$i"
    cat <<YAML
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: $name-pv-$i}
spec:
  capacity: {storage: 20Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local
  local: {path: $node/volumes/pv-$i}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$name]}]
YAML
  done | admin apply -f - > /dev/null
}

start() {
  [[ -x $k8s_bin/kubelet ]] || "$here/build.sh" node
  [[ ! -e /run/netns/$netns ]] || die "network namespace $netns exists: stop the cluster that made it first"
  mkdir -p "$node"/{pids,logs,pki,pod-logs}
  make_network
  write_containerd_config
  start_containerd
  "$here/images.sh" import "$socket"
  write_proxy_config
  start_proxy
  write_kubelet_config
  start_kubelet
  wait_for "node $name" 90 admin wait "node/$name" --for=condition=Ready --timeout=2s
  make_volumes
  log "node $name ready in $SECONDS s at $address, pods $subnet.0/24"
}

# Every process the node runs: the ones started here (by their recorded pids), every process in
# the node's network namespace (containerd's shims, one started as containerd stopped included),
# and whatever runs in the node's cgroup tree (its containers, in their pods' namespaces).
kill_machine() {
  local what pid c
  for what in kubelet kube-proxy containerd; do
    [[ -f $node/pids/$what ]] && kill -KILL "$(cat "$node/pids/$what")" 2>/dev/null || true
  done
  if [[ -e /run/netns/$netns ]]; then
    for pid in $(ip netns pids "$netns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  for c in /sys/fs/cgroup/*/"$name"; do
    [[ -d $c ]] || continue
    for pid in $(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  for what in kubelet kube-proxy containerd; do rm -f "$node/pids/$what"; done
}

power_off() {
  ip link set "$name" down
  kill_machine
  log "node $name powered off: link down, its processes killed"
}

power_on() {
  ip link set "$name" up
  start_containerd
  start_proxy
  start_kubelet
  log "node $name powered on"
}

stop() {
  [[ -d $node ]] || { [[ ! -e /run/netns/$netns ]] || ip netns delete "$netns"; return 0; }
  stop_process kubelet
  stop_process kube-proxy
  # Every container, then every sandbox, through containerd: its shims exit with their tasks.
  if [[ -f $node/pids/containerd ]] && kill -0 "$(cat "$node/pids/containerd")" 2>/dev/null; then
    local id
    for id in $(ctr --address "$socket" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$socket" -n k8s.io tasks kill -s SIGKILL "$id" > /dev/null 2>&1 || true
    done
    for id in $(ctr --address "$socket" -n k8s.io tasks ls -q 2>/dev/null); do
      for _ in $(seq 50); do
        ctr --address "$socket" -n k8s.io tasks delete "$id" > /dev/null 2>&1 && break
        sleep 0.1
      done
    done
  fi
  stop_process containerd
  # Shims and containers that outlived containerd (a powered-off node's, say).
  kill_machine
  # The pods' network namespaces (containerd names them cni-*, recorded in its metadata).
  local ns
  for ns in $(grep -rahos '/var/run/netns/cni-[0-9a-f-]*' "$node/containerd/root" 2>/dev/null | sort -u); do
    [[ -e $ns ]] || continue
    ip netns delete "$(basename "$ns")" 2>/dev/null || { umount "$ns" 2>/dev/null; rm -f "$ns"; }
  done
  # Mounts under the node (overlay roots, shm, secret tmpfs), deepest first.
  local m
  for m in $(findmnt -rn -o TARGET | grep -F "$node/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  # The cgroup parent, deepest first (empty once every container is gone).
  local c
  for c in /sys/fs/cgroup/*/"$name"; do
    [[ -d $c ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  # The namespace takes the node's veth pair, its iptables rules and its routes with it.
  ip route del "$subnet.0/24" 2>/dev/null || true
  [[ ! -e /run/netns/$netns ]] || ip netns delete "$netns"
  rm -rf "$node"
}

command=${1:-}
[[ $# == 3 ]] || die "usage: $0 start|stop|power-off|power-on DIR N"
setup "$2" "$3"
case $command in
  start) start ;;
  stop) stop ;;
  power-off) power_off ;;
  power-on) power_on ;;
  *) die "usage: $0 start|stop|power-off|power-on DIR N" ;;
esac
