#!/usr/bin/env bash
# The speed series of the claims, measured the way an operator deploys (a bench command, not
# CI): `baton lab` RUNS times for each profile (`sym`: up = down, 5:1 spread, S/d_min binds;
# `asym`: download five times upload, the aggregate upload term binds), agents blind (no rates
# given) and then told their rates, 1–40 ms one-way delays, and prints every run's makespan
# over T*, p50 over the makespan and the CPU per byte, then the worst ratio per series. With
# BT=1 each blind run is followed by a BitTorrent swarm on the same lab (--baseline bt; run
# scripts/bench-setup-bt.sh first). Needs root (network namespaces) and a release build.
#
#   scripts/lab-series.sh [AGENTS=32] [SIZE=64MiB] [RUNS=5]
#
# Run i uses seed 1 for the rates (the same links every run) and a fresh lab; JSON lines of
# every run go to target/lab-series-AGENTS-SIZE.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
agents=${1:-32}
size=${2:-64MiB}
runs=${3:-5}
baton=target/release/baton
[ -x "$baton" ] || cargo build --release -p baton
out="target/lab-series-$agents-$size.jsonl"
log="target/lab-series-$agents-$size.log"
: >"$out"

run() { # label, extra arguments...
    local label=$1
    shift
    local line
    echo "== $label" >>"$log"
    if ! line=$("$baton" lab --agents "$agents" --size "$size" --json "$@" 2>>"$log" | tail -1) ||
        ! echo "$line" | jq -e .makespan_seconds >/dev/null 2>&1; then
        echo "$label: FAILED (see $log)"
        return 0
    fi
    echo "$line" | jq -c --arg name "$label" '{"label": $name} + .' >>"$out"
    echo "$line" | jq -r --arg name "$label" \
        '"\($name): ratio \(.ratio * 1000 | round / 1000), p50/makespan \(.p50_over_makespan * 1000 | round / 1000), confirmed \(.confirmed)/\(.agents), \(.cpu_ns_per_byte * 10 | round / 10) ns/B, machine \(.machine_cpu_share * 100 | round) % busy" + (if .bt then "; BitTorrent ratio \(.bt.ratio * 1000 | round / 1000)" else "" end)'
}

for profile in sym asym; do
    for i in $(seq "$runs"); do
        if [ "${BT:-0}" = 1 ]; then
            run "$profile blind #$i" --profile "$profile" --baseline bt
        else
            run "$profile blind #$i" --profile "$profile"
        fi
    done
    for i in $(seq "$runs"); do run "$profile declared #$i" --profile "$profile" --declared-rates; done
done
echo "worst ratio per series:"
jq -rs 'group_by(.label | sub(" #[0-9]+$"; "")) | .[] |
    "\(.[0].label | sub(" #[0-9]+$"; "")): \(map(.ratio) | max * 1000 | round / 1000) (runs: \(map(.ratio * 1000 | round / 1000) | join(", ")))"' "$out"
