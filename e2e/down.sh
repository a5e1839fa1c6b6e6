#!/usr/bin/env bash
# `make down`: stops what `make up` started (pods, nodes, control plane, bridge) and removes its state.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${WARREN_CACHE:-$HOME/.cache/warren}/up
[[ -d $dir ]] || { echo "nothing is up"; exit 0; }
"$here/cluster.sh" stop "$dir"
echo "stopped"
