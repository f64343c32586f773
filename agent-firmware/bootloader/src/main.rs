//! The A/B bootloader of Baton's mps2-an385 firmware.
//!
//! QEMU loads this program (the `-kernel` ELF) into the code memory at `0x0` at every reset,
//! so it cannot be changed by the device: it is the immutable part. The application lives
//! in the file-backed PSRAM (the emulated NOR flash), in embassy-boot's partitions (map in
//! `src/board/mps2_an385/psram.rs`, which this crate includes):
//!
//! - ACTIVE (128 KiB at PSRAM `0xF0_0000`): the application, linked to run there;
//! - DFU (132 KiB after it): an update the application downloaded, verified and marked;
//! - STATE (4 KiB at `0x4000`): embassy-boot's magic word and swap/revert progress.
//!
//! At each boot embassy-boot's [`BootLoader::prepare_boot`] swaps DFU into ACTIVE when the
//! application marked an update (state `Swap`), or swaps the old image back when an
//! updated application never marked itself booted (it panicked, hung until the watchdog
//! reset it, or reset without confirming): state `Revert`. Every page operation writes
//! the STATE progress first used by a resumed swap, so a power cut anywhere resumes the
//! same swap or revert. Then the bootloader checks ACTIVE's vector table (the check the
//! application makes of DFU before it asks for a swap, `psram::vector_table_ok`) and jumps
//! to it. Before a trial boot (an update just swapped in) it starts the CMSDK watchdog, so
//! an update that hangs before its own start-up is reset; a trial image without a vector
//! table resets at once. Either way the next boot reverts it.
//!
//! Log lines go to QEMU's stderr through semihosting, plain text (the application's
//! defmt stream on stdout is decoded with the application's ELF): `baton-boot: ...`,
//! one per erased page of ACTIVE and DFU, so a test can cut the power at points of a swap.

#![no_std]
#![no_main]
#![warn(missing_docs)]

#[allow(dead_code)]
#[path = "../../src/board/mps2_an385/psram.rs"]
mod psram;

use core::cell::RefCell;

use cortex_m::interrupt::Mutex;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hio};
use embassy_boot::{AlignedBuffer, BootLoader, BootLoaderConfig, State};
use embedded_storage::nor_flash::{ErrorType, NorFlash, ReadNorFlash};

use psram::{ERASE, NorPartition, PSRAM_BASE};

/// Where ACTIVE starts in the address map: the application's vector table.
const ACTIVE_BASE: u32 = (PSRAM_BASE + psram::ACTIVE_OFFSET) as u32;
/// The CMSDK APB watchdog (`0x4000_8000`, clocked at 25 MHz), as the application runs it
/// (`src/board/mps2_an385/ab.rs`).
const WDOG: usize = 0x4000_8000;
/// Its period: 2 s (at 25 MHz) to the NMI, as many again to the reset.
const WDOG_LOAD: u32 = 2 * 25_000_000;

/// QEMU's stderr, opened once.
static STDERR: Mutex<RefCell<Option<hio::HostStream>>> = Mutex::new(RefCell::new(None));

/// Writes the parts of one log line, then a newline, to QEMU's stderr.
fn log(parts: &[&[u8]]) {
    cortex_m::interrupt::free(|cs| {
        let mut err = STDERR.borrow(cs).borrow_mut();
        if err.is_none() {
            *err = hio::hstderr().ok();
        }
        if let Some(e) = err.as_mut() {
            for p in parts {
                let _ = e.write_all(p);
            }
            let _ = e.write_all(b"\n");
        }
    })
}

/// `v` in decimal, in `buf`.
fn dec(mut v: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// `v` as `0x` and eight hex digits, in `buf`.
fn hex(v: u32, buf: &mut [u8; 10]) -> &[u8] {
    buf[0] = b'0';
    buf[1] = b'x';
    for i in 0..8 {
        let d = ((v >> (28 - 4 * i)) & 0xF) as u8;
        buf[2 + i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
    }
    &buf[..]
}

/// The name of a boot state, as the log prints it.
fn state_name(s: &State) -> &'static [u8] {
    match s {
        State::Boot => b"boot",
        State::Swap => b"swap",
        State::Revert => b"revert",
        State::DfuDetach => b"dfu-detach",
    }
}

/// A partition that logs each erased page (`baton-boot: erase ACTIVE page N`): the points
/// a power-cut test chooses from.
struct Traced {
    name: &'static [u8],
    flash: NorPartition,
}

impl ErrorType for Traced {
    type Error = <NorPartition as ErrorType>::Error;
}

impl ReadNorFlash for Traced {
    const READ_SIZE: usize = NorPartition::READ_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.flash.read(offset, bytes)
    }

    fn capacity(&self) -> usize {
        self.flash.capacity()
    }
}

