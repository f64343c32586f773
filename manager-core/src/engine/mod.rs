//! The job engine: the manager's sans-IO state machine for distribution jobs (claims 1, 3, 5).
//!
//! The engine never touches a socket, a clock or a file. Its driver (the
//! manager's server, or the simulator) feeds it what happened — an agent
//! connected and reported ([`Engine::agent_online`]), disconnected
//! ([`Engine::agent_offline`]), sent a message ([`Engine::handle_message`]),
//! a timer fired ([`Engine::handle_timeout`]) — and the administrator's
//! commands ([`Engine::start_job`], [`Engine::cancel_job`], and
//! [`Engine::resume_job`] after a restart). After every input the driver
//! drains the outputs, in this order:
//!
//! 1. [`Engine::poll_persist`] until `None`: records to write to the store,
//!    in order, in one transaction;
//! 2. [`Engine::poll_transmit`] until `None`: messages to send to agents
//!    (it returns nothing while records are left to persist: the plan and
//!    every state change are stored before any instruction leaves);
//! 3. [`Engine::poll_event`] until `None`: notifications for the UI and logs;
//!
//! and then arms one timer at [`Engine::poll_timeout`].
//!
//! A job runs claim 5's loop for every participant at once: the planner
//! ranks the targets and builds the relay plan; each online participant gets
//! a `Fetch` naming its sources (the manager or peers, per chunk range) and
//! the next participant on the list; agents report `Progress`, confirm with
//! `Have` and ask `NextPlease`; sources that disappear, fail or misbehave are
//! routed around with `Sources`; late or returning participants get a fresh
//! `Fetch`; silent ones are given up after a timeout. When every participant
//! has confirmed or failed, the list is exhausted: every connected
//! participant gets `Done`.
//!
//! Every instruction carries the engine's epoch; the driver starts each
//! manager run with a higher epoch than the last, and messages from agents
//! still working under an older one are ignored.

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use baton_protocol::Manifest;
use baton_protocol::message::{
    FailReason, MAX_SOURCES_PER_MESSAGE, Message, Received, Report, Source, SourceRange, Trouble,
};
use baton_protocol::types::{AgentId, JobRef, Name, PublicKey};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::planner::{Holder, NodeInfo, Policy, Profile, RelayPlan, Seed, Segments, prioritize};

mod policy;

pub use policy::{format_duration, format_rate};

/// Settings of the engine, the same for every job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// A participant that is not connected and makes no progress for this long is given up
    /// (marked failed and routed around).
    pub give_up_after: Duration,
    /// Progress is persisted (and reported as events) at most this often per job.
    pub progress_flush: Duration,
    /// The manager's upload capacity in bytes/s, for the planner; `0` = unknown.
    pub manager_up_bps: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            give_up_after: Duration::from_secs(300),
            progress_flush: Duration::from_secs(1),
            manager_up_bps: 0,
        }
    }
}

/// Which agents a job is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Targets {
    /// Every agent online when the job starts, and every agent that comes online while it runs.
    All,
    /// These agents (those not online yet join when they come online, or are given up).
    Agents(Vec<AgentId>),
}

/// A job to start: one content to a set of agents under a policy.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// The job's id, unique at this manager.
    pub id: u64,
    /// The content.
    pub manifest: Manifest,
    /// Who gets it.
    pub targets: Targets,
    /// Ranking weights and relay rules.
    pub policy: Policy,
}

/// Why a participant failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailCause {
    /// The agent reported that it gave up (`Failed`).
    Agent(FailReason),
    /// It was silent and disconnected for longer than [`EngineConfig::give_up_after`].
    GaveUp,
}

impl core::str::FromStr for FailCause {
    type Err = EngineError;

    /// Parses what [`Display`](fmt::Display) writes (so a store can keep the cause as text).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const REASONS: [FailReason; 9] = [
            FailReason::StorageFull,
            FailReason::StorageError,
            FailReason::BadManifest,
            FailReason::BadSignature,
            FailReason::Expired,
            FailReason::Downgrade,
            FailReason::Busy,
            FailReason::NoSource,
            FailReason::ChunkTooLarge,
        ];
        if s == FailCause::GaveUp.to_string() {
            return Ok(FailCause::GaveUp);
        }
        REASONS
            .into_iter()
            .map(FailCause::Agent)
            .find(|c| c.to_string() == s)
            .ok_or_else(|| EngineError::UnknownFailCause(s.into()))
    }
}

impl fmt::Display for FailCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailCause::Agent(reason) => write!(f, "agent failed: {reason:?}"),
            FailCause::GaveUp => f.write_str("given up: disconnected without progress"),
        }
    }
}

/// Where one participant of a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParticipantState {
    /// Not instructed yet (not online since the job started).
    Waiting,
    /// Instructed; `verified` chunks verified and stored so far.
    Fetching {
        /// Chunks verified so far.
        verified: u32,
    },
    /// Confirmed (`Have`): it holds every chunk, verified.
    Confirmed,
    /// Failed or given up; routed around.
    Failed(FailCause),
}

impl ParticipantState {
    /// Whether the participant is done with the job (confirmed or failed).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ParticipantState::Confirmed | ParticipantState::Failed(_)
        )
    }

    /// A short lowercase name: `waiting`, `fetching`, `confirmed`, `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            ParticipantState::Waiting => "waiting",
            ParticipantState::Fetching { .. } => "fetching",
            ParticipantState::Confirmed => "confirmed",
            ParticipantState::Failed(_) => "failed",
        }
    }
}

/// A record the driver writes to the store, in order, before sending anything from
/// [`Engine::poll_transmit`].
#[derive(Clone, Debug, PartialEq)]
pub enum Persist {
    /// The job's plan starts (or, after [`Engine::resume_job`], restarts) under `epoch`;
    /// `order` is the prioritized list. The store upserts: a resumed job is emitted again.
    JobStarted {
        /// The job.
        job: u64,
        /// The engine's epoch.
        epoch: u32,
        /// The participants, in the order of the prioritized list.
        order: Vec<AgentId>,
    },
    /// A participant's state (upsert); `source_note` summarises its sources when it is instructed.
    Participant {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// Its state.
        state: ParticipantState,
        /// Human-readable summary of its current sources, if it was just (re)instructed.
        source_note: Option<String>,
    },
    /// Verified chunk counts, batched (at most one record per [`EngineConfig::progress_flush`]).
    Progress {
        /// The job.
        job: u64,
        /// `(participant, chunks verified)` for those that progressed.
        updates: Vec<(AgentId, u32)>,
    },
    /// Bytes of verified chunks `agent` received from `from` since the previous record (a delta).
    SourceBytes {
        /// The job.
        job: u64,
        /// The receiver.
        agent: AgentId,
        /// The source; `None` = the manager.
        from: Option<AgentId>,
        /// Bytes received.
        bytes: u64,
    },
    /// The job ended (finished or cancelled).
    JobFinished {
        /// The job.
        job: u64,
        /// Participants that confirmed.
        confirmed: u32,
        /// Participants that failed or were given up.
        failed: u32,
    },
}

