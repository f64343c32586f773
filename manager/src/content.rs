//! The manager's keys and the content it publishes and serves.
//!
//! Keys: the manager's Ed25519 identity (`manager.key`, which agents pin and
//! which signs their certificates), created on first run under the data
//! directory and kept, readable by the owner only; a key file that group or
//! others may read or write is refused on load. It is the transport identity
//! only: manifests are signed by publisher keys the root-signed trust document
//! lists (see [`crate::trust`]), never by a key the manager makes itself.
//!
//! Content: publishing a file streams it once, hashing each chunk into a
//! Merkle leaf; the whole [`MerkleTree`] stays in memory so any chunk's proof
//! is at hand, and the file stays open. A [`Library`] maps content roots to
//! published content and answers `ChunkRequest`s with a positioned read, a
//! check of the chunk against the tree (so a file changed on disk is never
//! served as the published content), and the proof.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use baton_agent_core::linux::datadir::{DataDirError, Existing, open_private, read_secret};
use baton_protocol::identity::Identity;
use baton_protocol::manifest::{MAX_CONTENT_NAME, Manifest};
use baton_protocol::merkle::{self, MerkleTree};
use baton_protocol::message::{Message, Refusal};
use baton_protocol::types::Digest;
use baton_protocol::{MAX_CHUNK_SIZE, MAX_CONTENT_LEN, MIN_CHUNK_SIZE};

/// Default chunk size for published content (bytes).
pub const DEFAULT_CHUNK_SIZE: u32 = 32 * 1024;

