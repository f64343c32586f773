//! Every message exchanged inside an established session.
//!
//! One enum serves all links (agent ↔ manager, agent ↔ agent); each side
//! refuses the variants it does not expect from the other. postcard encodes
//! the variant as its index, so variants are only ever appended at the end
//! and never reordered; the golden tests in `tests/golden.rs` pin the bytes.
//!
//! The flow (claims 1, 3, 5): an agent sends its [`Report`]; the manager
//! answers [`Message::Welcome`], later a [`Message::Fetch`] naming the content
//! and its sources; the agent requests chunks ([`Message::ChunkRequest`]) from
//! those sources, verifies each [`Message::Chunk`] against the manifest, sends
//! [`Message::Progress`], then [`Message::Have`] and [`Message::NextPlease`];
//! the manager answers [`Message::Done`] once its list is exhausted.

use serde::{Deserialize, Serialize};

use crate::identity::AgentCert;
use crate::manifest::{MAX_CONTENT_NAME, Manifest};
use crate::merkle::Proof;
use crate::types::{AgentId, Delay, Digest, JobRef, Label, LinkInfo, Name, PeerAddr, PublicKey};
use crate::types::{MAX_DELAYS, MAX_LABELS};

/// Most source ranges one [`Message::Fetch`] or [`Message::Sources`] carries.
pub const MAX_SOURCES_PER_MESSAGE: usize = 16;
/// Most per-source byte counts one [`Message::Progress`] carries.
pub const MAX_RECEIVED_PER_PROGRESS: usize = 16;
/// Most held contents one [`Report`] lists.
pub const MAX_HOLDINGS: usize = 4;
/// Most trusted publisher keys one [`Message::Welcome`] carries.
pub const MAX_PUBLISHERS: usize = 4;
/// Most members one [`SegmentReport`] page carries; larger segments are sent in several pages.
pub const MAX_MEMBERS_PER_PAGE: usize = 4;
/// Most content names one [`Message::Running`] lists.
pub const MAX_RUNNING: usize = 8;
/// Longest output tail one [`Message::InstallStatus`] carries, in bytes (the end of what the
/// command wrote; a receiver refuses a longer one).
pub const MAX_INSTALL_OUTPUT: usize = 2048;

/// What an agent says of itself (claims 1 and 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Report {
    /// The agent's id (must equal the id it authenticated with).
    pub id: AgentId,
    /// Where peers reach it, if it serves peers.
    pub listen: Option<PeerAddr>,
    /// Site or location, e.g. `fra-2`.
    pub site: Name,
    /// LAN segment it sits on, e.g. `fra-2/rack-4`.
    pub segment: Name,
    /// Performance class: a relative CPU/IO score, higher is faster (1..=1000).
    pub performance: u32,
    /// Free storage for content, in bytes.
    pub free_storage: u64,
    /// Whether it is willing to serve chunks to peers.
    pub can_serve: bool,
    /// Largest chunk size it can receive, in bytes.
    pub max_chunk: u32,
    /// Most distinct sources it can track for one job.
    pub max_sources: u16,
    /// Most peers it serves at once.
    pub max_peers: u16,
    /// Link speed and reliability.
    pub link: LinkInfo,
    /// Measured round-trip times to the manager and peers.
    pub delays: heapless::Vec<Delay, MAX_DELAYS>,
    /// Labels from its configuration.
    pub labels: heapless::Vec<Label, MAX_LABELS>,
    /// Content it already holds (possibly partly), so the manager can resume.
    pub holdings: heapless::Vec<Holding, MAX_HOLDINGS>,
}

/// Content an agent holds, with how much of it is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Holding {
    /// The content's Merkle root.
    pub root: Digest,
    /// Chunks verified and stored.
    pub verified: u32,
    /// Whether every chunk is verified.
    pub complete: bool,
}