/// A notification for the UI and the logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum EngineEvent {
    /// A participant progressed (batched like [`Persist::Progress`]).
    Progress {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// Chunks verified.
        verified: u32,
        /// Chunks in the content.
        total: u32,
    },
    /// A participant confirmed it holds the content.
    Confirmed {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
    },
    /// A participant failed or was given up.
    ParticipantFailed {
        /// The job.
        job: u64,
        /// The participant.
        agent: AgentId,
        /// Why, for people.
        reason: String,
    },
    /// The job ended (finished or cancelled).
    JobFinished {
        /// The job.
        job: u64,
        /// Participants that confirmed.
        confirmed: u32,
        /// Participants that failed or were given up.
        failed: u32,
    },
    /// A rule of the job's policy cannot be met as asked; `text` says which and what happens
    /// instead (for the job's stored warnings, the UI and the logs). Each text once per job.
    PolicyWarning {
        /// The job.
        job: u64,
        /// What cannot be met, for people.
        text: String,
    },
}

/// How a job stands as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// Participants are still working.
    Running,
    /// Every participant confirmed or failed; `Done` was sent.
    Finished,
    /// Cancelled by the administrator; `Cancel` was sent.
    Cancelled,
}

/// One participant in a [`JobStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParticipantStatus {
    /// The participant.
    pub agent: AgentId,
    /// Its state (with chunks verified while fetching).
    pub state: ParticipantState,
    /// Whether it is connected.
    pub online: bool,
    /// Its current distinct sources (`None` = the manager); empty when not fetching.
    pub sources: Vec<Option<AgentId>>,
}

/// A snapshot of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus {
    /// The job.
    pub job: u64,
    /// The epoch it runs under.
    pub epoch: u32,
    /// Chunks in the content.
    pub chunks: u32,
    /// Running, finished or cancelled.
    pub outcome: JobOutcome,
    /// Participants that confirmed.
    pub confirmed: u32,
    /// Participants that failed or were given up.
    pub failed: u32,
    /// Every participant, in the order of the prioritized list (late joiners last).
    pub participants: Vec<ParticipantStatus>,
    /// Policy rules that cannot be met (see [`EngineEvent::PolicyWarning`]).
    pub warnings: Vec<String>,
    /// While the job waits for its policy's time window: when it opens (engine time).
    pub opens_at: Option<Duration>,
    /// Where content enters each segment, best segment first (the list of segment leaders
    /// and entry nodes the plan was built from; empty for a plan without segments).
    pub segments: Vec<SegmentStatus>,
}

/// Where content enters one segment in a job's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentStatus {
    /// The segment's name.
    pub segment: Name,
    /// The participants that fetch from outside the segment, best first (its leader first
    /// if it may serve).
    pub entries: Vec<AgentId>,
    /// Participants of the segment fetching when the plan was built.
    pub fetchers: u32,
    /// Of them, those allowed to relay.
    pub servers: u32,
}

/// Why the engine refused an input. Nothing changed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineError {
    /// No job with this id.
    #[error("unknown job {0}")]
    UnknownJob(u64),
    /// A job with this id already exists.
    #[error("job {0} already exists")]
    DuplicateJob(u64),
    /// The job has already finished or been cancelled.
    #[error("job {0} has already ended")]
    JobEnded(u64),
    /// The sender is not a participant of the job.
    #[error("job {job}: agent {agent} is not a participant")]
    NotParticipant {
        /// The job.
        job: u64,
        /// The sender.
        agent: AgentId,
    },
    /// A message only the manager sends, or one that is not the engine's (e.g. `Fetch`, `Report`).
    #[error("{kind} is not a message the job engine accepts from an agent")]
    Unexpected {
        /// The message's variant name.
        kind: &'static str,
    },
    /// The message names an epoch this manager has not reached: forged or confused.
    #[error("job {job}: epoch {epoch} is newer than the manager's epoch {current}")]
    FutureEpoch {
        /// The job.
        job: u64,
        /// The epoch in the message.
        epoch: u32,
        /// The engine's epoch.
        current: u32,
    },
    /// `Have` named another content root than the job's.
    #[error("job {job}: agent {agent} confirmed a different content root")]
    RootMismatch {
        /// The job.
        job: u64,
        /// The sender.
        agent: AgentId,
    },
    /// The job has nobody to go to (an empty target list, or no agent online for `All`).
    #[error("job {0} has no targets")]
    NoTargets(u64),
    /// A stored failure cause that is not one [`FailCause`] writes.
    #[error("unknown failure cause {0:?}")]
    UnknownFailCause(String),
    /// The manifest is out of limits.
    #[error("job {job}: invalid manifest: {reason}")]
    InvalidManifest {
        /// The job.
        job: u64,
        /// What is wrong.
        reason: String,
    },
}

/// An agent the engine has seen, with what it last reported.
#[derive(Clone, Debug)]
struct Agent {
    key: PublicKey,
    profile: Profile,
    online: bool,
}

/// One participant of one job.
#[derive(Clone, Debug)]
struct Part {
    id: AgentId,
    state: ParticipantState,
    /// Chunks verified (kept across states, e.g. when given up and revived).
    verified: u32,
    online: bool,
    /// Has a `Fetch` on its current connection.
    instructed: bool,
    /// Was instructed at least once in this epoch (so it knows the job).
    ever_instructed: bool,
    /// `Done` or `Cancel` was sent.
    end_sent: bool,
    /// Progress not flushed yet.
    dirty: bool,
    /// A `Sources` for it is queued.
    sources_queued: bool,
    /// Its give-up deadline, if registered.
    deadline: Option<Duration>,
    /// `NextPlease`s without progress in between.
    pleas: u8,
    /// Its LAN segment's number in the job's [`Segments`] (`0` = unknown).
    segment: u32,
    /// `segment` was worked out from a report (and the participant listed on its segment).
    segment_known: bool,
    /// The rate cap last sent to it with `Throttle` on its current instruction (`0` = none).
    throttle: u64,
}

impl Part {
    fn new(id: AgentId, state: ParticipantState) -> Self {
        let verified = match state {
            ParticipantState::Fetching { verified } => verified,
            _ => 0,
        };
        Part {
            id,
            state,
            verified,
            online: false,
            instructed: false,
            ever_instructed: false,
            end_sent: false,
            dirty: false,
            sources_queued: false,
            deadline: None,
            pleas: 0,
            segment: 0,
            segment_known: false,
            throttle: 0,
        }
    }
}

