//! The Linux agent's content store: one flash file per content root in a directory.
//!
//! `<data-dir>/content/<root hex>.slot` is a [`FileFlash`] partition holding
//! one [`FlashStore`]; the directory is owner-only (0700) and each slot is
//! created 0600 (see [`super::datadir`]). At startup every slot is mounted,
//! so a restarted agent serves what it holds and resumes what it was
//! fetching. An optional quota (`--max-storage`) bounds the sum of the slot
//! sizes; a full disk or quota fails the job with `StorageFull`. A slot whose
//! header is damaged (a power cut while it was being created) is removed at
//! startup.
//!
//! The agent's records live apart from the content, in `<data-dir>/records/`
//! (owner-only), so that removing content never removes them:
//! `trust-anchor.json` (the accepted trust anchor), `versions.json` (per content
//! name, the highest version accepted and its root; at most
//! [`MAX_VERSION_NAMES`] names, a further name is refused with
//! [`StoreError::Full`], which fails its job with `StorageFull`) and
//! `latest-time` (Unix seconds). Each is replaced atomically: written to a
//! temporary file (mode 0600, see [`open_private`]), synced, renamed over the
//! old one, and the directory synced. A damaged records file stops the agent at
//! startup with its path (it would otherwise forget what it must refuse).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use baton_protocol::merkle::Proof;
use baton_protocol::{Digest, Manifest};

use super::datadir::{DataDirError, Existing, ensure_private_dir, open_private};
use super::flash::FileFlash;
use crate::flash::FlashStore;
use crate::store::{ContentStore, Held, StoreError, StoredAnchor, VersionRecord};

/// Most content names with a version record in a directory store.
pub const MAX_VERSION_NAMES: usize = 1024;
/// The trust anchor's file in the records directory.
const ANCHOR_FILE: &str = "trust-anchor.json";
/// The version records' file in the records directory.
const VERSIONS_FILE: &str = "versions.json";
/// The latest time's file in the records directory.
const TIME_FILE: &str = "latest-time";

/// Content slots in a directory, one file per root, and the agent's records in another.
#[derive(Debug)]
pub struct DirStore {
    dir: PathBuf,
    records: PathBuf,
    max_storage: Option<u64>,
    slots: BTreeMap<Digest, Slot>,
    /// `versions.json`, read once at open.
    versions: BTreeMap<String, VersionRecord>,
    /// Most names in `versions` ([`MAX_VERSION_NAMES`]; smaller in tests).
    max_names: usize,
}

/// One line of `versions.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct VersionEntry {
    version: u64,
    /// The content's Merkle root, hex.
    root: String,
}

/// One mounted slot and a RAM copy of its verified flags.
///
/// The agent asks "is chunk i verified?" far more often than chunks arrive;
/// answering from RAM instead of a `pread` per flag keeps the agent's CPU per
/// byte low. The copy is filled from the file once and updated on every write.
#[derive(Debug)]
struct Slot {
    store: FlashStore<FileFlash>,
    /// One bit per chunk, built on first use.
    verified: Option<Vec<u64>>,
}

impl Slot {
    fn new(store: FlashStore<FileFlash>) -> Self {
        Slot {
            store,
            verified: None,
        }
    }

    fn bits(&mut self, root: &Digest) -> Result<&mut Vec<u64>, StoreError> {
        if self.verified.is_none() {
            let chunks = self
                .store
                .manifest(root)
                .ok_or(StoreError::Unknown)?
                .chunks();
            let mut bits = vec![0u64; (chunks as usize).div_ceil(64)];
            for i in 0..chunks {
                if self.store.is_verified(root, i)? {
                    bits[i as usize / 64] |= 1 << (i % 64);
                }
            }
            self.verified = Some(bits);
        }
        Ok(self.verified.as_mut().expect("filled above"))
    }
}

fn slot_name(root: &Digest) -> String {
    format!("{}.slot", hex::encode(root))
}

/// Why a directory store could not be opened or exported from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirStoreError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The store refused the operation.
    #[error("store: {0}")]
    Store(StoreError),
    /// The store's directory could not be created or made owner-only.
    #[error(transparent)]
    Dir(#[from] DataDirError),
}

/// Replaces `path` with `bytes` atomically (temporary file, sync, rename, directory sync).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = open_private(
        std::fs::OpenOptions::new().write(true).create(true),
        &tmp,
        Existing::Empty,
    )?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads records file `path`; `None` if it does not exist.
fn read_record(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn damaged(path: &Path, what: impl std::fmt::Display) -> DirStoreError {
    DirStoreError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "damaged records file ({what}); restore it from a backup, or remove it to forget what it recorded"
            ),
        ),
    }
}

