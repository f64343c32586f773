//! The manifest: what identifies a piece of content, signed by its publisher.
//!
//! A manifest names the content and its version, says when it expires, how
//! long it is and how it is chunked, and carries the Merkle root of the chunk
//! hashes (see [`crate::merkle`]). The publisher signs all of that with an
//! Ed25519 key which may differ from the manager's session key; agents accept
//! manifests only from publisher keys they trust.

use serde::{Deserialize, Serialize};

use crate::identity::{self, Identity, SignatureError};
use crate::types::{Digest, KeyId, PublicKey};
use crate::{MAX_CHUNK_SIZE, MAX_CONTENT_LEN, MIN_CHUNK_SIZE};

/// Longest content name, in bytes.
pub const MAX_CONTENT_NAME: usize = 64;
/// Domain prefix for manifest signatures.
const MANIFEST_DOMAIN: &[u8] = b"baton manifest v1\0";

/// Identifies content: name, version, size, chunking, Merkle root, publisher signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Manifest {
    /// Content name, e.g. `router-fw`. Versions compare within one name.
    pub name: heapless::String<MAX_CONTENT_NAME>,
    /// Version; agents refuse a version older than the one they hold of this name.
    pub version: u64,
    /// Expiry as Unix seconds; `0` means never.
    pub expires: u64,
    /// Content length in bytes (at least 1, at most [`MAX_CONTENT_LEN`]).
    pub length: u64,
    /// Chunk size in bytes, between [`MIN_CHUNK_SIZE`] and [`MAX_CHUNK_SIZE`]; the last chunk may be shorter.
    pub chunk_size: u32,
    /// Merkle root of the chunk hashes; also the content's id on the wire.
    pub root: Digest,
    /// Id of the publisher key that signed this manifest.
    pub signer: KeyId,
    /// Ed25519 signature by the publisher over everything above.
    #[serde(with = "identity::sig_serde")]
    pub signature: [u8; 64],
}

/// Why a manifest was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ManifestError {
    /// Length is zero or above [`MAX_CONTENT_LEN`].
    BadLength,
    /// Chunk size outside [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
    BadChunkSize,
    /// The chunk size is larger than this agent can receive.
    ChunkTooLarge,
    /// Signed by a key this side does not trust.
    UntrustedSigner,
    /// The signature does not verify.
    BadSignature,
    /// The expiry time has passed.
    Expired,
    /// Older than the version of this name already held.
    Downgrade,
    /// Its signer is a listed publisher, but not for this content name.
    NotListed,
    /// The version accepted before for this name, with another root.
    VersionReused,
    /// This side has no trust document (or no root key) to judge manifests with.
    NoTrust,
}

impl core::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ManifestError::BadLength => "content length is zero or too large",
            ManifestError::BadChunkSize => "chunk size out of range",
            ManifestError::ChunkTooLarge => "chunk size larger than this agent accepts",
            ManifestError::UntrustedSigner => "manifest signed by an untrusted key",
            ManifestError::BadSignature => "manifest signature does not verify",
            ManifestError::Expired => "manifest has expired",
            ManifestError::Downgrade => "manifest version is older than the one held",
            ManifestError::NotListed => "publisher is not listed for this content name",
            ManifestError::VersionReused => {
                "manifest reuses an accepted version with other content"
            }
            ManifestError::NoTrust => "no trust document to check the manifest against",
        })
    }
}

impl core::error::Error for ManifestError {}

impl From<SignatureError> for ManifestError {
    fn from(_: SignatureError) -> Self {
        ManifestError::BadSignature
    }
}

/// The fields a publisher signs, in signing order.
#[derive(Serialize)]
struct Signed<'a> {
    name: &'a str,
    version: u64,
    expires: u64,
    length: u64,
    chunk_size: u32,
    root: &'a Digest,
    signer: &'a KeyId,
}

impl Manifest {
    /// Builds and signs a manifest with the publisher's identity.
    pub fn sign(
        publisher: &Identity,
        name: heapless::String<MAX_CONTENT_NAME>,
        version: u64,
        expires: u64,
        length: u64,
        chunk_size: u32,
        root: Digest,
    ) -> Self {
        let mut m = Manifest {
            name,
            version,
            expires,
            length,
            chunk_size,
            root,
            signer: KeyId::of(&publisher.public()),
            signature: [0; 64],
        };
        let mut buf = [0u8; 256];
        let signed = m.signed_bytes(&mut buf);
        m.signature = publisher.sign(signed);
        m
    }

