//! Content trust on the manager's side: key files, the chain of root-signed trust
//! documents the manager stores and relays, and the checks a manifest must pass before
//! the manager publishes it.
//!
//! The manager is not a root of content trust. Root keys (offline, `threshold` of them)
//! sign a [`TrustDocument`] naming the publisher keys and the content names each may sign;
//! publishers sign manifests. The manager keeps the chain of signed documents it was given
//! ([`TrustChain`]: a new one must chain from the newest under the [`TrustAnchor`] rules,
//! the first one under its own roots' threshold; the newest [`KEEP_TRUST_DOCUMENTS`] are
//! kept) and sends it to every agent, which judges each document against the root keys it
//! pinned. A manifest is published only if the newest document lists its signer for its
//! name ([`TrustChain::verify_manifest`]); the manager signs manifests itself only with a
//! publisher key given to it explicitly (`baton serve --publisher-key`) and only for the
//! names the newest document lists that key for ([`TrustChain::may_sign`]).
//!
//! Files: a key file holds an Ed25519 seed as 64 hex digits and a newline, owner-only
//! ([`write_key_file`], [`read_key_file`]); a trust document file and a manifest file hold
//! the postcard encoding of [`SignedTrust`] and [`Manifest`] ([`read_trust_file`],
//! [`read_manifest_file`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use baton_agent_core::linux::datadir::{Existing, open_private, read_secret};
use baton_protocol::identity::Identity;
use baton_protocol::manifest::{Manifest, ManifestError};
use baton_protocol::trust::{MAX_TRUST_BYTES, SignedTrust, TrustAnchor, TrustDocument, TrustError};
use baton_protocol::types::{KeyId, PublicKey};

use crate::content::ContentError;

/// How many signed trust documents the manager keeps (the newest); agents that missed
/// more than this many rotations must be given the newer documents again by hand.
pub const KEEP_TRUST_DOCUMENTS: usize = 16;

/// Largest manifest file read, in bytes (a manifest encodes in under 200).
pub const MAX_MANIFEST_BYTES: usize = 1024;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad_file(path: &Path, what: impl Into<String>) -> ContentError {
    ContentError::BadSecretFile {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Writes a new key file (`seed` as hex, mode 0600); refuses to replace an existing file.
pub fn write_key_file(path: &Path, identity: &Identity) -> Result<(), ContentError> {
    crate::content::write_private(
        path,
        format!("{}\n", hex::encode(identity.seed())).as_bytes(),
    )
}

/// Reads a key file written by [`write_key_file`] (`baton keys new`); a file group or
/// others may read or write is refused.
pub fn read_key_file(path: &Path) -> Result<Identity, ContentError> {
    let text = read_secret(path)?.ok_or_else(|| ContentError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such key file"),
    })?;
    let bytes = hex::decode(text.trim())
        .map_err(|_| bad_file(path, "not a key file: expected 64 hex digits"))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| bad_file(path, "not a key file: expected 64 hex digits"))?;
    Ok(Identity::from_seed(seed))
}

