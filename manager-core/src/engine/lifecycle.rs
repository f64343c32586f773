//! The administrator's commands: start a job, resume it after a restart, cancel and forget it.
//!
//! Starting ranks the online targets and builds the relay plan; resuming
//! rebuilds it from the stored states under the new epoch. Both queue the
//! `JobStarted` record first and then [`Engine::begin`]: instruct whoever is
//! online, start the give-up timers of the others, or wait for the policy's
//! time window.

use core::time::Duration;

use baton_protocol::types::AgentId;
use tracing::{info, warn};

use super::{
    Ctx, Engine, EngineError, FailCause, Job, JobOutcome, JobSpec, ParticipantState, Persist,
    Targets,
};
use crate::planner::{RelayPlan, Seed, prioritize};

impl Engine {
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
            Targets::Agents(list) | Targets::Selected { agents: list, .. } => {
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
        // A staged rollout keeps each wave's participants together, in the list's order.
        let (order, staging) = Job::stage(spec.policy.rollout.as_ref(), order);
        let chunks = spec.manifest.chunks();
        let mut job = Job::new(spec, chunks, None);
        job.staging = staging;
        for id in &order {
            job.add_part(id.clone(), ParticipantState::Waiting);
        }
        let seeds: Vec<Seed> = (0..order.len() as u32)
            .map(|idx| Seed {
                // Participants of later waves are not in the plan until their wave opens.
                info: job
                    .online_info(&self.agents, &self.leaders, idx)
                    .filter(|_| !job.is_held(idx)),
                ..Seed::default()
            })
            .collect();
        let mut plan =
            RelayPlan::build(chunks, self.config.manager_up_bps, &job.spec.policy, &seeds);
        plan.set_holders_first(job.staging.is_some());
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
        if let Some(st) = &job.staging {
            info!(job = job_id, waves = ?st.state.ends, "staged rollout: wave 1 opens");
            self.out.persist.push_back(Persist::Rollout {
                job: job_id,
                state: st.state.clone(),
            });
        }
        self.begin(now, job_id, job);
        Ok(())
    }

    /// Resumes a job after a manager restart, under this engine's (newer) epoch.
    ///
    /// `participants` are the stored states, in the stored order; `measured_upload` the
    /// rates of the last [`Persist::MeasuredUpload`]. Confirmed and failed ones stay so. The
    /// job waits up to [`EngineConfig::regroup_wait`](super::EngineConfig::regroup_wait) for
    /// its participants to reconnect (they go on fetching from their peers meanwhile), then
    /// is planned as a fresh job over what they hold, adapted to the measured rates, and
    /// those back get a `Fetch` with the new epoch (they resume from the chunks they
    /// verified). A job id already known is ignored.
    pub fn resume_job(
        &mut self,
        now: Duration,
        spec: JobSpec,
        participants: Vec<(AgentId, ParticipantState)>,
        measured_upload: &[(AgentId, u64)],
    ) {
        self.resume_job_with_installs(now, spec, participants, measured_upload, &[]);
    }

    /// [`Engine::resume_job`] with the stored install states of confirmed participants that
    /// are not running: `None` for one still waiting for its agent's install report (it gets
    /// a fresh install deadline). Confirmed participants not listed are running.
    pub fn resume_job_with_installs(
        &mut self,
        now: Duration,
        spec: JobSpec,
        participants: Vec<(AgentId, ParticipantState)>,
        measured_upload: &[(AgentId, u64)],
        installs: &[(AgentId, Option<baton_protocol::message::InstallState>)],
    ) {
        self.resume_staged_job(now, spec, participants, measured_upload, installs, None);
    }

