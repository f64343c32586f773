//! The agent registry: who is enrolled (and with which key), and who is connected now.
//!
//! Enrolment is checked on every handshake, so the enrolled keys are cached
//! in memory and written through to the [`Store`]. [`Registry::authorize`] is
//! the link layer's `authorize` step for the agent port (SPEC §2): the key
//! proven in the handshake must be the one enrolled for `Hello.id`, or an
//! unused enrolment token enrols it now.
//!
//! Each live connection registers a [`Session`]; an agent that connects again
//! with the same key takes over: the old session is told to close, and its
//! later disconnect is recognised as stale by its generation number. A
//! session's control queue holds at most [`CONTROL_QUEUE`] messages: an agent
//! that does not read its instructions is disconnected when it is full (it
//! is instructed again when it comes back), so the engine never waits on it.
//!
//! Revoking an agent ([`Registry::revoke`]) ends its live session at once (it is told
//! why), refuses its handshakes from then on ([`AuthError::Revoked`]), removes it from
//! the fleet views, and signs and sends a new revocation list to every live session
//! ([`crate::revocation`]); enrolling the id again starts it afresh.
//!
//! The registry also takes segment discovery reports from leaders
//! ([`Registry::segment_report`]): each page is checked against the session
//! that carried it and the segment its agent reported, pages are assembled
//! ([`baton_manager_core::segments::Assembler`]), and a complete report replaces the
//! segment's stored view. Before assembly each page is checked against where the
//! administrator placed its leader and members
//! ([`baton_manager_core::placement::authorize_page`]): a leader placed in another
//! segment is refused, members placed elsewhere are dropped; both are counted
//! ([`SegmentChecks`], on `/metrics`) and warned about at most once per
//! [`WARN_EVERY`](baton_agent_core::linux::spaced::WARN_EVERY).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use baton_agent_core::linux::spaced::SpacedLog;
use baton_protocol::identity::Identity;
use baton_protocol::message::{Report, SegmentReport};
use baton_protocol::session::{Handshake, Role};
use baton_protocol::types::{AgentId, Digest, Label, PublicKey};
use tokio::sync::{Notify, mpsc};

use crate::revocation::RevocationSigner;
use crate::store::{Enrolled, RevocationRecord, StoreError, secret_digest};
use crate::trust::{KEEP_TRUST_DOCUMENTS, TrustChain, TrustCheck, TrustRefused};
use baton_manager_core::placement::{self, Placement, PlacementRefusal};
use baton_manager_core::rate_limit::{Rate, TokenBucket};
use baton_manager_core::segments::{self, Assembler};
use baton_protocol::message::Message;
use baton_protocol::trust::SignedTrust;

/// Messages queued for one agent's control traffic (engine instructions) before the agent
/// is disconnected as one that does not read.
pub const CONTROL_QUEUE: usize = 256;
/// What segment-report checks refused since start (shown on `/metrics`).
#[derive(Debug, Default)]
pub struct SegmentChecks {
    /// Pages refused because their leader is placed in another segment.
    pub pages_refused: AtomicU64,
    /// Members dropped from accepted pages because they are placed in another segment.
    pub members_dropped: AtomicU64,
    /// Delays dropped because they name a peer placed in another segment.
    pub delays_dropped: AtomicU64,
}

pub use crate::store::{SharedStore, lock};

/// Unix time in milliseconds.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a handshake's initiator is not accepted as an agent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The initiator says it is a manager.
    #[error("{0:?} announced itself as a manager, not an agent")]
    NotAnAgent(String),
    /// No such agent is enrolled and no token was offered.
    #[error(
        "unknown agent {0:?}: not enrolled (enrol it with `baton enroll --id {0} --key <hex>`, or give it an enrolment token from `baton enroll --token`)"
    )]
    Unknown(String),
    /// The agent is enrolled with another key.
    #[error("agent {0:?} proved a key that is not the one enrolled for it")]
    WrongKey(String),
    /// A token was offered without the agent's self-signed certificate of the key it proved.
    #[error(
        "agent {0:?} offered an enrolment token without a self-signed certificate of its key (upgrade the agent)"
    )]
    NoSelfCert(String),
    /// The agent was revoked (`baton agents revoke`).
    #[error(
        "agent {0:?} was revoked by the administrator; it is refused until it is enrolled again"
    )]
    Revoked(String),
    /// The offered token is unknown.
    #[error("agent {0:?} offered an unknown enrolment token")]
    BadToken(String),
    /// The offered token was used already (by the agent named second).
    #[error("agent {0:?} offered an enrolment token that agent {1:?} already used")]
    TokenUsed(String, String),
    /// The offered token expired (at this Unix time).
    #[error(
        "agent {0:?} offered an enrolment token that expired at {1} (Unix seconds; make a new one with `baton enroll --token`)"
    )]
    TokenExpired(String, u64),
    /// The offered token was revoked.
    #[error("agent {0:?} offered a revoked enrolment token")]
    TokenRevoked(String),
    /// The offered token enrols only another agent id (named second).
    #[error("agent {0:?} offered an enrolment token bound to agent {1:?}")]
    TokenBoundElsewhere(String, String),
    /// The handshake did not finish.
    #[error("handshake incomplete")]
    Incomplete,
    /// The database failed.
    #[error("database error while authorizing {0:?}: {1}")]
    Store(String, String),
}

impl AuthError {
    /// Why, as the refused agent is told ([`Message::NotAccepted`], at most
    /// [`MAX_NOT_ACCEPTED_REASON`] bytes): the same words as the manager's log, except that
    /// an unknown id and an id enrolled with another key read alike (a stranger learns
    /// no enrolled id), and a database failure is not described.
    ///
    /// [`Message::NotAccepted`]: baton_protocol::message::Message::NotAccepted
    /// [`MAX_NOT_ACCEPTED_REASON`]: baton_protocol::message::MAX_NOT_ACCEPTED_REASON
    pub fn told_to_agent(&self) -> String {
        let text = match self {
            AuthError::Unknown(id) | AuthError::WrongKey(id) => format!(
                "agent {id:?} is not enrolled with the key it proved (enrol it with `baton enroll --id {id} --key <hex>`, or start it with an enrolment token)"
            ),
            AuthError::Store(id, _) => {
                format!("the manager could not check agent {id:?} (see the manager's log)")
            }
            other => other.to_string(),
        };
        reason_for_agent(text)
    }
}

