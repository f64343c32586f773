//! The trust document: which publisher keys may sign which content, under offline root keys.
//!
//! Content trust does not rest on the manager. A set of *root keys* (kept offline, `threshold`
//! of them must sign) signs a small [`TrustDocument`]: the publisher keys, the content names
//! each may sign (exact names or `prefix*` patterns), a version and an expiry. Agents pin the
//! root keys (a [`TrustAnchor`]), accept a newer trust document only when enough of the roots
//! they trust *and* enough of the document's own roots signed it (so a root rotation needs
//! both the old and the new threshold, as TUF's root rotation does), and accept a manifest
//! only from a publisher the document lists for that name. The manager stores and relays the
//! signed documents; holding the manager's keys gives no way to make content acceptable.
//!
//! Every root signs [`TrustDocument::digest`]: SHA-256 over `"baton trust v1\0" ‖
//! postcard(document)`, so neither side needs a buffer the size of the document.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::identity::{self, Identity};
use crate::manifest::{MAX_CONTENT_NAME, Manifest, ManifestError};
use crate::types::{Digest, KeyId, PublicKey};

/// Most root keys one trust document names.
pub const MAX_ROOT_KEYS: usize = 4;
/// Most publisher keys one trust document lists.
pub const MAX_TRUSTED_PUBLISHERS: usize = 4;
/// Most name patterns one publisher is granted.
pub const MAX_NAME_PATTERNS: usize = 4;
/// Most signatures on one signed trust document (the old and the new roots of a rotation).
pub const MAX_TRUST_SIGNATURES: usize = 2 * MAX_ROOT_KEYS;
/// Largest encoded [`SignedTrust`], in bytes (the largest possible is about 1.9 KB).
pub const MAX_TRUST_BYTES: usize = 2048;
/// Domain prefix hashed before the document's encoding.
const TRUST_DOMAIN: &[u8] = b"baton trust v1\0";

/// A content-name pattern: an exact name, `prefix*` (names starting with `prefix`), or `*`.
pub type NamePattern = heapless::String<MAX_CONTENT_NAME>;

/// Whether content `name` matches `pattern` (see [`NamePattern`]).
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// One publisher key and the content names it may sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PublisherGrant {
    /// The publisher's Ed25519 key.
    pub key: PublicKey,
    /// Names it may sign (at least one).
    pub names: heapless::Vec<NamePattern, MAX_NAME_PATTERNS>,
}

/// What the root keys sign: the root set itself and the publishers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TrustDocument {
    /// Grows with every new document; agents refuse a lower one.
    pub version: u64,
    /// Unix seconds after which the document is refused; `0` means never.
    pub expires: u64,
    /// How many of [`TrustDocument::roots`] must sign this document and the next one.
    pub threshold: u8,
    /// The root keys from this version on.
    pub roots: heapless::Vec<PublicKey, MAX_ROOT_KEYS>,
    /// The publisher keys and their names.
    pub publishers: heapless::Vec<PublisherGrant, MAX_TRUSTED_PUBLISHERS>,
}

/// One root key's signature over a document's digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RootSignature {
    /// Which key signed.
    pub signer: KeyId,
    /// Ed25519 signature over [`TrustDocument::digest`].
    #[serde(with = "identity::sig_serde")]
    pub signature: [u8; 64],
}

/// A trust document with its root signatures, as stored, served and sent to agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SignedTrust {
    /// The document.
    pub document: TrustDocument,
    /// Signatures by root keys (old and new roots alike).
    pub signatures: heapless::Vec<RootSignature, MAX_TRUST_SIGNATURES>,
}

/// Why a trust document was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum TrustError {
    /// Not a valid document: threshold 0 or above the root count, a root key twice, a
    /// publisher twice or without names, or bytes that do not decode.
    Malformed,
    /// Fewer valid signatures by the roots the agent trusts than their threshold.
    OldRootsBelowThreshold,
    /// Fewer valid signatures by the document's own roots than its threshold.
    NewRootsBelowThreshold,
    /// Older than the document already accepted.
    Rollback,
    /// The same version as the one accepted, with other contents.
    Conflict,
    /// Its expiry time has passed (judged where the document is used, not by
    /// [`TrustAnchor::accept`]).
    Expired,
    /// No room for another signature.
    TooManySignatures,
}

