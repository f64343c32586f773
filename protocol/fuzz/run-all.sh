#!/usr/bin/env bash
# Builds every fuzz target of baton-protocol and runs each for SECONDS
# (default 20). Exits non-zero on the first crash, leak, timeout or OOM;
# libFuzzer then leaves the input in artifacts/<target>/.
#
# Usage: protocol/fuzz/run-all.sh [SECONDS]
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# Corpora accumulate in corpus/<target>/ (git-ignored) and seed the next run.
set -euo pipefail

secs="${1:-20}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi
cd "$(dirname "$0")"

cargo +nightly fuzz build
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

summary=()
for target in $(cargo +nightly fuzz list); do
    echo "== $target: ${secs}s"
    if ! cargo +nightly fuzz run "$target" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$logs/$target" 2>&1; then
        tail -n 40 "$logs/$target"
        echo "FAILED: $target (input saved under artifacts/$target/)" >&2
        exit 1
    fi
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$logs/$target" | grep -Eo '[0-9]+$' || echo '?')
    rate=$(grep -Eo 'stat::average_exec_per_sec: *[0-9]+' "$logs/$target" | grep -Eo '[0-9]+$' || echo '?')
    cov=$(grep -Eo 'cov: [0-9]+' "$logs/$target" | tail -n 1 | grep -Eo '[0-9]+' || echo '?')
    summary+=("$(printf '%-20s %12s runs %9s exec/s %6s edges' "$target" "$runs" "$rate" "$cov")")
done

echo
echo "all targets ran ${secs}s without a crash:"
printf '  %s\n' "${summary[@]}"