/// Why keys or content could not be loaded, published or served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A key or token file is open to group or others (or cannot be checked).
    #[error(transparent)]
    Private(#[from] DataDirError),
    /// A key or token file does not hold what it should.
    #[error("{path}: {what}")]
    BadSecretFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The file is empty; there is nothing to distribute.
    #[error("{0}: file is empty, nothing to publish")]
    Empty(PathBuf),
    /// The file is larger than the protocol allows.
    #[error("{path}: {len} bytes is more than the {max} bytes a manifest may describe")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The chunk size is outside the protocol's limits.
    #[error("chunk size {0} is out of range ({MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes)")]
    BadChunkSize(u64),
    /// The content name is empty or too long.
    #[error("content name {0:?} must be 1..={MAX_CONTENT_NAME} bytes")]
    BadName(String),
    /// The file no longer hashes to the root it was published with.
    #[error("{path}: the file changed since it was published (root differs)")]
    Changed {
        /// The file.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a 32-byte secret kept as hex in `path`, or creates one (mode 0600) if the file is absent.
/// A file group or others may read or write is refused ([`DataDirError::Exposed`]).
///
/// Returns the secret and whether it was created now.
pub fn load_or_create_secret(path: &Path) -> Result<([u8; 32], bool), ContentError> {
    match read_secret(path)? {
        Some(text) => {
            let bad = |what: &str| ContentError::BadSecretFile {
                path: path.to_path_buf(),
                what: format!("{what}; expected 64 hex digits (delete it to create a new one)"),
            };
            let bytes = hex::decode(text.trim()).map_err(|_| bad("not hex"))?;
            let secret: [u8; 32] = bytes.try_into().map_err(|_| bad("wrong length"))?;
            Ok((secret, false))
        }
        None => {
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            write_private(path, format!("{}\n", hex::encode(secret)).as_bytes())?;
            Ok((secret, true))
        }
    }
}

/// Creates `path` with `contents`, readable and writable by the owner only (fails if it exists).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), ContentError> {
    let mut f = open_private(
        std::fs::OpenOptions::new().write(true).create_new(true),
        path,
        Existing::Keep,
    )
    .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The manager's signing identity.
#[derive(Clone, Debug)]
pub struct Keys {
    /// Session identity: agents pin its public key; it signs agent certificates.
    pub manager: Identity,
}

/// The file an earlier build kept its own publisher key in; ignored now (with a warning).
pub const OLD_PUBLISHER_KEY_FILE: &str = "publisher.key";

impl Keys {
    /// Loads `manager.key` from `dir`, creating it if missing. A `publisher.key` left by an
    /// earlier build is not used (a warning says so).
    pub fn load_or_create(dir: &Path) -> Result<Self, ContentError> {
        let (manager, new_m) = load_or_create_secret(&dir.join("manager.key"))?;
        let keys = Keys {
            manager: Identity::from_seed(manager),
        };
        if new_m {
            tracing::info!(key = %hex::encode(keys.manager.public().0), "created manager key");
        }
        let old = dir.join(OLD_PUBLISHER_KEY_FILE);
        if old.exists() {
            tracing::warn!(
                "{} is ignored: the manager no longer signs content with a key of its own; sign offline (`baton sign`) or give a publisher key the trust document lists with `baton serve --publisher-key FILE`",
                old.display()
            );
        }
        Ok(keys)
    }
}

/// Checks a chunk size against the protocol's limits.
pub fn check_chunk_size(chunk_size: u64) -> Result<u32, ContentError> {
    if (MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&chunk_size) {
        Ok(chunk_size as u32)
    } else {
        Err(ContentError::BadChunkSize(chunk_size))
    }
}

/// Checks a content name against the protocol's limits.
pub fn check_name(name: &str) -> Result<heapless::String<MAX_CONTENT_NAME>, ContentError> {
    if name.is_empty() {
        return Err(ContentError::BadName(name.into()));
    }
    heapless::String::try_from(name).map_err(|_| ContentError::BadName(name.into()))
}

/// A file hashed into its Merkle tree.
#[derive(Debug)]
pub struct Hashed {
    /// The open file.
    pub file: File,
    /// Its canonical path.
    pub path: PathBuf,
    /// Its length in bytes.
    pub length: u64,
    /// The chunk size used.
    pub chunk_size: u32,
    /// The tree over its chunks.
    pub tree: MerkleTree,
}

/// Streams the file at `path` once and builds the Merkle tree of its chunks.
pub fn hash_file(path: &Path, chunk_size: u32) -> Result<Hashed, ContentError> {
    let chunk_size = check_chunk_size(chunk_size as u64)?;
    let path = std::fs::canonicalize(path).map_err(io_err(path))?;
    let mut file = File::open(&path).map_err(io_err(&path))?;
    let length = file.metadata().map_err(io_err(&path))?.len();
    if length == 0 {
        return Err(ContentError::Empty(path));
    }
    if length > MAX_CONTENT_LEN {
        return Err(ContentError::TooLarge {
            path,
            len: length,
            max: MAX_CONTENT_LEN,
        });
    }
    let chunks = length.div_ceil(chunk_size as u64);
    let mut leaves = Vec::with_capacity(chunks as usize);
    let mut buf = vec![0u8; chunk_size as usize];
    let mut left = length;
    while left > 0 {
        let want = left.min(chunk_size as u64) as usize;
        file.read_exact(&mut buf[..want]).map_err(io_err(&path))?;
        leaves.push(merkle::leaf_hash(&buf[..want]));
        left -= want as u64;
    }
    Ok(Hashed {
        tree: MerkleTree::from_leaves(leaves),
        file,
        path,
        length,
        chunk_size,
    })
}

/// Content the manager serves: its manifest, tree and open file.
#[derive(Debug)]
pub struct Content {
    manifest: Manifest,
    tree: MerkleTree,
    file: File,
    path: PathBuf,
}

impl Content {
    /// Content from a hashed file and its manifest (which must name the same root and length).
    pub fn new(hashed: Hashed, manifest: Manifest) -> Result<Self, ContentError> {
        if hashed.tree.root() != manifest.root
            || hashed.length != manifest.length
            || hashed.chunk_size != manifest.chunk_size
        {
            return Err(ContentError::Changed { path: hashed.path });
        }
        Ok(Content {
            manifest,
            tree: hashed.tree,
            file: hashed.file,
            path: hashed.path,
        })
    }

    /// Re-opens published content after a restart: hashes the file again and checks the root.
    pub fn reopen(path: &Path, manifest: Manifest) -> Result<Self, ContentError> {
        let hashed = hash_file(path, manifest.chunk_size)?;
        Content::new(hashed, manifest)
    }

    /// The signed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The file it is served from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads chunk `index` into `buf` and checks it against the tree; returns its proof.
    pub fn read_chunk(&self, index: u32, buf: &mut Vec<u8>) -> Result<merkle::Proof, ContentError> {
        let proof = self
            .tree
            .proof(index)
            .ok_or(ContentError::BadChunkSize(index as u64))?;
        let len = self.manifest.chunk_len(index) as usize;
        buf.resize(len, 0);
        self.file
            .read_exact_at(buf, self.manifest.chunk_offset(index))
            .map_err(io_err(&self.path))?;
        let leaf = merkle::leaf_hash(buf);
        merkle::verify_leaf(
            &self.manifest.root,
            self.tree.leaves(),
            index,
            &leaf,
            &proof,
        )
        .map_err(|_| ContentError::Changed {
            path: self.path.clone(),
        })?;
        Ok(proof)
    }

    /// The encoded answer to a request for chunk `index`: a `Chunk`, or a `Refuse`.
    pub fn answer(&self, index: u32) -> Vec<u8> {
        let root = self.manifest.root;
        if index >= self.manifest.chunks() {
            tracing::warn!(index, root = %hex::encode(&root[..8]), "request for a chunk past the end");
            return refuse(root, index, Refusal::Unknown);
        }
        let mut data = Vec::new();
        match self.read_chunk(index, &mut data) {
            Ok(proof) => Message::Chunk {
                root,
                index,
                proof,
                data: &data,
            }
            .to_vec(),
            Err(e) => {
                tracing::error!(index, "cannot serve chunk: {e}");
                refuse(root, index, Refusal::Unknown)
            }
        }
    }
}

/// An encoded `Refuse`.
pub fn refuse(root: Digest, index: u32, reason: Refusal) -> Vec<u8> {
    Message::Refuse {
        root,
        index,
        reason,
    }
    .to_vec()
}

/// Every content the manager serves, by root. Shared by all connections.
#[derive(Debug, Default)]
pub struct Library {
    by_root: RwLock<HashMap<Digest, Arc<Content>>>,
}

impl Library {
    /// An empty library.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) content.
    pub fn insert(&self, content: Content) -> Arc<Content> {
        let content = Arc::new(content);
        self.by_root
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(content.manifest.root, content.clone());
        content
    }

    /// The content with this root.
    pub fn get(&self, root: &Digest) -> Option<Arc<Content>> {
        self.by_root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(root)
            .cloned()
    }

    /// The encoded answer to `ChunkRequest { root, index }` (blocking file read).
    pub fn answer(&self, root: &Digest, index: u32) -> Vec<u8> {
        match self.get(root) {
            Some(content) => content.answer(index),
            None => refuse(*root, index, Refusal::Unknown),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn write_file(dir: &Path, len: usize) -> PathBuf {
        let path = dir.join("content.bin");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    fn publisher() -> Identity {
        Identity::from_seed([42; 32])
    }

    fn publish(path: &Path, chunk: u32) -> Content {
        let h = hash_file(path, chunk).unwrap();
        let m = Manifest::sign(
            &publisher(),
            check_name("fw").unwrap(),
            1,
            0,
            h.length,
            h.chunk_size,
            h.tree.root(),
        );
        Content::new(h, m).unwrap()
    }

    #[test]
    fn keys_are_created_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keys::load_or_create(dir.path()).unwrap();
        let b = Keys::load_or_create(dir.path()).unwrap();
        assert_eq!(a.manager.public(), b.manager.public());
        assert!(
            !dir.path().join(OLD_PUBLISHER_KEY_FILE).exists(),
            "no publisher key of its own"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("manager.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join("manager.key"), "zz").unwrap();
        assert!(matches!(
            Keys::load_or_create(dir.path()),
            Err(ContentError::BadSecretFile { .. })
        ));
    }

    #[test]
    fn a_key_file_open_to_others_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        Keys::load_or_create(dir.path()).unwrap();
        for name in ["manager.key"] {
            let path = dir.path().join(name);
            for loose in [0o644, 0o660, 0o606] {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).unwrap();
                let e = Keys::load_or_create(dir.path()).unwrap_err();
                assert!(
                    matches!(e, ContentError::Private(DataDirError::Exposed { .. })),
                    "{e}"
                );
                assert!(
                    e.to_string()
                        .contains(&format!("chmod 600 {}", path.display())),
                    "{e}"
                );
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Keys::load_or_create(dir.path()).unwrap();
    }

    #[test]
    fn served_chunks_verify_against_the_signed_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), 10_000);
        let content = publish(&path, 4096);
        let m = content.manifest().clone();
        m.verify_signature(&publisher().public()).unwrap();
        assert_eq!((m.length, m.chunks()), (10_000, 3));
        let lib = Library::new();
        lib.insert(content);
        let original = std::fs::read(&path).unwrap();
        for index in 0..3 {
            let bytes = lib.answer(&m.root, index);
            match Message::decode(&bytes).unwrap() {
                Message::Chunk {
                    root,
                    index: i,
                    proof,
                    data,
                } => {
                    assert_eq!((root, i), (m.root, index));
                    let start = index as usize * 4096;
                    assert_eq!(data, &original[start..(start + 4096).min(10_000)]);
                    merkle::verify_leaf(&m.root, 3, index, &merkle::leaf_hash(data), &proof)
                        .unwrap();
                }
                other => panic!("expected a chunk, got {other:?}"),
            }
        }
        for (root, index) in [(m.root, 3), ([0; 32], 0)] {
            let bytes = lib.answer(&root, index);
            assert_eq!(
                Message::decode(&bytes).unwrap(),
                Message::Refuse {
                    root,
                    index,
                    reason: Refusal::Unknown
                }
            );
        }
    }

    #[test]
    fn a_file_changed_after_publishing_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), 1000);
        let content = publish(&path, 256);
        let manifest = content.manifest().clone();
        let mut data = std::fs::read(&path).unwrap();
        data[300] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert!(matches!(
            Message::decode(&content.answer(1)).unwrap(),
            Message::Refuse { .. }
        ));
        assert!(matches!(
            Message::decode(&content.answer(0)).unwrap(),
            Message::Chunk { .. }
        ));
        assert!(matches!(
            Content::reopen(&path, manifest),
            Err(ContentError::Changed { .. })
        ));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            hash_file(&empty, 4096),
            Err(ContentError::Empty(_))
        ));
        assert!(matches!(
            hash_file(&empty, 100),
            Err(ContentError::BadChunkSize(100))
        ));
        assert!(matches!(
            hash_file(&dir.path().join("missing"), 4096),
            Err(ContentError::Io { .. })
        ));
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert!(check_name("router-fw").is_ok());
    }
}
