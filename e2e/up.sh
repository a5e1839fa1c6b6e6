#!/usr/bin/env bash
# `make up`: a local cluster in $WARREN_CACHE/up (control plane and one real node, e2e/cluster.sh),
# the chart installed with the locally built warren image, and examples/basic.yaml running as three
# RabbitMQ pods. `make down` stops it all.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
helm=$cache/bin/helm-$HELM_VERSION/helm
dir=$cache/up
export WARREN_NODE_NAME=warren-up WARREN_NODE_SUBNET=10.244.1 WARREN_NODE_PORT=10251
component=up
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"
step() { log "$@"; }

[[ -d $dir ]] && "$here/down.sh"
"$here/build.sh" etcd helm kubernetes node coredns
"$here/rootfs.sh"
export_rabbitmq_images
version=${RABBITMQ_IMAGE##*:}; version=${version%-management}
step "cluster: control plane and node"
"$here/cluster.sh" start "$dir" > /dev/null
export KUBECONFIG=$dir/admin.kubeconfig

step "helm install charts/warren (image $WARREN_IMAGE)"
"$helm" install warren "$repo/charts/warren" -n warren-system --create-namespace \
  --set image.repository="${WARREN_IMAGE%:*}" --set image.tag="${WARREN_IMAGE##*:}" --set logFormat=text \
  --wait --timeout 120s > /dev/null

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
kubectl get rabbitcluster,pods,pvc -n default -o wide
ip=$(kubectl get service demo -n default -o jsonpath='{.spec.clusterIP}')
user=$(kubectl get secret demo-default-user -n default -o jsonpath='{.data.username}' | base64 -d)
cat <<MSG

Warren is up: Kubernetes $KUBERNETES_VERSION (control plane $(cat "$dir/server"), node $WARREN_NODE_NAME),
the operator running in the cluster as two replicas, one leading (the Lease holder: kubectl get lease
-n warren-system warren; logs: kubectl logs -n warren-system -l app.kubernetes.io/name=warren --prefix),
and RabbitCluster
demo: three RabbitMQ $version pods, one cluster, Ready (quorum queues by default; the other
generations' images are imported too: $RABBITMQ_IMAGE_3_10, $RABBITMQ_IMAGE_4_0).

From this machine, through the client Service:
  AMQP        amqp://$user:<password>@$ip:5672/
  management  http://$ip:15672/   (user $user)
  password    kubectl get secret demo-default-user -o jsonpath='{.data.password}' | base64 -d
Stop everything with: make down

export KUBECONFIG=$dir/admin.kubeconfig
MSG
