//! The A/B build's image header (feature `ab`): what the running image says about itself.
//!
//! The header sits right after the vector table (`.baton_image`, placed by `build.rs`):
//! magic `BTNI`, the image's version (reported as the version of the content named
//! [`FIRMWARE_NAME`] that runs) and flags. `baton-fw-provision --image ELF --image-version N`
//! patches the version in the binary it writes, so one build gives images A, B and C that
//! differ only there (and one ELF decodes the logs of all of them). Reads are volatile: the
//! values are the patched bytes, never constants folded at build time.

/// The content name a firmware image is published under.
pub const FIRMWARE_NAME: &str = "firmware";
/// The header's magic, `BTNI` in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BTNI");
/// Flag: a test image that never marks itself booted (HIL: the bootloader must revert it).
pub const FLAG_NEVER_CONFIRM: u32 = 1;

/// The image header as stored.
#[repr(C)]
pub struct ImageHeader {
    /// [`MAGIC`].
    pub magic: u32,
    /// The image's version.
    pub version: u32,
    /// Flags ([`FLAG_NEVER_CONFIRM`]).
    pub flags: u32,
    /// Reserved (zero).
    pub reserved: u32,
}

/// This image's header (version 1 until the tool patches it).
#[unsafe(link_section = ".baton_image")]
#[unsafe(no_mangle)]
#[used]
pub static BATON_IMAGE: ImageHeader = ImageHeader {
    magic: MAGIC,
    version: 1,
    flags: 0,
    reserved: 0,
};

/// The running image's version.
pub fn version() -> u32 {
    // SAFETY: a static's field; volatile so the patched value is read.
    unsafe { core::ptr::read_volatile(&raw const BATON_IMAGE.version) }
}

/// The running image's flags.
pub fn flags() -> u32 {
    // SAFETY: as in `version`.
    unsafe { core::ptr::read_volatile(&raw const BATON_IMAGE.flags) }
}

use baton_protocol::JobRef;
use embassy_boot::{BlockingFirmwareState, State};
use embedded_storage::nor_flash::{NorFlash as _, ReadNorFlash as _};

use super::psram::{self, NorPartition};

/// Offset of the header in an image: right after the board's 48-entry vector table.
pub const HEADER_OFFSET: usize = 0xC0;

/// How this boot came about, from embassy-boot's STATE.
#[derive(Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum Boot {
    /// A confirmed image.
    Normal,
    /// The bootloader just swapped an update in: confirm it or it is reverted at the next reset.
    Trial,
    /// The bootloader reverted an update that never confirmed: this is the previous image.
    RolledBack,
}

/// Reads (`magic` `None`) or sets embassy-boot's state word.
fn state(magic: Option<State>) -> Option<State> {
    let mut word = [0u8; psram::WRITE];
    let mut st = BlockingFirmwareState::new(NorPartition::state(), &mut word);
    match magic {
        None => st.get_state().ok(),
        Some(State::Swap) => st.mark_updated().ok().map(|_| State::Swap),
        Some(_) => st.mark_booted().ok().map(|_| State::Boot),
    }
}

/// This boot's kind.
pub fn boot() -> Boot {
    match state(None) {
        Some(State::Swap) => Boot::Trial,
        Some(State::Revert) => Boot::RolledBack,
        _ => Boot::Normal,
    }
}

/// Marks the running image good (no revert at the next reset); also ends the
/// rolled-back state once it was reported.
pub fn mark_booted() -> bool {
    state(Some(State::Boot)).is_some()
}

/// Asks the bootloader to swap DFU in at the next reset.
pub fn mark_updated() -> bool {
    state(Some(State::Swap)).is_some()
}

/// The install record's magic.
const INSTALL_MAGIC: u32 = u32::from_le_bytes(*b"BTNP");

/// The install waiting for the next boot's outcome: its job and the version it installs.
#[derive(Clone, Copy)]
pub struct PendingInstall {
    /// The job that delivered the image.
    pub job: JobRef,
    /// The image's version.
    pub version: u32,
}

fn install_block() -> NorPartition {
    NorPartition::new(psram::INSTALL_OFFSET, psram::ERASE)
}

/// The pending install, if one was recorded.
pub fn pending() -> Option<PendingInstall> {
    let mut w = [0u8; 20];
    install_block().read(0, &mut w).ok()?;
    let word = |i: usize| u32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]);
    (word(0) == INSTALL_MAGIC).then(|| PendingInstall {
        job: JobRef {
            id: u64::from(word(1)) | u64::from(word(2)) << 32,
            epoch: word(3),
        },
        version: word(4),
    })
}

/// Records `p`. Erase, write the fields, then the magic: a power cut leaves the old record,
/// no record, or the new one whole.
pub fn set_pending(p: PendingInstall) -> bool {
    let mut b = install_block();
    if b.erase(0, psram::ERASE as u32).is_err() {
        return false;
    }
    let mut w = [0u8; 20];
    for (i, v) in [
        INSTALL_MAGIC,
        p.job.id as u32,
        (p.job.id >> 32) as u32,
        p.job.epoch,
        p.version,
    ]
    .into_iter()
    .enumerate()
    {
        w[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    b.write(4, &w[4..]).is_ok() && b.write(0, &w[..4]).is_ok()
}

/// The DFU partition.
pub fn dfu() -> NorPartition {
    NorPartition::dfu()
}

/// Whether DFU holds an image of `version` for this board: the vector table the bootloader
/// checks ([`psram::vector_table_ok`]), the header's magic and the same version as the
/// signed manifest. (The caller checked that the image fits ACTIVE.)
pub fn dfu_image_ok(version: u64) -> bool {
    let mut w = [0u8; 8];
    let mut h = [0u8; 8];
    let mut d = dfu();
    if d.read(0, &mut w).is_err() || d.read(HEADER_OFFSET as u32, &mut h).is_err() {
        return false;
    }
    let word = |b: &[u8; 8], i: usize| {
        u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    };
    psram::vector_table_ok(word(&w, 0), word(&w, 1))
        && word(&h, 0) == MAGIC
        && u64::from(word(&h, 1)) == version
}

/// The CMSDK APB watchdog (`0x4000_8000`, 25 MHz).
const WDOG: usize = 0x4000_8000;
/// Watchdog period: 2 s to the NMI (which resets the board), 4 s to its own reset.
const WDOG_LOAD: u32 = 2 * super::SYSCLK_HZ;

fn wdog(offset: usize, v: u32) {
    // SAFETY: registers of the watchdog, always mapped on this board.
    unsafe { core::ptr::write_volatile((WDOG + offset) as *mut u32, v) }
}

/// Starts the watchdog: unfed for 2 s it raises NMI (the handler logs and resets), and after
/// another 2 s it resets the board itself (also with interrupts masked).
pub fn watchdog_start() {
    wdog(0xC00, 0x1ACC_E551); // LOCK: unlock
    wdog(0x000, WDOG_LOAD); // LOAD
    wdog(0x008, 0b11); // CONTROL: INTEN | RESEN
    wdog(0xC00, 0); // lock
}

/// Feeds the watchdog (the node's loop does, at least once a second).
pub fn watchdog_feed() {
    wdog(0xC00, 0x1ACC_E551);
    wdog(0x00C, 1); // INTCLR: clears the interrupt and reloads the counter
    wdog(0xC00, 0);
}
