//! A RAM content store for simulated agents that checks every write against the truth.
//!
//! [`RamStore`] implements agent-core's [`ContentStore`] the way a device
//! store behaves (a chunk counts as verified once written; what is written
//! survives a restart of the agent, since the simulator moves the store into
//! the new agent), but keeps memory small for fleets of 10 000: a chunk whose
//! bytes and proof equal the true ones is recorded as one bit, and reads
//! return the true bytes. Anything else that is written — a chunk the agent
//! should have rejected — is kept byte for byte (so it is served as written)
//! and recorded as an invariant violation.
//!
//! agent-core's own `flash::FlashStore` over `flash::testing::RamFlash` needs
//! agent-core's `std` feature (tokio and the Linux driver) for the RAM flash
//! and a flash partition per agent, too heavy for the simulator's fleets.

use std::collections::BTreeMap;
use std::sync::Arc;

use baton_agent_core::store::{ContentStore, Held, StoreError, StoredAnchor, VersionRecord};
use baton_protocol::merkle::Proof;
use baton_protocol::{Digest, Manifest};

use crate::content::Truth;

/// Most contents one simulated store holds (older ones are dropped first).
const MAX_SLOTS: usize = 4;

#[derive(Clone, Debug)]
struct Slot {
    manifest: Manifest,
    bits: Vec<u64>,
    verified: u32,
    /// Chunks written with bytes or a proof other than the truth's.
    foreign: BTreeMap<u32, (Vec<u8>, Vec<Digest>)>,
}

impl Slot {
    fn has(&self, i: u32) -> bool {
        self.bits
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// A simulated agent's store (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct RamStore {
    truth: Option<Arc<Truth>>,
    owner: String,
    slots: Vec<Slot>,
    capacity: u64,
    violations: Vec<String>,
    /// The agent's records (kept across simulated restarts with the store).
    anchor: Option<StoredAnchor>,
    versions: BTreeMap<String, VersionRecord>,
    latest_time: Option<u64>,
}

impl RamStore {
    /// An empty store for agent `owner`, checking writes against `truth`.
    pub fn new(owner: &str, truth: Arc<Truth>) -> Self {
        RamStore {
            truth: Some(truth),
            owner: owner.to_string(),
            slots: Vec::new(),
            capacity: 1 << 40,
            violations: Vec::new(),
            anchor: None,
            versions: BTreeMap::new(),
            latest_time: None,
        }
    }

    /// Chunks of `root` held verified (0 if not held).
    pub fn count(&self, root: &Digest) -> u32 {
        self.slot(root).map_or(0, |s| s.verified)
    }

    /// Whether chunk `index` of `root` is held.
    pub fn holds(&self, root: &Digest, index: u32) -> bool {
        self.slot(root).is_some_and(|s| s.has(index))
    }

    /// Whether every chunk of the truth's content is held, each equal to the true chunk.
    pub fn complete_and_true(&self) -> bool {
        let Some(t) = &self.truth else { return false };
        self.slot(t.root())
            .is_some_and(|s| s.verified == t.chunks() && s.foreign.is_empty())
    }

    /// Invariant violations recorded so far (writes of chunks that are not the true ones).
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    fn slot(&self, root: &Digest) -> Option<&Slot> {
        self.slots.iter().find(|s| s.manifest.root == *root)
    }
}

impl ContentStore for RamStore {
    fn open(&mut self, manifest: &Manifest) -> Result<u32, StoreError> {
        if let Some(s) = self.slot(&manifest.root) {
            return Ok(s.verified);
        }
        if self.slots.len() >= MAX_SLOTS {
            self.slots.remove(0);
        }
        let chunks = manifest.chunks();
        self.slots.push(Slot {
            manifest: manifest.clone(),
            bits: vec![0; (chunks as usize).div_ceil(64)],
            verified: 0,
            foreign: BTreeMap::new(),
        });
        Ok(0)
    }

    fn manifest(&self, root: &Digest) -> Option<&Manifest> {
        self.slot(root).map(|s| &s.manifest)
    }

    fn verified(&self, root: &Digest) -> Option<u32> {
        self.slot(root).map(|s| s.verified)
    }

    fn is_verified(&mut self, root: &Digest, index: u32) -> Result<bool, StoreError> {
        let s = self.slot(root).ok_or(StoreError::Unknown)?;
        if index >= s.manifest.chunks() {
            return Err(StoreError::BadIndex);
        }
        Ok(s.has(index))
    }

