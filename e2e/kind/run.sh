#!/usr/bin/env bash
# On a kind cluster of three workers (e2e/kind/cluster.yaml) with the image warren:e2e loaded:
# installs the chart, creates the 3-node RabbitCluster of examples/basic.yaml, waits for Ready,
# checks one pod per worker, publishes a message through the client Service and consumes it back,
# then drains each worker in turn (the PodDisruptionBudget lets one RabbitMQ pod go at a time; the
# pod's volume is on its node, so it returns when the node is uncordoned) with 100 messages kept
# across the three drains. Needs Docker and internet (the official rabbitmq image).
set -euo pipefail
cd "$(dirname "$0")/../.."
helm install warren charts/warren -n warren-system --create-namespace --wait \
  --set 'watchNamespaces={default}' --set image.repository=warren --set image.tag=e2e --set image.pullPolicy=Never
kubectl apply -f examples/basic.yaml
kubectl wait rabbitcluster/demo --for=condition=Ready --timeout=15m

user=$(kubectl get secret demo-default-user -o jsonpath='{.data.username}' | base64 -d)
pass=$(kubectl get secret demo-default-user -o jsonpath='{.data.password}' | base64 -d)
kubectl port-forward service/demo 15672:15672 > /dev/null &
forward=$!
trap 'kill $forward' EXIT
for _ in $(seq 30); do curl -fsS -u "$user:$pass" http://127.0.0.1:15672/api/overview > /dev/null && break; sleep 1; done
api() { curl -fsS -u "$user:$pass" -H 'content-type: application/json' "$@"; }

nodes=$(api http://127.0.0.1:15672/api/nodes | jq '[.[] | select(.running)] | length')
[[ $nodes == 3 ]] || { echo "expected 3 running nodes, management API reports $nodes"; exit 1; }
api -X PUT http://127.0.0.1:15672/api/queues/%2F/e2e -d '{"durable":true,"arguments":{"x-queue-type":"quorum"}}'
routed=$(api -X POST http://127.0.0.1:15672/api/exchanges/%2F/amq.default/publish \
  -d '{"properties":{"delivery_mode":2},"routing_key":"e2e","payload":"hello warren","payload_encoding":"string"}' |
  jq .routed)
[[ $routed == true ]] || { echo "publish not routed"; exit 1; }
body=$(api -X POST http://127.0.0.1:15672/api/queues/%2F/e2e/get \
  -d '{"count":1,"ackmode":"ack_requeue_false","encoding":"auto"}' | jq -r '.[0].payload')
[[ $body == "hello warren" ]] || { echo "consumed '$body', expected 'hello warren'"; exit 1; }

nodes_used=$(kubectl get pods -l app.kubernetes.io/instance=demo -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' |
  sort -u | wc -l)
[[ $nodes_used == 3 ]] || { echo "expected the 3 pods on 3 nodes, they use $nodes_used"; exit 1; }

api -X PUT http://127.0.0.1:15672/api/queues/%2F/kept -d '{"durable":true,"arguments":{"x-queue-type":"quorum"}}'
for i in $(seq 100); do
  api -X POST http://127.0.0.1:15672/api/exchanges/%2F/amq.default/publish \
    -d "{\"properties\":{\"delivery_mode\":2},\"routing_key\":\"kept\",\"payload\":\"$i\",\"payload_encoding\":\"string\"}" > /dev/null
done
kill $forward
for pod in demo-0 demo-1 demo-2; do
  node=$(kubectl get pod "$pod" -o jsonpath='{.spec.nodeName}')
  kubectl drain "$node" --ignore-daemonsets --delete-emptydir-data --timeout=10m
  kubectl uncordon "$node"
  kubectl wait "pod/$pod" --for=condition=Ready --timeout=10m
  kubectl wait rabbitcluster/demo --for=condition=Ready --timeout=10m
  echo "drained $node ($pod) and back"
done
kubectl port-forward service/demo 15672:15672 > /dev/null &
forward=$!
for _ in $(seq 30); do curl -fsS -u "$user:$pass" http://127.0.0.1:15672/api/overview > /dev/null && break; sleep 1; done
# The management API's counts follow the queue by a few seconds after a restart.
for _ in $(seq 30); do
  kept=$(api http://127.0.0.1:15672/api/queues/%2F/kept | jq .messages)
  [[ $kept == 100 ]] && break
  sleep 2
done
[[ $kept == 100 ]] || { echo "expected 100 messages kept across the drains, the queue has $kept"; exit 1; }
echo "kind e2e: 3 nodes running one pod each, message published and consumed, 3 drains with 100 messages kept"
