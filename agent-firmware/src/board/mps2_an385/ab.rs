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
