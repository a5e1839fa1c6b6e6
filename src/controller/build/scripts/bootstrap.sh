#!/bin/bash
# Warren node bootstrap: the command of the RabbitMQ container.
#
# Starts RabbitMQ and, on a node's first boot only, makes it a member of the cluster with
# join_cluster. A node that has joined (or seeded) the cluster marks so inside its own data
# directory; from then on it simply starts, and RabbitMQ re-forms the cluster from its data after
# any restart. `rabbitmqctl reset` wipes the marker with the data, so a reset node joins again.
#
# Environment (from the StatefulSet, or from the test harness for pod i):
#   RABBITMQ_NODENAME   rabbit@<sts>-<ordinal>.<peer domain> (long names)
#   WARREN_STS_NAME     the StatefulSet's name
#   WARREN_PEER_DOMAIN  DNS domain of the pods (the headless Service)
#   WARREN_CONFIG_DIR   the mounted ConfigMap (holds `replicas`, and `formed`: true once the
#                       operator has seen the cluster formed)
#   WARREN_COOKIE_FILE  the Erlang cookie from its Secret
#   WARREN_STOP_TIMEOUT seconds RabbitMQ gets to stop after SIGTERM (default 120) before it is
#                       killed (its preStop hook, run before SIGTERM, has its own bound)
set -euo pipefail

log() { echo "warren-bootstrap: $(date -u +%FT%T.%3NZ) $*" >&2; }

: "${RABBITMQ_NODENAME:?must be set}" "${WARREN_STS_NAME:?must be set}" "${WARREN_PEER_DOMAIN:?must be set}"
config_dir="${WARREN_CONFIG_DIR:-/etc/warren/config}"
cookie_file="${WARREN_COOKIE_FILE:-/etc/warren/cookie/cookie}"
mnesia_base="${RABBITMQ_MNESIA_BASE:-/var/lib/rabbitmq/mnesia}"
marker="${mnesia_base}/${RABBITMQ_NODENAME}/warren-clustered"
host="${RABBITMQ_NODENAME#*@}"
pod="${host%%.*}"
ordinal="${pod##*-}"

# Erlang refuses a cookie file that others can read; Secret volumes are group-readable.
cookie_target="${HOME:?must be set}/.erlang.cookie"
rm -f "$cookie_target"
(umask 077 && cat "$cookie_file" > "$cookie_target")
chmod 400 "$cookie_target"

# The disk nodes of the cluster NODE belongs to, one per line; fails when NODE's RabbitMQ is not running.
members_of() {
    local status
    timeout 60 rabbitmq-diagnostics -q -n "$1" check_running >/dev/null 2>&1 || return 1
    status=$(timeout 60 rabbitmqctl -q -n "$1" cluster_status --formatter json 2>/dev/null) || return 1
    sed -n 's/.*"disk_nodes":\[\([^]]*\)\].*/\1/p' <<<"$status" | tr ',' '\n' | tr -d '"' | sed '/^$/d'
}

# A node with no data directory at all that a running peer still lists as a member lost its
# volume. Forget the lost incarnation before this node's RabbitMQ starts: on Khepri (4.3) the
# cluster's leader otherwise reaches the new, empty node under the old identity and replicates into
# its store while it seeds itself (seen: the first boot crashed with user_already_exists). A node
# that has data, even without the marker, is never forgotten here.
forget_lost_incarnation() {
    local replicas i peer members
    replicas=$(cat "$config_dir/replicas" 2>/dev/null || echo 0)
    for ((i = 0; i < replicas; i++)); do
        [[ "$i" == "$ordinal" ]] && continue
        peer="rabbit@${WARREN_STS_NAME}-${i}.${WARREN_PEER_DOMAIN}"
        members=$(members_of "$peer") || continue
        grep -qxF "$RABBITMQ_NODENAME" <<<"$members" || return 0
        log "the cluster still lists $RABBITMQ_NODENAME but it has no data (its volume was lost); forgetting it before it starts"
        timeout 120 rabbitmqctl -q -n "$peer" forget_cluster_node "$RABBITMQ_NODENAME" && return 0
        log "forgetting it on $peer failed; it is forgotten after it starts instead"
        return 0
    done
}
[[ -d "${mnesia_base}/${RABBITMQ_NODENAME}" ]] || forget_lost_incarnation

# Written once RabbitMQ has finished booting in this container (removed first: it is per container).
booted_flag="${mnesia_base}/${RABBITMQ_NODENAME}-warren-booted"
rm -f "$booted_flag"

rabbitmq-server &
server_pid=$!
terminating=false
stop_timeout="${WARREN_STOP_TIMEOUT:-120}"

server_alive() { kill -0 "$server_pid" 2>/dev/null; }

# The server's script and the processes it started (the Erlang VM), by parent pid.
kill_server() {
    local stat pid _comm _state ppid children=()
    for stat in /proc/[0-9]*/stat; do
        read -r pid _comm _state ppid _ < "$stat" 2>/dev/null || continue
        [[ "$ppid" == "$server_pid" ]] && children+=("$pid")
    done
    kill -KILL "${children[@]}" "$server_pid" 2>/dev/null || true
}

