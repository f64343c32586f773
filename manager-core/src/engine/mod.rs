//! The job engine: the manager's sans-IO state machine for distribution jobs (claims 1, 3, 5).
//!
//! The engine never touches a socket, a clock or a file. Its driver (the
//! manager's server, or the simulator) feeds it what happened — an agent
//! connected and reported ([`Engine::agent_online`]), disconnected
//! ([`Engine::agent_offline`]), sent a message ([`Engine::handle_message`]),
//! a timer fired ([`Engine::handle_timeout`]) — and the administrator's
//! commands ([`Engine::start_job`], [`Engine::cancel_job`], the rollout's
//! [`Engine::pause_job`], [`Engine::resume_rollout`], [`Engine::approve_wave`] and
//! [`Engine::abort_job`], and [`Engine::resume_job`] after a restart). After every input the driver
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
//!
//! The code is split along the engine's seams: `state` holds where jobs and
//! participants stand, `handle` the inputs (agents coming and going, their
//! messages, timers firing), `lifecycle` the administrator's commands (start,
//! resume after a restart, cancel, forget), `instruct` what participants are
//! told and when they are given up, `output` the records, messages, events
//! and status the driver drains, `policy` the job policy's time windows,
//! rate caps and warnings, and `rates` the measured upload rates and when they
//! call for a new plan, and `trouble` the `PeerTrouble` reports: who may make
//! them, what retires a peer and when a reporter is demoted, `install` the states past
//! delivery (installing, installed, running, failed, rolled back) that decide when a job
//! ends, and `rollout` the staged rollouts: waves that open one after the other, and the
//! administrator's pause, resume, approve and abort, and `retry` the retries of failed
//! participants. This module holds the engine's configuration, its
//! errors and the records it keeps per agent, job and participant.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use baton_protocol::Manifest;
use baton_protocol::message::{InstallState, Message};
use baton_protocol::types::{AgentId, Name, PublicKey};
use serde::{Deserialize, Serialize};

use crate::planner::{Policy, Profile, RelayPlan, Segments};

/// The [`Ctx`] of an engine call at `now`, borrowed field by field from the engine
/// (`ctx!(self, now)`), so that its `jobs` can be borrowed mutably beside it.
macro_rules! ctx {
    ($engine:ident, $now:expr) => {
        Ctx {
            out: &mut $engine.out,
            agents: &$engine.agents,
            config: &$engine.config,
            now: $now,
            leaders: &$engine.leaders,
            wall: $engine.wall,
        }
    };
}

mod handle;
mod install;
mod instruct;
mod lifecycle;
mod output;
mod policy;
mod rates;
mod retry;
mod rollout;
mod state;
mod trouble;

pub use install::InstallReport;
pub use output::{EngineEvent, JobStatus, ParticipantStatus, Persist, SegmentStatus};
pub use policy::{format_duration, format_rate};
pub use state::{FailCause, JobOutcome, ParticipantState, RolloutState};

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
    /// After a restart, how long a resumed job waits for its participants to reconnect before
    /// it is planned again over what they hold (sooner when all are back); meanwhile they
    /// go on fetching from the peers of the plan before the restart.
    pub regroup_wait: Duration,
    /// How many bytes each byte of content stands for in agents' reports of bytes received
    /// (`1`; the simulator moves small real chunks that stand for large virtual ones and
    /// scales what agents report): the bound on what a report may claim scales with it.
    pub reported_bytes_per_byte: u64,
    /// How long a participant whose agent installs content (it said `install_step`) has,
    /// from its confirmation, to report a final install state (running, failed, rolled
    /// back), restarts included; then it is marked failed.
    pub install_deadline: Duration,
}

/// How long an agent has to install confirmed content unless configured otherwise: 30 min.
pub const DEFAULT_INSTALL_DEADLINE: Duration = Duration::from_secs(30 * 60);

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            give_up_after: Duration::from_secs(300),
            progress_flush: Duration::from_secs(1),
            manager_up_bps: 0,
            regroup_wait: Duration::from_secs(5),
            reported_bytes_per_byte: 1,
            install_deadline: DEFAULT_INSTALL_DEADLINE,
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
    /// These agents, and every agent that comes online while the job runs carrying all of
    /// these labels (a content group with a label selector, whose later members join late).
    Selected {
        /// The members when the job started.
        agents: Vec<AgentId>,
        /// The labels a newcomer must carry, every one (empty: nobody joins).
        labels: BTreeMap<String, String>,
    },
}

