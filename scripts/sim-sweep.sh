#!/usr/bin/env bash
# The simulator's seed sweep (issue 5): faulty fleets (drops, partitions, crashes and
# restarts, a malicious peer, manager restarts; true, unknown or wrong declared rates, some
# uploads changing mid-job) with every invariant checked after every event. Prints failing seeds; replay one with BATON_SIM_SEED=<seed> (see below).
# Usage: scripts/sim-sweep.sh [SMALL_SEEDS [MEDIUM_SEEDS]]   (defaults 2000 and 300); then a
# 1000-agent speed guard (declared, blind, wrong rates, seed 1).
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

# Regression guard on speed (the sweep checks invariants only, not makespans): 1,000
# agents, seed 1, the figures the last notes record (declared 1.099, blind 3.235, wrong
# 2.616). A change that makes them worse by more than 5 % fails here; issue 12's targets
# are the bench's, not this guard's.
echo "=== 1000 agents, seed 1: makespan over T* against the recorded figures"
for mode_limit in declared:1.155 blind:3.40 wrong:2.75; do
    mode="${mode_limit%%:*}"; limit="${mode_limit##*:}"
    ratio=$(target/release/baton-sim --agents 1000 --rates "$mode" --strategies baton --seed 1 --json \
        | tail -1 | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["ratio"])')
    echo "rates $mode: ratio $ratio (limit $limit)"
    python3 -c "import sys; sys.exit(0 if $ratio <= $limit else 1)" \
        || { echo "1000-agent $mode ratio $ratio is above $limit: a speed regression" >&2; exit 1; }
done
