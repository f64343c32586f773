#!/usr/bin/env bash
# Runs the QEMU facts program (tools/qemu-facts) three times over one fresh 16 MiB flash
# file, as `cargo run --release` does (this is the cargo runner): boots 1..3 in the first
# QEMU process, 4..6 in the second, 7..9 in the third. See agent-firmware/README.md.
set -euo pipefail
elf="$1"
flash="$(mktemp)"
trap 'rm -f "$flash"' EXIT
head -c $((16 * 1024 * 1024)) /dev/zero | tr '\0' '\377' > "$flash"
for run in 1 2 3; do
    echo "--- QEMU process $run"
    timeout 20 qemu-system-arm -M mps2-an385 -nographic -monitor none -serial null \
        -semihosting-config enable=on,target=native -kernel "$elf" \
        -object "memory-backend-file,id=psram,size=16M,mem-path=$flash,share=on" \
        -machine memory-backend=psram
done
