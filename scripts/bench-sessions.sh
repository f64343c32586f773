#!/usr/bin/env bash
# Benchmark: how many real agent sessions one manager holds, and what each costs.
#
# Runs `baton loadgen` (N real, authenticated agent sessions from one process against a
# `baton serve` it starts; see `baton loadgen --help`) for each N given (default 10000 and
# 100000), each in a network namespace of its own: loopback up, the ephemeral port range
# widened and somaxconn raised there (both are per namespace), and the descriptor limit
# raised for the run (a descriptor per session in the load generator and in the manager).
# The namespace is deleted on exit, however the script ends. A benchmark, not CI: it needs
# root (ip netns, the hard descriptor limit) and minutes.
#
#   scripts/bench-sessions.sh                 # 10000 and 100000
#   scripts/bench-sessions.sh 2000 10000      # other sizes
#   BATON=target/debug/baton scripts/bench-sessions.sh 2000
#   LOADGEN_ARGS="--storms 3 --json" scripts/bench-sessions.sh 10000
set -euo pipefail

cd "$(dirname "$0")/.."
BATON=${BATON:-target/release/baton}
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10000 100000)
DESCRIPTORS=${DESCRIPTORS:-1048576}

if [ "$(id -u)" != 0 ]; then
    echo "bench-sessions: needs root (ip netns, raising the hard descriptor limit)" >&2
    exit 2
fi
if [ ! -x "$BATON" ]; then
    echo "bench-sessions: no $BATON; build it first: nice -n 19 cargo build --release -p baton" >&2
    exit 2
fi

NS="baton-bench-$$"
cleanup() {
    ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" sysctl -q -w net.ipv4.ip_local_port_range="1024 65000"
ip netns exec "$NS" sysctl -q -w net.core.somaxconn=65535
ip netns exec "$NS" sysctl -q -w net.ipv4.tcp_max_syn_backlog=65535

echo "bench-sessions: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, load average $(cut -d' ' -f1-3 /proc/loadavg) (other work on this machine shares the CPUs)"
for n in "${SIZES[@]}"; do
    echo "=== $n sessions: $BATON loadgen --sessions $n ${LOADGEN_ARGS:-}"
    # shellcheck disable=SC2086
    # Raising the hard limit needs CAP_SYS_RESOURCE (a container may not have it): then the
    # run goes on with the hard limit there is, and the load generator says if it is too low.
    ip netns exec "$NS" bash -c "ulimit -Hn $DESCRIPTORS 2>/dev/null || echo \"bench-sessions: cannot raise the hard descriptor limit to $DESCRIPTORS (no CAP_SYS_RESOURCE?); it stays \$(ulimit -Hn)\" >&2; ulimit -Sn \$(ulimit -Hn) && exec \"\$0\" \"\$@\"" \
        "$BATON" loadgen --sessions "$n" --timeout 900 ${LOADGEN_ARGS:-}
done
