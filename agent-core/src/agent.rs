//! The agent's sans-IO state machine (SPEC.md §5 "Agent").
//!
//! [`Agent`] never touches a socket, a clock or a file (other than through its
//! [`ContentStore`]). A driver feeds it inputs and carries out its outputs:
//!
//! - inputs, each with `now` (monotonic time since an origin the driver picks):
//!   [`Agent::handle_manager_connected`], [`Agent::handle_connected`],
//!   [`Agent::handle_disconnected`], [`Agent::handle_connect_failed`],
//!   [`Agent::handle_frame`] (one decrypted frame), [`Agent::handle_timeout`];
//! - outputs, drained after every input until `None`, in this order:
//!   [`Agent::poll_transmit`] (encodes the next frame into the driver's buffer
//!   and names its connection; for a chunk it reads data and proof from the
//!   store straight into that buffer), [`Agent::poll_event`] (connect to a
//!   peer, close a connection, job state changes), and
//!   [`Agent::poll_timeout`] (when to call `handle_timeout` next).
//!
//! The manager connection is the distinguished [`ConnId::MANAGER`]; the driver
//! numbers peer connections from 1. Peers are authenticated by the driver
//! (certificate or expected key) before `handle_connected`.
//!
//! Fetching: each job has a source table by chunk range (a range named later
//! takes its chunks out of earlier ones; chunks no usable range covers come from
//! the manager). Each source gets up
//! to `window` chunk requests in flight, in index order within its ranges.
//! Every chunk is verified against the manifest's root before it is written;
//! a source that sends a bad chunk, is unreachable or keeps refusing is
//! reported to the manager and not asked again for that job (its chunks fall
//! back to the manager until the manager names new sources).
//!
//! Pacing: a `Throttle` from the manager caps the rate at which one job's
//! chunks are requested (a token bucket over `now`; 0 lifts the cap). It may
//! arrive before the job's `Fetch` and is then applied when the job starts.
//!
//! Trust (SPEC.md §4): the agent pins root keys ([`AgentConfig::roots`], of which
//! [`AgentConfig::root_threshold`] must sign). The manager relays the root-signed trust
//! documents (`Message::Trust`); each is judged by [`TrustAnchor::accept`] against the
//! anchor held (older ones are skipped, bad ones refused with [`Event::TrustRefused`]),
//! the anchor of an accepted one is persisted through the store and the document kept
//! (decoded once). A manifest is accepted only from a publisher the document lists for
//! its name, not expired, not below the version recorded for its name and not the
//! recorded version with another root; the version record is kept per name by the store
//! and outlives the content. Without a root key, or before a document arrived, every
//! manifest is refused (`NoTrust`). Expiry is judged on [`AgentConfig::clock`].
//!
//! Certificates and revocation: a `CertRenewed` replaces the certificate held (for
//! the same id and key, signed by the pinned manager key, with a higher serial), and a
//! newer signed `Revocations` list replaces the one held and closes the peer sessions
//! with the agents it newly revokes ([`crate::revocation`]); drivers check every peer's
//! certificate with [`Agent::peer_cert_acceptable`] or the same function of that module.
//!
//! Serving: a `ChunkRequest` is answered from any verified chunk held,
//! including chunks of content still being fetched (cut-through); a request
//! for a chunk of content being fetched that is not verified yet is parked
//! until it is (bounded in number and time), else refused `NotYet`.

use core::time::Duration;

use baton_protocol::identity::AgentCert;
use baton_protocol::manifest::ManifestError;
use baton_protocol::merkle::{self, Proof, leaf_hash};
use baton_protocol::message::{
    CodecError, FailReason, Holding, MAX_HOLDINGS, MAX_RECEIVED_PER_PROGRESS, Received, Refusal,
    Report, Source, SourceRange, Trouble,
};
use baton_protocol::revocation::RevocationList;
use baton_protocol::trust::{MAX_ROOT_KEYS, TrustAnchor, TrustDocument, TrustError};
use baton_protocol::{
    AgentId, Delay, DelayTo, Digest, JobRef, Label, LinkInfo, MAX_LABELS, Manifest, Message, Name,
    PeerAddr, PublicKey,
};
use heapless::{Deque, Vec};
use serde::Serialize;
use sha2::Digest as _;

use crate::inbound::{self, Inbound, InboundError};
use crate::revocation;
use crate::store::{ContentStore, StoreError, StoredAnchor, VersionRecord};

/// Most chunk requests in flight per source (the configured window is capped at this).
pub const MAX_WINDOW: usize = 16;
/// Fewest requests kept in flight to a source once its window adapts (unless the configured
/// window is smaller): fewer left the simulator's relays idle between requests.
const MIN_PACED_WINDOW: usize = 3;
/// Most distinct sources tracked per job (the manager counts as one).
pub const MAX_SOURCE_SLOTS: usize = 9;
/// Most source ranges kept per job (beyond, shadowed and then oldest ranges are dropped).
pub const MAX_RANGES: usize = 32;
/// Default for the most peer requests parked until their chunk is verified (the `PARKED`
/// parameter of [`Agent`]; a relay serving many peers wants about `max_peers × window`).
pub const MAX_PARKED: usize = 16;
/// Consecutive `Busy`/`Unknown` refusals after which a source is reported and avoided.
pub const MAX_REFUSALS: u16 = 50;
/// Park timeouts' worth of `NotYet` refusals (with no chunk between) after which a source
/// is reported and avoided, as one that keeps refusing.
pub const NOT_YET_PARKS: u32 = 6;
/// Connection losses after which a peer source is reported unreachable.
pub const MAX_DISCONNECTS: u8 = 3;

const REPLY_QUEUE: usize = 32;
const MANAGER_QUEUE: usize = 16;
const EVENT_QUEUE: usize = 32;
const FENCES: usize = 16;
/// Rate caps remembered per job id (a `Throttle` may precede its `Fetch`).
const THROTTLES: usize = 8;
/// Peer delays kept for the report (the manager's delay comes first).
const PEER_DELAYS: usize = baton_protocol::MAX_DELAYS - 1;
/// Changes of a peer delay below this many microseconds do not send the report again.
pub const PEER_DELAY_NOISE_US: u32 = 500;
/// With [`AgentClock::ManagerMonotonic`], the latest time seen is written to the store
/// when it moved on by this many seconds (once an hour: flash wears with every write).
pub const LATEST_TIME_EVERY_SECS: u64 = 3600;

/// A connection, numbered by the driver; [`ConnId::MANAGER`] is the manager session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConnId(pub u32);

impl ConnId {
    /// The agent's session with the manager.
    pub const MANAGER: ConnId = ConnId(0);
}

/// Who opened a peer connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Direction {
    /// The peer connected to our listener.
    Incoming,
    /// We connected to the peer (after an [`Event::Connect`]).
    Outgoing,
}

/// An authenticated peer connection, as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PeerInfo {
    /// The peer's id (proven by its certificate or the expected key).
    pub id: AgentId,
    /// Who connected.
    pub direction: Direction,
}

/// One frame for the driver to send: `buf[..len]` on connection `conn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Transmit {
    /// Where to send it.
    pub conn: ConnId,
    /// Bytes of plaintext at the start of the buffer.
    pub len: usize,
}

/// Something the driver must do or may want to know.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Event {
    /// Open a connection to a peer at `addr` expecting `key`; answer with
    /// [`Agent::handle_connected`] (outgoing) or [`Agent::handle_connect_failed`].
    Connect {
        /// The peer's id.
        peer: AgentId,
        /// Where it listens.
        addr: PeerAddr,
        /// The key it must prove.
        key: PublicKey,
    },
    /// Close this peer connection (no longer needed, or misbehaving).
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// The manager's `Welcome` arrived: the certificate for peer handshakes is in [`Agent::cert`].
    Welcomed,
    /// A job started (or resumed) fetching.
    JobStarted {
        /// The job.
        job: JobRef,
        /// The content.
        root: Digest,
        /// Chunks in the content.
        chunks: u32,
        /// Chunks already verified in the store.
        resumed: u32,
    },
    /// Every chunk of the job is verified and stored; `Have` goes to the manager.
    JobComplete {
        /// The job.
        job: JobRef,
        /// The content.
        root: Digest,
    },
    /// The manager said `Done` for the job.
    JobDone {
        /// The job.
        job: JobRef,
        /// The content, if the job was known.
        root: Option<Digest>,
    },
    /// The manager cancelled the job.
    JobCancelled {
        /// The job.
        job: JobRef,
    },
    /// The agent gave up on the job; `Failed` goes to the manager.
    JobFailed {
        /// The job.
        job: JobRef,
        /// Why.
        reason: FailReason,
    },
    /// A source misbehaved; `PeerTrouble` goes to the manager and the source is avoided.
    PeerTrouble {
        /// The job.
        job: JobRef,
        /// The peer.
        peer: AgentId,
        /// What happened.
        trouble: Trouble,
    },
    /// Input that was ignored, for the log (stale epoch, unsolicited chunk, full queue…).
    Ignored {
        /// What and why.
        what: &'static str,
    },
    /// A trust document was accepted: manifests are judged by it from now on.
    TrustAccepted {
        /// Its version.
        version: u64,
        /// Whether it is newer than the one held (else the held one, sent again).
        newer: bool,
    },
    /// A trust document was refused (an older one, which the manager sends first, is
    /// skipped silently).
    TrustRefused {
        /// Its version (0 if it did not decode).
        version: u64,
        /// Why.
        reason: TrustError,
    },
    /// A record (trust anchor, version record, latest time) could not be read or written.
    RecordFailed {
        /// Which record and operation.
        what: &'static str,
        /// The store's error.
        error: StoreError,
    },
    /// The manager renewed this agent's certificate over the live session: the new one is
    /// in [`Agent::cert`] (peer handshakes and discovery use it from now on).
    CertRenewed {
        /// Its serial.
        serial: u64,
        /// When it expires (Unix seconds).
        not_after: u64,
    },
    /// A newer signed revocation list arrived: it is in [`Agent::revocations`]; peer
    /// sessions with agents it revokes are closed ([`Event::Close`] for each).
    Revocations {
        /// The list's version.
        version: u64,
        /// Its entries.
        entries: usize,
    },
}

/// Why an input was refused. The driver closes the connection when [`AgentError::must_close`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum AgentError {
    /// The frame is not a valid message.
    Decode(CodecError),
    /// A message this side does not expect from that connection's role.
    Unexpected(&'static str),
    /// The connection is not known to the agent.
    UnknownConn,
    /// No room for another peer connection.
    TooManyConnections,
}

impl AgentError {
    /// Whether the connection the input came from should be closed.
    pub fn must_close(&self) -> bool {
        !matches!(self, AgentError::Unexpected(_))
    }
}

impl core::fmt::Display for AgentError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AgentError::Decode(e) => write!(f, "undecodable frame: {e}"),
            AgentError::Unexpected(kind) => write!(f, "unexpected {kind} on this connection"),
            AgentError::UnknownConn => f.write_str("unknown connection"),
            AgentError::TooManyConnections => f.write_str("too many peer connections"),
        }
    }
}

impl core::error::Error for AgentError {}

/// What the agent is and how it behaves; most of it goes into its [`Report`].
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The agent's id (as enrolled at the manager).
    pub id: AgentId,
    /// Where peers reach it.
    pub listen: Option<PeerAddr>,
    /// Site, e.g. `fra-2`.
    pub site: Name,
    /// LAN segment, e.g. `fra-2/rack-4`.
    pub segment: Name,
    /// Relative performance score 1..=1000.
    pub performance: u32,
    /// Whether it serves chunks to peers.
    pub can_serve: bool,
    /// Largest chunk size it accepts.
    pub max_chunk: u32,
    /// Most peers served at once; more get `Refuse{Busy}`.
    pub max_peers: u16,
    /// How often the round-trip time to the manager is measured (`ZERO` = never).
    pub ping_interval: Duration,
    /// Most distinct sources (the manager included) the agent reports it can use for
    /// one job; capped at [`MAX_SOURCE_SLOTS`]. A device with few connection slots says so here.
    pub max_sources: u16,
    /// Chunk requests in flight per source at first (1..=[`MAX_WINDOW`]); from a source's
    /// first chunk on, its window follows the round trips its chunks take (never below this
    /// or 3, whichever is less, nor above [`MAX_WINDOW`]); twice as many (at most [`MAX_WINDOW`]) to a source whose
    /// chunks this agent relays to peers, so that its requests reach the source ahead of
    /// those of agents that only consume.
    pub window: u16,
    /// Link capacity and reliability as known.
    pub link: LinkInfo,
    /// Labels from the configuration.
    pub labels: Vec<Label, MAX_LABELS>,
    /// Pinned root keys: trust documents must be signed by `root_threshold` of them (and,
    /// after a rotation, of the roots the newest accepted document names). Empty: no
    /// manifest is accepted (`NoTrust`).
    pub roots: Vec<PublicKey, MAX_ROOT_KEYS>,
    /// How many of [`AgentConfig::roots`] must sign (1..=roots; default 1).
    pub root_threshold: u8,
    /// Which clock judges the expiry of manifests and trust documents.
    pub clock: AgentClock,
    /// The manager's key (pinned): checks revocation lists and renewed certificates; without
    /// it both are ignored.
    pub manager_key: Option<PublicKey>,
    /// Least time between two `Progress` messages.
    pub progress_interval: Duration,
    /// Pause before asking a source again after a refusal.
    pub retry_delay: Duration,
    /// A chunk request unanswered this long is given up (a peer is then avoided).
    pub request_timeout: Duration,
    /// How long a parked request waits for its chunk before `Refuse{NotYet}`.
    pub park_timeout: Duration,
}

impl AgentConfig {
    /// A configuration with sensible defaults for agent `id`.
    pub fn new(id: AgentId) -> Self {
        AgentConfig {
            id,
            listen: None,
            site: Name::new(),
            segment: Name::new(),
            performance: 100,
            can_serve: true,
            max_chunk: baton_protocol::MAX_CHUNK_SIZE,
            max_peers: 8,
            max_sources: MAX_SOURCE_SLOTS as u16,
            ping_interval: Duration::from_secs(10),
            window: 8,
            link: LinkInfo::default(),
            labels: Vec::new(),
            roots: Vec::new(),
            root_threshold: 1,
            clock: AgentClock::ManagerMonotonic,
            manager_key: None,
            progress_interval: Duration::from_millis(250),
            retry_delay: Duration::from_millis(100),
            request_timeout: Duration::from_secs(30),
            park_timeout: Duration::from_secs(5),
        }
    }
}

/// The clock an agent judges expiry with.
///
/// A manifest or trust document past its `expires` is refused (freeze protection): an
/// attacker who can only replay old signed material cannot hold an agent on it forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AgentClock {
    /// The driver supplies the system's wall clock ([`Agent::set_system_time`]); the Linux agent.
    System,
    /// The manager's time from `Welcome`, but never earlier than the latest time seen
    /// (persisted by the store at most once per [`LATEST_TIME_EVERY_SECS`] of progress); for
    /// devices without a trustworthy clock. Limit: a manager can hold such a device at the
    /// latest time it has seen (it cannot move it back), and a manager whose clock runs
    /// ahead moves it forward for good.
    ManagerMonotonic,
}

/// Digest of pinned root keys and threshold: an anchor persisted under other pinned roots
/// is not used (re-provisioning with another root starts over from the new pin).
pub fn pin_digest(roots: &[PublicKey], threshold: u8) -> Digest {
    let mut h = sha2::Sha256::new();
    h.update(b"baton pin v1\0");
    h.update([threshold]);
    for r in roots {
        h.update(r.0);
    }
    h.finalize().into()
}

/// Counters for one job, for status pages and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct JobStats {
    /// Chunks in the content.
    pub chunks: u32,
    /// Chunks verified and stored (resumed + fetched).
    pub verified: u32,
    /// Chunks found verified in the store when the job started.
    pub resumed: u32,
    /// Chunks fetched, verified and stored by this job.
    pub fetched: u32,
    /// Chunks that failed verification.
    pub bad_chunks: u32,
    /// Verified chunk bytes received.
    pub bytes_received: u64,
    /// Chunk bytes served to others from this content.
    pub bytes_served: u64,
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum JobState {
    /// Fetching chunks.
    Fetching,
    /// Every chunk verified; serving until `Done`.
    Complete,
    /// Given up.
    Failed(FailReason),
}

/// A snapshot of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus<'a> {
    /// The job and its current epoch.
    pub job: JobRef,
    /// Its manifest.
    pub manifest: &'a Manifest,
    /// Where it stands.
    pub state: JobState,
    /// Its counters.
    pub stats: JobStats,
}

/// Why a source is no longer asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Avoid {
    /// Sent a bad chunk: never again for this job.
    Bad,
    /// Unreachable or refusing: again only if the manager names it anew.
    Trouble,
}

#[derive(Clone, Debug)]
struct SourceSlot {
    /// `None` for the manager.
    peer: Option<(AgentId, PeerAddr, PublicKey)>,
    avoided: Option<Avoid>,
    in_flight: Vec<(u32, Duration), MAX_WINDOW>,
    paused_until: Option<Duration>,
    refusals: u16,
    /// Since when it has refused `NotYet` without sending a chunk.
    not_yet_since: Option<Duration>,
    disconnects: u8,
    received_delta: u64,
    /// Peers ask this agent for chunks of this source's ranges: it relays them, so it asks
    /// its source further ahead (twice the window).
    relayed: bool,
    /// Requests kept in flight to it (see [`SourceSlot::pace_window`]); `0` until its first
    /// chunk (the configured window applies).
    window: u8,
    /// The shortest time a chunk took from request to arrival.
    rtt_min: Option<Duration>,
    /// When `window` last moved.
    window_moved: Duration,
}

impl SourceSlot {
    fn new(peer: Option<(AgentId, PeerAddr, PublicKey)>) -> Self {
        SourceSlot {
            peer,
            avoided: None,
            in_flight: Vec::new(),
            paused_until: None,
            refusals: 0,
            not_yet_since: None,
            disconnects: 0,
            received_delta: 0,
            relayed: false,
            window: 0,
            rtt_min: None,
            window_moved: Duration::ZERO,
        }
    }

    /// Requests to keep in flight to this source (`configured` until it has delivered).
    fn window(&self, configured: u16) -> usize {
        let configured = (configured as usize).clamp(1, MAX_WINDOW);
        if self.window == 0 {
            configured
        } else {
            (self.window as usize).clamp(configured.min(MIN_PACED_WINDOW), MAX_WINDOW)
        }
    }

