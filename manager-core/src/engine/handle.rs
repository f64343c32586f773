//! The engine's inputs: agents coming and going, their messages, and timers firing.
//!
//! The `Engine` methods here check an input and route it to the jobs it
//! concerns; the `Job` handlers update the participant, the relay plan and the
//! counts, and queue what follows (new sources, records, events, the end of
//! the job when everyone has confirmed or failed).

use core::time::Duration;

use baton_protocol::message::{FailReason, Message, Received, Report};
use baton_protocol::types::{AgentId, PublicKey};
use tracing::{debug, info};

use super::{
    Agent, Ctx, Engine, EngineError, EngineEvent, FailCause, Job, JobOutcome, ParticipantState,
    Persist,
};
use crate::planner::Profile;

impl Engine {
    /// An agent is connected and sent `report` (its first on this connection, or an update).
    ///
    /// Call it for every `Report`, after the handshake authenticated `id` with `key`. A
    /// participant of a running job that was not instructed on this connection gets a `Fetch`;
    /// for `Targets::All` jobs a new agent joins as a late participant, and so does one that
    /// carries every label of a `Targets::Selected` job's selector.
    pub fn agent_online(&mut self, now: Duration, id: AgentId, key: PublicKey, report: Report) {
        let profile = Profile::from(&report);
        let agent = self.agents.entry(id.clone()).or_insert(Agent {
            key,
            profile: profile.clone(),
            online: false,
            installs: false,
        });
        agent.key = key;
        agent.profile = profile;
        agent.online = true;

        let joining: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.outcome == JobOutcome::Running
                    && !j.index.contains_key(&id)
                    && j.spec.targets.takes_in(&agent.profile)
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
        let mut cx = ctx!(self, now);
        for (job_id, idx) in memberships {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.on_online(&mut cx, idx);
            }
        }
    }

    /// An agent's connection closed. Its fetchers are routed around it; if it is still
    /// working on a job, its give-up timer starts. Whether it installs is forgotten: its
    /// next session's `Running` says it again.
    pub fn agent_offline(&mut self, now: Duration, id: &AgentId) {
        if let Some(agent) = self.agents.get_mut(id) {
            agent.online = false;
            agent.installs = false;
        }
        let memberships = self.memberships.get(id).cloned().unwrap_or_default();
        let mut cx = ctx!(self, now);
        for (job_id, idx) in memberships {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.on_offline(&mut cx, job_id, idx);
            }
        }
    }

    /// A message from agent `from` (authenticated by the driver): `Progress`, `Have`, `Failed`,
    /// `NextPlease`, `PeerTrouble`, `Running` and `InstallStatus` (see
    /// [`Engine::install_status`]); `Ping`/`Pong` are accepted and ignored.
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
            Message::Running {
                install_step,
                versions,
            } => {
                self.agent_running(from, *install_step, versions);
                return Ok(());
            }
            Message::InstallStatus {
                job,
                name,
                version,
                state,
                exit_code,
                output,
            } => {
                let report = super::InstallReport {
                    job: *job,
                    name: name.clone(),
                    version: *version,
                    state: *state,
                    exit_code: *exit_code,
                    output: (*output).to_string(),
                };
                return self.install_status(now, from, report);
            }
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
        let mut cx = ctx!(self, now);
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
                    let standing = &mut job.parts[idx as usize].standing;
                    standing.unfounded = standing.unfounded.saturating_add(1);
                    debug!(job = job_id, agent = %from, peer = %peer, "trouble with a non-participant, ignored")
                }
            },
            _ => unreachable!("filtered above"),
        }
        Ok(())
    }

    /// A timer fired: gives up silent participants, flushes batched progress that is due, and
    /// closes upload measurement windows (re-planning a job whose measured rates drifted).
    pub fn handle_timeout(&mut self, now: Duration) {
        let mut cx = ctx!(self, now);
        while let Some(&(when, job_id, idx)) = cx.out.deadlines.first() {
            if when > now {
                break;
            }
            cx.out.deadlines.pop_first();
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            let p = &mut job.parts[idx as usize];
            if p.retry_at == Some(when) {
                p.retry_at = None;
                job.retry(&mut cx, job_id, idx);
                continue;
            }
            let p = &mut job.parts[idx as usize];
            if p.install_deadline == Some(when) {
                p.install_deadline = None;
                job.install_timed_out(&mut cx, job_id, idx);
                continue;
            }
            if p.deadline != Some(when) {
                continue;
            }
            p.deadline = None;
            let held = job.is_held(idx);
            let p = &job.parts[idx as usize];
            if job.outcome == JobOutcome::Running && !p.online && !p.state.is_terminal() && !held {
                info!(job = job_id, agent = %p.id, "participant given up");
                job.fail(&mut cx, job_id, idx, FailCause::GaveUp);
            }
        }
        for (&job_id, job) in self.jobs.iter_mut() {
            if job.flush_at.is_some_and(|t| t <= now) {
                job.flush(&mut cx, job_id);
            }
            if job.closes_at.is_some_and(|t| t <= now) {
                job.close_window(&mut cx, job_id);
            }
            if job.opens_at.is_some_and(|t| t <= now) {
                job.open_window(&mut cx, job_id);
            }
            if job.regroup_until.is_some_and(|t| t <= now) {
                job.end_regroup(&mut cx, job_id);
            }
            if job.rates.window_end().is_some_and(|t| t <= now) {
                job.rate_window_closed(&mut cx, job_id);
            }
            job.rollout_timer(&mut cx, job_id);
        }
    }
}

