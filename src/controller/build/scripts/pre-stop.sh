#!/bin/bash
# preStop hook: lets a node stop only when its queues are safe elsewhere: classic mirrors
# synchronised (RabbitMQ 3.x) and every quorum queue keeping a majority without this node.
#
# Waiting for a quorum only helps while some other node stays: when every other running node is
# leaving too (the RabbitCluster deleted, all pods deleted), no quorum comes back by waiting, and a
# hook that waited would hold its pod for the whole timeout. So each hook first marks its node as
# leaving, in the node's memory (gone with the VM, so a restarted node is never taken for a leaving
# one), and a hook stops waiting once no other running node is unmarked. Once safe, the node goes
# into maintenance mode (`rabbitmq-upgrade drain`): clients and queue leaders move off before it
# stops. Not before the checks: members on a node in maintenance do not count as online.
#
# Bounded by WARREN_PRESTOP_TIMEOUT so a stuck check cannot hold a node forever; the pod's
# terminationGracePeriodSeconds is longer.
set -u
config_dir="${WARREN_CONFIG_DIR:-/etc/warren/config}"
timeout="${WARREN_PRESTOP_TIMEOUT:-3000}"
log() { echo "warren-pre-stop: $*" >&2; }
replicas=$(cat "$config_dir/replicas" 2>/dev/null || echo 1)
if [[ "$replicas" -le 1 ]]; then
    exit 0
fi
deadline=$((SECONDS + timeout))

# A node that is no cluster member holds nothing to hand over: one that left the cluster (a
# scale-down on Khepri runs stop_app and reset on it, then removes the marker bootstrap.sh keeps in
# its data directory), or one that never joined. Its application is stopped, so the checks
# below could only fail until the timeout.
marker="${RABBITMQ_MNESIA_BASE:-/var/lib/rabbitmq/mnesia}/${RABBITMQ_NODENAME:-}/warren-clustered"
if [[ ! -f "$marker" && $(timeout 60 rabbitmqctl -q eval 'rabbit:is_running().' 2>/dev/null) != true ]]; then
    log "not a cluster member (left or never joined) and not running: nothing to hand over"
    exit 0
fi

rabbitmqctl -q eval 'application:set_env(rabbit, warren_leaving, true).' >/dev/null 2>&1 ||
    log "could not mark this node as leaving"

# Whether another running node is not leaving. Unknown (the CLI failed) counts as yes: keep waiting.
another_node_stays() {
    local staying
    staying=$(timeout 60 rabbitmqctl -q eval '
        [N || N <- nodes(), lists:prefix("rabbit@", atom_to_list(N)),
              rpc:call(N, application, get_env, [rabbit, warren_leaving], 10000) =/= {ok, true}].' 2>/dev/null) ||
        return 0
    [[ "$staying" != "[]" ]]
}

version=$(rabbitmqctl -q version 2>/dev/null || true)
if [[ "$version" == 3.* ]]; then
    rabbitmq-upgrade -q await_online_synchronized_mirror --timeout "$timeout" ||
        log "mirrors still unsynchronised after ${timeout}s; stopping anyway"
fi
alone=""
until rabbitmq-upgrade -q await_online_quorum_plus_one --timeout 10 >/dev/null 2>&1; do
    if ! another_node_stays; then
        log "every other node is leaving too: no quorum comes back by waiting; stopping"
        alone=1
        break
    fi
    if ((SECONDS >= deadline)); then
        log "quorum queues would lose their majority; stopping after ${timeout}s anyway"
        break
    fi
    sleep 5
done
# Nowhere to move clients and leaders when every other node is leaving too.
[[ -n "$alone" ]] || rabbitmq-upgrade -q drain --timeout 300 >/dev/null 2>&1 ||
    log "maintenance mode not confirmed; stopping anyway"
exit 0