/// `text` cut to what a [`Message::NotAccepted`] carries
/// ([`MAX_NOT_ACCEPTED_REASON`] bytes, at a character boundary).
///
/// [`Message::NotAccepted`]: baton_protocol::message::Message::NotAccepted
/// [`MAX_NOT_ACCEPTED_REASON`]: baton_protocol::message::MAX_NOT_ACCEPTED_REASON
pub fn reason_for_agent(mut text: String) -> String {
    let mut end = text
        .len()
        .min(baton_protocol::message::MAX_NOT_ACCEPTED_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

/// A connected agent's session, as the rest of the manager sees it.
#[derive(Debug)]
pub struct Session {
    /// Distinguishes this connection from earlier ones of the same agent.
    pub generation: u64,
    /// The agent's key (proven in the handshake).
    pub key: PublicKey,
    /// Where it connected from.
    pub addr: SocketAddr,
    /// Encoded messages for the agent (control traffic: engine instructions), at most
    /// [`CONTROL_QUEUE`] of them.
    pub control: mpsc::Sender<Vec<u8>>,
    /// Tells the connection to close (on takeover or shutdown).
    pub close: Arc<Notify>,
    /// Content this connection no longer serves chunks of: the engine told the agent to stop
    /// working on its job (`Cancel`), until it is told to fetch it again.
    pub stopped: StoppedRoots,
}

/// Most roots one connection keeps as stopped (the oldest is forgotten beyond).
pub const MAX_STOPPED_ROOTS: usize = 16;

/// The roots whose chunk answers a connection drops (see [`Session::stopped`]): chunk
/// requests still arriving, answers queued and not yet sent. Without it, answers the agent
/// asked for before a `Cancel` (a window's close) would go on reaching it for as long as
/// the manager's upload cap takes to send them.
#[derive(Clone, Debug, Default)]
pub struct StoppedRoots(Arc<Mutex<Vec<Digest>>>);

impl StoppedRoots {
    /// Stops serving `root` on this connection.
    pub fn stop(&self, root: Digest) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !list.contains(&root) {
            if list.len() >= MAX_STOPPED_ROOTS {
                list.remove(0);
            }
            list.push(root);
        }
    }

    /// Serves `root` again.
    pub fn resume(&self, root: &Digest) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|r| r != root);
    }

    /// Whether chunks of `root` are not to be sent.
    pub fn contains(&self, root: &Digest) -> bool {
        let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.contains(root)
    }
}

/// What [`Registry::authorize`] accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorized {
    /// The agent's id.
    pub id: AgentId,
    /// Its Ed25519 key.
    pub key: PublicKey,
    /// Whether it was enrolled by this handshake (with a token).
    pub enrolled_now: bool,
}

/// Enrolled keys and live sessions.
#[derive(Debug)]
pub struct Registry {
    store: SharedStore,
    keys: RwLock<HashMap<AgentId, PublicKey>>,
    /// Per agent enrolled with a label-bound token: the labels every report must carry.
    bound_labels: RwLock<HashMap<AgentId, BTreeMap<String, String>>>,
    sessions: Mutex<HashMap<AgentId, Session>>,
    generation: AtomicU64,
    /// The segment each agent named in its latest report.
    reported_segments: Mutex<HashMap<AgentId, String>>,
    /// Segment report pages being assembled.
    assembler: Mutex<Assembler>,
    /// The warning about agents disconnected for a full control queue, spaced.
    control_full: SpacedLog,
    /// Where each agent is placed (segment, election score), cached from the store.
    placements: RwLock<HashMap<AgentId, Placement>>,
    /// What the placement checks refused.
    pub segment_checks: SegmentChecks,
    /// Spacing of the warnings about refused segment report pages.
    pub segment_warning: SpacedLog,
    /// Spacing of the warnings about reported members placed elsewhere.
    pub members_warning: SpacedLog,
    /// Spacing of the warnings about agents declaring another segment than their placement.
    pub placement_warning: SpacedLog,
    /// Per enrolled agent: how often it may come online ([`ONLINE_RATE`]), on the clock
    /// from `created`. Each new session's report costs a database write and a re-plan, and
    /// a session's own rate limits start afresh: this is what bounds reconnecting.
    onlines: Mutex<HashMap<AgentId, TokenBucket>>,
    /// When the registry was made (the clock of `onlines`).
    created: std::time::Instant,
    /// The warning about agents reconnecting too often, spaced.
    reconnect_warning: SpacedLog,
    /// The signed trust documents held, sent to every session after `Welcome` (lock order:
    /// `sessions` before `trust`).
    trust: Mutex<TrustChain>,
    /// Held while a trust document is checked, stored, appended and sent: one at a time.
    trust_upload: Mutex<()>,
    /// Revoked agents: refused at the handshake.
    revoked: RwLock<HashSet<AgentId>>,
    /// Signs the revocation list (none: the list is not kept, e.g. in unit tests).
    signer: Option<RevocationSigner>,
}

/// What [`Registry::revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The stored revocation: the last serial it covers and when those certificates expire.
    pub record: RevocationRecord,
    /// Whether a live session was ended.
    pub was_connected: bool,
    /// The version of the revocation list in force now (none if no list is kept).
    pub list_version: Option<u64>,
    /// Live sessions the new list was queued for.
    pub sent_to: usize,
}

/// How often one agent may come online: a few reconnections at once (a flaky link, a
/// reboot), then one a second.
pub const ONLINE_RATE: Rate = Rate::new(5, 1);