/// A message to build when it is polled (so large plans do not sit in memory as messages).
#[derive(Clone, Copy, Debug)]
enum Out {
    Fetch { job: u64, part: u32 },
    Sources { job: u64, part: u32 },
    End { job: u64, part: u32 },
    Throttle { job: u64, part: u32 },
}

/// The engine's output queues and timers, apart from the jobs so both can be borrowed.
#[derive(Debug, Default)]
struct Outputs {
    persist: VecDeque<Persist>,
    transmit: VecDeque<Out>,
    staged: VecDeque<(AgentId, Message<'static>)>,
    events: VecDeque<EngineEvent>,
    /// Give-up deadlines: `(when, job, participant)`.
    deadlines: BTreeSet<(Duration, u64, u32)>,
}

/// What a job's handlers need besides the job.
struct Ctx<'a> {
    out: &'a mut Outputs,
    agents: &'a HashMap<AgentId, Agent>,
    config: &'a EngineConfig,
    now: Duration,
    /// Segment leaders from the segment reports.
    leaders: &'a HashMap<Name, AgentId>,
}

/// One job.
#[derive(Debug)]
struct Job {
    spec: JobSpec,
    chunks: u32,
    /// The relay plan; dropped when the job ends.
    plan: Option<RelayPlan>,
    parts: Vec<Part>,
    index: HashMap<AgentId, u32>,
    outcome: JobOutcome,
    dirty: Vec<u32>,
    /// Bytes received per `(participant, source)` since the last flush.
    bytes: BTreeMap<(u32, Option<AgentId>), u64>,
    flush_at: Option<Duration>,
    last_flush: Option<Duration>,
    confirmed: u32,
    failed: u32,
    /// Segment names numbered for the plan.
    segments: Segments,
    /// Participants per named segment's number (for per-segment rate caps).
    segment_parts: HashMap<u32, Vec<u32>>,
    /// Policy rules that cannot be met, in the order they were found.
    warnings: Vec<String>,
    /// While the job waits for its time window: when the window opens (engine time).
    opens_at: Option<Duration>,
    /// Segments whose participants' rate caps must be worked out again.
    throttle_segments: BTreeSet<u32>,
    /// Participants (outside named segments) whose rate cap must be worked out again.
    throttle_parts: Vec<u32>,
}

/// The manager's job engine. See the [module documentation](self) for the calling convention.
#[derive(Debug)]
pub struct Engine {
    epoch: u32,
    config: EngineConfig,
    agents: HashMap<AgentId, Agent>,
    jobs: BTreeMap<u64, Job>,
    /// Agent → the jobs it takes part in, with its participant index.
    memberships: HashMap<AgentId, Vec<(u64, u32)>>,
    out: Outputs,
    /// The elected leader of each segment, from the segment reports.
    leaders: HashMap<Name, AgentId>,
    /// Wall clock anchor: engine time and UTC seconds at the same instant.
    wall: Option<(Duration, u64)>,
}

impl Engine {
    /// A new engine for a manager run with `epoch` (higher than any earlier run's).
    pub fn new(epoch: u32, config: EngineConfig) -> Self {
        Engine {
            epoch,
            config,
            agents: HashMap::new(),
            jobs: BTreeMap::new(),
            memberships: HashMap::new(),
            out: Outputs::default(),
            leaders: HashMap::new(),
            wall: None,
        }
    }

    /// Tells the engine the wall clock: at engine time `now` it is `unix_secs` (UTC). Policy
    /// time windows need it; call it at start and whenever the driver's tick runs (the engine
    /// extrapolates from the latest anchor with its monotonic time).
    pub fn set_wall_clock(&mut self, now: Duration, unix_secs: u64) {
        self.wall = Some((now, unix_secs));
    }

    /// UTC seconds at engine time `now`, if the wall clock is known.
    fn unix_at(&self, now: Duration) -> Option<u64> {
        self.wall.map(|(at, unix)| {
            if now >= at {
                unix + (now - at).as_secs()
            } else {
                unix.saturating_sub((at - now).as_secs())
            }
        })
    }

    /// Records `leader` as the elected leader of `segment` (from its segment report), or
    /// forgets the segment's leader (`None`). Plans made from now on let content enter the
    /// segment through the leader first, if it may serve.
    pub fn set_segment_leader(&mut self, segment: &Name, leader: Option<AgentId>) {
        match leader {
            Some(l) => {
                self.leaders.insert(segment.clone(), l);
            }
            None => {
                self.leaders.remove(segment);
            }
        }
    }

