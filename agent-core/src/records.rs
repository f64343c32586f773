//! The agent's records in a small NOR flash area, safe against power cuts.
//!
//! [`RecordLog`] keeps the records of [`crate::store`] (trust anchor, latest time seen,
//! one version record per content name) in an area of at least two erase blocks, apart
//! from the content partition (erasing content never touches it). The area is split in
//! two banks of whole erase blocks:
//!
//! ```text
//! header   "BATONRC2", sequence (u32 LE), its complement (u32 LE), padded to the write unit
//! seal     one write unit, cleared to 0x00 once the bank's first copy is complete
//! entries  one after the other, each:
//!            length (u16 LE), kind (u8), payload, check (8 bytes: SHA-256 of
//!            length ‖ kind ‖ payload, truncated), padded with 0xFF to the write unit;
//!            then one commit unit, cleared to 0x00 once the entry is written
//! free     erased (0xFF)
//! ```
//!
//! Writing is *new, then mark*: an entry counts only once its commit unit is cleared and its
//! check passes, and a later entry of the same key (the kind, and for version records the
//! content name) replaces an earlier one. The live bank is the sealed one with the higher
//! sequence. Every write is whole aligned units of erased flash, so any NOR flash works (no
//! unit is written twice).
//!
//! A power cut leaves at most one bad entry, the last one (a torn append): the log ends
//! there, and as the flash after it is not clean the next write first compacts. Compaction
//! (also when the bank is full) erases the other bank, writes its header with the next
//! sequence, copies the live entries and seals it last: a power cut during the copy leaves
//! the old bank live. A power cut while the other bank is erased can leave it partly erased,
//! header and seal intact but some bits of its sequence set back to 1 (a larger number): the
//! complement stored beside it no longer matches then, so that bank is never taken for the
//! live one. (Banks of format 1, "BATONRC1" without the complement, are still read; any bank
//! of format 2 is preferred to them, and compaction writes format 2.)
//!
//! Anything else is *damage* (flash that decayed): an entry that was committed but fails its
//! check, or a bad entry followed by written flash. The key of a damaged entry cannot be
//! trusted, so it may have been any key's newest value: from then on every key whose newest
//! good entry comes before the damage reads [`StoreError::Corrupt`] (never an older value,
//! never "no record"), and keys written after it read their value. Compaction keeps this by
//! writing a *damage marker* entry before the entries it copies from after the damage.
//!
//! Bounds: [`MAX_NAMES`] content names (a record for a further name is refused with
//! [`StoreError::Full`]: the agent then fails that job with `StorageFull` rather than
//! accept content it could not protect from a rollback); entries of at most
//! [`MAX_PAYLOAD`] bytes; a bank must hold the largest live set (checked when mounted).

use baton_protocol::manifest::MAX_CONTENT_NAME;
use baton_protocol::trust::{MAX_ROOT_KEYS, TrustAnchor};
use baton_protocol::{Digest, PublicKey};
use embedded_storage::nor_flash::{NorFlash, NorFlashError, NorFlashErrorKind};
use sha2::{Digest as _, Sha256};

use crate::store::{StoreError, StoredAnchor, VersionRecord};

/// Most content names with a version record in a flash record area.
pub const MAX_NAMES: usize = 16;
/// Largest entry payload, in bytes (a stored anchor takes at most 202).
pub const MAX_PAYLOAD: usize = 240;
/// Largest write unit supported (and the size of the one entry buffer kept on the stack).
const BUF: usize = crate::flash::MAX_UNIT;
/// Bank magic: format 2 of Baton's record area (the sequence with its complement).
const MAGIC: &[u8; 8] = b"BATONRC2";
/// Bytes of a bank header before padding: magic, sequence and its complement.
const HEADER: usize = 16;
/// Bank magic of format 1 (read, never written).
const MAGIC_V1: &[u8; 8] = b"BATONRC1";
/// Bytes of a format 1 bank header before padding: magic and sequence.
const HEADER_V1: usize = 12;
/// Bytes before an entry's payload: length and kind.
const ENTRY_HEAD: usize = 3;
/// Bytes of an entry's check.
const CHECK: usize = 8;
/// Payload of a version record: name length, name, version, root.
const VERSION_PAYLOAD_MAX: usize = 1 + MAX_CONTENT_NAME + 8 + 32;

/// A cleared write unit: a commit mark or a seal (in flash, not on the stack).
static ZEROS: [u8; BUF] = [0; BUF];

/// What an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Anchor = 1,
    Time = 2,
    Version = 3,
    /// A damage marker: every key with no newer entry reads `Corrupt` (empty payload).
    Damaged = 4,
}

fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

fn io<E: NorFlashError>(e: E) -> StoreError {
    match e.kind() {
        NorFlashErrorKind::OutOfBounds => StoreError::Full,
        _ => StoreError::Io,
    }
}

fn check_of(body: &[u8]) -> [u8; CHECK] {
    let mut out = [0u8; CHECK];
    out.copy_from_slice(&Sha256::digest(body)[..CHECK]);
    out
}

/// Writes `a` as pin (32), version (u64 LE), threshold, root count, roots (32 each),
/// digest (32) — a fixed layout, no serializer in the firmware for it; returns the length.
fn encode_anchor(a: &StoredAnchor, out: &mut [u8]) -> usize {
    let n = a.anchor.roots.len();
    out[..32].copy_from_slice(&a.pin);
    out[32..40].copy_from_slice(&a.anchor.version.to_le_bytes());
    out[40] = a.anchor.threshold;
    out[41] = n as u8;
    for (i, r) in a.anchor.roots.iter().enumerate() {
        out[42 + 32 * i..74 + 32 * i].copy_from_slice(&r.0);
    }
    let at = 42 + 32 * n;
    out[at..at + 32].copy_from_slice(&a.anchor.digest);
    at + 32
}

