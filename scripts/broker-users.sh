#!/usr/bin/env bash
# Least privilege on the broker: one RabbitMQ user per service role, with permission
# regexes drawn from the queue-naming scheme (`{prefix}.orchestrator.*`,
# `{prefix}.steps.{namespace}`, `{prefix}.events`, `{prefix}.dead`/`.dlx`).
#
#   scripts/broker-users.sh [--prefix tasker] [--vhost /] [--worker NAME=ns1,ns2]...
#                           [--out DIR] [--node rabbit@host] [--delete]
#
# Creates (or updates) `{prefix}-task-api`, `{prefix}-orchestrator`,
# `{prefix}-event-publisher`, `{prefix}-subscriber` and one `{prefix}-worker-NAME` per
# --worker, each with a fresh random password, and prints one `amqp_url` line per user
# (`USER amqp://USER:PASSWORD@HOST:5672/VHOST`; HOST from $BROKER_HOST, default
# 127.0.0.1) for the services' `TASKER_AMQP__URL` (in Kubernetes: a Secret per service).
# --out DIR also writes each URL to `DIR/USER.url` (mode 600), for the services'
# `TASKER_AMQP__URL_FILE` (docker-compose does this). Run it where `rabbitmqctl` reaches
# the broker (the broker's host, a container sharing its Erlang cookie with --node, or
# `docker compose exec rabbitmq`). Passwords are new on every run, except that with --out
# a user whose file exists keeps the password in it. --delete removes the users instead.
#
# What each role may do (configure / write / read, RabbitMQ's three regexes):
#   task-api        declares the orchestrator's queues and its own private event queues,
#                   publishes task requests, binds and reads its event queues
#   orchestrator    declares and consumes its queues, declares the step queues, publishes
#                   executions
#   event-publisher declares and publishes to the events exchange only
#   worker NAME     declares and consumes the step queues of its namespaces only, publishes
#                   reports
#   subscriber      binds private queues to the events exchange and reads them
# Declaring a queue that dead-letters (every Tasker queue does) takes, in RabbitMQ, read
# on the queue and write on `{prefix}.dlx` besides configure: so task-api, which declares
# the orchestrator's input queues (a request sent before the orchestrator first starts
# must not be lost), may also read them.
# Publishing through the default exchange (`amq.default`: task requests, executions,
# reports) is one permission in RabbitMQ whatever the routing key: a role that may publish
# there could address any queue by name. Consuming, declaring and binding are confined.
set -euo pipefail

PREFIX=tasker
VHOST=/
DELETE=0
OUT=
WORKERS=()
RMQ=(rabbitmqctl)
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --vhost) VHOST=$2; shift 2 ;;
    --worker) WORKERS+=("$2"); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --node) RMQ=(rabbitmqctl -n "$2"); shift 2 ;;
    --delete) DELETE=1; shift ;;
    *) echo "broker-users: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -z "$OUT" ] || mkdir -p "$OUT"
command -v rabbitmqctl >/dev/null || { echo "broker-users: rabbitmqctl is not on PATH (run it on the broker's host)" >&2; exit 1; }

P=$(printf '%s' "$PREFIX" | sed 's/[.[\*^$()+?{|]/\\&/g')   # the prefix, as a regex
HOST=${BROKER_HOST:-127.0.0.1}
VHOST_URL=$(printf '%s' "$VHOST" | sed 's|/|%2f|g')

user() { # name configure write read
  local name=$1
  if [ "$DELETE" -eq 1 ]; then
    "${RMQ[@]}" --quiet delete_user "$name" >/dev/null 2>&1 || true
    echo "deleted $name"
    return
  fi
  local password
  if [ -n "$OUT" ] && [ -s "$OUT/$name.url" ]; then
    # written by an earlier run: keep its password, so running services stay connected
    password=$(sed -E 's|^amqps?://[^:]+:([^@]+)@.*|\1|' "$OUT/$name.url")
  else
    password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  fi
  if "${RMQ[@]}" --quiet list_users --no-table-headers 2>/dev/null | awk '{print $1}' | grep -qx "$name"; then
    "${RMQ[@]}" --quiet change_password "$name" "$password" >/dev/null
  else
    "${RMQ[@]}" --quiet add_user "$name" "$password" >/dev/null
  fi
  "${RMQ[@]}" --quiet set_permissions -p "$VHOST" "$name" "$2" "$3" "$4" >/dev/null
  local url="amqp://$name:$password@$HOST:5672/$VHOST_URL"
  echo "$name $url"
  if [ -n "$OUT" ]; then
    (umask 077 && printf '%s\n' "$url" > "$OUT/$name.url")
  fi
}

DEAD="$P\\.(dead|dlx)"
user "$PREFIX-task-api" \
  "^($P\\.orchestrator\\.(tasks|results)|$DEAD|$P\\.events|amq\\.gen-.*)\$" \
  "^(amq\\.default|$DEAD|amq\\.gen-.*)\$" \
  "^($P\\.orchestrator\\.(tasks|results)|$P\\.(dlx|events)|amq\\.gen-.*)\$"
user "$PREFIX-orchestrator" \
  "^($P\\.orchestrator\\.(tasks|results)|$P\\.steps\\..+|$DEAD)\$" \
  "^(amq\\.default|$DEAD)\$" \
  "^($P\\.orchestrator\\.(tasks|results)|$P\\.steps\\..+|$P\\.(dead|dlx))\$"
user "$PREFIX-event-publisher" \
  "^$P\\.events\$" \
  "^$P\\.events\$" \
  "^\$"
user "$PREFIX-subscriber" \
  "^($P\\.events|amq\\.gen-.*)\$" \
  "^amq\\.gen-.*\$" \
  "^($P\\.events|amq\\.gen-.*)\$"
for spec in "${WORKERS[@]}"; do
  name=${spec%%=*}
  namespaces=$(printf '%s' "${spec#*=}" | tr ',' '|')
  user "$PREFIX-worker-$name" \
    "^($P\\.steps\\.($namespaces)|$DEAD)\$" \
    "^(amq\\.default|$DEAD)\$" \
    "^($P\\.steps\\.($namespaces)|$P\\.dlx)\$"
done