/// Where an agent is told to fetch chunks from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Source {
    /// The manager, over the agent's existing manager session.
    Manager,
    /// Another agent, at an address, whose key the fetcher must see in the handshake.
    Peer {
        /// The peer's id.
        id: AgentId,
        /// Where it listens.
        addr: PeerAddr,
        /// Its Ed25519 public key.
        key: PublicKey,
    },
}

/// A source for the chunks `first..end` of the content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SourceRange {
    /// Who to ask.
    pub source: Source,
    /// First chunk index covered.
    pub first: u32,
    /// One past the last chunk index covered.
    pub end: u32,
}

/// Bytes of chunk data received from one source since the previous progress report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Received {
    /// `None` for the manager, else the peer's id.
    pub from: Option<AgentId>,
    /// Verified chunk bytes received from it.
    pub bytes: u64,
}

/// Why an agent gave up on a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum FailReason {
    /// Not enough storage for the content.
    StorageFull,
    /// Storage failed to read or write.
    StorageError,
    /// The manifest is malformed or out of limits.
    BadManifest,
    /// The manifest's signer is not trusted or its signature is wrong.
    BadSignature,
    /// The manifest has expired.
    Expired,
    /// The content is older than the version held.
    Downgrade,
    /// Busy with another job.
    Busy,
    /// No usable source is left for some chunks.
    NoSource,
    /// The chunk size is larger than this agent accepts.
    ChunkTooLarge,
    /// The manifest's publisher is listed in the trust document, but not for this name.
    NotListed,
    /// The version accepted before for this name, with another root.
    VersionReused,
    /// The agent holds no trust document (or has no root key) to judge the manifest.
    NoTrust,
}

/// What went wrong with a peer, reported to the manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Trouble {
    /// It sent a chunk that failed verification.
    BadChunk {
        /// The chunk index.
        index: u32,
    },
    /// It could not be reached, or its session failed.
    Unreachable,
    /// It refused requests as unknown content or busy for too long.
    Refused,
}

/// Why a chunk request was not answered with data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Refusal {
    /// The content is known but this chunk is not verified here yet; ask again later.
    NotYet,
    /// Serving too many peers or requests; ask again later or elsewhere.
    Busy,
    /// This side does not hold that content.
    Unknown,
}

/// Where an agent's install step for a job's content stands, after the content was confirmed
/// (`Have`): the states past delivery (SPEC.md §4, "Install states").
///
/// `Installing` → `Installed` → `Running`, or `Failed` / `RolledBack` from either of the
/// first two; the last three are final. An agent may skip a state (a quick install reports
/// `Running` only), never go back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum InstallState {
    /// The install command runs.
    Installing,
    /// The install command succeeded; the health check runs, or a restart is pending.
    Installed,
    /// The new version runs and passed its health check.
    Running,
    /// The install failed (its command's exit code and output tail say why); nothing was
    /// rolled back (no rollback command, or it failed too).
    Failed,
    /// The install or health check failed and the rollback command restored the previous
    /// version (the output tail is the rollback command's).
    RolledBack,
}

impl InstallState {
    /// A short lowercase name: `installing`, `installed`, `running`, `failed`, `rolled back`.
    pub fn name(self) -> &'static str {
        match self {
            InstallState::Installing => "installing",
            InstallState::Installed => "installed",
            InstallState::Running => "running",
            InstallState::Failed => "failed",
            InstallState::RolledBack => "rolled back",
        }
    }

    /// The state [`name`](Self::name) gives, if `s` is one.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            InstallState::Installing,
            InstallState::Installed,
            InstallState::Running,
            InstallState::Failed,
            InstallState::RolledBack,
        ]
        .into_iter()
        .find(|st| st.name() == s)
    }

    /// Whether nothing follows this state for the same job (`running`, `failed`, `rolled back`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            InstallState::Running | InstallState::Failed | InstallState::RolledBack
        )
    }

    /// Whether a participant in state `self` may move to `next`: only forward, never out of a
    /// final state (so `running` → `installing` for the same job is refused). The same state
    /// again is not a move (a repeated report).
    pub fn may_become(self, next: InstallState) -> bool {
        !self.is_final() && next > self
    }
}