# SIGTERM stops RabbitMQ; a stop that has not finished in WARREN_STOP_TIMEOUT is ended with SIGKILL.
# A RabbitMQ 4.3 node stopping while its peers stop too has been seen to hang for good after
# "RabbitMQ metadata store: worker exited with shutdown", which held its pod Terminating for the
# whole grace period and the cluster one member short. Killed, it restarts as after a crash:
# quorum queues and the metadata store recover from their logs. Returns once it has stopped (or
# once this script has exited, when run in the background).
stop_vm() {
    kill -TERM "$server_pid" 2>/dev/null || true
    local waited
    for ((waited = 0; waited < stop_timeout; waited++)); do
        kill -0 $$ 2>/dev/null && server_alive || return 0
        sleep 1
    done
    log "RabbitMQ has not stopped ${stop_timeout}s after SIGTERM: killing it"
    kill_server
}

stop_server() {
    terminating=true
    stop_vm &
}
trap stop_server TERM INT

# Waits until RabbitMQ has booted; fails when it exits first.
await_boot() {
    until timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1; do
        server_alive || return 1
        sleep 2
    done
}

# Stops RabbitMQ's Erlang VM and starts a new one; succeeds once it has booted. The pod exits on a
# SIGTERM received meanwhile.
restart_server() {
    stop_vm
    wait "$server_pid" 2>/dev/null || true
    [[ "$terminating" == true ]] && exit 0
    rabbitmq-server &
    server_pid=$!
    await_boot || { log "RabbitMQ exited while booting in its new Erlang VM"; return 1; }
}

# Makes this node a member of the cluster of SEED (whose disk nodes are SEED_MEMBERS) and starts
# it. Returns 1 when a step before the start fails, 2 when RabbitMQ fails to start after joining.
join_cluster() {
    local seed="$1" seed_members="$2"
    log "joining the cluster of $seed"
    rabbitmqctl -q stop_app || return 1
    if grep -qxF "$RABBITMQ_NODENAME" <<<"$seed_members"; then
        # This node's volume was lost: the cluster still lists its old incarnation. Forget it first,
        # on either store. Mnesia refuses the join otherwise; Khepri would take the node back under
        # its old identity, as a Raft member that lost its log, and starts its quorum queue members
        # only if the queue records have arrived before the node's own recovery (a race seen on
        # 4.3.6: a queue left with a member that never runs). Forgotten, the node joins as a new
        # member and its quorum queue members are grown below, as for a new replica.
        log "the cluster still lists $RABBITMQ_NODENAME (its data was lost); forgetting it"
        rabbitmqctl -q -n "$seed" forget_cluster_node "$RABBITMQ_NODENAME" || return 1
    fi
    # On Khepri, reset can fail once while the cluster's leader still contacts the wiped node's own
    # single-node store (leader_saw_append_entries_rpc_in_same_term): retry it.
    local try
    for try in 1 2 3 4 5; do
        rabbitmqctl -q reset && break
        [[ "$try" == 5 ]] && { log "reset failed $try times"; return 1; }
        log "reset failed (try $try); retrying in 5 s"
        sleep 5
    done
    rabbitmqctl -q join_cluster "$seed" || return 1
    rabbitmqctl -q start_app || return 2
    grow_quorum_queues
}

# A node that joins (a new replica, or one whose volume was lost and was forgotten) holds no member
# of the existing quorum queues: give each one a member here, so every queue is replicated on every
# node again. Not fatal: the cluster works without it. `grow` succeeds even when a queue refused
# the new member (a queue takes one membership change at a time, and two nodes joining at once both
# change every queue): it is run again until no queue reports an error (queues that have the member
# already are skipped).
grow_quorum_queues() {
    local errors="" try
    for try in 1 2 3 4 5 6 7 8 9 10; do
        errors=$(rabbitmq-queues -q grow "$RABBITMQ_NODENAME" all --errors-only --formatter json 2>/dev/null) &&
            [[ "$errors" == "[]" ]] && return 0
        sleep 3
    done
    log "growing quorum queues onto $RABBITMQ_NODENAME failed; they keep their other members: ${errors:0:500}"
}

# RabbitMQ 3.x on Mnesia can fail the first start after join_cluster when peers join at the same
# moment (seen on 3.10.8 with two nodes joining the seed at once on a loaded machine: Mnesia's start
# cut short, {error,{normal,{mnesia_app,start,...}}}). Starting the app again in the same Erlang VM
# is not enough: a make test saw the next two start_app fail with
# {cannot_create_schema,{has_no_disc,...}}, the VM left unable to start it. So the node gets a new
# VM, which boots from what join_cluster wrote, and the first boot's loop looks again: booted as a
# member, the node is done; booted alone (its data did not survive), it joins again.
join_failures=0
start_app_failed() {
    local seed="$1"
    while true; do
        join_failures=$((join_failures + 1))
        if [[ "$join_failures" -ge 3 ]]; then
            log "RabbitMQ failed to start after joining $seed, $join_failures times"
            exit 1
        fi
        log "RabbitMQ failed to start after joining $seed (try $join_failures); starting it again in a new Erlang VM in 5 s"
        sleep 5
        restart_server && return 0
    done
}

