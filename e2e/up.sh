#!/usr/bin/env bash
# `make up`: a local control plane in $WARREN_CACHE/up, the chart installed, the operator running
# here with the chart's ServiceAccount token, and examples/basic.yaml applied. `make down` stops it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
helm=$cache/bin/helm-$HELM_VERSION/helm
warren=${CARGO_TARGET_DIR:-$cache/target}/debug/warren
dir=$cache/up

[[ -d $dir ]] && "$here/down.sh"
"$here/control-plane.sh" start "$dir" > /dev/null
export KUBECONFIG=$dir/admin.kubeconfig

"$helm" install warren "$repo/charts/warren" -n warren-system --create-namespace > /dev/null
token=$(kubectl create token warren -n warren-system --duration 24h)
cat > "$dir/operator.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: warren-up
  cluster: {server: $(cat "$dir/server"), certificate-authority: $dir/pki/ca.crt}
users:
- name: warren
  user: {token: $token}
contexts:
- name: warren-up
  context: {cluster: warren-up, user: warren}
current-context: warren-up
KC
chmod 600 "$dir/operator.kubeconfig"
port=$((20000 + RANDOM % 20000))
KUBECONFIG=$dir/operator.kubeconfig WARREN_LISTEN=127.0.0.1:$port \
  "$warren" run > "$dir/logs/warren.log" 2>&1 &
echo $! > "$dir/pids/warren"

kubectl apply -f "$repo/examples/basic.yaml" > /dev/null
kubectl wait rabbitcluster/demo --for=condition=ReconcileSuccess --timeout=60s > /dev/null
kubectl get rabbitcluster demo -n default
echo
kubectl get statefulset,service,secret,configmap,poddisruptionbudget -n default -l app.kubernetes.io/instance=demo
cat <<MSG

Warren is up: Kubernetes $KUBERNETES_VERSION on $(cat "$dir/server"), the operator (pid $(cat "$dir/pids/warren"))
running with the chart's ServiceAccount, RabbitCluster demo applied (its pods stay Pending until a
node runs them). Operator log: $dir/logs/warren.log   metrics: http://127.0.0.1:$port/metrics
Stop everything with: make down

export KUBECONFIG=$dir/admin.kubeconfig
MSG
