//! The engine's side of a job's policy: time windows, rate caps and warnings (claim 9).
//!
//! - **Time windows.** A job whose windows are all closed when it starts (or
//!   resumes after a restart) waits: its plan is built, nobody is instructed and
//!   nobody is given up; the engine wakes at the next opening
//!   ([`Engine::poll_timeout`](super::Engine::poll_timeout)) and instructs every
//!   connected participant then. At a close, a running job pauses: every
//!   participant still fetching gets `Cancel` (its verified chunks are kept, so
//!   transfers stop within a round trip), those that connect meanwhile are not
//!   instructed (and get `Cancel` if they knew the job), nobody is given up, and
//!   the job's warnings say when it closed and when it resumes; at the next
//!   opening everyone is instructed again and resumes from what it holds.
//!   Nothing is stored for this: after a restart the windows and the wall clock
//!   say again whether the job waits. The wall clock comes from the driver
//!   ([`Engine::set_wall_clock`](super::Engine::set_wall_clock)).
//! - **Rate caps.** Each instructed participant gets a `Throttle` after its
//!   `Fetch`: the per-agent cap, and for a participant that fetches from
//!   outside its segment, its share of the segment's cap (the cap split evenly
//!   over the segment's participants fetching across the WAN at that moment).
//!   Caps are worked out again when sources change, and re-sent only when
//!   they change (`0` lifts a cap).
//! - **Warnings.** Rules that cannot be met are reported once per job as
//!   readable text ([`EngineEvent::PolicyWarning`]) and kept in the job's
//!   status: a closed window, a segment where nobody may relay, a rate cap
//!   that makes the transfer take hours.

use core::time::Duration;
use std::collections::{BTreeMap, HashMap};

use baton_protocol::types::{AgentId, Name};
use tracing::{info, warn};

use super::state::node_info;
use super::{
    Agent, Ctx, EngineEvent, FailCause, Job, JobOutcome, Out, Outputs, ParticipantState, unix_at,
};
use crate::planner::{Holder, TimeWindow, WindowState, window_state};

/// A rate cap that makes one transfer take longer than this is reported (without a window).
const SLOW_TRANSFER: Duration = Duration::from_secs(3600);

/// How long a job waits before it looks at windows that never open again (none has a day).
const NEVER_SECS: u64 = 7 * 86_400;

/// The windows for people: `mon-fri 09:00-17:00 Europe/Berlin, 22:00-06:00 UTC`.
pub(super) fn windows_text(windows: &[TimeWindow]) -> String {
    windows
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `00:31:00 UTC` for UTC seconds.
fn clock_text(unix: u64) -> String {
    let day = unix % 86_400;
    format!("{:02}:{:02}:{:02} UTC", day / 3600, day / 60 % 60, day % 60)
}

/// `5 h 12 min`, `12 min`, `45 s`, `3 d 4 h`.
pub fn format_duration(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{m} min"),
        3600..86_400 if m == 0 => format!("{h} h"),
        3600..86_400 => format!("{h} h {m} min"),
        _ if h == 0 => format!("{d} d"),
        _ => format!("{d} d {h} h"),
    }
}

