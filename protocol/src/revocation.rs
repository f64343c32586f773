//! The revocation list: agent certificates the manager has withdrawn before their expiry.
//!
//! Agent certificates are short-lived ([`AgentCert::not_after`]) and renewed over the live
//! session, so a revocation only has to be remembered until the last certificate it covers
//! expires. The manager signs a [`RevocationList`] with its transport key and sends it to
//! every session whenever it changes; agents close sessions with a revoked peer, refuse its
//! handshakes and ignore its discovery datagrams. An entry names an agent id and the highest
//! serial revoked for it, so every certificate issued to that id up to the revocation is
//! covered, and a later re-enrolment (a higher serial) is not.

use serde::{Deserialize, Serialize};

use crate::identity::{self, AgentCert, Identity, SignatureError};
use crate::trust::domain_digest;
use crate::types::{AgentId, Digest, PublicKey};

/// Most entries one revocation list carries.
pub const MAX_REVOKED: usize = 32;
/// Largest encoded [`RevocationList`], in bytes.
pub const MAX_REVOCATION_BYTES: usize = 1536;
/// Domain prefix hashed before the list's fields; the manager signs that digest.
const REVOCATION_DOMAIN: &[u8] = b"baton revocations v1\0";

/// One revoked agent: every certificate of `id` with a serial up to `up_to_serial`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Revoked {
    /// The agent's id.
    pub id: AgentId,
    /// The highest certificate serial revoked (the last one issued before the revocation).
    pub up_to_serial: u64,
}

/// The manager's signed list of revoked agent certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RevocationList {
    /// Grows with every list the manager signs; agents ignore a list older than theirs.
    pub version: u64,
    /// When the manager signed it, Unix seconds.
    pub issued: u64,
    /// The revoked certificates.
    pub entries: heapless::Vec<Revoked, MAX_REVOKED>,
    /// The manager's signature over SHA-256(`"baton revocations v1\0"` ‖ postcard(fields above)).
    #[serde(with = "identity::sig_serde")]
    pub signature: [u8; 64],
}

/// The signed fields of a [`RevocationList`], borrowed for encoding.
#[derive(Serialize)]
struct Fields<'a> {
    version: u64,
    issued: u64,
    entries: &'a [Revoked],
}

impl RevocationList {
    /// Signs a list with the manager's identity.
    pub fn sign(
        manager: &Identity,
        version: u64,
        issued: u64,
        entries: heapless::Vec<Revoked, MAX_REVOKED>,
    ) -> Self {
        let mut list = RevocationList {
            version,
            issued,
            entries,
            signature: [0; 64],
        };
        list.signature = manager.sign(&list.digest());
        list
    }

    /// What the manager signs: SHA-256 over the domain and the fields before the signature.
    fn digest(&self) -> Digest {
        let fields = Fields {
            version: self.version,
            issued: self.issued,
            entries: &self.entries,
        };
        domain_digest(REVOCATION_DOMAIN, &fields)
    }

    /// Checks the manager's signature.
    pub fn verify(&self, manager: &PublicKey) -> Result<(), SignatureError> {
        identity::verify(manager, &self.digest(), &self.signature)
    }

    /// Checks the manager's signature on an encoded list without decoding it: the signed
    /// fields' encoding is the list's encoding less its last 64 bytes (the signature), so a
    /// device can check a list before it spends memory on it. Any altered byte fails.
    pub fn verify_encoded(bytes: &[u8], manager: &PublicKey) -> Result<(), SignatureError> {
        if bytes.len() < 64 || bytes.len() > MAX_REVOCATION_BYTES {
            return Err(SignatureError::BadSignature);
        }
        let (fields, signature) = bytes.split_at(bytes.len() - 64);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(signature);
        use sha2::Digest as _;
        let digest: Digest = sha2::Sha256::new()
            .chain_update(REVOCATION_DOMAIN)
            .chain_update(fields)
            .finalize()
            .into();
        identity::verify(manager, &digest, &sig)
    }

    /// The version of an encoded list (its first field), without decoding the rest.
    pub fn peek_version(bytes: &[u8]) -> Option<u64> {
        postcard::take_from_bytes::<u64>(bytes).ok().map(|(v, _)| v)
    }

    /// Whether `cert` is revoked by this list.
    pub fn revokes(&self, cert: &AgentCert) -> bool {
        self.entries
            .iter()
            .any(|e| e.id == cert.id && cert.serial <= e.up_to_serial)
    }

    /// Decodes a list from its postcard bytes (at most [`MAX_REVOCATION_BYTES`]); the
    /// signature is not checked here.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_REVOCATION_BYTES {
            return None;
        }
        match postcard::take_from_bytes::<RevocationList>(bytes) {
            Ok((list, [])) => Some(list),
            _ => None,
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    #[test]
    fn a_list_revokes_serials_up_to_its_entry_and_verifies() {
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([2; 32]);
        let cert = |serial| {
            AgentCert::issue_with_term(
                &manager,
                id("edge-1"),
                agent.public(),
                Default::default(),
                0,
                serial,
                0,
            )
        };
        let entries = heapless::Vec::from_slice(&[Revoked {
            id: id("edge-1"),
            up_to_serial: 7,
        }])
        .unwrap();
        let list = RevocationList::sign(&manager, 3, 1_700_000_000, entries);
        assert_eq!(list.verify(&manager.public()), Ok(()));
        assert!(list.revokes(&cert(7)));
        assert!(list.revokes(&cert(1)));
        assert!(!list.revokes(&cert(8)), "a later enrolment is not revoked");
        let mut buf = [0u8; MAX_REVOCATION_BYTES];
        let encoded = postcard::to_slice(&list, &mut buf).unwrap();
        assert_eq!(RevocationList::peek_version(encoded), Some(3));
        assert_eq!(
            RevocationList::verify_encoded(encoded, &manager.public()),
            Ok(())
        );
        assert!(RevocationList::verify_encoded(encoded, &agent.public()).is_err());
        for at in 0..encoded.len() {
            let mut bad = encoded.to_vec();
            bad[at] ^= 1;
            assert!(
                RevocationList::verify_encoded(&bad, &manager.public()).is_err(),
                "flipped byte {at} verified"
            );
        }
        let mut tampered = list.clone();
        tampered.entries[0].up_to_serial = 100;
        assert!(tampered.verify(&manager.public()).is_err());
        assert!(list.verify(&agent.public()).is_err());
    }

    #[test]
    fn the_largest_list_fits_its_byte_bound() {
        let manager = Identity::from_seed([1; 32]);
        let long = "x".repeat(crate::types::MAX_ID_LEN);
        let entries = (0..MAX_REVOKED)
            .map(|_| Revoked {
                id: id(&long),
                up_to_serial: u64::MAX,
            })
            .collect();
        let list = RevocationList::sign(&manager, u64::MAX, u64::MAX, entries);
        let mut buf = [0u8; MAX_REVOCATION_BYTES];
        let n = postcard::to_slice(&list, &mut buf).expect("fits").len();
        assert_eq!(RevocationList::decode(&buf[..n]), Some(list));
    }
}