fn load_versions(path: &Path) -> Result<BTreeMap<String, VersionRecord>, DirStoreError> {
    let Some(bytes) = read_record(path).map_err(|source| DirStoreError::Io {
        path: path.to_path_buf(),
        source,
    })?
    else {
        return Ok(BTreeMap::new());
    };
    let entries: BTreeMap<String, VersionEntry> =
        serde_json::from_slice(&bytes).map_err(|e| damaged(path, e))?;
    let mut out = BTreeMap::new();
    for (name, e) in entries {
        let root = hex::decode(&e.root)
            .ok()
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .ok_or_else(|| damaged(path, format!("root of {name:?} is not 64 hex digits")))?;
        out.insert(
            name,
            VersionRecord {
                version: e.version,
                root,
            },
        );
    }
    Ok(out)
}

impl DirStore {
    /// Opens (creating them owner-only if needed) the store under `dir`, mounting every slot
    /// in it, with the records in `records` (read now: a damaged one is an error).
    pub fn open(
        dir: &Path,
        records: &Path,
        max_storage: Option<u64>,
    ) -> Result<Self, DirStoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DirStoreError::Io { path, source }
        };
        ensure_private_dir(dir)?;
        ensure_private_dir(records)?;
        let versions = load_versions(&records.join(VERSIONS_FILE))?;
        let mut slots = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            if path.extension().is_none_or(|e| e != "slot") {
                continue;
            }
            let flash = FileFlash::open(&path).map_err(io(&path))?;
            let mut store = FlashStore::new_multiwrite(flash);
            let root = match store.mount() {
                Ok(Some(m)) => Some(m.root),
                _ => None,
            };
            match root {
                Some(root) if path.file_name() == Some(slot_name(&root).as_ref()) => {
                    slots.insert(root, Slot::new(store));
                }
                _ => {
                    tracing::warn!(path = %path.display(), "removing a damaged content slot");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(DirStore {
            dir: dir.to_path_buf(),
            records: records.to_path_buf(),
            max_storage,
            slots,
            versions,
            max_names: MAX_VERSION_NAMES,
        })
    }

    /// Writes `bytes` to records file `name`, logging why it failed.
    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.records.join(name);
        write_atomic(&path, bytes).map_err(|e| {
            tracing::error!(path = %path.display(), "cannot write a record: {e}");
            if e.kind() == std::io::ErrorKind::StorageFull {
                StoreError::Full
            } else {
                StoreError::Io
            }
        })
    }

    /// Reads records file `name`, logging why it failed.
    fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.records.join(name);
        read_record(&path).map_err(|e| {
            tracing::error!(path = %path.display(), "cannot read a record: {e}");
            StoreError::Io
        })
    }

    /// Bytes the slots take (their nominal sizes).
    pub fn used(&self) -> u64 {
        self.slots
            .values()
            .map(|s| embedded_storage::nor_flash::ReadNorFlash::capacity(s.store.flash()) as u64)
            .sum()
    }

    /// The slot file of content `root`.
    pub fn slot_path(&self, root: &Digest) -> PathBuf {
        self.dir.join(slot_name(root))
    }

    fn slot(&mut self, root: &Digest) -> Result<&mut Slot, StoreError> {
        self.slots.get_mut(root).ok_or(StoreError::Unknown)
    }
}

