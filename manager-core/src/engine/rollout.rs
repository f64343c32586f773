//! Staged rollouts: a job's participants in waves, and the administrator's pause, resume,
//! approve and abort.
//!
//! A job whose policy has a [`Rollout`] is split into waves when it starts (see
//! [`Rollout::split`]; late joiners go in the last wave). A participant whose wave has
//! not opened is *held*: it is not placed in the relay plan (so nobody is told to fetch
//! from it), not instructed and not given up. A wave *succeeds* once
//! [`Rollout::success_percent`] of its participants that have not failed run the
//! content; then the soak time runs, then the job waits for an approval if the rules ask
//! for one, and then the next wave opens: its connected participants are placed and
//! instructed. Holders of the whole content are their first sources
//! ([`RelayPlan::set_holders_first`](crate::planner::RelayPlan::set_holders_first)), so
//! later waves fetch from the earlier ones and staging costs the manager no extra upload.
//!
//! Failures (delivery failed, install failed, rolled back) are counted per wave: more
//! than [`Rollout::pause_after_failures`] pauses the rollout, more than
//! [`Rollout::abort_after_failures`] aborts it. **Paused** means nobody new is
//! instructed: participants already instructed go on (their transfers and installs
//! finish, and their sources are still repaired), participants that connect or come
//! back are held, and no wave opens. Resuming accepts the failures counted so far (the
//! thresholds count from there) and releases whoever is held in the open waves.
//! **Aborted** ends the job like a cancellation: instructed participants get `Cancel`,
//! the others never hear of it; the state says `aborted` with the reason.
//!
//! ```text
//!            ┌────────── pause ──────────┐
//!            ▼                           │
//!   running(wave k) ──succeeded──▶ soaking ──▶ awaiting approval ──approve──▶ running(wave k+1)
//!      │  ▲    └─failures > pause N─▶ paused ──resume──▶ running(wave k)
//!      │  └───────────────────────────────┘
//!      └─failures > abort N, or abort (any state) ─▶ aborted (job cancelled)
//!   the last wave succeeded and every participant settled ─▶ finished
//! ```
//!
//! A job without waves can be paused too: it becomes a rollout of one wave.
//!
//! [`RolloutState`] is what the store keeps (a `Persist::Rollout` at every change) and
//! gives back after a restart, so the wave plan, a pause and a wait for approval survive it.

use core::time::Duration;

use baton_protocol::message::InstallState;
use tracing::info;

use super::{
    Ctx, Engine, EngineError, EngineEvent, FailCause, Job, JobOutcome, ParticipantState, Persist,
    RolloutState, unix_at,
};
use crate::planner::{Rollout, Wave};

/// A job's staged rollout: its rules and where it stands.
#[derive(Clone, Debug)]
pub(super) struct Staging {
    rules: Rollout,
    pub(super) state: RolloutState,
    /// When the soak ends (engine time).
    soak_at: Option<Duration>,
}

impl Staging {
    /// A rollout under `rules` for participants split at `ends`.
    pub(super) fn new(rules: Rollout, ends: Vec<u32>) -> Self {
        Staging {
            rules,
            state: RolloutState::new(ends),
            soak_at: None,
        }
    }

    /// A rollout restored from the store; its soak, if any, ends at the stored time (by
    /// the wall clock `wall`, else a full soak from `now`).
    pub(super) fn restored(
        rules: Rollout,
        mut state: RolloutState,
        now: Duration,
        wall: Option<(Duration, u64)>,
    ) -> Self {
        let waves = state.ends.len().max(1);
        state.opened = state.opened.clamp(1, waves as u32);
        state.accepted_failures.resize(waves, 0);
        let soak_at = state.soak_until.map(|until| match wall {
            Some((at, unix)) => {
                let unix_now = unix + now.saturating_sub(at).as_secs();
                now + Duration::from_secs(until.saturating_sub(unix_now))
            }
            None => now + Duration::from_secs(rules.soak_secs),
        });
        Staging {
            rules,
            state,
            soak_at,
        }
    }

    /// The rules of a job that is paused without having waves: one wave, everyone.
    pub(super) fn single_wave() -> Rollout {
        Rollout {
            waves: vec![Wave::Percent(100)],
            ..Rollout::default()
        }
    }
}