    fn write_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        data: &[u8],
        proof: &[Digest],
    ) -> Result<(), StoreError> {
        let pos = self
            .slots
            .iter()
            .position(|s| s.manifest.root == *root)
            .ok_or(StoreError::Unknown)?;
        let s = &mut self.slots[pos];
        if index >= s.manifest.chunks() {
            return Err(StoreError::BadIndex);
        }
        if data.len() != s.manifest.chunk_len(index) as usize {
            return Err(StoreError::BadLength);
        }
        let genuine = self.truth.as_ref().is_some_and(|t| {
            t.root() == root && t.chunk(index) == data && t.proof(index).as_slice() == proof
        });
        if genuine {
            s.foreign.remove(&index);
        } else {
            self.violations.push(format!(
                "{} stored chunk {index} that is not the true chunk (unverified data or proof)",
                self.owner
            ));
            s.foreign.insert(index, (data.to_vec(), proof.to_vec()));
        }
        if !s.has(index) {
            s.bits[index as usize / 64] |= 1 << (index % 64);
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
        let s = self.slot(root).ok_or(StoreError::Unknown)?;
        if index >= s.manifest.chunks() {
            return Err(StoreError::BadIndex);
        }
        if !s.has(index) {
            return Err(StoreError::NotVerified);
        }
        let len = s.manifest.chunk_len(index) as usize;
        if data.len() < len {
            return Err(StoreError::BadLength);
        }
        proof.clear();
        if let Some((bytes, p)) = s.foreign.get(&index) {
            data[..len].copy_from_slice(bytes);
            for d in p {
                proof.push(*d).map_err(|_| StoreError::BadLength)?;
            }
        } else {
            let t = self.truth.as_ref().ok_or(StoreError::Corrupt)?;
            data[..len].copy_from_slice(t.chunk(index));
            *proof = t.proof(index);
        }
        Ok(len)
    }

    fn held(&self, i: usize) -> Option<Held<'_>> {
        self.slots.get(i).map(|s| Held {
            manifest: &s.manifest,
            verified: s.verified,
        })
    }

    fn free_bytes(&self) -> u64 {
        self.capacity
    }

    fn load_anchor(&mut self) -> Result<Option<StoredAnchor>, StoreError> {
        Ok(self.anchor.clone())
    }

    fn save_anchor(&mut self, anchor: &StoredAnchor) -> Result<(), StoreError> {
        self.anchor = Some(anchor.clone());
        Ok(())
    }

    fn version_record(&mut self, name: &str) -> Result<Option<VersionRecord>, StoreError> {
        Ok(self.versions.get(name).copied())
    }

    fn put_version_record(&mut self, name: &str, record: &VersionRecord) -> Result<(), StoreError> {
        self.versions.insert(name.to_string(), *record);
        Ok(())
    }

    fn load_latest_time(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.latest_time)
    }

    fn save_latest_time(&mut self, unix: u64) -> Result<(), StoreError> {
        self.latest_time = Some(unix);
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn true_chunks_are_bits_and_read_back() {
        let t = Arc::new(Truth::new(3, 10, 1000));
        let mut s = RamStore::new("a1", t.clone());
        assert_eq!(s.open(t.manifest()).unwrap(), 0);
        s.write_chunk(t.root(), 4, t.chunk(4), &t.proof(4)).unwrap();
        assert!(s.is_verified(t.root(), 4).unwrap());
        assert!(!s.is_verified(t.root(), 5).unwrap());
        let mut data = [0u8; 256];
        let mut proof = Proof::new();
        assert_eq!(
            s.read_chunk(t.root(), 4, &mut data, &mut proof).unwrap(),
            256
        );
        assert_eq!(&data[..], t.chunk(4));
        assert_eq!(proof, t.proof(4));
        assert_eq!(
            s.read_chunk(t.root(), 5, &mut data, &mut proof),
            Err(StoreError::NotVerified)
        );
        assert!(s.violations().is_empty());
        // Reopening resumes.
        assert_eq!(s.open(t.manifest()).unwrap(), 1);
    }

    #[test]
    fn a_false_chunk_is_kept_and_flagged() {
        let t = Arc::new(Truth::new(3, 10, 1000));
        let mut s = RamStore::new("a1", t.clone());
        s.open(t.manifest()).unwrap();
        let mut bad = t.chunk(2).to_vec();
        bad[0] ^= 1;
        s.write_chunk(t.root(), 2, &bad, &t.proof(2)).unwrap();
        assert_eq!(s.violations().len(), 1);
        let mut data = [0u8; 256];
        let mut proof = Proof::new();
        s.read_chunk(t.root(), 2, &mut data, &mut proof).unwrap();
        assert_eq!(&data[..], &bad[..]);
        assert!(!s.complete_and_true());
    }
}