    /// Moves the window after a chunk that took `took` from request to arrival: the chunks
    /// queued at the source ahead of it are about `window · (1 − rtt_min / took)`; under half
    /// a chunk, the link to the source has room (one more request in flight), over one and a
    /// half, requests only wait there (one fewer), at most one step per shortest round trip.
    /// Fast, distant sources get deep windows; slow ones do not pile requests up behind their
    /// link (a source serving eight fetchers then queues about eight chunks, not dozens: on a
    /// slow link, seconds of queue delay new connections' handshakes and ARP past their
    /// timeouts).
    fn pace_window(&mut self, configured: u16, now: Duration, took: Duration) {
        let min = *self
            .rtt_min
            .insert(self.rtt_min.map_or(took, |m| m.min(took)));
        let w = self.window(configured);
        self.window = w as u8;
        if now < self.window_moved + min || took.is_zero() {
            return;
        }
        let queued_x100 = (w as u128 * 100 * (took - min).as_micros()) / took.as_micros();
        if queued_x100 < 50 && w < MAX_WINDOW {
            self.window += 1;
            self.window_moved = now;
        } else if queued_x100 > 150 && w > (configured as usize).min(MIN_PACED_WINDOW) {
            self.window -= 1;
            self.window_moved = now;
        }
    }

    fn id(&self) -> Option<&AgentId> {
        self.peer.as_ref().map(|p| &p.0)
    }
}

#[derive(Clone, Copy, Debug)]
struct Range {
    slot: u8,
    first: u32,
    end: u32,
    cursor: u32,
}

/// Paces one job's chunk requests: a token bucket of bytes over the driver's `now`.
///
/// A request is allowed when the bucket holds a whole chunk (`chunk_size`
/// bytes) and takes its chunk's length. The bucket refills at `rate` bytes
/// per second up to `burst` (a tenth of a second's worth, at least one
/// chunk), so over any time `T` at most `burst + rate · T` bytes are requested.
#[derive(Clone, Copy, Debug)]
struct Pace {
    rate: u64,
    /// What one request needs in the bucket: the job's chunk size.
    cost: i64,
    tokens: i64,
    burst: i64,
    /// Refill time so far, and the sub-byte remainder (in byte-microseconds).
    at: Duration,
    remainder: u64,
}

/// Rates above this (1 TiB/s) are paced as this: no link is faster, and the
/// bucket arithmetic then stays within `u64` (no 128-bit division on a Cortex-M3).
const MAX_PACED_RATE: u64 = 1 << 40;

/// Whole microseconds in `d`, saturating.
fn micros_u64(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()))
}

impl Pace {
    fn new(rate: u64, chunk_size: u32, now: Duration) -> Pace {
        let rate = rate.min(MAX_PACED_RATE);
        let burst = i64::try_from((rate / 10).max(u64::from(chunk_size))).unwrap_or(i64::MAX);
        Pace {
            rate,
            cost: i64::from(chunk_size),
            tokens: i64::from(chunk_size),
            burst,
            at: now,
            remainder: 0,
        }
    }

    fn refill(&mut self, now: Duration) {
        let Some(dt) = now.checked_sub(self.at) else {
            return;
        };
        // Overflow needs over 2^64 byte-microseconds: far more than a full bucket.
        match self
            .rate
            .checked_mul(micros_u64(dt))
            .and_then(|v| v.checked_add(self.remainder))
        {
            Some(total) => {
                let add = i64::try_from(total / 1_000_000).unwrap_or(i64::MAX);
                self.remainder = total % 1_000_000;
                self.tokens = self.tokens.saturating_add(add).min(self.burst);
            }
            None => self.tokens = self.burst,
        }
        if self.tokens == self.burst {
            self.remainder = 0;
        }
        self.at = now;
    }

    fn allows(&self) -> bool {
        self.tokens >= self.cost
    }

    fn take(&mut self, bytes: u32) {
        self.tokens = self.tokens.saturating_sub(i64::from(bytes));
    }

    /// When the bucket holds a whole chunk again.
    fn ready_at(&self) -> Duration {
        if self.allows() {
            return self.at;
        }
        let owed = self.cost.abs_diff(self.tokens).saturating_mul(1_000_000);
        let wait_us = owed.saturating_sub(self.remainder).div_ceil(self.rate);
        self.at + Duration::from_micros(wait_us)
    }
}

#[derive(Clone, Debug)]
struct Job {
    job: JobRef,
    /// The manager's rate cap for this job, if any.
    pace: Option<Pace>,
    manifest: Manifest,
    state: JobState,
    /// `ranges[0]` is the manager's default range over the whole content.
    ranges: Vec<Range, MAX_RANGES>,
    /// `sources[0]` is the manager.
    sources: Vec<SourceSlot, MAX_SOURCE_SLOTS>,
    stats: JobStats,
    progress_due: bool,
    last_progress: Option<Duration>,
    have_due: bool,
    next_due: bool,
    failed_due: bool,
}

impl Job {
    fn root(&self) -> &Digest {
        &self.manifest.root
    }

    fn chunks(&self) -> u32 {
        self.stats.chunks
    }

    /// The range whose source fetches chunk `i` now.
    fn owner(&self, i: u32) -> usize {
        for (r, range) in self.ranges.iter().enumerate().rev() {
            if range.first <= i
                && i < range.end
                && self.sources[range.slot as usize].avoided.is_none()
            {
                return r;
            }
        }
        0
    }

    fn in_flight_anywhere(&self, i: u32) -> bool {
        self.sources
            .iter()
            .any(|s| s.in_flight.iter().any(|&(c, _)| c == i))
    }

    /// Makes chunk `i` eligible again for every range covering it.
    fn rewind(&mut self, i: u32) {
        for r in self.ranges.iter_mut() {
            if r.first <= i && i < r.end && r.cursor > i {
                r.cursor = i;
            }
        }
    }

    fn rewind_all(&mut self) {
        for r in self.ranges.iter_mut() {
            r.cursor = r.first;
        }
    }

    /// Takes chunks `first..end` out of every named range (not the manager's default one):
    /// ranges inside are removed, overlapping ones trimmed, one straddling both ends split
    /// (if the table has room; else it keeps its right part, which the caller's new range
    /// then shadows as a later range).
    fn clear_ranges(&mut self, first: u32, end: u32) {
        let mut r = 1;
        while r < self.ranges.len() {
            let range = self.ranges[r];
            if range.end <= first || end <= range.first {
                r += 1;
            } else if first <= range.first && range.end <= end {
                self.ranges.remove(r);
            } else if range.first < first && end < range.end {
                self.ranges[r].end = first;
                let right = Range {
                    slot: range.slot,
                    first: end,
                    end: range.end,
                    cursor: end,
                };
                if self.ranges.push(right).is_err() {
                    self.ranges[r].end = range.end;
                }
                r += 1;
            } else if range.first < first {
                self.ranges[r].end = first;
                r += 1;
            } else {
                self.ranges[r].first = end;
                r += 1;
            }
        }
    }

    fn set_default_range(&mut self) {
        self.ranges.clear();
        let _ = self.ranges.push(Range {
            slot: 0,
            first: 0,
            end: self.chunks(),
            cursor: 0,
        });
    }
}

#[derive(Clone, Debug)]
struct Peer {
    id: AgentId,
    conn: Option<ConnId>,
    direction: Direction,
}

#[derive(Clone, Copy, Debug)]
enum Reply {
    Chunk {
        conn: ConnId,
        root: Digest,
        index: u32,
    },
    Refuse {
        conn: ConnId,
        root: Digest,
        index: u32,
        reason: Refusal,
    },
    Pong {
        conn: ConnId,
        nonce: u64,
    },
}

#[derive(Clone, Debug)]
enum ToManager {
    Failed(JobRef, FailReason),
    Trouble(JobRef, AgentId, Trouble),
}

#[derive(Clone, Copy, Debug)]
struct Parked {
    conn: ConnId,
    root: Digest,
    index: u32,
    until: Duration,
}

#[derive(Clone, Debug)]
struct Welcome {
    cert: AgentCert,
    unix_time: u64,
    at: Duration,
}

/// What the agent trusts: the anchor (from the pinned roots, or persisted) and the
/// document accepted under it.
#[derive(Clone, Debug)]
struct Trust {
    /// `None` without (valid) pinned roots: nothing is trusted.
    anchor: Option<TrustAnchor>,
    /// [`pin_digest`] of the configured roots.
    pin: Digest,
    /// The accepted document (decoded once), if `has_document` (not an `Option`: a document
    /// is swapped in place, never moved through the stack).
    document: TrustDocument,
    /// Whether the manager sent the document the anchor stands for.
    has_document: bool,
}

/// The agent's notion of Unix time (see [`AgentClock`]).
#[derive(Clone, Copy, Debug, Default)]
struct Clock {
    /// The system time at a driver time (`System`), or the base of the monotonic manager
    /// time at the last `Welcome` (`ManagerMonotonic`).
    base: Option<(u64, Duration)>,
    /// `ManagerMonotonic`: the latest time seen before the current base (persisted or earlier sessions).
    floor: u64,
    /// `ManagerMonotonic`: the latest time written to the store.
    persisted: Option<u64>,
}

/// The agent state machine over a content store `S`, with room for `JOBS`
/// concurrent jobs, `PEERS` peer connections and `PARKED` parked peer requests (see the
/// module docs).
pub struct Agent<
    S: ContentStore,
    const JOBS: usize = 2,
    const PEERS: usize = 8,
    const PARKED: usize = MAX_PARKED,
> {
    store: S,
    config: AgentConfig,
    manager_up: bool,
    report_due: bool,
    welcome: Option<Welcome>,
    jobs: Vec<Job, JOBS>,
    fences: Deque<JobRef, FENCES>,
    peers: Vec<Peer, PEERS>,
    serving: Vec<ConnId, PEERS>,
    parked: Vec<Parked, PARKED>,
    /// Something parked requests wait on may have changed (a chunk verified, a job ended,
    /// time passed): `parked` is scanned again only then.
    parked_dirty: bool,
    replies: Deque<Reply, REPLY_QUEUE>,
    to_manager: Deque<ToManager, MANAGER_QUEUE>,
    events: Deque<Event, EVENT_QUEUE>,
    served_other: u64,
    /// Round-trip measurement to the manager.
    rtt: RttProbe,
    /// Round-trip times to segment peers, nearest first (from the driver's segment machine).
    peer_delays: Vec<Delay, PEER_DELAYS>,
    /// Rate caps by job id, from `Throttle`.
    throttles: Vec<(u64, u64), THROTTLES>,
    /// The trust anchor and document.
    trust: Trust,
    /// Unix time for expiry.
    clock: Clock,
    /// The newest signed revocation list from the manager.
    revocations: Option<RevocationList>,
}

/// Measures the round-trip time to the manager with `Ping`/`Pong` (claim 9's delays).
#[derive(Clone, Copy, Debug, Default)]
struct RttProbe {
    /// When the next ping is due.
    next: Duration,
    /// Whether a ping should go out with the next transmit.
    due: bool,
    /// The nonce of the ping in flight: the driver time it was sent, in microseconds.
    in_flight: Option<u64>,
    /// The latest measurement, in microseconds.
    rtt_us: Option<u32>,
}

impl<S: ContentStore, const JOBS: usize, const PEERS: usize, const PARKED: usize> core::fmt::Debug
    for Agent<S, JOBS, PEERS, PARKED>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.config.id)
            .field("manager_up", &self.manager_up)
            .field("jobs", &self.jobs.len())
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

/// postcard's length of a varint for `v`.
fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// The fields of [`Message::Chunk`] before its data, encoded the same way.
#[derive(Serialize)]
struct ChunkHead<'a> {
    root: &'a Digest,
    index: u32,
    proof: &'a Proof,
}

/// postcard variant index of [`Message::Chunk`].
const CHUNK_VARIANT: u8 = 12;

/// Whether a content name is safe to use in a file name: no `/`, `\`, `..` or control
/// characters (a name is signed by a publisher, whose name pattern may end in `*`; a name
/// like `app-/../../etc/x` must not reach a path an agent builds from it).
pub fn content_name_is_safe(name: &str) -> bool {
    !name.is_empty()
        && !name.contains("..")
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
}

fn fail_reason(e: ManifestError) -> FailReason {
    match e {
        ManifestError::ChunkTooLarge => FailReason::ChunkTooLarge,
        ManifestError::UntrustedSigner | ManifestError::BadSignature => FailReason::BadSignature,
        ManifestError::Expired => FailReason::Expired,
        ManifestError::Downgrade => FailReason::Downgrade,
        ManifestError::NotListed => FailReason::NotListed,
        ManifestError::VersionReused => FailReason::VersionReused,
        ManifestError::NoTrust => FailReason::NoTrust,
        _ => FailReason::BadManifest,
    }
}

fn store_fail(e: StoreError) -> FailReason {
    match e {
        StoreError::Full => FailReason::StorageFull,
        _ => FailReason::StorageError,
    }
}

fn min_opt(a: Option<Duration>, b: Duration) -> Option<Duration> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Decodes one message, out of line: serde's decoding of the whole enum keeps temporaries
/// for every variant, several KB on a device, and inlined into the frame handler they
/// stayed on the stack under every message's handling (a manifest's signature check
/// included). Only the variants an agent takes are decoded ([`crate::inbound`]); the others
/// are `Unexpected` by their index.
#[inline(never)]
fn decode_message(plaintext: &[u8]) -> Result<Inbound<'_>, AgentError> {
    inbound::decode(plaintext).map_err(|e| match e {
        InboundError::NotForAgents(kind) => AgentError::Unexpected(kind),
        InboundError::Codec(c) => AgentError::Decode(c),
    })
}

/// Writes a name's version record, out of line: a flash store's record log inlined into
/// `Agent::on_fetch` made its frame 6 KB, live under the manifest's signature check.
#[inline(never)]
fn save_version_record<S: ContentStore>(
    store: &mut S,
    name: &str,
    record: &VersionRecord,
) -> Result<(), StoreError> {
    store.put_version_record(name, record)
}

/// Removes the job at `pos`, dropping it in place: a `Job` is several KB, and `swap_remove`
/// returns it as a value, which put a copy in the frames of `on_fetch` and `on_done` (6 KB
/// each on a device, `on_fetch`'s live under the manifest's signature check).
fn remove_job<const N: usize>(jobs: &mut Vec<Job, N>, pos: usize) {
    let mut at = 0;
    jobs.retain(|_| {
        at += 1;
        at - 1 != pos
    });
}

/// The highest serial `list` revokes for `id`, if it names it.
fn revoked_up_to(list: Option<&RevocationList>, id: &AgentId) -> Option<u64> {
    list?
        .entries
        .iter()
        .find(|e| e.id == *id)
        .map(|e| e.up_to_serial)
}