    fn signed_bytes<'b>(&self, buf: &'b mut [u8; 256]) -> &'b [u8] {
        let (head, tail) = buf.split_at_mut(MANIFEST_DOMAIN.len());
        head.copy_from_slice(MANIFEST_DOMAIN);
        let body = Signed {
            name: &self.name,
            version: self.version,
            expires: self.expires,
            length: self.length,
            chunk_size: self.chunk_size,
            root: &self.root,
            signer: &self.signer,
        };
        // The signed fields are bounded (name ≤ 64 bytes), well under 256 bytes.
        let n = postcard::to_slice(&body, tail)
            .expect("signed manifest fields fit 256 bytes")
            .len();
        &buf[..MANIFEST_DOMAIN.len() + n]
    }

    /// Checks the signature against `key`, which must be the key named by `signer`.
    pub fn verify_signature(&self, key: &PublicKey) -> Result<(), ManifestError> {
        if KeyId::of(key) != self.signer {
            return Err(ManifestError::UntrustedSigner);
        }
        let mut buf = [0u8; 256];
        identity::verify(key, self.signed_bytes(&mut buf), &self.signature)?;
        Ok(())
    }

    /// Checks the limits and the expiry against `now_unix` (seconds; `None` if unknown).
    pub fn check_limits(&self, now_unix: Option<u64>) -> Result<(), ManifestError> {
        if self.length == 0 || self.length > MAX_CONTENT_LEN {
            return Err(ManifestError::BadLength);
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ManifestError::BadChunkSize);
        }
        if let Some(now) = now_unix
            && self.expires != 0
            && now >= self.expires
        {
            return Err(ManifestError::Expired);
        }
        Ok(())
    }

    /// Number of chunks; meaningful only for a manifest that passed [`Manifest::check_limits`]
    /// (a zero chunk size gives 0, a count beyond `u32` saturates).
    pub fn chunks(&self) -> u32 {
        if self.chunk_size == 0 {
            return 0;
        }
        u32::try_from(self.length.div_ceil(self.chunk_size as u64)).unwrap_or(u32::MAX)
    }

    /// Length of chunk `index` in bytes (the last may be short), or 0 past the end.
    pub fn chunk_len(&self, index: u32) -> u32 {
        let start = index as u64 * self.chunk_size as u64;
        if start >= self.length {
            return 0;
        }
        (self.length - start).min(self.chunk_size as u64) as u32
    }

    /// Byte offset of chunk `index` in the content.
    pub fn chunk_offset(&self, index: u32) -> u64 {
        index as u64 * self.chunk_size as u64
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn sample(publisher: &Identity) -> Manifest {
        Manifest::sign(
            publisher,
            heapless::String::try_from("fw").unwrap(),
            3,
            0,
            10_000,
            4096,
            [9; 32],
        )
    }

    #[test]
    fn signed_manifest_verifies_and_tampering_fails() {
        let publisher = Identity::from_seed([4; 32]);
        let m = sample(&publisher);
        m.verify_signature(&publisher.public()).unwrap();
        let mut bumped = m.clone();
        bumped.version = 4;
        assert_eq!(
            bumped.verify_signature(&publisher.public()),
            Err(ManifestError::BadSignature)
        );
        let stranger = Identity::from_seed([5; 32]);
        assert_eq!(
            m.verify_signature(&stranger.public()),
            Err(ManifestError::UntrustedSigner)
        );
    }

    #[test]
    fn chunk_arithmetic() {
        let m = sample(&Identity::from_seed([4; 32]));
        assert_eq!(m.chunks(), 3);
        assert_eq!(m.chunk_len(0), 4096);
        assert_eq!(m.chunk_len(2), 10_000 - 8192);
        assert_eq!(m.chunk_len(3), 0);
    }

    #[test]
    fn limits_and_expiry() {
        let p = Identity::from_seed([4; 32]);
        let mut m = sample(&p);
        m.check_limits(Some(1)).unwrap();
        m.expires = 100;
        assert_eq!(m.check_limits(Some(100)), Err(ManifestError::Expired));
        m.check_limits(None).unwrap();
        m.chunk_size = MAX_CHUNK_SIZE + 1;
        assert_eq!(m.check_limits(None), Err(ManifestError::BadChunkSize));
        m.chunk_size = 4096;
        m.length = 0;
        assert_eq!(m.check_limits(None), Err(ManifestError::BadLength));
    }
}