/// Reads what [`encode_anchor`] wrote; `None` if it is not that.
fn decode_anchor(b: &[u8]) -> Option<StoredAnchor> {
    let n = usize::from(*b.get(41)?);
    if n > MAX_ROOT_KEYS || b.len() != 42 + 32 * n + 32 {
        return None;
    }
    let mut pin: Digest = [0; 32];
    pin.copy_from_slice(&b[..32]);
    let mut version = [0u8; 8];
    version.copy_from_slice(&b[32..40]);
    let mut roots = heapless::Vec::new();
    for i in 0..n {
        let mut k = [0u8; 32];
        k.copy_from_slice(&b[42 + 32 * i..74 + 32 * i]);
        roots.push(PublicKey(k)).ok()?;
    }
    let mut digest: Digest = [0; 32];
    digest.copy_from_slice(&b[42 + 32 * n..]);
    Some(StoredAnchor {
        pin,
        anchor: TrustAnchor {
            version: u64::from_le_bytes(version),
            threshold: b[40],
            roots,
            digest,
        },
    })
}

/// The bank in use.
#[derive(Clone, Copy, Debug)]
struct Live {
    bank: u32,
    seq: u32,
    /// Whether the bank is of format 2 (its sequence checked against its complement).
    v2: bool,
    /// Offset (within the bank) of its first entry.
    first: u32,
    /// Offset (within the bank) of the first byte after the last good entry.
    end: u32,
    /// False when the scan stopped at an uncommitted or damaged entry: compact before writing.
    clean: bool,
    /// Where the last damage (a damaged stretch or a marker) starts: every key whose newest
    /// good entry lies before it reads `Corrupt`.
    damage: Option<u32>,
}

/// One entry found by a scan.
#[derive(Clone, Copy, Debug)]
struct Entry {
    kind: u8,
    len: usize,
    /// Bytes the entry takes, commit unit included.
    size: u32,
}

/// What a scan found at an offset.
enum Scan {
    /// Erased: the free space starts here.
    End,
    /// Uncommitted, with an impossible length, or overrunning the bank.
    Bad,
    /// Committed but failing its check: decayed (a power cut cannot leave this).
    Damaged,
    /// A good entry.
    Entry(Entry),
}

/// The record area over NOR flash `R` (see the module docs).
#[derive(Debug)]
pub struct RecordLog<R: NorFlash> {
    flash: R,
    /// Bytes of one bank.
    bank_size: u32,
    /// `None` until mounted (on first use).
    mounted: Option<Option<Live>>,
}

impl<R: NorFlash> RecordLog<R> {
    /// The read/write unit: the least common multiple of `READ_SIZE` and `WRITE_SIZE`.
    const UNIT: usize = crate::flash::io_unit(R::READ_SIZE, R::WRITE_SIZE);

    /// A record area over all of `flash` (mounted on first use).
    pub fn new(flash: R) -> Self {
        let erase = R::ERASE_SIZE.max(1);
        let bank_size = (flash.capacity() / 2 / erase * erase) as u32;
        RecordLog {
            flash,
            bank_size,
            mounted: None,
        }
    }

    /// The flash underneath.
    pub fn flash(&self) -> &R {
        &self.flash
    }

    /// Gives the flash back.
    pub fn into_inner(self) -> R {
        self.flash
    }

    fn unit() -> Result<usize, StoreError> {
        let u = Self::UNIT;
        if u == 0 || u > BUF || !BUF.is_multiple_of(u) {
            return Err(StoreError::Unsupported);
        }
        Ok(u)
    }

    fn entry_size(payload: usize, u: usize) -> usize {
        align_up(ENTRY_HEAD + payload + CHECK, u) + u
    }

    /// Where entries start in a bank written now: after the header and the seal.
    fn entries_at(u: usize) -> u32 {
        (align_up(HEADER, u) + u) as u32
    }

    /// Bytes a bank needs for the largest live set.
    fn needed(u: usize) -> usize {
        Self::entries_at(u) as usize
            + Self::entry_size(0, u)
            + Self::entry_size(MAX_PAYLOAD, u)
            + Self::entry_size(8, u)
            + MAX_NAMES * Self::entry_size(VERSION_PAYLOAD_MAX, u)
    }

    fn bank_at(&self, bank: u32) -> u32 {
        bank * self.bank_size
    }

    /// Mounts the area if not yet done; returns the live bank, if any.
    fn live(&mut self) -> Result<Option<Live>, StoreError> {
        if let Some(live) = self.mounted {
            return Ok(live);
        }
        let u = Self::unit()?;
        if (self.bank_size as usize) < Self::needed(u) {
            return Err(StoreError::Unsupported);
        }
        let mut best: Option<Live> = None;
        let mut buf = [0u8; BUF];
        for bank in 0..2 {
            let base = self.bank_at(bank);
            self.flash
                .read(base, &mut buf[..align_up(HEADER, u)])
                .map_err(io)?;
            let seq = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
            let v2 = &buf[..8] == MAGIC;
            let head = if v2 {
                let complement = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
                if complement != !seq {
                    continue; // partly erased (or damaged): not a bank to trust
                }
                align_up(HEADER, u)
            } else if &buf[..8] == MAGIC_V1 {
                align_up(HEADER_V1, u)
            } else {
                continue;
            };
            self.flash
                .read(base + head as u32, &mut buf[..u])
                .map_err(io)?;
            if buf[..u].iter().any(|&b| b != 0) {
                continue; // never sealed: a compaction cut short
            }
            if best.is_none_or(|b| (v2, seq) > (b.v2, b.seq)) {
                best = Some(Live {
                    bank,
                    seq,
                    v2,
                    first: (head + u) as u32,
                    end: 0,
                    clean: true,
                    damage: None,
                });
            }
        }
        if let Some(live) = &mut best {
            self.scan(live, &mut buf)?;
        }
        self.mounted = Some(best);
        Ok(best)
    }

