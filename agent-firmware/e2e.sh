#!/usr/bin/env bash
# End-to-end check of the firmware against a real manager (needs root and QEMU).
#
# Creates a network namespace with a bridge (10.77.0.1/24, the manager) and one
# tap per QEMU device, runs `baton serve` in it, provisions and enrols K
# devices, pushes a random file to all of them and checks that every device
# logs the file's SHA-256, computed on the device from its flash. Prints each
# device's transfer rate and footprint. Everything it creates is removed on
# exit, also on failure or Ctrl-C.
#
# Usage: e2e.sh [--devices K] [--size BYTES] [--chunk-size SIZE] [--keep DIR] [--pcap]
#   --keep DIR  copy the logs, flash images and manager data to DIR at the end
#   --pcap      also capture the bridge's traffic (needs tcpdump) into bridge.pcap
#   BATON=path/to/baton (default: ../target/release/baton)
#   PROVISION=path/to/baton-fw-provision (default: built from tools/provision)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
devices=2
size=$((512 * 1024))
chunk=4KiB
keep=""
pcap=0
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) devices="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        --chunk-size) chunk="$2"; shift 2 ;;
        --keep) keep="$2"; shift 2 ;;
        --pcap) pcap=1; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "e2e.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "e2e.sh: needs root (network namespace, taps)" >&2; exit 2; }
command -v qemu-system-arm >/dev/null || { echo "e2e.sh: qemu-system-arm is not installed" >&2; exit 2; }
[ "$devices" -ge 1 ] && [ "$devices" -le 9 ] || { echo "e2e.sh: 1..9 devices" >&2; exit 2; }

baton="${BATON:-$here/../target/release/baton}"
[ -x "$baton" ] || { echo "e2e.sh: no manager binary at $baton (cargo build --release -p baton-manager)" >&2; exit 2; }
elf="$here/target/thumbv7m-none-eabi/release/baton-firmware"
[ -f "$elf" ] || { echo "e2e.sh: no firmware at $elf (cargo build --release)" >&2; exit 2; }
provision="${PROVISION:-}"
if [ -z "$provision" ]; then
    (cd "$here/tools/provision" && cargo build -q --release)
    provision="$(ls "$here"/target/host/*/release/baton-fw-provision | head -1)"
fi

ns="bfw$$"
work="$(mktemp -d)"
pids=()
cleanup() {
    set +e
    # Each background process leads its own process group (setsid): end the groups.
    for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    if [ -n "$keep" ]; then mkdir -p "$keep" && cp -r "$work"/. "$keep"/; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add 10.77.0.1/24 dev br0
ip -n "$ns" link set br0 up
for i in $(seq 1 "$devices"); do
    ip -n "$ns" tuntap add dev "tap$i" mode tap
    ip -n "$ns" link set "tap$i" master br0 up
done
inns() { ip netns exec "$ns" "$@"; }
# Started in its own session, so cleanup can end it with everything it started.
bg() { setsid ip netns exec "$ns" "$@" & pids+=($!); }
if [ "$pcap" = 1 ]; then
    bg tcpdump -i br0 -n -s 200 -w "$work/bridge.pcap" > /dev/null 2>&1
fi

bg "$baton" serve --data-dir "$work/manager" --listen 10.77.0.1:7700 \
    --http 127.0.0.1:7780 --ready-file "$work/ready.json" > "$work/manager.log" 2>&1
for _ in $(seq 1 100); do [ -s "$work/ready.json" ] && break; sleep 0.1; done
[ -s "$work/ready.json" ] || { cat "$work/manager.log"; echo "e2e.sh: manager did not start" >&2; exit 1; }
manager_key="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manager_key"])' "$work/ready.json")"

ids=()
for i in $(seq 1 "$devices"); do
    id="fw-$i"
    ids+=("$id")
    out="$("$provision" --flash "$work/$id.img" --id "$id" --ip "10.77.0.1$i/24" \
        --manager 10.77.0.1:7700 --manager-key "$manager_key" --listen-port 7400)"
    key="$(echo "$out" | sed -n 's/^key=//p')"
    inns "$baton" enroll --data-dir "$work/manager" --id "$id" --key "$key" > /dev/null
    bg "$here/run-qemu.sh" --flash "$work/$id.img" --tap "tap$i" \
        --mac "52:54:00:77:00:0$i" > "$work/$id.log" 2>&1
done
for id in "${ids[@]}"; do
    for _ in $(seq 1 100); do grep -q "welcomed by the manager" "$work/$id.log" && break; sleep 0.1; done
    grep -q "welcomed by the manager" "$work/$id.log" || { cat "$work/$id.log"; echo "e2e.sh: $id did not come up" >&2; exit 1; }
done

head -c "$size" /dev/urandom > "$work/content.bin"
want="$(sha256sum "$work/content.bin" | cut -d' ' -f1)"
agents="$(IFS=,; echo "${ids[*]}")"
start=$(date +%s.%N)
inns "$baton" push "$work/content.bin" --agents "$agents" --chunk-size "$chunk" --wait \
    --data-dir "$work/manager" > "$work/push.log" 2>&1 || { cat "$work/push.log"; echo "e2e.sh: push failed" >&2; exit 1; }
end=$(date +%s.%N)
echo "push of $size bytes to $devices device(s) took $(awk "BEGIN{printf \"%.2f\", $end - $start}") s"

fail=0
for id in "${ids[@]}"; do
    line="$(grep -a "complete sha256=" "$work/$id.log" | tail -1 || true)"
    got="$(echo "$line" | sed -n 's/.*sha256=\([0-9a-f]*\).*/\1/p')"
    if [ "$got" = "$want" ]; then
        echo "$id: OK $(echo "$line" | sed -n 's/.*\(fetched=.*\)/\1/p')"
    else
        echo "$id: FAILED (device sha256=${got:-none}, want $want)"
        fail=1
    fi
    grep -a "footprint:" "$work/$id.log" | tail -1 | sed "s/^/$id: /"
    grep -a "peer .* connected" "$work/$id.log" | sed "s/^/$id: /" || true
done
exit "$fail"
