//! The engine's driver: the one task that owns the sans-IO [`Engine`].
//!
//! Inputs ([`EngineInput`]) come from the agent port and serial lines (agents
//! online, their messages, offline) and from the service layer (start and
//! cancel jobs, pause, resume, approve and abort rollouts). After every batch of inputs
//! [`EngineTask`] writes the batch's agent reports and last-seen times in one transaction
//! (a storm of reports is one commit per batch of up to 256, not one each), drains
//! `poll_persist` into the store in one transaction, and only then sends what
//! `poll_transmit` returns through the registry (persist before instruct),
//! then publishes `poll_event` as [`JobEvent`]s and arms the timer at
//! `poll_timeout`.
//!
//! The input channel is bounded ([`ENGINE_QUEUE`], made by [`channel`]): a
//! sender waits while it is full, so a session reading a flooding agent stops
//! reading its socket instead of growing the manager's memory. The engine task
//! itself never sends to its input and never waits on anyone: instructions go
//! out through the registry's bounded control queues without waiting. Within a
//! batch, a report superseded by a later report of the same agent (nothing of
//! that agent in between) is skipped: each report costs a database write and a
//! re-placement in the running plans.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_protocol::message::{Message, Report};
use baton_protocol::types::{AgentId, PublicKey};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::registry::{Registry, SharedStore, lock, unix_now};
use crate::store::fence::LeaseFence;
use crate::store::{JobState, StoreError};
use baton_agent_core::linux::spaced::SpacedLog;
use baton_manager_core::engine::{Engine, EngineEvent, InstallReport, JobSpec};

/// The warning about messages the engine refused (stale jobs, unknown agents), spaced.
static REFUSED_MESSAGES: SpacedLog = SpacedLog::new(baton_agent_core::linux::spaced::WARN_EVERY);
/// Inputs the engine task takes at once before persisting and transmitting.
const INPUT_BATCH: usize = 256;
/// Inputs waiting for the engine task at most; senders wait beyond.
pub const ENGINE_QUEUE: usize = 1024;

/// Where agent sessions and the API send the engine task its inputs.
pub type EngineSender = mpsc::Sender<EngineInput>;

/// The engine task's input channel: [`ENGINE_QUEUE`] inputs at most.
pub fn channel() -> (EngineSender, mpsc::Receiver<EngineInput>) {
    mpsc::channel(ENGINE_QUEUE)
}

/// What the engine task counts while it runs, for `/metrics`.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Chunks agents reported as failing verification (`PeerTrouble::BadChunk`) since start.
    pub chunk_verification_failures: AtomicU64,
}

/// An input to the engine task.
pub enum EngineInput {
    /// An agent's report, checked by its session (its own id): the first of a connection, or a
    /// later one when the agent changed.
    Online {
        /// The agent.
        id: AgentId,
        /// Its authenticated key.
        key: PublicKey,
        /// Its report.
        report: Box<Report>,
    },
    /// A message from a connected agent, for the engine (its session routed it here).
    Message {
        /// The agent.
        id: AgentId,
        /// The message, encoded ([`EngineInput::message`]): a few dozen bytes where a
        /// decoded message takes 2.4 KB, and a push to every agent has each session's
        /// `Progress` or `Have` waiting here at once. Decoded again by the engine task.
        msg: Box<[u8]>,
    },
    /// An install report from a connected agent (`InstallStatus`, checked by its session).
    Install {
        /// The agent.
        id: AgentId,
        /// The report.
        report: Box<InstallReport>,
    },
    /// An agent's connection ended.
    Offline {
        /// The agent.
        id: AgentId,
    },
    /// Start a job (created in the store as pending).
    StartJob {
        /// What to distribute to whom.
        spec: Box<JobSpec>,
        /// The engine's answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Cancel a job.
    CancelJob {
        /// The job.
        job: u64,
        /// The engine's answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Pause, resume, approve or abort a job's rollout.
    Rollout {
        /// The job.
        job: u64,
        /// What to do.
        action: RolloutAction,
        /// The engine's answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The manager's upload cap changed (`--up-bps` reloaded; `0` = none).
    SetManagerUpBps(u64),
}

/// An administrator's command to a job's staged rollout (`baton job N ACTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    /// Nobody new is instructed and no wave opens (transfers under way finish).
    Pause,
    /// Undo a pause, accepting the failures counted so far.
    Resume,
    /// Open the next wave of a rollout that waits for approval.
    Approve,
    /// End the job: instructed participants get `Cancel`, the others never hear of it.
    Abort,
}

impl RolloutAction {
    /// Its name in routes and the CLI (`pause`, `resume`, `approve`, `abort`).
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Approve => "approve",
            RolloutAction::Abort => "abort",
        }
    }
}

