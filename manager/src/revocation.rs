//! Agent certificates' serials and the signed revocation list, on the manager's side.
//!
//! Every certificate the manager issues (`Welcome`, `CertRenewed`) takes the next serial
//! of a counter in the store ([`StoreSerials`]; it only grows, also across restarts) and
//! records it with the certificate's expiry as the agent's latest. Revoking an agent
//! (`baton agents revoke ID`) records "every certificate of ID up to its last serial";
//! [`RevocationSigner`] turns the revocations whose certificates have not all expired into
//! a [`RevocationList`] signed with the manager's key, which the agent port sends to every
//! live session and after every `Welcome`.
//!
//! **Bound.** A list carries at most [`MAX_REVOKED`] (32) entries, so agents hold it in
//! fixed memory. Entries leave the list once every certificate they cover has expired
//! (`--cert-lifetime` after the revocation, 24 h by default), so the list only overflows
//! when more than 32 agents are revoked within one certificate lifetime. Then the list
//! carries the 32 entries whose certificates expire last, and the others only until
//! room frees up (one warning per few seconds names how many were left out): peers may
//! accept those agents' certificates until they expire, but the manager itself refuses
//! every revoked agent whatever the list holds, so they get no jobs, no renewals and no
//! place in any plan. Revoking many agents at once is better done with a short
//! `--cert-lifetime`.

use std::sync::{Arc, RwLock};

use baton_agent_core::linux::spaced::{SpacedLog, WARN_EVERY};
use baton_manager_core::session::CertSerials;
use baton_protocol::identity::Identity;
use baton_protocol::message::Message;
use baton_protocol::revocation::{MAX_REVOKED, RevocationList, Revoked};
use baton_protocol::types::AgentId;

use crate::store::{RevocationRecord, StoreError};
use crate::store::{SharedStore, lock};

/// Certificate serials from the store's persisted counter.
#[derive(Debug)]
pub struct StoreSerials {
    store: SharedStore,
}

impl StoreSerials {
    /// Serials counted in `store`.
    pub fn new(store: SharedStore) -> Self {
        StoreSerials { store }
    }
}

impl CertSerials for StoreSerials {
    fn next_serial(&self, agent: &AgentId, not_after: u64) -> Result<u64, String> {
        lock(&self.store)
            .next_cert_serial(agent, not_after)
            .map_err(|e| e.to_string())
    }
}

/// The warning that the list could not carry every live revocation, spaced.
static OVERFLOW_LOG: SpacedLog = SpacedLog::new(WARN_EVERY);

/// Signs the revocation list and keeps the latest one, encoded as the message agents get.
#[derive(Debug)]
pub struct RevocationSigner {
    identity: Identity,
    /// The latest list.
    current: RwLock<Option<SignedList>>,
}

/// A signed list's entries and its `Message::Revocations` frame.
type SignedList = (Vec<Revoked>, Arc<Vec<u8>>);

/// The entries a list carries from the live revocations (latest expiry first): those that
/// cover a certificate, at most [`MAX_REVOKED`]; and how many were left out.
pub fn list_entries(live: &[RevocationRecord]) -> (Vec<Revoked>, usize) {
    let mut entries = Vec::new();
    let mut left_out = 0;
    for r in live.iter().filter(|r| r.up_to_serial > 0) {
        match AgentId::try_from(r.id.as_str()) {
            Ok(id) if entries.len() < MAX_REVOKED => entries.push(Revoked {
                id,
                up_to_serial: r.up_to_serial,
            }),
            Ok(_) => left_out += 1,
            Err(_) => tracing::warn!(id = %r.id, "revoked agent id is too long for the list"),
        }
    }
    (entries, left_out)
}

impl RevocationSigner {
    /// A signer with the manager's `identity`, holding no list yet.
    pub fn new(identity: Identity) -> Self {
        RevocationSigner {
            identity,
            current: RwLock::new(None),
        }
    }

    /// The latest list as a `Message::Revocations` frame (none before the first revocation
    /// of this run or a refresh that found live ones).
    pub fn current(&self) -> Option<Arc<Vec<u8>>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, frame)| frame.clone())
    }

    /// The version of the latest list, if there is one.
    pub fn version(&self) -> Option<u64> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let (_, frame) = current.as_ref()?;
        match Message::decode(frame) {
            Ok(Message::Revocations { list }) => RevocationList::decode(list).map(|l| l.version),
            _ => None,
        }
    }

    /// Reads the live revocations at `now` (dropping those whose certificates all expired)
    /// and signs a new list if its entries changed; returns the new list's frame then.
    /// An empty list is signed only to replace a non-empty one.
    pub fn refresh(
        &self,
        store: &SharedStore,
        now: u64,
    ) -> Result<Option<Arc<Vec<u8>>>, StoreError> {
        let mut store = lock(store);
        let live = store.live_revocations(now)?;
        let (entries, left_out) = list_entries(&live);
        if left_out > 0
            && let Some(held_back) = OVERFLOW_LOG.due()
        {
            tracing::warn!(
                left_out,
                held_back,
                "more agents revoked within one certificate lifetime than the revocation list holds ({MAX_REVOKED}); the manager refuses them all, but peers only learn of the {MAX_REVOKED} whose certificates expire last (shorten --cert-lifetime)"
            );
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let unchanged = match current.as_ref() {
            Some((held, _)) => *held == entries,
            None => entries.is_empty(),
        };
        if unchanged {
            return Ok(None);
        }
        let version = store.next_revocation_version()?;
        let signed = RevocationList::sign(
            &self.identity,
            version,
            now,
            entries.iter().cloned().collect(),
        );
        let mut buf = vec![0u8; baton_protocol::revocation::MAX_REVOCATION_BYTES];
        let len = postcard::to_slice(&signed, &mut buf)
            .map_err(|e| StoreError::Corrupt(format!("revocation list: {e}")))?
            .len();
        let frame = Arc::new(Message::Revocations { list: &buf[..len] }.to_vec());
        tracing::info!(version, entries = entries.len(), "revocation list signed");
        *current = Some((entries, frame.clone()));
        Ok(Some(frame))
    }
}