/// Why a segment report page was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentReportError {
    /// The page was refused (wrong leader, wrong segment, bad page numbers, stale).
    #[error(transparent)]
    Refused(#[from] segments::Refusal),
    /// The leader is not placed in the segment it reports.
    #[error(transparent)]
    NotPlaced(#[from] PlacementRefusal),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a stored segment report changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentStored {
    /// The segment.
    pub segment: String,
    /// Members in the report.
    pub members: usize,
    /// Members the manager does not know (not enrolled).
    pub unknown: usize,
    /// Whether the segment has a new leader.
    pub leader_changed: bool,
}

impl Registry {
    /// A registry over `store`, with every enrolled key loaded.
    pub fn load(store: SharedStore) -> Result<Self, StoreError> {
        let mut keys = HashMap::new();
        let mut placements = HashMap::new();
        for agent in lock(&store).agents()? {
            match AgentId::try_from(agent.id.as_str()) {
                Ok(id) => {
                    if let Some(segment) = agent.placed_segment {
                        let score = agent.election_score.unwrap_or(0);
                        placements.insert(id.clone(), Placement { segment, score });
                    }
                    keys.insert(id, agent.key);
                }
                Err(_) => tracing::warn!(id = %agent.id, "stored agent id is too long; ignored"),
            }
        }
        let mut bound_labels = HashMap::new();
        for (id, labels) in lock(&store).bound_labels()? {
            if let Ok(id) = AgentId::try_from(id.as_str()) {
                bound_labels.insert(id, labels);
            }
        }
        let trust = TrustChain::from_encoded(lock(&store).trust_chain()?);
        let revoked = lock(&store)
            .revoked_agents()?
            .into_iter()
            .filter_map(|id| AgentId::try_from(id.as_str()).ok())
            .collect();
        Ok(Registry {
            trust: Mutex::new(trust),
            trust_upload: Mutex::new(()),
            revoked: RwLock::new(revoked),
            signer: None,
            store,
            keys: RwLock::new(keys),
            bound_labels: RwLock::new(bound_labels),
            sessions: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            reported_segments: Mutex::new(HashMap::new()),
            assembler: Mutex::new(Assembler::new()),
            control_full: SpacedLog::default(),
            placements: RwLock::new(placements),
            segment_checks: SegmentChecks::default(),
            segment_warning: SpacedLog::default(),
            members_warning: SpacedLog::default(),
            placement_warning: SpacedLog::default(),
            onlines: Mutex::new(HashMap::new()),
            created: std::time::Instant::now(),
            reconnect_warning: SpacedLog::default(),
        })
    }

    /// The same registry signing revocation lists with the manager's `identity`; the list
    /// of the revocations still live is signed now.
    pub fn with_revocation_signer(mut self, identity: Identity) -> Result<Self, StoreError> {
        let signer = RevocationSigner::new(identity);
        signer.refresh(&self.store, unix_now())?;
        self.signer = Some(signer);
        Ok(self)
    }

    /// Whether `id` was revoked (and not enrolled again).
    pub fn is_revoked(&self, id: &AgentId) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// The revocation list in force as a `Message::Revocations` frame (sent after every
    /// `Welcome`), if there is one.
    pub fn revocation_frame(&self) -> Option<Arc<Vec<u8>>> {
        self.signer.as_ref().and_then(RevocationSigner::current)
    }

    /// Revokes agent `id` (administrator action): see the module documentation.
    /// `NotFound` if no such agent is enrolled.
    pub fn revoke(&self, id: &AgentId) -> Result<Revocation, StoreError> {
        let now = unix_now();
        let record = lock(&self.store)
            .revoke_agent(id, now)?
            .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.placements
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.bound_labels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        // Its live session ends now, told why (the writer sends control messages first).
        let was_connected = match self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            Some(s) => {
                let why = AuthError::Revoked(id.to_string()).told_to_agent();
                let _ = s.control.try_send(
                    baton_protocol::message::Message::NotAccepted { reason: &why }.to_vec(),
                );
                s.close.notify_one();
                true
            }
            None => false,
        };
        tracing::info!(agent = %id, up_to_serial = record.up_to_serial, certificates_expire = record.expires_at, was_connected, "agent revoked");
        let sent_to = self.publish_revocations(now)?;
        Ok(Revocation {
            record,
            was_connected,
            list_version: self.signer.as_ref().and_then(RevocationSigner::version),
            sent_to,
        })
    }

    /// Signs a new revocation list if the live revocations changed at `now` (a revocation,
    /// or certificates that expired) and queues it for every live session but revoked ones;
    /// returns how many sessions it was queued for.
    pub fn publish_revocations(&self, now: u64) -> Result<usize, StoreError> {
        let Some(signer) = &self.signer else {
            return Ok(0);
        };
        let Some(frame) = signer.refresh(&self.store, now)? else {
            return Ok(0);
        };
        let mut sent = 0;
        for id in self.connected() {
            if !self.is_revoked(&id) && self.send(&id, frame.as_ref().clone()) {
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Whether enrolled agent `id` may start another session now ([`ONLINE_RATE`]); if not,
    /// its connection is closed before its report reaches the engine (spaced warning).
    pub fn may_come_online(&self, id: &AgentId) -> bool {
        let now = self.created.elapsed();
        let allowed = self
            .onlines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_insert_with(|| TokenBucket::new(ONLINE_RATE, now))
            .take(now);
        if !allowed && let Some(held_back) = self.reconnect_warning.due() {
            tracing::warn!(agent = %id, held_back, "agent reconnects faster than {} a second after {} at once; closing the new session", ONLINE_RATE.per_second, ONLINE_RATE.burst);
        }
        allowed
    }

    /// Where `id` is placed, if its first report or the administrator placed it.
    pub fn placement(&self, id: &AgentId) -> Option<Placement> {
        self.placements
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Records the placement an agent's first report made (its session's), unless it
    /// already has one; returns the placement in force.
    pub fn place_at_enrolment(
        &self,
        id: &AgentId,
        placement: &Placement,
    ) -> Result<Placement, StoreError> {
        if let Some(p) = self.placement(id) {
            return Ok(p);
        }
        lock(&self.store).place_at_enrolment(id, &placement.segment, placement.score)?;
        let stored = lock(&self.store)
            .agent(id)?
            .and_then(|a| Some((a.placed_segment?, a.election_score.unwrap_or(0))));
        let placed = match stored {
            Some((segment, score)) => Placement { segment, score },
            None => placement.clone(),
        };
        tracing::info!(agent = %id, segment = %placed.segment, score = placed.score, "agent placed by its first report");
        self.placements
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), placed.clone());
        Ok(placed)
    }

    /// Places agent `id` (administrator action): sets its segment and/or election score.
    /// A connected agent's session is closed, so that it reconnects and its new
    /// certificate (in the new `Welcome`) tells its peers at once.
    pub fn place(
        &self,
        id: &AgentId,
        segment: Option<&str>,
        score: Option<u32>,
    ) -> Result<Placement, StoreError> {
        let record = {
            let mut store = lock(&self.store);
            store.place_agent(id, segment, score)?;
            store.agent(id)?
        }
        .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
        let placed = Placement {
            segment: record.placed_segment.unwrap_or_default(),
            score: record.election_score.unwrap_or(0),
        };
        self.placements
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), placed.clone());
        if let Some(s) = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            s.close.notify_one();
        }
        tracing::info!(agent = %id, segment = %placed.segment, score = placed.score, "agent placed by the administrator");
        Ok(placed)
    }

    /// The store behind this registry.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// The key enrolled for `id`.
    pub fn key_of(&self, id: &AgentId) -> Option<PublicKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }

    /// Whether `id` is enrolled.
    pub fn is_enrolled(&self, id: &AgentId) -> bool {
        self.key_of(id).is_some()
    }

    /// Enrols `id` with `key` (administrator action).
    pub fn enrol(&self, id: &AgentId, key: &PublicKey) -> Result<Enrolled, StoreError> {
        let done = lock(&self.store).enrol(id, key, unix_now())?;
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), *key);
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(done)
    }

    /// Decides about a handshake's initiator on the agent port (SPEC §2).
    pub fn authorize(&self, hs: &Handshake) -> Result<Authorized, AuthError> {
        let hello = hs.remote_hello().ok_or(AuthError::Incomplete)?;
        let id = hello.id.clone();
        if hello.role != Role::Agent {
            return Err(AuthError::NotAnAgent(id.to_string()));
        }
        if let Some(key) = self.key_of(&id) {
            return match hs.remote_is(&key) {
                Ok(()) => Ok(Authorized {
                    id,
                    key,
                    enrolled_now: false,
                }),
                Err(_) => Err(AuthError::WrongKey(id.to_string())),
            };
        }
        let Some(token) = hello.token.as_ref() else {
            if self.is_revoked(&id) {
                return Err(AuthError::Revoked(id.to_string()));
            }
            return Err(AuthError::Unknown(id.to_string()));
        };
        let key = self_signed_key(hs).ok_or_else(|| AuthError::NoSelfCert(id.to_string()))?;
        let hash = secret_digest(token);
        match lock(&self.store).enrol_with_token(&hash, &id, &key, unix_now()) {
            Ok(_) => {}
            // A revoked agent offering its old token again is told it is revoked; a fresh
            // token from the administrator enrols the id afresh.
            Err(_) if self.is_revoked(&id) => return Err(AuthError::Revoked(id.to_string())),
            Err(StoreError::BadToken) => return Err(AuthError::BadToken(id.to_string())),
            Err(StoreError::TokenUsed(by)) => return Err(AuthError::TokenUsed(id.to_string(), by)),
            Err(StoreError::TokenExpired(at)) => {
                return Err(AuthError::TokenExpired(id.to_string(), at));
            }
            Err(StoreError::TokenRevoked) => return Err(AuthError::TokenRevoked(id.to_string())),
            Err(StoreError::TokenBoundElsewhere(to)) => {
                return Err(AuthError::TokenBoundElsewhere(id.to_string(), to));
            }
            Err(StoreError::KeyConflict(_)) => return Err(AuthError::WrongKey(id.to_string())),
            Err(e) => return Err(AuthError::Store(id.to_string(), e.to_string())),
        }
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), key);
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let bound = lock(&self.store)
            .bound_labels()
            .map_err(|e| AuthError::Store(id.to_string(), e.to_string()))?
            .into_iter()
            .find(|(agent, _)| agent == id.as_str());
        if let Some((_, labels)) = bound {
            self.bound_labels
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), labels);
        }
        tracing::info!(agent = %id, key = %hex::encode(key.0), "agent enrolled with a one-time token");
        Ok(Authorized {
            id,
            key,
            enrolled_now: true,
        })
    }

    /// Whether agent `id` reports every label its enrolment token bound it to (`reported`:
    /// its report's labels); if not, why (for the manager's log and the agent).
    pub fn check_bound_labels(&self, id: &AgentId, reported: &[Label]) -> Result<(), String> {
        let bound = self.bound_labels.read().unwrap_or_else(|e| e.into_inner());
        let Some(labels) = bound.get(id) else {
            return Ok(());
        };
        let missing: Vec<String> = labels
            .iter()
            .filter(|(k, v)| {
                !reported
                    .iter()
                    .any(|l| l.key.as_str() == k.as_str() && l.value.as_str() == v.as_str())
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "agent {:?} does not report the labels its enrolment token bound it to: {} (start it with --label {})",
            id.as_str(),
            missing.join(", "),
            missing.join(" --label ")
        ))
    }

    /// A fresh session generation number.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a live session; an older session of the same agent is told to close.
    ///
    /// Returns whether an older session was taken over.
    pub fn register(&self, id: AgentId, session: Session) -> bool {
        self.assembler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_leader(&id);
        let old = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            // The held trust documents go first, oldest first, under the sessions lock: a
            // document added meanwhile is either among them or sent to this session after.
            let trust = self.trust.lock().unwrap_or_else(|e| e.into_inner());
            for document in trust.encoded() {
                // A fresh queue holds CONTROL_QUEUE > KEEP_TRUST_DOCUMENTS messages.
                let _ = session
                    .control
                    .try_send(Message::Trust { document }.to_vec());
            }
            drop(trust);
            sessions.insert(id.clone(), session)
        };
        match old {
            Some(old) => {
                tracing::info!(agent = %id, old = %old.addr, "agent reconnected; closing its previous session");
                old.close.notify_one();
                true
            }
            None => false,
        }
    }

    /// A copy of the trust documents held (to check manifests against the newest).
    pub fn trust(&self) -> TrustChain {
        self.trust.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a signed trust document: refused unless it chains from the newest held one
    /// (see [`TrustChain::check`]); the newest one again changes nothing; a newer one is
    /// stored (the newest [`KEEP_TRUST_DOCUMENTS`] kept) and sent to every live session.
    pub fn add_trust(&self, signed: SignedTrust, now: u64) -> Result<TrustCheck, TrustRefused> {
        let _one_at_a_time = self.trust_upload.lock().unwrap_or_else(|e| e.into_inner());
        let check = self.trust().check(&signed, now)?;
        let TrustCheck::Newer(anchor) = &check else {
            return Ok(check);
        };
        let version = signed.document.version;
        let encoded = crate::trust::encode_trust(&signed);
        lock(&self.store).add_trust(version, &encoded, now, KEEP_TRUST_DOCUMENTS)?;
        self.trust
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(signed, anchor.clone());
        let message = Message::Trust { document: &encoded }.to_vec();
        let ids: Vec<AgentId> = self.connected();
        for id in &ids {
            self.send(id, message.clone());
        }
        tracing::info!(
            version,
            sessions = ids.len(),
            "trust document stored and sent to the connected agents"
        );
        Ok(check)
    }

    /// Removes the session of `id` if it is still generation `generation`; returns whether it was.
    pub fn unregister(&self, id: &AgentId, generation: u64) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.get(id).is_some_and(|s| s.generation == generation) {
            sessions.remove(id);
            true
        } else {
            false
        }
    }

    /// Notes what an engine instruction to `id` means for its connection's chunk answers:
    /// after `Cancel` of a job (content `root`) they stop, after a `Fetch` of it they go on.
    pub fn note_instruction(&self, id: &AgentId, message: &Message<'_>, root: Option<Digest>) {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = sessions.get(id) else {
            return;
        };
        match message {
            Message::Cancel { .. } => {
                if let Some(root) = root {
                    s.stopped.stop(root);
                }
            }
            Message::Fetch { manifest, .. } => s.stopped.resume(&manifest.root),
            _ => {}
        }
    }

    /// Queues an encoded message for a connected agent without waiting; false if it is not
    /// connected, or its control queue is full (the agent does not read): that session is
    /// then told to close.
    pub fn send(&self, id: &AgentId, message: Vec<u8>) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = sessions.get(id) else {
            return false;
        };
        match s.control.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.close.notify_one();
                self.warn_control_full(id);
                false
            }
        }
    }

    /// Logs an agent disconnected for its full control queue, at most once per few seconds.
    fn warn_control_full(&self, id: &AgentId) {
        if let Some(also) = self.control_full.due() {
            tracing::warn!(
                agent = %id,
                queued = CONTROL_QUEUE,
                also,
                "agent does not read its instructions (control queue full); disconnecting it"
            );
        }
    }

    /// Whether `id` has a live session.
    pub fn is_connected(&self, id: &AgentId) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// The ids of every connected agent.
    pub fn connected(&self) -> Vec<AgentId> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<AgentId> = sessions.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Notes the segment an agent named in its report (segment report pages are checked
    /// against it).
    pub fn note_report(&self, report: &Report) {
        self.reported_segments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(report.id.clone(), report.segment.to_string());
    }

    /// The segment `id` named in its latest report this run.
    pub fn reported_segment(&self, id: &AgentId) -> Option<String> {
        self.reported_segments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Takes one segment report page that agent `session` sent over its own session; once the
    /// report is complete it replaces the segment's stored view (the answer is then `Some`).
    pub fn segment_report(
        &self,
        session: &AgentId,
        page: SegmentReport,
    ) -> Result<Option<SegmentStored>, SegmentReportError> {
        let mut page = page;
        let leader_placed = self.placement(session).map(|p| p.segment);
        let dropped = match placement::authorize_page(&mut page, leader_placed.as_deref(), |m| {
            self.is_enrolled(m)
                .then(|| self.placement(m).map(|p| p.segment).unwrap_or_default())
        }) {
            Ok(d) => d,
            Err(e) => {
                self.segment_checks
                    .pages_refused
                    .fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        if dropped.members > 0 || dropped.delays > 0 {
            let c = &self.segment_checks;
            c.members_dropped
                .fetch_add(dropped.members as u64, Ordering::Relaxed);
            c.delays_dropped
                .fetch_add(dropped.delays as u64, Ordering::Relaxed);
            if let Some(held_back) = self.members_warning.due() {
                tracing::warn!(leader = %session, segment = %page.segment, members = dropped.members, delays = dropped.delays, held_back, "segment report names members placed in another segment; dropped them");
            }
        }
        let reported = self.reported_segment(session);
        let now_ms = unix_now_ms();
        let (segment, leader, term) = (page.segment.clone(), page.leader.clone(), page.term);
        let members = self
            .assembler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handle_page(session, reported.as_deref(), page, now_ms)?;
        let Some(members) = members else {
            return Ok(None);
        };
        let record = segments::segment_record(&segment, &leader, term, &members, now_ms, |m| {
            self.is_enrolled(m)
        });
        let unknown = record.members.iter().filter(|m| !m.known).count();
        let leader_changed = lock(&self.store).replace_segment(&record)?;
        Ok(Some(SegmentStored {
            segment: record.name,
            members: record.members.len(),
            unknown,
            leader_changed,
        }))
    }

    /// Tells every session to close (shutdown).
    pub fn close_all(&self) {
        for s in self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.close.notify_one();
        }
    }
}

/// The Ed25519 key of an agent enrolling with a token (SPEC §2).
///
/// The handshake proves the X25519 form of the agent's key only; a token hello
/// therefore carries a certificate the agent signed itself. Its key is taken
/// when the self-signature verifies, the id matches, and the key is the one the
/// handshake proved.
fn self_signed_key(hs: &Handshake) -> Option<PublicKey> {
    let hello = hs.remote_hello()?;
    let cert = hello.cert.as_ref()?;
    (cert.id == hello.id && cert.verify(&cert.key).is_ok() && hs.remote_is(&cert.key).is_ok())
        .then_some(cert.key)
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::store::SqliteStore;
    use crate::store::Store;
    use baton_protocol::identity::{AgentCert, Identity};
    use baton_protocol::session::Hello;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn registry() -> Registry {
        let store: Box<dyn Store> = Box::new(SqliteStore::in_memory().unwrap());
        Registry::load(Arc::new(Mutex::new(store))).unwrap()
    }

    /// Runs a handshake of `agent` (hello `hello`) against the manager; returns the manager's side.
    fn handshake(agent: &Identity, hello: Hello) -> Handshake {
        let manager = Identity::from_seed([1; 32]);
        let mut i = Handshake::initiator(agent, [10; 32], &manager.public(), hello).unwrap();
        let mut r = Handshake::responder(
            &manager,
            [11; 32],
            Hello::new(Role::Manager, id("manager"), 0, None),
        )
        .unwrap();
        let mut buf = [0u8; 1024];
        let n = i.write_message(&mut buf).unwrap();
        r.read_message(&buf[..n]).unwrap();
        let n = r.write_message(&mut buf).unwrap();
        i.read_message(&buf[..n]).unwrap();
        let n = i.write_message(&mut buf).unwrap();
        r.read_message(&buf[..n]).unwrap();
        r
    }

    /// A token valid for a day from now, for any id.
    fn day() -> crate::store::NewToken {
        crate::store::NewToken {
            expires_at: unix_now() + crate::store::DEFAULT_TOKEN_LIFETIME,
            ..Default::default()
        }
    }

    fn hello(name: &str) -> Hello {
        Hello::new(Role::Agent, id(name), 0, None)
    }

    #[test]
    fn enrolled_key_is_accepted_and_others_refused() {
        let reg = registry();
        let agent = Identity::from_seed([2; 32]);
        let other = Identity::from_seed([3; 32]);
        assert_eq!(
            reg.authorize(&handshake(&agent, hello("a"))),
            Err(AuthError::Unknown("a".into()))
        );
        reg.enrol(&id("a"), &agent.public()).unwrap();
        let ok = reg.authorize(&handshake(&agent, hello("a"))).unwrap();
        assert_eq!((ok.key, ok.enrolled_now), (agent.public(), false));
        assert_eq!(
            reg.authorize(&handshake(&other, hello("a"))),
            Err(AuthError::WrongKey("a".into()))
        );
        let manager_role = Hello::new(Role::Manager, id("a"), 0, None);
        assert!(matches!(
            reg.authorize(&handshake(&agent, manager_role)),
            Err(AuthError::NotAnAgent(_))
        ));
        // The cache survives a reload from the store.
        let again = Registry::load(reg.store().clone()).unwrap();
        assert_eq!(again.key_of(&id("a")), Some(agent.public()));
    }

    #[test]
    fn a_label_bound_token_binds_its_agent_to_the_labels_also_after_a_restart() {
        let reg = registry();
        let edge = crate::store::NewToken {
            labels: [("role".to_string(), "edge".to_string())].into(),
            ..day()
        };
        lock(reg.store())
            .add_token(&secret_digest("tok-l"), &edge, 1)
            .unwrap();
        let agent = Identity::from_seed([2; 32]);
        let own = AgentCert::issue(&agent, id("l"), agent.public());
        let hello = Hello::new(Role::Agent, id("l"), 0, Some(own))
            .with_token(heapless::String::try_from("tok-l").unwrap());
        reg.authorize(&handshake(&agent, hello)).unwrap();

        let mut report = crate::test_fixtures::report(id("l"));
        let label = |k: &str, v: &str| baton_protocol::types::Label {
            key: k.try_into().unwrap(),
            value: v.try_into().unwrap(),
        };
        report.labels = [label("role", "core")].into_iter().collect();
        let why = reg
            .check_bound_labels(&id("l"), &report.labels)
            .unwrap_err();
        assert!(why.contains("role=edge"), "{why}");
        report.labels = [label("tier", "1"), label("role", "edge")]
            .into_iter()
            .collect();
        reg.check_bound_labels(&id("l"), &report.labels).unwrap();
        // Other agents are not bound; the binding survives a reload from the store.
        reg.check_bound_labels(&id("free"), &[]).unwrap();
        let again = Registry::load(reg.store().clone()).unwrap();
        assert!(again.check_bound_labels(&id("l"), &[]).is_err());
    }

    /// A registry whose revocation lists are signed by the manager of `handshake`.
    fn signing_registry() -> Registry {
        registry()
            .with_revocation_signer(Identity::from_seed([1; 32]))
            .unwrap()
    }

    /// The revocation list in a `Message::Revocations` frame.
    fn list_in(frame: &[u8]) -> baton_protocol::revocation::RevocationList {
        match baton_protocol::message::Message::decode(frame) {
            Ok(baton_protocol::message::Message::Revocations { list }) => {
                baton_protocol::revocation::RevocationList::decode(list).unwrap()
            }
            other => panic!("expected Revocations, got {other:?}"),
        }
    }

    #[test]
    fn a_revoked_agent_is_closed_refused_and_listed_and_enrolment_starts_it_afresh() {
        let reg = signing_registry();
        assert!(reg.revocation_frame().is_none(), "nothing revoked yet");
        let victim = Identity::from_seed([2; 32]);
        let keeper = Identity::from_seed([3; 32]);
        reg.enrol(&id("victim"), &victim.public()).unwrap();
        reg.enrol(&id("keeper"), &keeper.public()).unwrap();
        let serial = lock(reg.store())
            .next_cert_serial("victim", unix_now() + 3600)
            .unwrap();
        let session = |key: PublicKey| {
            let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
            let close = Arc::new(Notify::new());
            let s = Session {
                generation: reg.next_generation(),
                key,
                addr: "127.0.0.1:1".parse().unwrap(),
                control: tx,
                close: close.clone(),
                stopped: Default::default(),
            };
            (s, rx, close)
        };
        let (s, mut victim_rx, victim_close) = session(victim.public());
        reg.register(id("victim"), s);
        let (s, mut keeper_rx, _) = session(keeper.public());
        reg.register(id("keeper"), s);

        let done = reg.revoke(&id("victim")).unwrap();
        assert_eq!(done.record.up_to_serial, serial);
        assert!(done.was_connected);
        assert_eq!(done.sent_to, 1, "the keeper gets the list, not the victim");
        // The victim's session is told why and closed.
        let told = victim_rx.try_recv().unwrap();
        assert!(
            matches!(
                baton_protocol::message::Message::decode(&told),
                Ok(baton_protocol::message::Message::NotAccepted { reason }) if reason.contains("revoked")
            ),
            "{told:?}"
        );
        assert!(
            notified_at_once(victim_close.notified()),
            "the victim's session is told to close"
        );
        // Every other live session gets the signed list naming it.
        let frame = keeper_rx.try_recv().unwrap();
        let list = list_in(&frame);
        list.verify(&Identity::from_seed([1; 32]).public()).unwrap();
        assert_eq!(Some(list.version), done.list_version);
        assert_eq!(list.entries.len(), 1);
        assert_eq!(
            (list.entries[0].id.as_str(), list.entries[0].up_to_serial),
            ("victim", serial)
        );
        assert_eq!(reg.revocation_frame().as_deref(), Some(&frame));
        // Refused from then on, with the reason, also after a restart.
        assert_eq!(
            reg.authorize(&handshake(&victim, hello("victim"))),
            Err(AuthError::Revoked("victim".into()))
        );
        assert!(
            AuthError::Revoked("victim".into())
                .told_to_agent()
                .contains("revoked")
        );
        let again = Registry::load(reg.store().clone()).unwrap();
        assert_eq!(
            again.authorize(&handshake(&victim, hello("victim"))),
            Err(AuthError::Revoked("victim".into()))
        );
        assert!(!reg.is_enrolled(&id("victim")));
        assert!(matches!(
            reg.revoke(&id("nobody")),
            Err(StoreError::NotFound(_))
        ));
        // Nothing changed: no new list.
        assert_eq!(reg.publish_revocations(unix_now()).unwrap(), 0);
        // Enrolled again by the administrator: accepted, its new certificates not covered.
        reg.enrol(&id("victim"), &victim.public()).unwrap();
        assert!(reg.authorize(&handshake(&victim, hello("victim"))).is_ok());
        assert!(!reg.is_revoked(&id("victim")));
    }

    #[test]
    fn the_list_holds_the_entries_expiring_last_and_drops_expired_ones() {
        let now = unix_now();
        let mut live: Vec<RevocationRecord> = (0..40u64)
            .map(|i| RevocationRecord {
                id: format!("a{i}"),
                up_to_serial: i + 1,
                expires_at: now + 1000 - i,
                revoked_at: now,
            })
            .collect();
        live.push(RevocationRecord {
            id: "never-certified".into(),
            up_to_serial: 0,
            expires_at: 0,
            revoked_at: now,
        });
        let (entries, left_out) = crate::revocation::list_entries(&live);
        assert_eq!(entries.len(), baton_protocol::revocation::MAX_REVOKED);
        assert_eq!(left_out, 40 - baton_protocol::revocation::MAX_REVOKED);
        assert_eq!(entries[0].id.as_str(), "a0", "the latest expiry first");

        // Through the store: an entry leaves the list once its certificates expired.
        let reg = signing_registry();
        let key = Identity::from_seed([2; 32]).public();
        reg.enrol(&id("short"), &key).unwrap();
        lock(reg.store())
            .next_cert_serial("short", now + 5)
            .unwrap();
        reg.revoke(&id("short")).unwrap();
        let listed = list_in(&reg.revocation_frame().unwrap());
        assert_eq!(listed.entries.len(), 1);
        reg.publish_revocations(now + 5).unwrap();
        let later = list_in(&reg.revocation_frame().unwrap());
        assert!(later.entries.is_empty() && later.version > listed.version);
        assert!(reg.is_revoked(&id("short")), "still refused by the manager");
    }

    /// Whether a `Notified` future is ready at once (a permit was stored).
    fn notified_at_once(fut: tokio::sync::futures::Notified<'_>) -> bool {
        use std::future::Future as _;
        let mut fut = std::pin::pin!(fut);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        fut.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn a_token_enrols_once() {
        let reg = registry();
        lock(reg.store())
            .add_token(&secret_digest("tok-1"), &day(), 1)
            .unwrap();
        let agent = Identity::from_seed([2; 32]);
        let b = Identity::from_seed([4; 32]);
        // A token hello carries the agent's self-signed certificate (SPEC §2).
        let with_token = |who: &Identity, name: &str, token: &str| {
            let own = AgentCert::issue(who, id(name), who.public());
            Hello::new(Role::Agent, id(name), 0, Some(own))
                .with_token(heapless::String::try_from(token).unwrap())
        };
        assert_eq!(
            reg.authorize(&handshake(&agent, with_token(&agent, "a", "nope"))),
            Err(AuthError::BadToken("a".into()))
        );
        let ok = reg
            .authorize(&handshake(&agent, with_token(&agent, "a", "tok-1")))
            .unwrap();
        assert!(ok.enrolled_now);
        assert_eq!(ok.key, agent.public());
        // Known now: the same agent is accepted without a token.
        reg.authorize(&handshake(&agent, hello("a"))).unwrap();
        assert_eq!(
            reg.authorize(&handshake(&b, with_token(&b, "b", "tok-1"))),
            Err(AuthError::TokenUsed("b".into(), "a".into()))
        );
    }

    #[test]
    fn a_token_enrolment_needs_a_self_signed_certificate_of_the_proven_key() {
        let reg = registry();
        lock(reg.store())
            .add_token(&secret_digest("t"), &day(), 1)
            .unwrap();
        let agent = Identity::from_seed([2; 32]);
        let token_hello = |cert: Option<AgentCert>| {
            Hello::new(Role::Agent, id("z"), 0, cert)
                .with_token(heapless::String::try_from("t").unwrap())
        };
        // No certificate, a forged self-signature, or another key's certificate: refused.
        let unsigned = AgentCert {
            id: id("z"),
            key: agent.public(),
            segment: heapless::String::new(),
            score: 0,
            serial: 0,
            not_after: 0,
            signature: [0; 64],
        };
        let other = Identity::from_seed([99; 32]);
        for cert in [
            None,
            Some(unsigned),
            Some(AgentCert::issue(&other, id("z"), other.public())),
        ] {
            assert!(matches!(
                reg.authorize(&handshake(&agent, token_hello(cert))),
                Err(AuthError::NoSelfCert(_))
            ));
        }
        // The agent's own self-signed certificate enrols its real key.
        let own = AgentCert::issue(&agent, id("z"), agent.public());
        let done = reg
            .authorize(&handshake(&agent, token_hello(Some(own))))
            .unwrap();
        assert_eq!(done.key, agent.public());
        assert!(done.enrolled_now);
    }

    #[test]
    fn an_agent_that_does_not_read_its_instructions_is_closed_when_its_queue_is_full() {
        let reg = registry();
        let (tx, mut rx) = mpsc::channel(CONTROL_QUEUE);
        let close = Arc::new(Notify::new());
        reg.register(
            id("slow"),
            Session {
                generation: reg.next_generation(),
                key: PublicKey([1; 32]),
                addr: "127.0.0.1:1".parse().unwrap(),
                control: tx,
                close: close.clone(),
                stopped: Default::default(),
            },
        );
        for i in 0..CONTROL_QUEUE {
            assert!(reg.send(&id("slow"), vec![i as u8]), "{i}");
        }
        // Full: the message is not queued (nothing waits) and the session is told to close.
        assert!(!reg.send(&id("slow"), vec![0xff]));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), close.notified())
                .await
                .expect("session told to close");
        });
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, CONTROL_QUEUE);
    }

    #[test]
    fn trust_documents_reach_every_session_in_order_and_survive_a_restart() {
        use baton_protocol::trust::{NamePattern, PublisherGrant, TrustDocument};
        let root = Identity::from_seed([7; 32]);
        let doc = |version: u64| {
            let mut s = SignedTrust::new(TrustDocument {
                version,
                expires: 0,
                threshold: 1,
                roots: heapless::Vec::from_slice(&[root.public()]).unwrap(),
                publishers: heapless::Vec::from_slice(&[PublisherGrant {
                    key: PublicKey([9; 32]),
                    names: heapless::Vec::from_slice(&[NamePattern::try_from("*").unwrap()])
                        .unwrap(),
                }])
                .unwrap(),
            });
            s.sign(&root).unwrap();
            s
        };
        let versions = |rx: &mut mpsc::Receiver<Vec<u8>>| {
            let mut got = Vec::new();
            while let Ok(bytes) = rx.try_recv() {
                match Message::decode(&bytes).unwrap() {
                    Message::Trust { document } => {
                        got.push(SignedTrust::decode(document).unwrap().document.version)
                    }
                    other => panic!("expected Trust, got {other:?}"),
                }
            }
            got
        };
        let session = |reg: &Registry, name: &str| {
            let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
            reg.register(
                id(name),
                Session {
                    generation: reg.next_generation(),
                    key: PublicKey([1; 32]),
                    addr: "127.0.0.1:1".parse().unwrap(),
                    control: tx,
                    close: Arc::new(Notify::new()),
                    stopped: Default::default(),
                },
            );
            rx
        };
        let store: Box<dyn Store> = Box::new(SqliteStore::in_memory().unwrap());
        let store: SharedStore = Arc::new(Mutex::new(store));
        let reg = Registry::load(store.clone()).unwrap();
        let mut early = session(&reg, "early");
        assert!(versions(&mut early).is_empty(), "nothing held yet");
        assert!(matches!(
            reg.add_trust(doc(1), 1_000),
            Ok(TrustCheck::Newer(_))
        ));
        assert_eq!(reg.add_trust(doc(1), 1_000).unwrap(), TrustCheck::Held);
        reg.add_trust(doc(2), 1_000).unwrap();
        assert_eq!(
            versions(&mut early),
            [1, 2],
            "each new one sent once, in order"
        );
        let mut late = session(&reg, "late");
        assert_eq!(
            versions(&mut late),
            [1, 2],
            "a new session gets every one, oldest first"
        );
        // Not chaining (signed by a stranger): refused, nothing sent.
        let mut forged = doc(3);
        forged.signatures.clear();
        forged.sign(&Identity::from_seed([8; 32])).unwrap();
        let e = reg.add_trust(forged, 1_000).unwrap_err();
        assert!(e.to_string().contains("not signed by enough"), "{e}");
        assert!(versions(&mut late).is_empty());
        // Kept in the store: a restarted manager sends the same chain.
        let reg = Registry::load(store).unwrap();
        let mut again = session(&reg, "again");
        assert_eq!(versions(&mut again), [1, 2]);
    }

    #[test]
    fn takeover_closes_the_old_session_and_stale_unregister_is_ignored() {
        let reg = registry();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (tx1, mut rx1) = mpsc::channel(CONTROL_QUEUE);
        let close1 = Arc::new(Notify::new());
        let g1 = reg.next_generation();
        assert!(!reg.register(
            id("a"),
            Session {
                generation: g1,
                key: PublicKey([1; 32]),
                addr,
                control: tx1,
                close: close1.clone(),
                stopped: Default::default(),
            }
        ));
        assert!(reg.send(&id("a"), vec![1]));
        assert_eq!(rx1.try_recv().unwrap(), vec![1]);
        let (tx2, mut rx2) = mpsc::channel(CONTROL_QUEUE);
        let g2 = reg.next_generation();
        assert!(reg.register(
            id("a"),
            Session {
                generation: g2,
                key: PublicKey([1; 32]),
                addr,
                control: tx2,
                close: Arc::new(Notify::new()),
                stopped: Default::default(),
            }
        ));
        // The old session was told to close (a stored permit completes at once).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), close1.notified())
                .await
                .expect("old session notified");
        });
        assert!(reg.send(&id("a"), vec![2]));
        assert_eq!(rx2.try_recv().unwrap(), vec![2]);
        assert!(rx1.try_recv().is_err());
        assert!(!reg.unregister(&id("a"), g1));
        assert!(reg.is_connected(&id("a")));
        assert_eq!(reg.connected(), vec![id("a")]);
        assert!(reg.unregister(&id("a"), g2));
        assert!(!reg.is_connected(&id("a")));
        assert!(!reg.send(&id("a"), vec![3]));
    }

    fn segment_report_page(leader: &str, segment: &str, members: &[&str]) -> SegmentReport {
        use baton_protocol::message::SegmentMember;
        SegmentReport {
            segment: segment.try_into().unwrap(),
            leader: id(leader),
            term: 1,
            page: 0,
            pages: 1,
            members: members
                .iter()
                .map(|m| SegmentMember {
                    id: id(m),
                    score: u32::MAX,
                    listen: None,
                    performance: 1000,
                    free_storage: 1,
                    can_serve: true,
                    link: Default::default(),
                    delays: heapless::Vec::new(),
                    last_heard_ms: 0,
                })
                .collect(),
        }
    }

    /// Enrols `name`, notes its report in `declared` and places it at enrolment in `placed`.
    fn enrolled_in(r: &Registry, name: &str, declared: &str, placed: &str) {
        let key = Identity::from_seed([name.len() as u8 + 40; 32]).public();
        r.enrol(&id(name), &key).unwrap();
        let mut report = baton_protocol::message::Report {
            id: id(name),
            listen: None,
            site: heapless::String::new(),
            segment: declared.try_into().unwrap(),
            performance: 1,
            free_storage: 0,
            can_serve: false,
            max_chunk: 1,
            max_sources: 1,
            max_peers: 0,
            link: Default::default(),
            delays: heapless::Vec::new(),
            labels: heapless::Vec::new(),
            holdings: heapless::Vec::new(),
        };
        let p = Placement::at_enrolment(&report, u32::MAX);
        let p = Placement {
            segment: placed.into(),
            ..p
        };
        r.place_at_enrolment(&id(name), &p).unwrap();
        report.segment = declared.try_into().unwrap();
        r.note_report(&report);
    }

    #[test]
    fn an_agent_reconnecting_in_a_loop_is_turned_away_and_others_are_not() {
        let r = registry();
        let burst = ONLINE_RATE.burst as usize;
        let allowed = (0..100).filter(|_| r.may_come_online(&id("loop"))).count();
        // The burst at once, and whatever a second refilled while the loop ran (none).
        assert!(
            (burst..=burst + 1).contains(&allowed),
            "{allowed} sessions allowed"
        );
        assert!(r.may_come_online(&id("other")));
    }

    #[test]
    fn a_segment_report_from_a_leader_placed_elsewhere_is_refused_and_counted() {
        let r = registry();
        enrolled_in(&r, "h", "lan-1", "lan-1");
        enrolled_in(&r, "hh", "lan-1", "lan-1");
        // "rogue" says lan-1 (its report, its page) but is placed in lan-2.
        enrolled_in(&r, "rogue", "lan-1", "lan-2");
        let refused = r.segment_report(
            &id("rogue"),
            segment_report_page("rogue", "lan-1", &["rogue", "h"]),
        );
        assert!(
            matches!(refused, Err(SegmentReportError::NotPlaced(_))),
            "{refused:?}"
        );
        assert_eq!(r.segment_checks.pages_refused.load(Ordering::Relaxed), 1);
        assert!(
            lock(r.store()).segment("lan-1").unwrap().is_none(),
            "nothing stored"
        );
        // An honest leader's report naming the rogue as a member: stored without it.
        let stored = r
            .segment_report(
                &id("h"),
                segment_report_page("h", "lan-1", &["h", "hh", "rogue"]),
            )
            .unwrap()
            .expect("complete");
        assert_eq!(stored.members, 2);
        assert_eq!(r.segment_checks.members_dropped.load(Ordering::Relaxed), 1);
        let view = lock(r.store()).segment("lan-1").unwrap().unwrap();
        assert_eq!(view.leader, "h");
        let ids: Vec<&str> = view.members.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["h", "hh"]);
        // The administrator moves the rogue to lan-1: now its report is accepted (positive
        // control), and the placement survives a reload of the registry.
        r.place(&id("rogue"), Some("lan-1"), Some(7)).unwrap();
        assert_eq!(
            r.placement(&id("rogue")),
            Some(Placement {
                segment: "lan-1".into(),
                score: 7
            })
        );
        assert!(
            r.segment_report(
                &id("rogue"),
                segment_report_page("rogue", "lan-1", &["rogue", "h"])
            )
            .unwrap()
            .is_some()
        );
        let reloaded = Registry::load(r.store().clone()).unwrap();
        assert_eq!(reloaded.placement(&id("rogue")).unwrap().score, 7);
        // A later first-report placement does not override the administrator's.
        let again = Placement {
            segment: "lan-9".into(),
            score: 1,
        };
        assert_eq!(
            reloaded
                .place_at_enrolment(&id("rogue"), &again)
                .unwrap()
                .segment,
            "lan-1"
        );
    }
}