/// Writes the whole verified content of the slot file `slot` to `out` (via a temporary file).
///
/// Opens its own read-only handle, so it can run beside the agent that owns the store.
pub fn export(slot: &Path, out: &Path) -> Result<u64, DirStoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DirStoreError::Io { path, source }
    };
    let flash = FileFlash::open_read_only(slot).map_err(io(slot))?;
    let mut store = FlashStore::new_multiwrite(flash);
    let manifest = store
        .mount()
        .map_err(DirStoreError::Store)?
        .cloned()
        .ok_or(DirStoreError::Store(StoreError::Corrupt))?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = out.with_extension("part");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io(&tmp))?);
    let mut buf = vec![0u8; manifest.chunk_size as usize];
    let mut proof = Proof::new();
    for i in 0..manifest.chunks() {
        let n = store
            .read_chunk(&manifest.root, i, &mut buf, &mut proof)
            .map_err(DirStoreError::Store)?;
        file.write_all(&buf[..n]).map_err(io(&tmp))?;
    }
    let file = file.into_inner().map_err(|e| DirStoreError::Io {
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(manifest.length)
}

impl ContentStore for DirStore {
    fn open(&mut self, manifest: &Manifest) -> Result<u32, StoreError> {
        if let Some(s) = self.slots.get_mut(&manifest.root) {
            s.verified = None;
            return s.store.open(manifest);
        }
        let size = FlashStore::<FileFlash>::required_size(manifest, true);
        if size > u32::MAX as u64 {
            return Err(StoreError::Full);
        }
        if let Some(max) = self.max_storage
            && self.used() + size > max
        {
            return Err(StoreError::Full);
        }
        let path = self.slot_path(&manifest.root);
        let flash = FileFlash::create(&path, size as usize).map_err(|e| {
            if e.kind() == std::io::ErrorKind::StorageFull {
                StoreError::Full
            } else {
                StoreError::Io
            }
        })?;
        let mut store = FlashStore::new_multiwrite(flash);
        match store.open(manifest) {
            Ok(n) => {
                self.slots.insert(manifest.root, Slot::new(store));
                Ok(n)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn manifest(&self, root: &Digest) -> Option<&Manifest> {
        self.slots.get(root)?.store.manifest(root)
    }

    fn verified(&self, root: &Digest) -> Option<u32> {
        self.slots.get(root)?.store.verified(root)
    }

    fn is_verified(&mut self, root: &Digest, index: u32) -> Result<bool, StoreError> {
        let bits = self.slot(root)?.bits(root)?;
        Ok(bits
            .get(index as usize / 64)
            .is_some_and(|w| w & (1 << (index % 64)) != 0))
    }

    fn write_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        data: &[u8],
        proof: &[Digest],
    ) -> Result<(), StoreError> {
        let slot = self.slot(root)?;
        slot.store.write_chunk(root, index, data, proof)?;
        if let Some(word) = slot
            .verified
            .as_mut()
            .and_then(|bits| bits.get_mut(index as usize / 64))
        {
            *word |= 1 << (index % 64);
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
        self.slot(root)?.store.read_chunk(root, index, data, proof)
    }

    fn held(&self, i: usize) -> Option<Held<'_>> {
        self.slots.values().nth(i)?.store.held(0)
    }

    fn free_bytes(&self) -> u64 {
        match self.max_storage {
            Some(max) => max.saturating_sub(self.used()),
            None => u64::MAX,
        }
    }

    fn load_anchor(&mut self) -> Result<Option<StoredAnchor>, StoreError> {
        let Some(bytes) = self.read_record(ANCHOR_FILE)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            tracing::error!(path = %self.records.join(ANCHOR_FILE).display(), "damaged trust anchor: {e}");
            StoreError::Corrupt
        })
    }

    fn save_anchor(&mut self, anchor: &StoredAnchor) -> Result<(), StoreError> {
        let text = serde_json::to_vec(anchor).map_err(|_| StoreError::Corrupt)?;
        self.write_record(ANCHOR_FILE, &text)
    }

    fn version_record(&mut self, name: &str) -> Result<Option<VersionRecord>, StoreError> {
        Ok(self.versions.get(name).copied())
    }

    fn put_version_record(&mut self, name: &str, record: &VersionRecord) -> Result<(), StoreError> {
        if !self.versions.contains_key(name) && self.versions.len() >= self.max_names {
            return Err(StoreError::Full);
        }
        let mut next = self.versions.clone();
        next.insert(name.to_string(), *record);
        let entries: BTreeMap<&str, VersionEntry> = next
            .iter()
            .map(|(n, r)| {
                let e = VersionEntry {
                    version: r.version,
                    root: hex::encode(r.root),
                };
                (n.as_str(), e)
            })
            .collect();
        let text = serde_json::to_vec_pretty(&entries).map_err(|_| StoreError::Corrupt)?;
        self.write_record(VERSIONS_FILE, &text)?;
        self.versions = next;
        Ok(())
    }

    fn load_latest_time(&mut self) -> Result<Option<u64>, StoreError> {
        let Some(bytes) = self.read_record(TIME_FILE)? else {
            return Ok(None);
        };
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .map(Some)
            .ok_or(StoreError::Corrupt)
    }

    fn save_latest_time(&mut self, unix: u64) -> Result<(), StoreError> {
        self.write_record(TIME_FILE, format!("{unix}\n").as_bytes())
    }
}

#[cfg(test)]
mod test {
    use baton_protocol::identity::Identity;
    use baton_protocol::merkle::{MerkleTree, leaf_hash};

    use super::*;

    fn content(len: usize) -> (Manifest, Vec<u8>, MerkleTree) {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let tree = MerkleTree::from_leaves(data.chunks(4096).map(leaf_hash).collect());
        let m = Manifest::sign(
            &Identity::from_seed([4; 32]),
            heapless::String::try_from("bundle").unwrap(),
            1,
            0,
            len as u64,
            4096,
            tree.root(),
        );
        (m, data, tree)
    }

    #[test]
    fn restart_resumes_and_export_writes_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let (m, data, tree) = content(50_000);
        let root = m.root;
        {
            let mut s = DirStore::open(dir.path(), &dir.path().join("records"), None).unwrap();
            assert_eq!(s.open(&m), Ok(0));
            for i in 0..5 {
                let c = &data[i * 4096..(i + 1) * 4096];
                s.write_chunk(&root, i as u32, c, &tree.proof(i as u32).unwrap())
                    .unwrap();
            }
        }
        let mut s = DirStore::open(dir.path(), &dir.path().join("records"), None).unwrap();
        assert_eq!(s.verified(&root), Some(5));
        assert_eq!(s.held(0).unwrap().manifest.root, root);
        assert_eq!(s.open(&m), Ok(5));
        for i in 5..m.chunks() {
            let start = i as usize * 4096;
            let c = &data[start..(start + 4096).min(data.len())];
            s.write_chunk(&root, i, c, &tree.proof(i).unwrap()).unwrap();
        }
        let out = dir.path().join("out/bundle.bin");
        assert_eq!(export(&s.slot_path(&root), &out).unwrap(), 50_000);
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }

    #[test]
    fn records_survive_a_reopen_and_are_bounded() {
        use baton_protocol::trust::TrustAnchor;
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let (content, records) = (tmp.path().join("content"), tmp.path().join("records"));
        let anchor = StoredAnchor {
            pin: [3; 32],
            anchor: TrustAnchor::pinned(&[baton_protocol::PublicKey([9; 32])], 1).unwrap(),
        };
        let rec = |v: u64| VersionRecord {
            version: v,
            root: [v as u8; 32],
        };
        {
            let mut s = DirStore::open(&content, &records, None).unwrap();
            assert_eq!(s.load_anchor(), Ok(None));
            assert_eq!(s.load_latest_time(), Ok(None));
            s.save_anchor(&anchor).unwrap();
            s.put_version_record("fw", &rec(2)).unwrap();
            s.put_version_record("fw", &rec(3)).unwrap();
            s.put_version_record("config", &rec(1)).unwrap();
            s.save_latest_time(1_234).unwrap();
        }
        let mut s = DirStore::open(&content, &records, None).unwrap();
        assert_eq!(s.load_anchor(), Ok(Some(anchor)));
        assert_eq!(s.version_record("fw"), Ok(Some(rec(3))));
        assert_eq!(s.version_record("config"), Ok(Some(rec(1))));
        assert_eq!(s.load_latest_time(), Ok(Some(1_234)));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&records), 0o700);
        assert_eq!(mode(&records.join(VERSIONS_FILE)), 0o600);
        assert!(!records.join("versions.tmp").exists());
        // The bound: a new name past it is refused, a known one still updates.
        s.max_names = 2;
        assert_eq!(
            s.put_version_record("third", &rec(1)),
            Err(StoreError::Full)
        );
        s.put_version_record("config", &rec(5)).unwrap();
        drop(s);
        // A damaged versions file stops the store from opening, naming the file.
        std::fs::write(records.join(VERSIONS_FILE), "{ not json").unwrap();
        let e = DirStore::open(&content, &records, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(VERSIONS_FILE) && e.contains("damaged"), "{e}");
    }

    #[test]
    fn the_directory_and_slots_are_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("content");
        let (m, ..) = content(10_000);
        let mut s = DirStore::open(&dir, &tmp.path().join("records"), None).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(s.open(&m), Ok(0));
        assert_eq!(mode(&s.slot_path(&m.root)), 0o600);
        drop(s);
        // A directory left open by an older build is closed at the next start.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        DirStore::open(&dir, &tmp.path().join("records"), None).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn quota_is_enforced_and_damaged_slots_removed() {
        let dir = tempfile::tempdir().unwrap();
        let records = tempfile::tempdir().unwrap();
        let (m, ..) = content(50_000);
        let mut s = DirStore::open(dir.path(), records.path(), Some(10_000)).unwrap();
        assert_eq!(s.open(&m), Err(StoreError::Full));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        std::fs::write(dir.path().join("junk.slot"), b"not a slot").unwrap();
        let s = DirStore::open(dir.path(), records.path(), None).unwrap();
        assert!(s.held(0).is_none());
        assert!(!dir.path().join("junk.slot").exists());
    }
}