/// `32 MiB`, `1.5 KiB`, `900 B`.
fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut scale = 1u64;
    while unit + 1 < UNITS.len() && bytes >= scale * 1024 {
        scale *= 1024;
        unit += 1;
    }
    if bytes.is_multiple_of(scale) {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

/// `1 KiB/s`, `2.5 MiB/s`.
pub fn format_rate(bytes_per_second: u64) -> String {
    format!("{}/s", format_bytes(bytes_per_second))
}

impl Job {
    /// Works out which of the policy's rules cannot be met now, and whether the job must wait
    /// for its window (setting [`Job::opens_at`]). `unix` is the wall clock at `now`.
    pub(super) fn policy_warnings(
        &mut self,
        now: Duration,
        unix: Option<u64>,
        agents: &HashMap<AgentId, Agent>,
        leaders: &HashMap<Name, AgentId>,
    ) -> Vec<String> {
        let policy = self.spec.policy.clone();
        let mut out = Vec::new();
        let mut window_secs = None;
        self.closes_at = None;
        if !policy.windows.is_empty() {
            let windows = windows_text(&policy.windows);
            match unix {
                None => out.push(format!(
                    "window {windows} cannot be checked: the manager has no wall clock; the job starts now"
                )),
                Some(unix) => match window_state(&policy.windows, unix) {
                    WindowState::Open { closes_in } => {
                        self.closes_at = closes_in.map(|c| now + Duration::from_secs(c.max(1)));
                        window_secs = closes_in;
                    }
                    WindowState::Closed { opens_in } if self.outcome == JobOutcome::Running => {
                        let wait = opens_in.unwrap_or(NEVER_SECS).max(1);
                        self.opens_at = Some(now + Duration::from_secs(wait));
                        out.push(format!(
                            "window {windows} is closed; the job waits {}",
                            format_duration(wait)
                        ));
                    }
                    WindowState::Closed { .. } => {}
                },
            }
        }

        // Segments where nobody may relay: every member fetches across the WAN.
        let mut segments: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
        let (mut online, mut servers) = (0u32, 0u32);
        for p in &self.parts {
            let Some(agent) = agents.get(&p.id).filter(|a| a.online) else {
                continue;
            };
            if p.state.is_terminal() {
                continue;
            }
            let serves = node_info(&policy, p.segment, leaders, &p.id, &agent.profile).server;
            online += 1;
            servers += serves as u32;
            if p.segment != 0 {
                let e = segments.entry(p.segment).or_default();
                e.0 += 1;
                e.1 += serves as u32;
            }
        }
        if policy.relay {
            for (&seg, &(members, relays)) in &segments {
                if relays > 0 || members < 2 {
                    continue;
                }
                let name = self.segment_name(seg);
                let mut text = format!(
                    "segment {name} has no agent allowed to relay: every member fetches across the WAN ({members} agents)"
                );
                let m = policy.max_wan_transfers_per_segment;
                if m > 0 && members > m as u32 {
                    text.push_str(&format!(
                        "; max_wan_transfers_per_segment {m} cannot hold there"
                    ));
                }
                out.push(text);
            }
            if online > 1 && servers == 0 {
                out.push(
                    "no participant may relay (leaf-only rules, no listen address or no upload): every agent fetches from the manager"
                        .to_string(),
                );
            }
        }

        // Rate caps that make the transfer slow: longer than the window, or than an hour.
        let length = self.spec.manifest.length;
        let limit = window_secs.unwrap_or(SLOW_TRANSFER.as_secs());
        let beyond = match window_secs {
            Some(_) => format!(
                ", longer than the window {} stays open",
                windows_text(&policy.windows)
            ),
            None => String::new(),
        };
        if policy.agent_rate_cap_bps > 0 {
            let secs = length.div_ceil(policy.agent_rate_cap_bps);
            if secs > limit {
                out.push(format!(
                    "agent rate cap {} would take {} for {} per agent{}",
                    format_rate(policy.agent_rate_cap_bps),
                    format_duration(secs),
                    format_bytes(length),
                    beyond
                ));
            }
        }
        if policy.segment_rate_cap_bps > 0 {
            let secs = length.div_ceil(policy.segment_rate_cap_bps);
            if secs > limit {
                let names: Vec<String> = segments.keys().map(|&s| self.segment_name(s)).collect();
                let which = if names.is_empty() {
                    "every segment".to_string()
                } else {
                    format!("segment {}", names.join(", "))
                };
                out.push(format!(
                    "segment rate cap {} would take {} for {} to enter {which}{}",
                    format_rate(policy.segment_rate_cap_bps),
                    format_duration(secs),
                    format_bytes(length),
                    beyond
                ));
            }
        }
        out
    }

    /// The name of segment number `seg`, for people.
    fn segment_name(&self, seg: u32) -> String {
        match self.segments.name(seg) {
            Some(name) => name.to_string(),
            None => format!("#{seg}"),
        }
    }

    /// Reports `text` once for this job (event, status, log).
    pub(super) fn warn(&mut self, out: &mut Outputs, job_id: u64, text: String) {
        if self.warnings.contains(&text) {
            return;
        }
        warn!(job = job_id, "policy cannot be met: {text}");
        self.warnings.push(text.clone());
        out.events
            .push_back(EngineEvent::PolicyWarning { job: job_id, text });
    }

    /// The job's time windows opened: every connected participant is instructed now (it
    /// resumes from the chunks it verified), and the give-up timers of the others start.
    /// A timer that fired early (the wall clock moved) waits again.
    pub(super) fn open_window(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        self.opens_at = None;
        if self.outcome != JobOutcome::Running {
            return;
        }
        let unix = unix_at(cx.wall, cx.now);
        if let Some(unix) = unix
            && !self.spec.policy.windows.is_empty()
        {
            match window_state(&self.spec.policy.windows, unix) {
                WindowState::Closed { opens_in } => {
                    let wait = opens_in.unwrap_or(NEVER_SECS).max(1);
                    self.opens_at = Some(cx.now + Duration::from_secs(wait));
                    return;
                }
                WindowState::Open { closes_in } => {
                    self.closes_at = closes_in.map(|c| cx.now + Duration::from_secs(c.max(1)));
                }
            }
        }
        let resumed = self.parts.iter().any(|p| p.ever_instructed);
        info!(job = job_id, "time window open: job starts");
        for idx in 0..self.parts.len() as u32 {
            let held = self.is_held(idx);
            let p = &mut self.parts[idx as usize];
            match p.state {
                ParticipantState::Confirmed | ParticipantState::Failed(FailCause::Agent(_)) => {}
                // Its wave has not opened: it is instructed when it does.
                _ if held => {}
                _ if p.online => {
                    // `on_online` instructs it (and revives a participant given up earlier).
                    p.online = false;
                    self.on_online(cx, idx);
                }
                ParticipantState::Failed(FailCause::GaveUp) => {}
                _ => self.arm_give_up(cx, job_id, idx),
            }
        }
        if resumed && let Some(unix) = unix {
            let until = match self.closes_at {
                Some(at) => format!(
                    " until {}",
                    clock_text(unix + at.saturating_sub(cx.now).as_secs())
                ),
                None => String::new(),
            };
            let text = format!(
                "window opened at {}: transfers resume{until}",
                clock_text(unix)
            );
            self.warn(cx.out, job_id, text);
        }
    }

    /// The job's time windows closed: every participant still fetching gets `Cancel` (its
    /// verified chunks are kept), nobody is given up or instructed until the next opening,
    /// and the job's warnings say when that is. A timer that fired early waits again.
    pub(super) fn close_window(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        self.closes_at = None;
        if self.outcome != JobOutcome::Running || self.opens_at.is_some() {
            return;
        }
        let Some(unix) = unix_at(cx.wall, cx.now) else {
            return;
        };
        let wait = match window_state(&self.spec.policy.windows, unix) {
            WindowState::Open { closes_in } => {
                self.closes_at = closes_in.map(|c| cx.now + Duration::from_secs(c.max(1)));
                return;
            }
            WindowState::Closed { opens_in } => opens_in.unwrap_or(NEVER_SECS).max(1),
        };
        self.opens_at = Some(cx.now + Duration::from_secs(wait));
        // A job regrouping after a restart stops too: its participants fetch under the
        // old epoch's instructions meanwhile.
        let regrouping = self.regroup_until.take().is_some();
        let mut stopped = 0u32;
        for idx in 0..self.parts.len() as u32 {
            self.disarm_give_up(cx, job_id, idx);
            let p = &self.parts[idx as usize];
            if p.online && (p.instructed || (regrouping && p.ever_instructed)) {
                stopped += self.pause_part(cx, job_id, idx) as u32;
            }
        }
        info!(
            job = job_id,
            stopped, wait, "time window closed: transfers stop"
        );
        let text = format!(
            "window closed at {}: transfers of {stopped} participants stopped; they resume at {} (in {})",
            clock_text(unix),
            clock_text(unix + wait),
            format_duration(wait)
        );
        self.warn(cx.out, job_id, text);
    }

    /// Stops participant `idx`'s transfers while the job waits for its window: `Cancel` if
    /// it may be fetching (its verified chunks are kept; the next opening instructs it
    /// again). Returns whether a `Cancel` was queued.
    pub(super) fn pause_part(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32) -> bool {
        let p = &mut self.parts[idx as usize];
        p.instructed = false;
        p.sources_queued = false;
        if !p.online || p.state.is_terminal() || !p.ever_instructed {
            return false;
        }
        cx.out.transmit.push_back(Out::Pause {
            job: job_id,
            part: idx,
        });
        self.mark_throttle(idx);
        true
    }

    /// Participant `idx`'s rate cap must be worked out again (its sources or state changed).
    pub(super) fn mark_throttle(&mut self, idx: u32) {
        let policy = &self.spec.policy;
        if policy.agent_rate_cap_bps == 0 && policy.segment_rate_cap_bps == 0 {
            return;
        }
        let seg = self.parts[idx as usize].segment;
        if policy.segment_rate_cap_bps > 0 && seg != 0 {
            // Its share of the segment's cap changes the others' shares too.
            self.throttle_segments.insert(seg);
        } else {
            self.throttle_parts.push(idx);
        }
    }

    /// Queues `Throttle` for every marked participant whose cap changed.
    pub(super) fn settle_throttles(&mut self, out: &mut Outputs) {
        if self.throttle_segments.is_empty() && self.throttle_parts.is_empty() {
            return;
        }
        let segments = std::mem::take(&mut self.throttle_segments);
        let parts = std::mem::take(&mut self.throttle_parts);
        if self.outcome != JobOutcome::Running {
            return;
        }
        let agent_cap = self.spec.policy.agent_rate_cap_bps;
        let segment_cap = self.spec.policy.segment_rate_cap_bps;
        for seg in segments {
            let members: Vec<u32> = self
                .segment_parts
                .get(&seg)
                .map(|l| l.iter().copied().filter(|&i| self.active(i)).collect())
                .unwrap_or_default();
            let across: Vec<bool> = members.iter().map(|&i| self.fetches_across(i)).collect();
            let n = across.iter().filter(|&&a| a).count() as u64;
            for (&idx, &crosses) in members.iter().zip(&across) {
                let share = if crosses {
                    (segment_cap / n.max(1)).max(1)
                } else {
                    0
                };
                self.set_throttle(out, idx, combine_caps(agent_cap, share));
            }
        }
        for idx in parts {
            if self.active(idx) {
                self.set_throttle(out, idx, agent_cap);
            }
        }
    }

    /// Whether `idx` is connected, instructed and still fetching.
    fn active(&self, idx: u32) -> bool {
        let p = &self.parts[idx as usize];
        p.online && p.instructed && !p.state.is_terminal()
    }

    fn set_throttle(&mut self, out: &mut Outputs, idx: u32, cap: u64) {
        let p = &mut self.parts[idx as usize];
        if p.throttle != cap {
            p.throttle = cap;
            out.transmit.push_back(Out::Throttle {
                job: self.spec.id,
                part: idx,
            });
        }
    }

    /// Whether `idx` fetches anything from the manager or from another segment's participant.
    pub(super) fn fetches_across(&self, idx: u32) -> bool {
        let Some(plan) = &self.plan else {
            return false;
        };
        let seg = self.parts[idx as usize].segment;
        plan.sources(idx).iter().any(|a| match a.holder {
            Holder::Manager => true,
            Holder::Peer(q) => self.parts[q as usize].segment != seg,
        })
    }
}

/// The tighter of two caps, where `0` means none.
fn combine_caps(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn durations_sizes_and_caps_read_well() {
        assert_eq!(format_duration(45), "45 s");
        assert_eq!(format_duration(12 * 60 + 5), "12 min");
        assert_eq!(format_duration(5 * 3600 + 12 * 60), "5 h 12 min");
        assert_eq!(format_duration(9 * 3600), "9 h");
        assert_eq!(format_duration(2 * 86_400 + 3 * 3600), "2 d 3 h");
        assert_eq!(format_rate(1024), "1 KiB/s");
        assert_eq!(format_bytes(32 << 20), "32 MiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(combine_caps(0, 5), 5);
        assert_eq!(combine_caps(7, 0), 7);
        assert_eq!(combine_caps(7, 5), 5);
        assert_eq!(combine_caps(0, 0), 0);
    }
}
