#!/bin/bash
# preStop hook: lets a node stop only when its queues are safe elsewhere: classic mirrors
# synchronised (RabbitMQ 3.x) and every quorum queue keeping a majority without this node.
# Bounded by WARREN_PRESTOP_TIMEOUT so a stuck check cannot hold a node forever; the pod's
# terminationGracePeriodSeconds is longer.
set -u
config_dir="${WARREN_CONFIG_DIR:-/etc/warren/config}"
timeout="${WARREN_PRESTOP_TIMEOUT:-3000}"
replicas=$(cat "$config_dir/replicas" 2>/dev/null || echo 1)
if [[ "$replicas" -le 1 ]]; then
    exit 0
fi
version=$(rabbitmqctl -q version 2>/dev/null || true)
if [[ "$version" == 3.* ]]; then
    rabbitmq-upgrade -q await_online_synchronized_mirror --timeout "$timeout" ||
        echo "warren-pre-stop: mirrors still unsynchronised after ${timeout}s; stopping anyway" >&2
fi
rabbitmq-upgrade -q await_online_quorum_plus_one --timeout "$timeout" ||
    echo "warren-pre-stop: quorum queues would lose their majority; stopping after ${timeout}s anyway" >&2
exit 0
