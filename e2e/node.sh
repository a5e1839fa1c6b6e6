#!/usr/bin/env bash
# A real Kubernetes node on this machine, joined to the control plane of e2e/control-plane.sh:
# containerd + runc + CNI bridge (Debian's packages), kubelet and kube-proxy (built from the pinned
# k8s.io/kubernetes), kube-scheduler, CoreDNS (cluster DNS, no upstream), local PersistentVolumes,
# the images of e2e/images.sh imported into containerd, and Prometheus scraping the pods that carry
# the prometheus.io/* annotations (its URL in DIR/node/prometheus.url).
#
#   e2e/node.sh start DIR   DIR is a running control plane's directory; the node lives in DIR/node
#   e2e/node.sh stop DIR    remove every pod's containers and network, stop by pid, unmount, remove
#
# The network is given by the environment (e2e/cluster.sh sets it): WARREN_NODE_NAME names the node,
# its bridge and its cgroup parent; WARREN_NODE_SUBNET is the pods' /24 (its .1 is the bridge, the
# API server's address and the cluster DNS); WARREN_NODE_PORT is the kubelet's port.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
k8s_bin=$cache/bin/kubernetes-$KUBERNETES_VERSION
coredns_bin=$cache/bin/coredns-$COREDNS_VERSION/coredns
prometheus_bin=$cache/bin/prometheus-$PROMETHEUS_VERSION/prometheus
name=${WARREN_NODE_NAME:-warren-e2e}
subnet=${WARREN_NODE_SUBNET:-10.244.2}
kubelet_port=${WARREN_NODE_PORT:-10250}
gateway=$subnet.1
volumes=${WARREN_NODE_VOLUMES:-24}

component=node
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"

client_cert() { # stem subject: a client certificate for the node's part STEM, and its kubeconfig
  issue_cert "$pki" "$node/pki" "$1" "$2" "$client_auth"
  write_kubeconfig "$node/$1.kubeconfig" "$server" "$pki/ca.crt" "$1" "$node/pki/$1.crt" "$node/pki/$1.key"
}

admin() { kubectl --kubeconfig "$dir/admin.kubeconfig" "$@"; }

# host_client stem rules: a host process's own API user warren-e2e:STEM (its kubeconfig
# $node/STEM.kubeconfig), allowed only the ClusterRole RULES (YAML list items).
host_client() {
  local user=warren-e2e:$1
  client_cert "$1" "/CN=$user"
  admin apply -f - > /dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "$user"}
rules:$2
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "$user"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "$user"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "$user"}]
YAML
}

