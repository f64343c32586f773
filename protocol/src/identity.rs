//! Identities: Ed25519 keys, their X25519 form, and agent certificates.
//!
//! Every participant has one Ed25519 signing key. The Noise handshake needs an
//! X25519 static key; Baton derives it from the Ed25519 key (the standard
//! birational map, as in libsodium's `crypto_sign_ed25519_sk_to_curve25519`),
//! so proving the Noise static key proves the Ed25519 identity.
//!
//! The manager vouches for enrolled agents with an [`AgentCert`]: its signature
//! over the agent's id, key, the segment the administrator placed it in and the
//! highest election score it may claim there. Two agents that both pin the
//! manager's key can then authenticate each other, and check each other's
//! segment claims, without asking the manager.

use ed25519_dalek::{Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};

use crate::types::{AgentId, Name, PublicKey};

/// Domain prefix for agent certificate signatures (v3: the signed bytes are the
/// postcard encoding of every field before the signature, serial and expiry included).
const CERT_DOMAIN: &[u8] = b"baton agent cert v3\0";
/// Room for the signed bytes: the domain and the largest encoded fields (123 bytes
/// today), with space for the fields a later version adds.
const CERT_SIGNED_MAX: usize = 256;

/// A signing identity: the Ed25519 secret seed and what derives from it.
#[derive(Clone)]
pub struct Identity {
    signing: ed25519_dalek::SigningKey,
}

