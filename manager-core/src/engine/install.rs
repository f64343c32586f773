//! The states past delivery: each confirmed participant's install step, up to running.
//!
//! A participant that confirmed (`Have`) holds the content; what follows depends on its
//! agent. An agent that said `Running { install_step: true }` on its session reports
//! `InstallStatus` messages — installing, installed, then one of running, failed or
//! rolled back — and has [`EngineConfig::install_deadline`](super::EngineConfig::install_deadline)
//! from its confirmation to reach a final one, or it is marked failed. Any other agent
//! (the firmware, a Linux agent without `--install`) is running the content at once.
//!
//! ```text
//!   confirmed ──(content only)──────────────────────────────▶ running
//!       │
//!       └─(install step)─▶ installing ─▶ installed ─┬──────▶ running
//!                             │  │                  ├──────▶ failed
//!                             │  └──────────────────┼──────▶ rolled back
//!                             └─────────────────────┘
//!   (a state may be skipped; never back; the deadline turns a non-final one into failed)
//! ```
//!
//! A job ends (`Done`) when every participant is settled: failed delivery, or a final
//! install state. A running install also records the agent's running version of the
//! content's name ([`Persist::Running`]).

use core::time::Duration;

use baton_protocol::manifest::MAX_CONTENT_NAME;
use baton_protocol::message::{InstallState, RunningVersion};
use baton_protocol::types::{AgentId, JobRef};
use tracing::{debug, info};

use super::{Ctx, Engine, EngineError, EngineEvent, Job, JobOutcome, ParticipantState, Persist};

/// One `InstallStatus` from an agent, owned (the driver copies the output out of the frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// The job (its epoch may be older than the engine's).
    pub job: JobRef,
    /// The content name the agent installed.
    pub name: heapless::String<MAX_CONTENT_NAME>,
    /// The content version the agent installed.
    pub version: u64,
    /// The new state.
    pub state: InstallState,
    /// The deciding command's exit code, if it ran to its end.
    pub exit_code: Option<i32>,
    /// The end of its output (at most `MAX_INSTALL_OUTPUT` bytes, checked by the session).
    pub output: String,
}

impl Engine {
    /// Agent `id` said what runs on it and whether it installs what it receives
    /// (`Message::Running`). From now on its confirmations wait for its install report if
    /// `install_step`. The versions are recorded ([`Persist::Running`]).
    pub fn agent_running(&mut self, id: &AgentId, install_step: bool, versions: &[RunningVersion]) {
        if let Some(agent) = self.agents.get_mut(id) {
            agent.installs = install_step;
        }
        // The whole set, even empty: what the agent said before is replaced.
        self.out.persist.push_back(Persist::Running {
            agent: id.clone(),
            versions: versions
                .iter()
                .take(baton_protocol::message::MAX_RUNNING)
                .map(|v| (v.name.to_string(), v.version))
                .collect(),
            whole: true,
        });
    }

