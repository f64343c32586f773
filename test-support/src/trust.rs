//! A test fleet's content trust: a root key, a publisher key, and the trust document the
//! root signed listing the publisher for every name (`*`), as files in a directory — what
//! `baton keys new`, `baton trust init|add-publisher|sign` would make. Managers started by
//! [`crate::Manager`] take the document (`--trust`) and the publisher key
//! (`--publisher-key`); agents started by [`crate::AgentProc`] pin the root (`--root-key`).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use baton_manager::trust::{read_key_file, write_key_file, write_trust_file};
use baton_protocol::identity::Identity;
use baton_protocol::trust::{NamePattern, PublisherGrant, SignedTrust, TrustDocument};

/// A root key, a publisher key and the signed trust document, with their files.
#[derive(Debug)]
pub struct TrustKit {
    /// The directory the files are in.
    pub dir: PathBuf,
    /// The root key (`root.key`).
    pub root: Identity,
    /// The publisher key (`publisher.key`), listed for `*`.
    pub publisher: Identity,
}

/// A fresh Ed25519 identity from the system's randomness.
pub fn new_identity() -> Identity {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .expect("randomness from /dev/urandom");
    Identity::from_seed(seed)
}

/// Loads the key file at `path`, or makes one.
fn key_in(path: &Path) -> Identity {
    if path.exists() {
        return read_key_file(path).expect("a test key file");
    }
    let key = new_identity();
    write_key_file(path, &key).expect("write a test key file");
    key
}

/// A trust document of `version` with `roots` (threshold `threshold`) listing each
/// publisher for its names, signed by `signers`.
pub fn signed_document(
    version: u64,
    roots: &[&Identity],
    threshold: u8,
    publishers: &[(&Identity, &[&str])],
    signers: &[&Identity],
) -> SignedTrust {
    let mut signed = SignedTrust::new(TrustDocument {
        version,
        expires: 0,
        threshold,
        roots: roots.iter().map(|r| r.public()).collect(),
        publishers: publishers
            .iter()
            .map(|(key, names)| PublisherGrant {
                key: key.public(),
                names: names
                    .iter()
                    .map(|n| NamePattern::try_from(*n).expect("a short pattern"))
                    .collect(),
            })
            .collect(),
    });
    for s in signers {
        signed.sign(s).expect("room for the signature");
    }
    signed
}

impl TrustKit {
    /// The kit in `dir` (created with it on first use, the same keys after).
    pub fn in_dir(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("trust kit directory");
        let root = key_in(&dir.join("root.key"));
        let publisher = key_in(&dir.join("publisher.key"));
        let kit = TrustKit {
            dir: dir.to_path_buf(),
            root,
            publisher,
        };
        if !kit.trust_file().exists() {
            let doc = signed_document(
                1,
                &[&kit.root],
                1,
                &[(&kit.publisher, &["*"])],
                &[&kit.root],
            );
            write_trust_file(&kit.trust_file(), &doc).expect("write the trust document");
        }
        kit
    }

    /// The signed trust document (version 1: the publisher for `*`).
    pub fn trust_file(&self) -> PathBuf {
        self.dir.join("trust.bin")
    }

    /// The publisher's key file.
    pub fn publisher_key_file(&self) -> PathBuf {
        self.dir.join("publisher.key")
    }

    /// The root key file.
    pub fn root_key_file(&self) -> PathBuf {
        self.dir.join("root.key")
    }

    /// The root's public key as agents pin it (`--root-key`).
    pub fn root_hex(&self) -> String {
        hex::encode(self.root.public().0)
    }
}