/// A content name and the version of it that runs on an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RunningVersion {
    /// The content name (a manifest's `name`).
    pub name: heapless::String<MAX_CONTENT_NAME>,
    /// The version that runs.
    pub version: u64,
}

/// One message inside a session. `data` in [`Message::Chunk`] borrows from the frame.
///
/// `Fetch` and `Sources` are large (bounded lists, no heap in this crate); decoders
/// hold one message at a time, so the size is paid once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Message<'a> {
    /// Agent → manager: what the agent is (claims 1, 2). Sent first, and again when it changes.
    Report(Report),
    /// Agent → manager: chunks verified so far, and bytes received per source.
    Progress {
        /// The job.
        job: JobRef,
        /// Chunks verified and stored.
        verified: u32,
        /// Bytes received per source since the previous report.
        received: heapless::Vec<Received, MAX_RECEIVED_PER_PROGRESS>,
    },
    /// Agent → manager: confirmation that every chunk is verified and stored.
    Have {
        /// The job.
        job: JobRef,
        /// The content's root, as a check.
        root: Digest,
    },
    /// Agent → manager: the agent gave up on the job.
    Failed {
        /// The job.
        job: JobRef,
        /// Why.
        reason: FailReason,
    },
    /// Agent → manager: asks for further instructions (claim 1's store-and-forward loop).
    NextPlease {
        /// The job.
        job: JobRef,
    },
    /// Agent → manager: a peer misbehaved or is unreachable.
    PeerTrouble {
        /// The job.
        job: JobRef,
        /// The peer.
        peer: AgentId,
        /// What happened.
        trouble: Trouble,
    },
    /// Manager → agent: the agent's certificate, the time, and trusted publisher keys.
    Welcome {
        /// The manager's certificate for this agent, shown to peers in handshakes.
        cert: AgentCert,
        /// The manager's clock, Unix seconds (for manifest expiry).
        unix_time: u64,
        /// Publisher keys the manager vouches for. Agents no longer trust these (publishers
        /// come from the root-signed trust document, [`Message::Trust`]); managers send none.
        publishers: heapless::Vec<PublicKey, MAX_PUBLISHERS>,
    },
    /// Manager → agent: fetch this content from these sources (claims 3, 5).
    Fetch {
        /// The job.
        job: JobRef,
        /// The content.
        manifest: Manifest,
        /// Sources per chunk range; later entries win where ranges overlap.
        sources: heapless::Vec<SourceRange, MAX_SOURCES_PER_MESSAGE>,
        /// The next participant on the list, which will fetch from this agent (claim 3).
        next: Option<AgentId>,
    },
    /// Manager → agent: further or replacement sources for a job already fetching.
    Sources {
        /// The job.
        job: JobRef,
        /// Sources per chunk range; they override earlier ones where ranges overlap.
        sources: heapless::Vec<SourceRange, MAX_SOURCES_PER_MESSAGE>,
    },
    /// Manager → agent: the list is exhausted; no participant needs anything more for this job.
    Done {
        /// The job.
        job: JobRef,
    },
    /// Manager → agent: stop working on the job (verified chunks are kept).
    Cancel {
        /// The job.
        job: JobRef,
    },
    /// Any → source: send chunk `index` of the content with this root.
    ChunkRequest {
        /// Content root.
        root: Digest,
        /// Chunk index.
        index: u32,
    },
    /// Source → any: a chunk with its Merkle proof.
    Chunk {
        /// Content root.
        root: Digest,
        /// Chunk index.
        index: u32,
        /// Sibling hashes from the leaf to the root.
        proof: Proof,
        /// The chunk's bytes.
        data: &'a [u8],
    },
    /// Source → any: a chunk request that is not answered with data.
    Refuse {
        /// Content root.
        root: Digest,
        /// Chunk index.
        index: u32,
        /// Why.
        reason: Refusal,
    },
    /// Any → any: liveness and round-trip measurement.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Any → any: answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Segment leader → manager: one page of the segment discovery report (claims 7, 11).
    SegmentReport(SegmentReport),
    /// Manager → agent: cap the rate at which the agent fetches this job's content (a policy).
    Throttle {
        /// The job.
        job: JobRef,
        /// Most verified chunk bytes per second it may fetch; 0 lifts the cap.
        max_bytes_per_second: u64,
    },
    /// Manager → agent, the only message of a session it refuses right after the handshake:
    /// why (unknown agent, an expired, revoked, used or elsewhere-bound enrolment token, ...);
    /// the manager closes the session next. At most [`MAX_NOT_ACCEPTED_REASON`] bytes.
    NotAccepted {
        /// Why, for people (the agent logs it).
        reason: &'a str,
    },
    /// Manager → agent: a root-signed trust document, the postcard bytes of a
    /// [`crate::trust::SignedTrust`] (at most [`crate::trust::MAX_TRUST_BYTES`]). Sent after
    /// `Welcome`, oldest first, for every document of the chain the manager keeps, and again
    /// whenever a new one is stored; the agent keeps the newest it can verify. Carried as
    /// bytes so a message stays small on a device until it is decoded.
    Trust {
        /// The encoded signed document.
        document: &'a [u8],
    },
    /// Manager → agent: the manager-signed revocation list, the postcard bytes of a
    /// [`crate::revocation::RevocationList`] (at most
    /// [`crate::revocation::MAX_REVOCATION_BYTES`]). Sent after `Welcome` and whenever the
    /// list changes.
    Revocations {
        /// The encoded signed list.
        list: &'a [u8],
    },
    /// Manager → agent: a renewed certificate (new serial and expiry) for peer handshakes
    /// and discovery, sent over the live session before the current one expires.
    CertRenewed {
        /// The new certificate.
        cert: AgentCert,
    },
    /// Agent → manager: where the install step of a job's content stands (after `Have`; only
    /// from agents that said `install_step` in [`Message::Running`]). Sent at each change,
    /// and again after a reconnection; a repeated state changes nothing.
    InstallStatus {
        /// The job whose content is installed (its epoch may be older than the manager's).
        job: JobRef,
        /// The content's name, as a check.
        name: heapless::String<MAX_CONTENT_NAME>,
        /// The content's version, as a check.
        version: u64,
        /// The new state.
        state: InstallState,
        /// The exit code of the command that decided the state (install, health check or
        /// rollback), if one ran to its end.
        exit_code: Option<i32>,
        /// The end of that command's output (stdout and stderr), at most
        /// [`MAX_INSTALL_OUTPUT`] bytes.
        output: &'a str,
    },
    /// Agent → manager: what runs on the agent, per content name, and whether it installs
    /// content (then the manager waits for [`Message::InstallStatus`] after each `Have`;
    /// otherwise confirmed content counts as running at once). Sent right after the first
    /// `Report` of every session (before any `Have` it repeats).
    Running {
        /// Whether the agent runs an install step for the content it receives.
        install_step: bool,
        /// The version running per content name.
        versions: heapless::Vec<RunningVersion, MAX_RUNNING>,
    },
}

