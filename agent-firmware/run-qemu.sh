#!/usr/bin/env bash
# Boots one Baton firmware device in QEMU (mps2-an385, Cortex-M3, LAN9118).
#
# Usage: run-qemu.sh [options] [ELF]
#   --flash FILE    emulated flash (16 MiB PSRAM image, shared with the host
#                   so writes survive SIGKILL); created erased (0xFF) if missing.
#                   Provision it first with tools/provision (identity, IP, manager).
#   --mac MAC       the device's MAC address (default 52:54:00:12:34:56)
#   --tap IFNAME    attach to an existing tap device (e.g. on a bridge in a netns)
#   --user          slirp user networking (default without --tap); the device
#                   must then use 10.0.2.15/24, the host is 10.0.2.2
#   --hostfwd SPEC  slirp port forward, e.g. tcp:127.0.0.1:7401-10.0.2.15:7400
#   --serial SPEC   QEMU -serial value for UART0 (default: null); `pty` gives the
#                   device a pseudo-terminal for `baton serve --serial /dev/pts/N`
#   --pty-file FILE with --serial pty: write the pty's path to FILE once QEMU made it
#                   (QEMU announces it on stdout, ahead of the device's log stream)
#   --raw           print the raw defmt stream instead of decoding it
#   --m4            run on mps2-an386 (Cortex-M4) instead
#   --gdb SOCKET    QEMU's gdbstub on the unix socket SOCKET (the board runs
#                   until a debugger attaches; attaching pauses it). The power-cut
#                   tests use it to stop at an exact flash write.
#   --boot BOOT_ELF the A/B build: QEMU loads the bootloader BOOT_ELF at 0x0, which
#                   starts the application in ACTIVE of the flash (written there by
#                   `baton-fw-provision --image`); ELF (an `ab` build) only decodes
#                   the log. The bootloader's own lines go to stderr as plain text.
#
# Every option may also come from the environment: BATON_FLASH, BATON_MAC,
# BATON_TAP, BATON_HOSTFWD, BATON_SERIAL, BATON_PTY_FILE, BATON_RAW=1, BATON_GDB,
# BATON_BOOT.
# Logs are defmt frames on QEMU's stdout (semihosting); they are decoded with
# defmt-print when it is installed (`cargo install defmt-print --locked`).
# QEMU exits with the device's semihosting status: 0, or 1 after a panic (the A/B
# build resets the board instead and QEMU keeps running).
# The script execs QEMU, so its pid is QEMU's (kill -9 it for a power cut).
# Used as the cargo runner: `cargo run --release` boots with the defaults.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
elf=""
flash="${BATON_FLASH:-}"
mac="${BATON_MAC:-52:54:00:12:34:56}"
tap="${BATON_TAP:-}"
hostfwd="${BATON_HOSTFWD:-}"
serial="${BATON_SERIAL:-null}"
pty_file="${BATON_PTY_FILE:-}"
raw="${BATON_RAW:-0}"
gdb="${BATON_GDB:-}"
boot="${BATON_BOOT:-}"
machine="mps2-an385"

while [ $# -gt 0 ]; do
    case "$1" in
        --flash) flash="$2"; shift 2 ;;
        --mac) mac="$2"; shift 2 ;;
        --tap) tap="$2"; shift 2 ;;
        --user) tap=""; shift ;;
        --hostfwd) hostfwd="$2"; shift 2 ;;
        --serial) serial="$2"; shift 2 ;;
        --pty-file) pty_file="$2"; shift 2 ;;
        --raw) raw=1; shift ;;
        --m4) machine="mps2-an386"; shift ;;
        --gdb) gdb="$2"; shift 2 ;;
        --boot) boot="$2"; shift 2 ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        -*) echo "run-qemu.sh: unknown option $1" >&2; exit 2 ;;
        *) elf="$1"; shift ;;
    esac
done
elf="${elf:-$here/target/thumbv7m-none-eabi/release/baton-firmware}"
[ -f "$elf" ] || { echo "run-qemu.sh: no firmware at $elf (cargo build --release first)" >&2; exit 2; }
command -v qemu-system-arm >/dev/null || { echo "run-qemu.sh: qemu-system-arm is not installed (apt-get install qemu-system-arm)" >&2; exit 2; }

kernel="$elf"
if [ -n "$boot" ]; then
    [ -f "$boot" ] || { echo "run-qemu.sh: no bootloader at $boot" >&2; exit 2; }
    [ -n "$flash" ] || { echo "run-qemu.sh: --boot needs --flash (the application is in its ACTIVE partition)" >&2; exit 2; }
    kernel="$boot"
fi
args=(-M "$machine" -nographic -monitor none -serial "$serial"
      -semihosting-config enable=on,target=native -kernel "$kernel")

if [ -n "$flash" ]; then
    size=$((16 * 1024 * 1024))
    if [ ! -f "$flash" ]; then
        # Erased NOR flash reads 0xFF.
        head -c "$size" /dev/zero | tr '\0' '\377' > "$flash"
    fi
    actual=$(stat -c %s "$flash")
    [ "$actual" -eq "$size" ] || { echo "run-qemu.sh: $flash must be exactly 16 MiB (is $actual bytes)" >&2; exit 2; }
    args+=(-object "memory-backend-file,id=psram,size=16M,mem-path=$flash,share=on"
           -machine memory-backend=psram)
fi

if [ -n "$gdb" ]; then
    args+=(-chardev "socket,id=gdb0,path=$gdb,server=on,wait=off" -gdb chardev:gdb0)
fi

if [ -n "$tap" ]; then
    args+=(-nic "tap,model=lan9118,ifname=$tap,script=no,downscript=no,mac=$mac")
else
    nic="user,model=lan9118,mac=$mac,net=10.0.2.0/24"
    [ -n "$hostfwd" ] && nic="$nic,hostfwd=$hostfwd"
    args+=(-nic "$nic")
fi

decode=(defmt-print -e "$elf")
if [ "$raw" = 1 ] || ! command -v defmt-print >/dev/null; then
    decode=(cat)
fi
# QEMU replaces this shell (`exec`), so the script's pid is QEMU's: a test
# that kills it (SIGKILL for a power cut) kills the device itself. The log
# stream goes through the decoder, which ends when QEMU closes its stdout.
if [ "$serial" = pty ]; then
    # QEMU's first stdout line names the pty ("char device redirected to
    # /dev/pts/N (label serial0)"); `read` takes exactly that line (bash reads
    # a pipe byte by byte), the binary log stream after it stays intact.
    exec qemu-system-arm "${args[@]}" > >(
        IFS= read -r line || exit 1
        pty="${line#char device redirected to }"
        pty="${pty%% *}"
        echo "pty=$pty" >&2
        if [ -n "$pty_file" ]; then echo "$pty" > "$pty_file.tmp" && mv "$pty_file.tmp" "$pty_file"; fi
        exec "${decode[@]}")
fi
exec qemu-system-arm "${args[@]}" > >(exec "${decode[@]}")
