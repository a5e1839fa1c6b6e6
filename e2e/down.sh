#!/usr/bin/env bash
# `make down`: stops what `make up` started (the operator, then the control plane), by pid.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${WARREN_CACHE:-$HOME/.cache/warren}/up
[[ -d $dir ]] || { echo "nothing is up"; exit 0; }
if [[ -f $dir/pids/warren ]]; then
  pid=$(cat "$dir/pids/warren")
  kill -TERM "$pid" 2>/dev/null && for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pids/warren"
fi
"$here/control-plane.sh" stop "$dir"
echo "stopped"