    /// [`Engine::resume_job_with_installs`] with the stored state of the job's staged
    /// rollout (`None`: it had none stored; a policy with waves then starts its rollout
    /// over the stored order, wave 1 open): the waves opened, a pause and a wait for
    /// approval carry over, and a soak ends when it was due by the wall clock.
    pub fn resume_staged_job(
        &mut self,
        now: Duration,
        spec: JobSpec,
        participants: Vec<(AgentId, ParticipantState)>,
        measured_upload: &[(AgentId, u64)],
        installs: &[(AgentId, Option<baton_protocol::message::InstallState>)],
        rollout: Option<super::RolloutState>,
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
        job.staging = match (job.spec.policy.rollout.clone(), rollout) {
            (rules, Some(state)) => Some(super::rollout::Staging::restored(
                rules.unwrap_or_else(super::rollout::Staging::single_wave),
                state,
                now,
                self.wall,
            )),
            (Some(rules), None) => {
                let n = job.parts.len() as u32;
                let ends = rules
                    .split((0..n).map(|i| job.parts[i as usize].id.clone()).collect())
                    .1;
                Some(super::rollout::Staging::new(rules, ends))
            }
            (None, None) => None,
        };
        let seeds: Vec<Seed> = (0..job.parts.len() as u32)
            .map(|idx| {
                let state = job.parts[idx as usize].state;
                Seed {
                    info: job
                        .online_info(&self.agents, &self.leaders, idx)
                        .filter(|_| !job.is_held(idx)),
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
        if let Some(plan) = &mut job.plan {
            plan.set_holders_first(job.staging.is_some());
        }
        job.restored_upload = measured_upload
            .iter()
            .filter_map(|(id, up)| Some((*job.index.get(id)?, *up)))
            .filter(|r| r.1 > 0)
            .collect();
        job.restored_upload.sort_unstable();
        job.restored_upload.dedup_by_key(|r| r.0);
        // Its participants reconnect over the next moments: planning them one by one as they
        // come would hang them all on the first few; they are planned together once back.
        job.regroup_until = Some(now + self.config.regroup_wait);
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
        let mut cx = ctx!(self, now);
        job.restore_installs(&mut cx, job_id, installs);
        self.begin(now, job_id, job);
    }

    /// Registers `job`, instructs its online participants, starts the give-up timers of the
    /// others (the plan is already built and `JobStarted` queued).
    fn begin(&mut self, now: Duration, job_id: u64, mut job: Job) {
        for text in job.policy_warnings(now, self.unix_at(now), &self.agents, &self.leaders) {
            job.warn(&mut self.out, job_id, text);
        }
        let waiting = job.opens_at.is_some();
        if waiting {
            // Nobody fetches before the window opens; the plan is made as they are instructed.
            job.regroup_until = None;
        }
        let regrouping = job.regroup_until.is_some();
        self.out.persist.reserve(job.parts.len());
        self.out.transmit.reserve(job.parts.len());
        for (idx, p) in job.parts.iter().enumerate() {
            self.memberships
                .entry(p.id.clone())
                .or_default()
                .push((job_id, idx as u32));
        }
        let mut cx = ctx!(self, now);
        for idx in 0..job.parts.len() as u32 {
            let held = job.is_held(idx);
            let p = &mut job.parts[idx as usize];
            let state = p.state;
            if cx.agents.get(&p.id).is_some_and(|a| a.online) {
                if regrouping {
                    p.online = true;
                    continue;
                }
                if held && !state.is_terminal() {
                    // Its wave has not opened (or the rollout is paused): it waits.
                    p.online = true;
                    if state == ParticipantState::Waiting {
                        job.persist_part(&mut cx, job_id, idx, false);
                    }
                    continue;
                }
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
                    // Resumed after a restart while its window is closed: it may still be
                    // fetching under the old epoch's instructions.
                    job.pause_part(&mut cx, job_id, idx);
                } else if !state.is_terminal() {
                    job.instruct(&mut cx, job_id, idx);
                }
            } else {
                if state == ParticipantState::Waiting {
                    job.persist_part(&mut cx, job_id, idx, false);
                }
                if !state.is_terminal() && !waiting && !held {
                    job.arm_give_up(&mut cx, job_id, idx);
                }
            }
        }
        if regrouping {
            job.regroup_missing = job
                .parts
                .iter()
                .enumerate()
                .filter(|(idx, p)| {
                    !p.online
                        && !matches!(p.state, ParticipantState::Failed(_))
                        && !job.is_held(*idx as u32)
                })
                .count() as u32;
            if job.regroup_missing == 0 {
                job.end_regroup(&mut cx, job_id);
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
        let mut cx = ctx!(self, now);
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
}

impl Job {
    /// Ends the wait of a resumed job for its participants: the plan is built again over
    /// everyone back, the content's holders included (see [`RelayPlan::build`]), and every
    /// participant back and not done is instructed (it resumes from the chunks it verified).
    /// Those still away are placed as they come, like late joiners.
    pub(super) fn end_regroup(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        self.regroup_until = None;
        if self.outcome != JobOutcome::Running {
            return;
        }
        let seeds: Vec<Seed> = (0..self.parts.len() as u32)
            .map(|idx| {
                let state = self.parts[idx as usize].state;
                let online = self.parts[idx as usize].online && !self.is_held(idx);
                Seed {
                    info: online
                        .then(|| self.online_info(cx.agents, cx.leaders, idx))
                        .flatten(),
                    confirmed: state == ParticipantState::Confirmed,
                    failed: matches!(state, ParticipantState::Failed(_)),
                }
            })
            .collect();
        let back = seeds.iter().filter(|s| s.info.is_some()).count();
        let mut plan = RelayPlan::build(
            self.chunks,
            cx.config.manager_up_bps,
            &self.spec.policy,
            &seeds,
        );
        // The plan as it started, then as it was adapted to the rates measured before the
        // restart: the sources and stripes the participants were fetching, about.
        if !self.restored_upload.is_empty() && plan.segment_entries().is_empty() {
            plan.adapt_to_rates(&self.restored_upload, cx.config.manager_up_bps);
            self.restored_applied = true;
        }
        self.plan = Some(plan);
        info!(
            job = job_id,
            back,
            missing = self.regroup_missing,
            "resumed job planned over its participants' holdings"
        );
        if let Some(plan) = &mut self.plan {
            plan.set_holders_first(self.staging.is_some());
        }
        for idx in 0..self.parts.len() as u32 {
            let held = self.is_held(idx);
            let p = &mut self.parts[idx as usize];
            if !p.online {
                if !held && !p.state.is_terminal() && p.deadline.is_none() {
                    // Held while the rollout was paused or its wave closed: given up if it
                    // stays away.
                    self.arm_give_up(cx, job_id, idx);
                }
                continue;
            }
            match p.state {
                ParticipantState::Confirmed | ParticipantState::Failed(FailCause::Agent(_)) => {}
                ParticipantState::Failed(FailCause::GaveUp) => {
                    // `on_online` revives and places it.
                    p.online = false;
                    self.on_online(cx, idx);
                }
                _ if held => {}
                _ => self.instruct(cx, job_id, idx),
            }
        }
    }
}
