//! One content laid out in a NOR flash partition, safe against power cuts.
//!
//! [`FlashStore`] works on any [`embedded_storage::nor_flash::NorFlash`]:
//! erased flash reads `0xFF`, writes only clear bits, writes are whole
//! `WRITE_SIZE` units at aligned offsets and erases whole `ERASE_SIZE` blocks.
//! The partition holds:
//!
//! ```text
//! header   magic, mode, manifest (postcard), checksum        written once after erase
//! void     (mode 2) one unit, erased while the header is in force
//! flags    one verified flag per chunk, set by clearing bits
//! proofs   per chunk: its Merkle proof, in a fixed-size slot
//! data     per chunk: its bytes, in a slot of chunk_size rounded up to the write unit
//! spares   (mode 2) SPARES slots, each: claim (chunk index), flag, proof, data
//! ```
//!
//! A chunk is written in the order data, proof, flag. A power cut before the
//! flag leaves the chunk unverified, and it is fetched again; after the flag,
//! data and proof are complete. So the verified set read back at the next
//! mount is exactly the set of chunks whose writes finished, and at most the one
//! chunk being written at a cut is fetched again.
//!
//! Flags are bits in a bitmap (mode 1) when the flash allows a write unit to be written
//! more than once ([`FlashStore::new_multiwrite`], for [`MultiwriteNorFlash`]): a chunk
//! fetched again is simply written again over what the cut left. Otherwise (mode 2,
//! [`FlashStore::new`]) each flag takes a whole write unit and no unit is ever written
//! twice: a chunk whose slot a cut left written in part goes to a free spare slot instead
//! (claim, data, proof, then the spare's flag), so the content still completes. After
//! [`SPARES`] such cuts in one content, further ones make that chunk fail with `Io` until
//! another content replaces it. (Mode 0, unit flags without spares, is still read.)
//!
//! Opening another content erases the partition, and a power cut during an erase can leave
//! any block partly erased, in any order the driver erases in. So the old header is voided
//! first (on multiwrite flash its magic is cleared, in mode 2 its void unit), which no
//! partial erase undoes, and the header's block is erased on its own before the others.
//!
//! `tests/power_cut.rs` cuts the power at every erase and write of a complete job (cleanly
//! and tearing the operation, in both modes) and checks these claims after each reboot.
//!
//! The agent's records (trust anchor, version records, latest time) live in a
//! separate small area, a [`RecordLog`] given with [`FlashStore::with_records`],
//! so that replacing the content never erases them. Without one the record
//! operations fail with [`StoreError::NoRecords`].

use baton_protocol::merkle::{self, MAX_DEPTH, Proof};
use baton_protocol::{Digest, Manifest};
use embedded_storage::nor_flash::{MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind};
use sha2::{Digest as _, Sha256};

use crate::records::RecordLog;
use crate::store::{ContentStore, Held, StoreError, StoredAnchor, VersionRecord};

/// Largest read/write unit supported (bytes); the store keeps buffers of this size on the stack.
pub const MAX_UNIT: usize = 256;
/// Bytes reserved for the header (before alignment).
const HEADER_MAX: u32 = 320;
/// Header magic: format 1 of Baton's content slot.
const MAGIC: &[u8; 8] = b"BATONCS1";
/// Bytes of header before the manifest: magic, mode, manifest length.
const HEADER_FIXED: usize = 8 + 1 + 2;
/// Bytes of the header checksum (truncated SHA-256).
const CHECK_LEN: usize = 8;
/// A cleared write unit, written over an old header's magic (or its void unit) to void it.
static ZEROS: [u8; MAX_UNIT] = [0; MAX_UNIT];
/// Spare chunk slots of a partition with unit flags (format mode 2).
pub const SPARES: u32 = 4;
/// Format modes (the header byte after the magic).
const MODE_UNITS: u8 = 0;
const MODE_BITMAP: u8 = 1;
const MODE_UNITS_SPARES: u8 = 2;

