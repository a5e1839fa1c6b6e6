#!/usr/bin/env bash
# Runs a command against a fresh local control plane (with --node: a whole local cluster, the
# control plane and one real node, e2e/cluster.sh), then stops it and removes everything it made,
# also when the command fails or is interrupted.
#   e2e/with-control-plane.sh cargo test --features e2e --test e2e
#   e2e/with-control-plane.sh --node cargo test --features e2e --test e2e_node
# The command sees KUBECONFIG (admin), WARREN_E2E_DIR (audit.log, pki/), WARREN_HELM and
# WARREN_MONITORING_CRDS (the Prometheus operator's ServiceMonitor and PodMonitor CRDs); with
# --node also WARREN_IMAGE, CELERY_IMAGE (and CELERY_LINE), RABBITMQ_IMAGE (the default generation's) and RABBITMQ_IMAGE_<generation>
# (RABBITMQ_IMAGE_3_10, ...): the images imported into the node, and a Prometheus scraping them
# (its address in $WARREN_E2E_DIR/host/prometheus.url; with WARREN_PROMETHEUS_BUILD, once its
# binary is built: e2e/host.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
component=with-control-plane
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"
script=control-plane.sh components=(etcd helm kubernetes monitoring-crds)
if [[ ${1:-} == --node ]]; then
  shift
  script=cluster.sh components+=(node coredns)
  # Prometheus too, unless make test builds it beside the tier-4 tests (e2e/host.sh says how).
  [[ -n ${WARREN_PROMETHEUS_BUILD:-} ]] || components+=(prometheus)
  "$here/rootfs.sh"
  export WARREN_IMAGE CELERY_IMAGE CELERY_LINE
  export_rabbitmq_images
fi
"$here/build.sh" "${components[@]}"
mkdir -p "$cache/run"
dir=$(mktemp -d "$cache/run/${script%.sh}.XXXXXX")
trap '"$here/$script" stop "$dir"' EXIT
trap 'exit 130' INT TERM
"$here/$script" start "$dir" > /dev/null
export KUBECONFIG=$dir/admin.kubeconfig WARREN_E2E_DIR=$dir
export WARREN_HELM=$cache/bin/helm-$HELM_VERSION/helm
export WARREN_MONITORING_CRDS=$cache/bin/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/crds
"$@"
