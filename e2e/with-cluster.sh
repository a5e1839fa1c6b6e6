#!/usr/bin/env bash
# Runs a command against a fresh local cluster (control plane and one real node, e2e/cluster.sh),
# then stops it and removes everything it made, also when the command fails or is interrupted.
#   e2e/with-cluster.sh cargo test --features e2e --test e2e_node
# The command sees KUBECONFIG (admin), WARREN_E2E_DIR and WARREN_HELM, as with-control-plane.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
"$here/build.sh" etcd helm kubernetes node coredns
mkdir -p "$cache/run"
dir=$(mktemp -d "$cache/run/cluster.XXXXXX")
trap '"$here/cluster.sh" stop "$dir"' EXIT
trap 'exit 130' INT TERM
"$here/cluster.sh" start "$dir" > /dev/null
export KUBECONFIG=$dir/admin.kubeconfig WARREN_E2E_DIR=$dir
export WARREN_HELM=$cache/bin/helm-$HELM_VERSION/helm WARREN_IMAGE RABBITMQ_IMAGE
"$@"
