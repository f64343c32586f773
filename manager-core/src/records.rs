//! The records the manager keeps: enrolled agents, content, jobs and their
//! participants, segments as their leaders report them, content groups and
//! named policies; the web UI's administrators' sessions and the totals
//! `/metrics` reports.
//!
//! These are plain data, shared by the engine's callers, the segment report
//! assembly, group resolution and the store (`baton-manager`'s `Store` trait
//! reads and writes them); nothing here touches a database.

use baton_protocol::message::InstallState;
use baton_protocol::types::{Digest, PublicKey};
use serde::{Deserialize, Serialize};

/// An enrolled agent as the database holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentRecord {
    /// The agent's id.
    pub id: String,
    /// Its Ed25519 public key.
    #[serde(serialize_with = "ser_key")]
    pub key: PublicKey,
    /// When it was enrolled (Unix seconds).
    pub enrolled_at: u64,
    /// When it last reported or was connected (Unix seconds).
    pub last_seen: Option<u64>,
    /// Its latest report, as JSON.
    pub report: Option<serde_json::Value>,
    /// Site from the latest report.
    pub site: Option<String>,
    /// Segment from the latest report.
    pub segment: Option<String>,
    /// Peer listen address from the latest report.
    pub listen: Option<String>,
    /// Performance class from the latest report.
    pub performance: Option<u32>,
    /// Upload capacity from the latest report (bytes/s).
    pub up_bps: Option<u64>,
    /// Download capacity from the latest report (bytes/s).
    pub down_bps: Option<u64>,
    /// Free storage from the latest report (bytes).
    pub free_storage: Option<u64>,
    /// The segment the agent is placed in (by the administrator, or at its first report);
    /// its certificate carries it, and segment reports are checked against it.
    pub placed_segment: Option<String>,
    /// The highest election score it may claim (certified capped at the manager's maximum).
    pub election_score: Option<u32>,
}

fn ser_key<S: serde::Serializer>(key: &PublicKey, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(key.0))
}

/// What enrolling an agent did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrolled {
    /// The agent was enrolled now.
    New,
    /// The agent was already enrolled with this same key; nothing changed.
    Unchanged,
}

/// Published content: its manifest and the file it is served from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentRecord {
    /// Merkle root: the content's id.
    pub root: Digest,
    /// Content name.
    pub name: String,
    /// Version within the name.
    pub version: u64,
    /// Length in bytes.
    pub length: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// The file it is served from.
    pub path: String,
    /// The signed manifest, postcard-encoded.
    pub manifest: Vec<u8>,
    /// When it was published (Unix seconds).
    pub created_at: u64,
}

impl ContentRecord {
    /// Number of chunks.
    pub fn chunks(&self) -> u32 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.length.div_ceil(self.chunk_size as u64) as u32
    }
}

/// Which agents a job is for, as the API and the database say it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSpec {
    /// Every agent connected when the job starts, and every agent that connects while it runs.
    All,
    /// These agents.
    Agents(Vec<String>),
    /// A content group with a label selector: its members when the job was created, and
    /// every agent carrying all of the selector's labels that connects while it runs.
    Group {
        /// The members at creation, by id.
        agents: Vec<String>,
        /// The group's label selector (never empty).
        selector: std::collections::BTreeMap<String, String>,
    },
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Created, not yet accepted by the engine.
    Pending,
    /// Being distributed.
    Running,
    /// Every participant confirmed or was given up.
    Finished,
    /// Cancelled by the administrator.
    Cancelled,
    /// Refused by the engine when it was started (see the job's error).
    Refused,
}

impl JobState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Cancelled => "cancelled",
            JobState::Refused => "refused",
        }
    }

    /// The state stored as `s`, if `s` names one.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "finished" => JobState::Finished,
            "cancelled" => JobState::Cancelled,
            "refused" => JobState::Refused,
            _ => return None,
        })
    }

    /// Whether the job is over (nothing more will happen to it).
    pub fn is_over(self) -> bool {
        !matches!(self, JobState::Pending | JobState::Running)
    }
}

/// A job as the database holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobRecord {
    /// Job id.
    pub id: u64,
    /// Root of the content distributed.
    #[serde(serialize_with = "ser_digest")]
    pub root: Digest,
    /// Manager epoch the job was (re)started in.
    pub epoch: Option<u32>,
    /// Where the job is.
    pub state: JobState,
    /// When it was created (Unix seconds).
    pub created_at: u64,
    /// When it finished or was cancelled (Unix seconds).
    pub finished_at: Option<u64>,
    /// Which agents it is for.
    pub targets: TargetSpec,
    /// Confirmed participants at the end.
    pub confirmed: Option<u32>,
    /// Failed participants at the end.
    pub failed: Option<u32>,
    /// Why the engine refused it, if it did.
    pub error: Option<String>,
    /// The content group its targets were resolved from, if any.
    pub group: Option<String>,
    /// The named policy it was created with, if any.
    pub policy: Option<String>,
    /// The policy it runs under (JSON of `planner::Policy`), kept so a resumed job keeps it.
    pub policy_spec: Option<serde_json::Value>,
    /// Where its staged rollout stands (JSON of the engine's `RolloutState`), if it has one.
    pub rollout: Option<serde_json::Value>,
    /// Policy rules the planner could not meet, in the order first reported.
    pub warnings: Vec<String>,
    /// Bytes actually carried per edge (`from: None` = the manager), filled in when the job is read.
    pub transfers: Vec<Transfer>,
}