/// Where each part of one content lives in the partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    unit: u32,
    mode: u8,
    bitmap: bool,
    /// Whether a void unit follows the header (erased while the header is in force).
    void: bool,
    chunks: u32,
    chunk_size: u32,
    flags_at: u32,
    proofs_at: u32,
    proof_stride: u32,
    data_at: u32,
    data_stride: u32,
    /// Spare slots, each: claim (the chunk index), flag, proof, data.
    spares: u32,
    spares_at: u32,
    claim_len: u32,
    spare_stride: u32,
    end: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn depth(leaves: u32) -> u32 {
    // Longest proof for `leaves` leaves: ceil(log2(leaves)).
    if leaves <= 1 {
        0
    } else {
        32 - (leaves - 1).leading_zeros()
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Layout {
    fn new(unit: u32, mode: u8, m: &Manifest) -> Layout {
        let u = unit as u64;
        let chunks = m.chunks();
        let bitmap = mode == MODE_BITMAP;
        let void = mode == MODE_UNITS_SPARES;
        let header = align_up(HEADER_MAX as u64, u) + if void { u } else { 0 };
        let flag_bytes = if bitmap {
            align_up((chunks as u64).div_ceil(8), u)
        } else {
            chunks as u64 * u
        };
        let proof_stride = align_up(depth(chunks) as u64 * 32, u).max(u);
        let data_stride = align_up(m.chunk_size as u64, u);
        let flags_at = header;
        let proofs_at = flags_at + flag_bytes;
        let data_at = proofs_at + chunks as u64 * proof_stride;
        let spares_at = data_at + chunks as u64 * data_stride;
        let spares = if void { SPARES.min(chunks) } else { 0 };
        let claim_len = align_up(4, u);
        let spare_stride = claim_len + u + proof_stride + data_stride;
        let end = spares_at + spares as u64 * spare_stride;
        Layout {
            unit,
            mode,
            bitmap,
            void,
            chunks,
            chunk_size: m.chunk_size,
            flags_at: flags_at as u32,
            proofs_at: proofs_at.min(u32::MAX as u64) as u32,
            proof_stride: proof_stride as u32,
            data_at: data_at.min(u32::MAX as u64) as u32,
            data_stride: data_stride as u32,
            spares,
            spares_at: spares_at.min(u32::MAX as u64) as u32,
            claim_len: claim_len as u32,
            spare_stride: spare_stride.min(u32::MAX as u64) as u32,
            end,
        }
    }

    /// Offset of spare slot `s` (its claim unit; flag, proof and data follow).
    fn spare(&self, s: u32) -> u32 {
        self.spares_at + s * self.spare_stride
    }

    /// Where chunk `index`'s proof and data are in its primary slot.
    fn primary(&self, index: u32) -> (u32, u32) {
        (
            self.proofs_at + index * self.proof_stride,
            self.data_at + index * self.data_stride,
        )
    }

    /// Where the proof and data of spare slot `s` are.
    fn in_spare(&self, s: u32) -> (u32, u32) {
        let at = self.spare(s) + self.claim_len + self.unit;
        (at, at + self.proof_stride)
    }
}

/// Offsets (from the partition's start) of one content's parts, as [`FlashStore::regions`] gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    /// Chunks of the content.
    pub chunks: u32,
    /// Flags are bits of a bitmap (chunk `i`: bit `i % 8` of byte `i / 8`), else one unit each.
    pub bitmap: bool,
    /// The write unit, bytes.
    pub unit: u32,
    /// Where the flags start.
    pub flags_at: u32,
    /// Where chunk 0's proof slot starts.
    pub proofs_at: u32,
    /// Bytes from one proof slot to the next.
    pub proof_stride: u32,
    /// Where chunk 0's data slot starts.
    pub data_at: u32,
    /// Bytes from one data slot to the next.
    pub data_stride: u32,
}

/// An open content: its manifest, layout and verified count.
#[derive(Clone, Debug)]
struct Slot {
    manifest: Manifest,
    layout: Layout,
    verified: u32,
}

/// One content in a NOR flash partition `F` (see the module docs for the layout), and
/// optionally the agent's records in a record area `R`.
#[derive(Debug)]
pub struct FlashStore<F: NorFlash, R: NorFlash = F> {
    flash: F,
    bitmap: bool,
    slot: Option<Slot>,
    records: Option<RecordLog<R>>,
}

fn io<E: NorFlashError>(e: E) -> StoreError {
    match e.kind() {
        NorFlashErrorKind::OutOfBounds => StoreError::Full,
        _ => StoreError::Io,
    }
}

impl<F: NorFlash> FlashStore<F> {
    /// A store over `flash` with one write unit per chunk flag (any NOR flash).
    ///
    /// Call [`FlashStore::mount`] to pick up content already in the partition.
    pub fn new(flash: F) -> Self {
        FlashStore {
            flash,
            bitmap: false,
            slot: None,
            records: None,
        }
    }
}

/// The smallest unit a NOR flash can both read and write whole: the least common multiple
/// of its read and write sizes (the content store and the record log both work in it).
pub(crate) const fn io_unit(read: usize, write: usize) -> usize {
    let (mut a, mut b) = (read, write);
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    read / a * write
}

impl<F: NorFlash, R: NorFlash> FlashStore<F, R> {
    /// The read/write unit: the least common multiple of `READ_SIZE` and `WRITE_SIZE`.
    const UNIT: usize = io_unit(F::READ_SIZE, F::WRITE_SIZE);

    /// The same store keeping the agent's records in `area` (at least two erase blocks,
    /// apart from the content partition; see [`crate::records`]).
    pub fn with_records<R2: NorFlash>(self, area: R2) -> FlashStore<F, R2> {
        FlashStore {
            flash: self.flash,
            bitmap: self.bitmap,
            slot: self.slot,
            records: Some(RecordLog::new(area)),
        }
    }

    /// Where the mounted content's parts lie in the partition, for tools and tests that
    /// look at a device's flash from outside (the hardware-in-the-loop power cuts).
    pub fn regions(&self) -> Option<Regions> {
        let l = &self.slot.as_ref()?.layout;
        Some(Regions {
            chunks: l.chunks,
            bitmap: l.bitmap,
            unit: l.unit,
            flags_at: l.flags_at,
            proofs_at: l.proofs_at,
            proof_stride: l.proof_stride,
            data_at: l.data_at,
            data_stride: l.data_stride,
        })
    }

    /// The record area, if the store has one.
    pub fn records(&self) -> Option<&RecordLog<R>> {
        self.records.as_ref()
    }

    /// Gives the content flash and the record area's flash back.
    pub fn into_parts(self) -> (F, Option<R>) {
        (self.flash, self.records.map(RecordLog::into_inner))
    }

    fn record_log(&mut self) -> Result<&mut RecordLog<R>, StoreError> {
        self.records.as_mut().ok_or(StoreError::NoRecords)
    }

    /// Bytes a content needs in a partition of this flash type.
    pub fn required_size(manifest: &Manifest, multiwrite: bool) -> u64 {
        let unit = Self::UNIT.max(1) as u64;
        let mode = if multiwrite {
            MODE_BITMAP
        } else {
            MODE_UNITS_SPARES
        };
        let l = Layout::new(unit as u32, mode, manifest);
        align_up(l.end, F::ERASE_SIZE.max(1) as u64)
    }

    /// The flash underneath.
    pub fn flash(&self) -> &F {
        &self.flash
    }

    /// The flash underneath, mutably.
    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    /// Gives the flash back.
    pub fn into_inner(self) -> F {
        self.flash
    }

    /// The content held, if any.
    pub fn held_manifest(&self) -> Option<&Manifest> {
        self.slot.as_ref().map(|s| &s.manifest)
    }

    fn check_geometry() -> Result<u32, StoreError> {
        let u = Self::UNIT;
        if u == 0 || u > MAX_UNIT || gcd(u, MAX_UNIT) != u {
            return Err(StoreError::Unsupported);
        }
        Ok(u as u32)
    }

    /// Reads the partition's header and counts verified chunks; returns the content held.
    ///
    /// An erased or damaged header means the partition holds nothing (`Ok(None)`).
    pub fn mount(&mut self) -> Result<Option<&Manifest>, StoreError> {
        let unit = Self::check_geometry()?;
        self.slot = None;
        let mut buf = [0u8; HEADER_MAX as usize + MAX_UNIT];
        let len = align_up(HEADER_MAX as u64, unit as u64) as usize;
        if len > self.flash.capacity() {
            return Ok(None);
        }
        self.flash.read(0, &mut buf[..len]).map_err(io)?;
        if &buf[..8] != MAGIC {
            return Ok(None);
        }
        let mode = buf[8];
        match mode {
            MODE_UNITS | MODE_UNITS_SPARES => {}
            // Bitmap flags need a unit written more than once: only a multiwrite store.
            MODE_BITMAP if self.bitmap => {}
            _ => return Ok(None),
        }
        let mlen = u16::from_le_bytes([buf[9], buf[10]]) as usize;
        if HEADER_FIXED + mlen + CHECK_LEN > HEADER_MAX as usize {
            return Ok(None);
        }
        let body = &buf[..HEADER_FIXED + mlen];
        let check = &buf[HEADER_FIXED + mlen..HEADER_FIXED + mlen + CHECK_LEN];
        if Sha256::digest(body)[..CHECK_LEN] != *check {
            return Ok(None);
        }
        let Ok(manifest) = postcard::from_bytes::<Manifest>(&body[HEADER_FIXED..]) else {
            return Ok(None);
        };
        if manifest.check_limits(None).is_err() {
            return Ok(None);
        }
        let layout = Layout::new(unit, mode, &manifest);
        if layout.end > self.flash.capacity() as u64 {
            return Ok(None);
        }
        // A voided header: its content was being replaced when the power went.
        if layout.void && !self.erased(len as u32, unit)? {
            return Ok(None);
        }
        let mut slot = Slot {
            manifest,
            layout,
            verified: 0,
        };
        slot.verified = self.count_verified(&slot.layout)?;
        self.slot = Some(slot);
        Ok(self.slot.as_ref().map(|s| &s.manifest))
    }

    fn count_verified(&mut self, l: &Layout) -> Result<u32, StoreError> {
        let mut count = 0u32;
        let mut buf = [0u8; MAX_UNIT];
        let unit = l.unit as usize;
        if l.bitmap {
            let bytes = (l.chunks as usize).div_ceil(8);
            let mut off = 0usize;
            while off < bytes {
                let n = (MAX_UNIT / unit * unit)
                    .min(align_up((bytes - off) as u64, l.unit as u64) as usize);
                self.flash
                    .read(l.flags_at + off as u32, &mut buf[..n])
                    .map_err(io)?;
                for (i, b) in buf[..n].iter().enumerate() {
                    let first_chunk = (off + i) * 8;
                    for bit in 0..8 {
                        if first_chunk + bit < l.chunks as usize && b & (1 << bit) == 0 {
                            count += 1;
                        }
                    }
                }
                off += n;
            }
        } else {
            for i in 0..l.chunks {
                if self.flag_unit_is_set(l, i, &mut buf)? {
                    count += 1;
                }
            }
            // Chunks stored in a spare slot (their primary slot was cut short).
            for s in 0..l.spares {
                if let Some(i) = self.spare_holds(l, s)?
                    && !self.flag_unit_is_set(l, i, &mut buf)?
                {
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// The chunk spare slot `s` holds verified (claimed by it, flag set), if any.
    fn spare_holds(&mut self, l: &Layout, s: u32) -> Result<Option<u32>, StoreError> {
        let mut buf = [0u8; MAX_UNIT];
        let (claim, unit) = (l.claim_len as usize, l.unit as usize);
        let at = l.spare(s);
        self.flash.read(at, &mut buf[..claim]).map_err(io)?;
        let index = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if index >= l.chunks || buf[4..claim].iter().any(|&b| b != 0xFF) {
            return Ok(None);
        }
        self.flash
            .read(at + l.claim_len, &mut buf[..unit])
            .map_err(io)?;
        // Two spares never both hold a chunk: a spare is used only while it is not verified.
        Ok(buf[..unit].iter().all(|&b| b == 0).then_some(index))
    }

    /// Whether `len` bytes at `offset` are all erased.
    fn erased(&mut self, offset: u32, len: u32) -> Result<bool, StoreError> {
        let mut buf = [0u8; MAX_UNIT];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(MAX_UNIT as u32);
            self.flash
                .read(offset + off, &mut buf[..n as usize])
                .map_err(io)?;
            if buf[..n as usize].iter().any(|&b| b != 0xFF) {
                return Ok(false);
            }
            off += n;
        }
        Ok(true)
    }

    /// Where verified chunk `index`'s proof and data are; `None` if it is not verified.
    fn locate(&mut self, l: &Layout, index: u32) -> Result<Option<(u32, u32)>, StoreError> {
        if self.flag(l, index)? {
            return Ok(Some(l.primary(index)));
        }
        for s in 0..l.spares {
            if self.spare_holds(l, s)? == Some(index) {
                return Ok(Some(l.in_spare(s)));
            }
        }
        Ok(None)
    }

    fn flag_unit_is_set(
        &mut self,
        l: &Layout,
        index: u32,
        buf: &mut [u8; MAX_UNIT],
    ) -> Result<bool, StoreError> {
        let unit = l.unit as usize;
        self.flash
            .read(l.flags_at + index * l.unit, &mut buf[..unit])
            .map_err(io)?;
        Ok(buf[..unit].iter().all(|&b| b == 0))
    }

    fn flag(&mut self, l: &Layout, index: u32) -> Result<bool, StoreError> {
        let mut buf = [0u8; MAX_UNIT];
        if l.bitmap {
            let byte = index / 8;
            let at = byte / l.unit * l.unit;
            self.flash
                .read(l.flags_at + at, &mut buf[..l.unit as usize])
                .map_err(io)?;
            Ok(buf[(byte - at) as usize] & (1 << (index % 8)) == 0)
        } else {
            self.flag_unit_is_set(l, index, &mut buf)
        }
    }

    fn set_flag(&mut self, l: &Layout, index: u32) -> Result<(), StoreError> {
        let mut buf = [0u8; MAX_UNIT];
        let unit = l.unit as usize;
        if l.bitmap {
            let byte = index / 8;
            let at = byte / l.unit * l.unit;
            self.flash
                .read(l.flags_at + at, &mut buf[..unit])
                .map_err(io)?;
            buf[(byte - at) as usize] &= !(1 << (index % 8));
            self.flash.write(l.flags_at + at, &buf[..unit]).map_err(io)
        } else {
            self.flash
                .write(l.flags_at + index * l.unit, &buf[..unit])
                .map_err(io)
        }
    }

    /// Writes `data` at the aligned `offset`, padding the last unit with `0xFF`.
    fn write_padded(&mut self, offset: u32, data: &[u8], unit: usize) -> Result<(), StoreError> {
        let whole = data.len() / unit * unit;
        if whole > 0 {
            self.flash.write(offset, &data[..whole]).map_err(io)?;
        }
        if whole < data.len() {
            let mut tail = [0xFFu8; MAX_UNIT];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.flash
                .write(offset + whole as u32, &tail[..unit])
                .map_err(io)?;
        }
        Ok(())
    }

    /// Reads `out.len()` bytes from the aligned `offset`.
    fn read_exact(&mut self, offset: u32, out: &mut [u8], unit: usize) -> Result<(), StoreError> {
        let whole = out.len() / unit * unit;
        if whole > 0 {
            self.flash.read(offset, &mut out[..whole]).map_err(io)?;
        }
        if whole < out.len() {
            let mut tail = [0u8; MAX_UNIT];
            self.flash
                .read(offset + whole as u32, &mut tail[..unit])
                .map_err(io)?;
            let rest = out.len() - whole;
            out[whole..].copy_from_slice(&tail[..rest]);
        }
        Ok(())
    }

    /// Erases the partition's first `end` bytes and writes the header for `manifest`.
    fn format(&mut self, manifest: &Manifest, unit: u32) -> Result<Layout, StoreError> {
        let mode = if self.bitmap {
            MODE_BITMAP
        } else {
            MODE_UNITS_SPARES
        };
        let layout = Layout::new(unit, mode, manifest);
        let erase_end = align_up(layout.end, F::ERASE_SIZE.max(1) as u64);
        if erase_end > self.flash.capacity() as u64 || layout.end > u32::MAX as u64 {
            return Err(StoreError::Full);
        }
        self.slot = None;
        // A power cut during the erase may leave any block partly erased: the old header must
        // not outlive the flags, proofs and data it describes. On flash that allows it, its
        // magic is cleared first (no partial erase brings it back); on any flash the header's
        // block is erased on its own before the rest, whatever order the driver erases in.
        let u = unit as usize;
        let mut head = [0u8; MAX_UNIT];
        let head_len = HEADER_FIXED.div_ceil(u) * u;
        self.flash.read(0, &mut head[..head_len]).map_err(io)?;
        if &head[..8] == MAGIC {
            if self.bitmap {
                self.flash.write(0, &ZEROS[..u]).map_err(io)?;
            } else if head[8] == MODE_UNITS_SPARES {
                // Flash that writes a unit once: the header's void unit, erased until now.
                let void = align_up(HEADER_MAX as u64, unit as u64) as u32;
                if self.erased(void, unit)? {
                    self.flash.write(void, &ZEROS[..u]).map_err(io)?;
                }
            }
        }
        let first = (F::ERASE_SIZE.max(1) as u64).min(erase_end) as u32;
        self.flash.erase(0, first).map_err(io)?;
        if u64::from(first) < erase_end {
            self.flash.erase(first, erase_end as u32).map_err(io)?;
        }
        let mut buf = [0xFFu8; HEADER_MAX as usize + MAX_UNIT];
        buf[..8].copy_from_slice(MAGIC);
        buf[8] = mode;
        let mlen = postcard::to_slice(manifest, &mut buf[HEADER_FIXED..HEADER_MAX as usize])
            .map_err(|_| StoreError::Corrupt)?
            .len();
        if HEADER_FIXED + mlen + CHECK_LEN > HEADER_MAX as usize {
            return Err(StoreError::Corrupt);
        }
        buf[9..11].copy_from_slice(&(mlen as u16).to_le_bytes());
        let end = HEADER_FIXED + mlen;
        let check = Sha256::digest(&buf[..end]);
        buf[end..end + CHECK_LEN].copy_from_slice(&check[..CHECK_LEN]);
        let len = align_up(HEADER_MAX as u64, unit as u64) as usize;
        self.flash.write(0, &buf[..len]).map_err(io)?;
        Ok(layout)
    }

    fn slot_for(&self, root: &Digest) -> Result<&Slot, StoreError> {
        match &self.slot {
            Some(s) if s.manifest.root == *root => Ok(s),
            _ => Err(StoreError::Unknown),
        }
    }
}

impl<F: MultiwriteNorFlash> FlashStore<F> {
    /// A store over `flash` with one bit per chunk flag (flash that allows rewriting a unit).
    pub fn new_multiwrite(flash: F) -> Self {
        FlashStore {
            flash,
            bitmap: true,
            slot: None,
            records: None,
        }
    }
}

impl<F: NorFlash, R: NorFlash> ContentStore for FlashStore<F, R> {
    fn open(&mut self, manifest: &Manifest) -> Result<u32, StoreError> {
        let unit = Self::check_geometry()?;
        if let Some(s) = &self.slot
            && s.manifest.root == manifest.root
        {
            return Ok(s.verified);
        }
        let layout = self.format(manifest, unit)?;
        self.slot = Some(Slot {
            manifest: manifest.clone(),
            layout,
            verified: 0,
        });
        Ok(0)
    }

    fn manifest(&self, root: &Digest) -> Option<&Manifest> {
        self.slot_for(root).ok().map(|s| &s.manifest)
    }

    fn verified(&self, root: &Digest) -> Option<u32> {
        self.slot_for(root).ok().map(|s| s.verified)
    }

    fn is_verified(&mut self, root: &Digest, index: u32) -> Result<bool, StoreError> {
        let l = self.slot_for(root)?.layout;
        if index >= l.chunks {
            return Err(StoreError::BadIndex);
        }
        Ok(self.locate(&l, index)?.is_some())
    }

    fn write_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        data: &[u8],
        proof: &[Digest],
    ) -> Result<(), StoreError> {
        let slot = self.slot_for(root)?;
        let l = slot.layout;
        if index >= l.chunks {
            return Err(StoreError::BadIndex);
        }
        if data.len() != slot.manifest.chunk_len(index) as usize
            || proof.len() != merkle::proof_len(index, l.chunks)
        {
            return Err(StoreError::BadLength);
        }
        if self.locate(&l, index)?.is_some() {
            return Ok(());
        }
        let unit = l.unit as usize;
        let (mut proof_at, mut data_at) = l.primary(index);
        let mut spare = None;
        if l.spares > 0 {
            // Flash that writes a unit once: a primary slot an earlier attempt left written
            // in part cannot take the chunk; the next free spare slot does.
            let flag_at = l.flags_at + index * l.unit;
            let clean = self.erased(flag_at, l.unit)?
                && self.erased(proof_at, l.proof_stride)?
                && self.erased(data_at, l.data_stride)?;
            if !clean {
                let mut free = None;
                for s in 0..l.spares {
                    if self.erased(l.spare(s), l.spare_stride)? {
                        free = Some(s);
                        break;
                    }
                }
                // Every spare used: the content cannot complete until it is opened afresh.
                let s = free.ok_or(StoreError::Io)?;
                // 0. The claim: this spare is chunk `index`'s.
                let mut claim = [0xFFu8; MAX_UNIT];
                claim[..4].copy_from_slice(&index.to_le_bytes());
                self.flash
                    .write(l.spare(s), &claim[..l.claim_len as usize])
                    .map_err(io)?;
                (proof_at, data_at) = l.in_spare(s);
                spare = Some(s);
            }
        }
        // 1. Data.
        self.write_padded(data_at, data, unit)?;
        // 2. Proof.
        let mut pbuf = [0xFFu8; MAX_DEPTH * 32];
        for (dst, h) in pbuf.chunks_mut(32).zip(proof) {
            dst.copy_from_slice(h);
        }
        let plen = proof.len() * 32;
        if plen > 0 {
            self.write_padded(proof_at, &pbuf[..plen], unit)?;
        }
        // 3. The flag: from here on the chunk counts as verified.
        match spare {
            Some(s) => self
                .flash
                .write(l.spare(s) + l.claim_len, &ZEROS[..unit])
                .map_err(io)?,
            None => self.set_flag(&l, index)?,
        }
        if let Some(s) = &mut self.slot {
            s.verified += 1;
        }
        Ok(())
    }

    fn read_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        data: &mut [u8],
        proof: &mut Proof,
    ) -> Result<usize, StoreError> {
        let slot = self.slot_for(root)?;
        let l = slot.layout;
        if index >= l.chunks {
            return Err(StoreError::BadIndex);
        }
        let len = slot.manifest.chunk_len(index) as usize;
        if data.len() < len {
            return Err(StoreError::BadLength);
        }
        let Some((proof_at, data_at)) = self.locate(&l, index)? else {
            return Err(StoreError::NotVerified);
        };
        let unit = l.unit as usize;
        self.read_exact(data_at, &mut data[..len], unit)?;
        let plen = merkle::proof_len(index, l.chunks);
        let mut pbuf = [0u8; MAX_DEPTH * 32];
        self.read_exact(proof_at, &mut pbuf[..plen * 32], unit)?;
        proof.clear();
        for h in pbuf[..plen * 32].chunks(32) {
            let mut d = [0u8; 32];
            d.copy_from_slice(h);
            proof.push(d).map_err(|_| StoreError::BadLength)?;
        }
        Ok(len)
    }

    fn held(&self, i: usize) -> Option<Held<'_>> {
        match (&self.slot, i) {
            (Some(s), 0) => Some(Held {
                manifest: &s.manifest,
                verified: s.verified,
            }),
            _ => None,
        }
    }

    fn free_bytes(&self) -> u64 {
        let used = self.slot.as_ref().map_or(0, |s| s.layout.end);
        (self.flash.capacity() as u64).saturating_sub(used)
    }

    fn load_anchor(&mut self) -> Result<Option<StoredAnchor>, StoreError> {
        self.record_log()?.load_anchor()
    }

    fn save_anchor(&mut self, anchor: &StoredAnchor) -> Result<(), StoreError> {
        self.record_log()?.save_anchor(anchor)
    }

    fn version_record(&mut self, name: &str) -> Result<Option<VersionRecord>, StoreError> {
        self.record_log()?.version_record(name)
    }

    fn put_version_record(&mut self, name: &str, record: &VersionRecord) -> Result<(), StoreError> {
        self.record_log()?.put_version_record(name, record)
    }

    fn load_latest_time(&mut self) -> Result<Option<u64>, StoreError> {
        self.record_log()?.load_latest_time()
    }

    fn save_latest_time(&mut self, unix: u64) -> Result<(), StoreError> {
        self.record_log()?.save_latest_time(unix)
    }
}

/// Test doubles: a RAM NOR flash that can fail after N writes, and a fault-injecting NOR
/// flash that loses power at a chosen operation (cleanly or tearing it).
#[cfg(any(test, feature = "std"))]
pub mod testing {
    extern crate std;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::vec;
    use std::vec::Vec;

    use embedded_storage::nor_flash::{
        ErrorType, MultiwriteNorFlash, NorFlash, NorFlashErrorKind, ReadNorFlash, check_erase,
        check_read, check_write,
    };

    /// A NOR flash in RAM with `W`-byte write units and `E`-byte erase blocks.
    ///
    /// Writes AND into the cells (only clearing bits). With `strict`, writing a
    /// unit that is not fully erased is an error (flash without multi-write).
    #[derive(Clone, Debug)]
    pub struct RamFlash<const W: usize, const E: usize> {
        /// The cells.
        pub mem: Vec<u8>,
        /// Refuse to write a unit twice.
        pub strict: bool,
        /// Writes so far.
        pub writes: usize,
        /// Fail every write once this many have succeeded (a power cut or full disk).
        pub fail_after: Option<usize>,
        /// On the failing write, write this many bytes first (a torn write).
        pub torn: usize,
    }

    impl<const W: usize, const E: usize> RamFlash<W, E> {
        /// Erased flash of `size` bytes.
        pub fn new(size: usize) -> Self {
            RamFlash {
                mem: vec![0xFF; size],
                strict: false,
                writes: 0,
                fail_after: None,
                torn: 0,
            }
        }
    }

    impl<const W: usize, const E: usize> ErrorType for RamFlash<W, E> {
        type Error = NorFlashErrorKind;
    }

    impl<const W: usize, const E: usize> ReadNorFlash for RamFlash<W, E> {
        const READ_SIZE: usize = 1;

        fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
            check_read(self, offset, bytes.len())?;
            let o = offset as usize;
            bytes.copy_from_slice(&self.mem[o..o + bytes.len()]);
            Ok(())
        }

        fn capacity(&self) -> usize {
            self.mem.len()
        }
    }

    impl<const W: usize, const E: usize> NorFlash for RamFlash<W, E> {
        const WRITE_SIZE: usize = W;
        const ERASE_SIZE: usize = E;

        fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
            check_erase(self, from, to)?;
            self.mem[from as usize..to as usize].fill(0xFF);
            Ok(())
        }

        fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
            check_write(self, offset, bytes.len())?;
            let o = offset as usize;
            let mut n = bytes.len();
            let failing = self.fail_after.is_some_and(|f| self.writes >= f);
            if failing {
                n = self.torn.min(n);
            }
            if self.strict && self.mem[o..o + n].iter().any(|&b| b != 0xFF) {
                return Err(NorFlashErrorKind::Other);
            }
            for (cell, b) in self.mem[o..o + n].iter_mut().zip(bytes) {
                *cell &= *b;
            }
            if failing {
                return Err(NorFlashErrorKind::Other);
            }
            self.writes += 1;
            Ok(())
        }
    }

    impl<const W: usize, const E: usize> MultiwriteNorFlash for RamFlash<W, E> {}

    /// What a power cut does to the flash operation it interrupts.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Cut {
        /// The operation is not applied at all.
        Clean,
        /// Torn in address order: a write programs its first words fully, one word partly
        /// (a random subset of its 1→0 transitions) and the rest not at all; an erase erases
        /// its first blocks, leaves one block as an erase cut just after it began (a few
        /// random bits of it set back to 1) and the rest untouched.
        TornInOrder,
        /// Torn anywhere: a write makes a random subset of all its 1→0 transitions; an erase
        /// works from its last block down and leaves one block half erased (each bit set
        /// back to 1 or not at random).
        TornScattered,
    }

    /// The power supply shared by every [`FaultFlash`] of one device: counts the erase and
    /// write operations and cuts the power at one of them.
    #[derive(Debug, Default)]
    pub struct Power {
        /// Erase and write operations started so far (the cut one included).
        pub ops: usize,
        /// The operation (0-based) at which the power goes, and what it does to it.
        pub cut_at: Option<(usize, Cut)>,
        /// Erase operations started so far: the operation index of each and its block count.
        pub erases: Vec<(usize, usize)>,
        /// The block (counted in the order the erase works) an erase cut by a torn cut leaves
        /// partly erased; `None` picks one at random.
        pub torn_block: Option<usize>,
        /// Whether the power is off (every operation, reads included, fails).
        pub off: bool,
        /// State of the generator that picks torn bits (xorshift64; any nonzero seed).
        pub seed: u64,
    }

    impl Power {
        /// A supply with power on and no cut planned; `seed` picks the torn bits.
        pub fn new(seed: u64) -> Rc<RefCell<Power>> {
            Rc::new(RefCell::new(Power {
                seed: seed | 1,
                ..Power::default()
            }))
        }

        /// Power back on with a fresh count and no cut planned (a reboot).
        pub fn restore(&mut self) {
            self.ops = 0;
            self.erases.clear();
            self.cut_at = None;
            self.torn_block = None;
            self.off = false;
        }

        fn next(&mut self) -> u64 {
            let mut x = self.seed;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.seed = x;
            x
        }

        /// Starts an operation: `None` to apply it whole, `Some(cut)` if the power goes
        /// during it, `Err` if the power is already off.
        fn start(&mut self) -> Result<Option<Cut>, NorFlashErrorKind> {
            if self.off {
                return Err(NorFlashErrorKind::Other);
            }
            let op = self.ops;
            self.ops += 1;
            match self.cut_at {
                Some((at, cut)) if at == op => {
                    self.off = true;
                    Ok(Some(cut))
                }
                _ => Ok(None),
            }
        }
    }

    /// A NOR flash in RAM with `W`-byte write units and `E`-byte erase blocks, on a shared
    /// [`Power`] that can fail at any erase or write (see [`Cut`]).
    ///
    /// Writes AND into the cells. With `strict`, writing a unit that is not fully erased
    /// is an error (flash without multi-write); otherwise it is a [`MultiwriteNorFlash`].
    #[derive(Clone, Debug)]
    pub struct FaultFlash<const W: usize, const E: usize> {
        /// The cells.
        pub mem: Vec<u8>,
        /// Refuse to write a unit twice.
        pub strict: bool,
        /// The power supply (shared with the device's other flash areas).
        pub power: Rc<RefCell<Power>>,
    }

    impl<const W: usize, const E: usize> FaultFlash<W, E> {
        /// Erased flash of `size` bytes on `power`.
        pub fn new(size: usize, power: Rc<RefCell<Power>>) -> Self {
            FaultFlash {
                mem: vec![0xFF; size],
                strict: false,
                power,
            }
        }
    }

    impl<const W: usize, const E: usize> ErrorType for FaultFlash<W, E> {
        type Error = NorFlashErrorKind;
    }

    impl<const W: usize, const E: usize> ReadNorFlash for FaultFlash<W, E> {
        const READ_SIZE: usize = 1;

        fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
            check_read(self, offset, bytes.len())?;
            if self.power.borrow().off {
                return Err(NorFlashErrorKind::Other);
            }
            let o = offset as usize;
            bytes.copy_from_slice(&self.mem[o..o + bytes.len()]);
            Ok(())
        }

        fn capacity(&self) -> usize {
            self.mem.len()
        }
    }

    impl<const W: usize, const E: usize> NorFlash for FaultFlash<W, E> {
        const WRITE_SIZE: usize = W;
        const ERASE_SIZE: usize = E;

        fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
            check_erase(self, from, to)?;
            let (from, to) = (from as usize, to as usize);
            if from == to {
                return Ok(());
            }
            let mut power = self.power.borrow_mut();
            let blocks = (to - from) / E;
            let cut = power.start()?;
            let op = power.ops - 1;
            power.erases.push((op, blocks));
            let Some(cut) = cut else {
                self.mem[from..to].fill(0xFF);
                return Ok(());
            };
            if cut == Cut::Clean {
                return Err(NorFlashErrorKind::Other);
            }
            let partial = match power.torn_block {
                Some(b) => b.min(blocks - 1),
                None => (power.next() % blocks as u64) as usize,
            };
            // Blocks in the order the erase works through them; the `partial`-th is cut.
            for step in 0..=partial {
                let block = if cut == Cut::TornInOrder {
                    step
                } else {
                    blocks - 1 - step
                };
                let cells = &mut self.mem[from + block * E..from + (block + 1) * E];
                if step < partial {
                    cells.fill(0xFF);
                } else if cut == Cut::TornInOrder {
                    for _ in 0..=power.next() % 8 {
                        let bit = power.next() as usize % (E * 8);
                        cells[bit / 8] |= 1 << (bit % 8);
                    }
                } else {
                    for cell in cells {
                        *cell |= power.next() as u8;
                    }
                }
            }
            Err(NorFlashErrorKind::Other)
        }

        fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
            check_write(self, offset, bytes.len())?;
            let o = offset as usize;
            if self.strict && self.mem[o..o + bytes.len()].iter().any(|&b| b != 0xFF) {
                return Err(NorFlashErrorKind::Other);
            }
            let mut power = self.power.borrow_mut();
            let cut = power.start()?;
            let cells = &mut self.mem[o..o + bytes.len()];
            match cut {
                None => {
                    for (cell, b) in cells.iter_mut().zip(bytes) {
                        *cell &= *b;
                    }
                    return Ok(());
                }
                Some(Cut::Clean) => {}
                Some(Cut::TornInOrder) => {
                    let words = bytes.len() / W;
                    let partial = (power.next() % words as u64) as usize;
                    for (i, (cell, b)) in cells.iter_mut().zip(bytes).enumerate() {
                        if i / W < partial {
                            *cell &= *b;
                        } else if i / W == partial {
                            *cell &= *b | power.next() as u8;
                        }
                    }
                }
                Some(Cut::TornScattered) => {
                    for (cell, b) in cells.iter_mut().zip(bytes) {
                        *cell &= *b | power.next() as u8;
                    }
                }
            }
            Err(NorFlashErrorKind::Other)
        }
    }

    impl<const W: usize, const E: usize> MultiwriteNorFlash for FaultFlash<W, E> {}
}