/// What a wave's participants have come to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WaveCount {
    size: u32,
    running: u32,
    failed: u32,
}

impl Job {
    /// Whether participant `idx` waits for the rollout: its wave has not opened, or the
    /// rollout is paused (it is not instructed until released).
    pub(super) fn is_held(&self, idx: u32) -> bool {
        self.staging.as_ref().is_some_and(|st| {
            st.state.aborted.is_none()
                && (st.state.paused.is_some() || st.state.wave_of(idx) >= st.state.opened as usize)
        })
    }

    /// Sets the job's rollout up from its policy when it starts: `order` regrouped by wave.
    pub(super) fn stage(
        spec_rollout: Option<&Rollout>,
        order: Vec<baton_protocol::types::AgentId>,
    ) -> (Vec<baton_protocol::types::AgentId>, Option<Staging>) {
        match spec_rollout {
            Some(rules) => {
                let (order, ends) = rules.split(order);
                let staging = Staging::new(rules.clone(), ends);
                (order, Some(staging))
            }
            None => (order, None),
        }
    }

    fn count(&self, w: usize) -> WaveCount {
        let Some(st) = &self.staging else {
            return WaveCount::default();
        };
        let mut c = WaveCount::default();
        for idx in st.state.range(w, self.parts.len() as u32) {
            let p = &self.parts[idx as usize];
            c.size += 1;
            // A failure counts from the moment it happened: one being retried (or retried
            // before, and now running) is not taken back, so retries cannot hide failures
            // from the thresholds.
            let failed = p.retries > 0
                || matches!(
                    (p.state, p.install),
                    (ParticipantState::Failed(_), _)
                        | (
                            ParticipantState::Confirmed,
                            Some(InstallState::Failed | InstallState::RolledBack)
                        )
                );
            c.failed += u32::from(failed);
            if (p.state, p.install) == (ParticipantState::Confirmed, Some(InstallState::Running)) {
                c.running += 1;
            }
        }
        c
    }

    /// Persists the rollout's state and tells the UI and logs `text`.
    fn rollout_changed(&mut self, cx: &mut Ctx<'_>, job_id: u64, text: String) {
        let Some(st) = &self.staging else {
            return;
        };
        info!(job = job_id, rollout = st.state.name(), "{text}");
        cx.out.persist.push_back(Persist::Rollout {
            job: job_id,
            state: st.state.clone(),
        });
        cx.out.events.push_back(EngineEvent::Rollout {
            job: job_id,
            state: st.state.clone(),
            text,
        });
    }

    /// Checks the rollout after a participant settled or a soak ended: failure thresholds
    /// (pause, abort), then whether the current wave succeeded and the next may open.
    pub(super) fn check_waves(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        // Each pass opens at most one wave.
        for _ in 0..=crate::planner::MAX_WAVES {
            let Some(st) = &self.staging else {
                return;
            };
            if self.outcome != JobOutcome::Running || st.state.aborted.is_some() {
                return;
            }
            let (opened, waves) = (st.state.opened as usize, st.state.ends.len());
            let rules = st.rules.clone();
            for w in 0..opened {
                let c = self.count(w);
                let st = self.staging.as_ref().expect("checked");
                let fresh = c.failed.saturating_sub(st.state.accepted_failures[w]);
                if rules.abort_after_failures.is_some_and(|n| fresh > n) {
                    let reason = format!(
                        "wave {}: {fresh} participants failed (more than {})",
                        w + 1,
                        rules.abort_after_failures.unwrap_or(0)
                    );
                    self.abort(cx, job_id, reason);
                    return;
                }
                if st.state.paused.is_none()
                    && rules.pause_after_failures.is_some_and(|n| fresh > n)
                {
                    let reason = format!(
                        "wave {}: {fresh} participants failed (more than {})",
                        w + 1,
                        rules.pause_after_failures.unwrap_or(0)
                    );
                    let st = self.staging.as_mut().expect("checked");
                    st.state.paused = Some(reason.clone());
                    self.rollout_changed(cx, job_id, format!("rollout paused: {reason}"));
                }
            }
            let st = self.staging.as_ref().expect("checked");
            if st.state.paused.is_some() || opened >= waves || st.state.awaiting_approval {
                return;
            }
            let c = self.count(opened - 1);
            let live = c.size - c.failed;
            if u64::from(c.running) * 100 < u64::from(rules.success_percent) * u64::from(live) {
                return;
            }
            if rules.soak_secs > 0 {
                let st = self.staging.as_mut().expect("checked");
                match st.soak_at {
                    None => {
                        let at = cx.now + Duration::from_secs(rules.soak_secs);
                        st.soak_at = Some(at);
                        st.state.soak_until = unix_at(cx.wall, at);
                        if st.state.soak_until.is_none() {
                            // No wall clock: the state still says it soaks.
                            st.state.soak_until = Some(0);
                        }
                        let text = format!(
                            "wave {opened} succeeded ({} of {} running); wave {} opens in {}",
                            c.running,
                            c.size,
                            opened + 1,
                            super::format_duration(rules.soak_secs)
                        );
                        self.rollout_changed(cx, job_id, text);
                        return;
                    }
                    Some(at) if at > cx.now => return,
                    Some(_) => {}
                }
            }
            if rules.approval {
                let st = self.staging.as_mut().expect("checked");
                st.soak_at = None;
                st.state.soak_until = None;
                st.state.awaiting_approval = true;
                let text = format!(
                    "wave {opened} succeeded ({} of {} running); wave {} waits for approval",
                    c.running,
                    c.size,
                    opened + 1
                );
                self.rollout_changed(cx, job_id, text);
                return;
            }
            self.open_next_wave(cx, job_id);
        }
    }