# Maintenance mode outlives a restart: a node drained by its previous pod's preStop hook (or by a
# scale-down called off since) boots with its client listeners suspended, so its AMQP port stays
# closed and the pod never becomes ready (seen on the node tests). This pod is not leaving: once
# booted, a node still marked as being drained is revived.
revive_if_drained() {
    await_boot || return 0
    local drained
    drained=$(timeout 60 rabbitmqctl -q eval 'rabbit_maintenance:is_being_drained_local_read(node()).' 2>/dev/null)
    if [[ "$drained" == true ]]; then
        log "$RABBITMQ_NODENAME booted in maintenance mode (drained before its restart): reviving"
        timeout 120 rabbitmq-upgrade -q revive >/dev/null 2>&1 || log "revive failed; the node stays in maintenance mode"
    fi
}

if [[ -f "$marker" ]]; then
    log "$RABBITMQ_NODENAME is a cluster member already; starting"
    # In the background, so SIGTERM is handled at once: waits for the boot (through restarts below).
    (
        until timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1; do
            kill -0 $$ 2>/dev/null || exit 0
            sleep 2
        done
        touch "$booted_flag"
        revive_if_drained
    ) &
else
    await_boot || { log "RabbitMQ exited during its first boot"; wait "$server_pid"; exit 1; }
    while true; do
        own=$(members_of "$RABBITMQ_NODENAME" || true)
        if [[ $(grep -c . <<<"$own") -gt 1 ]]; then
            if [[ "$join_failures" -gt 0 ]]; then
                log "$RABBITMQ_NODENAME booted in its new Erlang VM as a member of the cluster it joined"
                grow_quorum_queues
            else
                log "other nodes joined $RABBITMQ_NODENAME already"
            fi
            break
        fi
        # The lowest-ordinal running peer that is part of the cluster: the seed (ordinal 0) or a node
        # with company. A lone node with a higher ordinal may be booting for the first time itself.
        joined=""
        replicas=$(cat "$config_dir/replicas")
        for ((i = 0; i < replicas; i++)); do
            [[ "$i" == "$ordinal" ]] && continue
            peer="rabbit@${WARREN_STS_NAME}-${i}.${WARREN_PEER_DOMAIN}"
            members=$(members_of "$peer") || continue
            if [[ "$i" == 0 || $(grep -c . <<<"$members") -gt 1 ]]; then
                status=0
                join_cluster "$peer" "$members" || status=$?
                [[ "$status" == 1 ]] && exit 1
                [[ "$status" == 2 ]] && { start_app_failed "$peer"; continue 2; }
                joined="$peer"
                break
            fi
        done
        [[ -n "$joined" ]] && break
        if [[ "$ordinal" == 0 ]]; then
            if [[ $(cat "$config_dir/formed" 2>/dev/null) == true ]]; then
                # Node 0 without data in a cluster that formed before (its volume lost, peers slow to
                # boot after a full restart): seeding here would make a second, empty cluster that
                # clients write to. Wait for the members that hold the data, then join them.
                log "no running cluster member found, and the cluster formed before: waiting for a member to join"
            else
                log "no running cluster member found: $RABBITMQ_NODENAME seeds the cluster"
                break
            fi
        fi
        server_alive || { log "RabbitMQ exited while waiting for a peer"; wait "$server_pid"; exit 1; }
        log "no running cluster member to join yet; retrying in 5 s"
        sleep 5
    done
    touch "$marker"
    touch "$booted_flag"
    log "$RABBITMQ_NODENAME is clustered"
fi

# A member that fails to boot is started again, a few times, inside this container. RabbitMQ 4.0 on
# Mnesia can abort its boot when peers boot at the same moment (all pods of a full restart): Mnesia's
# protocol negotiation with a booting peer is killed and `rabbit` fails to start (seen on 4.0.5;
# later RabbitMQ retries this itself). The next boot joins the peers that are up by then. A node
# that keeps failing exits, and the kubelet's restart policy takes over.
set +e
boots=1
while true; do
    wait "$server_pid"
    status=$?
    server_alive && continue  # wait was interrupted by a signal's trap
    [[ "$terminating" == true ]] && exit "$status"
    if [[ -f "$marker" && ! -f "$booted_flag" && "$boots" -lt 3 ]]; then
        boots=$((boots + 1))
        log "RabbitMQ exited (status $status) before it finished booting; starting it again (boot $boots of 3)"
        sleep 5
        [[ "$terminating" == true ]] && exit "$status"
        rabbitmq-server &
        server_pid=$!
        continue
    fi
    exit "$status"
done
