#!/usr/bin/env bash
# A local Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC, audit log) and
# kube-controller-manager (garbage collection, ServiceAccounts, StatefulSets, Jobs).
#
#   e2e/control-plane.sh start DIR   start in DIR (created); prints `export KUBECONFIG=DIR/admin.kubeconfig`
#   e2e/control-plane.sh stop DIR    stop what `start` started there (by pid) and remove DIR
#
# DIR holds pki/, the etcd data, logs/, pids/, admin.kubeconfig and audit.log (one JSON event per
# write request, see audit-policy.yaml). Binaries come from e2e/build.sh's cache.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
k8s_bin=$cache/bin/kubernetes-$KUBERNETES_VERSION
etcd_bin=$cache/bin/etcd-$ETCD_VERSION
service_cidr=10.96.0.0/16
# The first address of the service range: the `kubernetes` Service, which pods use.
service_ip=10.96.0.1
component=control-plane
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"

make_pki() {
  local pki=$1 advertise=$2
  mkdir -p "$pki"
  (
    cd "$pki"
    umask 077
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -subj /CN=warren-e2e-ca -days 30 -out ca.crt 2>/dev/null
    issue() { issue_cert . . "$@"; }
    local sans="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
    sans+=",DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$service_ip,IP:$advertise"
    issue apiserver /CN=kube-apiserver "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=$sans\n"
    issue admin "/O=system:masters/CN=warren-e2e-admin" "$client_auth"
    issue controller-manager /CN=system:kube-controller-manager "$client_auth"
    # How the API server authenticates to kubelets (logs, exec) once e2e/node.sh adds a node.
    issue kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client_auth"
    # Service-account tokens are signed with this key pair (TokenRequest, the SA controller).
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub
  )
}

start() {
  [[ -x $k8s_bin/kube-apiserver && -x $etcd_bin/etcd ]] || "$here/build.sh"
  mkdir -p "$dir"/{pids,logs,etcd}
  dir=$(cd "$dir" && pwd)
  state=$dir
  local advertise=${WARREN_ADVERTISE_ADDRESS:-127.0.0.1}
  make_pki "$dir/pki" "$advertise"
  local pki=$dir/pki etcd_port etcd_peer api_port cm_port
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port); cm_port=$(free_port)

  start_process etcd "$etcd_bin/etcd" --name e2e --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "e2e=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$etcd_port/readyz"

  cp "$here/audit-policy.yaml" "$dir/audit-policy.yaml"
  start_process kube-apiserver "$k8s_bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$advertise" --advertise-address "$advertise" --secure-port "$api_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
    --service-cluster-ip-range "$service_cidr" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/audit.log" --audit-log-format json \
    --kubelet-preferred-address-types InternalIP \
    --kubelet-client-certificate "$pki/kubelet-client.crt" --kubelet-client-key "$pki/kubelet-client.key" \
    --allow-privileged=true --profiling=false --v=1
  local server=https://$advertise:$api_port
  write_kubeconfig "$dir/admin.kubeconfig" "$server" "$pki/ca.crt" warren-e2e-admin "$pki/admin.crt" "$pki/admin.key"
  write_kubeconfig "$dir/controller-manager.kubeconfig" "$server" "$pki/ca.crt" system:kube-controller-manager \
    "$pki/controller-manager.crt" "$pki/controller-manager.key"
  wait_for kube-apiserver 60 curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "$server/readyz"

  start_process kube-controller-manager \
    "$k8s_bin/kube-controller-manager" --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --root-ca-file "$pki/ca.crt" --service-account-private-key-file "$pki/sa.key" \
    --use-service-account-credentials --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$cm_port" --cluster-name warren-e2e --v=1
  # The ServiceAccount controller creating `default` in `default` shows the controllers are running.
  wait_for kube-controller-manager 60 kubectl --kubeconfig "$dir/admin.kubeconfig" \
    get serviceaccount default -n default
  echo "$server" > "$dir/server"
  log "ready in $SECONDS s: $server (Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION)"
  echo "export KUBECONFIG=$dir/admin.kubeconfig"
}

stop() {
  [[ -d $dir ]] || return 0
  state=$dir
  local name
  # Reverse order of start: controllers first, etcd last.
  for name in kube-controller-manager kube-apiserver etcd; do stop_process "$name"; done
  [[ ${WARREN_KEEP_CONTROL_PLANE_DIR:-} == 1 ]] || rm -rf "$dir"
}

case ${1:-} in
  start) dir=${2:?usage: $0 start DIR}; start ;;
  stop) dir=${2:?usage: $0 stop DIR}; stop ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