/// Longest [`Message::NotAccepted`] reason the manager sends, in bytes.
pub const MAX_NOT_ACCEPTED_REASON: usize = 256;

/// One page of a segment leader's discovery report: who is on the segment and how they reach each other.
///
/// A leader sends pages `0..pages` of one `term` back to back; the manager
/// replaces its view of the segment once it holds every page of a term.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SegmentReport {
    /// The segment's name, as the members report it.
    pub segment: Name,
    /// The elected leader sending this report (must be the session's agent).
    pub leader: AgentId,
    /// Grows with every report the leader sends; pages of one report share it.
    pub term: u32,
    /// This page's index, from 0.
    pub page: u16,
    /// How many pages this report has (at least 1).
    pub pages: u16,
    /// Members on this page, the leader included on some page.
    pub members: heapless::Vec<SegmentMember, MAX_MEMBERS_PER_PAGE>,
}

/// What a segment leader knows of one member: its capabilities and measured delays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SegmentMember {
    /// The member's id.
    pub id: AgentId,
    /// Its capability score, the one the election compared.
    pub score: u32,
    /// Where peers reach it, if it serves peers.
    pub listen: Option<PeerAddr>,
    /// Performance class (1..=1000).
    pub performance: u32,
    /// Free storage for content, in bytes.
    pub free_storage: u64,
    /// Whether it serves peers.
    pub can_serve: bool,
    /// Link speed and reliability.
    pub link: LinkInfo,
    /// Round-trip times it measured to the manager and to other members.
    pub delays: heapless::Vec<Delay, MAX_DELAYS>,
    /// Milliseconds since the leader last heard from it.
    pub last_heard_ms: u32,
}