/// Where a new job's targets and policy came from (kept with the job when it is created).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobOrigin {
    /// The content group its targets were resolved from.
    pub group: Option<String>,
    /// The named policy it uses.
    pub policy_name: Option<String>,
    /// The policy itself (JSON of `planner::Policy`), a snapshot taken at creation.
    pub policy: Option<serde_json::Value>,
}

/// Bytes carried over one edge of a job's relay: from a source to a receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The source agent; `None` = the manager.
    pub from: Option<String>,
    /// The receiving agent.
    pub to: String,
    /// Verified bytes the receiver reported from this source.
    pub bytes: u64,
}

fn ser_digest<S: serde::Serializer>(d: &Digest, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(d))
}

/// A participant's state as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartState {
    /// Not instructed yet, or waiting for a source.
    Waiting,
    /// Fetching chunks.
    Fetching,
    /// Every chunk verified and stored, confirmed with `Have`.
    Confirmed,
    /// Gave up or was given up.
    Failed,
}

impl PartState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            PartState::Waiting => "waiting",
            PartState::Fetching => "fetching",
            PartState::Confirmed => "confirmed",
            PartState::Failed => "failed",
        }
    }

    /// The state stored as `s`, if `s` names one.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => PartState::Waiting,
            "fetching" => PartState::Fetching,
            "confirmed" => PartState::Confirmed,
            "failed" => PartState::Failed,
            _ => return None,
        })
    }
}

/// A confirmed participant's install step as stored (the states past delivery; see the
/// engine's `install` module): `pending` while the manager waits for its agent's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallPhase {
    /// Confirmed; its agent installs content and has not reported yet.
    Pending,
    /// The install command runs.
    Installing,
    /// Installed; the health check runs or a restart is pending.
    Installed,
    /// The new version runs (content-only participants: at once when they confirm).
    Running,
    /// The install failed, or no final state came within the install deadline.
    Failed,
    /// The install or health check failed and the rollback command ran.
    RolledBack,
}

impl InstallPhase {
    /// The name stored in the database and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            InstallPhase::Pending => "pending",
            InstallPhase::Installing => "installing",
            InstallPhase::Installed => "installed",
            InstallPhase::Running => "running",
            InstallPhase::Failed => "failed",
            InstallPhase::RolledBack => "rolled_back",
        }
    }

    /// The phase stored as `s`, if `s` names one.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => InstallPhase::Pending,
            "installing" => InstallPhase::Installing,
            "installed" => InstallPhase::Installed,
            "running" => InstallPhase::Running,
            "failed" => InstallPhase::Failed,
            "rolled_back" => InstallPhase::RolledBack,
            _ => return None,
        })
    }

    /// The phase of an engine install state (`None`: waiting for the report).
    pub fn of(state: Option<InstallState>) -> Self {
        match state {
            None => InstallPhase::Pending,
            Some(InstallState::Installing) => InstallPhase::Installing,
            Some(InstallState::Installed) => InstallPhase::Installed,
            Some(InstallState::Running) => InstallPhase::Running,
            Some(InstallState::Failed) => InstallPhase::Failed,
            Some(InstallState::RolledBack) => InstallPhase::RolledBack,
        }
    }

    /// The engine's install state for this phase (`None` for `pending`).
    pub fn state(self) -> Option<InstallState> {
        match self {
            InstallPhase::Pending => None,
            InstallPhase::Installing => Some(InstallState::Installing),
            InstallPhase::Installed => Some(InstallState::Installed),
            InstallPhase::Running => Some(InstallState::Running),
            InstallPhase::Failed => Some(InstallState::Failed),
            InstallPhase::RolledBack => Some(InstallState::RolledBack),
        }
    }

    /// Whether nothing more follows (`running`, `failed`, `rolled_back`).
    pub fn is_final(self) -> bool {
        self.state().is_some_and(InstallState::is_final)
    }
}

/// A confirmed participant's install step: its phase and what decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstallRecord {
    /// Where it stands.
    pub state: InstallPhase,
    /// The deciding command's exit code (install, health check or rollback), if one ran to
    /// its end.
    pub exit_code: Option<i32>,
    /// The end of that command's output (at most 2 KiB), or the manager's note.
    pub output: Option<String>,
    /// When it last changed (Unix seconds).
    pub at: u64,
}

/// The version of one content name running on one agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunningRecord {
    /// The agent.
    pub agent: String,
    /// The content name.
    pub name: String,
    /// The version running.
    pub version: u64,
    /// When the manager learnt it (Unix seconds).
    pub updated_at: u64,
}

