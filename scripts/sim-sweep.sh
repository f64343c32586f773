#!/usr/bin/env bash
# The simulator's seed sweep (issue 5): faulty fleets (drops, partitions, crashes and
# restarts, a malicious peer, manager restarts; true, unknown or wrong declared rates, some
# uploads changing mid-job) with every invariant checked after every event. Prints failing seeds; replay one with BATON_SIM_SEED=<seed> (see below).
# Usage: scripts/sim-sweep.sh [SMALL_SEEDS [MEDIUM_SEEDS]]   (defaults 2000 and 300)
# Soak:  scripts/sim-sweep.sh 100000 5000
# Replay: BATON_SIM_SEED=1234 cargo run --release -p baton-sim -- --sweep 1 --trace
set -euo pipefail
cd "$(dirname "$0")/.."
small="${1:-2000}"
medium="${2:-300}"
cargo build --release -p baton-sim
echo "=== $small small faulty seeds (3-12 agents)"
target/release/baton-sim --sweep "$small" --threads 2
echo "=== $medium medium faulty seeds (13-64 agents)"
target/release/baton-sim --sweep "$medium" --sweep-size medium --threads 2