/// Why a message could not be encoded or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CodecError {
    /// The buffer is too small for the encoded message.
    BufferFull,
    /// The bytes are not a valid message (unknown variant, bad length, bad UTF-8, over a limit).
    Malformed,
    /// The message decoded but bytes were left over.
    TrailingBytes,
}

impl core::fmt::Display for CodecError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CodecError::BufferFull => "buffer too small for message",
            CodecError::Malformed => "malformed message",
            CodecError::TrailingBytes => "trailing bytes after message",
        })
    }
}

impl core::error::Error for CodecError {}

impl<'a> Message<'a> {
    /// Encodes into `buf`, returning the used prefix.
    pub fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b mut [u8], CodecError> {
        postcard::to_slice(self, buf).map_err(|e| match e {
            postcard::Error::SerializeBufferFull => CodecError::BufferFull,
            _ => CodecError::Malformed,
        })
    }

    /// Decodes one whole message from `bytes`; leftover bytes are an error.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let (msg, rest) = postcard::take_from_bytes(bytes).map_err(|_| CodecError::Malformed)?;
        if rest.is_empty() {
            Ok(msg)
        } else {
            Err(CodecError::TrailingBytes)
        }
    }

    /// Encodes into a new vector.
    #[cfg(feature = "alloc")]
    pub fn to_vec(&self) -> alloc::vec::Vec<u8> {
        postcard::to_allocvec(self).expect("encoding into a vector cannot fail")
    }

    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Report(_) => "Report",
            Message::Progress { .. } => "Progress",
            Message::Have { .. } => "Have",
            Message::Failed { .. } => "Failed",
            Message::NextPlease { .. } => "NextPlease",
            Message::PeerTrouble { .. } => "PeerTrouble",
            Message::Welcome { .. } => "Welcome",
            Message::Fetch { .. } => "Fetch",
            Message::Sources { .. } => "Sources",
            Message::Done { .. } => "Done",
            Message::Cancel { .. } => "Cancel",
            Message::ChunkRequest { .. } => "ChunkRequest",
            Message::Chunk { .. } => "Chunk",
            Message::Refuse { .. } => "Refuse",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::SegmentReport(_) => "SegmentReport",
            Message::Throttle { .. } => "Throttle",
            Message::NotAccepted { .. } => "NotAccepted",
            Message::Trust { .. } => "Trust",
            Message::Revocations { .. } => "Revocations",
            Message::CertRenewed { .. } => "CertRenewed",
            Message::InstallStatus { .. } => "InstallStatus",
            Message::Running { .. } => "Running",
        }
    }
}

/// Bytes a [`Message::Chunk`] adds around its data at most (header, proof).
pub const CHUNK_OVERHEAD: usize = 1 + 32 + 5 + 1 + 32 * crate::merkle::MAX_DEPTH + 5;
