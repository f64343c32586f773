#!/usr/bin/env bash
# Prints the firmware's footprint: flash (text + data) against the 160 KiB
# budget, static RAM (data + bss) and the stack left in the 64 KiB RAM, and
# the peak stack measured by painting on a device.
#
# Usage: size.sh [--elf ELF] [--log FILE] [--boot]
#   --elf ELF    firmware (default target/thumbv7m-none-eabi/release/baton-firmware)
#   --log FILE   a decoded device log (run-qemu.sh output): report its last
#                "footprint:" line, logged after every completed job
#   --boot       boot a device without network peers until it logs its
#                footprint (1 s after boot) and report the stack used by boot
#                alone (a lower bound; use --log after a job)
# Exits non-zero when a budget is exceeded.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
elf="$here/target/thumbv7m-none-eabi/release/baton-firmware"
log=""
boot=0
while [ $# -gt 0 ]; do
    case "$1" in
        --elf) elf="$2"; shift 2 ;;
        --log) log="$2"; shift 2 ;;
        --boot) boot=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "size.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -f "$elf" ] || { echo "size.sh: no firmware at $elf (cargo build --release first)" >&2; exit 2; }

# Section sizes (System V format: name size addr).
read -r vec text rodata data bss < <(size -A "$elf" | awk '
    $1==".vector_table"{v=$2} $1==".text"{t=$2} $1==".rodata"{r=$2}
    $1==".data"{d=$2} $1==".bss"{b=$2} $1==".uninit"{b+=$2}
    END{print v+0, t+0, r+0, d+0, b+0}')
flash=$((vec + text + rodata + data))
ram=$((64 * 1024))
static=$((data + bss))
stack=$((ram - static))
status=0
printf 'text   %7d bytes (vector table %d + code %d + rodata %d)\n' $((vec + text + rodata)) "$vec" "$text" "$rodata"
printf 'data   %7d bytes\n' "$data"
printf 'bss    %7d bytes\n' "$bss"
printf 'flash  %7d of %d bytes (text + data)\n' "$flash" $((160 * 1024))
printf 'ram    %7d of %d bytes static; %d bytes left for the stack\n' "$static" "$ram" "$stack"
[ "$flash" -le $((160 * 1024)) ] || { echo "size.sh: flash budget exceeded" >&2; status=1; }

peak_from() {
    grep -a 'footprint:' "$1" | tail -1 | sed -n 's/.*stack_peak=\([0-9]*\) stack_size=\([0-9]*\).*/\1 \2/p'
}
if [ "$boot" = 1 ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # The device logs its footprint one second after boot (and after every job):
    # wait for that line (at most 20 s on a busy machine), then stop the device.
    BATON_FLASH="$tmp/flash.img" "$here/run-qemu.sh" "$elf" > "$tmp/log" 2>&1 &
    qemu=$!
    for _ in $(seq 1 200); do
        grep -q 'footprint:' "$tmp/log" 2>/dev/null && break
        kill -0 "$qemu" 2>/dev/null || break
        sleep 0.1
    done
    kill "$qemu" 2>/dev/null || true
    wait "$qemu" 2>/dev/null || true
    log="$tmp/log"
fi
if [ -n "$log" ]; then
    read -r peak size_ < <(peak_from "$log" || true) || true
    if [ -n "${peak:-}" ]; then
        printf 'stack  %7d of %d bytes peak (painted high-water mark)\n' "$peak" "$size_"
        [ "$peak" -lt "$size_" ] || { echo "size.sh: stack overflowed" >&2; status=1; }
    else
        echo "stack  (no footprint line in $log)"
    fi
fi
exit "$status"
