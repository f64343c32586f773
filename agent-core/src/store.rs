//! What the agent needs from storage: content slots keyed by Merkle root, and its records.
//!
//! The [`ContentStore`] trait is the agent's only view of storage. A content
//! is opened (or resumed) from its manifest; chunks are written only after the
//! agent verified them, and a store marks a chunk verified only after its data
//! and proof are durably written, so after a power cut or restart the verified
//! set it reports is exactly what can be served. [`crate::flash::FlashStore`]
//! implements it over any `embedded_storage` NOR flash; the Linux driver keeps
//! one such store per content in a directory.
//!
//! Beside content, a store keeps the agent's *records*, which outlive any content:
//! the trust anchor it accepted ([`StoredAnchor`]), per content name the highest
//! version it accepted and that version's root ([`VersionRecord`], for rollback
//! protection after the content was evicted or overwritten), and the latest Unix
//! time it has seen (for an agent without a clock of its own). Each record is
//! replaced atomically: after a power cut a store returns the old or the new value.

use baton_protocol::merkle::Proof;
use baton_protocol::trust::TrustAnchor;
use baton_protocol::{Digest, Manifest};
use serde::{Deserialize, Serialize};

/// Why a store operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum StoreError {
    /// Not enough room for the content (partition too small, disk full, quota).
    Full,
    /// The storage device failed to read, write or erase.
    Io,
    /// No content with that root is held.
    Unknown,
    /// The chunk is not verified here (never served, never read back).
    NotVerified,
    /// The chunk index is outside the content.
    BadIndex,
    /// The data or buffer length does not match the chunk, or the proof length the index.
    BadLength,
    /// The stored header is damaged or of another format.
    Corrupt,
    /// The device's geometry (write or read size) is not supported.
    Unsupported,
    /// The store keeps no records (no record area was given).
    NoRecords,
}

impl core::fmt::Display for StoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            StoreError::Full => "not enough storage for the content",
            StoreError::Io => "storage device error",
            StoreError::Unknown => "content not held",
            StoreError::NotVerified => "chunk not verified",
            StoreError::BadIndex => "chunk index out of range",
            StoreError::BadLength => "wrong chunk, buffer or proof length",
            StoreError::Corrupt => "stored content header is damaged",
            StoreError::Unsupported => "storage geometry not supported",
            StoreError::NoRecords => "the store has no room for records (none configured)",
        })
    }
}

impl core::error::Error for StoreError {}

/// One content a store holds, as listed in the agent's report.
#[derive(Clone, Copy, Debug)]
pub struct Held<'a> {
    /// The content's manifest.
    pub manifest: &'a Manifest,
    /// Chunks verified and stored.
    pub verified: u32,
}

/// The highest version of one content name an agent accepted, with that version's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VersionRecord {
    /// The manifest version.
    pub version: u64,
    /// Its content's Merkle root.
    pub root: Digest,
}

/// The trust anchor an agent persisted, with the pin it grew from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StoredAnchor {
    /// Digest of the configured root keys and threshold (see [`crate::agent::pin_digest`]):
    /// an anchor stored under other pinned roots is not used.
    pub pin: Digest,
    /// The anchor of the newest trust document accepted.
    pub anchor: TrustAnchor,
}

/// Storage for content, keyed by Merkle root, and for the agent's records.
pub trait ContentStore {
    /// Opens the content of `manifest`, creating its slot or resuming the one
    /// held; returns how many chunks are already verified.
    fn open(&mut self, manifest: &Manifest) -> Result<u32, StoreError>;

    /// The manifest of held content `root`.
    fn manifest(&self, root: &Digest) -> Option<&Manifest>;

    /// How many chunks of `root` are verified, if it is held.
    fn verified(&self, root: &Digest) -> Option<u32>;

    /// Whether chunk `index` of `root` is verified and stored.
    fn is_verified(&mut self, root: &Digest, index: u32) -> Result<bool, StoreError>;

    /// Stores an already verified chunk with its proof; it counts as verified
    /// only once this returns `Ok`.
    fn write_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        data: &[u8],
        proof: &[Digest],
    ) -> Result<(), StoreError>;

    /// Reads verified chunk `index` of `root` into `data` (at least the chunk's
    /// length) and its proof into `proof`; returns the chunk's length.
    fn read_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        data: &mut [u8],
        proof: &mut Proof,
    ) -> Result<usize, StoreError>;

    /// The `i`-th held content (for reports), `None` past the last.
    fn held(&self, i: usize) -> Option<Held<'_>>;

    /// Bytes still free for new content (an estimate, for reports).
    fn free_bytes(&self) -> u64;

    /// The trust anchor saved last, if any.
    fn load_anchor(&mut self) -> Result<Option<StoredAnchor>, StoreError>;

    /// Replaces the saved trust anchor (atomically: a power cut leaves the old or the new).
    fn save_anchor(&mut self, anchor: &StoredAnchor) -> Result<(), StoreError>;

    /// The version record of content `name`, if one was saved.
    fn version_record(&mut self, name: &str) -> Result<Option<VersionRecord>, StoreError>;

    /// Saves the version record of content `name`, replacing its old one;
    /// [`StoreError::Full`] if `name` has none and the store holds as many names as it can.
    fn put_version_record(&mut self, name: &str, record: &VersionRecord) -> Result<(), StoreError>;

    /// The latest Unix time (seconds) saved, if any.
    fn load_latest_time(&mut self) -> Result<Option<u64>, StoreError>;

    /// Saves the latest Unix time seen (seconds).
    fn save_latest_time(&mut self, unix: u64) -> Result<(), StoreError>;
}