    /// Opens the next wave: its connected participants are placed and instructed.
    fn open_next_wave(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        let Some(st) = self.staging.as_mut() else {
            return;
        };
        st.state.opened = (st.state.opened + 1).min(st.state.ends.len() as u32);
        st.soak_at = None;
        st.state.soak_until = None;
        st.state.awaiting_approval = false;
        let text = format!("wave {} of {} opens", st.state.opened, st.state.ends.len());
        self.rollout_changed(cx, job_id, text);
        self.release(cx, job_id);
    }

    /// Instructs the participants no longer held that were waiting for it (those connected
    /// now; the others get their give-up timer).
    fn release(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        if self.outcome != JobOutcome::Running || self.regroup_until.is_some() {
            // A resumed job's wait for its participants ends with their plan (held ones
            // left out), a job waiting for its window instructs at the opening.
            return;
        }
        for idx in 0..self.parts.len() as u32 {
            if self.is_held(idx) {
                continue;
            }
            let p = &mut self.parts[idx as usize];
            if p.instructed
                || matches!(
                    p.state,
                    ParticipantState::Confirmed | ParticipantState::Failed(FailCause::Agent(_))
                )
            {
                continue;
            }
            if p.online {
                // `on_online` places and instructs it (or revives one given up).
                p.online = false;
                self.on_online(cx, idx);
            } else if self.opens_at.is_none()
                && p.deadline.is_none()
                && !matches!(p.state, ParticipantState::Failed(_))
            {
                self.arm_give_up(cx, job_id, idx);
            }
        }
    }

    /// Ends the rollout and the job: instructed participants get `Cancel`.
    fn abort(&mut self, cx: &mut Ctx<'_>, job_id: u64, reason: String) {
        let Some(st) = self.staging.as_mut() else {
            return;
        };
        st.state.aborted = Some(reason.clone());
        st.soak_at = None;
        self.rollout_changed(cx, job_id, format!("rollout aborted: {reason}"));
        self.end(cx, job_id, JobOutcome::Cancelled);
    }

    /// The engine time the rollout next needs a look (a soak's end).
    pub(super) fn rollout_timeout(&self) -> Option<Duration> {
        self.staging
            .as_ref()
            .filter(|_| self.outcome == JobOutcome::Running)
            .and_then(|st| st.soak_at)
    }

    /// A soak ended: the next wave may open.
    pub(super) fn rollout_timer(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        if self.rollout_timeout().is_some_and(|t| t <= cx.now) {
            self.check_waves(cx, job_id);
        }
    }
}

/// Job `job` of `jobs` if it is running.
fn running_job(
    jobs: &mut std::collections::BTreeMap<u64, Job>,
    job: u64,
) -> Result<&mut Job, EngineError> {
    let j = jobs.get_mut(&job).ok_or(EngineError::UnknownJob(job))?;
    if j.outcome != JobOutcome::Running {
        return Err(EngineError::JobEnded(job));
    }
    Ok(j)
}