    /// Walks the live bank from its first entry and sets its end (the offset after the last
    /// good entry), whether it may be appended to, and where its last damage starts.
    fn scan(&mut self, live: &mut Live, buf: &mut [u8; BUF]) -> Result<(), StoreError> {
        let u = Self::unit()?;
        let mut off = live.first;
        live.end = off;
        live.clean = true;
        live.damage = None;
        // Bounded: every entry takes at least two units, and each damaged stretch skipped
        // moves on by at least one.
        for _ in 0..self.bank_size as usize / u + 1 {
            let found = self.read_entry(live.bank, off, buf, true)?;
            if let Scan::Entry(e) = found {
                if e.kind == Kind::Damaged as u8 {
                    live.damage = Some(off);
                }
                off += e.size;
                live.end = off;
                continue;
            }
            // No good entry here. The end of the log if nothing was written after it, or only
            // what one torn append can have written; damage otherwise.
            if off as usize + 2 * u > self.bank_size as usize {
                return Ok(());
            }
            if let Some(next) = self.next_good(live.bank, off + u as u32, self.bank_size, buf)? {
                live.damage = Some(off);
                live.clean = false;
                off = next;
                continue;
            }
            let torn_end =
                (off as usize + Self::entry_size(MAX_PAYLOAD, u)).min(self.bank_size as usize);
            if matches!(found, Scan::Damaged)
                || self.written(live.bank, torn_end as u32, self.bank_size, buf)?
            {
                live.damage = Some(off);
                live.clean = false;
            } else if self.written(live.bank, off, torn_end as u32, buf)? {
                live.clean = false; // a torn append
            }
            return Ok(());
        }
        Err(StoreError::Corrupt)
    }

    /// The first unit-aligned offset in `from..to` of `bank` where a good entry starts.
    fn next_good(
        &mut self,
        bank: u32,
        from: u32,
        to: u32,
        buf: &mut [u8; BUF],
    ) -> Result<Option<u32>, StoreError> {
        let u = Self::unit()?;
        let mut off = from;
        while off < to {
            if let Scan::Entry(_) = self.read_entry(bank, off, buf, true)? {
                return Ok(Some(off));
            }
            off += u as u32;
        }
        Ok(None)
    }

    /// Whether any byte in `from..to` of `bank` is not erased.
    fn written(
        &mut self,
        bank: u32,
        from: u32,
        to: u32,
        buf: &mut [u8; BUF],
    ) -> Result<bool, StoreError> {
        let u = Self::unit()?;
        let base = self.bank_at(bank);
        let step = BUF / u * u;
        let mut off = from as usize;
        while off < to as usize {
            let n = step.min(to as usize - off);
            self.flash
                .read(base + off as u32, &mut buf[..n])
                .map_err(io)?;
            if buf[..n].iter().any(|&b| b != 0xFF) {
                return Ok(true);
            }
            off += n;
        }
        Ok(false)
    }

    /// The first good entry of the live bank at or after `off` (skipping a damaged stretch),
    /// read into `buf` as [`Self::read_entry`] does; `None` past its end. In a bank with
    /// damage every entry is checked, so a damaged one is never taken for a key.
    fn next_at(
        &mut self,
        live: &Live,
        mut off: u32,
        buf: &mut [u8; BUF],
        verify: bool,
    ) -> Result<Option<(u32, Entry)>, StoreError> {
        let verify = verify || live.damage.is_some();
        while off < live.end {
            match self.read_entry(live.bank, off, buf, verify)? {
                Scan::Entry(e) => return Ok(Some((off, e))),
                _ => match self.next_good(live.bank, off + Self::unit()? as u32, live.end, buf)? {
                    Some(next) => off = next,
                    None => return Ok(None),
                },
            }
        }
        Ok(None)
    }

    /// Reads the entry at `off` of `bank` into `buf` (its body: head, payload, check); with
    /// `verify`, its commit unit and check too (otherwise only its head and first
    /// `ENTRY_HEAD + 1 + MAX_CONTENT_NAME` bytes are read: enough to compare keys).
    fn read_entry(
        &mut self,
        bank: u32,
        off: u32,
        buf: &mut [u8; BUF],
        verify: bool,
    ) -> Result<Scan, StoreError> {
        let u = Self::unit()?;
        let base = self.bank_at(bank);
        if off as usize + 2 * u > self.bank_size as usize {
            return Ok(Scan::End);
        }
        let head = align_up(ENTRY_HEAD, u);
        self.flash.read(base + off, &mut buf[..head]).map_err(io)?;
        let len = u16::from_le_bytes([buf[0], buf[1]]) as usize;
        if len == 0xFFFF && buf[2] == 0xFF {
            return Ok(Scan::End);
        }
        let size = Self::entry_size(len, u);
        if len > MAX_PAYLOAD || off as usize + size > self.bank_size as usize {
            return Ok(Scan::Bad);
        }
        let body = align_up(ENTRY_HEAD + len + CHECK, u);
        let entry = Entry {
            kind: buf[2],
            len,
            size: size as u32,
        };
        if !verify {
            let want = align_up((ENTRY_HEAD + 1 + MAX_CONTENT_NAME).min(body), u);
            self.flash.read(base + off, &mut buf[..want]).map_err(io)?;
            return Ok(Scan::Entry(entry));
        }
        self.flash
            .read(base + off + body as u32, &mut buf[..u])
            .map_err(io)?;
        if buf[..u].iter().any(|&b| b != 0) {
            return Ok(Scan::Bad); // not committed
        }
        self.flash.read(base + off, &mut buf[..body]).map_err(io)?;
        let data = ENTRY_HEAD + len;
        if check_of(&buf[..data])[..] != buf[data..data + CHECK] {
            return Ok(Scan::Damaged);
        }
        Ok(Scan::Entry(entry))
    }