impl<S: ContentStore, const JOBS: usize, const PEERS: usize, const PARKED: usize>
    Agent<S, JOBS, PEERS, PARKED>
{
    /// An agent over `store` (already mounted: what it holds is resumed and served), with
    /// its persisted records (trust anchor, latest time) loaded.
    pub fn new(config: AgentConfig, store: S) -> Self {
        let mut agent = Self::without_records(config, store);
        agent.load_records();
        agent
    }

    /// An agent over `store` whose persisted records are not loaded yet: it refuses every
    /// manifest (`NoTrust`) until [`Agent::load_records`] runs. For a device that places the
    /// agent in static memory first: loading the records while the whole agent is still a
    /// value on the stack would need room for both. Inlined, so a caller writing the result
    /// into static memory builds it there rather than on the stack.
    #[inline(always)]
    pub fn without_records(config: AgentConfig, store: S) -> Self {
        let pin = pin_digest(&config.roots, config.root_threshold);
        Agent {
            trust: Trust {
                anchor: None,
                pin,
                document: crate::trust_wire::empty().document,
                has_document: false,
            },
            clock: Clock::default(),
            store,
            config,
            manager_up: false,
            report_due: false,
            rtt: RttProbe::default(),
            welcome: None,
            jobs: Vec::new(),
            fences: Deque::new(),
            peers: Vec::new(),
            serving: Vec::new(),
            parked: Vec::new(),
            parked_dirty: false,
            replies: Deque::new(),
            to_manager: Deque::new(),
            events: Deque::new(),
            served_other: 0,
            peer_delays: Vec::new(),
            throttles: Vec::new(),
            revocations: None,
        }
    }

    /// Picks up the persisted trust anchor (if made under the same pinned roots) and the
    /// latest time seen ([`Agent::new`] does this; see [`Agent::without_records`]).
    pub fn load_records(&mut self) {
        if self.config.roots.is_empty() {
            self.ignored("no root key configured: every manifest is refused");
        } else {
            match TrustAnchor::pinned(&self.config.roots, self.config.root_threshold) {
                Ok(pinned) => self.trust.anchor = Some(pinned),
                Err(_) => self.ignored("root threshold out of range: every manifest is refused"),
            }
        }
        if self.trust.anchor.is_some() {
            match self.store.load_anchor() {
                Ok(Some(stored)) if stored.pin == self.trust.pin => {
                    self.trust.anchor = Some(stored.anchor);
                }
                Ok(Some(_)) => self.ignored("persisted trust anchor is for other root keys"),
                Ok(None) => {}
                // Fail closed: falling back to the pinned roots would let an older,
                // unexpired document (with a publisher removed since) be taken again.
                Err(error) => {
                    self.trust.anchor = None;
                    self.event(Event::RecordFailed {
                        what: "load trust anchor (every manifest is refused)",
                        error,
                    });
                }
            }
        }
        if self.config.clock == AgentClock::ManagerMonotonic {
            match self.store.load_latest_time() {
                Ok(t) => {
                    self.clock.floor = t.unwrap_or(0);
                    self.clock.persisted = t;
                }
                Err(error) => self.event(Event::RecordFailed {
                    what: "load latest time",
                    error,
                }),
            }
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably (e.g. to export completed content).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// The manager's certificate for this agent, once welcomed (shown to peers in handshakes).
    pub fn cert(&self) -> Option<&AgentCert> {
        self.welcome.as_ref().map(|w| &w.cert)
    }

    /// The newest signed revocation list from the manager, if one arrived.
    pub fn revocations(&self) -> Option<&RevocationList> {
        self.revocations.as_ref()
    }

    /// Whether a peer's certificate (already checked as the manager's, the key proven) may
    /// be used now ([`revocation::peer_cert_acceptable`] with the list held and the
    /// manager's clock as learnt from `Welcome`): for drivers that check peers beside the
    /// agent, like the firmware.
    pub fn peer_cert_acceptable(
        &self,
        cert: &AgentCert,
        now: Duration,
    ) -> Result<(), revocation::CertRefusal> {
        revocation::peer_cert_acceptable(cert, self.revocations.as_ref(), self.unix_time(now))
    }

    /// The Unix time (seconds) expiry is judged by, per [`AgentConfig::clock`]; `None` while
    /// unknown (no system time given, or no `Welcome` and nothing persisted).
    pub fn unix_time(&self, now: Duration) -> Option<u64> {
        let at_base = self
            .clock
            .base
            .map(|(unix, at)| unix.saturating_add(now.saturating_sub(at).as_secs()));
        match self.config.clock {
            AgentClock::System => at_base,
            AgentClock::ManagerMonotonic => match (at_base, self.clock.floor) {
                (Some(t), floor) => Some(t.max(floor)),
                (None, 0) => None,
                (None, floor) => Some(floor),
            },
        }
    }

    /// The system's wall clock (Unix seconds) at driver time `now`, for
    /// [`AgentClock::System`]; the driver calls it before its inputs (cheap), so a clock
    /// set by NTP after the start is followed.
    pub fn set_system_time(&mut self, now: Duration, unix: u64) {
        if self.config.clock == AgentClock::System {
            self.clock.base = Some((unix, now));
        }
    }

    /// The trust document accepted, if any.
    pub fn trust_document(&self) -> Option<&TrustDocument> {
        self.trust.has_document.then_some(&self.trust.document)
    }

    /// The trust anchor held (`None` without pinned roots).
    pub fn trust_anchor(&self) -> Option<&TrustAnchor> {
        self.trust.anchor.as_ref()
    }

    /// The manager's time starts a new base of the monotonic clock, never below the time
    /// seen so far; the latest time is persisted when due.
    fn on_manager_time(&mut self, now: Duration, manager_unix: u64) {
        if self.config.clock != AgentClock::ManagerMonotonic {
            return;
        }
        let seen = self.unix_time(now).unwrap_or(0);
        self.clock.floor = seen;
        self.clock.base = Some((manager_unix.max(seen), now));
        self.keep_clock(now);
    }

    /// Persists the latest time seen once it moved on by [`LATEST_TIME_EVERY_SECS`].
    fn keep_clock(&mut self, now: Duration) {
        if self.config.clock != AgentClock::ManagerMonotonic {
            return;
        }
        let Some(t) = self.unix_time(now) else { return };
        if self
            .clock
            .persisted
            .is_some_and(|p| t < p.saturating_add(LATEST_TIME_EVERY_SECS))
        {
            return;
        }
        // Recorded even on failure: the next attempt is an hour on, not at every input.
        self.clock.persisted = Some(t);
        if let Err(error) = self.store.save_latest_time(t) {
            self.event(Event::RecordFailed {
                what: "save latest time",
                error,
            });
        }
    }

    /// The manager's Unix time now in milliseconds, as learnt from `Welcome` (its
    /// `unix_time` plus the monotonic time elapsed since); discovery datagrams carry it.
    pub fn manager_unix_ms(&self, now: Duration) -> Option<u64> {
        self.welcome.as_ref().map(|w| {
            let elapsed = u64::try_from(now.saturating_sub(w.at).as_millis()).unwrap_or(u64::MAX);
            w.unix_time.saturating_mul(1000).saturating_add(elapsed)
        })
    }

    /// Whether the manager session is up.
    pub fn manager_connected(&self) -> bool {
        self.manager_up
    }

    /// Snapshots of the current jobs.
    pub fn jobs(&self) -> impl Iterator<Item = JobStatus<'_>> {
        self.jobs.iter().map(|j| JobStatus {
            job: j.job,
            manifest: &j.manifest,
            state: j.state,
            stats: j.stats,
        })
    }

    /// The counters of job `id`, if current.
    pub fn job_stats(&self, id: u64) -> Option<JobStats> {
        self.jobs.iter().find(|j| j.job.id == id).map(|j| j.stats)
    }

    /// Chunk bytes served from content no current job covers.
    pub fn bytes_served_other(&self) -> u64 {
        self.served_other
    }

    /// Changes the address reported to the manager (e.g. once the listener is bound).
    pub fn set_listen(&mut self, listen: Option<PeerAddr>) {
        if self.config.listen != listen {
            self.config.listen = listen;
            self.report_due = self.manager_up;
        }
    }

    /// Changes the link information reported to the manager.
    pub fn set_link(&mut self, link: LinkInfo) {
        self.config.link = link;
        self.report_due = self.manager_up;
    }

    /// The measured round-trip time to the manager, in microseconds.
    pub fn manager_rtt_us(&self) -> Option<u32> {
        self.rtt.rtt_us
    }

    /// What this agent says of itself on its segment (the score's inputs, see [`crate::segment`]).
    pub fn capabilities(&self) -> crate::segment::Capabilities {
        crate::segment::Capabilities {
            listen: self.config.listen,
            performance: self.config.performance,
            free_storage: self.store.free_bytes(),
            can_serve: self.config.can_serve,
            link: self.config.link,
            manager_rtt_us: self.rtt.rtt_us,
        }
    }

    /// Sets the round-trip times to segment peers (nearest first) for the report.
    ///
    /// The report is sent again only when the set of peers changes or a delay moves by
    /// more than a quarter and more than [`PEER_DELAY_NOISE_US`]: every report makes the
    /// manager re-place the agent in running plans, so LAN jitter must not trigger one.
    pub fn set_peer_delays(&mut self, delays: &[Delay]) {
        let delays = &delays[..delays.len().min(PEER_DELAYS)];
        let moved = |new: &Delay| {
            self.peer_delays
                .iter()
                .find(|old| old.to == new.to)
                .is_none_or(|old| {
                    let diff = new.rtt_us.abs_diff(old.rtt_us);
                    diff > old.rtt_us / 4 && diff > PEER_DELAY_NOISE_US
                })
        };
        // Kept as of the last significant change, so a slow drift is caught too.
        if delays.len() != self.peer_delays.len() || delays.iter().any(moved) {
            self.peer_delays.clear();
            let _ = self.peer_delays.extend_from_slice(delays);
            self.report_due |= self.manager_up;
        }
    }

    /// The rate cap in force for job `id` (bytes per second), if any.
    pub fn throttle(&self, id: u64) -> Option<u64> {
        self.throttles.iter().find(|t| t.0 == id).map(|t| t.1)
    }

    fn event(&mut self, e: Event) {
        if self.events.push_back(e).is_err() {
            // The driver drains events after every input; losing the oldest is the least harm.
            self.events.pop_front();
            let _ = self.events.push_back(Event::Ignored {
                what: "event queue overflow",
            });
        }
    }

    fn ignored(&mut self, what: &'static str) {
        self.event(Event::Ignored { what });
    }

    // ---------------------------------------------------------------- inputs

    /// The manager session is up (handshake done): the agent sends its `Report`.
    pub fn handle_manager_connected(&mut self, now: Duration) {
        self.manager_up = true;
        self.report_due = true;
        // Measure the delay to the manager right away, then every `ping_interval`.
        self.rtt.in_flight = None;
        self.rtt.due = !self.config.ping_interval.is_zero();
        self.rtt.next = now + self.config.ping_interval;
        for job in self.jobs.iter_mut() {
            job.progress_due = job.state == JobState::Fetching;
            if job.state == JobState::Complete {
                job.have_due = true;
                job.next_due = true;
            }
        }
        self.maintain(now);
    }

    /// A peer connection is up and authenticated.
    pub fn handle_connected(
        &mut self,
        now: Duration,
        conn: ConnId,
        peer: PeerInfo,
    ) -> Result<(), AgentError> {
        if conn == ConnId::MANAGER {
            return Err(AgentError::UnknownConn);
        }
        if let Some(p) = self
            .peers
            .iter_mut()
            .find(|p| p.id == peer.id && p.conn.is_none() && peer.direction == Direction::Outgoing)
        {
            p.conn = Some(conn);
        } else {
            self.peers
                .push(Peer {
                    id: peer.id,
                    conn: Some(conn),
                    direction: peer.direction,
                })
                .map_err(|_| AgentError::TooManyConnections)?;
        }
        self.maintain(now);
        Ok(())
    }

    /// A connection closed (or failed). For the manager, requests to it are re-issued after reconnecting.
    pub fn handle_disconnected(&mut self, now: Duration, conn: ConnId) {
        if conn == ConnId::MANAGER {
            self.manager_up = false;
            self.report_due = false;
            for job in self.jobs.iter_mut() {
                let in_flight = core::mem::take(&mut job.sources[0].in_flight);
                for (i, _) in in_flight {
                    job.rewind(i);
                }
            }
        } else {
            let Some(pos) = self.peers.iter().position(|p| p.conn == Some(conn)) else {
                return;
            };
            let peer = self.peers.swap_remove(pos);
            self.serving.retain(|c| *c != conn);
            self.parked.retain(|p| p.conn != conn);
            self.drop_replies_to(conn);
            let mut trouble: Vec<(JobRef, AgentId), JOBS> = Vec::new();
            for job in self.jobs.iter_mut() {
                let mut rewind: Vec<u32, MAX_WINDOW> = Vec::new();
                for slot in job.sources.iter_mut() {
                    if slot.id() == Some(&peer.id) && slot.avoided.is_none() {
                        let had_work = !slot.in_flight.is_empty();
                        for (i, _) in core::mem::take(&mut slot.in_flight) {
                            let _ = rewind.push(i);
                        }
                        if had_work {
                            slot.disconnects += 1;
                            if slot.disconnects >= MAX_DISCONNECTS {
                                slot.avoided = Some(Avoid::Trouble);
                                let _ = trouble.push((job.job, peer.id.clone()));
                            }
                        }
                    }
                }
                for i in rewind {
                    job.rewind(i);
                }
            }
            for (job, peer) in trouble {
                self.report_trouble(job, peer, Trouble::Unreachable);
            }
        }
        self.maintain(now);
    }

    /// Connecting to `peer` (after [`Event::Connect`]) failed: the peer is reported unreachable.
    pub fn handle_connect_failed(&mut self, now: Duration, peer: &AgentId) {
        self.peers.retain(|p| !(p.id == *peer && p.conn.is_none()));
        let mut trouble: Vec<JobRef, JOBS> = Vec::new();
        for job in self.jobs.iter_mut() {
            let mut hit = false;
            for slot in job.sources.iter_mut() {
                if slot.id() == Some(peer) && slot.avoided.is_none() {
                    slot.avoided = Some(Avoid::Trouble);
                    hit = true;
                }
            }
            if hit {
                job.rewind_all();
                let _ = trouble.push(job.job);
            }
        }
        for job in trouble {
            self.report_trouble(job, peer.clone(), Trouble::Unreachable);
        }
        self.maintain(now);
    }

    /// Time passed: requests past their timeout are given up.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.parked_dirty = true;
        if self.manager_up && !self.config.ping_interval.is_zero() && now >= self.rtt.next {
            self.rtt.due = true;
            self.rtt.next = now + self.config.ping_interval;
        }
        let timeout = self.config.request_timeout;
        let mut trouble: Vec<(JobRef, AgentId), 8> = Vec::new();
        for job in self.jobs.iter_mut() {
            let mut rewind: Vec<u32, 32> = Vec::new();
            let mut any_avoided = false;
            for slot in job.sources.iter_mut() {
                if slot.paused_until.is_some_and(|p| now >= p) {
                    slot.paused_until = None;
                }
                let expired = slot
                    .in_flight
                    .iter()
                    .any(|&(_, at)| now.saturating_sub(at) >= timeout);
                if !expired {
                    continue;
                }
                for (i, _) in core::mem::take(&mut slot.in_flight) {
                    let _ = rewind.push(i);
                }
                if let Some((id, ..)) = &slot.peer {
                    slot.avoided = Some(Avoid::Trouble);
                    any_avoided = true;
                    let _ = trouble.push((job.job, id.clone()));
                }
            }
            for i in rewind {
                job.rewind(i);
            }
            if any_avoided {
                job.rewind_all();
            }
        }
        for (job, peer) in trouble {
            self.report_trouble(job, peer, Trouble::Unreachable);
        }
        self.keep_clock(now);
        self.maintain(now);
    }

    /// One decrypted frame from connection `conn`.
    ///
    /// A decode error means only that connection is closed; see [`AgentError::must_close`].
    ///
    /// Trust documents and revocation lists take a path of their own: checking them verifies
    /// signatures, the deepest stack the agent has, and on the general path that stack came
    /// on top of the frame holding a decoded [`Message`] (on a device: 9.9 + 10 KB, past its
    /// 21 KB stack).
    pub fn handle_frame(
        &mut self,
        now: Duration,
        conn: ConnId,
        plaintext: &[u8],
    ) -> Result<(), AgentError> {
        if let Some(result) = self.handle_signed_document(conn, plaintext) {
            return result;
        }
        self.handle_message(now, conn, plaintext)
    }

    /// Handles a manager's `Trust` or `Revocations` frame without decoding a whole
    /// [`Message`]; `None` for any other frame (or one that does not decode as these), which
    /// [`Agent::handle_message`] then takes (and refuses, if it must).
    #[inline(never)]
    fn handle_signed_document(
        &mut self,
        conn: ConnId,
        plaintext: &[u8],
    ) -> Option<Result<(), AgentError>> {
        // Variant indices 19 and 20 are one varint byte each; the field is a byte string.
        let (&variant, rest) = plaintext.split_first()?;
        if !matches!(variant, 19 | 20) || conn != ConnId::MANAGER {
            return None;
        }
        let (bytes, tail) = postcard::take_from_bytes::<&[u8]>(rest).ok()?;
        if !tail.is_empty() {
            return None;
        }
        if variant == 19 {
            self.on_trust(bytes);
        } else {
            self.on_revocations(bytes);
        }
        Some(Ok(()))
    }

    /// Any frame but the manager's signed documents (see [`Agent::handle_frame`]).
    #[inline(never)]
    fn handle_message(
        &mut self,
        now: Duration,
        conn: ConnId,
        plaintext: &[u8],
    ) -> Result<(), AgentError> {
        let from_manager = conn == ConnId::MANAGER;
        if !from_manager && !self.peers.iter().any(|p| p.conn == Some(conn)) {
            return Err(AgentError::UnknownConn);
        }
        let msg = decode_message(plaintext)?;
        let result = match msg {
            // `publishers` stays on the wire for older agents; it is trusted no more.
            Inbound::Welcome {
                cert, unix_time, ..
            } if from_manager => {
                self.on_manager_time(now, unix_time);
                self.welcome = Some(Welcome {
                    cert,
                    unix_time,
                    at: now,
                });
                self.event(Event::Welcomed);
                Ok(())
            }
            Inbound::Trust { document } if from_manager => {
                self.on_trust(document);
                Ok(())
            }
            Inbound::Revocations { list } if from_manager => {
                self.on_revocations(list);
                Ok(())
            }
            Inbound::CertRenewed { cert } if from_manager => {
                self.on_cert_renewed(cert);
                Ok(())
            }
            Inbound::Fetch {
                job,
                manifest,
                sources,
                next: _,
            } if from_manager => {
                self.on_fetch(now, job, manifest, &sources);
                Ok(())
            }
            Inbound::Sources { job, sources } if from_manager => {
                self.on_sources(job, &sources, false);
                Ok(())
            }
            Inbound::Done { job } if from_manager => {
                self.on_done(job, false);
                Ok(())
            }
            Inbound::Cancel { job } if from_manager => {
                self.on_done(job, true);
                Ok(())
            }
            Inbound::Throttle {
                job,
                max_bytes_per_second,
            } if from_manager => {
                self.on_throttle(now, job, max_bytes_per_second);
                Ok(())
            }
            Inbound::ChunkRequest { root, index } => {
                self.on_chunk_request(now, conn, root, index);
                Ok(())
            }
            Inbound::Chunk {
                root,
                index,
                proof,
                data,
            } => {
                self.on_chunk(now, conn, &root, index, &proof, data);
                Ok(())
            }
            Inbound::Refuse {
                root,
                index,
                reason,
            } => {
                self.on_refuse(now, conn, &root, index, reason);
                Ok(())
            }
            Inbound::Ping { nonce } => {
                self.reply(Reply::Pong { conn, nonce });
                Ok(())
            }
            Inbound::Pong { nonce } => {
                if conn == ConnId::MANAGER && self.rtt.in_flight == Some(nonce) {
                    self.rtt.in_flight = None;
                    let rtt = (now.as_micros() as u64).saturating_sub(nonce);
                    let rtt = u32::try_from(rtt).unwrap_or(u32::MAX);
                    // Report again when the delay moved by more than a quarter.
                    let changed = self
                        .rtt
                        .rtt_us
                        .is_none_or(|old| rtt.abs_diff(old) > old / 4);
                    self.rtt.rtt_us = Some(rtt);
                    self.report_due |= changed;
                }
                Ok(())
            }
            other => Err(AgentError::Unexpected(other.kind())),
        };
        self.maintain(now);
        result
    }

    // -------------------------------------------------------------- handlers

    /// A revocation list from the manager: taken when signed by the pinned manager key and
    /// newer than the one held; peer sessions with agents it newly revokes are closed.
    ///
    /// Lean on the stack (a device runs this under its frame handler): the version is read
    /// and the signature checked on the bytes, and only then is the list decoded, straight
    /// into the slot it is kept in. Decoded first, with its copies and the signature check
    /// inlined, it was one 14.5 KB frame on the device.
    #[inline(never)]
    fn on_revocations(&mut self, bytes: &[u8]) {
        let Some(manager) = self.config.manager_key else {
            return self.ignored("revocation list ignored: no manager key pinned");
        };
        let Some(version) = RevocationList::peek_version(bytes) else {
            return self.ignored("revocation list refused (malformed)");
        };
        if self
            .revocations
            .as_ref()
            .is_some_and(|held| version <= held.version)
        {
            return self.ignored("revocation list not newer than the one held");
        }
        if !revocation::signed_by_manager(bytes, &manager) {
            return self.ignored("revocation list refused (not the manager's)");
        }
        // What the held list revokes for each connected peer, to close only the newly revoked.
        let mut before: Vec<(ConnId, Option<u64>), PEERS> = Vec::new();
        for p in self.peers.iter() {
            if let Some(conn) = p.conn {
                let _ = before.push((conn, revoked_up_to(self.revocations.as_ref(), &p.id)));
            }
        }
        let ids: Vec<(ConnId, AgentId), PEERS> = self
            .peers
            .iter()
            .filter_map(|p| p.conn.map(|c| (c, p.id.clone())))
            .collect();
        if !revocation::decode_into(bytes, &mut self.revocations) {
            return self.ignored("revocation list refused (malformed)");
        }
        let entries = self.revocations.as_ref().map_or(0, |l| l.entries.len());
        self.event(Event::Revocations { version, entries });
        for ((conn, old), (_, id)) in before.iter().zip(ids.iter()) {
            let newly = match (revoked_up_to(self.revocations.as_ref(), id), old) {
                (Some(new), Some(old)) => new > *old,
                (Some(_), None) => true,
                _ => false,
            };
            if newly {
                self.event(Event::Close { conn: *conn });
            }
        }
    }

    /// A renewed certificate from the manager: taken when it is for this agent's id and key,
    /// signed by the pinned manager key, with a higher serial.
    #[inline(never)]
    fn on_cert_renewed(&mut self, cert: AgentCert) {
        let Some(welcome) = self.welcome.as_mut() else {
            return self.ignored("renewed certificate before the Welcome");
        };
        match revocation::accept_renewal(&cert, &welcome.cert, self.config.manager_key.as_ref()) {
            Ok(()) => {
                let (serial, not_after) = (cert.serial, cert.not_after);
                welcome.cert = cert;
                self.event(Event::CertRenewed { serial, not_after });
            }
            Err(_) => {
                self.ignored("renewed certificate refused (not ours, not the manager's, or older)")
            }
        }
    }

    /// Whether an instruction for `job` is current (not older than an epoch seen for it); records it.
    fn fence(&mut self, job: JobRef) -> bool {
        if let Some(j) = self.jobs.iter_mut().find(|j| j.job.id == job.id) {
            if job.epoch < j.job.epoch {
                return false;
            }
            j.job.epoch = job.epoch;
        }
        if let Some(f) = self.fences.iter_mut().find(|f| f.id == job.id) {
            if job.epoch < f.epoch {
                return false;
            }
            f.epoch = job.epoch;
        } else {
            if self.fences.is_full() {
                self.fences.pop_front();
            }
            let _ = self.fences.push_back(job);
        }
        true
    }

    /// Judges a trust document from the manager (decoded here, once, in place: see
    /// [`crate::trust_wire`]; kept out of line so its stack frame, about 3 KB on a device,
    /// is not part of other messages' paths, and the anchor's persistence out of line too:
    /// with serde's decoding and the record log inlined it was one 10.7 KB frame).
    #[inline(never)]
    fn on_trust(&mut self, bytes: &[u8]) {
        let Some(anchor) = &self.trust.anchor else {
            self.ignored("trust document ignored: no root key configured");
            return;
        };
        let mut signed = crate::trust_wire::empty();
        if let Err(reason) = crate::trust_wire::decode_into(bytes, &mut signed) {
            self.event(Event::TrustRefused { version: 0, reason });
            return;
        }
        let version = signed.document.version;
        match anchor.accept(&signed) {
            Ok(next) => {
                let newer = next != *anchor;
                // Adopted only once persisted: otherwise a reboot would fall back to the
                // older anchor the manager could then hold the agent at.
                if newer && !self.persist_anchor(&next) {
                    return;
                }
                let first = !self.trust.has_document;
                self.trust.anchor = Some(next);
                core::mem::swap(&mut self.trust.document, &mut signed.document);
                self.trust.has_document = true;
                if newer || first {
                    self.event(Event::TrustAccepted { version, newer });
                }
            }
            // The manager sends its chain oldest first: the ones below the held version are
            // expected, not an attack.
            Err(TrustError::Rollback) => self.ignored("older trust document skipped"),
            Err(reason) => self.event(Event::TrustRefused { version, reason }),
        }
    }

    /// Writes the accepted anchor to the store (out of line: see [`Agent::on_trust`]);
    /// whether it was written.
    #[inline(never)]
    fn persist_anchor(&mut self, anchor: &TrustAnchor) -> bool {
        let stored = StoredAnchor {
            pin: self.trust.pin,
            anchor: anchor.clone(),
        };
        match self.store.save_anchor(&stored) {
            Ok(()) => true,
            Err(error) => {
                self.event(Event::RecordFailed {
                    what: "save trust anchor (the document is not taken)",
                    error,
                });
                false
            }
        }
    }

    /// Checks a manifest before a job starts (see the module docs); returns the version
    /// record to write if it is accepted and raises its name's record.
    #[inline(never)]
    fn check_manifest(
        &mut self,
        now: Duration,
        m: &Manifest,
    ) -> Result<Option<VersionRecord>, FailReason> {
        let time = self.unix_time(now);
        m.check_limits(time).map_err(fail_reason)?;
        if !content_name_is_safe(&m.name) {
            return Err(FailReason::BadManifest);
        }
        if m.chunk_size > self.config.max_chunk {
            return Err(FailReason::ChunkTooLarge);
        }
        if self.trust.anchor.is_none() {
            return Err(FailReason::NoTrust);
        }
        let doc = self.trust_document().ok_or(FailReason::NoTrust)?;
        if doc.is_expired(time) {
            return Err(FailReason::Expired);
        }
        doc.verify_manifest(m).map_err(fail_reason)?;
        let record = match self.store.version_record(&m.name) {
            Ok(r) => r,
            Err(error) => {
                self.event(Event::RecordFailed {
                    what: "read version record",
                    error,
                });
                return Err(FailReason::StorageError);
            }
        };
        if let Some(r) = record {
            if m.version < r.version {
                return Err(FailReason::Downgrade);
            }
            if m.version == r.version {
                return if r.root == m.root {
                    Ok(None)
                } else {
                    Err(FailReason::VersionReused)
                };
            }
        }
        let mut i = 0;
        while let Some(h) = self.store.held(i) {
            if h.manifest.name == m.name && h.manifest.version > m.version {
                return Err(FailReason::Downgrade);
            }
            i += 1;
        }
        Ok(Some(VersionRecord {
            version: m.version,
            root: m.root,
        }))
    }

    fn fail_job(&mut self, job: JobRef, reason: FailReason) {
        self.parked_dirty = true;
        if let Some(j) = self.jobs.iter_mut().find(|j| j.job.id == job.id) {
            j.state = JobState::Failed(reason);
            j.failed_due = true;
            for s in j.sources.iter_mut() {
                s.in_flight.clear();
            }
        } else if self
            .to_manager
            .push_back(ToManager::Failed(job, reason))
            .is_err()
        {
            self.ignored("manager queue full: Failed dropped");
        }
        self.event(Event::JobFailed { job, reason });
    }

    #[inline(never)]
    fn on_fetch(
        &mut self,
        now: Duration,
        job: JobRef,
        manifest: Manifest,
        sources: &[SourceRange],
    ) {
        if !self.fence(job) {
            self.ignored("stale Fetch (older epoch)");
            return;
        }
        self.parked_dirty = true;
        if let Some(pos) = self.jobs.iter().position(|j| j.job.id == job.id) {
            if self.jobs[pos].manifest.root == manifest.root {
                // The same job again (e.g. after a manager restart): new sources, same progress.
                let j = &mut self.jobs[pos];
                j.job = job;
                match j.state {
                    JobState::Complete => {
                        j.have_due = true;
                        j.next_due = true;
                    }
                    JobState::Failed(_) => {
                        j.state = JobState::Fetching;
                        j.failed_due = false;
                    }
                    JobState::Fetching => j.progress_due = true,
                }
                self.on_sources(job, sources, true);
                return;
            }
            remove_job(&mut self.jobs, pos);
        }
        match self.check_manifest(now, &manifest) {
            Ok(None) => {}
            Ok(Some(record)) => {
                // Recorded before the content is opened: from here on this name accepts
                // nothing older, also once the content is gone.
                if let Err(error) = save_version_record(&mut self.store, &manifest.name, &record) {
                    self.event(Event::RecordFailed {
                        what: "save version record",
                        error,
                    });
                    self.fail_job(job, store_fail(error));
                    return;
                }
            }
            Err(reason) => {
                self.fail_job(job, reason);
                return;
            }
        }
        self.start_job(now, job, manifest, sources);
    }

    /// Opens the store for an accepted manifest and starts its job. Out of line, so the
    /// job being built is not on the stack under the manifest's signature check (on a
    /// device `on_fetch` with both was a 7 KB frame above the 5 KB of `verify`).
    #[inline(never)]
    fn start_job(
        &mut self,
        now: Duration,
        job: JobRef,
        manifest: Manifest,
        sources: &[SourceRange],
    ) {
        if self.jobs.is_full() {
            // Make room from jobs that no longer fetch.
            if let Some(pos) = self.jobs.iter().position(|j| j.state != JobState::Fetching) {
                remove_job(&mut self.jobs, pos);
            } else {
                self.fail_job(job, FailReason::Busy);
                return;
            }
        }
        let resumed = match self.store.open(&manifest) {
            Ok(n) => n,
            Err(e) => {
                self.fail_job(job, store_fail(e));
                return;
            }
        };
        let chunks = manifest.chunks();
        let root = manifest.root;
        let pace = self
            .throttle(job.id)
            .map(|rate| Pace::new(rate, manifest.chunk_size, now));
        let mut j = Job {
            job,
            pace,
            manifest,
            state: JobState::Fetching,
            ranges: Vec::new(),
            sources: Vec::new(),
            stats: JobStats {
                chunks,
                verified: resumed,
                resumed,
                ..JobStats::default()
            },
            progress_due: resumed > 0,
            last_progress: None,
            have_due: false,
            next_due: false,
            failed_due: false,
        };
        let _ = j.sources.push(SourceSlot::new(None));
        j.set_default_range();
        if resumed >= chunks {
            j.state = JobState::Complete;
            j.have_due = true;
            j.next_due = true;
        }
        let complete = j.state == JobState::Complete;
        let _ = self.jobs.push(j);
        self.event(Event::JobStarted {
            job,
            root,
            chunks,
            resumed,
        });
        if complete {
            self.event(Event::JobComplete { job, root });
        }
        self.on_sources(job, sources, true);
    }

    #[inline(never)]
    fn on_sources(&mut self, job: JobRef, sources: &[SourceRange], replace: bool) {
        if !replace && !self.fence(job) {
            self.ignored("stale Sources (older epoch)");
            return;
        }
        let Some(j) = self.jobs.iter_mut().find(|j| j.job.id == job.id) else {
            self.ignored("Sources for an unknown job");
            return;
        };
        if replace {
            j.set_default_range();
        }
        // A named range replaces what earlier ranges said of its chunks (the manager sends
        // the full list): trim them all first, so that the slots of sources no longer named
        // free up before new sources need one (else a moved stripe boundary could leave a
        // full table and send a range to the manager), and an avoided new source falls back
        // to the manager, not to a stale older source.
        for sr in sources {
            let end = sr.end.min(j.chunks());
            if sr.first < end {
                j.clear_ranges(sr.first, end);
            }
        }
        let mut dropped = false;
        for sr in sources {
            let end = sr.end.min(j.chunks());
            if sr.first >= end {
                continue;
            }
            let slot = match &sr.source {
                Source::Manager => 0,
                Source::Peer { id, addr, key } => {
                    if let Some(pos) = j.sources.iter().position(|s| s.id() == Some(id)) {
                        let s = &mut j.sources[pos];
                        s.peer = Some((id.clone(), *addr, *key));
                        if s.avoided == Some(Avoid::Trouble) {
                            // Named anew by the manager: try it again.
                            s.avoided = None;
                            s.refusals = 0;
                            s.disconnects = 0;
                            s.not_yet_since = None;
                        }
                        pos
                    } else {
                        if j.sources.is_full() {
                            // Recycle a slot no range uses (any longer): prefer one with
                            // nothing in flight; else its requests are given up and rewound
                            // (a late answer is ignored as unsolicited).
                            let unused = |s: usize| !j.ranges.iter().any(|r| r.slot as usize == s);
                            let free = (1..j.sources.len())
                                .find(|&s| unused(s) && j.sources[s].in_flight.is_empty())
                                .or_else(|| (1..j.sources.len()).find(|&s| unused(s)));
                            match free {
                                Some(s) => {
                                    for (i, _) in core::mem::take(&mut j.sources[s].in_flight) {
                                        j.rewind(i);
                                    }
                                    j.sources[s] = SourceSlot::new(Some((id.clone(), *addr, *key)));
                                    s
                                }
                                None => {
                                    dropped = true;
                                    continue;
                                }
                            }
                        } else {
                            let _ =
                                j.sources
                                    .push(SourceSlot::new(Some((id.clone(), *addr, *key))));
                            j.sources.len() - 1
                        }
                    }
                }
            };
            if j.ranges.is_full() {
                // Drop ranges entirely shadowed by later ones, then the oldest.
                let mut r = 1;
                while r < j.ranges.len() {
                    let (first, end) = (j.ranges[r].first, j.ranges[r].end);
                    let shadowed = j.ranges[r + 1..]
                        .iter()
                        .any(|later| later.first <= first && end <= later.end);
                    if shadowed {
                        j.ranges.remove(r);
                    } else {
                        r += 1;
                    }
                }
                if j.ranges.is_full() {
                    j.ranges.remove(1);
                    dropped = true;
                }
            }
            let _ = j.ranges.push(Range {
                slot: slot as u8,
                first: sr.first,
                end,
                cursor: sr.first,
            });
        }
        j.rewind_all();
        if dropped {
            self.ignored("source table full: some ranges fall back to the manager");
        }
    }

    #[inline(never)]
    fn on_throttle(&mut self, now: Duration, job: JobRef, rate: u64) {
        if !self.fence(job) {
            self.ignored("stale Throttle (older epoch)");
            return;
        }
        self.throttles.retain(|t| t.0 != job.id);
        if rate > 0 {
            if self.throttles.is_full() {
                self.throttles.remove(0);
            }
            let _ = self.throttles.push((job.id, rate));
        }
        if let Some(j) = self.jobs.iter_mut().find(|j| j.job.id == job.id) {
            j.pace = (rate > 0).then(|| Pace::new(rate, j.manifest.chunk_size, now));
        }
    }

    #[inline(never)]
    fn on_done(&mut self, job: JobRef, cancel: bool) {
        if !self.fence(job) {
            self.ignored("stale Done/Cancel (older epoch)");
            return;
        }
        let root = if let Some(pos) = self.jobs.iter().position(|j| j.job.id == job.id) {
            let root = self.jobs[pos].manifest.root;
            remove_job(&mut self.jobs, pos);
            Some(root)
        } else {
            None
        };
        if let Some(root) = root {
            // Parked requests for content no longer fetched will not be answered.
            let mut i = 0;
            while i < self.parked.len() {
                if self.parked[i].root == root && !self.fetching(&root) {
                    let p = self.parked.swap_remove(i);
                    self.reply(Reply::Refuse {
                        conn: p.conn,
                        root,
                        index: p.index,
                        reason: Refusal::NotYet,
                    });
                } else {
                    i += 1;
                }
            }
        }
        self.event(if cancel {
            Event::JobCancelled { job }
        } else {
            Event::JobDone { job, root }
        });
    }

    fn fetching(&self, root: &Digest) -> bool {
        self.jobs
            .iter()
            .any(|j| j.root() == root && j.state == JobState::Fetching)
    }

    fn reply(&mut self, r: Reply) {
        if self.replies.push_back(r).is_err() {
            self.ignored("reply queue full: request dropped");
        }
    }

    fn drop_replies_to(&mut self, conn: ConnId) {
        let n = self.replies.len();
        for _ in 0..n {
            if let Some(r) = self.replies.pop_front() {
                let c = match r {
                    Reply::Chunk { conn, .. }
                    | Reply::Refuse { conn, .. }
                    | Reply::Pong { conn, .. } => conn,
                };
                if c != conn {
                    let _ = self.replies.push_back(r);
                }
            }
        }
    }

    #[inline(never)]
    fn on_chunk_request(&mut self, now: Duration, conn: ConnId, root: Digest, index: u32) {
        let refuse = |reason| Reply::Refuse {
            conn,
            root,
            index,
            reason,
        };
        if !self.config.can_serve {
            self.reply(refuse(Refusal::Busy));
            return;
        }
        if conn != ConnId::MANAGER
            && !self.serving.contains(&conn)
            && (self.serving.len() >= self.config.max_peers as usize
                || self.serving.push(conn).is_err())
        {
            self.reply(refuse(Refusal::Busy));
            return;
        }
        let Some(m) = self.store.manifest(&root) else {
            self.reply(refuse(Refusal::Unknown));
            return;
        };
        if index >= m.chunks() {
            self.reply(refuse(Refusal::Unknown));
            return;
        }
        if conn != ConnId::MANAGER
            && let Some(j) = self.jobs.iter_mut().find(|j| j.manifest.root == root)
        {
            let slot = j.ranges.get(j.owner(index)).map(|r| r.slot as usize);
            if let Some(s) = slot.and_then(|s| j.sources.get_mut(s)) {
                s.relayed = true;
            }
        }
        match self.store.is_verified(&root, index) {
            Ok(true) => self.reply(Reply::Chunk { conn, root, index }),
            Ok(false) if self.fetching(&root) => {
                let p = Parked {
                    conn,
                    root,
                    index,
                    until: now + self.config.park_timeout,
                };
                if self.parked.push(p).is_err() {
                    self.reply(refuse(Refusal::NotYet));
                }
            }
            Ok(false) => self.reply(refuse(Refusal::NotYet)),
            Err(_) => self.reply(refuse(Refusal::Busy)),
        }
    }

    /// Finds the job fetching `root` and its source slot on `conn` with `index` in flight; takes it out.
    fn take_in_flight(
        &mut self,
        conn: ConnId,
        root: &Digest,
        index: u32,
    ) -> Option<(usize, usize, Duration)> {
        let peer_id = if conn == ConnId::MANAGER {
            None
        } else {
            Some(self.peers.iter().find(|p| p.conn == Some(conn))?.id.clone())
        };
        let jp = self
            .jobs
            .iter()
            .position(|j| j.root() == root && j.state == JobState::Fetching)?;
        let j = &mut self.jobs[jp];
        let sp = j.sources.iter().position(|s| {
            s.id() == peer_id.as_ref() && s.in_flight.iter().any(|&(i, _)| i == index)
        })?;
        let slot = &mut j.sources[sp];
        let asked = slot.in_flight.iter().find(|&&(i, _)| i == index)?.1;
        slot.in_flight.retain(|&(i, _)| i != index);
        Some((jp, sp, asked))
    }

    fn report_trouble(&mut self, job: JobRef, peer: AgentId, trouble: Trouble) {
        if self
            .to_manager
            .push_back(ToManager::Trouble(job, peer.clone(), trouble))
            .is_err()
        {
            self.ignored("manager queue full: PeerTrouble dropped");
        }
        self.event(Event::PeerTrouble { job, peer, trouble });
    }

    #[inline(never)]
    fn on_chunk(
        &mut self,
        now: Duration,
        conn: ConnId,
        root: &Digest,
        index: u32,
        proof: &Proof,
        data: &[u8],
    ) {
        let Some((jp, sp, asked)) = self.take_in_flight(conn, root, index) else {
            self.ignored("unsolicited or late chunk");
            return;
        };
        let base = self.config.window;
        self.jobs[jp].sources[sp].pace_window(base, now, now.saturating_sub(asked));
        let j = &mut self.jobs[jp];
        let chunks = j.chunks();
        let ok = data.len() == j.manifest.chunk_len(index) as usize
            && merkle::verify_leaf(root, chunks, index, &leaf_hash(data), proof).is_ok();
        if !ok {
            j.stats.bad_chunks += 1;
            j.rewind(index);
            let job = j.job;
            let slot = &mut j.sources[sp];
            if let Some((id, ..)) = slot.peer.clone() {
                slot.avoided = Some(Avoid::Bad);
                for (i, _) in core::mem::take(&mut slot.in_flight) {
                    j.rewind(i);
                }
                j.rewind_all();
                self.report_trouble(job, id, Trouble::BadChunk { index });
            } else {
                self.ignored("bad chunk from the manager; asking again");
            }
            return;
        }
        j.sources[sp].refusals = 0;
        j.sources[sp].disconnects = 0;
        j.sources[sp].not_yet_since = None;
        match self.store.is_verified(root, index) {
            Ok(true) => return, // a duplicate
            Ok(false) => {}
            Err(e) => {
                let job = j.job;
                self.fail_job(job, store_fail(e));
                return;
            }
        }
        if let Err(e) = self.store.write_chunk(root, index, data, proof) {
            let job = self.jobs[jp].job;
            self.fail_job(job, store_fail(e));
            return;
        }
        self.parked_dirty = true;
        let j = &mut self.jobs[jp];
        j.stats.verified += 1;
        j.stats.fetched += 1;
        j.stats.bytes_received += data.len() as u64;
        j.sources[sp].received_delta += data.len() as u64;
        j.progress_due = true;
        if j.stats.verified >= chunks {
            j.state = JobState::Complete;
            j.have_due = true;
            j.next_due = true;
            for s in j.sources.iter_mut() {
                s.in_flight.clear();
            }
            let (job, root) = (j.job, j.manifest.root);
            self.event(Event::JobComplete { job, root });
            self.close_unneeded_peers();
        }
    }

    #[inline(never)]
    fn on_refuse(
        &mut self,
        now: Duration,
        conn: ConnId,
        root: &Digest,
        index: u32,
        reason: Refusal,
    ) {
        let Some((jp, sp, _)) = self.take_in_flight(conn, root, index) else {
            return;
        };
        let retry = self.config.retry_delay;
        let j = &mut self.jobs[jp];
        j.rewind(index);
        let job = j.job;
        let slot = &mut j.sources[sp];
        slot.paused_until = Some(now + retry);
        let stuck = if reason == Refusal::NotYet {
            // A source still fetching may refuse `NotYet` for a while, not forever: past
            // `NOT_YET_PARKS` park timeouts without a chunk from it, it is reported.
            let since = *slot.not_yet_since.get_or_insert(now);
            now.saturating_sub(since) >= self.config.park_timeout * NOT_YET_PARKS
        } else {
            slot.refusals += 1;
            false
        };
        if (stuck || slot.refusals >= MAX_REFUSALS)
            && let Some((id, ..)) = slot.peer.clone()
        {
            slot.avoided = Some(Avoid::Trouble);
            for (i, _) in core::mem::take(&mut slot.in_flight) {
                j.rewind(i);
            }
            j.rewind_all();
            self.report_trouble(job, id, Trouble::Refused);
        }
    }

    /// Closes outgoing peer connections no fetching job needs any more.
    fn close_unneeded_peers(&mut self) {
        let mut close: Vec<ConnId, PEERS> = Vec::new();
        for p in &self.peers {
            let Some(conn) = p.conn else { continue };
            if p.direction != Direction::Outgoing || self.serving.contains(&conn) {
                continue;
            }
            let needed = self.jobs.iter().any(|j| {
                j.state == JobState::Fetching
                    && j.sources
                        .iter()
                        .any(|s| s.avoided.is_none() && s.id() == Some(&p.id))
            });
            if !needed {
                let _ = close.push(conn);
            }
        }
        for conn in close {
            self.event(Event::Close { conn });
        }
    }

    /// Asks for connections to the peer sources that fetching jobs need.
    fn maintain(&mut self, _now: Duration) {
        let mut wanted: Vec<(AgentId, PeerAddr, PublicKey), 8> = Vec::new();
        for j in self.jobs.iter().filter(|j| j.state == JobState::Fetching) {
            for (s, slot) in j.sources.iter().enumerate() {
                let Some(peer) = &slot.peer else { continue };
                if slot.avoided.is_some() || !j.ranges.iter().any(|r| r.slot as usize == s) {
                    continue;
                }
                if self.peers.iter().any(|p| p.id == peer.0) || wanted.iter().any(|w| w.0 == peer.0)
                {
                    continue;
                }
                let _ = wanted.push(peer.clone());
            }
        }
        for (id, addr, key) in wanted {
            if self
                .peers
                .push(Peer {
                    id: id.clone(),
                    conn: None,
                    direction: Direction::Outgoing,
                })
                .is_err()
            {
                break;
            }
            self.event(Event::Connect {
                peer: id,
                addr,
                key,
            });
        }
    }

    // --------------------------------------------------------------- outputs

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Agent::handle_timeout`] should be called next (in the driver's `now` timeline).
    pub fn poll_timeout(&self) -> Option<Duration> {
        let mut t: Option<Duration> = None;
        if self.manager_up && !self.config.ping_interval.is_zero() {
            t = Some(self.rtt.next);
        }
        for j in &self.jobs {
            if j.state == JobState::Fetching {
                // Progress can only leave over the manager session: while it is
                // down there is nothing to wake up for (else the driver would spin).
                if self.manager_up
                    && j.progress_due
                    && let Some(last) = j.last_progress
                {
                    t = min_opt(t, last + self.config.progress_interval);
                }
                if let Some(p) = &j.pace
                    && !p.allows()
                {
                    t = min_opt(t, p.ready_at());
                }
                for s in &j.sources {
                    // `handle_timeout` clears a pause once it has passed.
                    if let Some(p) = s.paused_until {
                        t = min_opt(t, p);
                    }
                    for &(_, at) in &s.in_flight {
                        t = min_opt(t, at + self.config.request_timeout);
                    }
                }
            }
        }
        for p in &self.parked {
            t = min_opt(t, p.until);
        }
        t
    }

    /// Encodes the next frame to send into `buf` and says where it goes.
    ///
    /// `buf` should hold a whole chunk message: at least `max_chunk` +
    /// [`baton_protocol::message::CHUNK_OVERHEAD`] bytes (a chunk that does not
    /// fit is refused `Busy` instead).
    pub fn poll_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<Transmit> {
        for _ in 0..64 {
            match self.next_transmit(now, buf) {
                Step::Send(t) => return Some(t),
                Step::Skip => continue,
                Step::Idle => return None,
            }
        }
        None
    }

    fn next_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Step {
        if self.manager_up
            && let Some(step) = self.manager_transmit(now, buf)
        {
            return step;
        }
        if let Some(r) = self.replies.pop_front() {
            return self.send_reply(r, buf);
        }
        if let Some(step) = self.parked_transmit(now) {
            return step;
        }
        self.request_transmit(now, buf)
    }

    fn encode_to(&mut self, conn: ConnId, msg: &Message<'_>, buf: &mut [u8]) -> Step {
        match msg.encode(buf) {
            Ok(out) => Step::Send(Transmit {
                conn,
                len: out.len(),
            }),
            Err(_) => {
                self.ignored("transmit buffer too small: message dropped");
                Step::Skip
            }
        }
    }

    fn report(&self, now: Duration) -> Report {
        let mut holdings: Vec<Holding, MAX_HOLDINGS> = Vec::new();
        let mut i = 0;
        while let Some(h) = self.store.held(i) {
            let _ = holdings.push(Holding {
                root: h.manifest.root,
                verified: h.verified,
                complete: h.verified >= h.manifest.chunks(),
            });
            i += 1;
        }
        let mut link = self.config.link;
        link.uptime_s = now.as_secs();
        let mut delays = Vec::new();
        if let Some(rtt_us) = self.rtt.rtt_us {
            let _ = delays.push(Delay {
                to: DelayTo::Manager,
                rtt_us,
            });
        }
        for d in &self.peer_delays {
            if delays.push(d.clone()).is_err() {
                break;
            }
        }
        Report {
            id: self.config.id.clone(),
            listen: self.config.listen,
            site: self.config.site.clone(),
            segment: self.config.segment.clone(),
            performance: self.config.performance,
            free_storage: self.store.free_bytes(),
            can_serve: self.config.can_serve,
            max_chunk: self.config.max_chunk,
            max_sources: self.config.max_sources.clamp(1, MAX_SOURCE_SLOTS as u16),
            max_peers: self.config.max_peers,
            link,
            delays,
            labels: self.config.labels.clone(),
            holdings,
        }
    }

    fn manager_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<Step> {
        let m = ConnId::MANAGER;
        if self.report_due {
            self.report_due = false;
            let msg = Message::Report(self.report(now));
            return Some(self.encode_to(m, &msg, buf));
        }
        if self.rtt.due {
            self.rtt.due = false;
            let nonce = now.as_micros() as u64;
            self.rtt.in_flight = Some(nonce);
            return Some(self.encode_to(m, &Message::Ping { nonce }, buf));
        }
        if let Some(t) = self.to_manager.pop_front() {
            let msg = match t {
                ToManager::Failed(job, reason) => Message::Failed { job, reason },
                ToManager::Trouble(job, peer, trouble) => {
                    Message::PeerTrouble { job, peer, trouble }
                }
            };
            return Some(self.encode_to(m, &msg, buf));
        }
        let interval = self.config.progress_interval;
        for k in 0..self.jobs.len() {
            let j = &mut self.jobs[k];
            if j.failed_due {
                j.failed_due = false;
                let JobState::Failed(reason) = j.state else {
                    continue;
                };
                let msg = Message::Failed { job: j.job, reason };
                return Some(self.encode_to(m, &msg, buf));
            }
            let final_progress = j.have_due && j.progress_due;
            let interval_ok = j.last_progress.is_none_or(|l| now >= l + interval);
            if j.progress_due && (interval_ok || final_progress) {
                j.progress_due = false;
                j.last_progress = Some(now);
                let mut received: Vec<Received, MAX_RECEIVED_PER_PROGRESS> = Vec::new();
                for s in j.sources.iter_mut() {
                    if s.received_delta > 0 {
                        let r = Received {
                            from: s.id().cloned(),
                            bytes: s.received_delta,
                        };
                        if received.push(r).is_ok() {
                            s.received_delta = 0;
                        }
                    }
                }
                let msg = Message::Progress {
                    job: j.job,
                    verified: j.stats.verified,
                    received,
                };
                return Some(self.encode_to(m, &msg, buf));
            }
            if j.have_due {
                j.have_due = false;
                let msg = Message::Have {
                    job: j.job,
                    root: j.manifest.root,
                };
                return Some(self.encode_to(m, &msg, buf));
            }
            if j.next_due {
                j.next_due = false;
                let msg = Message::NextPlease { job: j.job };
                return Some(self.encode_to(m, &msg, buf));
            }
        }
        None
    }

    fn send_reply(&mut self, r: Reply, buf: &mut [u8]) -> Step {
        match r {
            Reply::Pong { conn, nonce } => self.encode_to(conn, &Message::Pong { nonce }, buf),
            Reply::Refuse {
                conn,
                root,
                index,
                reason,
            } => self.encode_to(
                conn,
                &Message::Refuse {
                    root,
                    index,
                    reason,
                },
                buf,
            ),
            Reply::Chunk { conn, root, index } => match self.encode_chunk(&root, index, buf) {
                Ok(len) => {
                    let bytes = self
                        .store
                        .manifest(&root)
                        .map_or(0, |m| m.chunk_len(index) as u64);
                    if let Some(j) = self.jobs.iter_mut().find(|j| *j.root() == root) {
                        j.stats.bytes_served += bytes;
                    } else {
                        self.served_other += bytes;
                    }
                    Step::Send(Transmit { conn, len })
                }
                Err(_) => self.encode_to(
                    conn,
                    &Message::Refuse {
                        root,
                        index,
                        reason: Refusal::Busy,
                    },
                    buf,
                ),
            },
        }
    }

    /// Encodes `Message::Chunk` for a stored chunk, reading data and proof from the store into `buf`.
    fn encode_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        buf: &mut [u8],
    ) -> Result<usize, StoreError> {
        let m = self.store.manifest(root).ok_or(StoreError::Unknown)?;
        let len = m.chunk_len(index) as usize;
        let plen = merkle::proof_len(index, m.chunks());
        let head = 1
            + 32
            + varint_len(index as u64)
            + varint_len(plen as u64)
            + 32 * plen
            + varint_len(len as u64);
        if buf.len() < head + len {
            return Err(StoreError::BadLength);
        }
        let mut proof = Proof::new();
        let n = self
            .store
            .read_chunk(root, index, &mut buf[head..head + len], &mut proof)?;
        debug_assert_eq!(n, len);
        buf[0] = CHUNK_VARIANT;
        let h = ChunkHead {
            root,
            index,
            proof: &proof,
        };
        let used = postcard::to_slice(&h, &mut buf[1..head])
            .map_err(|_| StoreError::BadLength)?
            .len();
        let lenpos = 1 + used;
        let mut v = len as u64;
        let mut p = lenpos;
        loop {
            let byte = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                buf[p] = byte;
                p += 1;
                break;
            }
            buf[p] = byte | 0x80;
            p += 1;
        }
        debug_assert_eq!(p, head);
        Ok(head + len)
    }

    /// Moves parked requests that can be answered now (chunk verified) or must be refused
    /// (timed out, content no longer fetched) to the reply queue, in one scan per change.
    fn parked_transmit(&mut self, now: Duration) -> Option<Step> {
        if !self.parked_dirty {
            return None;
        }
        let mut moved = false;
        let mut i = 0;
        while i < self.parked.len() {
            if self.replies.is_full() {
                // Scanned again once the replies are sent (still dirty).
                return moved.then_some(Step::Skip);
            }
            let p = self.parked[i];
            let ready = self.store.is_verified(&p.root, p.index).unwrap_or(false);
            if ready || now >= p.until || !self.fetching(&p.root) {
                self.parked.swap_remove(i);
                let r = if ready {
                    Reply::Chunk {
                        conn: p.conn,
                        root: p.root,
                        index: p.index,
                    }
                } else {
                    Reply::Refuse {
                        conn: p.conn,
                        root: p.root,
                        index: p.index,
                        reason: Refusal::NotYet,
                    }
                };
                self.reply(r);
                moved = true;
                continue;
            }
            i += 1;
        }
        self.parked_dirty = false;
        moved.then_some(Step::Skip)
    }

    fn slot_conn(&self, slot: &SourceSlot) -> Option<ConnId> {
        match &slot.peer {
            None => self.manager_up.then_some(ConnId::MANAGER),
            Some((id, ..)) => {
                self.peers
                    .iter()
                    .find(|p| p.id == *id && p.conn.is_some())?
                    .conn
            }
        }
    }

    fn request_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Step {
        let configured = self.config.window;
        for jp in 0..self.jobs.len() {
            if self.jobs[jp].state != JobState::Fetching {
                continue;
            }
            if let Some(p) = &mut self.jobs[jp].pace {
                p.refill(now);
                if !p.allows() {
                    continue;
                }
            }
            for sp in 0..self.jobs[jp].sources.len() {
                let slot = &self.jobs[jp].sources[sp];
                let window = slot.window(configured);
                let window = if slot.relayed {
                    (2 * window).min(MAX_WINDOW)
                } else {
                    window
                };
                if slot.avoided.is_some() || slot.in_flight.len() >= window {
                    continue;
                }
                if slot.paused_until.is_some_and(|p| now < p) {
                    continue;
                }
                let Some(conn) = self.slot_conn(slot) else {
                    continue;
                };
                self.jobs[jp].sources[sp].paused_until = None;
                match self.next_chunk(jp, sp) {
                    Ok(Some(index)) => {
                        let j = &mut self.jobs[jp];
                        let _ = j.sources[sp].in_flight.push((index, now));
                        let len = j.manifest.chunk_len(index);
                        if let Some(p) = &mut j.pace {
                            p.take(len);
                        }
                        let root = j.manifest.root;
                        return self.encode_to(conn, &Message::ChunkRequest { root, index }, buf);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let job = self.jobs[jp].job;
                        self.fail_job(job, store_fail(e));
                        return Step::Skip;
                    }
                }
            }
        }
        Step::Idle
    }

    /// The next chunk source `sp` of job `jp` should fetch, in index order within its ranges.
    fn next_chunk(&mut self, jp: usize, sp: usize) -> Result<Option<u32>, StoreError> {
        let j = &mut self.jobs[jp];
        let root = j.manifest.root;
        for r in 0..j.ranges.len() {
            if j.ranges[r].slot as usize != sp {
                continue;
            }
            let mut c = j.ranges[r].cursor;
            let end = j.ranges[r].end;
            while c < end {
                let i = c;
                c += 1;
                if j.owner(i) != r || j.in_flight_anywhere(i) {
                    continue;
                }
                if self.store.is_verified(&root, i)? {
                    continue;
                }
                j.ranges[r].cursor = c;
                return Ok(Some(i));
            }
            j.ranges[r].cursor = c;
        }
        Ok(None)
    }
}

enum Step {
    Send(Transmit),
    Skip,
    Idle,
}

#[cfg(test)]
mod test {
    extern crate std;
    use std::vec::Vec as StdVec;

    use baton_protocol::identity::Identity;
    use baton_protocol::merkle::MerkleTree;
    use baton_protocol::trust::SignedTrust;

    use super::*;
    use crate::flash::FlashStore;
    use crate::flash::testing::RamFlash;

    type Flash = RamFlash<4, 1024>;
    type TestAgent = Agent<FlashStore<Flash>, 2, 4>;

    const MS: Duration = Duration::from_millis(1);

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    struct Content {
        manifest: Manifest,
        data: StdVec<u8>,
        tree: MerkleTree,
    }

    impl Content {
        fn new(publisher: &Identity, name: &str, version: u64, expires: u64, len: usize) -> Self {
            let chunk = 1024u32;
            let data: StdVec<u8> = (0..len)
                .map(|i| (i * 31 + version as usize) as u8)
                .collect();
            let leaves = data.chunks(chunk as usize).map(leaf_hash).collect();
            let tree = MerkleTree::from_leaves(leaves);
            let manifest = Manifest::sign(
                publisher,
                heapless::String::try_from(name).unwrap(),
                version,
                expires,
                len as u64,
                chunk,
                tree.root(),
            );
            Content {
                manifest,
                data,
                tree,
            }
        }

        fn chunk_msg(&self, i: u32) -> StdVec<u8> {
            let cs = self.manifest.chunk_size as usize;
            let start = i as usize * cs;
            let data = &self.data[start..(start + cs).min(self.data.len())];
            Message::Chunk {
                root: self.manifest.root,
                index: i,
                proof: self.tree.proof(i).unwrap(),
                data,
            }
            .to_vec()
        }
    }

    struct World {
        manager: Identity,
        publisher: Identity,
        root: Identity,
        agent: TestAgent,
        now: Duration,
    }

    /// A content partition of 128 KiB and a record area of 8 KiB (two banks of 4 KiB).
    fn store() -> FlashStore<Flash> {
        FlashStore::new_multiwrite(Flash::new(128 * 1024)).with_records(Flash::new(8 * 1024))
    }

    fn root_key() -> Identity {
        Identity::from_seed([5; 32])
    }

    fn publisher_key() -> Identity {
        Identity::from_seed([2; 32])
    }

    /// A trust document: `version`, `expires`, the `roots` (of which `threshold` must sign),
    /// the publishers with their name patterns, signed by `signers`.
    fn trust_doc(
        version: u64,
        expires: u64,
        roots: &[&Identity],
        threshold: u8,
        grants: &[(&Identity, &[&str])],
        signers: &[&Identity],
    ) -> SignedTrust {
        use baton_protocol::trust::{NamePattern, PublisherGrant};
        let document = TrustDocument {
            version,
            expires,
            threshold,
            roots: roots.iter().map(|r| r.public()).collect(),
            publishers: grants
                .iter()
                .map(|(key, names)| PublisherGrant {
                    key: key.public(),
                    names: names
                        .iter()
                        .map(|n| NamePattern::try_from(*n).unwrap())
                        .collect(),
                })
                .collect(),
        };
        let mut signed = SignedTrust::new(document);
        for s in signers {
            signed.sign(s).unwrap();
        }
        signed
    }

    /// `signed` as the manager's `Trust` message.
    fn trust_msg(signed: &SignedTrust) -> StdVec<u8> {
        let mut buf = [0u8; baton_protocol::trust::MAX_TRUST_BYTES];
        let document = signed.encode(&mut buf).unwrap();
        Message::Trust { document }.to_vec()
    }

    /// The usual trust: version 1 under the one root, the publisher for every name.
    fn default_trust() -> SignedTrust {
        let (root, publisher) = (root_key(), publisher_key());
        trust_doc(1, 0, &[&root], 1, &[(&publisher, &["*"])], &[&root])
    }

    /// An agent pinning [`root_key`], connected and welcomed at Unix time 1 000 000, and
    /// (with `trust`) given that trust document.
    fn world_trusting(
        store: FlashStore<Flash>,
        trust: Option<SignedTrust>,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> World {
        let mut config = AgentConfig::new(id("a1"));
        config.window = 4;
        config.roots = heapless::Vec::from_slice(&[root_key().public()]).unwrap();
        tweak(&mut config);
        let mut w = World {
            manager: Identity::from_seed([1; 32]),
            publisher: publisher_key(),
            root: root_key(),
            agent: Agent::new(config, store),
            now: Duration::from_secs(1),
        };
        w.agent.handle_manager_connected(w.now);
        let out = w.drain();
        assert!(matches!(
            Message::decode(&out[0].1).unwrap(),
            Message::Report(r) if r.id == id("a1")
        ));
        let welcome = Message::Welcome {
            cert: AgentCert::issue(&w.manager, id("a1"), Identity::from_seed([3; 32]).public()),
            unix_time: 1_000_000,
            publishers: heapless::Vec::new(),
        };
        w.frame(ConnId::MANAGER, &welcome.to_vec()).unwrap();
        assert!(w.agent.cert().is_some());
        if let Some(t) = trust {
            w.frame(ConnId::MANAGER, &trust_msg(&t)).unwrap();
            assert!(w.agent.trust_document().is_some());
        }
        w.events();
        w
    }

    fn world_with(store: FlashStore<Flash>, tweak: impl FnOnce(&mut AgentConfig)) -> World {
        world_trusting(store, Some(default_trust()), tweak)
    }

    fn world() -> World {
        world_with(store(), |_| {})
    }

    fn job(epoch: u32) -> JobRef {
        JobRef { id: 7, epoch }
    }

    fn peer_source(name: &str, first: u32, end: u32) -> SourceRange {
        SourceRange {
            source: Source::Peer {
                id: id(name),
                addr: PeerAddr::V4([127, 0, 0, 1], 4000),
                key: Identity::from_seed([9; 32]).public(),
            },
            first,
            end,
        }
    }

    impl World {
        fn frame(&mut self, conn: ConnId, bytes: &[u8]) -> Result<(), AgentError> {
            self.agent.handle_frame(self.now, conn, bytes)
        }

        fn drain(&mut self) -> StdVec<(ConnId, StdVec<u8>)> {
            let mut out = StdVec::new();
            let mut buf = [0u8; 4096];
            for _ in 0..1000 {
                match self.agent.poll_transmit(self.now, &mut buf) {
                    Some(t) => out.push((t.conn, buf[..t.len].to_vec())),
                    None => return out,
                }
            }
            panic!("poll_transmit does not run dry");
        }

        fn events(&mut self) -> StdVec<Event> {
            core::iter::from_fn(|| self.agent.poll_event()).collect()
        }

        fn fetch(&mut self, c: &Content, epoch: u32, sources: &[SourceRange]) {
            let msg = Message::Fetch {
                job: job(epoch),
                manifest: c.manifest.clone(),
                sources: heapless::Vec::from_slice(sources).unwrap(),
                next: None,
            };
            self.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        }

        /// Answers every chunk request in `out` from `c` (on the connection it came on).
        fn serve(&mut self, out: &[(ConnId, StdVec<u8>)], c: &Content) -> usize {
            let mut n = 0;
            for (conn, bytes) in out {
                if let Message::ChunkRequest { index, .. } = Message::decode(bytes).unwrap() {
                    self.frame(*conn, &c.chunk_msg(index)).unwrap();
                    n += 1;
                }
            }
            n
        }
    }

    fn requests(out: &[(ConnId, StdVec<u8>)]) -> StdVec<(ConnId, u32)> {
        out.iter()
            .filter_map(|(c, b)| match Message::decode(b).unwrap() {
                Message::ChunkRequest { index, .. } => Some((*c, index)),
                _ => None,
            })
            .collect()
    }

    fn kinds(out: &[(ConnId, StdVec<u8>)]) -> StdVec<&'static str> {
        out.iter()
            .map(|(_, b)| Message::decode(b).unwrap().kind())
            .collect()
    }

    #[test]
    fn fetches_everything_from_the_manager_with_a_window() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024 + 100);
        w.fetch(&c, 1, &[]);
        let out = w.drain();
        // Window of 4, in index order.
        assert_eq!(
            requests(&out),
            [
                (ConnId::MANAGER, 0),
                (ConnId::MANAGER, 1),
                (ConnId::MANAGER, 2),
                (ConnId::MANAGER, 3)
            ]
        );
        let mut pending = out;
        let mut all = StdVec::new();
        for _ in 0..20 {
            w.now += 100 * MS;
            let served = w.serve(&pending, &c);
            pending = w.drain();
            all.extend(pending.iter().cloned());
            if served == 0 {
                break;
            }
        }
        let k = kinds(&all);
        let have = k.iter().position(|k| *k == "Have").expect("Have sent");
        assert_eq!(k[have + 1], "NextPlease");
        assert_eq!(k[have - 1], "Progress", "a final Progress before Have");
        let stats = w.agent.job_stats(7).unwrap();
        assert_eq!((stats.fetched, stats.resumed, stats.verified), (11, 0, 11));
        assert_eq!(stats.bytes_received, c.data.len() as u64);
        assert!(w.events().contains(&Event::JobComplete {
            job: job(1),
            root: c.manifest.root
        }));
        // Progress carries the verified count and the bytes from the manager.
        let progress: StdVec<_> = all
            .iter()
            .filter_map(|(_, b)| match Message::decode(b).unwrap() {
                Message::Progress {
                    verified, received, ..
                } => Some((verified, received)),
                _ => None,
            })
            .collect();
        let total: u64 = progress
            .iter()
            .flat_map(|p| p.1.iter())
            .map(|r| r.bytes)
            .sum();
        assert_eq!(total, c.data.len() as u64);
        assert_eq!(progress.last().unwrap().0, 11);
        assert!(
            progress
                .iter()
                .all(|p| p.1.iter().all(|r| r.from.is_none()))
        );
    }

    #[test]
    fn measures_the_delay_to_the_manager_and_reports_it() {
        // `world()` drained the first Report and a Ping sent at t = 1 s.
        let mut w = world();
        w.now += Duration::from_millis(5);
        // A pong with a nonce never sent changes nothing.
        w.frame(ConnId::MANAGER, &Message::Pong { nonce: 7 }.to_vec())
            .unwrap();
        assert!(w.drain().is_empty());
        w.frame(
            ConnId::MANAGER,
            &Message::Pong { nonce: 1_000_000 }.to_vec(),
        )
        .unwrap();
        let out = w.drain();
        let report = out
            .iter()
            .find_map(|(_, b)| match Message::decode(b).unwrap() {
                Message::Report(r) => Some(r),
                _ => None,
            })
            .expect("a report after the first measurement");
        assert_eq!(
            report.delays.as_slice(),
            [Delay {
                to: DelayTo::Manager,
                rtt_us: 5_000
            }]
        );
        // The next ping waits for the interval.
        assert_eq!(w.agent.poll_timeout(), Some(Duration::from_secs(11)));
        w.now = Duration::from_secs(11);
        w.agent.handle_timeout(w.now);
        assert_eq!(kinds(&w.drain()), ["Ping"]);
    }

    #[test]
    fn progress_is_rate_limited() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 20 * 1024);
        w.fetch(&c, 1, &[]);
        let out = w.drain();
        // Answer the four requests at the same instant: at most one Progress.
        w.serve(&out, &c);
        let out = w.drain();
        assert_eq!(kinds(&out).iter().filter(|k| **k == "Progress").count(), 1);
        w.serve(&out, &c);
        let out = w.drain();
        assert_eq!(kinds(&out).iter().filter(|k| **k == "Progress").count(), 0);
        assert_eq!(w.agent.poll_timeout(), Some(w.now + 250 * MS));
        w.now += 250 * MS;
        w.agent.handle_timeout(w.now);
        let out = w.drain();
        assert_eq!(kinds(&out).iter().filter(|k| **k == "Progress").count(), 1);
    }

    #[test]
    fn throttle_paces_requests_and_zero_lifts_it() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 40 * 1024);
        // The cap may come before the job's Fetch: 10 KiB/s, ten 1 KiB chunks a second.
        let throttle = |rate| {
            Message::Throttle {
                job: job(1),
                max_bytes_per_second: rate,
            }
            .to_vec()
        };
        w.frame(ConnId::MANAGER, &throttle(10 * 1024)).unwrap();
        assert_eq!(w.agent.throttle(7), Some(10 * 1024));
        let start = w.now;
        w.fetch(&c, 1, &[]);
        let mut times = StdVec::new();
        let mut out = w.drain();
        for _ in 0..1000 {
            for (_, index) in requests(&out) {
                times.push((w.now - start, index));
            }
            w.serve(&out, &c);
            out = w.drain();
            if !out
                .iter()
                .any(|(_, b)| matches!(Message::decode(b).unwrap(), Message::ChunkRequest { .. }))
            {
                let next = w.agent.poll_timeout().expect("a throttled job wakes up");
                assert!(next > w.now, "no busy loop while throttled");
                if next - start > Duration::from_millis(1000) {
                    break;
                }
                w.now = next;
                w.agent.handle_timeout(w.now);
                out.extend(w.drain());
            }
        }
        // One chunk at once, then one per 100 ms: 11 within the first second, never faster.
        assert_eq!(times.len(), 11, "{times:?}");
        for pair in times.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= 100 * MS, "{times:?}");
        }
        // Lifting the cap: the window fills at once.
        w.frame(ConnId::MANAGER, &throttle(0)).unwrap();
        assert_eq!(w.agent.throttle(7), None);
        w.serve(&out, &c);
        let out = w.drain();
        assert_eq!(requests(&out).len(), 4);
    }

    #[test]
    fn peer_delays_follow_the_manager_delay_in_the_report() {
        let mut w = world();
        w.now += Duration::from_millis(2);
        w.frame(
            ConnId::MANAGER,
            &Message::Pong { nonce: 1_000_000 }.to_vec(),
        )
        .unwrap();
        w.drain();
        let peers = [
            Delay {
                to: DelayTo::Peer(id("p1")),
                rtt_us: 300,
            },
            Delay {
                to: DelayTo::Peer(id("p2")),
                rtt_us: 900,
            },
        ];
        w.agent.set_peer_delays(&peers);
        let out = w.drain();
        let Message::Report(r) = Message::decode(&out[0].1).unwrap() else {
            panic!("a report after new peer delays");
        };
        assert_eq!(r.delays[0].to, DelayTo::Manager);
        assert_eq!(&r.delays[1..], &peers);
        // A small change does not send the report again; a large one does.
        let mut moved = peers.clone();
        moved[0].rtt_us = 320;
        w.agent.set_peer_delays(&moved);
        assert!(w.drain().is_empty());
        // Nor does jitter under the noise floor, or the same peers in another order.
        moved[0].rtt_us = 700;
        moved.swap(0, 1);
        w.agent.set_peer_delays(&moved);
        assert!(w.drain().is_empty());
        moved[0].rtt_us = 3000;
        w.agent.set_peer_delays(&moved);
        assert_eq!(kinds(&w.drain()), ["Report"]);
        let caps = w.agent.capabilities();
        assert_eq!(caps.manager_rtt_us, Some(2000));
        assert!(caps.can_serve);
    }

    /// Fetch with chunks 4..8 from peer `p1`; returns the connection to it.
    fn with_peer(w: &mut World, c: &Content) -> ConnId {
        w.fetch(c, 1, &[peer_source("p1", 4, 8)]);
        let ev = w.events();
        assert!(
            ev.iter()
                .any(|e| matches!(e, Event::Connect { peer, .. } if *peer == id("p1")))
        );
        let conn = ConnId(5);
        w.agent
            .handle_connected(
                w.now,
                conn,
                PeerInfo {
                    id: id("p1"),
                    direction: Direction::Outgoing,
                },
            )
            .unwrap();
        conn
    }

    #[test]
    fn fetches_from_manager_and_peer_and_reports_bytes_per_source() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        let peer = with_peer(&mut w, &c);
        let out = w.drain();
        let reqs = requests(&out);
        assert!(reqs.contains(&(peer, 4)) && reqs.contains(&(peer, 7)));
        assert!(reqs.contains(&(ConnId::MANAGER, 0)));
        assert!(
            !reqs
                .iter()
                .any(|&(c, i)| c == ConnId::MANAGER && (4..8).contains(&i))
        );
        let mut pending = out;
        let mut all = StdVec::new();
        for _ in 0..20 {
            w.now += 300 * MS;
            if w.serve(&pending, &c) == 0 {
                break;
            }
            pending = w.drain();
            all.extend(pending.iter().cloned());
        }
        assert_eq!(w.agent.job_stats(7).unwrap().verified, 10);
        let mut from_peer = 0;
        let mut from_manager = 0;
        for (_, b) in &all {
            if let Message::Progress { received, .. } = Message::decode(b).unwrap() {
                for r in received {
                    match r.from {
                        Some(p) => {
                            assert_eq!(p, id("p1"));
                            from_peer += r.bytes
                        }
                        None => from_manager += r.bytes,
                    }
                }
            }
        }
        assert_eq!((from_peer, from_manager), (4 * 1024, 6 * 1024));
        // The peer connection is no longer needed.
        assert!(w.events().contains(&Event::Close { conn: peer }));
    }

    #[test]
    fn bad_chunk_is_dropped_before_the_store_and_the_peer_reported() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        let peer = with_peer(&mut w, &c);
        w.drain();
        let mut bad = c.chunk_msg(4);
        let n = bad.len();
        bad[n - 10] ^= 0xFF;
        w.frame(peer, &bad).unwrap();
        let root = c.manifest.root;
        assert!(!w.agent.store_mut().is_verified(&root, 4).unwrap());
        assert_eq!(w.agent.job_stats(7).unwrap().bad_chunks, 1);
        let out = w.drain();
        let trouble = out
            .iter()
            .find_map(|(conn, b)| match Message::decode(b).unwrap() {
                Message::PeerTrouble { peer, trouble, .. } => Some((*conn, peer, trouble)),
                _ => None,
            });
        assert_eq!(
            trouble,
            Some((ConnId::MANAGER, id("p1"), Trouble::BadChunk { index: 4 }))
        );
        // Chunk 4 (and the peer's other chunks) now come from the manager.
        let reqs = requests(&out);
        assert!(reqs.iter().all(|&(c, _)| c == ConnId::MANAGER));
        // A good chunk from the avoided peer is not taken either.
        w.frame(peer, &c.chunk_msg(5)).unwrap();
        assert!(!w.agent.store_mut().is_verified(&root, 5).unwrap());
        // Even when the manager names it again: a bad source is not asked again for this job.
        let msg = Message::Sources {
            job: job(1),
            sources: heapless::Vec::from_slice(&[peer_source("p1", 0, 10)]).unwrap(),
        };
        w.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        assert!(requests(&w.drain()).iter().all(|&(c, _)| c != peer));
    }

    #[test]
    fn not_yet_is_retried_after_a_delay() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        let peer = with_peer(&mut w, &c);
        w.drain();
        let refuse = Message::Refuse {
            root: c.manifest.root,
            index: 4,
            reason: Refusal::NotYet,
        };
        w.frame(peer, &refuse.to_vec()).unwrap();
        assert!(requests(&w.drain()).is_empty(), "no retry at once");
        let due = w.agent.poll_timeout().unwrap();
        assert_eq!(due, w.now + 100 * MS);
        w.now = due;
        w.agent.handle_timeout(w.now);
        assert_eq!(requests(&w.drain()), [(peer, 4)]);
    }

    #[test]
    fn unreachable_peer_is_reported_and_its_chunks_come_from_the_manager() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        w.fetch(&c, 1, &[peer_source("p1", 4, 8)]);
        w.events();
        let first = w.drain();
        assert_eq!(requests(&first).len(), 4);
        w.agent.handle_connect_failed(w.now, &id("p1"));
        assert!(w.events().iter().any(|e| matches!(
            e,
            Event::PeerTrouble {
                trouble: Trouble::Unreachable,
                ..
            }
        )));
        let out = w.drain();
        assert!(kinds(&out).contains(&"PeerTrouble"));
        w.serve(&out, &c);
        w.serve(&first, &c);
        for _ in 0..10 {
            let out = w.drain();
            if w.serve(&out, &c) == 0 {
                break;
            }
        }
        assert_eq!(w.agent.job_stats(7).unwrap().verified, 10);
    }

    fn incoming(w: &mut World, n: u32, name: &str) -> ConnId {
        let conn = ConnId(100 + n);
        w.agent
            .handle_connected(
                w.now,
                conn,
                PeerInfo {
                    id: id(name),
                    direction: Direction::Incoming,
                },
            )
            .unwrap();
        conn
    }

    fn request(root: Digest, index: u32) -> StdVec<u8> {
        Message::ChunkRequest { root, index }.to_vec()
    }

    #[test]
    fn serves_verified_chunks_mid_fetch_and_parks_the_rest() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        let root = c.manifest.root;
        w.fetch(&c, 1, &[]);
        let out = w.drain();
        let b = incoming(&mut w, 1, "b");
        // Chunk 2 is not here yet: parked, no answer.
        w.frame(b, &request(root, 2)).unwrap();
        assert!(w.drain().iter().all(|(c, _)| *c != b));
        // Chunk 0 arrives and is served at once (cut-through) …
        w.frame(ConnId::MANAGER, &c.chunk_msg(0)).unwrap();
        w.frame(b, &request(root, 0)).unwrap();
        let to_b: StdVec<_> = w.drain().into_iter().filter(|(c, _)| *c == b).collect();
        assert_eq!(to_b.len(), 1);
        assert_eq!(
            to_b[0].1,
            c.chunk_msg(0),
            "byte-identical to the encoder's Chunk"
        );
        // … and chunk 2 is answered once verified.
        w.serve(&out[2..3], &c);
        let to_b: StdVec<_> = w.drain().into_iter().filter(|(c, _)| *c == b).collect();
        assert_eq!(to_b.len(), 1);
        assert_eq!(to_b[0].1, c.chunk_msg(2));
        assert_eq!(w.agent.job_stats(7).unwrap().bytes_served, 2048);
        // A parked request that waits too long is refused NotYet.
        w.frame(b, &request(root, 9)).unwrap();
        assert!(w.drain().iter().all(|(c, _)| *c != b));
        assert!(w.agent.poll_timeout().unwrap() <= w.now + Duration::from_secs(5));
        w.now += Duration::from_secs(5);
        w.agent.handle_timeout(w.now);
        let to_b: StdVec<_> = w.drain().into_iter().filter(|(c, _)| *c == b).collect();
        assert_eq!(
            Message::decode(&to_b[0].1).unwrap(),
            Message::Refuse {
                root,
                index: 9,
                reason: Refusal::NotYet
            }
        );
    }

    #[test]
    fn a_relay_asks_its_source_twice_as_far_ahead() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 20 * 1024);
        let root = c.manifest.root;
        w.fetch(&c, 1, &[]);
        // Window of 4 from the manager.
        assert_eq!(requests(&w.drain()).len(), 4);
        // A peer asks for a chunk of the manager's range: this agent relays that range …
        let b = incoming(&mut w, 1, "b");
        w.frame(b, &request(root, 1)).unwrap();
        // … so it keeps 8 requests in flight to the manager.
        let more = requests(&w.drain());
        assert_eq!(
            more,
            [4, 5, 6, 7].map(|i| (ConnId::MANAGER, i)),
            "four more requests, in index order"
        );
    }

    #[test]
    fn busy_beyond_max_peers_and_unknown_content() {
        let mut w = world_with(store(), |c| c.max_peers = 1);
        let c = Content::new(&w.publisher, "fw", 1, 0, 2 * 1024);
        let root = c.manifest.root;
        w.fetch(&c, 1, &[]);
        let out = w.drain();
        w.serve(&out, &c);
        w.drain();
        let a = incoming(&mut w, 1, "pa");
        let b = incoming(&mut w, 2, "pb");
        w.frame(a, &request(root, 1)).unwrap();
        w.frame(b, &request(root, 1)).unwrap();
        w.frame(a, &request([5; 32], 0)).unwrap();
        let out = w.drain();
        let msgs: StdVec<_> = out
            .iter()
            .map(|(c, bytes)| (*c, Message::decode(bytes).unwrap()))
            .collect();
        assert!(matches!(msgs[0], (c, Message::Chunk { index: 1, .. }) if c == a));
        assert_eq!(
            msgs[1],
            (
                b,
                Message::Refuse {
                    root,
                    index: 1,
                    reason: Refusal::Busy
                }
            )
        );
        assert_eq!(
            msgs[2],
            (
                a,
                Message::Refuse {
                    root: [5; 32],
                    index: 0,
                    reason: Refusal::Unknown
                }
            )
        );
        // Once `a` leaves, `b` is served.
        w.agent.handle_disconnected(w.now, a);
        w.frame(b, &request(root, 1)).unwrap();
        assert!(matches!(
            Message::decode(&w.drain()[0].1).unwrap(),
            Message::Chunk { index: 1, .. }
        ));
    }

    fn failed(w: &mut World) -> Option<FailReason> {
        w.drain()
            .iter()
            .find_map(|(_, b)| match Message::decode(b).unwrap() {
                Message::Failed { reason, .. } => Some(reason),
                _ => None,
            })
    }

    #[test]
    fn downgrade_is_refused() {
        let mut w = world();
        let v2 = Content::new(&w.publisher, "fw", 2, 0, 2 * 1024);
        w.fetch(&v2, 1, &[]);
        let out = w.drain();
        w.serve(&out, &v2);
        w.drain();
        let v1 = Content::new(&w.publisher, "fw", 1, 0, 2 * 1024);
        let msg = Message::Fetch {
            job: JobRef { id: 8, epoch: 1 },
            manifest: v1.manifest.clone(),
            sources: heapless::Vec::new(),
            next: None,
        };
        w.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        assert_eq!(failed(&mut w), Some(FailReason::Downgrade));
        // The held version is untouched.
        assert_eq!(w.agent.store().verified(&v2.manifest.root), Some(2));
    }

    #[test]
    fn expired_manifest_is_refused() {
        let mut w = world();
        // Welcome said Unix time 1 000 000; one second later this expires.
        let c = Content::new(&w.publisher, "fw", 1, 1_000_001, 2 * 1024);
        w.now += Duration::from_secs(1);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::Expired));
        let fresh = Content::new(&w.publisher, "fw", 1, 2_000_000, 2 * 1024);
        w.fetch(&fresh, 2, &[]);
        assert_eq!(failed(&mut w), None);
    }

    #[test]
    fn untrusted_signer_and_large_chunks_are_refused() {
        let mut w = world();
        let stranger = Identity::from_seed([66; 32]);
        let c = Content::new(&stranger, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::BadSignature));
        // A forged signature by a trusted signer's id.
        let mut forged = Content::new(&w.publisher, "fw", 1, 0, 2 * 1024);
        forged.manifest.version = 5;
        w.fetch(&forged, 2, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::BadSignature));
        // Chunk size beyond this agent's limit.
        let mut w = world_with(store(), |c| c.max_chunk = 512);
        let c = Content::new(&w.publisher, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::ChunkTooLarge));
    }

    #[test]
    fn the_publishers_a_welcome_names_are_not_trusted() {
        let other = Identity::from_seed([77; 32]);
        let mut w = world();
        let welcome = Message::Welcome {
            cert: AgentCert::issue(&w.manager, id("a1"), Identity::from_seed([3; 32]).public()),
            unix_time: 1_000_000,
            publishers: heapless::Vec::from_slice(&[other.public()]).unwrap(),
        };
        w.frame(ConnId::MANAGER, &welcome.to_vec()).unwrap();
        let c = Content::new(&other, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::BadSignature));
        // The publisher the trust document lists is accepted.
        let c = Content::new(&w.publisher, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 2, &[]);
        assert_eq!(failed(&mut w), None);
    }

    #[test]
    fn stale_epochs_are_fenced() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 4 * 1024);
        w.fetch(&c, 3, &[]);
        w.drain();
        w.events();
        // A Cancel from an older epoch is ignored.
        w.frame(ConnId::MANAGER, &Message::Cancel { job: job(2) }.to_vec())
            .unwrap();
        assert!(w.agent.job_stats(7).is_some());
        assert!(matches!(w.events()[..], [Event::Ignored { .. }]));
        // So are stale Sources.
        let msg = Message::Sources {
            job: job(1),
            sources: heapless::Vec::from_slice(&[peer_source("p1", 0, 4)]).unwrap(),
        };
        w.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        assert!(
            !w.events()
                .iter()
                .any(|e| matches!(e, Event::Connect { .. }))
        );
        // The current epoch's Cancel is obeyed; the job's epoch is remembered.
        w.frame(ConnId::MANAGER, &Message::Cancel { job: job(3) }.to_vec())
            .unwrap();
        assert!(w.agent.job_stats(7).is_none());
        assert_eq!(w.events(), [Event::JobCancelled { job: job(3) }]);
        w.fetch(&c, 2, &[]);
        assert!(w.agent.job_stats(7).is_none(), "stale Fetch after Cancel");
        // A newer epoch restarts it, with the verified chunks kept.
        w.fetch(&c, 4, &[]);
        assert!(w.agent.job_stats(7).is_some());
    }

    #[test]
    fn resume_after_restart_fetches_only_the_missing_chunks() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        w.fetch(&c, 1, &[]);
        let out = w.drain();
        w.serve(&out, &c); // chunks 0..4
        w.drain();
        // "Restart": a new agent over the same flash.
        let World {
            agent, publisher, ..
        } = w;
        let (flash, records) = agent.store.into_parts();
        let mut store = FlashStore::new_multiwrite(flash).with_records(records.unwrap());
        store.mount().unwrap();
        let mut w = world_with(store, |_| {});
        w.publisher = publisher;
        // The report lists the holding.
        w.agent.handle_manager_connected(w.now);
        let out = w.drain();
        let Message::Report(r) = Message::decode(&out[0].1).unwrap() else {
            panic!("report first")
        };
        assert_eq!(r.holdings[0].verified, 4);
        assert!(!r.holdings[0].complete);
        w.fetch(&c, 2, &[]);
        assert!(w.events().contains(&Event::JobStarted {
            job: job(2),
            root: c.manifest.root,
            chunks: 10,
            resumed: 4
        }));
        let mut asked = StdVec::new();
        for _ in 0..10 {
            let out = w.drain();
            asked.extend(requests(&out).into_iter().map(|r| r.1));
            if w.serve(&out, &c) == 0 {
                break;
            }
        }
        asked.sort();
        assert_eq!(asked, [4, 5, 6, 7, 8, 9]);
        let s = w.agent.job_stats(7).unwrap();
        assert_eq!((s.resumed, s.fetched, s.verified), (4, 6, 10));
    }

    #[test]
    fn done_ends_the_job_and_undecodable_frames_are_errors() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 1024);
        w.fetch(&c, 1, &[]);
        let out = w.drain();
        w.serve(&out, &c);
        w.drain();
        w.events();
        w.frame(ConnId::MANAGER, &Message::Done { job: job(1) }.to_vec())
            .unwrap();
        assert_eq!(
            w.events(),
            [Event::JobDone {
                job: job(1),
                root: Some(c.manifest.root)
            }]
        );
        let err = w.frame(ConnId::MANAGER, &[0xFF, 0xFF, 0xFF]).unwrap_err();
        assert!(err.must_close());
        // A peer may not send manager instructions.
        let p = incoming(&mut w, 1, "p");
        let err = w
            .frame(p, &Message::Done { job: job(1) }.to_vec())
            .unwrap_err();
        assert_eq!(err, AgentError::Unexpected("Done"));
        // Unknown connections are refused.
        assert_eq!(
            w.frame(ConnId(999), &Message::Ping { nonce: 1 }.to_vec()),
            Err(AgentError::UnknownConn)
        );
    }

    #[test]
    fn storage_full_fails_the_job() {
        let small =
            FlashStore::new_multiwrite(Flash::new(8 * 1024)).with_records(Flash::new(8 * 1024));
        let mut w = world_with(small, |_| {});
        let c = Content::new(&w.publisher, "fw", 1, 0, 20 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::StorageFull));
    }

    #[test]
    fn write_error_mid_fetch_fails_the_job_and_keeps_the_chunk_unverified() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 4 * 1024);
        w.fetch(&c, 1, &[]);
        let out = w.drain();
        let writes = w.agent.store().flash().writes;
        w.agent.store_mut().flash_mut().fail_after = Some(writes + 1);
        w.serve(&out[..1], &c);
        let root = c.manifest.root;
        w.agent.store_mut().flash_mut().fail_after = None;
        assert!(!w.agent.store_mut().is_verified(&root, 0).unwrap());
        assert_eq!(failed(&mut w), Some(FailReason::StorageError));
    }

    #[test]
    fn sources_replace_the_ranges_they_name_even_with_a_full_source_table() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        // Eight peers, one chunk each: with the manager, every source slot is taken.
        let names = ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8"];
        let sources: StdVec<SourceRange> = names
            .iter()
            .enumerate()
            .map(|(i, n)| peer_source(n, i as u32, i as u32 + 1))
            .collect();
        w.fetch(&c, 1, &sources);
        w.events();
        // The manager names one new source for everything: it must be used, not dropped.
        let msg = Message::Sources {
            job: job(1),
            sources: heapless::Vec::from_slice(&[peer_source("p9", 0, 10)]).unwrap(),
        };
        w.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        let j = &w.agent.jobs[0];
        let slot = j
            .sources
            .iter()
            .position(|s| s.id() == Some(&id("p9")))
            .expect("p9 has a source slot");
        for i in 0..10 {
            assert_eq!(j.ranges[j.owner(i)].slot as usize, slot, "chunk {i}");
        }
        // The older ranges are gone, not merely shadowed.
        assert_eq!(j.ranges.len(), 2);
    }

    #[test]
    fn a_source_window_grows_on_a_clear_path_and_shrinks_behind_a_queue() {
        let mut slot = SourceSlot::new(None);
        let rtt = Duration::from_millis(100);
        let mut now = Duration::from_secs(1);
        assert_eq!(slot.window(3), 3);
        // Every chunk takes the bare round trip: one more request per round trip.
        for _ in 0..40 {
            now += rtt;
            slot.pace_window(3, now, rtt);
        }
        assert_eq!(slot.window(3), MAX_WINDOW);
        // Now each takes four round trips (requests wait at the source): it shrinks, to
        // no fewer than MIN_PACED_WINDOW.
        for _ in 0..40 {
            now += rtt;
            slot.pace_window(3, now, 4 * rtt);
        }
        assert_eq!(slot.window(3), MIN_PACED_WINDOW);
        // A smaller configured window is a smaller floor, and it is where a source starts.
        assert_eq!(SourceSlot::new(None).window(1), 1);
        for _ in 0..40 {
            now += rtt;
            slot.pace_window(1, now, 10 * rtt);
        }
        assert_eq!(slot.window(1), 1);
    }

    #[test]
    fn moved_stripe_boundaries_and_a_new_source_fit_a_full_source_table() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 16 * 1024);
        // Eight peers, two chunks each: with the manager, every source slot is taken.
        let names = ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8"];
        let stripes = |cuts: [u32; 9], who: [&str; 8]| -> StdVec<SourceRange> {
            (0..8)
                .map(|i| peer_source(who[i], cuts[i], cuts[i + 1]))
                .collect()
        };
        w.fetch(&c, 1, &stripes([0, 2, 4, 6, 8, 10, 12, 14, 16], names));
        w.events();
        // The plan was adapted: every boundary moved, and p1's stripe went to p9. The new
        // list names p9 first, while p1's old range still overlaps p2's new one: p1's slot
        // must free up before p9 needs one.
        let mut moved = names;
        moved[0] = "p9";
        let list = stripes([0, 1, 3, 5, 7, 9, 11, 13, 16], moved);
        let msg = Message::Sources {
            job: job(1),
            sources: heapless::Vec::from_slice(&list).unwrap(),
        };
        w.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        assert!(
            !w.events()
                .iter()
                .any(|e| matches!(e, Event::Ignored { .. })),
            "no range dropped"
        );
        let j = &w.agent.jobs[0];
        for (k, sr) in list.iter().enumerate() {
            let Source::Peer { id: want, .. } = &sr.source else {
                unreachable!()
            };
            for i in sr.first..sr.end {
                let slot = &j.sources[j.ranges[j.owner(i)].slot as usize];
                assert_eq!(slot.id(), Some(want), "stripe {k}, chunk {i}");
            }
        }
    }

    #[test]
    fn a_source_that_only_refuses_not_yet_is_reported_in_the_end() {
        let mut w = world();
        let c = Content::new(&w.publisher, "fw", 1, 0, 10 * 1024);
        let peer = with_peer(&mut w, &c);
        let start = w.now;
        let mut reported = false;
        for _ in 0..10_000 {
            let out = w.drain();
            if kinds(&out).contains(&"PeerTrouble") {
                reported = true;
                break;
            }
            for (conn, index) in requests(&out) {
                if conn == peer {
                    let refuse = Message::Refuse {
                        root: c.manifest.root,
                        index,
                        reason: Refusal::NotYet,
                    };
                    w.frame(peer, &refuse.to_vec()).unwrap();
                }
            }
            w.now = w.agent.poll_timeout().unwrap().max(w.now + MS);
            w.agent.handle_timeout(w.now);
        }
        assert!(reported, "never reported");
        let after = w.now - start;
        let limit = AgentConfig::new(id("x")).park_timeout * NOT_YET_PARKS;
        assert!(
            after >= limit && after < limit + Duration::from_secs(2),
            "{after:?}"
        );
    }

    // ------------------------------------------------------------ trust

    /// Sends `signed` as the manager's `Trust` and returns the trust events it caused.
    fn send_trust(w: &mut World, signed: &SignedTrust) -> StdVec<Event> {
        w.frame(ConnId::MANAGER, &trust_msg(signed)).unwrap();
        w.events()
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::TrustAccepted { .. }
                        | Event::TrustRefused { .. }
                        | Event::Ignored { .. }
                        | Event::RecordFailed { .. }
                )
            })
            .collect()
    }

    fn refused(reason: TrustError, version: u64) -> StdVec<Event> {
        std::vec![Event::TrustRefused { version, reason }]
    }

    #[test]
    fn trust_documents_are_accepted_only_under_the_roots_thresholds() {
        let mut w = world();
        let (root, publisher) = (w.root.clone(), w.publisher.clone());
        let (r2, r3, stranger) = (
            Identity::from_seed([21; 32]),
            Identity::from_seed([22; 32]),
            Identity::from_seed([23; 32]),
        );
        let grants: &[(&Identity, &[&str])] = &[(&publisher, &["*"])];
        // Signed by a key that is not a root: refused.
        let forged = trust_doc(2, 0, &[&stranger], 1, grants, &[&stranger]);
        assert_eq!(
            send_trust(&mut w, &forged),
            refused(TrustError::OldRootsBelowThreshold, 2)
        );
        // Rotation to {r2, r3} (2 of 2) signed by the old root and one new root: refused.
        let rotation = |signers: &[&Identity]| trust_doc(2, 0, &[&r2, &r3], 2, grants, signers);
        assert_eq!(
            send_trust(&mut w, &rotation(&[&root, &r2])),
            refused(TrustError::NewRootsBelowThreshold, 2)
        );
        // By both new roots alone: the old threshold is missing.
        assert_eq!(
            send_trust(&mut w, &rotation(&[&r2, &r3])),
            refused(TrustError::OldRootsBelowThreshold, 2)
        );
        // Garbage: refused as malformed.
        w.frame(
            ConnId::MANAGER,
            &Message::Trust {
                document: &[1, 2, 3],
            }
            .to_vec(),
        )
        .unwrap();
        assert_eq!(
            w.events(),
            refused(TrustError::Malformed, 0),
            "an undecodable document"
        );
        assert_eq!(w.agent.trust_anchor().unwrap().version, 1);
        // Both thresholds met: accepted, persisted.
        assert_eq!(
            send_trust(&mut w, &rotation(&[&root, &r2, &r3])),
            std::vec![Event::TrustAccepted {
                version: 2,
                newer: true
            }]
        );
        let stored = w.agent.store_mut().load_anchor().unwrap().unwrap();
        assert_eq!(stored.anchor.version, 2);
        assert_eq!(stored.anchor.roots.len(), 2);
        // The old root alone can sign nothing any more.
        let by_old = trust_doc(3, 0, &[&root], 1, grants, &[&root]);
        assert_eq!(
            send_trust(&mut w, &by_old),
            refused(TrustError::OldRootsBelowThreshold, 3)
        );
        // The held version again: no event; an older one: skipped quietly; the held version
        // with other contents: a conflict.
        assert!(send_trust(&mut w, &rotation(&[&root, &r2, &r3])).is_empty());
        let v1 = default_trust();
        assert!(matches!(
            send_trust(&mut w, &v1)[..],
            [Event::Ignored { .. }]
        ));
        let other = trust_doc(2, 0, &[&r2, &r3], 2, &[(&stranger, &["*"])], &[&r2, &r3]);
        assert_eq!(send_trust(&mut w, &other), refused(TrustError::Conflict, 2));
        // Content signed by the publisher the held document lists is accepted.
        let c = Content::new(&publisher, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), None);
    }

    #[test]
    fn a_content_name_that_could_leave_a_directory_is_refused() {
        let (root, publisher) = (root_key(), publisher_key());
        let doc = trust_doc(1, 0, &[&root], 1, &[(&publisher, &["app-*"])], &[&root]);
        let mut w = world_trusting(store(), Some(doc), |_| {});
        for (epoch, name) in [
            "app-/../../../../etc/cron.d/x",
            "app-..",
            "app-a\\b",
            "app-\u{1b}[2J",
        ]
        .into_iter()
        .enumerate()
        {
            let c = Content::new(&publisher, name, 1, 0, 2 * 1024);
            w.fetch(&c, epoch as u32 + 1, &[]);
            assert_eq!(failed(&mut w), Some(FailReason::BadManifest), "{name:?}");
        }
        let c = Content::new(&publisher, "app-router.v2_x", 1, 0, 2 * 1024);
        w.fetch(&c, 9, &[]);
        assert_eq!(failed(&mut w), None);
        assert!(content_name_is_safe("a.b-c_d"));
        assert!(!content_name_is_safe(""));
    }

    #[test]
    fn a_publisher_is_refused_for_names_it_is_not_listed_for_and_rotation_revokes_it() {
        let (root, publisher) = (root_key(), publisher_key());
        let newer = Identity::from_seed([31; 32]);
        let doc = trust_doc(1, 0, &[&root], 1, &[(&publisher, &["fw-*"])], &[&root]);
        let mut w = world_trusting(store(), Some(doc), |_| {});
        let c = Content::new(&publisher, "bootloader", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::NotListed));
        let c = Content::new(&publisher, "fw-router", 1, 0, 2 * 1024);
        w.fetch(&c, 2, &[]);
        assert_eq!(failed(&mut w), None);
        // Rotated publisher: the old key is refused from then on, the new one accepted.
        let doc = trust_doc(2, 0, &[&root], 1, &[(&newer, &["fw-*"])], &[&root]);
        assert!(matches!(
            send_trust(&mut w, &doc)[..],
            [Event::TrustAccepted { version: 2, .. }]
        ));
        let c = Content::new(&publisher, "fw-router", 2, 0, 2 * 1024);
        w.fetch(&c, 3, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::BadSignature));
        let c = Content::new(&newer, "fw-router", 2, 0, 2 * 1024);
        w.fetch(&c, 4, &[]);
        assert_eq!(failed(&mut w), None);
    }

    #[test]
    fn records_that_cannot_be_read_refuse_every_manifest() {
        // A record area too small to hold its two banks: every record read fails. The
        // agent must not fall back to the pinned roots (an older document could then be
        // taken again): it refuses content.
        let broken =
            FlashStore::new_multiwrite(Flash::new(128 * 1024)).with_records(Flash::new(256));
        let mut w = world_trusting(broken, None, |_| {});
        w.frame(ConnId::MANAGER, &trust_msg(&default_trust()))
            .unwrap();
        assert!(w.agent.trust_anchor().is_none());
        assert!(w.agent.trust_document().is_none());
        let c = Content::new(&w.publisher, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::NoTrust));
    }

    #[test]
    fn without_a_root_key_or_a_document_every_manifest_is_refused() {
        let mut w = world_trusting(store(), None, |c| c.roots.clear());
        w.frame(ConnId::MANAGER, &trust_msg(&default_trust()))
            .unwrap();
        assert!(
            w.agent.trust_document().is_none(),
            "a document is not taken"
        );
        let c = Content::new(&w.publisher, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::NoTrust));
        // Pinned, but the manager has not sent a document yet.
        let mut w = world_trusting(store(), None, |_| {});
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::NoTrust));
        w.frame(ConnId::MANAGER, &trust_msg(&default_trust()))
            .unwrap();
        w.fetch(&c, 2, &[]);
        assert_eq!(failed(&mut w), None);
    }

    #[test]
    fn an_expired_document_refuses_manifests() {
        let (root, publisher) = (root_key(), publisher_key());
        // Valid for ten more seconds from the Welcome's Unix time.
        let doc = trust_doc(1, 1_000_010, &[&root], 1, &[(&publisher, &["*"])], &[&root]);
        let mut w = world_trusting(store(), Some(doc), |_| {});
        let c = Content::new(&publisher, "fw", 1, 0, 2 * 1024);
        w.fetch(&c, 1, &[]);
        assert_eq!(failed(&mut w), None);
        w.now += Duration::from_secs(10);
        let c = Content::new(&publisher, "fw", 2, 0, 2 * 1024);
        w.fetch(&c, 2, &[]);
        assert_eq!(failed(&mut w), Some(FailReason::Expired));
    }

    /// Fetches `c` as job `id` from the manager to completion.
    fn fetch_whole(w: &mut World, c: &Content, id: u64) {
        let msg = Message::Fetch {
            job: JobRef { id, epoch: 1 },
            manifest: c.manifest.clone(),
            sources: heapless::Vec::new(),
            next: None,
        };
        w.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        for _ in 0..100 {
            let out = w.drain();
            if w.serve(&out, c) == 0 {
                break;
            }
        }
        assert_eq!(
            w.agent.store().verified(&c.manifest.root),
            Some(c.manifest.chunks())
        );
    }

    fn fetch_as(w: &mut World, c: &Content, id: u64) -> Option<FailReason> {
        let msg = Message::Fetch {
            job: JobRef { id, epoch: 1 },
            manifest: c.manifest.clone(),
            sources: heapless::Vec::new(),
            next: None,
        };
        w.frame(ConnId::MANAGER, &msg.to_vec()).unwrap();
        failed(w)
    }

    #[test]
    fn rollback_and_version_reuse_are_refused_after_the_content_was_replaced() {
        let mut w = world();
        let p = w.publisher.clone();
        let v2 = Content::new(&p, "fw", 2, 0, 2 * 1024);
        fetch_whole(&mut w, &v2, 10);
        // Other content replaces it (the flash store holds one content).
        let other = Content::new(&p, "config", 1, 0, 3 * 1024);
        fetch_whole(&mut w, &other, 11);
        assert_eq!(w.agent.store().verified(&v2.manifest.root), None);
        let v1 = Content::new(&p, "fw", 1, 0, 2 * 1024);
        assert_eq!(fetch_as(&mut w, &v1, 12), Some(FailReason::Downgrade));
        // Version 2 with another root (same version, other bytes).
        let v2b = Content::new(&p, "fw", 2, 0, 3 * 1024);
        assert_eq!(fetch_as(&mut w, &v2b, 13), Some(FailReason::VersionReused));
        // The same version 2 again, and a newer version, are accepted.
        assert_eq!(fetch_as(&mut w, &v2, 14), None);
        let v3 = Content::new(&p, "fw", 3, 0, 2 * 1024);
        assert_eq!(fetch_as(&mut w, &v3, 15), None);
        assert_eq!(
            w.agent.store_mut().version_record("fw"),
            Ok(Some(VersionRecord {
                version: 3,
                root: v3.manifest.root
            }))
        );
    }

    #[test]
    fn trust_and_version_records_survive_a_restart_of_the_agent() {
        let (root, publisher) = (root_key(), publisher_key());
        let mut w = world();
        let v2 = Content::new(&publisher, "fw", 2, 0, 2 * 1024);
        assert_eq!(fetch_as(&mut w, &v2, 1), None);
        let doc2 = trust_doc(2, 0, &[&root], 1, &[(&publisher, &["*"])], &[&root]);
        send_trust(&mut w, &doc2);
        // Power cycle: new agent over the same flash, content erased meanwhile.
        let (_, records) = w.agent.store.into_parts();
        let fresh =
            FlashStore::new_multiwrite(Flash::new(128 * 1024)).with_records(records.unwrap());
        let mut w = world_trusting(fresh, None, |_| {});
        assert_eq!(w.agent.trust_anchor().unwrap().version, 2);
        // The manager sends its chain oldest first: v1 is skipped, v2 (held) taken again.
        assert!(matches!(
            send_trust(&mut w, &default_trust())[..],
            [Event::Ignored { .. }]
        ));
        assert!(w.agent.trust_document().is_none());
        assert_eq!(
            send_trust(&mut w, &doc2),
            std::vec![Event::TrustAccepted {
                version: 2,
                newer: false
            }]
        );
        let v1 = Content::new(&publisher, "fw", 1, 0, 2 * 1024);
        assert_eq!(fetch_as(&mut w, &v1, 2), Some(FailReason::Downgrade));
        // Re-provisioned with another root: the stored anchor is not used.
        let (_, records) = w.agent.store.into_parts();
        let other = Identity::from_seed([41; 32]);
        let fresh =
            FlashStore::new_multiwrite(Flash::new(128 * 1024)).with_records(records.unwrap());
        let w = world_trusting(fresh, None, |c| {
            c.roots = heapless::Vec::from_slice(&[other.public()]).unwrap();
        });
        assert_eq!(w.agent.trust_anchor().unwrap().version, 0);
    }

    #[test]
    fn the_manager_clock_never_goes_back_and_is_persisted_hourly() {
        let mut w = world();
        assert_eq!(w.agent.store_mut().load_latest_time(), Ok(Some(1_000_000)));
        // Half an hour on: not written again.
        w.now += Duration::from_secs(1800);
        w.agent.handle_timeout(w.now);
        assert_eq!(w.agent.store_mut().load_latest_time(), Ok(Some(1_000_000)));
        w.now += Duration::from_secs(1800);
        w.agent.handle_timeout(w.now);
        assert_eq!(w.agent.store_mut().load_latest_time(), Ok(Some(1_003_600)));
        // A manager whose clock is behind does not move the agent's time back.
        let welcome = |unix_time| Message::Welcome {
            cert: AgentCert::issue(&w.manager, id("a1"), Identity::from_seed([3; 32]).public()),
            unix_time,
            publishers: heapless::Vec::new(),
        };
        let back = welcome(500_000);
        w.frame(ConnId::MANAGER, &back.to_vec()).unwrap();
        assert_eq!(w.agent.unix_time(w.now), Some(1_003_600));
        w.now += Duration::from_secs(5);
        assert_eq!(w.agent.unix_time(w.now), Some(1_003_605));
        // After a reboot the floor is the persisted time: content that expired before it
        // stays expired, whatever time the manager claims.
        let (_, records) = w.agent.store.into_parts();
        let fresh =
            FlashStore::new_multiwrite(Flash::new(128 * 1024)).with_records(records.unwrap());
        let mut w = world_with(fresh, |_| {});
        assert_eq!(w.agent.unix_time(w.now), Some(1_003_600));
        let c = Content::new(&w.publisher, "fw", 1, 1_003_000, 2 * 1024);
        assert_eq!(fetch_as(&mut w, &c, 1), Some(FailReason::Expired));
    }

    #[test]
    fn the_system_clock_judges_expiry_when_configured() {
        let mut w = world_with(store(), |c| c.clock = AgentClock::System);
        // The Welcome's time is not used; nothing is persisted.
        assert_eq!(w.agent.unix_time(w.now), None);
        w.agent.set_system_time(w.now, 2_000_000);
        assert_eq!(
            w.agent.unix_time(w.now + Duration::from_secs(3)),
            Some(2_000_003)
        );
        let c = Content::new(&w.publisher, "fw", 1, 1_500_000, 2 * 1024);
        assert_eq!(fetch_as(&mut w, &c, 1), Some(FailReason::Expired));
        let c = Content::new(&w.publisher, "fw", 1, 2_500_000, 2 * 1024);
        assert_eq!(fetch_as(&mut w, &c, 2), None);
        assert_eq!(w.agent.store_mut().load_latest_time(), Ok(None));
    }

    #[test]
    fn a_full_version_record_table_fails_the_job_with_storage_full() {
        let mut w = world();
        let p = w.publisher.clone();
        for i in 0..crate::records::MAX_NAMES {
            let c = Content::new(&p, &std::format!("n{i}"), 1, 0, 1024);
            let id = 100 + i as u64;
            assert_eq!(fetch_as(&mut w, &c, id), None, "{i}");
            let cancel = Message::Cancel {
                job: JobRef { id, epoch: 1 },
            };
            w.frame(ConnId::MANAGER, &cancel.to_vec()).unwrap();
            w.events();
        }
        let c = Content::new(&p, "one-more", 1, 0, 1024);
        assert_eq!(fetch_as(&mut w, &c, 1), Some(FailReason::StorageFull));
        assert!(w.events().iter().any(|e| matches!(
            e,
            Event::RecordFailed {
                error: StoreError::Full,
                ..
            }
        )));
    }

    // ------------------------------------------------ revocation (issue 13)

    /// A world whose agent pins the manager's key.
    fn pinned_world() -> World {
        world_with(store(), |c| {
            c.manager_key = Some(Identity::from_seed([1; 32]).public())
        })
    }

    /// `Message::Revocations` carrying `list`.
    fn revocations_frame(list: &RevocationList) -> StdVec<u8> {
        let mut buf = [0u8; baton_protocol::revocation::MAX_REVOCATION_BYTES];
        let n = postcard::to_slice(list, &mut buf).unwrap().len();
        Message::Revocations { list: &buf[..n] }.to_vec()
    }

    fn revoking(by: &Identity, version: u64, who: &[(&str, u64)]) -> RevocationList {
        let entries = who
            .iter()
            .map(|(a, s)| baton_protocol::revocation::Revoked {
                id: id(a),
                up_to_serial: *s,
            })
            .collect();
        RevocationList::sign(by, version, 1_000_000, entries)
    }

    #[test]
    fn a_newer_signed_revocation_list_closes_sessions_with_the_agents_it_revokes() {
        let mut w = pinned_world();
        let victim = incoming(&mut w, 1, "victim");
        let keeper = incoming(&mut w, 2, "keeper");
        w.events();
        // Not signed by the pinned manager key: ignored, nothing closed.
        let forged = revoking(&Identity::from_seed([9; 32]), 5, &[("keeper", 9)]);
        w.frame(ConnId::MANAGER, &revocations_frame(&forged))
            .unwrap();
        assert!(
            !w.events()
                .iter()
                .any(|e| matches!(e, Event::Close { .. } | Event::Revocations { .. }))
        );
        assert!(w.agent.revocations().is_none());

        let list = revoking(&w.manager, 2, &[("victim", 4)]);
        w.frame(ConnId::MANAGER, &revocations_frame(&list)).unwrap();
        let events = w.events();
        assert!(events.contains(&Event::Revocations {
            version: 2,
            entries: 1
        }));
        assert!(events.contains(&Event::Close { conn: victim }));
        assert!(!events.contains(&Event::Close { conn: keeper }));
        assert_eq!(w.agent.revocations().map(|l| l.version), Some(2));

        // An older list is not taken; the peer check refuses the victim's certificates.
        let older = revoking(&w.manager, 1, &[]);
        w.frame(ConnId::MANAGER, &revocations_frame(&older))
            .unwrap();
        assert_eq!(w.agent.revocations().map(|l| l.version), Some(2));
        let key = Identity::from_seed([7; 32]).public();
        let cert = |who: &str, serial| {
            AgentCert::issue_with_term(&w.manager, id(who), key, Name::new(), 0, serial, 2_000_000)
        };
        assert_eq!(
            w.agent.peer_cert_acceptable(&cert("victim", 4), w.now),
            Err(revocation::CertRefusal::Revoked)
        );
        assert_eq!(
            w.agent.peer_cert_acceptable(&cert("victim", 5), w.now),
            Ok(())
        );
        assert_eq!(
            w.agent.peer_cert_acceptable(&cert("keeper", 1), w.now),
            Ok(())
        );
        // Expiry is judged by the manager's clock as learnt from the Welcome.
        let short =
            AgentCert::issue_with_term(&w.manager, id("keeper"), key, Name::new(), 0, 1, 1_000_005);
        assert_eq!(w.agent.peer_cert_acceptable(&short, w.now), Ok(()));
        assert_eq!(
            w.agent
                .peer_cert_acceptable(&short, w.now + Duration::from_secs(5)),
            Err(revocation::CertRefusal::Expired)
        );
    }

    #[test]
    fn a_renewed_certificate_replaces_ours_only_when_it_is_ours_and_the_managers() {
        let mut w = pinned_world();
        let held = w.agent.cert().unwrap().clone();
        let renewed = AgentCert::issue_with_term(
            &w.manager,
            held.id.clone(),
            held.key,
            held.segment.clone(),
            held.score,
            held.serial + 3,
            2_000_000,
        );
        let mut other = renewed.clone();
        other.id = id("a2");
        for bad in [
            other,
            AgentCert::issue_with_term(
                &Identity::from_seed([9; 32]),
                held.id.clone(),
                held.key,
                held.segment.clone(),
                0,
                held.serial + 5,
                2_000_000,
            ),
        ] {
            w.frame(
                ConnId::MANAGER,
                &Message::CertRenewed { cert: bad }.to_vec(),
            )
            .unwrap();
            assert_eq!(w.agent.cert(), Some(&held));
        }
        w.frame(
            ConnId::MANAGER,
            &Message::CertRenewed {
                cert: renewed.clone(),
            }
            .to_vec(),
        )
        .unwrap();
        assert_eq!(w.agent.cert(), Some(&renewed));
        assert!(w.events().contains(&Event::CertRenewed {
            serial: renewed.serial,
            not_after: 2_000_000
        }));
        // From a peer, neither message is taken.
        let peer = incoming(&mut w, 3, "a3");
        assert_eq!(
            w.frame(peer, &Message::CertRenewed { cert: held.clone() }.to_vec()),
            Err(AgentError::Unexpected("CertRenewed"))
        );
        assert_eq!(w.agent.cert(), Some(&renewed));
    }
}
