//! Telling participants: `Fetch`, `Sources`, `Done`/`Cancel`, and the give-up timers.
//!
//! Every instruction persists the participant's state (and a note of its
//! sources) before the message is queued, and marks its rate cap to be worked
//! out again. A participant that is gone and not done gets a give-up deadline
//! ([`EngineConfig::give_up_after`](super::EngineConfig::give_up_after)); coming
//! back or finishing disarms it.

use super::{Ctx, Job, Out, ParticipantState};

impl Job {
    /// Sends `Fetch` to a participant that is online (persisting its state and sources first).
    pub(super) fn instruct(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
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
    pub(super) fn resend_sources(&mut self, cx: &mut Ctx<'_>, job_id: u64, changed: &[u32]) {
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

    pub(super) fn arm_give_up(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        if let Some(old) = p.deadline.take() {
            cx.out.deadlines.remove(&(old, job_id, idx));
        }
        let when = cx.now + cx.config.give_up_after;
        p.deadline = Some(when);
        cx.out.deadlines.insert((when, job_id, idx));
    }

    pub(super) fn disarm_give_up(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        if let Some(old) = self.parts[idx as usize].deadline.take() {
            cx.out.deadlines.remove(&(old, job_id, idx));
        }
    }

    pub(super) fn send_end(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) {
        let p = &mut self.parts[idx as usize];
        if p.online && p.ever_instructed && !p.end_sent {
            p.end_sent = true;
            cx.out.transmit.push_back(Out::End {
                job: job_id,
                part: idx,
            });
        }
    }
}
