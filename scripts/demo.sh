#!/usr/bin/env bash
# Runs Tasker on this machine and shows a workflow as it happens:
#   - makes sure Postgres and RabbitMQ are up (starting or installing them if needed),
#   - builds the workspace, creates and migrates the `tasker_demo` database,
#   - starts task-api (with authentication on: a fresh HS256 secret, and a token minted for
#     the demo, which it shows), orchestrator, event-publisher and two step workers,
#   - registers the example templates, submits an e-commerce order,
#   - prints its lifecycle events live, then the final state of the task and each step,
#     and the analytics of the last minutes (taskerctl stats),
#   - stops everything (or, with --keep, leaves it running; `scripts/demo.sh --stop` stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEMO_DIR="$ROOT/.demo"
PIDS="$DEMO_DIR/pids"
BIN="$ROOT/target/debug"

stop_all() {
  [ -f "$PIDS" ] || return 0
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done < "$PIDS"
  for _ in $(seq 1 40); do
    alive=0
    while read -r pid name; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$PIDS"
    [ "$alive" -eq 0 ] && break
    sleep 0.25
  done
  rm -f "$PIDS"
  echo "demo: services stopped"
}

if [ "${1:-}" = "--stop" ]; then stop_all; exit 0; fi
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

source scripts/infra.sh
ensure_infra

if [ -f "$PIDS" ]; then
  echo "demo: an earlier demo is still running; stopping it first" >&2
  stop_all
fi
port_open 50051 && { echo "demo: port 50051 is taken; set TASKER_API__LISTEN to another address" >&2; exit 1; }

echo "demo: building (the first build takes a few minutes)" >&2
cargo build --quiet --bins

mkdir -p "$DEMO_DIR/logs"
export TASKER_DATABASE__URL="${TASKER_DATABASE__URL:-postgres://postgres@%2Fvar%2Frun%2Fpostgresql,127.0.0.1:5432/tasker_demo}"
export TASKER_AMQP__URL="${TASKER_AMQP__URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export TASKER_AMQP__PREFIX="${TASKER_AMQP__PREFIX:-demo}"
export TASKER_WORKER__NAMESPACES="[ecommerce, data_pipeline, user_registration, payments, customer_success]"
export TASKER_ORCHESTRATOR__BACKOFF__BASE="${TASKER_ORCHESTRATOR__BACKOFF__BASE:-500ms}"
"$BIN/taskerctl" migrate >&2

start() { # name, then env assignments, then the binary
  local name=$1; shift
  env "$@" >"$DEMO_DIR/logs/$name.log" 2>&1 &
  echo "$! $name" >> "$PIDS"
}
EVENTS=""
cleanup() {
  [ -n "$EVENTS" ] && kill "$EVENTS" 2>/dev/null
  [ "$KEEP" -eq 1 ] || stop_all
}
trap cleanup EXIT
# authentication on, as in production: a secret made for this run, and a token for the demo
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
TASKER_TOKEN=$("$BIN/taskerctl" token mint --secret "$SECRET" --subject demo --ttl 12h)
export TASKER_TOKEN
echo "$TASKER_TOKEN" > "$DEMO_DIR/token"
start task-api TASKER_API__TEMPLATES_DIR="$ROOT/examples/templates" TASKER_AUTH__MODE=jwt \
  TASKER_AUTH__HS256_SECRET="$SECRET" "$BIN/task-api"
start orchestrator "$BIN/orchestrator"
start event-publisher "$BIN/event-publisher"
start worker-1 TASKER_WORKER__ID=worker-1 TASKER_WORKER__ADMIN_LISTEN=0.0.0.0:9092 "$BIN/step-worker"
start worker-2 TASKER_WORKER__ID=worker-2 TASKER_WORKER__ADMIN_LISTEN=0.0.0.0:9094 "$BIN/step-worker"

for _ in $(seq 1 120); do
  "$BIN/taskerctl" namespaces >/dev/null 2>&1 && break
  sleep 0.25
done
echo "demo: services up (logs in .demo/logs); auth is on, and taskerctl uses this token (subject demo, every permission, 12 h; also in .demo/token):" >&2
echo "  TASKER_TOKEN=$TASKER_TOKEN" >&2
echo "demo: without it task-api answers: $("$BIN/taskerctl" --token '' namespaces 2>&1 | tail -1 || true)" >&2
echo "demo: templates:" >&2
"$BIN/taskerctl" template list

echo
echo "demo: lifecycle events, live from the '$TASKER_AMQP__PREFIX.events' exchange:"
"$BIN/taskerctl" events '#' &
EVENTS=$!
sleep 0.5
submitted=$("$BIN/taskerctl" task submit ecommerce process_order --context @examples/contexts/order.json --reason demo)
task_id=$(echo "$submitted" | awk '{print $2}')
echo ">> $submitted"
status=""
for _ in $(seq 1 240); do
  status=$("$BIN/taskerctl" task get "$task_id" | awk 'NR == 1 {print $NF}')
  case "$status" in complete|error|cancelled) break ;; esac
  sleep 0.25
done
sleep 0.5
kill "$EVENTS" 2>/dev/null || true
wait "$EVENTS" 2>/dev/null || true
EVENTS=""

echo
echo "demo: final state"
"$BIN/taskerctl" task get "$task_id"
echo
echo "demo: analytics of the last 10 minutes (taskerctl stats)"
"$BIN/taskerctl" stats --window 10m --limit 3
echo
if [ "$KEEP" -eq 1 ]; then
  echo "demo: services keep running (API on 127.0.0.1:50051, auth on). Try:"
  echo "  export TASKER_TOKEN=\$(cat .demo/token)"
  echo "  $BIN/taskerctl task submit data_pipeline customer_analytics --wait"
  echo "  $BIN/taskerctl events 'payments.#'"
  echo "Stop them with: scripts/demo.sh --stop"
fi
[ "$status" = "complete" ]
