#!/usr/bin/env bash
# Prints the firmware's footprint against its budgets and fails beyond them:
#   flash  = vector table + code + rodata + data   <= 131,072 bytes (a 128 KiB part)
#   RAM    = static data + bss + the stack region  <= 65,536 bytes
# and the ten largest symbols (code and statics), and the peak stack measured by
# painting on a device (per task: boot, net, node).
#
# A board's own RAM outside the budget (section .board_ram: the NUCLEO-F429ZI's Ethernet DMA
# descriptors and buffers) is printed on its own line.
#
# Usage: size.sh [--elf ELF] [--log FILE] [--boot] | size.sh --bootloader ELF
#   --elf ELF    firmware (default target/thumbv7m-none-eabi/release/baton-firmware)
#   --log FILE   a decoded device log (run-qemu.sh output): report its last
#                "footprint:" line, logged after every completed job
#   --boot       boot a device without network peers until it logs its
#                footprint (1 s after boot) and report the stack used by boot
#                alone (a lower bound; use --log after a job)
#   --bootloader ELF  the A/B bootloader instead: its flash (<= 16,384 bytes) and static RAM
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
        --bootloader)
            read -r bvec btext brodata bdata bbss < <(size -A "$2" | awk '
                $1==".vector_table"{v=$2} $1==".text"{t=$2} $1==".rodata"{r=$2}
                $1==".data"{d=$2} $1==".bss"{b=$2} $1==".uninit"{b+=$2}
                END{print v+0, t+0, r+0, d+0, b+0}')
            bflash=$((bvec + btext + brodata + bdata))
            printf 'bootloader flash %d of 16384 bytes (vector table %d + code %d + rodata %d + data %d), static RAM %d bytes\n' \
                "$bflash" "$bvec" "$btext" "$brodata" "$bdata" $((bdata + bbss))
            [ "$bflash" -le 16384 ] || { echo "size.sh: bootloader over 16 KiB" >&2; exit 1; }
            exit 0 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "size.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -f "$elf" ] || { echo "size.sh: no firmware at $elf (cargo build --release first)" >&2; exit 2; }

# Section sizes (System V format: name size addr).
read -r vec text rodata data bss < <(size -A "$elf" | awk '
    $1==".vector_table"{v=$2} $1==".baton_image"{v+=$2} $1==".text"{t=$2} $1==".rodata"{r=$2}
    $1==".data"{d=$2} $1==".bss"{b=$2} $1==".uninit"{b+=$2}
    END{print v+0, t+0, r+0, d+0, b+0}')
flash=$((vec + text + rodata + data))
flash_budget=$((128 * 1024))
ram_budget=$((64 * 1024))
# The stack region lies below the statics (memory.x.in): from its guard to its top.
sym() { nm "$elf" | awk -v s="$1" '$3==s{print $1}'; }
guard=$((16#$(sym _stack_guard)))
stack_top=$((16#$(sym _stack_start)))
stack_region=$((stack_top - guard))
static=$((data + bss))
ram=$((static + stack_region))
status=0
printf 'text   %7d bytes (vector table and A/B image header %d + code %d + rodata %d)\n' $((vec + text + rodata)) "$vec" "$text" "$rodata"
printf 'data   %7d bytes\n' "$data"
printf 'bss    %7d bytes\n' "$bss"
printf 'flash  %7d of %d bytes (text + data)\n' "$flash" "$flash_budget"
printf 'ram    %7d of %d bytes: static %d + stack region %d (guard 32 included)\n' \
    "$ram" "$ram_budget" "$static" "$stack_region"
# A board's own RAM outside Baton's budget (the NUCLEO's Ethernet DMA buffers, .board_ram).
board_ram=$(size -A "$elf" | awk '$1==".board_ram"{print $2}')
if [ -n "$board_ram" ]; then
    printf 'board  %7d bytes of the board'"'"'s own RAM outside the budget (.board_ram: Ethernet DMA)\n' "$board_ram"
fi
echo "largest symbols (bytes, kind, name):"
nm --size-sort -S -C --radix=d "$elf" | tail -10 | sort -k2 -rn |
    awk '{name=$4; for(i=5;i<=NF;i++) name=name" "$i; printf "  %7d %s %s\n", $2, $3, substr(name,1,100)}'
[ "$flash" -le "$flash_budget" ] || { echo "size.sh: flash budget exceeded ($flash > $flash_budget)" >&2; status=1; }
[ "$ram" -le "$ram_budget" ] || { echo "size.sh: RAM budget exceeded ($ram > $ram_budget)" >&2; status=1; }

peak_from() {
    grep -a 'footprint:' "$1" | tail -1 | sed -n 's/.*stack_peak=\([0-9]*\) stack_size=\([0-9]*\).*stack_boot=\([0-9]*\) stack_net=\([0-9]*\) stack_node=\([0-9]*\).*/\1 \2 \3 \4 \5/p'
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
    read -r peak size_ boot_ net_ node_ < <(peak_from "$log" || true) || true
    if [ -n "${peak:-}" ]; then
        printf 'stack  %7d of %d bytes peak (painted high-water mark; boot %d, net task %d, node task %d)\n' \
            "$peak" "$size_" "$boot_" "$net_" "$node_"
        [ "$peak" -lt "$size_" ] || { echo "size.sh: stack overflowed" >&2; status=1; }
    else
        echo "stack  (no footprint line in $log)"
    fi
fi
exit "$status"
