//! The board layer: everything that differs between boards, behind one small boundary.
//!
//! The shared firmware (`main.rs`'s boot sequence, [`crate::node`] with the agent-core
//! driver, [`crate::config`], [`crate::stack`], [`crate::entropy`]) uses only what a board
//! module exports, under the same names on every board:
//!
//! - [`Parts`] from `bring_up()`: the Ethernet driver (`Eth`, an `embassy-net-driver`),
//!   its MAC, the provisioning block, the boot number and the flash store (`Store`:
//!   agent-core's `FlashStore` over the board's `NorFlash` partitions);
//! - `serial`: the UART the manager link can run over (`init`, `pop`, `rx_queued`,
//!   `poll_rx`, `tx_ready`, `write`, `poll_tx`);
//! - time and execution: `run_executor`, the embassy time driver, `cycle_count`;
//! - memory: `ram_layout`, `stack_bottom`, `stack_top`, the guards;
//! - the end of the program: `exit` (and the panic and fault handlers), `fault_demos`.
//!
//! One board is compiled in, chosen by a cargo feature: `board-mps2-an385` (QEMU, the
//! default; the hardware-in-the-loop suite runs on it, `thumbv7m-none-eabi`) or
//! `board-nucleo-f429zi` (ST's NUCLEO-F429ZI, `thumbv7em-none-eabi`, flashed with
//! probe-rs).

#[cfg(feature = "board-mps2-an385")]
mod mps2_an385;
#[cfg(feature = "board-mps2-an385")]
pub use mps2_an385::*;

#[cfg(feature = "board-nucleo-f429zi")]
mod nucleo_f429zi;
#[cfg(feature = "board-nucleo-f429zi")]
pub use nucleo_f429zi::*;

#[cfg(not(any(feature = "board-mps2-an385", feature = "board-nucleo-f429zi")))]
compile_error!("choose a board: --features board-mps2-an385 or board-nucleo-f429zi");
#[cfg(all(feature = "board-mps2-an385", feature = "board-nucleo-f429zi"))]
compile_error!("one board at a time (--no-default-features --features board-nucleo-f429zi)");

use crate::config::CONFIG_LEN;

/// What a board hands the shared firmware at boot.
pub struct Parts {
    /// The Ethernet driver, for embassy-net.
    pub eth: Eth,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// The provisioning block as stored (decoded by [`crate::config`]).
    pub config_block: [u8; CONFIG_LEN],
    /// This boot's number, from the boot counter in flash.
    pub boot: u32,
    /// The content partition and record area.
    pub store: Store,
}

/// How the 64 KiB of RAM are used.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct RamLayout {
    /// Initialised statics.
    pub data: usize,
    /// Zeroed statics (buffers, task arenas, the agent).
    pub bss: usize,
    /// The stack region below the statics (its guard not counted).
    pub stack: usize,
}
