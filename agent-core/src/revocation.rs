//! Revoked and expired certificates on the agent's side: the checks every driver shares.
//!
//! The manager signs a [`RevocationList`] with its transport key and sends it after every
//! `Welcome` and whenever it changes; it renews this agent's certificate over the live
//! session at half its lifetime (`CertRenewed`). This module holds the pure checks, so the
//! Linux driver (its peer listener and outgoing peer connections), the firmware's
//! handshake and the segment discovery machine decide alike:
//!
//! - [`peer_cert_acceptable`]: a peer's certificate (already verified as the manager's) is
//!   refused when it expired or the list revokes it;
//! - [`accept_revocations`]: a list is taken when it decodes, the pinned manager key
//!   signed it, and it is newer than the one held;
//! - [`accept_renewal`]: a renewed certificate is taken when the manager signed it for
//!   this agent's id and key, with a higher serial than the one held.
//!
//! No allocation; a list is at most [`baton_protocol::revocation::MAX_REVOCATION_BYTES`]
//! encoded and about 1.6 KiB decoded.

use baton_protocol::identity::AgentCert;
use baton_protocol::revocation::{RevocationList, Revoked};
use baton_protocol::trust::TrustError;
use baton_protocol::types::{AgentId, PublicKey};

use crate::trust_wire::Reader;

/// Why a peer's certificate is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CertRefusal {
    /// The manager's revocation list names it.
    Revoked,
    /// It expired (`not_after` is past).
    Expired,
}

impl core::fmt::Display for CertRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CertRefusal::Revoked => "the peer's certificate is revoked",
            CertRefusal::Expired => "the peer's certificate expired",
        })
    }
}

impl core::error::Error for CertRefusal {}

/// Whether a peer's certificate may be used at `now_unix` (Unix seconds; `None`: time
/// unknown, expiry is not checked): not expired, and not revoked by `revocations`. The
/// caller has checked that the manager signed it and that the peer proved its key.
pub fn peer_cert_acceptable(
    cert: &AgentCert,
    revocations: Option<&RevocationList>,
    now_unix: Option<u64>,
) -> Result<(), CertRefusal> {
    if revocations.is_some_and(|list| list.revokes(cert)) {
        return Err(CertRefusal::Revoked);
    }
    if !cert.is_current(now_unix) {
        return Err(CertRefusal::Expired);
    }
    Ok(())
}

/// Why a revocation list or a renewed certificate from the manager was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ManagerDocError {
    /// No manager key is configured to check it with.
    NoManagerKey,
    /// It does not decode.
    Malformed,
    /// The manager's key did not sign it.
    BadSignature,
    /// Not newer than what the agent holds (an older list, a lower serial).
    Stale,
    /// A certificate for another agent id or key.
    NotOurs,
}

impl core::fmt::Display for ManagerDocError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ManagerDocError::NoManagerKey => "no manager key to check it with",
            ManagerDocError::Malformed => "malformed",
            ManagerDocError::BadSignature => "not signed by the manager",
            ManagerDocError::Stale => "not newer than the one held",
            ManagerDocError::NotOurs => "for another agent",
        })
    }
}

impl core::error::Error for ManagerDocError {}

/// Whether the encoded list `bytes` carries `manager`'s signature (checked on the bytes,
/// before any decoding; out of line, so its stack is not part of the caller's frame).
#[inline(never)]
pub fn signed_by_manager(bytes: &[u8], manager: &PublicKey) -> bool {
    RevocationList::verify_encoded(bytes, manager).is_ok()
}

/// Decodes the encoded list `bytes` into `slot`, field by field in place (serde's decoding
/// of the 32 entries took a 9.6 KB frame on a Cortex-M3); accepts what
/// [`RevocationList::decode`] accepts (a test compares the two). Check the signature on
/// the bytes first ([`signed_by_manager`]). The bytes are read through once before
/// anything is written, so a list that does not decode leaves the held one as it was.
#[inline(never)]
pub fn decode_into(bytes: &[u8], slot: &mut Option<RevocationList>) -> bool {
    if walk(bytes, None).is_err() {
        return false;
    }
    let list = slot.get_or_insert_with(|| RevocationList {
        version: 0,
        issued: 0,
        entries: heapless::Vec::new(),
        signature: [0; 64],
    });
    // Cannot fail: the same bytes just walked through.
    walk(bytes, Some(list)).is_ok()
}

