//! The engine's side of a job's policy: time windows, rate caps and warnings (claim 9).
//!
//! - **Time window.** A job whose window is closed when it starts (or resumes)
//!   waits: its plan is built, nobody is instructed and nobody is given up;
//!   the engine wakes at the window's opening ([`Engine::poll_timeout`](super::Engine::poll_timeout))
//!   and instructs every connected participant then. The wall clock comes from
//!   the driver ([`Engine::set_wall_clock`](super::Engine::set_wall_clock)). A
//!   job that has started runs to its end even if the window closes meanwhile.
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
use super::{Agent, Ctx, EngineEvent, FailCause, Job, JobOutcome, Out, Outputs, ParticipantState};
use crate::planner::Holder;

/// A rate cap that makes one transfer take longer than this is reported (without a window).
const SLOW_TRANSFER: Duration = Duration::from_secs(3600);

/// Minutes in a day.
const DAY_MINUTES: u16 = 24 * 60;

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
        if let Some(w) = policy.window {
            if w.start_minute >= DAY_MINUTES || w.end_minute >= DAY_MINUTES {
                out.push(format!(
                    "window minutes {}..{} are not minutes of a day (0..1440): taken as {w}",
                    w.start_minute, w.end_minute
                ));
            }
            let (start, end) = (w.start_minute % DAY_MINUTES, w.end_minute % DAY_MINUTES);
            if start != end {
                window_secs = Some((end + DAY_MINUTES - start) as u64 % DAY_MINUTES as u64 * 60);
            }
            match unix {
                None => out.push(format!(
                    "window {w} cannot be checked: the manager has no wall clock; the job starts now"
                )),
                Some(unix) => {
                    let wait = w.wait_secs(unix);
                    if wait > 0 && self.outcome == JobOutcome::Running {
                        self.opens_at = Some(now + Duration::from_secs(wait));
                        out.push(format!(
                            "window {w} is closed; the job waits {}",
                            format_duration(wait)
                        ));
                    }
                }
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
        let beyond = match (window_secs, policy.window) {
            (Some(_), Some(w)) => format!(", longer than the window {w}"),
            _ => String::new(),
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

    /// The job's time window opened: every connected participant is instructed now, and the
    /// give-up timers of the others start.
    pub(super) fn open_window(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        self.opens_at = None;
        if self.outcome != JobOutcome::Running {
            return;
        }
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
