#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test (unit, property, store,
# end-to-end and process-level) against a real Postgres and RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/infra.sh

# Use the TASKER_TEST_* servers when given; otherwise make sure the local ones run.
if [ -z "${TASKER_TEST_DATABASE_URL:-}" ] || [ -z "${TASKER_TEST_AMQP_URL:-}" ]; then
  if ! ensure_infra; then
    docker_engine || exit 1
    echo "test: falling back to testcontainers" >&2
    FEATURES=(--features tasker-test-support/containers)
  fi
fi

echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets ${FEATURES[@]+"${FEATURES[@]}"} -- -D warnings
echo "== tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace ${FEATURES[@]+"${FEATURES[@]}"} --no-fail-fast
else
  cargo test --workspace ${FEATURES[@]+"${FEATURES[@]}"} --no-fail-fast
fi