impl Engine {
    /// Pauses a running job: nobody new is instructed and no wave opens until
    /// [`Engine::resume_rollout`]; participants already instructed finish what they do. A
    /// job without waves becomes a rollout of one wave.
    pub fn pause_job(&mut self, now: Duration, job: u64) -> Result<(), EngineError> {
        let j = running_job(&mut self.jobs, job)?;
        if j.staging.is_none() {
            let n = j.parts.len() as u32;
            j.staging = Some(Staging::new(Staging::single_wave(), vec![n]));
        }
        let st = j.staging.as_mut().expect("set above");
        if st.state.paused.is_some() {
            return Err(EngineError::Rollout {
                job,
                reason: "it is paused already".into(),
            });
        }
        st.state.paused = Some("paused by an administrator".into());
        let mut cx = ctx!(self, now);
        j.rollout_changed(&mut cx, job, "rollout paused by an administrator".into());
        Ok(())
    }

    /// Resumes a paused job: the failures counted so far are accepted (the thresholds
    /// count from here), held participants of the open waves are instructed, and the next
    /// wave opens if the current one has succeeded.
    pub fn resume_rollout(&mut self, now: Duration, job: u64) -> Result<(), EngineError> {
        let j = running_job(&mut self.jobs, job)?;
        if j.staging
            .as_ref()
            .is_none_or(|st| st.state.paused.is_none())
        {
            return Err(EngineError::Rollout {
                job,
                reason: "it is not paused".into(),
            });
        }
        let opened = j.staging.as_ref().expect("checked").state.opened as usize;
        let failed: Vec<u32> = (0..opened).map(|w| j.count(w).failed).collect();
        let st = j.staging.as_mut().expect("checked");
        st.state.paused = None;
        for (w, f) in failed.into_iter().enumerate() {
            st.state.accepted_failures[w] = st.state.accepted_failures[w].max(f);
        }
        let mut cx = ctx!(self, now);
        j.rollout_changed(&mut cx, job, "rollout resumed by an administrator".into());
        j.release(&mut cx, job);
        j.check_waves(&mut cx, job);
        Ok(())
    }

    /// Approves the next wave of a rollout that waits for approval: it opens now.
    pub fn approve_wave(&mut self, now: Duration, job: u64) -> Result<(), EngineError> {
        let j = running_job(&mut self.jobs, job)?;
        let Some(st) = j.staging.as_ref() else {
            return Err(EngineError::Rollout {
                job,
                reason: "it has no waves".into(),
            });
        };
        if st.state.paused.is_some() {
            return Err(EngineError::Rollout {
                job,
                reason: "it is paused: resume it first".into(),
            });
        }
        if !st.state.awaiting_approval {
            return Err(EngineError::Rollout {
                job,
                reason: format!(
                    "no wave waits for approval (wave {} of {} is {})",
                    st.state.opened,
                    st.state.ends.len(),
                    if st.state.soak_until.is_some() {
                        "soaking"
                    } else {
                        "running"
                    }
                ),
            });
        }
        let mut cx = ctx!(self, now);
        j.open_next_wave(&mut cx, job);
        j.check_waves(&mut cx, job);
        Ok(())
    }

    /// Aborts a running job's rollout: the job ends (instructed participants get
    /// `Cancel`), the participants not settled are left as they are, the state says
    /// `aborted`. A job without waves is aborted as a rollout of one wave.
    pub fn abort_job(&mut self, now: Duration, job: u64) -> Result<(), EngineError> {
        let j = running_job(&mut self.jobs, job)?;
        if j.staging.is_none() {
            let n = j.parts.len() as u32;
            j.staging = Some(Staging::new(Staging::single_wave(), vec![n]));
        }
        let mut cx = ctx!(self, now);
        j.abort(&mut cx, job, "aborted by an administrator".into());
        Ok(())
    }

    /// Where `job`'s rollout stands, if it has one.
    pub fn rollout_state(&self, job: u64) -> Option<&RolloutState> {
        self.jobs.get(&job)?.staging.as_ref().map(|st| &st.state)
    }
}