#[cfg(test)]
mod test {
    extern crate std;
    use std::vec::Vec;

    use baton_protocol::identity::Identity;
    use baton_protocol::merkle::{MerkleTree, leaf_hash};

    use super::testing::RamFlash;
    use super::*;

    struct Content {
        manifest: Manifest,
        data: Vec<u8>,
        tree: MerkleTree,
    }

    fn content(len: usize, chunk: u32) -> Content {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 256) as u8).collect();
        let leaves = data.chunks(chunk as usize).map(leaf_hash).collect();
        let tree = MerkleTree::from_leaves(leaves);
        let manifest = Manifest::sign(
            &Identity::from_seed([4; 32]),
            heapless::String::try_from("fw").unwrap(),
            1,
            0,
            len as u64,
            chunk,
            tree.root(),
        );
        Content {
            manifest,
            data,
            tree,
        }
    }

    impl Content {
        fn chunk(&self, i: u32) -> &[u8] {
            let cs = self.manifest.chunk_size as usize;
            let start = i as usize * cs;
            &self.data[start..(start + cs).min(self.data.len())]
        }
        fn proof(&self, i: u32) -> Proof {
            self.tree.proof(i).unwrap()
        }
    }

    /// Stores, reads back and remounts (with `remount`, a store of the same kind).
    fn roundtrip<F: NorFlash>(mut store: FlashStore<F>, remount: fn(F) -> FlashStore<F>) {
        let c = content(10_000, 1000);
        let root = c.manifest.root;
        assert_eq!(store.open(&c.manifest), Ok(0));
        for i in [3u32, 0, 9] {
            store
                .write_chunk(&root, i, c.chunk(i), &c.proof(i))
                .unwrap();
        }
        assert_eq!(store.verified(&root), Some(3));
        let mut buf = [0u8; 1000];
        let mut proof = Proof::new();
        for i in [3u32, 0, 9] {
            let n = store.read_chunk(&root, i, &mut buf, &mut proof).unwrap();
            assert_eq!(&buf[..n], c.chunk(i));
            assert_eq!(proof, c.proof(i));
        }
        assert_eq!(
            store.read_chunk(&root, 4, &mut buf, &mut proof),
            Err(StoreError::NotVerified)
        );
        assert_eq!(
            store.write_chunk(&root, 4, &c.chunk(4)[1..], &c.proof(4)),
            Err(StoreError::BadLength)
        );
        assert_eq!(store.verified(&[0; 32]), None);
        // Remount: the same verified set.
        let flash = store.into_inner();
        let mut store = remount(flash);
        assert_eq!(store.mount().unwrap().map(|m| m.root), Some(root));
        assert_eq!(store.verified(&root), Some(3));
        for i in 0..10 {
            assert_eq!(
                store.is_verified(&root, i).unwrap(),
                [0, 3, 9].contains(&i),
                "{i}"
            );
        }
        // Reopening the same content resumes.
        assert_eq!(store.open(&c.manifest), Ok(3));
    }

    #[test]
    fn roundtrip_unit_flags_on_strict_flash() {
        let mut f = RamFlash::<8, 4096>::new(64 * 1024);
        f.strict = true;
        roundtrip(FlashStore::new(f), FlashStore::new);
    }

    #[test]
    fn roundtrip_bitmap_on_multiwrite_flash() {
        roundtrip(
            FlashStore::new_multiwrite(RamFlash::<4, 1024>::new(64 * 1024)),
            FlashStore::new_multiwrite,
        );
        roundtrip(
            FlashStore::new_multiwrite(RamFlash::<1, 256>::new(64 * 1024)),
            FlashStore::new_multiwrite,
        );
    }

    #[test]
    fn a_bitmap_partition_is_not_taken_by_a_store_that_writes_units_once() {
        let c = content(3000, 1000);
        let mut store = FlashStore::new_multiwrite(RamFlash::<4, 1024>::new(64 * 1024));
        store.open(&c.manifest).unwrap();
        let mut store = FlashStore::new(store.into_inner());
        assert_eq!(store.mount(), Ok(None));
    }

    #[test]
    fn on_strict_flash_a_chunk_cut_short_completes_in_a_spare_slot() {
        let c = content(8_000, 1000);
        let root = c.manifest.root;
        let mut f = RamFlash::<4, 1024>::new(64 * 1024);
        f.strict = true;
        let mut store = FlashStore::new(f);
        store.open(&c.manifest).unwrap();
        // Lets one more write succeed, then cuts; remounts.
        fn cut_after_one(store: &mut FlashStore<RamFlash<4, 1024>>, c: &Content, i: u32) {
            let w = store.flash().writes;
            store.flash_mut().fail_after = Some(w + 1);
            let r = store.write_chunk(&c.manifest.root, i, c.chunk(i), &c.proof(i));
            assert_eq!(r, Err(StoreError::Io));
            store.flash_mut().fail_after = None;
            store.mount().unwrap().unwrap();
        }
        // Chunk 2's primary slot keeps its data, not its proof: it goes to spare 0.
        cut_after_one(&mut store, &c, 2);
        assert!(!store.is_verified(&root, 2).unwrap());
        store
            .write_chunk(&root, 2, c.chunk(2), &c.proof(2))
            .unwrap();
        store.mount().unwrap().unwrap();
        assert_eq!(store.verified(&root), Some(1));
        let (mut buf, mut proof) = ([0u8; 1000], Proof::new());
        let n = store.read_chunk(&root, 2, &mut buf, &mut proof).unwrap();
        assert_eq!((&buf[..n], &proof), (c.chunk(2), &c.proof(2)));
        // Chunk 5: its primary slot, then every other spare, each cut after its first write.
        for _ in 0..SPARES {
            cut_after_one(&mut store, &c, 5);
        }
        let writes = store.flash().writes;
        assert_eq!(
            store.write_chunk(&root, 5, c.chunk(5), &c.proof(5)),
            Err(StoreError::Io),
            "no spare left"
        );
        assert_eq!(
            store.flash().writes,
            writes,
            "nothing written over a used slot"
        );
        // The others still complete.
        for i in [0, 1, 3, 4, 6, 7] {
            store
                .write_chunk(&root, i, c.chunk(i), &c.proof(i))
                .unwrap();
        }
        store.mount().unwrap().unwrap();
        assert_eq!(store.verified(&root), Some(7));
    }

    #[test]
    fn too_small_partition_is_full() {
        let c = content(10_000, 1000);
        let mut store = FlashStore::new(RamFlash::<4, 1024>::new(8 * 1024));
        assert_eq!(store.open(&c.manifest), Err(StoreError::Full));
        assert!(FlashStore::<RamFlash<4, 1024>>::required_size(&c.manifest, false) > 8 * 1024);
    }

    #[test]
    fn empty_or_damaged_partition_mounts_empty() {
        let mut store = FlashStore::new(RamFlash::<4, 1024>::new(64 * 1024));
        assert_eq!(store.mount(), Ok(None));
        let c = content(3000, 1000);
        store.open(&c.manifest).unwrap();
        let mut flash = store.into_inner();
        flash.mem[20] ^= 0x01; // inside the manifest: the checksum fails
        let mut store = FlashStore::new(flash);
        assert_eq!(store.mount(), Ok(None));
    }

    /// Writes chunks until the flash fails after `n` writes; checks the verified set.
    fn power_cut_after(n: usize, torn: usize, bitmap: bool) {
        let c = content(8_000, 1000);
        let root = c.manifest.root;
        let mut flash = RamFlash::<4, 1024>::new(64 * 1024);
        flash.strict = !bitmap;
        let mut store = if bitmap {
            FlashStore::new_multiwrite(flash)
        } else {
            FlashStore::new(flash)
        };
        store.open(&c.manifest).unwrap();
        let base = store.flash().writes;
        store.flash_mut().fail_after = Some(base + n);
        store.flash_mut().torn = torn;
        let mut done = Vec::new();
        for i in 0..8 {
            match store.write_chunk(&root, i, c.chunk(i), &c.proof(i)) {
                Ok(()) => done.push(i),
                Err(e) => {
                    assert_eq!(e, StoreError::Io);
                    break;
                }
            }
        }
        assert!(
            done.len() < 8,
            "the flash must fail within the content: n={n} torn={torn} bitmap={bitmap}"
        );
        // Power back on: a fresh store over the same cells.
        let mut flash = store.into_inner();
        flash.fail_after = None;
        let mut store = if bitmap {
            FlashStore::new_multiwrite(flash)
        } else {
            FlashStore::new(flash)
        };
        store.mount().unwrap().unwrap();
        // The chunk being written when the power went: verified only if its
        // flag landed (a torn flag write), and then its data and proof are whole.
        let cut = done.len() as u32;
        let mut buf = [0u8; 1000];
        let mut proof = Proof::new();
        let mut verified_count = 0;
        for i in 0..8 {
            let verified = store.is_verified(&root, i).unwrap();
            if torn == 0 || i != cut {
                assert_eq!(verified, done.contains(&i), "n={n} torn={torn} chunk {i}");
            }
            if verified {
                verified_count += 1;
                let len = store.read_chunk(&root, i, &mut buf, &mut proof).unwrap();
                assert_eq!(&buf[..len], c.chunk(i));
                merkle::verify_leaf(&root, 8, i, &leaf_hash(&buf[..len]), &proof).unwrap();
            }
        }
        assert_eq!(store.verified(&root), Some(verified_count));
    }

    #[test]
    fn power_cut_at_every_write_keeps_exactly_the_finished_chunks() {
        // Each chunk is data (1 write of whole units + 1 tail write at most),
        // proof, flag: cut at every position, cleanly and torn.
        for n in 0..20 {
            for torn in [0, 2] {
                power_cut_after(n, torn, false);
                power_cut_after(n, torn, true);
            }
        }
    }

    #[test]
    fn geometry_helpers() {
        assert_eq!(depth(1), 0);
        assert_eq!(depth(2), 1);
        assert_eq!(depth(3), 2);
        assert_eq!(depth(8), 3);
        assert_eq!(depth(9), 4);
        for n in 1..100 {
            for i in 0..n {
                assert!(merkle::proof_len(i, n) as u32 <= depth(n));
            }
        }
    }
}
