#!/usr/bin/env bash
# The local cluster's parts that run on the host, beside the control plane and outside every node:
# kube-scheduler, CoreDNS (cluster DNS, no upstream), a kube-proxy of the host's own (so this
# machine reaches Services' ClusterIPs, as a client inside the cluster's network does), the
# `local` StorageClass of the nodes' PersistentVolumes, and Prometheus scraping the pods that carry
# the prometheus.io/* annotations (its URL in DIR/host/prometheus.url).
#
#   e2e/host.sh start DIR   DIR holds a running control plane and cluster.env (e2e/cluster.sh)
#   e2e/host.sh stop DIR    stop by pid, remove the host kube-proxy's rules and DIR/host
#
# WARREN_PROMETHEUS_BUILD=PID (make test's tier 4): Prometheus' binary is still being built by
# process PID, beside the cluster's start and the first tests; Prometheus starts once it is there
# (DIR/host/prometheus.url appears then), or DIR/host/prometheus.failed says the build ended
# without it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
k8s_bin=$cache/bin/kubernetes-$KUBERNETES_VERSION
coredns_bin=$cache/bin/coredns-$COREDNS_VERSION/coredns
prometheus_bin=$cache/bin/prometheus-$PROMETHEUS_VERSION/prometheus
component=host
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"

setup() {
  dir=$(cd "$1" && pwd)
  [[ -f $dir/cluster.env ]] || die "no cluster in $dir (e2e/cluster.sh makes it)"
  # shellcheck source=/dev/null
  source "$dir/cluster.env"
  host=$dir/host
  state=$host
  pki=$dir/pki
  gateway=$CLUSTER_NET.0.1
  server=https://$gateway:$(sed 's/.*://' "$dir/server")
}

admin() { kubectl --kubeconfig "$dir/admin.kubeconfig" "$@"; }

client_cert() { # stem subject: a client certificate for the host's part STEM, and its kubeconfig
  issue_cert "$pki" "$host/pki" "$1" "$2" "$client_auth"
  write_kubeconfig "$host/$1.kubeconfig" "$server" "$pki/ca.crt" "$1" "$host/pki/$1.crt" "$host/pki/$1.key"
}

# host_client stem rules: a host process's own API user warren-e2e:STEM (its kubeconfig
# $host/STEM.kubeconfig), allowed only the ClusterRole RULES (YAML list items).
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

start_scheduler() {
  client_cert scheduler /CN=system:kube-scheduler
  start_process kube-scheduler "$k8s_bin/kube-scheduler" --kubeconfig "$host/scheduler.kubeconfig" \
    --authentication-kubeconfig "$host/scheduler.kubeconfig" --authorization-kubeconfig "$host/scheduler.kubeconfig" \
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
  cat > "$host/Corefile" <<CORE
.:53 {
    bind $gateway
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $host/coredns.kubeconfig warren-e2e
        pods insecure
        ttl 0
    }
}
CORE
  start_process coredns "$coredns_bin" -conf "$host/Corefile"
}

# The host is no node: its kube-proxy only turns ClusterIPs into pod addresses for the host's own
# connections (the tests', a user's kubectl-less client); the pods are reached by their nodes' routes.
start_proxy() {
  client_cert kube-proxy /CN=system:kube-proxy
  cat > "$host/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $host/kube-proxy.kubeconfig}
hostnameOverride: $CLUSTER_NAME-host
mode: iptables
clusterCIDR: $CLUSTER_NET.0.0/16
bindAddress: $gateway
healthzBindAddress: 127.0.0.1:$(free_port)
metricsBindAddress: 127.0.0.1:$(free_port)
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  start_process kube-proxy "$k8s_bin/kube-proxy" --config "$host/kube-proxy.yaml" --v=1
}

# Prometheus on the host, as a user runs one without the Prometheus operator: Kubernetes service
# discovery of pods through the API server (its own least-privilege user), the kubernetes-pods job
# of Prometheus' example configuration (prometheus.io/scrape, /port, /path), scraped every 5 s.
start_prometheus() {
  host_client prometheus '
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]'
  cat > "$host/prometheus.yml" <<PROM
global: {scrape_interval: 5s, scrape_timeout: 5s, evaluation_interval: 5s}
scrape_configs:
- job_name: kubernetes-pods
  kubernetes_sd_configs:
  - {role: pod, kubeconfig_file: $host/prometheus.kubeconfig}
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
  mkdir -p "$host/prometheus-data"
  start_process prometheus "$prometheus_bin" --config.file "$host/prometheus.yml" \
    --storage.tsdb.path "$host/prometheus-data" --storage.tsdb.retention.time 1d \
    --web.listen-address "127.0.0.1:$port"
  echo "http://127.0.0.1:$port" > "$host/prometheus.url"
}

# prometheus_later BUILD-PID: waits for the binary the build makes, then starts Prometheus.
prometheus_later() {
  until [[ -x $prometheus_bin ]]; do
    if ! kill -0 "$1" 2> /dev/null && [[ ! -x $prometheus_bin ]]; then
      echo "the Prometheus build (pid $1) ended without $prometheus_bin" | tee "$host/prometheus.failed" >&2
      return 1
    fi
    sleep 2
  done
  start_prometheus
}

storage_class() {
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
}

start() {
  local later=${WARREN_PROMETHEUS_BUILD:-}
  [[ -x $k8s_bin/kube-scheduler && -x $coredns_bin ]] || "$here/build.sh" node coredns
  [[ -n $later || -x $prometheus_bin ]] || "$here/build.sh" prometheus
  mkdir -p "$host"/{pids,logs,pki}
  storage_class
  start_scheduler
  start_coredns
  start_proxy
  if [[ -n $later && ! -x $prometheus_bin ]]; then
    start_process prometheus-later prometheus_later "$later"
  else
    start_prometheus
  fi
}

# After the nodes are up: Prometheus answering (when it started with them).
wait_ready() {
  [[ -f $host/prometheus.url ]] || return 0
  wait_for "Prometheus ready" 60 curl -fsS "$(cat "$host/prometheus.url")/-/ready"
}

stop() {
  [[ -d $host ]] || return 0
  stop_process kube-proxy
  stop_process coredns
  # The waiter first: it starts (and records) Prometheus, which is stopped next.
  stop_process prometheus-later
  stop_process prometheus
  stop_process kube-scheduler
  # kube-proxy's rules, its own way (the nodes' went with their network namespaces).
  [[ ! -f $host/kube-proxy.yaml ]] || "$k8s_bin/kube-proxy" --cleanup --config "$host/kube-proxy.yaml" \
    > "$host/logs/kube-proxy-cleanup.log" 2>&1 || true
  rm -rf "$host"
}

[[ $# == 2 ]] || die "usage: $0 start|wait|stop DIR"
setup "$2"
case $1 in
  start) start ;;
  wait) wait_ready ;;
  stop) stop ;;
  *) die "usage: $0 start|wait|stop DIR" ;;
esac