    /// Whether the entry in `buf` (as read by [`Self::read_entry`]) has key `kind`/`name`.
    fn has_key(buf: &[u8], e: &Entry, kind: Kind, name: &[u8]) -> bool {
        if e.kind != kind as u8 {
            return false;
        }
        if kind != Kind::Version {
            return true;
        }
        let n = buf[ENTRY_HEAD] as usize;
        n == name.len() && e.len > n && buf[ENTRY_HEAD + 1..ENTRY_HEAD + 1 + n] == *name
    }

    /// Finds the last good entry of key `kind`/`name` in the live bank and reads it into
    /// `buf`; returns its payload length.
    fn find(
        &mut self,
        kind: Kind,
        name: &[u8],
        buf: &mut [u8; BUF],
    ) -> Result<Option<usize>, StoreError> {
        let Some(live) = self.live()? else {
            return Ok(None);
        };
        let mut off = live.first;
        let mut found = None;
        while let Some((at, e)) = self.next_at(&live, off, buf, false)? {
            if Self::has_key(&buf[..], &e, kind, name) {
                found = Some(at);
            }
            off = at + e.size;
        }
        // Damage after this key's newest entry may have been a newer value of it.
        if live.damage.is_some_and(|d| found.is_none_or(|f| f < d)) {
            return Err(StoreError::Corrupt);
        }
        let Some(off) = found else { return Ok(None) };
        match self.read_entry(live.bank, off, buf, true)? {
            Scan::Entry(e) => Ok(Some(e.len)),
            _ => Err(StoreError::Corrupt),
        }
    }

    /// How many distinct content names have a version record in the live bank.
    fn count_names(&mut self, buf: &mut [u8; BUF]) -> Result<usize, StoreError> {
        let Some(live) = self.live()? else {
            return Ok(0);
        };
        let mut names = 0;
        let mut off = live.first;
        while let Some((at, e)) = self.next_at(&live, off, buf, false)? {
            if e.kind == Kind::Version as u8 && self.is_last(live, at, &e, buf)? {
                names += 1;
            }
            off = at + e.size;
        }
        Ok(names)
    }

    /// Whether no later entry of the live bank has the key of the entry at `off` (read into
    /// `buf`, which this overwrites).
    fn is_last(
        &mut self,
        live: Live,
        off: u32,
        e: &Entry,
        buf: &mut [u8; BUF],
    ) -> Result<bool, StoreError> {
        let kind = match e.kind {
            1 => Kind::Anchor,
            2 => Kind::Time,
            3 => Kind::Version,
            _ => return Ok(false), // markers and unknown kinds are not carried over as keys
        };
        let mut key = [0u8; MAX_CONTENT_NAME];
        let mut key_len = 0;
        if kind == Kind::Version {
            key_len = (buf[ENTRY_HEAD] as usize).min(MAX_CONTENT_NAME);
            key[..key_len].copy_from_slice(&buf[ENTRY_HEAD + 1..ENTRY_HEAD + 1 + key_len]);
        }
        let mut next = off + e.size;
        while let Some((at, later)) = self.next_at(&live, next, buf, false)? {
            if Self::has_key(&buf[..], &later, kind, &key[..key_len]) {
                return Ok(false);
            }
            next = at + later.size;
        }
        Ok(true)
    }

    /// Writes the entry body in `buf[..body]` at `off` of `bank`, then its commit unit.
    fn write_entry(
        &mut self,
        bank: u32,
        off: u32,
        buf: &[u8; BUF],
        body: usize,
    ) -> Result<(), StoreError> {
        let u = Self::unit()?;
        let at = self.bank_at(bank) + off;
        self.flash.write(at, &buf[..body]).map_err(io)?;
        self.flash.write(at + body as u32, &ZEROS[..u]).map_err(io)
    }

    /// Copies the live entries into the other bank and makes it the live one.
    fn compact(&mut self, buf: &mut [u8; BUF]) -> Result<Live, StoreError> {
        let u = Self::unit()?;
        let old = self.live()?;
        let bank = old.map_or(0, |l| 1 - l.bank);
        let base = self.bank_at(bank);
        self.flash.erase(base, base + self.bank_size).map_err(io)?;
        // From here on the old bank stays live until the new one is sealed.
        let head = align_up(HEADER, u);
        buf[..head].fill(0xFF);
        buf[..8].copy_from_slice(MAGIC);
        let seq = old.map_or(1, |l| l.seq.wrapping_add(1));
        buf[8..12].copy_from_slice(&seq.to_le_bytes());
        buf[12..16].copy_from_slice(&(!seq).to_le_bytes());
        self.flash.write(base, &buf[..head]).map_err(io)?;
        let mut end = Self::entries_at(u);
        let mut damage = None;
        if let Some(old) = old {
            // Keys whose newest entry is before the damage read `Corrupt`: one marker first
            // stands for them all, and only what follows the damage is copied.
            if old.damage.is_some() {
                damage = Some(end);
                end += self.write_marker(bank, end, buf)?;
            }
            let mut off = old.first;
            while let Some((at, e)) = self.next_at(&old, off, buf, false)? {
                off = at + e.size;
                if old.damage.is_some_and(|d| at <= d) || !self.is_last(old, at, &e, buf)? {
                    continue;
                }
                match self.read_entry(old.bank, at, buf, true)? {
                    Scan::Entry(e) => {
                        let body = e.size as usize - u;
                        self.write_entry(bank, end, buf, body)?;
                        end += e.size;
                    }
                    // Decayed since the mount: it may be any key's newest value, so every
                    // key copied so far (and this one, not copied) reads `Corrupt` from now on.
                    _ => {
                        damage = Some(end);
                        end += self.write_marker(bank, end, buf)?;
                    }
                }
            }
        }
        self.flash
            .write(base + head as u32, &ZEROS[..u])
            .map_err(io)?;
        let live = Live {
            bank,
            seq,
            v2: true,
            first: Self::entries_at(u),
            end,
            clean: true,
            damage,
        };
        self.mounted = Some(Some(live));
        Ok(live)
    }