impl EngineInput {
    /// A message of agent `id` for the engine (see [`EngineInput::Message`]).
    pub fn message(id: AgentId, msg: &Message<'_>) -> Self {
        EngineInput::Message {
            id,
            msg: msg.to_vec().into_boxed_slice(),
        }
    }
}

impl std::fmt::Debug for EngineInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineInput::Online { id, .. } => write!(f, "Online({id})"),
            EngineInput::Message { id, msg } => match Message::decode(msg) {
                Ok(m) => write!(f, "Message({id}, {})", m.kind()),
                Err(_) => write!(f, "Message({id}, {} bytes not decoding)", msg.len()),
            },
            EngineInput::Install { id, report } => {
                write!(
                    f,
                    "Install({id}, {}, {})",
                    report.job.id,
                    report.state.name()
                )
            }
            EngineInput::Offline { id } => write!(f, "Offline({id})"),
            EngineInput::StartJob { spec, .. } => write!(f, "StartJob({})", spec.id),
            EngineInput::CancelJob { job, .. } => write!(f, "CancelJob({job})"),
            EngineInput::Rollout { job, action, .. } => {
                write!(f, "Rollout({job}, {})", action.as_str())
            }
            EngineInput::SetManagerUpBps(bps) => write!(f, "SetManagerUpBps({bps})"),
        }
    }
}

/// Progress of a job, as the API streams it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobEvent {
    /// A participant verified more chunks.
    Progress {
        /// The job.
        job: u64,
        /// The participant.
        agent: String,
        /// Chunks verified.
        verified: u32,
        /// Chunks in the content.
        total: u32,
    },
    /// A participant confirmed.
    Confirmed {
        /// The job.
        job: u64,
        /// The participant.
        agent: String,
    },
    /// A participant failed or was given up.
    Failed {
        /// The job.
        job: u64,
        /// The participant.
        agent: String,
        /// Why.
        reason: String,
    },
    /// A confirmed participant's install step moved (content-only participants: running at
    /// once).
    Install {
        /// The job.
        job: u64,
        /// The participant.
        agent: String,
        /// `installing`, `installed`, `running`, `failed` or `rolled_back`.
        state: String,
        /// The deciding command's exit code, if one ran to its end.
        exit_code: Option<i32>,
    },
    /// Every participant settled: running, failed or rolled back (or failed delivery).
    Finished {
        /// The job.
        job: u64,
        /// Participants that confirmed.
        confirmed: u32,
        /// Participants that failed.
        failed: u32,
    },
    /// The administrator cancelled the job.
    Cancelled {
        /// The job.
        job: u64,
    },
    /// The job's staged rollout moved (paused, resumed, a wave succeeded or opened, waits for
    /// approval, aborted).
    Rollout {
        /// The job.
        job: u64,
        /// Where the rollout stands now: `running`, `soaking`, `awaiting_approval`,
        /// `paused`, `complete` or `aborted`.
        state: String,
        /// The waves opened so far.
        opened: u32,
        /// What happened, for people.
        text: String,
    },
    /// A rule of the job's policy cannot be met, or a participant was demoted as a trouble
    /// reporter (stored with the job as a warning).
    Warning {
        /// The job.
        job: u64,
        /// What happened, for people.
        text: String,
    },
}