/// One participant of a job as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParticipantRecord {
    /// The agent.
    pub agent: String,
    /// Its state.
    pub state: PartState,
    /// Chunks verified so far.
    pub verified: u32,
    /// When the row last changed (Unix seconds).
    pub updated_at: u64,
    /// Why it failed, if it did (for people).
    pub reason: Option<String>,
    /// Why it failed, as the engine's `FailCause` in JSON (to resume the job after a restart).
    #[serde(skip)]
    pub cause: Option<String>,
    /// The engine's note on where it fetches from.
    pub source: Option<String>,
    /// Its place in the planner's order (0 first).
    pub position: Option<u32>,
    /// Its upload as last measured in this job, bytes/s (what the plan was adapted to).
    pub measured_up_bps: Option<u64>,
    /// Once confirmed: its install step (`None`: not confirmed yet, or a record from before
    /// install states were kept).
    pub install: Option<InstallRecord>,
}

/// Bytes one participant received from one source in a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceBytes {
    /// The receiving agent.
    pub agent: String,
    /// The source agent; `None` = the manager.
    pub from: Option<String>,
    /// Verified bytes received, summed.
    pub bytes: u64,
}

/// A confirmation: this agent holds a verified copy of the job's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Confirmation {
    /// The agent.
    pub agent: String,
    /// When the manager recorded it (Unix seconds).
    pub confirmed_at: u64,
}

/// Link speed and reliability of a segment member, as its leader reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Upload capacity in bytes per second.
    pub up_bps: u64,
    /// Download capacity in bytes per second.
    pub down_bps: u64,
    /// Loss in parts per million.
    pub loss_ppm: u32,
    /// Seconds the link has been up.
    pub uptime_s: u64,
}

/// One measured round-trip time of a segment member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayRecord {
    /// Measured to this peer; `None` = the manager.
    pub to: Option<String>,
    /// Round-trip time in microseconds.
    pub rtt_us: u32,
}

/// One member of a segment, as the segment's leader last reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member's id.
    pub id: String,
    /// Its capability score (the one the election compared).
    pub score: u32,
    /// Where peers reach it, if it serves peers.
    pub listen: Option<String>,
    /// Performance class.
    pub performance: u32,
    /// Free storage in bytes.
    pub free_storage: u64,
    /// Whether it serves peers.
    pub can_serve: bool,
    /// Link speed and reliability.
    pub link: LinkRecord,
    /// Round-trip times it measured.
    pub delays: Vec<DelayRecord>,
    /// Milliseconds since the leader last heard from it (when the report was made).
    pub last_heard_ms: u32,
    /// Whether the manager knows this agent (enrolled); unknown members are kept but flagged.
    pub known: bool,
}

/// A network segment as its leader last reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    /// The segment's name.
    pub name: String,
    /// Its elected leader.
    pub leader: String,
    /// The leader's report counter for this report.
    pub term: u32,
    /// When the manager stored the report (Unix milliseconds).
    pub reported_at_ms: u64,
    /// Its members, by id.
    pub members: Vec<MemberRecord>,
}

/// A change of a segment's leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderChange {
    /// The new leader.
    pub leader: String,
    /// Its term in the first report it sent.
    pub term: u32,
    /// Since when it leads (Unix milliseconds of that report).
    pub since_ms: u64,
}

/// A content group: an administrator's named set of agents, by id and by label selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The group's name.
    pub name: String,
    /// Agents in the group by id.
    pub agents: Vec<String>,
    /// Agents carrying every one of these labels are in the group too (empty = no label match).
    pub selector: std::collections::BTreeMap<String, String>,
}

/// A named distribution policy: the JSON of a `planner::Policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The policy's name.
    pub name: String,
    /// Its fields (serde JSON of `planner::Policy`, defaults filled in).
    pub policy: serde_json::Value,
}

/// What setting an administrator's password did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminSet {
    /// A new administrator was added.
    Added,
    /// An existing administrator's password was replaced.
    PasswordChanged,
}

/// An administrator's web UI session. Only a hash of the session id (the cookie's value)
/// is kept, so a copy of the database does not log anyone in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// SHA-256 of the session id.
    pub id_hash: Digest,
    /// The administrator logged in.
    pub admin: String,
    /// The token the session's changing requests must carry.
    pub csrf: String,
    /// When the session started (Unix seconds).
    pub created_at: u64,
    /// When it was last used (Unix seconds).
    pub last_used: u64,
}

/// Totals over every job, as `/metrics` reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreTotals {
    /// Jobs per state name (`pending`, `running`, `finished`, ...).
    pub jobs_by_state: Vec<(String, u64)>,
    /// Verified bytes agents received from the manager, all jobs.
    pub bytes_from_manager: u64,
    /// Verified bytes agents received from relaying peers, all jobs.
    pub bytes_from_relays: u64,
    /// Participants per install phase name (`pending`, `running`, ...), all jobs.
    pub installs_by_state: Vec<(String, u64)>,
}
