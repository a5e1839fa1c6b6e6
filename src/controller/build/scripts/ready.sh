#!/bin/bash
# Readiness: the node has joined the cluster and its AMQP listener accepts connections. Needs no
# other node, so pods become ready one by one, and costs no Erlang VM start.
set -eu
mnesia_base="${RABBITMQ_MNESIA_BASE:-/var/lib/rabbitmq/mnesia}"
test -f "${mnesia_base}/${RABBITMQ_NODENAME}/warren-clustered"
exec 3<>"/dev/tcp/127.0.0.1/${WARREN_AMQP_PORT:-5672}"