impl JobEvent {
    /// The job the event is about.
    pub fn job(&self) -> u64 {
        match self {
            JobEvent::Progress { job, .. }
            | JobEvent::Confirmed { job, .. }
            | JobEvent::Failed { job, .. }
            | JobEvent::Install { job, .. }
            | JobEvent::Finished { job, .. }
            | JobEvent::Warning { job, .. }
            | JobEvent::Rollout { job, .. }
            | JobEvent::Cancelled { job } => *job,
        }
    }

    /// Whether nothing more will happen to the job after this event.
    pub fn is_final(&self) -> bool {
        matches!(self, JobEvent::Finished { .. } | JobEvent::Cancelled { .. })
    }

    fn from_engine(event: EngineEvent) -> Self {
        match event {
            EngineEvent::Progress {
                job,
                agent,
                verified,
                total,
            } => JobEvent::Progress {
                job,
                agent: agent.to_string(),
                verified,
                total,
            },
            EngineEvent::Confirmed { job, agent } => JobEvent::Confirmed {
                job,
                agent: agent.to_string(),
            },
            EngineEvent::ParticipantFailed { job, agent, reason } => JobEvent::Failed {
                job,
                agent: agent.to_string(),
                reason,
            },
            EngineEvent::JobFinished {
                job,
                confirmed,
                failed,
            } => JobEvent::Finished {
                job,
                confirmed,
                failed,
            },
            EngineEvent::Install {
                job,
                agent,
                state,
                exit_code,
            } => JobEvent::Install {
                job,
                agent: agent.to_string(),
                state: crate::store::InstallPhase::of(Some(state))
                    .as_str()
                    .to_string(),
                exit_code,
            },
            EngineEvent::PolicyWarning { job, text } => JobEvent::Warning { job, text },
            EngineEvent::Rollout { job, state, text } => JobEvent::Rollout {
                job,
                state: state.name().to_string(),
                opened: state.opened,
                text,
            },
            EngineEvent::ReporterDemoted { job, agent, reason } => JobEvent::Warning {
                job,
                text: demotion_text(&agent, &reason),
            },
        }
    }
}

/// The job warning that records a demoted trouble reporter.
fn demotion_text(agent: &AgentId, reason: &str) -> String {
    format!("{agent} demoted as a trouble reporter: {reason}; it no longer relays in this job")
}

/// Why the engine task stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineTaskError {
    /// Persisting the engine's records failed: nothing may be instructed that is not recorded.
    #[error("cannot persist job state, stopping so that no unrecorded instruction is sent: {0}")]
    Persist(#[source] StoreError),
    /// The managers' lease ran out (by this manager's clock) before the engine could
    /// instruct: another manager may be active, so nothing is sent.
    #[error(
        "the managers' lease ran out: stopping before instructing (another manager may be active)"
    )]
    LeaseRanOut,
}

/// The task that owns the [`Engine`]: feeds it inputs, persists, transmits, publishes events.
pub struct EngineTask {
    engine: Engine,
    store: SharedStore,
    registry: Arc<Registry>,
    events: broadcast::Sender<JobEvent>,
    stats: Arc<EngineStats>,
    origin: Instant,
    /// Answers to commands, sent once what the command caused is persisted.
    replies: Vec<Reply>,
    /// Reports taken since the last [`EngineTask::drain`], written there in one transaction.
    reports: Vec<Report>,
    /// Agents gone offline since the last [`EngineTask::drain`] (their last-seen time).
    seen: Vec<AgentId>,
    /// With several managers on one database: nothing is persisted or sent unless this
    /// manager still holds the lease by its own clock ([`LeaseFence::acting`]).
    lease: Option<Arc<LeaseFence>>,
}

/// A command's answer channel and its result.
type Reply = (oneshot::Sender<Result<(), String>>, Result<(), String>);

impl std::fmt::Debug for EngineTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineTask").finish_non_exhaustive()
    }
}