impl core::fmt::Display for TrustError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TrustError::Malformed => "trust document is malformed",
            TrustError::OldRootsBelowThreshold => {
                "trust document is not signed by enough of the root keys trusted now"
            }
            TrustError::NewRootsBelowThreshold => {
                "trust document is not signed by enough of its own root keys"
            }
            TrustError::Rollback => "trust document is older than the one held",
            TrustError::Conflict => "trust document has the held version with other contents",
            TrustError::Expired => "trust document has expired",
            TrustError::TooManySignatures => "trust document has no room for another signature",
        })
    }
}

impl core::error::Error for TrustError {}

/// SHA-256 over `domain ‖ postcard(value)`, without a buffer for the encoding.
pub(crate) fn domain_digest<T: Serialize + ?Sized>(domain: &[u8], value: &T) -> Digest {
    let mut hasher = sha2::Sha256::new();
    hasher.update(domain);
    let hasher =
        postcard::serialize_with_flavor(value, HashingFlavor(hasher)).expect("hashing never fails");
    hasher.finalize().into()
}

/// A postcard output that hashes what it is given instead of storing it.
struct HashingFlavor(sha2::Sha256);

impl postcard::ser_flavors::Flavor for HashingFlavor {
    type Output = sha2::Sha256;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.update(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.update([data]);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<sha2::Sha256> {
        Ok(self.0)
    }
}

impl TrustDocument {
    /// SHA-256 over `"baton trust v1\0" ‖ postcard(self)`: what every root signs.
    pub fn digest(&self) -> Digest {
        domain_digest(TRUST_DOMAIN, self)
    }

    /// Checks the document's own shape (threshold, distinct roots, publishers with names).
    pub fn check_shape(&self) -> Result<(), TrustError> {
        let roots = self.roots.len();
        if self.threshold == 0 || usize::from(self.threshold) > roots {
            return Err(TrustError::Malformed);
        }
        for (i, k) in self.roots.iter().enumerate() {
            if self.roots[..i].contains(k) {
                return Err(TrustError::Malformed);
            }
        }
        for (i, p) in self.publishers.iter().enumerate() {
            if p.names.is_empty() || self.publishers[..i].iter().any(|q| q.key == p.key) {
                return Err(TrustError::Malformed);
            }
        }
        Ok(())
    }

    /// Whether `now_unix` (seconds) is past the document's expiry.
    pub fn is_expired(&self, now_unix: Option<u64>) -> bool {
        matches!(now_unix, Some(now) if self.expires != 0 && now >= self.expires)
    }

    /// The key of the publisher that signed `manifest`, if this document lists it for the
    /// manifest's name: [`ManifestError::UntrustedSigner`] when no listed key has the
    /// signer's id, [`ManifestError::NotListed`] when the key is listed for other names.
    pub fn publisher_for(&self, manifest: &Manifest) -> Result<&PublicKey, ManifestError> {
        let grant = self
            .publishers
            .iter()
            .find(|p| KeyId::of(&p.key) == manifest.signer)
            .ok_or(ManifestError::UntrustedSigner)?;
        if grant
            .names
            .iter()
            .any(|pattern| pattern_matches(pattern, &manifest.name))
        {
            Ok(&grant.key)
        } else {
            Err(ManifestError::NotListed)
        }
    }

    /// Checks that a listed publisher signed `manifest` for its name, and the signature.
    pub fn verify_manifest(&self, manifest: &Manifest) -> Result<(), ManifestError> {
        let key = self.publisher_for(manifest)?;
        manifest.verify_signature(key)
    }
}

impl SignedTrust {
    /// The document with no signatures yet.
    pub fn new(document: TrustDocument) -> Self {
        SignedTrust {
            document,
            signatures: heapless::Vec::new(),
        }
    }

