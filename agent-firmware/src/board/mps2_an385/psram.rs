//! The emulated flash: QEMU's 16 MiB PSRAM at `0x2100_0000`, backed by a host file.
//!
//! QEMU's mps2 boards map the machine's main RAM object at the PSRAM address,
//! so `-object memory-backend-file,id=m,size=16M,mem-path=FILE,share=on
//! -machine memory-backend=m` makes this region a shared mapping of `FILE`:
//! every store lands in the host page cache at once and survives QEMU being
//! killed with SIGKILL (see `run-qemu.sh`). The region is split into
//!
//! ```text
//! 0x00_0000  4 KiB   provisioning block (written by the host tool, read at boot)
//! 0x00_1000  4 KiB   boot counter log (one 32-bit word per boot)
//! 0x00_2000  8 KiB   the agent's records (agent-core's RecordLog: two 4 KiB banks)
//! 0x00_4000  4 KiB   STATE: embassy-boot's swap magic and progress (A/B build)
//! 0x00_5000  4 KiB   install record: the firmware install waiting for a reset (A/B build)
//! 0x01_0000  14.9 MiB content partition for agent-core's FlashStore (to 0xF0_0000)
//! 0xF0_0000  128 KiB ACTIVE: the application the bootloader starts (A/B build)
//! 0xF2_0000  132 KiB DFU: an update waiting for the swap, and the swap's spare page
//! 0xF4_1000  rest    unused
//! ```
//!
//! The A/B build's bootloader (`agent-firmware/bootloader`, at `0x0`) includes this file for
//! the same map.
//!
//! [`NorPartition`] gives a window of it NOR-flash semantics with real
//! granularity: erase in 4 KiB blocks (cells become `0xFF`), write aligned
//! 4-byte words that can only clear bits (new = old AND data), read any byte.
//! So `FlashStore`'s power-cut ordering (data, proof, then flag) means on this
//! device what it means on a real NOR chip.

use embedded_storage::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashErrorKind, ReadNorFlash, check_erase,
    check_read, check_write,
};

/// Base address of the PSRAM.
pub const PSRAM_BASE: usize = 0x2100_0000;
/// Size of the PSRAM (QEMU insists on exactly 16 MiB for mps2-an385).
pub const PSRAM_SIZE: usize = 16 * 1024 * 1024;
/// Offset of the provisioning block.
pub const CONFIG_OFFSET: usize = 0;
/// Offset of the boot counter log.
pub const BOOT_OFFSET: usize = 0x1000;
/// Offset of the agent's record area (trust anchor, version records, latest time).
pub const RECORDS_OFFSET: usize = 0x2000;
/// Size of the record area: two erase blocks.
pub const RECORDS_SIZE: usize = 2 * ERASE;
/// Offset of embassy-boot's STATE partition (swap magic and progress; A/B build).
#[cfg_attr(not(feature = "ab"), allow(dead_code))] // the A/B build and its bootloader
pub const STATE_OFFSET: usize = 0x4000;
/// Size of the STATE partition: one erase block (embassy-boot needs 2 + 4 × 32 words).
#[cfg_attr(not(feature = "ab"), allow(dead_code))] // the A/B build and its bootloader
pub const STATE_SIZE: usize = ERASE;
/// Offset of the install record: the job and version whose firmware install waits for the
/// outcome of a reset (A/B build; `ab.rs`).
#[cfg_attr(not(feature = "ab"), allow(dead_code))] // the A/B build
pub const INSTALL_OFFSET: usize = 0x5000;
/// Offset of the content partition.
pub const CONTENT_OFFSET: usize = 0x1_0000;
/// End of the content partition (ACTIVE and DFU follow it).
pub const CONTENT_END: usize = ACTIVE_OFFSET;
/// Offset of ACTIVE, where the A/B application is linked to run (aligned to its size, so one
/// MPU region covers it).
pub const ACTIVE_OFFSET: usize = 0xF0_0000;
/// Size of ACTIVE: the application's flash budget.
#[cfg_attr(not(feature = "ab"), allow(dead_code))] // the A/B build and its bootloader
pub const ACTIVE_SIZE: usize = 128 * 1024;
/// Offset of DFU, where an update is written before the swap.
#[cfg_attr(not(feature = "ab"), allow(dead_code))] // the A/B build and its bootloader
pub const DFU_OFFSET: usize = ACTIVE_OFFSET + ACTIVE_SIZE;
/// Size of DFU: one erase block more than ACTIVE (embassy-boot's swap needs the spare page).
#[cfg_attr(not(feature = "ab"), allow(dead_code))] // the A/B build and its bootloader
pub const DFU_SIZE: usize = ACTIVE_SIZE + ERASE;
/// Erase block size.
pub const ERASE: usize = 4096;
/// Write unit.
pub const WRITE: usize = 4;

/// Whether `sp` and `reset`, the first two words of an image's vector table, fit an
/// application in ACTIVE: a stack pointer in RAM (64 KiB at `0x2000_0000`, the top
/// included) and a Thumb reset vector (bit 0 set) inside ACTIVE. The bootloader checks
/// ACTIVE with it before jumping there, the application checks DFU before asking for a swap.
#[cfg_attr(not(feature = "ab"), allow(dead_code))] // the A/B build and its bootloader
pub fn vector_table_ok(sp: u32, reset: u32) -> bool {
    let active = (PSRAM_BASE + ACTIVE_OFFSET) as u32;
    (0x2000_0000..=0x2001_0000).contains(&sp)
        && reset & 1 == 1
        && (active..active + ACTIVE_SIZE as u32).contains(&(reset & !1))
}