    /// Writes a damage marker at `off` of `bank`; returns the bytes it takes.
    fn write_marker(
        &mut self,
        bank: u32,
        off: u32,
        buf: &mut [u8; BUF],
    ) -> Result<u32, StoreError> {
        let u = Self::unit()?;
        let body = align_up(ENTRY_HEAD + CHECK, u);
        buf[..body].fill(0xFF);
        buf[..2].copy_from_slice(&0u16.to_le_bytes());
        buf[2] = Kind::Damaged as u8;
        let check = check_of(&buf[..ENTRY_HEAD]);
        buf[ENTRY_HEAD..ENTRY_HEAD + CHECK].copy_from_slice(&check);
        self.write_entry(bank, off, buf, body)?;
        Ok(Self::entry_size(0, u) as u32)
    }

    /// Appends an entry of `kind` whose payload is `buf[ENTRY_HEAD..ENTRY_HEAD + len]`.
    fn append(&mut self, kind: Kind, len: usize, buf: &mut [u8; BUF]) -> Result<(), StoreError> {
        let u = Self::unit()?;
        if len > MAX_PAYLOAD {
            return Err(StoreError::BadLength);
        }
        let size = Self::entry_size(len, u) as u32;
        let bank_size = self.bank_size;
        let fits = |l: &Live| l.clean && l.end + size <= bank_size;
        let live = match self.live()? {
            Some(l) if fits(&l) => l,
            _ => {
                // Compaction reads through `buf`: keep the new entry's payload aside.
                let mut payload = [0u8; MAX_PAYLOAD];
                payload[..len].copy_from_slice(&buf[ENTRY_HEAD..ENTRY_HEAD + len]);
                let l = self.compact(buf)?;
                buf[ENTRY_HEAD..ENTRY_HEAD + len].copy_from_slice(&payload[..len]);
                if l.end + size > bank_size {
                    return Err(StoreError::Full);
                }
                l
            }
        };
        buf[..2].copy_from_slice(&(len as u16).to_le_bytes());
        buf[2] = kind as u8;
        let data = ENTRY_HEAD + len;
        let check = check_of(&buf[..data]);
        buf[data..data + CHECK].copy_from_slice(&check);
        let body = align_up(data + CHECK, u);
        buf[data + CHECK..body].fill(0xFF);
        self.write_entry(live.bank, live.end, buf, body)?;
        self.mounted = Some(Some(Live {
            end: live.end + size,
            ..live
        }));
        Ok(())
    }

    /// The trust anchor saved last.
    pub fn load_anchor(&mut self) -> Result<Option<StoredAnchor>, StoreError> {
        let mut buf = [0u8; BUF];
        let Some(len) = self.find(Kind::Anchor, &[], &mut buf)? else {
            return Ok(None);
        };
        decode_anchor(&buf[ENTRY_HEAD..ENTRY_HEAD + len])
            .map(Some)
            .ok_or(StoreError::Corrupt)
    }

    /// Saves the trust anchor.
    pub fn save_anchor(&mut self, anchor: &StoredAnchor) -> Result<(), StoreError> {
        let mut buf = [0xFFu8; BUF];
        let len = encode_anchor(anchor, &mut buf[ENTRY_HEAD..ENTRY_HEAD + MAX_PAYLOAD]);
        self.append(Kind::Anchor, len, &mut buf)
    }

    /// The version record of `name`.
    pub fn version_record(&mut self, name: &str) -> Result<Option<VersionRecord>, StoreError> {
        let mut buf = [0u8; BUF];
        let Some(len) = self.find(Kind::Version, name.as_bytes(), &mut buf)? else {
            return Ok(None);
        };
        let at = ENTRY_HEAD + 1 + name.len();
        if len != 1 + name.len() + 8 + 32 {
            return Err(StoreError::Corrupt);
        }
        let mut version = [0u8; 8];
        version.copy_from_slice(&buf[at..at + 8]);
        let mut root: Digest = [0; 32];
        root.copy_from_slice(&buf[at + 8..at + 40]);
        Ok(Some(VersionRecord {
            version: u64::from_le_bytes(version),
            root,
        }))
    }

    /// Saves the version record of `name`; [`StoreError::Full`] for a new name past [`MAX_NAMES`].
    pub fn put_version_record(
        &mut self,
        name: &str,
        record: &VersionRecord,
    ) -> Result<(), StoreError> {
        let n = name.len();
        if n > MAX_CONTENT_NAME {
            return Err(StoreError::BadLength);
        }
        let mut buf = [0xFFu8; BUF];
        if self
            .find(Kind::Version, name.as_bytes(), &mut buf)?
            .is_none()
            && self.count_names(&mut buf)? >= MAX_NAMES
        {
            return Err(StoreError::Full);
        }
        buf[ENTRY_HEAD] = n as u8;
        buf[ENTRY_HEAD + 1..ENTRY_HEAD + 1 + n].copy_from_slice(name.as_bytes());
        let at = ENTRY_HEAD + 1 + n;
        buf[at..at + 8].copy_from_slice(&record.version.to_le_bytes());
        buf[at + 8..at + 40].copy_from_slice(&record.root);
        self.append(Kind::Version, 1 + n + 40, &mut buf)
    }