    /// Adds `root`'s signature (replacing an earlier one by the same key).
    pub fn sign(&mut self, root: &Identity) -> Result<(), TrustError> {
        let signer = KeyId::of(&root.public());
        let signature = root.sign(&self.document.digest());
        if let Some(s) = self.signatures.iter_mut().find(|s| s.signer == signer) {
            s.signature = signature;
            return Ok(());
        }
        self.signatures
            .push(RootSignature { signer, signature })
            .map_err(|_| TrustError::TooManySignatures)
    }

    /// How many distinct keys of `roots` have a valid signature on the document.
    pub fn signed_by(&self, roots: &[PublicKey]) -> usize {
        let digest = self.document.digest();
        roots
            .iter()
            .filter(|key| {
                let id = KeyId::of(key);
                self.signatures
                    .iter()
                    .any(|s| s.signer == id && identity::verify(key, &digest, &s.signature).is_ok())
            })
            .count()
    }

    /// Decodes a signed document from its postcard bytes (at most [`MAX_TRUST_BYTES`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_TRUST_BYTES {
            return Err(TrustError::Malformed);
        }
        match postcard::take_from_bytes::<SignedTrust>(bytes) {
            Ok((signed, [])) => Ok(signed),
            _ => Err(TrustError::Malformed),
        }
    }

    /// Encodes the signed document into `buf`, returning the bytes written.
    pub fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b mut [u8], TrustError> {
        postcard::to_slice(self, buf).map_err(|_| TrustError::Malformed)
    }
}

/// What an agent keeps of the trust it accepted: enough to judge the next document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TrustAnchor {
    /// Version of the accepted document (0: only the pinned root, no document yet).
    pub version: u64,
    /// How many of `roots` must sign the next document.
    pub threshold: u8,
    /// The root keys trusted now.
    pub roots: heapless::Vec<PublicKey, MAX_ROOT_KEYS>,
    /// Digest of the accepted document (zeros before the first).
    pub digest: Digest,
}

impl TrustAnchor {
    /// The anchor of an agent provisioned with `roots` (of which `threshold` must sign).
    pub fn pinned(roots: &[PublicKey], threshold: u8) -> Result<Self, TrustError> {
        let roots = heapless::Vec::from_slice(roots).map_err(|_| TrustError::Malformed)?;
        let anchor = TrustAnchor {
            version: 0,
            threshold,
            roots,
            digest: [0; 32],
        };
        if threshold == 0 || usize::from(threshold) > anchor.roots.len() {
            return Err(TrustError::Malformed);
        }
        // A root pinned twice would count twice towards the threshold.
        for (i, k) in anchor.roots.iter().enumerate() {
            if anchor.roots[..i].contains(k) {
                return Err(TrustError::Malformed);
            }
        }
        Ok(anchor)
    }

