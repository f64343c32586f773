#!/usr/bin/env bash
# Builds everything the hardware-in-the-loop tests run, before
# `cargo test -p baton-hil-tests --release` (a test must not run a nested cargo):
#
#   - installs what is missing: the thumbv7m-none-eabi target, qemu-system-arm
#     (Debian package, via apt-get), defmt-print (cargo install);
#   - the firmware ELF (agent-firmware, release profile tuned for size) for QEMU's
#     mps2-an385, and for the second board, the NUCLEO-F429ZI (built, not run);
#   - the A/B build (--features ab, runs from ACTIVE in the PSRAM) and its bootloader
#     (agent-firmware/bootloader, embassy-boot at 0x0);
#   - the firmware provisioning tool (agent-firmware/tools/provision);
#   - the manager and Linux agent binary, `baton`, into this workspace's target
#     directory (CARGO_TARGET_DIR if set), where the HIL tests look for it;
#   - prints each board's firmware footprint: flash (<= 131,072 bytes) and static RAM +
#     stack region (<= 65,536 bytes), failing beyond either, the ten largest symbols, and
#     (QEMU) the peak stack of a booted device per task, measured by stack painting.
#
# Usage: scripts/build-firmware.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$1"; }

step "tools"
if ! rustup target list --installed | grep -qx thumbv7m-none-eabi; then
    rustup target add thumbv7m-none-eabi
fi
if ! command -v qemu-system-arm >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-system-arm
fi
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v defmt-print >/dev/null 2>&1 && [ ! -x "$cargo_bin/defmt-print" ]; then
    cargo install defmt-print --locked
fi
qemu-system-arm --version | head -1

# The firmware and its tool build in agent-firmware/target (their own
# .cargo/config.toml), where run-qemu.sh and the tests look, whatever
# CARGO_TARGET_DIR says for the workspace.
step "firmware (agent-firmware, thumbv7m-none-eabi)"
(cd agent-firmware && env -u CARGO_TARGET_DIR cargo build --release)

# The A/B build (issue 16): the application linked to run from ACTIVE in the PSRAM, and the
# embassy-boot bootloader QEMU loads at 0x0 (HIL tests in hil-tests/tests/ab.rs).
step "A/B firmware (--features ab) and its bootloader"
(cd agent-firmware && env -u CARGO_TARGET_DIR cargo build --release --features ab --target-dir target/ab)
(cd agent-firmware/bootloader && env -u CARGO_TARGET_DIR cargo build --release)

step "provisioning tool"
(cd agent-firmware/tools/provision && env -u CARGO_TARGET_DIR cargo build --release)

step "baton (manager and Linux agent)"
cargo build --release -p baton --bin baton

# The second board, ST's NUCLEO-F429ZI (embassy-stm32): the same shared firmware and the
# same budgets; built only (flashing it needs the board and probe-rs, see README.md).
step "firmware for the NUCLEO-F429ZI (board-nucleo-f429zi)"
(cd agent-firmware && env -u CARGO_TARGET_DIR cargo --config nucleo-f429zi.toml build --release \
    --no-default-features --features board-nucleo-f429zi)

step "footprint: QEMU mps2-an385"
PATH="$PATH:$cargo_bin" agent-firmware/size.sh --boot
step "footprint: A/B application (runs from ACTIVE) and bootloader (at 0x0, 16 KiB)"
agent-firmware/size.sh --elf agent-firmware/target/ab/thumbv7m-none-eabi/release/baton-firmware
agent-firmware/size.sh --bootloader agent-firmware/target/bootloader/thumbv7m-none-eabi/release/baton-bootloader
step "footprint: NUCLEO-F429ZI"
agent-firmware/size.sh --elf agent-firmware/target/nucleo/thumbv7m-none-eabi/release/baton-firmware