start_containerd() {
  mkdir -p "$node/containerd"/{root,state} "$node/cni/net.d" "$node/cni/ipam"
  cat > "$node/cni/net.d/10-$name.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "$name",
  "plugins": [
    {"type": "bridge", "bridge": "$name", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$node/cni/ipam",
              "ranges": [[{"subnet": "$subnet.0/24", "gateway": "$gateway"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
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
  address = "$node/containerd.sock"
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
  start_process containerd containerd --config "$node/containerd/config.toml"
  wait_for containerd 30 ctr --address "$node/containerd.sock" version
}

start_kubelet() {
  client_cert kubelet "/O=system:nodes/CN=system:node:$name"
  # Pods get the cluster DNS and search path; no host resolver is handed down (no upstream here).
  : > "$node/resolv.conf"
  local healthz
  healthz=$(free_port)
  cat > "$node/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $gateway
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$name
containerRuntimeEndpoint: unix://$node/containerd.sock
clusterDNS: [$gateway]
clusterDomain: cluster.local
resolvConf: $node/resolv.conf
failSwapOn: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 40
YAML
  # The cgroup parent under every controller hierarchy (cgroup v1, cgroupfs driver).
  local c
  for c in /sys/fs/cgroup/*/; do [[ -d $c ]] && mkdir -p "$c$name"; done
  start_process kubelet "$k8s_bin/kubelet" --config "$node/kubelet.yaml" --kubeconfig "$node/kubelet.kubeconfig" \
    --root-dir "$node/kubelet" --cert-dir "$node/pki/kubelet-serving" --hostname-override "$name" \
    --node-ip "$gateway" --v=1
  wait_for "node $name" 90 admin wait "node/$name" --for=condition=Ready --timeout=2s
}

start_proxy() {
  client_cert kube-proxy /CN=system:kube-proxy
  cat > "$node/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $node/kube-proxy.kubeconfig}
hostnameOverride: $name
mode: iptables
clusterCIDR: $subnet.0/24
bindAddress: $gateway
healthzBindAddress: 127.0.0.1:$(free_port)
metricsBindAddress: 127.0.0.1:$(free_port)
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  start_process kube-proxy "$k8s_bin/kube-proxy" --config "$node/kube-proxy.yaml" --v=1
}

start_scheduler() {
  client_cert scheduler /CN=system:kube-scheduler
  start_process kube-scheduler "$k8s_bin/kube-scheduler" --kubeconfig "$node/scheduler.kubeconfig" \
    --authentication-kubeconfig "$node/scheduler.kubeconfig" --authorization-kubeconfig "$node/scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$(free_port)" --v=1
}

start_coredns() {
  host_client coredns '
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]'
  # Cluster names only: nothing is forwarded upstream (there is no upstream). No cache, so a
  # restarted pod's new address is seen at once, as the headless Service publishes it.
  cat > "$node/Corefile" <<CORE
.:53 {
    bind $gateway
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $node/coredns.kubeconfig warren-e2e
        pods insecure
        ttl 0
    }
}
CORE
  start_process coredns "$coredns_bin" -conf "$node/Corefile"
}

# Prometheus on the host, as a user runs one without the Prometheus operator: Kubernetes service
# discovery of pods through the API server (its own least-privilege user), the kubernetes-pods job
# of Prometheus' example configuration (prometheus.io/scrape, /port, /path), scraped every 5 s.
start_prometheus() {
  host_client prometheus '
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]'
  cat > "$node/prometheus.yml" <<PROM
global: {scrape_interval: 5s, scrape_timeout: 5s, evaluation_interval: 5s}
scrape_configs:
- job_name: kubernetes-pods
  kubernetes_sd_configs:
  - {role: pod, kubeconfig_file: $node/prometheus.kubeconfig}
  relabel_configs:
  - {source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape], action: keep, regex: "true"}
  - {source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path], target_label: __metrics_path__, regex: (.+)}
  - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
    regex: '([^:]+)(?::\d+)?;(\d+)'
    replacement: '\$1:\$2'
    target_label: __address__
  - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
  - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
PROM
  local port
  port=$(free_port)
  mkdir -p "$node/prometheus-data"
  start_process prometheus "$prometheus_bin" --config.file "$node/prometheus.yml" \
    --storage.tsdb.path "$node/prometheus-data" --storage.tsdb.retention.time 1d \
    --web.listen-address "127.0.0.1:$port"
  echo "http://127.0.0.1:$port" > "$node/prometheus.url"
  wait_for "Prometheus ready" 60 curl -fsS "http://127.0.0.1:$port/-/ready"
}

make_volumes() {
  admin apply -f - > /dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
YAML
  local i
  for i in $(seq -w 1 "$volumes"); do
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
  [[ -f $dir/server && -f $dir/pki/ca.key ]] || die "no control plane in $dir"
  [[ -x $k8s_bin/kubelet && -x $coredns_bin && -x $prometheus_bin ]] || "$here/build.sh" node coredns prometheus
  ip -4 addr show dev "$name" 2>/dev/null | grep -q "inet $gateway/" ||
    die "bridge $name with $gateway/24 is missing (e2e/cluster.sh creates it)"
  node=$dir/node
  state=$node
  pki=$dir/pki
  server=https://$gateway:$(sed 's/.*://' "$dir/server")
  mkdir -p "$node"/{pids,logs,pki}
  echo "$name" > "$node/name"
  # Service traffic between pods on the bridge goes through iptables (kube-proxy) only with this.
  [[ -d /proc/sys/net/bridge ]] || modprobe br_netfilter
  # Restored by stop.
  sysctl -n net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables | paste -sd' ' > "$node/sysctl.saved"
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
  start_containerd
  "$here/images.sh" import "$node/containerd.sock"
  start_scheduler
  start_coredns
  start_proxy
  start_kubelet
  make_volumes
  start_prometheus
  log "node $name ready in $SECONDS s (kubelet $KUBERNETES_VERSION, containerd $(containerd --version | awk '{print $3}'))"
}

stop() {
  node=$dir/node
  state=$node
  [[ -d $node ]] || return 0
  [[ -f $node/name ]] && name=$(cat "$node/name")
  local socket=$node/containerd.sock
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
  # The pods' network namespaces (containerd names them cni-*, recorded in its metadata); their
  # veth ends go with them.
  local ns
  for ns in $(grep -rahos '/var/run/netns/cni-[0-9a-f-]*' "$node/containerd/root" 2>/dev/null | sort -u); do
    [[ -e $ns ]] || continue
    ip netns delete "$(basename "$ns")" 2>/dev/null || { umount "$ns" 2>/dev/null; rm -f "$ns"; }
  done
  stop_process containerd
  # Shims whose tasks could not be deleted: by the pid containerd recorded for each.
  local pidfile
  for pidfile in $(find "$node/containerd/state" -name shim.pid 2>/dev/null); do
    kill -KILL "$(cat "$pidfile")" 2>/dev/null || true
  done
  stop_process coredns
  stop_process prometheus
  stop_process kube-scheduler
  # kube-proxy's rules, its own way; then the chains the kubelet made (iptables and ip6tables).
  [[ ! -f $node/kube-proxy.yaml ]] || "$k8s_bin/kube-proxy" --cleanup --config "$node/kube-proxy.yaml" \
    > "$node/logs/kube-proxy-cleanup.log" 2>&1 || true
  local cmd table chain
  for cmd in iptables ip6tables; do
    for table in filter nat mangle; do
      "$cmd" -t "$table" -D INPUT -j KUBE-FIREWALL 2>/dev/null || true
      "$cmd" -t "$table" -D OUTPUT -j KUBE-FIREWALL 2>/dev/null || true
      for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        "$cmd" -t "$table" -F "$chain" 2>/dev/null && "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
  # Mounts under the node (overlay roots, shm, secret tmpfs), deepest first.
  local m
  for m in $(findmnt -rn -o TARGET | grep -F "$node/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  # The cgroup parent, deepest first (empty once every container is gone).
  local c
  for c in /sys/fs/cgroup/*/"$name"; do
    [[ -d $c ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  if [[ -f $node/sysctl.saved ]]; then
    local forward bridge_nf
    read -r forward bridge_nf < "$node/sysctl.saved"
    sysctl -qw "net.ipv4.ip_forward=$forward" "net.bridge.bridge-nf-call-iptables=$bridge_nf" || true
  fi
  rm -rf "$node"
}

case ${1:-} in
  start) dir=$(cd "${2:?usage: $0 start DIR}" && pwd); start ;;
  stop) dir=${2:?usage: $0 stop DIR}; stop ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