/// Reads a file that should hold a `what` of at most `max` bytes.
fn read_small(path: &Path, max: usize, what: &str) -> Result<Vec<u8>, ContentError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.len() > max {
        return Err(bad_file(
            path,
            format!(
                "not a {what}: {} bytes is more than a {what} may hold ({max})",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Reads a signed trust document file (postcard `SignedTrust`).
pub fn read_trust_file(path: &Path) -> Result<SignedTrust, ContentError> {
    let bytes = read_small(path, MAX_TRUST_BYTES, "trust document")?;
    SignedTrust::decode(&bytes).map_err(|_| {
        bad_file(
            path,
            "not a trust document (make one with `baton trust init`)",
        )
    })
}

/// The encoding of a signed trust document.
pub fn encode_trust(signed: &SignedTrust) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_TRUST_BYTES];
    let n = signed
        .encode(&mut buf)
        .expect("a trust document within the protocol's bounds fits MAX_TRUST_BYTES")
        .len();
    buf.truncate(n);
    buf
}

/// Replaces `path` with `bytes` atomically (a temporary file beside it, renamed into place).
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), ContentError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = open_private(
        std::fs::OpenOptions::new().write(true).create_new(true),
        &tmp,
        Existing::Keep,
    )
    .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes a signed trust document file (replacing it).
pub fn write_trust_file(path: &Path, signed: &SignedTrust) -> Result<(), ContentError> {
    replace_file(path, &encode_trust(signed))
}

/// Reads a manifest file (postcard `Manifest`, as `baton sign` writes it).
pub fn read_manifest_file(path: &Path) -> Result<Manifest, ContentError> {
    let bytes = read_small(path, MAX_MANIFEST_BYTES, "manifest")?;
    decode_manifest_bytes(&bytes)
        .map_err(|_| bad_file(path, "not a manifest (make one with `baton sign`)"))
}

/// The encoding of a manifest (what a manifest file holds).
pub fn encode_manifest(manifest: &Manifest) -> Vec<u8> {
    postcard::to_allocvec(manifest).expect("a manifest encodes")
}

/// Writes a manifest file (replacing it).
pub fn write_manifest_file(path: &Path, manifest: &Manifest) -> Result<(), ContentError> {
    replace_file(path, &encode_manifest(manifest))
}

/// Decodes a manifest's postcard bytes (nothing may follow it).
pub fn decode_manifest_bytes(bytes: &[u8]) -> Result<Manifest, postcard::Error> {
    match postcard::take_from_bytes::<Manifest>(bytes)? {
        (m, []) => Ok(m),
        _ => Err(postcard::Error::DeserializeUnexpectedEnd),
    }
}

/// A key as people read it: 64 hex digits.
pub fn key_hex(key: &PublicKey) -> String {
    hex::encode(key.0)
}

/// A key id as people read it: 16 hex digits.
pub fn key_id_hex(id: &KeyId) -> String {
    hex::encode(id.0)
}

/// Parses a public key given as 64 hex digits.
pub fn parse_key_hex(text: &str) -> Result<PublicKey, String> {
    let bytes = hex::decode(text.trim())
        .map_err(|_| format!("{text:?} is not a key: expected 64 hex digits"))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| format!("{text:?} is not a key: expected 64 hex digits"))?;
    Ok(PublicKey(key))
}