    /// Judges `signed` against this anchor: returns the anchor to keep if it is accepted
    /// (the same anchor for the document already held). The checks, in order: shape,
    /// version (lower: rollback; equal: must be the same document), then the current roots'
    /// threshold and the document's own.
    ///
    /// Expiry is not judged here, so an agent that was offline for long can still walk a
    /// chain of rotations whose older documents have expired (as TUF walks root metadata);
    /// the newest document's expiry is judged where it is used, on every manifest
    /// ([`TrustDocument::is_expired`]): content is refused under an expired document.
    pub fn accept(&self, signed: &SignedTrust) -> Result<Self, TrustError> {
        let doc = &signed.document;
        doc.check_shape()?;
        let digest = doc.digest();
        if doc.version < self.version || (self.version != 0 && doc.version == 0) {
            return Err(TrustError::Rollback);
        }
        if doc.version == self.version {
            return if digest == self.digest {
                Ok(self.clone())
            } else {
                Err(TrustError::Conflict)
            };
        }
        if signed.signed_by(&self.roots) < usize::from(self.threshold) {
            return Err(TrustError::OldRootsBelowThreshold);
        }
        if signed.signed_by(&doc.roots) < usize::from(doc.threshold) {
            return Err(TrustError::NewRootsBelowThreshold);
        }
        Ok(TrustAnchor {
            version: doc.version,
            threshold: doc.threshold,
            roots: doc.roots.clone(),
            digest,
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn key(seed: u8) -> Identity {
        Identity::from_seed([seed; 32])
    }

    fn names(list: &[&str]) -> heapless::Vec<NamePattern, MAX_NAME_PATTERNS> {
        list.iter()
            .map(|n| NamePattern::try_from(*n).unwrap())
            .collect()
    }

    fn doc(
        version: u64,
        threshold: u8,
        roots: &[&Identity],
        publisher: &Identity,
    ) -> TrustDocument {
        TrustDocument {
            version,
            expires: 2_000_000_000,
            threshold,
            roots: roots.iter().map(|r| r.public()).collect(),
            publishers: heapless::Vec::from_slice(&[PublisherGrant {
                key: publisher.public(),
                names: names(&["fw-*", "config"]),
            }])
            .unwrap(),
        }
    }

    fn signed(document: TrustDocument, by: &[&Identity]) -> SignedTrust {
        let mut s = SignedTrust::new(document);
        for r in by {
            s.sign(r).unwrap();
        }
        s
    }

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        assert!(pattern_matches("config", "config"));
        assert!(!pattern_matches("config", "config2"));
        assert!(pattern_matches("fw-*", "fw-router"));
        assert!(!pattern_matches("fw-*", "fx-router"));
        assert!(pattern_matches("*", "anything"));
    }

    #[test]
    fn a_pinned_root_accepts_its_document_and_refuses_a_stranger() {
        let (root, other, publisher) = (key(1), key(2), key(3));
        let anchor = TrustAnchor::pinned(&[root.public()], 1).unwrap();
        let good = signed(doc(1, 1, &[&root], &publisher), &[&root]);
        let next = anchor.accept(&good).unwrap();
        assert_eq!(next.version, 1);
        assert_eq!(next.accept(&good), Ok(next.clone()));
        let forged = signed(doc(2, 1, &[&other], &publisher), &[&other]);
        assert_eq!(
            next.accept(&forged),
            Err(TrustError::OldRootsBelowThreshold)
        );
    }

    #[test]
    fn rollback_and_conflict_are_refused_and_expired_documents_still_chain() {
        let (root, publisher) = (key(1), key(3));
        let anchor = TrustAnchor::pinned(&[root.public()], 1).unwrap();
        let v2 = signed(doc(2, 1, &[&root], &publisher), &[&root]);
        let held = anchor.accept(&v2).unwrap();
        let v1 = signed(doc(1, 1, &[&root], &publisher), &[&root]);
        assert_eq!(held.accept(&v1), Err(TrustError::Rollback));
        let mut other = doc(2, 1, &[&root], &publisher);
        other.publishers[0].names = names(&["*"]);
        let other = signed(other, &[&root]);
        assert_eq!(held.accept(&other), Err(TrustError::Conflict));
        // An expired document still chains (its expiry is judged on use).
        let mut expired = doc(3, 1, &[&root], &publisher);
        expired.expires = 1;
        let expired = signed(expired, &[&root]);
        assert!(expired.document.is_expired(Some(2)));
        let held = held.accept(&expired).unwrap();
        assert_eq!(held.version, 3);
    }

    #[test]
    fn a_root_rotation_needs_the_old_and_the_new_threshold() {
        let (a, b, c, publisher) = (key(1), key(2), key(4), key(3));
        let anchor = TrustAnchor::pinned(&[a.public()], 1).unwrap();
        // Rotate from {a} (1 of 1) to {b, c} (2 of 2).
        let rotation = doc(2, 2, &[&b, &c], &publisher);
        let only_new = signed(rotation.clone(), &[&b, &c]);
        assert_eq!(
            anchor.accept(&only_new),
            Err(TrustError::OldRootsBelowThreshold)
        );
        let old_and_half = signed(rotation.clone(), &[&a, &b]);
        assert_eq!(
            anchor.accept(&old_and_half),
            Err(TrustError::NewRootsBelowThreshold)
        );
        let both = signed(rotation, &[&a, &b, &c]);
        let rotated = anchor.accept(&both).unwrap();
        // From now on the old root alone can sign nothing.
        let by_old = signed(doc(3, 1, &[&a], &publisher), &[&a]);
        assert_eq!(
            rotated.accept(&by_old),
            Err(TrustError::OldRootsBelowThreshold)
        );
    }

    #[test]
    fn malformed_documents_are_refused() {
        let (root, publisher) = (key(1), key(3));
        let anchor = TrustAnchor::pinned(&[root.public()], 1).unwrap();
        for threshold in [0, 2] {
            let d = signed(doc(1, threshold, &[&root], &publisher), &[&root]);
            assert_eq!(anchor.accept(&d), Err(TrustError::Malformed));
        }
        let d = signed(doc(1, 1, &[&root, &root], &publisher), &[&root]);
        assert_eq!(anchor.accept(&d), Err(TrustError::Malformed));
        assert_eq!(SignedTrust::decode(&[1, 2, 3]), Err(TrustError::Malformed));
        assert!(TrustAnchor::pinned(&[], 1).is_err());
        // A root pinned twice does not make a threshold of two.
        assert_eq!(
            TrustAnchor::pinned(&[root.public(), root.public()], 2),
            Err(TrustError::Malformed)
        );
    }

    #[test]
    fn publishers_sign_only_the_names_they_are_listed_for() {
        let (root, publisher, stranger) = (key(1), key(3), key(5));
        let d = doc(1, 1, &[&root], &publisher);
        let sign = |by: &Identity, name: &str| {
            Manifest::sign(by, name.try_into().unwrap(), 1, 0, 1024, 1024, [7; 32])
        };
        assert_eq!(d.verify_manifest(&sign(&publisher, "fw-router")), Ok(()));
        assert_eq!(d.verify_manifest(&sign(&publisher, "config")), Ok(()));
        assert_eq!(
            d.verify_manifest(&sign(&publisher, "bootloader")),
            Err(ManifestError::NotListed)
        );
        assert_eq!(
            d.verify_manifest(&sign(&stranger, "fw-router")),
            Err(ManifestError::UntrustedSigner)
        );
    }

    #[test]
    fn the_largest_document_fits_its_byte_bound() {
        let roots: heapless::Vec<PublicKey, MAX_ROOT_KEYS> =
            (0..MAX_ROOT_KEYS as u8).map(|i| key(i).public()).collect();
        let long = NamePattern::try_from("x".repeat(MAX_CONTENT_NAME).as_str()).unwrap();
        let grant = PublisherGrant {
            key: key(9).public(),
            names: core::iter::repeat_n(long, MAX_NAME_PATTERNS).collect(),
        };
        let mut s = SignedTrust::new(TrustDocument {
            version: u64::MAX,
            expires: u64::MAX,
            threshold: MAX_ROOT_KEYS as u8,
            roots,
            publishers: core::iter::repeat_n(grant, MAX_TRUSTED_PUBLISHERS).collect(),
        });
        for i in 0..MAX_TRUST_SIGNATURES as u8 {
            s.signatures
                .push(RootSignature {
                    signer: KeyId([i; 8]),
                    signature: [i; 64],
                })
                .unwrap();
        }
        let mut buf = [0u8; MAX_TRUST_BYTES];
        let n = s.encode(&mut buf).expect("fits").len();
        assert!(n <= MAX_TRUST_BYTES, "{n}");
        assert_eq!(SignedTrust::decode(&buf[..n]), Ok(s));
    }
}
