#!/usr/bin/env bash
# Runs a command against a fresh local control plane, then stops it and removes its directory,
# also when the command fails or is interrupted.
#   e2e/with-control-plane.sh cargo test --features e2e --test e2e
# The command sees KUBECONFIG (admin), WARREN_E2E_DIR (audit.log, pki/) and WARREN_HELM.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
"$here/build.sh"
mkdir -p "$cache/run"
dir=$(mktemp -d "$cache/run/control-plane.XXXXXX")
trap '"$here/control-plane.sh" stop "$dir"' EXIT
trap 'exit 130' INT TERM
"$here/control-plane.sh" start "$dir" > /dev/null
export KUBECONFIG=$dir/admin.kubeconfig WARREN_E2E_DIR=$dir
export WARREN_HELM=$cache/bin/helm-$HELM_VERSION/helm
"$@"