    /// The latest Unix time saved.
    pub fn load_latest_time(&mut self) -> Result<Option<u64>, StoreError> {
        let mut buf = [0u8; BUF];
        match self.find(Kind::Time, &[], &mut buf)? {
            Some(8) => {
                let mut t = [0u8; 8];
                t.copy_from_slice(&buf[ENTRY_HEAD..ENTRY_HEAD + 8]);
                Ok(Some(u64::from_le_bytes(t)))
            }
            Some(_) => Err(StoreError::Corrupt),
            None => Ok(None),
        }
    }

    /// Saves the latest Unix time seen.
    pub fn save_latest_time(&mut self, unix: u64) -> Result<(), StoreError> {
        let mut buf = [0xFFu8; BUF];
        buf[ENTRY_HEAD..ENTRY_HEAD + 8].copy_from_slice(&unix.to_le_bytes());
        self.append(Kind::Time, 8, &mut buf)
    }
}

#[cfg(test)]
mod test {
    extern crate std;
    use std::format;
    use std::string::String;

    use super::*;
    use crate::flash::testing::RamFlash;

    type Flash = RamFlash<4, 1024>;

    fn anchor(version: u64) -> StoredAnchor {
        let mut a = TrustAnchor::pinned(&[PublicKey([7; 32]), PublicKey([8; 32])], 2).unwrap();
        a.version = version;
        a.digest = [version as u8; 32];
        StoredAnchor {
            pin: [1; 32],
            anchor: a,
        }
    }

    fn record(version: u64) -> VersionRecord {
        VersionRecord {
            version,
            root: [version as u8; 32],
        }
    }

    fn reopen(log: RecordLog<Flash>) -> RecordLog<Flash> {
        let mut flash = log.into_inner();
        flash.fail_after = None;
        RecordLog::new(flash)
    }

    #[test]
    fn records_survive_a_reopen_and_the_latest_value_wins() {
        let mut log = RecordLog::new(Flash::new(8 * 1024));
        assert_eq!(log.load_anchor(), Ok(None));
        assert_eq!(log.version_record("fw"), Ok(None));
        assert_eq!(log.load_latest_time(), Ok(None));
        log.save_anchor(&anchor(1)).unwrap();
        log.save_anchor(&anchor(2)).unwrap();
        log.put_version_record("fw", &record(3)).unwrap();
        log.put_version_record("config", &record(1)).unwrap();
        log.put_version_record("fw", &record(4)).unwrap();
        log.save_latest_time(1_000).unwrap();
        let mut log = reopen(log);
        assert_eq!(log.load_anchor(), Ok(Some(anchor(2))));
        assert_eq!(log.version_record("fw"), Ok(Some(record(4))));
        assert_eq!(log.version_record("config"), Ok(Some(record(1))));
        assert_eq!(log.version_record("f"), Ok(None));
        assert_eq!(log.load_latest_time(), Ok(Some(1_000)));
    }

    #[test]
    fn compaction_keeps_the_live_set_through_many_writes() {
        // Strict flash: no unit is ever written twice.
        let mut flash = Flash::new(8 * 1024);
        flash.strict = true;
        let mut log = RecordLog::new(flash);
        for i in 0..2_000u64 {
            log.save_latest_time(i).unwrap();
            if i % 50 == 0 {
                log.put_version_record(&format!("n{}", i % 7), &record(i))
                    .unwrap();
                log.save_anchor(&anchor(i)).unwrap();
            }
        }
        let mut log = reopen(log);
        assert_eq!(log.load_latest_time(), Ok(Some(1_999)));
        assert_eq!(log.load_anchor(), Ok(Some(anchor(1_950))));
        assert_eq!(log.version_record("n4"), Ok(Some(record(1_950))));
        assert_eq!(log.version_record("n0"), Ok(Some(record(1_750))));
    }

    #[test]
    fn a_new_name_past_the_bound_is_refused_and_known_names_still_update() {
        let mut log = RecordLog::new(Flash::new(8 * 1024));
        let long = |i: usize| format!("{i:02}{}", "x".repeat(MAX_CONTENT_NAME - 2));
        for i in 0..MAX_NAMES {
            log.put_version_record(&long(i), &record(i as u64)).unwrap();
        }
        log.save_anchor(&anchor(9)).unwrap();
        assert_eq!(
            log.put_version_record("one-more", &record(1)),
            Err(StoreError::Full)
        );
        // Updating known names forces compactions of the largest live set: it fits.
        for round in 0..20u64 {
            for i in 0..MAX_NAMES {
                log.put_version_record(&long(i), &record(100 + round))
                    .unwrap();
            }
        }
        let mut log = reopen(log);
        for i in 0..MAX_NAMES {
            assert_eq!(log.version_record(&long(i)), Ok(Some(record(119))));
        }
        assert_eq!(log.version_record("one-more"), Ok(None));
        assert_eq!(log.load_anchor(), Ok(Some(anchor(9))));
    }