/// Reads the postcard encoding of a [`RevocationList`], into `into` when given (else only
/// checks that it decodes).
fn walk(bytes: &[u8], mut into: Option<&mut RevocationList>) -> Result<(), TrustError> {
    if bytes.len() > baton_protocol::revocation::MAX_REVOCATION_BYTES {
        return Err(TrustError::Malformed);
    }
    let mut r = Reader { bytes };
    let version = r.varint()?;
    let issued = r.varint()?;
    if let Some(list) = into.as_deref_mut() {
        list.version = version;
        list.issued = issued;
        list.entries.clear();
    }
    for _ in 0..r.len(baton_protocol::revocation::MAX_REVOKED)? {
        let n = r.len(usize::MAX)?;
        let text = core::str::from_utf8(r.take(n)?).map_err(|_| TrustError::Malformed)?;
        let id = AgentId::try_from(text).map_err(|_| TrustError::Malformed)?;
        let up_to_serial = r.varint()?;
        if let Some(list) = into.as_deref_mut() {
            list.entries
                .push(Revoked { id, up_to_serial })
                .map_err(|_| TrustError::Malformed)?;
        }
    }
    let signature = r.array()?;
    if !r.bytes.is_empty() {
        return Err(TrustError::Malformed);
    }
    if let Some(list) = into {
        list.signature = signature;
    }
    Ok(())
}

/// Decodes and checks a revocation list: signed by `manager`, with a version above
/// `held` (the version of the list held, if any).
pub fn accept_revocations(
    bytes: &[u8],
    manager: Option<&PublicKey>,
    held: Option<u64>,
) -> Result<RevocationList, ManagerDocError> {
    let manager = manager.ok_or(ManagerDocError::NoManagerKey)?;
    let list = RevocationList::decode(bytes).ok_or(ManagerDocError::Malformed)?;
    list.verify(manager)
        .map_err(|_| ManagerDocError::BadSignature)?;
    if held.is_some_and(|v| list.version <= v) {
        return Err(ManagerDocError::Stale);
    }
    Ok(list)
}

