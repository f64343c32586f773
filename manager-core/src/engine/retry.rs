//! Retries: a failed participant is instructed again, up to the policy's limit.
//!
//! A participant whose delivery failed (its agent said `Failed`: storage full, busy, ...)
//! or whose install step ended failed or rolled back is retried after
//! [`Policy::retry_after_secs`](crate::planner::Policy::retry_after_secs), at most
//! [`Policy::max_retries`](crate::planner::Policy::max_retries) times; then it stays
//! failed. While a retry is pending the participant is not settled, so the job does not
//! end; its failure counts in a rollout's thresholds from the moment it failed.
//!
//! A retried delivery is revived in the relay plan and gets a fresh `Fetch` (the agent
//! resumes from the chunks it verified). A retried install first gets `Cancel`, so the agent
//! drops the job, and then a `Fetch`: the agent finds the content complete, confirms it
//! again and runs its install step anew. A participant given up (silent) is not retried
//! here: it is taken back whenever it reconnects. Pending retries are not stored: after a
//! manager restart a failed participant stays failed.

use core::time::Duration;

use baton_protocol::message::InstallState;
use tracing::info;

use super::{Ctx, FailCause, Job, JobOutcome, Out, ParticipantState};

impl Job {
    /// Participant `idx` just failed (`why`, for people): schedules its retry if the policy
    /// allows one more. Returns whether it did.
    pub(super) fn schedule_retry(
        &mut self,
        cx: &mut Ctx<'_>,
        job_id: u64,
        idx: u32,
        why: &str,
    ) -> bool {
        let (max, after) = (
            self.spec.policy.max_retries,
            self.spec.policy.retry_after_secs,
        );
        let aborted = self
            .staging
            .as_ref()
            .is_some_and(|st| st.state.aborted.is_some());
        let p = &mut self.parts[idx as usize];
        if self.outcome != JobOutcome::Running
            || aborted
            || p.retries >= max
            || p.retry_at.is_some()
        {
            return false;
        }
        let when = cx.now + Duration::from_secs(after.max(1));
        p.retry_at = Some(when);
        cx.out.deadlines.insert((when, job_id, idx));
        let text = format!(
            "{}: {why}; retry {} of {max} in {}",
            p.id,
            p.retries + 1,
            super::format_duration(after.max(1))
        );
        info!(job = job_id, agent = %p.id, "{text}");
        self.warn(cx.out, job_id, text);
        true
    }

    /// Participant `idx`'s retry is due: it is instructed again (see the module
    /// documentation), or, while it is away, its state is reset and it is instructed when it
    /// comes back.
    pub(super) fn retry(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        if self.outcome != JobOutcome::Running {
            return;
        }
        let chunks = self.chunks;
        let p = &mut self.parts[idx as usize];
        let delivery = matches!(p.state, ParticipantState::Failed(FailCause::Agent(_)));
        let install = p.state == ParticipantState::Confirmed
            && matches!(
                p.install,
                Some(InstallState::Failed | InstallState::RolledBack)
            );
        if !delivery && !install {
            return;
        }
        p.retries += 1;
        if delivery {
            self.failed -= 1;
            if let Some(plan) = &mut self.plan {
                plan.revive(idx);
            }
        } else {
            // It keeps the content (and serves it): only its install step runs again.
            self.confirmed -= 1;
            p.install = None;
            p.verified = chunks;
        }
        let p = &mut self.parts[idx as usize];
        p.state = ParticipantState::Fetching {
            verified: p.verified,
        };
        info!(job = job_id, agent = %p.id, retry = p.retries, "participant retried");
        let held = self.is_held(idx);
        let p = &mut self.parts[idx as usize];
        if !p.online {
            self.persist_part(cx, job_id, idx, false);
            if self.opens_at.is_none() && !held {
                self.arm_give_up(cx, job_id, idx);
            }
            return;
        }
        if install && p.ever_instructed {
            // The agent drops the job, so that the next `Fetch` starts it (and its install) anew.
            cx.out.transmit.push_back(Out::Reset {
                job: job_id,
                part: idx,
            });
        }
        if held || self.opens_at.is_some() {
            p.instructed = false;
            self.persist_part(cx, job_id, idx, false);
            return;
        }
        if delivery {
            // `on_online` places it in the plan and instructs it.
            p.online = false;
            self.on_online(cx, idx);
        } else {
            self.instruct(cx, job_id, idx);
        }
    }
}
