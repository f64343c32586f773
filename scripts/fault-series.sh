#!/usr/bin/env bash
# What faults cost, measured the way an operator meets them (a bench command, not CI):
# `baton lab` runs the same blind job RUNS times without a fault, then RUNS times with each
# fault (a manager SIGKILL and immediate restart, a manager down DOWN seconds, three agents
# SIGKILLed and restarted, all a quarter of the way into the job; and a quarter of the agents
# starting LATE seconds after the push), and prints each makespan against the mean of the
# fault-free runs. Needs root (network namespaces) and a release build.
#
#   scripts/fault-series.sh [AGENTS=16] [SIZE=64MiB] [RUNS=3] [DOWN=20] [LATE=10]
#
# The fault time is a quarter of the first fault-free makespan. JSON lines of every run go to
# target/fault-series-AGENTS-SIZE.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
agents=${1:-16}
size=${2:-64MiB}
runs=${3:-3}
down=${4:-20}
late=${5:-10}
baton=target/release/baton
[ -x "$baton" ] || cargo build --release -p baton
out="target/fault-series-$agents-$size.jsonl"
: >"$out"

run() { # label, extra arguments...
    local label=$1
    shift
    local line log="target/fault-series-$agents-$size.log"
    echo "== $label" >>"$log"
    if ! line=$("$baton" lab --agents "$agents" --size "$size" --json --no-baseline "$@" 2>>"$log" | tail -1) ||
        ! echo "$line" | jq -e .makespan_seconds >/dev/null 2>&1; then
        echo "$label: FAILED (see $log)"
        return 0
    fi
    echo "$line" | jq -c --arg name "$label" '{"label": $name} + .' >>"$out"
    echo "$line" | jq -r --arg name "$label" \
        '"\($name): makespan \(.makespan_seconds * 100 | round / 100) s, ratio \(.ratio * 1000 | round / 1000), confirmed \(.confirmed)/\(.agents)" + (if .fault then ", fault at \(.fault.at_seconds * 100 | round / 100) s" + (if .fault.manager_gap_seconds then ", manager back after \(.fault.manager_gap_seconds * 100 | round / 100) s" else "" end) + (if .fault.late_last_done_seconds then ", last late done \(.fault.late_last_done_seconds * 100 | round / 100) s" else "" end) else "" end)'
}

for i in $(seq "$runs"); do run "no fault #$i"; done
calm=$(jq -s '[.[] | select(.["label"] | startswith("no fault")) | .makespan_seconds] | add / length' "$out")
at=$(jq -s '[.[] | select(.["label"] | startswith("no fault")) | .makespan_seconds][0] / 4 | round' "$out")
quarter=$((agents / 4))
echo "fault-free mean makespan $calm s; faults at $at s"
for i in $(seq "$runs"); do run "manager-restart@$at #$i" --fault "manager-restart@$at"; done
for i in $(seq "$runs"); do run "kill-agents=3@$at #$i" --fault "kill-agents=3@$at"; done
for i in $(seq "$runs"); do run "manager-down=$down@$at #$i" --fault "manager-down=$down@$at"; done
for i in $(seq "$runs"); do run "late $quarter@$late #$i" --late "$quarter@$late"; done
echo "penalties against the fault-free mean ($calm s):"
jq -r --argjson calm "$calm" 'select(.fault) |
    "\(.["label"]): \((.makespan_seconds - $calm) * 100 | round / 100) s (\((.makespan_seconds / $calm - 1) * 1000 | round / 10) %)"' "$out"