    /// Cuts the power at the `n`-th flash write from now (writing `torn` bytes of it), then
    /// checks that every record reads as its value before or after the interrupted write.
    fn cut_at(n: usize, torn: usize, prefill: u64) {
        let mut log = RecordLog::new(Flash::new(8 * 1024));
        // Fill the bank close to full so some cuts land inside a compaction.
        for i in 0..prefill {
            log.save_latest_time(i).unwrap();
        }
        log.put_version_record("fw", &record(5)).unwrap();
        log.save_anchor(&anchor(1)).unwrap();
        let before = log.flash.writes;
        log.flash.fail_after = Some(before + n);
        log.flash.torn = torn;
        let result = log
            .put_version_record("fw", &record(6))
            .and_then(|()| log.save_anchor(&anchor(2)))
            .and_then(|()| log.save_latest_time(prefill + 10));
        let mut log = reopen(log);
        let fw = log.version_record("fw").unwrap();
        let a = log.load_anchor().unwrap();
        let t = log.load_latest_time().unwrap();
        let what = String::from(if result.is_ok() { "finished" } else { "cut" });
        assert!(
            fw == Some(record(5)) || fw == Some(record(6)),
            "{what} n={n} torn={torn}: {fw:?}"
        );
        assert!(
            a == Some(anchor(1)) || a == Some(anchor(2)),
            "{what} n={n} torn={torn}: {a:?}"
        );
        let last = prefill.saturating_sub(1);
        assert!(
            t == Some(last) || t == Some(prefill + 10),
            "{what} n={n} torn={torn}: {t:?}"
        );
        // In order: a later record is new only if the earlier ones are.
        if a == Some(anchor(2)) {
            assert_eq!(fw, Some(record(6)));
        }
        // And the area still takes writes.
        log.put_version_record("fw", &record(7)).unwrap();
        let mut log = reopen(log);
        assert_eq!(log.version_record("fw"), Ok(Some(record(7))));
        assert!(log.load_anchor().unwrap().is_some());
    }

    #[test]
    fn a_power_cut_at_any_write_leaves_the_old_or_the_new_record() {
        // 150 time entries of 24 bytes nearly fill a 4 KiB bank: the writes below compact.
        for prefill in [1, 150, 165] {
            for n in 0..40 {
                for torn in [0, 1, 3, 4, 17] {
                    cut_at(n, torn, prefill);
                }
            }
        }
    }

    #[test]
    fn an_area_too_small_for_the_largest_live_set_is_refused() {
        let mut log = RecordLog::new(Flash::new(2 * 1024));
        assert_eq!(log.load_anchor(), Err(StoreError::Unsupported));
    }

    /// Offset of the `n`-th entry of the live bank (walking from the first).
    fn entry_at(log: &mut RecordLog<Flash>, n: usize) -> u32 {
        let live = log.live().unwrap().unwrap();
        let mut buf = [0u8; BUF];
        let mut off = live.first;
        for _ in 0..n {
            let Scan::Entry(e) = log.read_entry(live.bank, off, &mut buf, true).unwrap() else {
                panic!("entry expected at {off}");
            };
            off += e.size;
        }
        log.bank_at(live.bank) + off
    }

    /// Decay of the version record of "fw" at `off`: a bit of its version goes from 0 to 1.
    fn decay_version(mem: &mut [u8], off: u32) {
        mem[off as usize + ENTRY_HEAD + 1 + "fw".len()] |= 0x80;
    }

    #[test]
    fn a_decayed_newest_entry_reads_corrupt_and_compaction_keeps_it_so() {
        for decay_while_mounted in [true, false] {
            let mut log = RecordLog::new(Flash::new(8 * 1024));
            log.put_version_record("fw", &record(1)).unwrap();
            log.put_version_record("fw", &record(2)).unwrap();
            log.save_latest_time(5).unwrap();
            let newest = entry_at(&mut log, 1);
            if decay_while_mounted {
                decay_version(&mut log.flash.mem, newest);
            } else {
                let mut flash = log.into_inner();
                decay_version(&mut flash.mem, newest);
                log = RecordLog::new(flash);
            }
            assert_eq!(log.version_record("fw"), Err(StoreError::Corrupt));
            // Enough writes to compact the bank (more than once).
            for t in 0..400 {
                log.save_latest_time(100 + t).unwrap();
            }
            for pass in ["compacted", "reopened"] {
                if pass == "reopened" {
                    log = reopen(log);
                }
                let what = format!("decay while mounted: {decay_while_mounted}, {pass}");
                // Never "no record" and never the older version 1: that would allow a rollback.
                assert_eq!(log.version_record("fw"), Err(StoreError::Corrupt), "{what}");
                // The damaged entry could have been any key's: one never written newer than
                // the damage reads Corrupt too; keys written since read their value.
                assert_eq!(log.load_anchor(), Err(StoreError::Corrupt), "{what}");
                assert_eq!(
                    log.version_record("config"),
                    Err(StoreError::Corrupt),
                    "{what}"
                );
                assert_eq!(log.load_latest_time(), Ok(Some(499)), "{what}");
            }
            // A key written after the damage reads its new value.
            log.save_anchor(&anchor(4)).unwrap();
            assert_eq!(reopen(log).load_anchor(), Ok(Some(anchor(4))));
        }
    }