impl Job {
    pub(super) fn on_online(&mut self, cx: &mut Ctx<'_>, idx: u32) {
        let job_id = self.spec.id;
        let p = &mut self.parts[idx as usize];
        if p.online && self.regroup_until.is_some() {
            // A report update while the job waits for its participants to come back.
            return;
        }
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
        if self.regroup_until.is_some() {
            if !matches!(self.parts[idx as usize].state, ParticipantState::Failed(_)) {
                self.regroup_missing = self.regroup_missing.saturating_sub(1);
            }
            if self.regroup_missing == 0 {
                self.end_regroup(cx, job_id);
            }
            return;
        }
        if self.is_held(idx)
            && !matches!(
                self.parts[idx as usize].state,
                ParticipantState::Confirmed | ParticipantState::Failed(FailCause::Agent(_))
            )
        {
            // Its wave has not opened, or the rollout is paused: not placed, not instructed.
            return;
        }
        let Some(agent) = cx.agents.get(&self.parts[idx as usize].id) else {
            return;
        };
        let info = self.info_of(cx.leaders, idx, &agent.profile);
        let waiting = self.opens_at.is_some();
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        // Fetchers it takes over from the manager (see `RelayPlan::place`) are told.
        let relieved = match self.parts[idx as usize].state {
            ParticipantState::Confirmed => plan.place(idx, info),
            ParticipantState::Failed(FailCause::Agent(_)) => Vec::new(),
            ParticipantState::Failed(FailCause::GaveUp) if waiting => Vec::new(),
            ParticipantState::Failed(FailCause::GaveUp) => {
                info!(job = job_id, agent = %self.parts[idx as usize].id, "given-up participant is back");
                self.failed -= 1;
                plan.revive(idx);
                let changed = plan.place(idx, info);
                self.instruct(cx, job_id, idx);
                changed
            }
            ParticipantState::Waiting | ParticipantState::Fetching { .. } => {
                let changed = plan.place(idx, info);
                if !waiting {
                    self.instruct(cx, job_id, idx);
                } else {
                    // Its window is closed: if it knew the job (before a close, or before a
                    // restart), it stops fetching.
                    self.pause_part(cx, job_id, idx);
                }
                changed
            }
        };
        let relieved: Vec<u32> = relieved.into_iter().filter(|&c| c != idx).collect();
        self.resend_sources(cx, job_id, &relieved);
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
        if self.regroup_until.is_some() && !matches!(p.state, ParticipantState::Failed(_)) {
            self.regroup_missing += 1;
        }
        let changed = self
            .plan
            .as_mut()
            .map(|plan| plan.depart(idx))
            .unwrap_or_default();
        self.resend_sources(cx, job_id, &changed);
        self.mark_throttle(idx);
        if !self.parts[idx as usize].state.is_terminal()
            && self.opens_at.is_none()
            && !self.is_held(idx)
        {
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
        let mut changed = Vec::new();
        // What a report claims is counted only up to what its participant verified (plus
        // the chunks it may have in flight): a hostile figure neither overflows the
        // counters nor inflates a source's rate beyond the bytes really delivered. A
        // source's rate is credited only by a fetcher assigned to it.
        let scale = cx.config.reported_bytes_per_byte.max(1);
        let chunk = u64::from(self.spec.manifest.chunk_size.max(1)).saturating_mul(scale);
        let length = self.spec.manifest.length.saturating_mul(scale);
        let p = &self.parts[idx as usize];
        let allowed = (u64::from(p.verified) + super::RECEIVED_SLACK_CHUNKS)
            .saturating_mul(chunk)
            .min(length.saturating_add(super::RECEIVED_SLACK_CHUNKS.saturating_mul(chunk)));
        let mut left = allowed.saturating_sub(p.credited);
        for r in received {
            let bytes = r.bytes.min(left);
            if bytes == 0 {
                continue;
            }
            left -= bytes;
            self.parts[idx as usize].credited += bytes;
            if let Some(&source) = r.from.as_ref().and_then(|id| self.index.get(id))
                && source != idx
                && self.parts[idx as usize].standing.assigned(source)
            {
                self.rates.record(cx.now, source, bytes);
                changed.extend(self.verified_from(cx, job_id, idx, source));
            }
            let total = self.bytes.entry((idx, r.from.clone())).or_default();
            *total = total.saturating_add(bytes);
        }
        self.resend_sources(cx, job_id, &changed);
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
        // Running at once (content only, which may end the job), or waiting for the install.
        self.begin_install(cx, job_id, idx);
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
        // Only a failure that may pass is retried: a full or failing store, a busy agent,
        // no source found. A content the agent refuses (signature, manifest, trust, expiry,
        // downgrade, reused version, chunk size, not listed) would fail the same way again.
        if let FailCause::Agent(
            FailReason::StorageFull
            | FailReason::StorageError
            | FailReason::Busy
            | FailReason::NoSource,
        ) = cause
        {
            self.schedule_retry(cx, job_id, idx, &cause.to_string());
        }
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

    pub(super) fn check_finished(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        // A wave that succeeded opens the next (its participants are then not settled),
        // failures beyond the rollout's thresholds pause or abort it.
        self.check_waves(cx, job_id);
        if self.outcome == JobOutcome::Running && self.parts.iter().all(|p| p.settled()) {
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
    pub(super) fn end(&mut self, cx: &mut Ctx<'_>, job_id: u64, outcome: JobOutcome) {
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
            self.disarm_install_deadline(cx, job_id, idx);
            self.send_end(cx, job_id, idx);
        }
    }
}
