#!/usr/bin/env bash
# A bounded soak under crashes and outages: the four services as separate release
# processes (two task-apis, two orchestrators, two event-publishers, two workers) behind
# fault proxies to Postgres and RabbitMQ; a mixed workload with idempotency keys and client
# retries; SIGKILL of each kind of process and outages of the broker and the database at
# random moments. Then it checks, from Postgres and a real event subscriber, that every
# task completed once per key, every step once, every transition's event arrived in order,
# and the outbox and the dead-letter queue are empty, and prints the recovery time per
# fault kind. Exits non-zero if a check fails.
#   scripts/chaos.sh [--seconds N] [--clients N]     (default 90 s of faults, 4 clients)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/infra.sh
ensure_infra
echo "chaos: building release binaries" >&2
cargo build --release --quiet -p task-api -p orchestrator -p step-worker -p event-publisher -p tasker-chaos
exec target/release/tasker-chaos --bin-dir target/release "$@"