    /// The epoch every instruction of this run carries.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// An agent is connected and sent `report` (its first on this connection, or an update).
    ///
    /// Call it for every `Report`, after the handshake authenticated `id` with `key`. A
    /// participant of a running job that was not instructed on this connection gets a `Fetch`;
    /// for `Targets::All` jobs a new agent joins as a late participant.
    pub fn agent_online(&mut self, now: Duration, id: AgentId, key: PublicKey, report: Report) {
        let profile = Profile::from(&report);
        let agent = self.agents.entry(id.clone()).or_insert(Agent {
            key,
            profile: profile.clone(),
            online: false,
        });
        agent.key = key;
        agent.profile = profile;
        agent.online = true;

        let joining: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.outcome == JobOutcome::Running
                    && j.spec.targets == Targets::All
                    && !j.index.contains_key(&id)
            })
            .map(|(&k, _)| k)
            .collect();
        for job_id in joining {
            let job = self.jobs.get_mut(&job_id).expect("listed above");
            let idx = job.add_part(id.clone(), ParticipantState::Waiting);
            if let Some(plan) = &mut job.plan {
                plan.add_node();
            }
            info!(job = job_id, agent = %id, "late joiner");
            self.memberships
                .entry(id.clone())
                .or_default()
                .push((job_id, idx));
        }

        let memberships = self.memberships.get(&id).cloned().unwrap_or_default();
        let mut cx = Ctx {
            out: &mut self.out,
            agents: &self.agents,
            config: &self.config,
            now,
            leaders: &self.leaders,
        };
        for (job_id, idx) in memberships {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.on_online(&mut cx, idx);
            }
        }
    }

    /// An agent's connection closed. Its fetchers are routed around it; if it is still
    /// working on a job, its give-up timer starts.
    pub fn agent_offline(&mut self, now: Duration, id: &AgentId) {
        if let Some(agent) = self.agents.get_mut(id) {
            agent.online = false;
        }
        let memberships = self.memberships.get(id).cloned().unwrap_or_default();
        let mut cx = Ctx {
            out: &mut self.out,
            agents: &self.agents,
            config: &self.config,
            now,
            leaders: &self.leaders,
        };
        for (job_id, idx) in memberships {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.on_offline(&mut cx, job_id, idx);
            }
        }
    }

    /// A message from agent `from` (authenticated by the driver): `Progress`, `Have`, `Failed`,
    /// `NextPlease`, `PeerTrouble`; `Ping`/`Pong` are accepted and ignored.
    ///
    /// Messages under an older epoch are ignored (`Ok`). Any other message, an unknown job, a
    /// sender that is not a participant, a newer epoch or a `Have` with another root is an
    /// error and changes nothing.
    pub fn handle_message(
        &mut self,
        now: Duration,
        from: &AgentId,
        msg: &Message<'_>,
    ) -> Result<(), EngineError> {
        let job_ref = match msg {
            Message::Progress { job, .. }
            | Message::Have { job, .. }
            | Message::Failed { job, .. }
            | Message::NextPlease { job }
            | Message::PeerTrouble { job, .. } => *job,
            Message::Ping { .. } | Message::Pong { .. } => return Ok(()),
            Message::SegmentReport(report) => {
                if report.leader == *from {
                    self.set_segment_leader(&report.segment, Some(from.clone()));
                }
                return Ok(());
            }
            other => return Err(EngineError::Unexpected { kind: other.kind() }),
        };
        let job_id = job_ref.id;
        let job = self
            .jobs
            .get_mut(&job_id)
            .ok_or(EngineError::UnknownJob(job_id))?;
        if job_ref.epoch < self.epoch {
            debug!(job = job_id, agent = %from, epoch = job_ref.epoch, kind = msg.kind(), "stale epoch, ignored");
            return Ok(());
        }
        if job_ref.epoch > self.epoch {
            return Err(EngineError::FutureEpoch {
                job: job_id,
                epoch: job_ref.epoch,
                current: self.epoch,
            });
        }
        let idx = *job
            .index
            .get(from)
            .ok_or_else(|| EngineError::NotParticipant {
                job: job_id,
                agent: from.clone(),
            })?;
        if let Message::Have { root, .. } = msg
            && *root != job.spec.manifest.root
        {
            return Err(EngineError::RootMismatch {
                job: job_id,
                agent: from.clone(),
            });
        }
        let mut cx = Ctx {
            out: &mut self.out,
            agents: &self.agents,
            config: &self.config,
            now,
            leaders: &self.leaders,
        };
        if job.outcome != JobOutcome::Running {
            // The list is exhausted; remind a participant that asks.
            if let Message::NextPlease { .. } = msg {
                job.send_end(&mut cx, job_id, idx);
            }
            return Ok(());
        }
        match msg {
            Message::Progress {
                verified, received, ..
            } => job.on_progress(&mut cx, job_id, idx, *verified, received),
            Message::Have { .. } => job.on_have(&mut cx, job_id, idx),
            Message::Failed { reason, .. } => {
                if !job.parts[idx as usize].state.is_terminal() {
                    job.fail(&mut cx, job_id, idx, FailCause::Agent(*reason));
                }
            }
            Message::NextPlease { .. } => job.on_next_please(&mut cx, job_id, idx),
            Message::PeerTrouble { peer, trouble, .. } => match job.index.get(peer) {
                Some(&p) => job.on_trouble(&mut cx, job_id, idx, p, *trouble),
                None => {
                    debug!(job = job_id, agent = %from, peer = %peer, "trouble with a non-participant, ignored")
                }
            },
            _ => unreachable!("filtered above"),
        }
        Ok(())
    }

    /// Starts a job: selects the online targets, ranks them, plans, persists the plan, and
    /// instructs each online participant in the order of the list.
    pub fn start_job(&mut self, now: Duration, spec: JobSpec) -> Result<(), EngineError> {
        let job_id = spec.id;
        if self.jobs.contains_key(&job_id) {
            return Err(EngineError::DuplicateJob(job_id));
        }
        spec.manifest
            .check_limits(None)
            .map_err(|e| EngineError::InvalidManifest {
                job: job_id,
                reason: e.to_string(),
            })?;
        let (online, mut offline): (Vec<AgentId>, Vec<AgentId>) = match &spec.targets {
            Targets::All => (
                self.agents
                    .iter()
                    .filter(|(_, a)| a.online)
                    .map(|(id, _)| id.clone())
                    .collect(),
                Vec::new(),
            ),
            Targets::Agents(list) => {
                let mut seen = std::collections::HashSet::new();
                list.iter()
                    .filter(|id| seen.insert(*id))
                    .cloned()
                    .partition(|id| self.agents.get(id).is_some_and(|a| a.online))
            }
        };
        if online.is_empty() && offline.is_empty() {
            return Err(EngineError::NoTargets(job_id));
        }
        let ranked = prioritize(
            online.iter().map(|id| (id, &self.agents[id].profile)),
            &spec.policy,
        );
        offline.sort();
        let order: Vec<AgentId> = ranked
            .into_iter()
            .map(|(id, _)| id)
            .chain(offline)
            .collect();
        let chunks = spec.manifest.chunks();
        let mut job = Job::new(spec, chunks, None);
        for id in &order {
            job.add_part(id.clone(), ParticipantState::Waiting);
        }
        let seeds: Vec<Seed> = (0..order.len() as u32)
            .map(|idx| Seed {
                info: job.online_info(&self.agents, &self.leaders, idx),
                ..Seed::default()
            })
            .collect();
        let plan = RelayPlan::build(chunks, self.config.manager_up_bps, &job.spec.policy, &seeds);
        info!(
            job = job_id,
            participants = order.len(),
            stripes = plan.stripes().len(),
            "job started"
        );
        job.plan = Some(plan);
        self.out.persist.push_back(Persist::JobStarted {
            job: job_id,
            epoch: self.epoch,
            order,
        });
        self.begin(now, job_id, job);
        Ok(())
    }

    /// Resumes a job after a manager restart, under this engine's (newer) epoch.
    ///
    /// `participants` are the stored states, in the stored order. Confirmed and failed ones
    /// stay so; the others are planned again and get a `Fetch` with the new epoch as they come
    /// online (they resume from the chunks they verified). A job id already known is ignored.
    pub fn resume_job(
        &mut self,
        now: Duration,
        spec: JobSpec,
        participants: Vec<(AgentId, ParticipantState)>,
    ) {
        let job_id = spec.id;
        if self.jobs.contains_key(&job_id) {
            warn!(
                job = job_id,
                "resume of a job that is already running, ignored"
            );
            return;
        }
        let chunks = spec.manifest.chunks().max(1);
        let mut job = Job::new(spec, chunks, None);
        for (id, state) in participants {
            if job.index.contains_key(&id) {
                continue;
            }
            let idx = job.add_part(id, state);
            // Everyone past `Waiting` knew the job before the restart: they get `Done` at the end.
            job.parts[idx as usize].ever_instructed = state != ParticipantState::Waiting;
            match state {
                ParticipantState::Confirmed => job.confirmed += 1,
                ParticipantState::Failed(_) => job.failed += 1,
                _ => {}
            }
        }
        let seeds: Vec<Seed> = (0..job.parts.len() as u32)
            .map(|idx| {
                let state = job.parts[idx as usize].state;
                Seed {
                    info: job.online_info(&self.agents, &self.leaders, idx),
                    confirmed: state == ParticipantState::Confirmed,
                    failed: matches!(state, ParticipantState::Failed(_)),
                }
            })
            .collect();
        job.plan = Some(RelayPlan::build(
            chunks,
            self.config.manager_up_bps,
            &job.spec.policy,
            &seeds,
        ));
        info!(
            job = job_id,
            epoch = self.epoch,
            participants = job.parts.len(),
            "job resumed"
        );
        self.out.persist.push_back(Persist::JobStarted {
            job: job_id,
            epoch: self.epoch,
            order: job.parts.iter().map(|p| p.id.clone()).collect(),
        });
        self.begin(now, job_id, job);
    }

    /// Registers `job`, instructs its online participants, starts the give-up timers of the
    /// others (the plan is already built and `JobStarted` queued).
    fn begin(&mut self, now: Duration, job_id: u64, mut job: Job) {
        for text in job.policy_warnings(now, self.unix_at(now), &self.agents, &self.leaders) {
            job.warn(&mut self.out, job_id, text);
        }
        let waiting = job.opens_at.is_some();
        self.out.persist.reserve(job.parts.len());
        self.out.transmit.reserve(job.parts.len());
        for (idx, p) in job.parts.iter().enumerate() {
            self.memberships
                .entry(p.id.clone())
                .or_default()
                .push((job_id, idx as u32));
        }
        let mut cx = Ctx {
            out: &mut self.out,
            agents: &self.agents,
            config: &self.config,
            now,
            leaders: &self.leaders,
        };
        for idx in 0..job.parts.len() as u32 {
            let p = &mut job.parts[idx as usize];
            let state = p.state;
            if cx.agents.get(&p.id).is_some_and(|a| a.online) {
                if state == ParticipantState::Failed(FailCause::GaveUp) && !waiting {
                    // Given up before a restart, but here now: it gets another chance.
                    job.on_online(&mut cx, idx);
                    continue;
                }
                p.online = true;
                if waiting {
                    if state == ParticipantState::Waiting {
                        job.persist_part(&mut cx, job_id, idx, false);
                    }
                } else if !state.is_terminal() {
                    job.instruct(&mut cx, job_id, idx);
                }
            } else {
                if state == ParticipantState::Waiting {
                    job.persist_part(&mut cx, job_id, idx, false);
                }
                if !state.is_terminal() && !waiting {
                    job.arm_give_up(&mut cx, job_id, idx);
                }
            }
        }
        if !job.parts.is_empty() {
            job.check_finished(&mut cx, job_id);
        }
        self.jobs.insert(job_id, job);
    }

    /// Cancels a running job: every connected participant gets `Cancel`; the job ends.
    pub fn cancel_job(&mut self, now: Duration, job: u64) -> Result<(), EngineError> {
        let j = self
            .jobs
            .get_mut(&job)
            .ok_or(EngineError::UnknownJob(job))?;
        if j.outcome != JobOutcome::Running {
            return Err(EngineError::JobEnded(job));
        }
        let mut cx = Ctx {
            out: &mut self.out,
            agents: &self.agents,
            config: &self.config,
            now,
            leaders: &self.leaders,
        };
        info!(job, "job cancelled");
        j.end(&mut cx, job, JobOutcome::Cancelled);
        Ok(())
    }

    /// Forgets an ended job (its status is no longer available). Returns whether it existed
    /// and had ended; a running job is kept.
    pub fn forget_job(&mut self, job: u64) -> bool {
        match self.jobs.get(&job) {
            Some(j) if j.outcome != JobOutcome::Running => {}
            _ => return false,
        }
        let j = self.jobs.remove(&job).expect("checked above");
        for p in &j.parts {
            if let Some(list) = self.memberships.get_mut(&p.id) {
                list.retain(|&(k, _)| k != job);
                if list.is_empty() {
                    self.memberships.remove(&p.id);
                }
            }
        }
        true
    }

    /// A timer fired: gives up silent participants and flushes batched progress that is due.
    pub fn handle_timeout(&mut self, now: Duration) {
        let mut cx = Ctx {
            out: &mut self.out,
            agents: &self.agents,
            config: &self.config,
            now,
            leaders: &self.leaders,
        };
        while let Some(&(when, job_id, idx)) = cx.out.deadlines.first() {
            if when > now {
                break;
            }
            cx.out.deadlines.pop_first();
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            let p = &mut job.parts[idx as usize];
            if p.deadline != Some(when) {
                continue;
            }
            p.deadline = None;
            if job.outcome == JobOutcome::Running && !p.online && !p.state.is_terminal() {
                info!(job = job_id, agent = %p.id, "participant given up");
                job.fail(&mut cx, job_id, idx, FailCause::GaveUp);
            }
        }
        for (&job_id, job) in self.jobs.iter_mut() {
            if job.flush_at.is_some_and(|t| t <= now) {
                job.flush(&mut cx, job_id);
            }
            if job.opens_at.is_some_and(|t| t <= now) {
                job.open_window(&mut cx, job_id);
            }
        }
    }

    /// The next record to persist, in order; drain until `None` before transmitting.
    pub fn poll_persist(&mut self) -> Option<Persist> {
        self.out.persist.pop_front()
    }

    /// The next message to send and to whom; `None` when there is nothing (or while records
    /// are still waiting in [`poll_persist`](Self::poll_persist)).
    pub fn poll_transmit(&mut self) -> Option<(AgentId, Message<'static>)> {
        if !self.out.persist.is_empty() {
            return None;
        }
        for job in self.jobs.values_mut() {
            job.settle_throttles(&mut self.out);
        }
        loop {
            if let Some(m) = self.out.staged.pop_front() {
                return Some(m);
            }
            let out = self.out.transmit.pop_front()?;
            self.materialize(out);
        }
    }

    /// The next notification for the UI and logs.
    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.out.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called: the earliest
    /// give-up deadline, progress flush or opening of a job's time window.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let deadline = self.out.deadlines.first().map(|d| d.0);
        let flush = self
            .jobs
            .values()
            .flat_map(|j| [j.flush_at, j.opens_at])
            .flatten()
            .min();
        match (deadline, flush) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A snapshot of `job`: every participant's state and sources, and the totals.
    pub fn job_status(&self, job: u64) -> Option<JobStatus> {
        let j = self.jobs.get(&job)?;
        Some(JobStatus {
            job,
            epoch: self.epoch,
            chunks: j.chunks,
            outcome: j.outcome,
            confirmed: j.confirmed,
            failed: j.failed,
            participants: j
                .parts
                .iter()
                .enumerate()
                .map(|(idx, p)| ParticipantStatus {
                    agent: p.id.clone(),
                    state: p.state,
                    online: p.online,
                    sources: j.distinct_sources(idx as u32),
                })
                .collect(),
            warnings: j.warnings.clone(),
            opens_at: j.opens_at,
            segments: j
                .plan
                .as_ref()
                .map(|plan| {
                    plan.segment_entries()
                        .iter()
                        .map(|e| SegmentStatus {
                            segment: j.segments.name(e.segment).cloned().unwrap_or_default(),
                            entries: e
                                .entries
                                .iter()
                                .map(|&i| j.parts[i as usize].id.clone())
                                .collect(),
                            fetchers: e.fetchers,
                            servers: e.servers,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Ids of the jobs the engine knows (running or ended and not forgotten).
    pub fn jobs(&self) -> impl Iterator<Item = u64> + '_ {
        self.jobs.keys().copied()
    }

    /// Turns a queued output into messages in `staged`, from the current state.
    fn materialize(&mut self, out: Out) {
        let epoch = self.epoch;
        match out {
            Out::Fetch { job: job_id, part } | Out::Sources { job: job_id, part } => {
                let Some(job) = self.jobs.get_mut(&job_id) else {
                    return;
                };
                let p = &mut job.parts[part as usize];
                let is_fetch = matches!(out, Out::Fetch { .. });
                if !is_fetch {
                    p.sources_queued = false;
                }
                if job.outcome != JobOutcome::Running
                    || !p.online
                    || !p.instructed
                    || p.state.is_terminal()
                {
                    return;
                }
                let to = p.id.clone();
                let ranges = job.source_ranges(&self.agents, part);
                let jr = JobRef { id: job_id, epoch };
                let mut rest = ranges.as_slice();
                if is_fetch {
                    let n = rest.len().min(MAX_SOURCES_PER_MESSAGE);
                    self.out.staged.push_back((
                        to.clone(),
                        Message::Fetch {
                            job: jr,
                            manifest: job.spec.manifest.clone(),
                            sources: to_bounded(&rest[..n]),
                            next: job.parts.get(part as usize + 1).map(|n| n.id.clone()),
                        },
                    ));
                    rest = &rest[n..];
                }
                for chunk in rest.chunks(MAX_SOURCES_PER_MESSAGE) {
                    self.out.staged.push_back((
                        to.clone(),
                        Message::Sources {
                            job: jr,
                            sources: to_bounded(chunk),
                        },
                    ));
                }
            }
            Out::Throttle { job: job_id, part } => {
                let Some(job) = self.jobs.get(&job_id) else {
                    return;
                };
                let p = &job.parts[part as usize];
                if job.outcome != JobOutcome::Running
                    || !p.online
                    || !p.instructed
                    || p.state.is_terminal()
                {
                    return;
                }
                self.out.staged.push_back((
                    p.id.clone(),
                    Message::Throttle {
                        job: JobRef { id: job_id, epoch },
                        max_bytes_per_second: p.throttle,
                    },
                ));
            }
            Out::End { job: job_id, part } => {
                let Some(job) = self.jobs.get(&job_id) else {
                    return;
                };
                let p = &job.parts[part as usize];
                if !p.online {
                    return;
                }
                let jr = JobRef { id: job_id, epoch };
                let msg = match job.outcome {
                    JobOutcome::Cancelled => Message::Cancel { job: jr },
                    _ => Message::Done { job: jr },
                };
                self.out.staged.push_back((p.id.clone(), msg));
            }
        }
    }
}

/// The relay plan's view of an agent: the policy's, with its segment number (`0` unless the
/// policy keeps content local) and whether it leads its segment.
fn node_info(
    policy: &Policy,
    segment: u32,
    leaders: &HashMap<Name, AgentId>,
    id: &AgentId,
    profile: &Profile,
) -> NodeInfo {
    NodeInfo {
        segment: if policy.segment_local { segment } else { 0 },
        leader: leaders.get(&profile.segment) == Some(id),
        ..policy.node_info(id, profile)
    }
}

/// Copies at most [`MAX_SOURCES_PER_MESSAGE`] ranges into a message's bounded list.
fn to_bounded<B: FromIterator<SourceRange>>(ranges: &[SourceRange]) -> B {
    ranges
        .iter()
        .take(MAX_SOURCES_PER_MESSAGE)
        .cloned()
        .collect()
}

impl Job {
    fn new(spec: JobSpec, chunks: u32, plan: Option<RelayPlan>) -> Self {
        Job {
            spec,
            chunks,
            plan,
            parts: Vec::new(),
            index: HashMap::new(),
            outcome: JobOutcome::Running,
            dirty: Vec::new(),
            bytes: BTreeMap::new(),
            flush_at: None,
            last_flush: None,
            confirmed: 0,
            failed: 0,
            segments: Segments::default(),
            segment_parts: HashMap::new(),
            warnings: Vec::new(),
            opens_at: None,
            throttle_segments: BTreeSet::new(),
            throttle_parts: Vec::new(),
        }
    }

    /// The plan's view of participant `idx` if its agent is online (numbering its segment).
    fn online_info(
        &mut self,
        agents: &HashMap<AgentId, Agent>,
        leaders: &HashMap<Name, AgentId>,
        idx: u32,
    ) -> Option<NodeInfo> {
        let agent = agents.get(&self.parts[idx as usize].id)?;
        // Known agents get their segment numbered even when offline (for rate caps).
        let info = self.info_of(leaders, idx, &agent.profile);
        agent.online.then_some(info)
    }

    /// The plan's view of participant `idx` with `profile`; records its segment.
    fn info_of(
        &mut self,
        leaders: &HashMap<Name, AgentId>,
        idx: u32,
        profile: &Profile,
    ) -> NodeInfo {
        let segment = self.segments.id(&profile.segment);
        let p = &mut self.parts[idx as usize];
        if !p.segment_known || p.segment != segment {
            if p.segment_known
                && p.segment != 0
                && let Some(list) = self.segment_parts.get_mut(&p.segment)
            {
                list.retain(|&i| i != idx);
            }
            if segment != 0 {
                self.segment_parts.entry(segment).or_default().push(idx);
            }
            p.segment = segment;
            p.segment_known = true;
        }
        node_info(
            &self.spec.policy,
            segment,
            leaders,
            &self.parts[idx as usize].id,
            profile,
        )
    }

    fn add_part(&mut self, id: AgentId, state: ParticipantState) -> u32 {
        let idx = self.parts.len() as u32;
        self.index.insert(id.clone(), idx);
        self.parts.push(Part::new(id, state));
        idx
    }

    /// The participant's current sources as wire ranges.
    fn source_ranges(&self, agents: &HashMap<AgentId, Agent>, idx: u32) -> Vec<SourceRange> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let mut out: Vec<SourceRange> = Vec::new();
        for a in plan.sources(idx) {
            let source = match a.holder {
                Holder::Manager => Source::Manager,
                Holder::Peer(q) => {
                    let id = &self.parts[q as usize].id;
                    match agents
                        .get(id)
                        .and_then(|ag| ag.profile.listen.map(|l| (l, ag.key)))
                    {
                        Some((addr, key)) => Source::Peer {
                            id: id.clone(),
                            addr,
                            key,
                        },
                        None => Source::Manager,
                    }
                }
            };
            match out.last_mut() {
                Some(last) if last.source == source && last.end == a.first => last.end = a.end,
                _ => out.push(SourceRange {
                    source,
                    first: a.first,
                    end: a.end,
                }),
            }
        }
        out
    }

    /// Distinct sources of a participant (`None` = manager), for status and notes.
    fn distinct_sources(&self, idx: u32) -> Vec<Option<AgentId>> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let mut out: Vec<Option<AgentId>> = Vec::new();
        for a in plan.sources(idx) {
            let s = match a.holder {
                Holder::Manager => None,
                Holder::Peer(q) => Some(self.parts[q as usize].id.clone()),
            };
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// A short human-readable summary of a participant's sources.
    fn source_note(&self, idx: u32) -> String {
        let Some(plan) = &self.plan else {
            return String::new();
        };
        let sources = plan.sources(idx);
        let mut note = String::new();
        for (n, a) in sources.iter().enumerate() {
            if n == 6 {
                note.push_str(&format!(", +{} more", sources.len() - n));
                break;
            }
            if n > 0 {
                note.push_str(", ");
            }
            match a.holder {
                Holder::Manager => note.push_str("manager"),
                Holder::Peer(q) => note.push_str(&self.parts[q as usize].id),
            }
            note.push_str(&format!(" {}..{}", a.first, a.end));
        }
        note
    }

    fn persist_part(&self, cx: &mut Ctx<'_>, job_id: u64, idx: u32, with_note: bool) {
        let p = &self.parts[idx as usize];
        cx.out.persist.push_back(Persist::Participant {
            job: job_id,
            agent: p.id.clone(),
            state: p.state,
            source_note: with_note.then(|| self.source_note(idx)),
        });
    }

    /// Sends `Fetch` to a participant that is online (persisting its state and sources first).
    fn instruct(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        p.instructed = true;
        p.ever_instructed = true;
        p.pleas = 0;
        p.state = ParticipantState::Fetching {
            verified: p.verified,
        };
        // A fresh instruction: whatever cap applies is sent again after the `Fetch`.
        p.throttle = 0;
        self.persist_part(cx, job_id, idx, true);
        cx.out.transmit.push_back(Out::Fetch {
            job: job_id,
            part: idx,
        });
        self.mark_throttle(idx);
    }

    /// Queues `Sources` for fetchers whose sources changed (those connected and instructed).
    fn resend_sources(&mut self, cx: &mut Ctx<'_>, job_id: u64, changed: &[u32]) {
        for &c in changed {
            let p = &self.parts[c as usize];
            if !p.online || !p.instructed || p.state.is_terminal() || p.sources_queued {
                continue;
            }
            self.persist_part(cx, job_id, c, true);
            self.parts[c as usize].sources_queued = true;
            cx.out.transmit.push_back(Out::Sources {
                job: job_id,
                part: c,
            });
            self.mark_throttle(c);
        }
    }

    fn arm_give_up(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        if let Some(old) = p.deadline.take() {
            cx.out.deadlines.remove(&(old, job_id, idx));
        }
        let when = cx.now + cx.config.give_up_after;
        p.deadline = Some(when);
        cx.out.deadlines.insert((when, job_id, idx));
    }

    fn disarm_give_up(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        if let Some(old) = self.parts[idx as usize].deadline.take() {
            cx.out.deadlines.remove(&(old, job_id, idx));
        }
    }

    fn send_end(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        if p.online && p.ever_instructed && !p.end_sent {
            p.end_sent = true;
            cx.out.transmit.push_back(Out::End {
                job: job_id,
                part: idx,
            });
        }
    }

    fn on_online(&mut self, cx: &mut Ctx<'_>, idx: u32) {
        let job_id = self.spec.id;
        let p = &mut self.parts[idx as usize];
        if p.online && (p.instructed || p.state.is_terminal()) {
            // A report update on the same connection: the plan learns what changed (an agent
            // that serves fewer peers now hands some of its fetchers to others).
            if self.outcome == JobOutcome::Running
                && let Some(agent) = cx.agents.get(&p.id)
                && !matches!(p.state, ParticipantState::Failed(_))
            {
                let info = self.info_of(cx.leaders, idx, &agent.profile);
                let plan = self.plan.as_mut().expect("running jobs have a plan");
                let changed: Vec<u32> = plan
                    .place(idx, info)
                    .into_iter()
                    .filter(|&c| c != idx)
                    .collect();
                self.resend_sources(cx, job_id, &changed);
            }
            return;
        }
        p.online = true;
        self.disarm_give_up(cx, job_id, idx);
        if self.outcome != JobOutcome::Running {
            self.send_end(cx, job_id, idx);
            return;
        }
        let Some(agent) = cx.agents.get(&self.parts[idx as usize].id) else {
            return;
        };
        let info = self.info_of(cx.leaders, idx, &agent.profile);
        let waiting = self.opens_at.is_some();
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        match self.parts[idx as usize].state {
            ParticipantState::Confirmed => {
                plan.place(idx, info);
            }
            ParticipantState::Failed(FailCause::Agent(_)) => {}
            ParticipantState::Failed(FailCause::GaveUp) if waiting => {}
            ParticipantState::Failed(FailCause::GaveUp) => {
                info!(job = job_id, agent = %self.parts[idx as usize].id, "given-up participant is back");
                self.failed -= 1;
                plan.revive(idx);
                plan.place(idx, info);
                self.instruct(cx, job_id, idx);
            }
            ParticipantState::Waiting | ParticipantState::Fetching { .. } => {
                plan.place(idx, info);
                if !waiting {
                    self.instruct(cx, job_id, idx);
                }
            }
        }
    }

    fn on_offline(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        if !p.online {
            return;
        }
        p.online = false;
        p.instructed = false;
        p.sources_queued = false;
        if self.outcome != JobOutcome::Running {
            return;
        }
        let changed = self
            .plan
            .as_mut()
            .map(|plan| plan.depart(idx))
            .unwrap_or_default();
        self.resend_sources(cx, job_id, &changed);
        self.mark_throttle(idx);
        if !self.parts[idx as usize].state.is_terminal() && self.opens_at.is_none() {
            self.arm_give_up(cx, job_id, idx);
        }
    }

    fn on_progress(
        &mut self,
        cx: &mut Ctx<'_>,
        job_id: u64,
        idx: u32,
        verified: u32,
        received: &[Received],
    ) {
        let chunks = self.chunks;
        let p = &mut self.parts[idx as usize];
        if let ParticipantState::Fetching { .. } = p.state {
            let verified = verified.min(chunks);
            if verified > p.verified {
                p.pleas = 0;
            }
            if verified != p.verified {
                p.verified = verified;
                p.state = ParticipantState::Fetching { verified };
                if !p.dirty {
                    p.dirty = true;
                    self.dirty.push(idx);
                }
            }
        }
        for r in received {
            if r.bytes > 0 {
                *self.bytes.entry((idx, r.from.clone())).or_default() += r.bytes;
            }
        }
        if self.dirty.is_empty() && self.bytes.is_empty() {
            return;
        }
        if self.flush_at.is_none() {
            let due = self
                .last_flush
                .map_or(cx.now, |last| last + cx.config.progress_flush);
            if due <= cx.now {
                self.flush(cx, job_id);
            } else {
                self.flush_at = Some(due);
            }
        }
    }

    /// Persists and reports the batched progress and source bytes.
    fn flush(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        self.flush_at = None;
        if self.dirty.is_empty() && self.bytes.is_empty() {
            return;
        }
        self.last_flush = Some(cx.now);
        let mut updates = Vec::with_capacity(self.dirty.len());
        for idx in std::mem::take(&mut self.dirty) {
            let p = &mut self.parts[idx as usize];
            p.dirty = false;
            updates.push((p.id.clone(), p.verified));
            cx.out.events.push_back(EngineEvent::Progress {
                job: job_id,
                agent: p.id.clone(),
                verified: p.verified,
                total: self.chunks,
            });
        }
        if !updates.is_empty() {
            cx.out.persist.push_back(Persist::Progress {
                job: job_id,
                updates,
            });
        }
        for ((idx, from), bytes) in std::mem::take(&mut self.bytes) {
            cx.out.persist.push_back(Persist::SourceBytes {
                job: job_id,
                agent: self.parts[idx as usize].id.clone(),
                from,
                bytes,
            });
        }
    }

    fn on_have(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        match p.state {
            ParticipantState::Confirmed => return,
            ParticipantState::Failed(_) => self.failed -= 1,
            _ => {}
        }
        p.state = ParticipantState::Confirmed;
        p.verified = self.chunks;
        self.confirmed += 1;
        self.disarm_give_up(cx, job_id, idx);
        if let Some(plan) = &mut self.plan {
            plan.confirm(idx);
        }
        self.mark_throttle(idx);
        self.persist_part(cx, job_id, idx, false);
        cx.out.events.push_back(EngineEvent::Confirmed {
            job: job_id,
            agent: self.parts[idx as usize].id.clone(),
        });
        debug!(job = job_id, agent = %self.parts[idx as usize].id, "confirmed");
        self.check_finished(cx, job_id);
    }

    fn fail(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32, cause: FailCause) {
        self.parts[idx as usize].state = ParticipantState::Failed(cause);
        self.failed += 1;
        self.disarm_give_up(cx, job_id, idx);
        let changed = self
            .plan
            .as_mut()
            .map(|plan| plan.fail(idx))
            .unwrap_or_default();
        self.mark_throttle(idx);
        self.persist_part(cx, job_id, idx, false);
        let agent = self.parts[idx as usize].id.clone();
        info!(job = job_id, agent = %agent, %cause, "participant failed");
        cx.out.events.push_back(EngineEvent::ParticipantFailed {
            job: job_id,
            agent,
            reason: cause.to_string(),
        });
        self.resend_sources(cx, job_id, &changed);
        self.check_finished(cx, job_id);
    }

    fn on_next_please(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        if !matches!(p.state, ParticipantState::Fetching { .. }) || !p.instructed {
            return; // confirmed: nothing more until the list is exhausted
        }
        p.pleas = p.pleas.saturating_add(1);
        let pleas = p.pleas;
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        if pleas > 1 {
            debug!(job = job_id, agent = %p.id, "asked again without progress: all from the manager");
            plan.all_from_manager(idx);
        } else {
            plan.refresh(idx);
        }
        self.resend_sources(cx, job_id, &[idx]);
    }

    fn on_trouble(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32, peer: u32, trouble: Trouble) {
        debug!(job = job_id, agent = %self.parts[idx as usize].id, peer = %self.parts[peer as usize].id, ?trouble, "peer trouble");
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        let mut changed = Vec::new();
        if plan.ban(idx, peer) {
            changed.push(idx);
        }
        match trouble {
            Trouble::BadChunk { .. } => changed.extend(plan.retire(peer, true)),
            Trouble::Unreachable => changed.extend(plan.retire(peer, false)),
            _ => {}
        }
        self.resend_sources(cx, job_id, &changed);
    }

    fn check_finished(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        if self.outcome == JobOutcome::Running && self.parts.iter().all(|p| p.state.is_terminal()) {
            info!(
                job = job_id,
                confirmed = self.confirmed,
                failed = self.failed,
                "job finished"
            );
            self.end(cx, job_id, JobOutcome::Finished);
        }
    }

    /// Ends the job: flushes progress, persists the end, tells connected participants.
    fn end(&mut self, cx: &mut Ctx<'_>, job_id: u64, outcome: JobOutcome) {
        self.flush(cx, job_id);
        self.outcome = outcome;
        self.plan = None;
        cx.out.persist.push_back(Persist::JobFinished {
            job: job_id,
            confirmed: self.confirmed,
            failed: self.failed,
        });
        cx.out.events.push_back(EngineEvent::JobFinished {
            job: job_id,
            confirmed: self.confirmed,
            failed: self.failed,
        });
        for idx in 0..self.parts.len() as u32 {
            self.disarm_give_up(cx, job_id, idx);
            self.send_end(cx, job_id, idx);
        }
    }
}

#[cfg(test)]
mod test;