impl EngineTask {
    /// A driver for `engine`; `origin` is the engine's time zero.
    pub fn new(
        engine: Engine,
        store: SharedStore,
        registry: Arc<Registry>,
        events: broadcast::Sender<JobEvent>,
        origin: Instant,
    ) -> Self {
        let mut engine = engine;
        engine.set_wall_clock(origin.elapsed(), unix_now());
        EngineTask {
            engine,
            store,
            registry,
            events,
            stats: Arc::default(),
            origin,
            replies: Vec::new(),
            reports: Vec::new(),
            seen: Vec::new(),
            lease: None,
        }
    }

    /// The task persists and instructs only while `fence` says this manager holds the lease.
    pub fn with_lease(mut self, fence: Arc<LeaseFence>) -> Self {
        self.lease = Some(fence);
        self
    }

    /// An error if this manager no longer holds the lease by its own clock.
    fn check_lease(&self) -> Result<(), EngineTaskError> {
        match &self.lease {
            Some(fence) if !fence.acting() => Err(EngineTaskError::LeaseRanOut),
            _ => Ok(()),
        }
    }

    /// What the task counts, shared with whoever reports it.
    pub fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    /// The engine's clock: time since `origin`.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// The engine, for setting up before [`EngineTask::run`] (resuming jobs).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Runs until `shutdown` completes or every input sender is gone.
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<EngineInput>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), EngineTaskError> {
        tokio::pin!(shutdown);
        self.drain()?;
        loop {
            let deadline = self.engine.poll_timeout().map(|t| self.origin + t);
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    // Take what else is ready, then persist and instruct once.
                    let mut batch = Vec::with_capacity(INPUT_BATCH.min(inputs.len() + 1));
                    batch.push(input);
                    while batch.len() < INPUT_BATCH {
                        match inputs.try_recv() {
                            Ok(input) => batch.push(input),
                            Err(_) => break,
                        }
                    }
                    for input in coalesce(batch) {
                        self.handle(input);
                    }
                }
                _ = sleep_until(deadline) => {
                    let now = self.now();
                    self.engine.set_wall_clock(now, unix_now());
                    self.engine.handle_timeout(now);
                }
            }
            self.drain()?;
        }
        Ok(())
    }

    /// Feeds one input to the engine (and the store where it records agent facts).
    pub fn handle(&mut self, input: EngineInput) {
        let now = self.now();
        self.engine.set_wall_clock(now, unix_now());
        match input {
            EngineInput::Online { id, key, report } => {
                self.reports.push((*report).clone());
                self.engine.agent_online(now, id, key, *report);
            }
            EngineInput::Message { id, msg } => {
                let msg = match Message::decode(&msg) {
                    Ok(m) => m,
                    Err(e) => {
                        // The session decoded it before encoding it again: a bug if seen.
                        tracing::error!(agent = %id, "a message for the engine does not decode: {e}");
                        return;
                    }
                };
                if let Message::PeerTrouble {
                    trouble: baton_protocol::message::Trouble::BadChunk { .. },
                    ..
                } = &msg
                {
                    self.stats
                        .chunk_verification_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = self.engine.handle_message(now, &id, &msg)
                    && let Some(held_back) = REFUSED_MESSAGES.due()
                {
                    tracing::warn!(agent = %id, kind = msg.kind(), held_back, "engine refused message: {e}");
                }
            }
            EngineInput::Install { id, report } => {
                match self.engine.install_status(now, &id, *report) {
                    Ok(()) => {}
                    // Agents repeat their latest reports after every `Welcome`: one for a
                    // job the engine no longer holds is old news.
                    Err(e @ baton_manager_core::engine::EngineError::UnknownJob(_)) => {
                        tracing::debug!(agent = %id, "install status ignored: {e}");
                    }
                    Err(e) => {
                        if let Some(held_back) = REFUSED_MESSAGES.due() {
                            tracing::warn!(agent = %id, held_back, "engine refused install status: {e}");
                        }
                    }
                }
            }
            EngineInput::Offline { id } => {
                self.engine.agent_offline(now, &id);
                self.seen.push(id);
            }
            EngineInput::StartJob { spec, reply } => {
                let job = spec.id;
                let result = self.engine.start_job(now, *spec).map_err(|e| e.to_string());
                if let Err(e) = &result {
                    tracing::warn!(job, "engine refused job: {e}");
                    if let Err(se) =
                        lock(&self.store).set_job_state(job, JobState::Refused, Some(e), unix_now())
                    {
                        tracing::error!(job, "cannot record refused job: {se}");
                    }
                } else {
                    tracing::info!(job, "job started");
                }
                self.replies.push((reply, result));
            }
            EngineInput::CancelJob { job, reply } => {
                let result = match self.engine.cancel_job(now, job) {
                    Ok(()) => lock(&self.store)
                        .set_job_state(job, JobState::Cancelled, None, unix_now())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if result.is_ok() {
                    tracing::info!(job, "job cancelled");
                    let _ = self.events.send(JobEvent::Cancelled { job });
                }
                self.replies.push((reply, result));
            }
            EngineInput::Rollout { job, action, reply } => {
                let result = match action {
                    RolloutAction::Pause => self.engine.pause_job(now, job),
                    RolloutAction::Resume => self.engine.resume_rollout(now, job),
                    RolloutAction::Approve => self.engine.approve_wave(now, job),
                    RolloutAction::Abort => self.engine.abort_job(now, job),
                }
                .map_err(|e| e.to_string());
                if result.is_ok() {
                    tracing::info!(job, action = action.as_str(), "rollout command");
                }
                self.replies.push((reply, result));
            }
            EngineInput::SetManagerUpBps(bps) => self.engine.set_manager_up_bps(bps),
        }
    }

    /// Writes the reports and last-seen times taken since the last drain, in one transaction.
    fn record_reports(&mut self) {
        if self.reports.is_empty() && self.seen.is_empty() {
            return;
        }
        let result = lock(&self.store).record_reports(&self.reports, &self.seen, unix_now());
        match result {
            Ok(refused) => {
                // One line per batch, however many agents it names.
                if let Some(first) = refused.first() {
                    tracing::warn!(
                        refused = refused.len(),
                        "cannot record reports (agents no longer enrolled?): {first}"
                    );
                }
            }
            Err(e) => tracing::warn!(
                reports = self.reports.len(),
                seen = self.seen.len(),
                "cannot record reports and last-seen times: {e}"
            ),
        }
        self.reports.clear();
        self.seen.clear();
    }

    /// Persists every pending record (one transaction), then transmits, answers commands, and
    /// publishes events.
    pub fn drain(&mut self) -> Result<(), EngineTaskError> {
        // The batch's reports first, as each was written before the engine saw it.
        self.record_reports();
        let mut records = Vec::new();
        while let Some(r) = self.engine.poll_persist() {
            records.push(r);
        }
        if !records.is_empty() {
            self.check_lease()?;
            lock(&self.store)
                .apply(&records, unix_now())
                .map_err(EngineTaskError::Persist)?;
        }
        let mut transmit = self.engine.poll_transmit();
        if transmit.is_some() {
            self.check_lease()?;
        }
        while let Some((to, msg)) = transmit.take().or_else(|| self.engine.poll_transmit()) {
            if let Message::Cancel { job } | Message::Fetch { job, .. } = &msg {
                // Chunk answers of a cancelled job stop at once (queued ones included),
                // unless another running job still has the agent fetch the same content.
                let root = self
                    .engine
                    .job_root(job.id)
                    .filter(|r| !self.engine.fetches_root_elsewhere(&to, r, job.id));
                self.registry.note_instruction(&to, &msg, root);
            }
            if !self.registry.send(&to, msg.to_vec()) {
                tracing::debug!(agent = %to, kind = msg.kind(), "agent not connected; instruction dropped");
            }
        }
        for (reply, result) in self.replies.drain(..) {
            let _ = reply.send(result);
        }
        while let Some(event) = self.engine.poll_event() {
            match &event {
                EngineEvent::JobFinished { job, .. } => {
                    // Its records are persisted and its last instructions sent: free its state.
                    self.engine.forget_job(*job);
                }
                EngineEvent::PolicyWarning { job, text } => {
                    tracing::warn!(job, "policy cannot be met: {text}");
                    if let Err(e) = lock(&self.store).add_job_warning(*job, text, unix_now()) {
                        tracing::error!(job, "cannot record policy warning: {e}");
                    }
                }
                EngineEvent::ReporterDemoted { job, agent, reason } => {
                    // The engine logged it; the job's warnings keep it for the API and the UI.
                    let text = demotion_text(agent, reason);
                    if let Err(e) = lock(&self.store).add_job_warning(*job, &text, unix_now()) {
                        tracing::error!(job, "cannot record demotion: {e}");
                    }
                }
                _ => {}
            }
            let _ = self.events.send(JobEvent::from_engine(event));
        }
        Ok(())
    }
}

/// The inputs of `batch` in order, without the reports a later report of the same agent
/// supersedes (no other input of that agent between them).
fn coalesce(batch: Vec<EngineInput>) -> impl Iterator<Item = EngineInput> {
    let agent = |input: &EngineInput| match input {
        EngineInput::Online { id, .. }
        | EngineInput::Message { id, .. }
        | EngineInput::Install { id, .. }
        | EngineInput::Offline { id } => Some(id.clone()),
        EngineInput::StartJob { .. }
        | EngineInput::CancelJob { .. }
        | EngineInput::Rollout { .. }
        | EngineInput::SetManagerUpBps(_) => None,
    };
    // Walking backwards: an agent's next input seen so far is a report (true) or not.
    let mut next_is_report: std::collections::HashMap<AgentId, bool> = Default::default();
    let mut keep = vec![true; batch.len()];
    for (i, input) in batch.iter().enumerate().rev() {
        let Some(id) = agent(input) else { continue };
        let is_report = matches!(input, EngineInput::Online { .. });
        if is_report && next_is_report.get(&id) == Some(&true) {
            keep[i] = false;
        }
        next_is_report.insert(id, is_report);
    }
    batch
        .into_iter()
        .zip(keep)
        .filter_map(|(input, keep)| keep.then_some(input))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn online(agent: &str, performance: u16) -> EngineInput {
        EngineInput::Online {
            id: id(agent),
            key: PublicKey([1; 32]),
            report: Box::new(Report {
                performance: performance.into(),
                free_storage: 0,
                ..crate::test_fixtures::report(id(agent))
            }),
        }
    }

    fn names(inputs: impl Iterator<Item = EngineInput>) -> Vec<String> {
        inputs
            .map(|i| match i {
                EngineInput::Online { id, report, .. } => format!("{id}:{}", report.performance),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_batch_keeps_only_the_last_of_consecutive_reports_per_agent() {
        let batch = vec![
            online("a", 1),
            online("b", 1),
            online("a", 2),
            EngineInput::message(id("a"), &Message::Ping { nonce: 1 }),
            online("a", 3),
            online("a", 4),
            EngineInput::Offline { id: id("b") },
            online("b", 2),
        ];
        assert_eq!(
            names(coalesce(batch)),
            ["b:1", "a:2", "Message(a, Ping)", "a:4", "Offline(b)", "b:2"]
        );
    }

    #[test]
    fn a_flood_of_reports_costs_one_per_batch() {
        let batch: Vec<_> = (0..INPUT_BATCH as u16).map(|n| online("f", n)).collect();
        assert_eq!(names(coalesce(batch)), [format!("f:{}", INPUT_BATCH - 1)]);
    }

    #[tokio::test]
    async fn the_input_is_bounded_and_a_sender_waits_until_the_engine_takes_some() {
        let (tx, mut rx) = channel();
        for n in 0..ENGINE_QUEUE {
            tx.try_send(online("a", n as u16)).expect("room");
        }
        // Full: the next input is refused without waiting, and a sender that awaits waits.
        assert!(matches!(
            tx.try_send(online("a", 0)),
            Err(mpsc::error::TrySendError::Full(_))
        ));
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(online("late", 1)).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the sender waits while the queue is full"
        );
        assert!(rx.recv().await.is_some());
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the sender goes on once there is room")
            .unwrap();
        assert!(sent);
        assert_eq!(rx.len(), ENGINE_QUEUE);
    }
}