/// Why a trust document was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustRefused {
    /// It does not chain from the newest stored document (or is not signed by its own
    /// roots' threshold, for the first); carries what the protocol says and the versions.
    #[error("trust document version {version} refused: {why}{}", held.map(|h| format!(" (the manager holds version {h})")).unwrap_or_default())]
    Refused {
        /// The refused document's version.
        version: u64,
        /// The newest stored version, if any.
        held: Option<u64>,
        /// The protocol's reason.
        why: TrustError,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What [`TrustChain::check`] found about a document that may be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustCheck {
    /// It is the newest stored document already.
    Held,
    /// It chains from the newest stored one: the anchor after it.
    Newer(TrustAnchor),
}

/// The signed trust documents the manager holds, oldest first, with their encodings.
#[derive(Clone, Debug, Default)]
pub struct TrustChain {
    documents: Vec<(SignedTrust, Vec<u8>)>,
    anchor: Option<TrustAnchor>,
}

impl TrustChain {
    /// The chain of these encoded documents (oldest first, as stored); documents that do
    /// not decode are skipped with an error logged. The newest decoding one is the anchor.
    pub fn from_encoded(encoded: Vec<Vec<u8>>) -> Self {
        let mut chain = TrustChain::default();
        for bytes in encoded {
            match SignedTrust::decode(&bytes) {
                Ok(signed) => chain.documents.push((signed, bytes)),
                Err(e) => tracing::error!("a stored trust document does not decode ({e}); skipped"),
            }
        }
        chain.anchor = chain.documents.last().and_then(|(s, _)| anchor_of(s));
        chain
    }

    /// The newest document.
    pub fn latest(&self) -> Option<&SignedTrust> {
        self.documents.last().map(|(s, _)| s)
    }

    /// Every document's encoding, oldest first (what is sent after `Welcome`).
    pub fn encoded(&self) -> impl Iterator<Item = &[u8]> {
        self.documents.iter().map(|(_, b)| b.as_slice())
    }

    /// How many documents are held.
    pub fn len(&self) -> usize {
        self.documents.len()
    }

    /// Whether no document is held.
    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// Judges `signed` as the next document at `now` (Unix seconds): the newest one again,
    /// or one that chains from it (the first: signed by its own roots' threshold).
    pub fn check(&self, signed: &SignedTrust, now: u64) -> Result<TrustCheck, TrustRefused> {
        let refused = |why| TrustRefused::Refused {
            version: signed.document.version,
            held: self.anchor.as_ref().map(|a| a.version),
            why,
        };
        let anchor = match &self.anchor {
            Some(a) => a.clone(),
            None => {
                signed.document.check_shape().map_err(refused)?;
                TrustAnchor::pinned(&signed.document.roots, signed.document.threshold)
                    .map_err(refused)?
            }
        };
        let first = self.anchor.is_none();
        // Agents take an expired document into their chain (they judge expiry on use), but
        // an upload that has expired already is a mistake: say so.
        if signed.document.is_expired(Some(now)) {
            return Err(refused(TrustError::Expired));
        }
        let next = anchor.accept(signed).map_err(|why| match why {
            // The first document is judged under its own roots: say so.
            TrustError::OldRootsBelowThreshold if first => {
                refused(TrustError::NewRootsBelowThreshold)
            }
            other => refused(other),
        })?;
        if self.anchor.as_ref() == Some(&next) {
            Ok(TrustCheck::Held)
        } else {
            Ok(TrustCheck::Newer(next))
        }
    }

    /// Appends a document [`TrustChain::check`] found newer, dropping the oldest beyond
    /// [`KEEP_TRUST_DOCUMENTS`].
    pub fn push(&mut self, signed: SignedTrust, anchor: TrustAnchor) {
        let bytes = encode_trust(&signed);
        self.documents.push((signed, bytes));
        if self.documents.len() > KEEP_TRUST_DOCUMENTS {
            let extra = self.documents.len() - KEEP_TRUST_DOCUMENTS;
            self.documents.drain(..extra);
        }
        self.anchor = Some(anchor);
    }

    /// Checks that the newest document lists `manifest`'s signer for its name and that the
    /// signature verifies (no document: [`ManifestError::NoTrust`]; the document expired
    /// at `now`: [`ManifestError::Expired`]).
    pub fn verify_manifest(&self, manifest: &Manifest, now: u64) -> Result<(), ManifestError> {
        let doc = &self.latest().ok_or(ManifestError::NoTrust)?.document;
        if doc.is_expired(Some(now)) {
            return Err(ManifestError::Expired);
        }
        doc.verify_manifest(manifest)
    }

    /// Whether the newest document lets `publisher` sign content `name` (the same
    /// errors as [`TrustChain::verify_manifest`], but for a manifest yet to be signed).
    pub fn may_sign(
        &self,
        publisher: &PublicKey,
        name: &str,
        now: u64,
    ) -> Result<(), ManifestError> {
        let doc: &TrustDocument = &self.latest().ok_or(ManifestError::NoTrust)?.document;
        if doc.is_expired(Some(now)) {
            return Err(ManifestError::Expired);
        }
        let grant = doc
            .publishers
            .iter()
            .find(|g| g.key == *publisher)
            .ok_or(ManifestError::UntrustedSigner)?;
        if grant
            .names
            .iter()
            .any(|p| baton_protocol::trust::pattern_matches(p, name))
        {
            Ok(())
        } else {
            Err(ManifestError::NotListed)
        }
    }
}

/// The anchor an agent holding `signed` (and trusting its roots) would have.
fn anchor_of(signed: &SignedTrust) -> Option<TrustAnchor> {
    let doc = &signed.document;
    TrustAnchor::pinned(&doc.roots, doc.threshold)
        .and_then(|a| a.accept(signed))
        .map_err(|e| {
            tracing::error!(
                version = doc.version,
                "the newest stored trust document is not valid ({e})"
            )
        })
        .ok()
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::trust::{NamePattern, PublisherGrant};

    fn key(seed: u8) -> Identity {
        Identity::from_seed([seed; 32])
    }

    fn doc(
        version: u64,
        roots: &[&Identity],
        publisher: &Identity,
        names: &[&str],
    ) -> TrustDocument {
        TrustDocument {
            version,
            expires: 0,
            threshold: 1,
            roots: roots.iter().map(|r| r.public()).collect(),
            publishers: heapless::Vec::from_slice(&[PublisherGrant {
                key: publisher.public(),
                names: names
                    .iter()
                    .map(|n| NamePattern::try_from(*n).unwrap())
                    .collect(),
            }])
            .unwrap(),
        }
    }

    fn signed(d: TrustDocument, by: &[&Identity]) -> SignedTrust {
        let mut s = SignedTrust::new(d);
        for r in by {
            s.sign(r).unwrap();
        }
        s
    }

    fn accept(chain: &mut TrustChain, s: SignedTrust) -> Result<TrustCheck, TrustRefused> {
        let check = chain.check(&s, 1_000)?;
        if let TrustCheck::Newer(a) = &check {
            chain.push(s, a.clone());
        }
        Ok(check)
    }

    #[test]
    fn the_chain_starts_under_its_own_roots_and_grows_under_the_held_ones() {
        let (root, other, publisher) = (key(1), key(2), key(3));
        let mut chain = TrustChain::default();
        let unsigned = SignedTrust::new(doc(1, &[&root], &publisher, &["*"]));
        assert!(matches!(
            chain.check(&unsigned, 1_000),
            Err(TrustRefused::Refused {
                why: TrustError::NewRootsBelowThreshold,
                ..
            })
        ));
        let v1 = signed(doc(1, &[&root], &publisher, &["fw-*"]), &[&root]);
        assert!(matches!(
            accept(&mut chain, v1.clone()),
            Ok(TrustCheck::Newer(_))
        ));
        assert_eq!(accept(&mut chain, v1).unwrap(), TrustCheck::Held);
        // Signed by a stranger who names itself root: refused.
        let forged = signed(doc(2, &[&other], &publisher, &["*"]), &[&other]);
        let e = chain.check(&forged, 1_000).unwrap_err();
        assert!(
            e.to_string().contains("version 2") && e.to_string().contains("holds version 1"),
            "{e}"
        );
        let v2 = signed(doc(2, &[&root], &publisher, &["*"]), &[&root]);
        accept(&mut chain, v2).unwrap();
        assert_eq!(chain.len(), 2);
        // Bounded: only the newest are kept, the anchor follows the newest.
        for v in 3..(3 + KEEP_TRUST_DOCUMENTS as u64) {
            accept(
                &mut chain,
                signed(doc(v, &[&root], &publisher, &["*"]), &[&root]),
            )
            .unwrap();
        }
        assert_eq!(chain.len(), KEEP_TRUST_DOCUMENTS);
        assert_eq!(
            chain.latest().unwrap().document.version,
            2 + KEEP_TRUST_DOCUMENTS as u64
        );
        let reloaded = TrustChain::from_encoded(chain.encoded().map(<[u8]>::to_vec).collect());
        assert_eq!(reloaded.anchor, chain.anchor);
    }

    #[test]
    fn manifests_and_online_signing_follow_the_newest_document() {
        let (root, publisher, stranger) = (key(1), key(3), key(4));
        let mut chain = TrustChain::default();
        let m = Manifest::sign(
            &publisher,
            "fw-a".try_into().unwrap(),
            1,
            0,
            10,
            256,
            [1; 32],
        );
        assert_eq!(chain.verify_manifest(&m, 1), Err(ManifestError::NoTrust));
        assert_eq!(
            chain.may_sign(&publisher.public(), "fw-a", 1),
            Err(ManifestError::NoTrust)
        );
        accept(
            &mut chain,
            signed(doc(1, &[&root], &publisher, &["fw-*"]), &[&root]),
        )
        .unwrap();
        assert_eq!(chain.verify_manifest(&m, 1), Ok(()));
        assert_eq!(chain.may_sign(&publisher.public(), "fw-a", 1), Ok(()));
        assert_eq!(
            chain.may_sign(&publisher.public(), "config", 1),
            Err(ManifestError::NotListed)
        );
        assert_eq!(
            chain.may_sign(&stranger.public(), "fw-a", 1),
            Err(ManifestError::UntrustedSigner)
        );
        let forged = Manifest::sign(
            &stranger,
            "fw-a".try_into().unwrap(),
            1,
            0,
            10,
            256,
            [1; 32],
        );
        assert_eq!(
            chain.verify_manifest(&forged, 1),
            Err(ManifestError::UntrustedSigner)
        );
    }

    #[test]
    fn key_and_document_files_round_trip_and_keys_stay_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let k = key(9);
        write_key_file(&path, &k).unwrap();
        assert!(
            write_key_file(&path, &key(8)).is_err(),
            "an existing key file is kept"
        );
        assert_eq!(read_key_file(&path).unwrap().public(), k.public());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_key_file(&path).is_err());
        let trust = dir.path().join("trust.bin");
        let s = signed(doc(1, &[&k], &key(3), &["*"]), &[&k]);
        write_trust_file(&trust, &s).unwrap();
        assert_eq!(read_trust_file(&trust).unwrap(), s);
        std::fs::write(&trust, b"junk").unwrap();
        assert!(
            read_trust_file(&trust)
                .unwrap_err()
                .to_string()
                .contains("baton trust init")
        );
    }
}