impl Targets {
    /// Whether an agent with `profile` that is not a participant yet joins a running job
    /// for these targets.
    pub fn takes_in(&self, profile: &Profile) -> bool {
        match self {
            Targets::All => true,
            Targets::Agents(_) => false,
            Targets::Selected { labels, .. } => {
                !labels.is_empty()
                    && labels.iter().all(|(k, v)| {
                        profile
                            .labels
                            .iter()
                            .any(|(pk, pv)| **pk == **k && **pv == **v)
                    })
            }
        }
    }
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
    /// An `InstallStatus` that does not fit the participant: another content name or
    /// version than the job's, a participant that has not confirmed, or a move its state
    /// may not make (backwards, or out of a final state).
    #[error("job {job}: install status from {agent} refused: {reason}")]
    InstallRefused {
        /// The job.
        job: u64,
        /// The sender.
        agent: AgentId,
        /// What does not fit.
        reason: String,
    },
    /// A rollout command that does not fit where the job's rollout stands (resume of a job
    /// that is not paused, approve with no wave waiting for approval).
    #[error("job {job}: {reason}")]
    Rollout {
        /// The job.
        job: u64,
        /// What does not fit.
        reason: String,
    },
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
    /// It said it installs what it receives (`Running { install_step: true }`): its
    /// confirmations wait for its install report.
    installs: bool,
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
    /// What it was told to fetch from, and how its `PeerTrouble` reports and those about it stand.
    standing: trouble::Standing,
    /// Bytes its `Progress` reports claimed received and the engine counted (at most its
    /// verified chunks plus [`RECEIVED_SLACK_CHUNKS`], in bytes).
    credited: u64,
    /// Where its install step stands once confirmed: `None` while its agent has not
    /// reported one (it is then waiting for it); content-only agents are `Running` at once.
    install: Option<InstallState>,
    /// When it is marked failed if no final install state came (armed at confirmation).
    install_deadline: Option<Duration>,
    /// Times it was retried after a failure (see `retry`).
    retries: u32,
    /// When its pending retry is due.
    retry_at: Option<Duration>,
}

/// Chunks a participant may report received beyond those it verified (in flight, or
/// failed verification): the slack of [`Part::credited`].
const RECEIVED_SLACK_CHUNKS: u64 = 16;

/// A message to build when it is polled (so large plans do not sit in memory as messages).
#[derive(Clone, Copy, Debug)]
enum Out {
    Fetch {
        job: u64,
        part: u32,
    },
    Sources {
        job: u64,
        part: u32,
    },
    End {
        job: u64,
        part: u32,
    },
    Throttle {
        job: u64,
        part: u32,
    },
    /// `Cancel` to a participant whose transfers stop at a window's close (the job goes on).
    Pause {
        job: u64,
        part: u32,
    },
    /// `Cancel` to a participant whose install is retried: its agent drops the job, and the
    /// `Fetch` that follows starts it anew.
    Reset {
        job: u64,
        part: u32,
    },
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
    /// Wall clock anchor: engine time and UTC seconds at the same instant, if known.
    wall: Option<(Duration, u64)>,
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
    /// While its time windows are open: when they close (engine time).
    closes_at: Option<Duration>,
    /// While a resumed job waits for its participants to reconnect: when it stops waiting.
    regroup_until: Option<Duration>,
    /// While it waits: participants neither back nor failed.
    regroup_missing: u32,
    /// Upload rates measured before the restart, by participant (ascending): the plan made
    /// when the wait ends is adapted to them, and they stand until measured again.
    restored_upload: Vec<(u32, u64)>,
    /// Whether the plan holds `restored_upload` (from the end of the wait on).
    restored_applied: bool,
    /// Segments whose participants' rate caps must be worked out again.
    throttle_segments: BTreeSet<u32>,
    /// Participants (outside named segments) whose rate cap must be worked out again.
    throttle_parts: Vec<u32>,
    /// What each participant delivers to its fetchers, and when the plan was last made.
    rates: rates::UploadMeter,
    /// Its staged rollout (waves, pause, approval), if it has one.
    staging: Option<rollout::Staging>,
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

    /// Changes the manager's upload capacity the planner counts on (`0` = unknown): new
    /// jobs are planned with it, running ones at their next adaptation to measured rates.
    pub fn set_manager_up_bps(&mut self, bytes_per_sec: u64) {
        self.config.manager_up_bps = bytes_per_sec;
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
}

/// UTC seconds at engine time `at`, from the wall clock anchor.
fn unix_at(wall: Option<(Duration, u64)>, at: Duration) -> Option<u64> {
    wall.map(|(anchor, unix)| {
        if at >= anchor {
            unix + (at - anchor).as_secs()
        } else {
            unix.saturating_sub((anchor - at).as_secs())
        }
    })
}

#[cfg(test)]
mod test;
