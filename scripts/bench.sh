#!/usr/bin/env bash
# The benchmark (shared/bench.md): builds the release binaries, makes sure Postgres and
# RabbitMQ are up, then runs scenarios B1–B9 and the analytics timings with the four services as separate processes
# beside the machine's reference points, B1's and B2's floor and B3's and B4's CPU ceiling. Prints a table (min/median/max over repeats) and
# writes the figures to bench-results/latest.json.
#   scripts/bench.sh [--repeats N] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/infra.sh
ensure_infra
echo "bench: building release binaries" >&2
cargo build --release --quiet --bins
exec target/release/tasker-bench --bin-dir target/release --out bench-results "$@"