/// Checks a renewed certificate against the one held: signed by `manager`, the same id and
/// key, a higher serial.
pub fn accept_renewal(
    renewed: &AgentCert,
    held: &AgentCert,
    manager: Option<&PublicKey>,
) -> Result<(), ManagerDocError> {
    let manager = manager.ok_or(ManagerDocError::NoManagerKey)?;
    if renewed.id != held.id || renewed.key != held.key {
        return Err(ManagerDocError::NotOurs);
    }
    renewed
        .verify(manager)
        .map_err(|_| ManagerDocError::BadSignature)?;
    if renewed.serial <= held.serial {
        return Err(ManagerDocError::Stale);
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::identity::Identity;
    use baton_protocol::revocation::Revoked;
    use baton_protocol::types::{AgentId, Name};

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn manager() -> Identity {
        Identity::from_seed([1; 32])
    }

    fn cert(agent: &str, serial: u64, not_after: u64) -> AgentCert {
        let key = Identity::from_seed([agent.len() as u8 + 10; 32]).public();
        AgentCert::issue_with_term(
            &manager(),
            id(agent),
            key,
            Name::new(),
            0,
            serial,
            not_after,
        )
    }

    fn list(version: u64, entries: &[(&str, u64)]) -> RevocationList {
        let entries = entries
            .iter()
            .map(|(a, s)| Revoked {
                id: id(a),
                up_to_serial: *s,
            })
            .collect();
        RevocationList::sign(&manager(), version, 1_000, entries)
    }

    fn encode(l: &RevocationList) -> ([u8; 1536], usize) {
        let mut buf = [0u8; 1536];
        let n = postcard::to_slice(l, &mut buf).unwrap().len();
        (buf, n)
    }

    #[test]
    fn revoked_and_expired_certificates_are_refused_and_others_accepted() {
        let l = list(1, &[("victim", 5)]);
        assert_eq!(
            peer_cert_acceptable(&cert("victim", 5, 2_000), Some(&l), Some(1_500)),
            Err(CertRefusal::Revoked)
        );
        assert_eq!(
            peer_cert_acceptable(&cert("victim", 6, 2_000), Some(&l), Some(1_500)),
            Ok(()),
            "enrolled again: a later serial"
        );
        assert_eq!(
            peer_cert_acceptable(&cert("other", 3, 2_000), Some(&l), Some(1_500)),
            Ok(())
        );
        assert_eq!(
            peer_cert_acceptable(&cert("other", 3, 2_000), None, Some(2_000)),
            Err(CertRefusal::Expired)
        );
        assert_eq!(
            peer_cert_acceptable(&cert("other", 3, 2_000), None, None),
            Ok(()),
            "time unknown"
        );
    }

    #[test]
    fn a_list_is_taken_only_signed_by_the_manager_and_newer() {
        let key = manager().public();
        let (buf, n) = encode(&list(4, &[("victim", 5)]));
        let taken = accept_revocations(&buf[..n], Some(&key), Some(3)).unwrap();
        assert_eq!(taken.version, 4);
        assert_eq!(
            accept_revocations(&buf[..n], Some(&key), Some(4)),
            Err(ManagerDocError::Stale)
        );
        let other = Identity::from_seed([9; 32]).public();
        assert_eq!(
            accept_revocations(&buf[..n], Some(&other), None),
            Err(ManagerDocError::BadSignature)
        );
        assert_eq!(
            accept_revocations(&buf[..n], None, None),
            Err(ManagerDocError::NoManagerKey)
        );
        assert_eq!(
            accept_revocations(&buf[..n - 1], Some(&key), None),
            Err(ManagerDocError::Malformed)
        );
    }

    #[test]
    fn a_renewal_is_taken_only_for_this_agent_signed_and_with_a_higher_serial() {
        let key = manager().public();
        let held = cert("me", 4, 2_000);
        assert_eq!(
            accept_renewal(&cert("me", 9, 3_000), &held, Some(&key)),
            Ok(())
        );
        assert_eq!(
            accept_renewal(&cert("me", 4, 3_000), &held, Some(&key)),
            Err(ManagerDocError::Stale)
        );
        assert_eq!(
            accept_renewal(&cert("mx", 9, 3_000), &held, Some(&key)),
            Err(ManagerDocError::NotOurs)
        );
        let forged = AgentCert::issue_with_term(
            &Identity::from_seed([9; 32]),
            held.id.clone(),
            held.key,
            Name::new(),
            0,
            9,
            3_000,
        );
        assert_eq!(
            accept_renewal(&forged, &held, Some(&key)),
            Err(ManagerDocError::BadSignature)
        );
    }

    #[test]
    fn decoding_in_place_accepts_what_serde_accepts() {
        let manager = baton_protocol::identity::Identity::from_seed([1; 32]);
        let entries = (0..5u64)
            .map(|i| Revoked {
                id: AgentId::try_from(std::format!("agent-{i}").as_str()).unwrap(),
                up_to_serial: i * 1000 + 7,
            })
            .collect();
        let list = RevocationList::sign(&manager, 9, 1_700_000_000, entries);
        let bytes = postcard::to_allocvec(&list).unwrap();
        let mut slot = Some(RevocationList::sign(&manager, 1, 1, heapless::Vec::new()));
        assert!(decode_into(&bytes, &mut slot));
        assert_eq!(slot.as_ref(), Some(&list));
        // Every truncation and every single flipped byte: the same verdict as serde's.
        for n in 0..bytes.len() {
            let mut slot = None;
            assert_eq!(
                decode_into(&bytes[..n], &mut slot),
                RevocationList::decode(&bytes[..n]).is_some(),
                "truncated to {n}"
            );
        }
        for at in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[at] ^= bit;
                let mut slot = None;
                let ours = decode_into(&bad, &mut slot);
                let serde = RevocationList::decode(&bad);
                assert_eq!(ours, serde.is_some(), "byte {at} bit {bit:#x}");
                assert_eq!(slot, serde, "byte {at} bit {bit:#x}");
                // A list that does not decode leaves the one held as it was.
                let held = RevocationList::sign(&manager, 1, 1, heapless::Vec::new());
                let mut slot = Some(held.clone());
                if !decode_into(&bad, &mut slot) {
                    assert_eq!(slot, Some(held), "byte {at} bit {bit:#x}");
                }
            }
        }
    }
}