impl NorFlash for Traced {
    const WRITE_SIZE: usize = NorPartition::WRITE_SIZE;
    const ERASE_SIZE: usize = NorPartition::ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        let mut n = [0u8; 10];
        log(&[
            b"baton-boot: erase ",
            self.name,
            b" page ",
            dec(from / ERASE as u32, &mut n),
        ]);
        self.flash.erase(from, to)
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.flash.write(offset, bytes)
    }
}

/// Starts the watchdog before a trial boot: an update that hangs before its own start-up
/// (which starts the watchdog again, and feeds it) is reset, so the next boot reverts it.
fn watchdog_start() {
    let reg = |offset: usize, v: u32| {
        // SAFETY: registers of the watchdog, always mapped on this board.
        unsafe { core::ptr::write_volatile((WDOG + offset) as *mut u32, v) }
    };
    reg(0xC00, 0x1ACC_E551); // LOCK: unlock
    reg(0x000, WDOG_LOAD); // LOAD
    reg(0x008, 0b11); // CONTROL: INTEN (NMI) | RESEN
    reg(0xC00, 0); // lock
}

/// Stops the board after a bootloader failure: QEMU exits with status 1 (on hardware the
/// core would wait for a debugger here).
fn halt() -> ! {
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

#[entry]
fn main() -> ! {
    // One page: embassy-boot copies through it (4 KiB of the RAM the application gets later).
    static mut PAGE: AlignedBuffer<ERASE> = AlignedBuffer([0; ERASE]);
    // (cortex-m-rt's `entry` turns the `static mut` into a `&'static mut`, taken once.)
    let page: &mut [u8] = &mut PAGE.0;

    let mut boot = BootLoader::new(BootLoaderConfig {
        active: Traced {
            name: b"ACTIVE",
            flash: NorPartition::active(),
        },
        dfu: Traced {
            name: b"DFU",
            flash: NorPartition::dfu(),
        },
        state: NorPartition::state(),
    });
    let before = boot.read_state(page).unwrap_or(State::Boot);
    log(&[b"baton-boot: state ", state_name(&before)]);
    match boot.prepare_boot(page) {
        Ok(_) => {}
        Err(_) => {
            log(&[b"baton-boot: flash error while preparing the boot"]);
            halt();
        }
    }
    let after = boot.read_state(page).unwrap_or(State::Boot);
    match (&before, &after) {
        (State::Swap, State::Swap) => log(&[b"baton-boot: swapped; trial boot of the update"]),
        (State::Swap, State::Revert) => log(&[b"baton-boot: reverted to the previous image"]),
        _ => {}
    }

    // ACTIVE must hold a vector table: a stack pointer in RAM, a Thumb reset vector inside.
    // SAFETY: the PSRAM is always mapped on this board.
    let (sp, reset) = unsafe {
        let t = ACTIVE_BASE as *const u32;
        (t.read_volatile(), t.add(1).read_volatile())
    };
    let mut a = [0u8; 10];
    let mut b = [0u8; 10];
    if !psram::vector_table_ok(sp, reset) {
        log(&[
            b"baton-boot: no application in ACTIVE (sp=",
            hex(sp, &mut a),
            b", reset=",
            hex(reset, &mut b),
            b")",
        ]);
        if after == State::Swap {
            // A trial of an update that is no image: the next boot reverts it.
            log(&[b"baton-boot: resetting to revert the update"]);
            cortex_m::peripheral::SCB::sys_reset();
        }
        halt();
    }
    if after == State::Swap {
        watchdog_start();
    }
    log(&[
        b"baton-boot: starting the application at ",
        hex(ACTIVE_BASE, &mut a),
        b" (state ",
        state_name(&after),
        b")",
    ]);
    // SAFETY: ACTIVE holds a vector table (checked above); the application owns the board
    // from here and sets up everything it uses (the bootloader enabled nothing).
    unsafe {
        (*cortex_m::peripheral::SCB::PTR).vtor.write(ACTIVE_BASE);
        cortex_m::asm::bootload(ACTIVE_BASE as *const u32)
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    log(&[b"baton-boot: panic"]);
    halt()
}