/// Reads `out.len()` bytes at `offset` from the PSRAM.
pub fn read_bytes(offset: usize, out: &mut [u8]) {
    assert!(offset + out.len() <= PSRAM_SIZE);
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: the address lies inside the 16 MiB PSRAM window that QEMU
        // always maps for this board (checked by the assert above).
        *b = unsafe { core::ptr::read_volatile((PSRAM_BASE + offset + i) as *const u8) };
    }
}

fn read_word(offset: usize) -> u32 {
    debug_assert!(offset.is_multiple_of(4) && offset + 4 <= PSRAM_SIZE);
    // SAFETY: aligned word inside the PSRAM window (callers check bounds).
    unsafe { core::ptr::read_volatile((PSRAM_BASE + offset) as *const u32) }
}

fn write_word(offset: usize, v: u32) {
    debug_assert!(offset.is_multiple_of(4) && offset + 4 <= PSRAM_SIZE);
    // SAFETY: aligned word inside the PSRAM window (callers check bounds);
    // nothing else in the program holds references into this region.
    unsafe { core::ptr::write_volatile((PSRAM_BASE + offset) as *mut u32, v) }
}

/// A window of the PSRAM with NOR flash semantics (see the module docs).
#[derive(Debug)]
pub struct NorPartition {
    start: usize,
    len: usize,
}

impl NorPartition {
    /// The window `start..start + len` of the PSRAM; both must be erase-block aligned.
    pub fn new(start: usize, len: usize) -> Self {
        assert!(
            start.is_multiple_of(ERASE) && len.is_multiple_of(ERASE) && start + len <= PSRAM_SIZE
        );
        NorPartition { start, len }
    }

    /// The record area: [`RECORDS_SIZE`] bytes at [`RECORDS_OFFSET`].
    pub fn records() -> Self {
        Self::new(RECORDS_OFFSET, RECORDS_SIZE)
    }

    /// The content partition: [`CONTENT_OFFSET`] to [`CONTENT_END`].
    pub fn content() -> Self {
        Self::new(CONTENT_OFFSET, CONTENT_END - CONTENT_OFFSET)
    }

    /// embassy-boot's STATE partition.
    #[cfg_attr(not(feature = "ab"), allow(dead_code))]
    pub fn state() -> Self {
        Self::new(STATE_OFFSET, STATE_SIZE)
    }

    /// ACTIVE: the running application.
    #[allow(dead_code)] // the bootloader's (it includes this file)
    pub fn active() -> Self {
        Self::new(ACTIVE_OFFSET, ACTIVE_SIZE)
    }

    /// DFU: the update partition.
    #[cfg_attr(not(feature = "ab"), allow(dead_code))]
    pub fn dfu() -> Self {
        Self::new(DFU_OFFSET, DFU_SIZE)
    }
}

impl ErrorType for NorPartition {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for NorPartition {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        check_read(self, offset, bytes.len())?;
        let base = self.start + offset as usize;
        // Whole words where aligned, bytes at the edges.
        let mut i = 0;
        while i < bytes.len() {
            let a = base + i;
            if a.is_multiple_of(4) && bytes.len() - i >= 4 {
                bytes[i..i + 4].copy_from_slice(&read_word(a).to_le_bytes());
                i += 4;
            } else {
                read_bytes(a, &mut bytes[i..i + 1]);
                i += 1;
            }
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.len
    }
}

impl NorFlash for NorPartition {
    const WRITE_SIZE: usize = WRITE;
    const ERASE_SIZE: usize = ERASE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        let mut a = self.start + from as usize;
        while a < self.start + to as usize {
            write_word(a, 0xFFFF_FFFF);
            a += 4;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, bytes.len())?;
        let base = self.start + offset as usize;
        for (i, w) in bytes.chunks_exact(4).enumerate() {
            let a = base + 4 * i;
            let new = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            // NOR programming only clears bits.
            write_word(a, read_word(a) & new);
        }
        Ok(())
    }
}

/// Writing a word again may clear further bits (as on most NOR flash).
impl MultiwriteNorFlash for NorPartition {}

/// Increments and returns the boot counter kept in the boot log block.
///
/// Each boot programs the next erased word with the new count; when the block
/// is full it is erased and the count restarts in its first word. The count
/// only feeds the ephemeral-key derivation (see `entropy`).
pub fn next_boot_count() -> u32 {
    let words = ERASE / 4;
    let mut last = 0u32;
    let mut free = None;
    for i in 0..words {
        let v = read_word(BOOT_OFFSET + 4 * i);
        if v == 0xFFFF_FFFF {
            free = Some(i);
            break;
        }
        last = v;
    }
    let next = last.wrapping_add(1).min(0xFFFF_FFFE);
    let slot = match free {
        Some(i) => i,
        None => {
            for i in 0..words {
                write_word(BOOT_OFFSET + 4 * i, 0xFFFF_FFFF);
            }
            0
        }
    };
    write_word(BOOT_OFFSET + 4 * slot, next);
    next
}