impl core::fmt::Debug for Identity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity whose Ed25519 secret seed is `seed` (keep it secret).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity {
            signing: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// The 32-byte secret seed, for storing the identity.
    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The Ed25519 public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message` with the Ed25519 key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The X25519 secret used as the Noise static key.
    pub fn x25519_secret(&self) -> [u8; 32] {
        self.signing.to_scalar_bytes()
    }

    /// The X25519 public key matching [`Identity::x25519_secret`].
    pub fn x25519_public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(self.x25519_secret()))
            .to_bytes()
    }
}

/// Why a key or signature was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SignatureError {
    /// The bytes are not a valid Ed25519 public key.
    BadKey,
    /// The signature does not verify under the key.
    BadSignature,
}

impl core::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SignatureError::BadKey => "not a valid Ed25519 public key",
            SignatureError::BadSignature => "signature does not verify",
        })
    }
}

impl core::error::Error for SignatureError {}

/// Verifies an Ed25519 `signature` of `message` by `key`.
pub fn verify(key: &PublicKey, message: &[u8], signature: &[u8; 64]) -> Result<(), SignatureError> {
    let key =
        ed25519_dalek::VerifyingKey::from_bytes(&key.0).map_err(|_| SignatureError::BadKey)?;
    let sig = ed25519_dalek::Signature::from_bytes(signature);
    key.verify(message, &sig)
        .map_err(|_| SignatureError::BadSignature)
}

/// The X25519 (Montgomery) form of an Ed25519 public key, as the Noise handshake sees it.
pub fn x25519_of(key: &PublicKey) -> Result<[u8; 32], SignatureError> {
    let key =
        ed25519_dalek::VerifyingKey::from_bytes(&key.0).map_err(|_| SignatureError::BadKey)?;
    Ok(key.to_montgomery().to_bytes())
}

/// The manager's statement that `id` is an enrolled agent with key `key`, placed in
/// `segment` with an election score of at most `score`.
///
/// Issued in every `Welcome` (and renewed over the session by `CertRenewed`), shown in
/// peer handshakes and in every discovery datagram. The signature covers
/// `CERT_DOMAIN ‖ postcard(id, key, segment, score, serial, not_after)`,
/// i.e. the certificate's own encoding up to the signature: a later version
/// appends fields before `signature`, adds them to [`CertFields`] and bumps the
/// domain string, so a certificate of one version never verifies as another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AgentCert {
    /// The agent's id.
    pub id: AgentId,
    /// The agent's Ed25519 public key.
    pub key: PublicKey,
    /// The LAN segment the administrator placed the agent in (empty: none). Peers
    /// ignore its discovery datagrams for any other segment.
    pub segment: Name,
    /// The highest election score the agent may claim on its segment; peers use
    /// `min(declared score, score)`.
    pub score: u32,
    /// The manager's serial number for this certificate; grows with every certificate it
    /// issues, so a revocation can name "every certificate of this id up to serial N".
    pub serial: u64,
    /// Unix seconds after which peers refuse the certificate; `0` means never (tests and
    /// tools only: the manager always sets a lifetime).
    pub not_after: u64,
    /// The manager's Ed25519 signature over the domain prefix and the fields above.
    #[serde(with = "sig_serde")]
    pub signature: [u8; 64],
}

/// The signed fields of an [`AgentCert`], borrowed for encoding (same order as the struct).
#[derive(Serialize)]
struct CertFields<'a> {
    id: &'a AgentId,
    key: &'a PublicKey,
    segment: &'a Name,
    score: u32,
    serial: u64,
    not_after: u64,
}

impl AgentCert {
    /// The bytes the manager signs: the domain, then the postcard encoding of the fields.
    fn signed_bytes<'b>(&self, out: &'b mut [u8; CERT_SIGNED_MAX]) -> &'b [u8] {
        let fields = CertFields {
            id: &self.id,
            key: &self.key,
            segment: &self.segment,
            score: self.score,
            serial: self.serial,
            not_after: self.not_after,
        };
        let domain = CERT_DOMAIN.len();
        out[..domain].copy_from_slice(CERT_DOMAIN);
        let n = postcard::to_slice(&fields, &mut out[domain..])
            .expect("bounded fields fit the buffer")
            .len();
        &out[..domain + n]
    }

    /// Issues a certificate for `id` and `key` that certifies no segment and a score of 0
    /// (enough for peer handshakes; discovery peers ignore such an agent).
    pub fn issue(manager: &Identity, id: AgentId, key: PublicKey) -> Self {
        Self::issue_certified(manager, id, key, Name::new(), 0)
    }

    /// Issues a certificate for `id` and `key`, placed in `segment` with election scores up
    /// to `score`, signed by the manager's identity.
    pub fn issue_certified(
        manager: &Identity,
        id: AgentId,
        key: PublicKey,
        segment: Name,
        score: u32,
    ) -> Self {
        Self::issue_with_term(manager, id, key, segment, score, 0, 0)
    }

    /// Issues a certificate as [`AgentCert::issue_certified`] does, with a serial number
    /// and an expiry (`not_after`, Unix seconds): the form the manager issues.
    pub fn issue_with_term(
        manager: &Identity,
        id: AgentId,
        key: PublicKey,
        segment: Name,
        score: u32,
        serial: u64,
        not_after: u64,
    ) -> Self {
        let mut cert = AgentCert {
            id,
            key,
            segment,
            score,
            serial,
            not_after,
            signature: [0; 64],
        };
        let mut buf = [0; CERT_SIGNED_MAX];
        cert.signature = manager.sign(cert.signed_bytes(&mut buf));
        cert
    }

    /// Checks the manager's signature.
    pub fn verify(&self, manager: &PublicKey) -> Result<(), SignatureError> {
        let mut buf = [0; CERT_SIGNED_MAX];
        verify(manager, self.signed_bytes(&mut buf), &self.signature)
    }

    /// Whether the certificate is still within its lifetime at `now_unix` (seconds); an
    /// unknown time (`None`) accepts it, as does `not_after == 0`.
    pub fn is_current(&self, now_unix: Option<u64>) -> bool {
        match now_unix {
            Some(now) => self.not_after == 0 || now < self.not_after,
            None => true,
        }
    }
}

/// Serde for 64-byte signatures (serde derives arrays only up to 32).
pub(crate) mod sig_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes the signature as two 32-byte halves (a fixed 64 bytes in postcard).
    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a.copy_from_slice(&sig[..32]);
        b.copy_from_slice(&sig[32..]);
        (a, b).serialize(s)
    }

    /// Reads the two 32-byte halves back.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let (a, b) = <([u8; 32], [u8; 32])>::deserialize(d)?;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&a);
        sig[32..].copy_from_slice(&b);
        Ok(sig)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn x25519_forms_agree() {
        let id = Identity::from_seed([7; 32]);
        assert_eq!(x25519_of(&id.public()).unwrap(), id.x25519_public());
    }

    #[test]
    fn cert_verifies_and_tampering_fails() {
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([2; 32]);
        let cert = AgentCert::issue(
            &manager,
            AgentId::try_from("edge-1").unwrap(),
            agent.public(),
        );
        cert.verify(&manager.public()).unwrap();
        let mut forged = cert.clone();
        forged.id = AgentId::try_from("edge-2").unwrap();
        assert_eq!(
            forged.verify(&manager.public()),
            Err(SignatureError::BadSignature)
        );
        // The certified segment and score are signed too.
        let placed = AgentCert::issue_certified(
            &manager,
            AgentId::try_from("edge-1").unwrap(),
            agent.public(),
            Name::try_from("lan-1").unwrap(),
            500,
        );
        placed.verify(&manager.public()).unwrap();
        let mut moved = placed.clone();
        moved.segment = Name::try_from("lan-2").unwrap();
        assert!(moved.verify(&manager.public()).is_err());
        let mut raised = placed.clone();
        raised.score = u32::MAX;
        assert!(raised.verify(&manager.public()).is_err());
        // Longest id and segment still fit the signed buffer.
        let long = AgentCert::issue_certified(
            &manager,
            AgentId::try_from("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").unwrap(),
            agent.public(),
            Name::try_from("yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy").unwrap(),
            u32::MAX,
        );
        long.verify(&manager.public()).unwrap();
        let other = Identity::from_seed([3; 32]);
        assert!(cert.verify(&other.public()).is_err());
    }
}
