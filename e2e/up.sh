#!/usr/bin/env bash
# `make up`: a local cluster in $WARREN_CACHE/up (control plane and three real nodes, each in its own
# network namespace, e2e/cluster.sh; WARREN_NODES=1 for one), the chart installed with the locally
# built warren image, and examples/basic.yaml running as three RabbitMQ pods, one per node, watched by
# a Prometheus (e2e/host.sh starts it); the warren binary linked as kubectl-warren for `kubectl
# warren`. `make down` stops it all.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
helm=$cache/bin/helm-$HELM_VERSION/helm
dir=$cache/up
export WARREN_CLUSTER_NAME=warren-up WARREN_CLUSTER_NET=10.245 WARREN_NODES=${WARREN_NODES:-3}
component=up
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"
step() { log "$@"; }

[[ -d $dir ]] && "$here/down.sh"
"$here/build.sh" etcd helm kubernetes node coredns prometheus
"$here/rootfs.sh"
export_rabbitmq_images
version=${RABBITMQ_IMAGE##*:}; version=${version%-management}
step "cluster: control plane and $WARREN_NODES nodes"
"$here/cluster.sh" start "$dir" > /dev/null
export KUBECONFIG=$dir/admin.kubeconfig

step "helm install charts/warren (image $WARREN_IMAGE)"
"$helm" install warren "$repo/charts/warren" -n warren-system --create-namespace \
  --set image.repository="${WARREN_IMAGE%:*}" --set image.tag="${WARREN_IMAGE##*:}" --set logFormat=text \
  --set 'watchNamespaces={default}' --wait --timeout 120s > /dev/null

# examples/basic.yaml as is, but on the RabbitMQ image built here and with requests that fit three
# pods on this machine's two cores (the example's defaults ask for one core each).
step "kubectl apply examples/basic.yaml (image $RABBITMQ_IMAGE)"
{
  cat "$repo/examples/basic.yaml"
  cat <<YAML
  image: $RABBITMQ_IMAGE
  resources:
    requests: {cpu: 200m, memory: 512Mi}
    limits: {memory: 1Gi}
YAML
} | kubectl apply -n default -f - > /dev/null
step "waiting for RabbitCluster demo to be Ready"
kubectl wait rabbitcluster/demo -n default --for=condition=Ready --timeout=300s > /dev/null
kubectl get nodes
kubectl get rabbitcluster,pods,pvc -n default -o wide
ip=$(kubectl get service demo -n default -o jsonpath='{.spec.clusterIP}')
prometheus=$(cat "$dir/host/prometheus.url")
# kubectl runs any kubectl-<name> on PATH as `kubectl <name>`: the warren binary under that name.
plugins=$cache/kubectl-plugins
mkdir -p "$plugins"
ln -sfn "${CARGO_TARGET_DIR:-$repo/target}/debug/warren" "$plugins/kubectl-warren"
PATH=$plugins:$PATH kubectl warren status demo -n default
cat <<MSG

Warren is up: Kubernetes $KUBERNETES_VERSION (control plane $(cat "$dir/server"), nodes warren-up-1..$WARREN_NODES,
each in its own network namespace: e2e/node.sh power-off $dir N cuts node N off and kills it),
the operator running in the cluster as two replicas, one leading (the Lease holder: kubectl get lease
-n warren-system warren; logs: kubectl logs -n warren-system -l app.kubernetes.io/name=warren --prefix),
and RabbitCluster
demo: three RabbitMQ $version pods, one cluster, Ready (quorum queues by default; the other
generations' images are imported too: $RABBITMQ_IMAGE_3_10, $RABBITMQ_IMAGE_4_0).

From this machine, through the client Service (user and password: kubectl warren secrets demo):
  AMQP        amqp://<user>:<password>@$ip:5672/%2F
  management  http://$ip:15672/
  Prometheus  $prometheus   (the pods' prometheus.io annotations; try the query
              rabbitmq_queue_messages_ready or warren_cluster_replicas_ready)
Stop everything with: make down

export PATH=$plugins:\$PATH   # kubectl warren status demo | secrets demo | pause demo | resume demo
export KUBECONFIG=$dir/admin.kubeconfig
MSG