    /// An install report from agent `from` (authenticated by the driver).
    ///
    /// Refused, changing nothing: an unknown job, a sender that is not a participant, a
    /// newer epoch than the engine's, another name or version than the job's content, a
    /// participant that has not confirmed, or a move its install state may not make
    /// (see [`InstallState::may_become`]). The same state again is accepted and changes
    /// nothing (agents repeat their latest after a reconnection); so is a report for a job
    /// that has ended.
    pub fn install_status(
        &mut self,
        now: Duration,
        from: &AgentId,
        report: InstallReport,
    ) -> Result<(), EngineError> {
        let job_id = report.job.id;
        let job = self
            .jobs
            .get_mut(&job_id)
            .ok_or(EngineError::UnknownJob(job_id))?;
        if report.job.epoch > self.epoch {
            return Err(EngineError::FutureEpoch {
                job: job_id,
                epoch: report.job.epoch,
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
        let refused = |reason: String| EngineError::InstallRefused {
            job: job_id,
            agent: from.clone(),
            reason,
        };
        let manifest = &job.spec.manifest;
        if report.name != manifest.name || report.version != manifest.version {
            return Err(refused(format!(
                "it names {} {}, the job's content is {} {}",
                report.name, report.version, manifest.name, manifest.version
            )));
        }
        if job.outcome != JobOutcome::Running {
            debug!(job = job_id, agent = %from, "install status for an ended job, ignored");
            return Ok(());
        }
        let p = &job.parts[idx as usize];
        if p.state != ParticipantState::Confirmed {
            return Err(refused(format!(
                "it has not confirmed the content (it is {})",
                p.state.name()
            )));
        }
        match p.install {
            Some(current) if current == report.state => return Ok(()),
            Some(current) if !current.may_become(report.state) => {
                return Err(refused(format!(
                    "{} may not become {}",
                    current.name(),
                    report.state.name()
                )));
            }
            _ => {}
        }
        let mut cx = ctx!(self, now);
        job.set_install(
            &mut cx,
            job_id,
            idx,
            report.state,
            report.exit_code,
            report.output,
        );
        Ok(())
    }
}

impl Job {
    /// A participant just confirmed: its agent installs (it waits for the report, with a
    /// deadline) or it runs the content at once.
    pub(super) fn begin_install(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let installs = cx
            .agents
            .get(&self.parts[idx as usize].id)
            .is_some_and(|a| a.installs);
        if !installs {
            self.set_install(cx, job_id, idx, InstallState::Running, None, String::new());
            return;
        }
        let p = &mut self.parts[idx as usize];
        p.install = None;
        cx.out.persist.push_back(Persist::Install {
            job: job_id,
            agent: p.id.clone(),
            state: None,
            exit_code: None,
            output: String::new(),
        });
        self.arm_install_deadline(cx, job_id, idx, cx.now + cx.config.install_deadline);
    }

    /// Moves a confirmed participant's install step to `state` (checked by the caller),
    /// persists it, and ends the job if that settled the last participant.
    pub(super) fn set_install(
        &mut self,
        cx: &mut Ctx<'_>,
        job_id: u64,
        idx: u32,
        state: InstallState,
        exit_code: Option<i32>,
        output: String,
    ) {
        let p = &mut self.parts[idx as usize];
        p.install = Some(state);
        let agent = p.id.clone();
        if state.is_final() {
            self.disarm_install_deadline(cx, job_id, idx);
        }
        if state != InstallState::Running || exit_code.is_some() {
            info!(job = job_id, agent = %agent, state = state.name(), ?exit_code, "install state");
        }
        cx.out.persist.push_back(Persist::Install {
            job: job_id,
            agent: agent.clone(),
            state: Some(state),
            exit_code,
            output,
        });
        if state == InstallState::Running {
            let m = &self.spec.manifest;
            cx.out.persist.push_back(Persist::Running {
                agent: agent.clone(),
                versions: vec![(m.name.to_string(), m.version)],
                whole: false,
            });
        }
        cx.out.events.push_back(EngineEvent::Install {
            job: job_id,
            agent,
            state,
            exit_code,
        });
        if matches!(state, InstallState::Failed | InstallState::RolledBack) {
            self.schedule_retry(cx, job_id, idx, &format!("install {}", state.name()));
        }
        if state.is_final() {
            self.check_finished(cx, job_id);
        }
    }

    /// The install deadline of participant `idx` passed without a final state: it failed.
    pub(super) fn install_timed_out(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &self.parts[idx as usize];
        if self.outcome != JobOutcome::Running
            || p.state != ParticipantState::Confirmed
            || p.install.is_some_and(|s| s.is_final())
        {
            return;
        }
        let last = p.install.map_or("confirmed", |s| s.name());
        let note = format!(
            "no final install state within {} of the confirmation (last: {last})",
            super::format_duration(cx.config.install_deadline.as_secs())
        );
        info!(job = job_id, agent = %p.id, "{note}");
        self.set_install(cx, job_id, idx, InstallState::Failed, None, note);
    }

    fn arm_install_deadline(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32, when: Duration) {
        self.disarm_install_deadline(cx, job_id, idx);
        self.parts[idx as usize].install_deadline = Some(when);
        cx.out.deadlines.insert((when, job_id, idx));
    }

    pub(super) fn disarm_install_deadline(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        if let Some(old) = p.install_deadline.take()
            && p.deadline != Some(old)
        {
            cx.out.deadlines.remove(&(old, job_id, idx));
        }
    }

    /// After a restart: the install states the store kept for confirmed participants
    /// (`None`: waiting for the agent's report; those waiting get a fresh deadline).
    pub(super) fn restore_installs(
        &mut self,
        cx: &mut Ctx<'_>,
        job_id: u64,
        installs: &[(AgentId, Option<InstallState>)],
    ) {
        for idx in 0..self.parts.len() as u32 {
            if self.parts[idx as usize].state != ParticipantState::Confirmed {
                continue;
            }
            let stored = installs
                .iter()
                .find(|(id, _)| *id == self.parts[idx as usize].id)
                .map_or(Some(InstallState::Running), |(_, s)| *s);
            self.parts[idx as usize].install = stored;
            if !stored.is_some_and(|s| s.is_final()) {
                self.arm_install_deadline(cx, job_id, idx, cx.now + cx.config.install_deadline);
            }
        }
    }
}