    #[test]
    fn a_damaged_entry_in_the_middle_does_not_hide_the_newer_ones() {
        // Damage: its payload decayed (committed, check fails), or its head reads erased.
        for head_erased in [false, true] {
            let mut log = RecordLog::new(Flash::new(8 * 1024));
            log.save_anchor(&anchor(1)).unwrap();
            log.save_latest_time(10).unwrap();
            log.put_version_record("fw", &record(1)).unwrap();
            log.save_latest_time(20).unwrap();
            log.put_version_record("fw", &record(2)).unwrap();
            let middle = entry_at(&mut log, 2) as usize;
            let mut flash = log.into_inner();
            if head_erased {
                flash.mem[middle..middle + 4].fill(0xFF);
            } else {
                decay_version(&mut flash.mem, middle as u32);
            }
            let mut log = RecordLog::new(flash);
            let what = format!("head erased: {head_erased}");
            // Newer entries after the damage are found: not the stale time 10, not "no fw".
            assert_eq!(log.load_latest_time(), Ok(Some(20)), "{what}");
            assert_eq!(log.version_record("fw"), Ok(Some(record(2))), "{what}");
            // The anchor's newest entry is before the damage, which may have replaced it.
            assert_eq!(log.load_anchor(), Err(StoreError::Corrupt), "{what}");
            // A write compacts the damaged bank; the same reads after it and after a reopen.
            log.save_latest_time(30).unwrap();
            for pass in ["compacted", "reopened"] {
                if pass == "reopened" {
                    log = reopen(log);
                }
                let what = format!("{what}, {pass}");
                assert_eq!(log.load_latest_time(), Ok(Some(30)), "{what}");
                assert_eq!(log.version_record("fw"), Ok(Some(record(2))), "{what}");
                assert_eq!(log.load_anchor(), Err(StoreError::Corrupt), "{what}");
            }
        }
    }

    #[test]
    fn a_torn_last_entry_is_the_end_of_the_log_not_damage() {
        for torn in [0, 1, 3, 4, 9, 40] {
            let mut log = RecordLog::new(Flash::new(8 * 1024));
            log.save_anchor(&anchor(1)).unwrap();
            log.put_version_record("fw", &record(1)).unwrap();
            log.flash.fail_after = Some(log.flash.writes);
            log.flash.torn = torn;
            assert!(log.put_version_record("fw", &record(2)).is_err());
            let mut log = reopen(log);
            assert_eq!(log.version_record("fw"), Ok(Some(record(1))), "torn {torn}");
            assert_eq!(log.load_anchor(), Ok(Some(anchor(1))), "torn {torn}");
            log.put_version_record("fw", &record(3)).unwrap();
            let mut log = reopen(log);
            assert_eq!(log.version_record("fw"), Ok(Some(record(3))), "torn {torn}");
        }
    }

    #[test]
    fn a_partly_erased_old_bank_never_becomes_the_live_one() {
        // Compact twice: both banks sealed, the live one with the higher sequence.
        let mut log = RecordLog::new(Flash::new(8 * 1024));
        log.save_anchor(&anchor(1)).unwrap();
        for t in 0..400 {
            log.save_latest_time(t).unwrap();
        }
        let live = log.live().unwrap().unwrap();
        let old = (1 - live.bank) as usize * log.bank_size as usize;
        let mut flash = log.into_inner();
        // The next compaction erases the old bank; cut short, the erase set a few of its bits
        // back to 1, here two of its sequence number's (which only ever makes it larger).
        flash.mem[old + 8] |= 0x30;
        flash.mem[old + 9] |= 0x01;
        let mut log = RecordLog::new(flash);
        assert_eq!(log.live().unwrap().unwrap().bank, live.bank);
        assert_eq!(log.load_latest_time(), Ok(Some(399)));
        assert_eq!(log.load_anchor(), Ok(Some(anchor(1))));
    }

    #[test]
    fn a_bank_of_format_1_is_read_and_replaced_by_format_2() {
        // A format 1 bank as an earlier release wrote it: header, seal, one time entry.
        let mut flash = Flash::new(8 * 1024);
        flash.mem[..8].copy_from_slice(MAGIC_V1);
        flash.mem[8..12].copy_from_slice(&7u32.to_le_bytes());
        flash.mem[12..16].fill(0);
        let mut body = [0xFFu8; 20];
        body[..2].copy_from_slice(&8u16.to_le_bytes());
        body[2] = Kind::Time as u8;
        body[3..11].copy_from_slice(&77u64.to_le_bytes());
        let check = check_of(&body[..11]);
        body[11..19].copy_from_slice(&check);
        flash.mem[16..36].copy_from_slice(&body);
        flash.mem[36..40].fill(0);
        let mut log = RecordLog::new(flash);
        assert_eq!(log.load_latest_time(), Ok(Some(77)));
        log.save_anchor(&anchor(2)).unwrap();
        // Compactions write format 2.
        for t in 0..200 {
            log.save_latest_time(100 + t).unwrap();
        }
        let mut log = reopen(log);
        let live = log.live().unwrap().unwrap();
        assert!(live.v2);
        assert_eq!(log.load_latest_time(), Ok(Some(299)));
        assert_eq!(log.load_anchor(), Ok(Some(anchor(2))));
    }

    #[test]
    fn a_torn_append_whose_first_word_stayed_erased_is_not_written_over() {
        let mut flash = Flash::new(8 * 1024);
        flash.strict = true;
        let mut log = RecordLog::new(flash);
        log.save_latest_time(1).unwrap();
        log.save_latest_time(2).unwrap();
        // The append of time 2 torn: its later words programmed, its first word and its
        // commit unit not.
        let at = entry_at(&mut log, 1) as usize;
        let size = RecordLog::<Flash>::entry_size(8, 4);
        let mut flash = log.into_inner();
        flash.mem[at..at + 4].fill(0xFF);
        flash.mem[at + size - 4..at + size].fill(0xFF);
        let mut log = RecordLog::new(flash);
        assert_eq!(log.load_latest_time(), Ok(Some(1)));
        // The next write must not program those cells again (strict flash refuses it).
        log.save_latest_time(3).unwrap();
        assert_eq!(reopen(log).load_latest_time(), Ok(Some(3)));
    }
}
