//! Where jobs and participants stand: the states the store keeps, and the job's own records.
//!
//! [`ParticipantState`], [`JobOutcome`] and [`RolloutState`] are what the driver persists and shows;
//! [`FailCause`] round-trips through text so a store can keep it. The rest builds
//! the engine's records of a job: its participants, and the relay plan's view of
//! each (its segment numbered, its leadership and the policy's serving rules
//! applied).

use core::fmt;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use baton_protocol::message::FailReason;
use baton_protocol::types::{AgentId, Name};
use serde::{Deserialize, Serialize};

use super::{Agent, EngineError, Job, JobSpec, Part};
use crate::planner::{NodeInfo, Policy, Profile, RelayPlan, Segments};

/// Why a participant failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailCause {
    /// The agent reported that it gave up (`Failed`).
    Agent(FailReason),
    /// It was silent and disconnected for longer than
    /// [`EngineConfig::give_up_after`](super::EngineConfig::give_up_after).
    GaveUp,
}

impl core::str::FromStr for FailCause {
    type Err = EngineError;

    /// Parses what [`Display`](fmt::Display) writes (so a store can keep the cause as text).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const REASONS: [FailReason; 12] = [
            FailReason::StorageFull,
            FailReason::StorageError,
            FailReason::BadManifest,
            FailReason::BadSignature,
            FailReason::Expired,
            FailReason::Downgrade,
            FailReason::Busy,
            FailReason::NoSource,
            FailReason::ChunkTooLarge,
            FailReason::NotListed,
            FailReason::VersionReused,
            FailReason::NoTrust,
        ];
        if s == FailCause::GaveUp.to_string() {
            return Ok(FailCause::GaveUp);
        }
        REASONS
            .into_iter()
            .map(FailCause::Agent)
            .find(|c| c.to_string() == s)
            .ok_or_else(|| EngineError::UnknownFailCause(s.into()))
    }
}

impl fmt::Display for FailCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailCause::Agent(reason) => write!(f, "agent failed: {reason:?}"),
            FailCause::GaveUp => f.write_str("given up: disconnected without progress"),
        }
    }
}

/// Where one participant of a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParticipantState {
    /// Not instructed yet (not online since the job started).
    Waiting,
    /// Instructed; `verified` chunks verified and stored so far.
    Fetching {
        /// Chunks verified so far.
        verified: u32,
    },
    /// Confirmed (`Have`): it holds every chunk, verified.
    Confirmed,
    /// Failed or given up; routed around.
    Failed(FailCause),
}

impl ParticipantState {
    /// Whether the participant is done with the job (confirmed or failed).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ParticipantState::Confirmed | ParticipantState::Failed(_)
        )
    }

    /// A short lowercase name: `waiting`, `fetching`, `confirmed`, `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            ParticipantState::Waiting => "waiting",
            ParticipantState::Fetching { .. } => "fetching",
            ParticipantState::Confirmed => "confirmed",
            ParticipantState::Failed(_) => "failed",
        }
    }
}

/// How a job stands as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// Participants are still working.
    Running,
    /// Every participant confirmed or failed; `Done` was sent.
    Finished,
    /// Cancelled by the administrator; `Cancel` was sent.
    Cancelled,
}

/// Where a staged rollout stands: what the store keeps and the API shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The cumulative end of each wave in the job's participant order (participant
    /// positions `ends[w-1]..ends[w]` are wave `w`; later positions belong to the last).
    pub ends: Vec<u32>,
    /// Waves opened so far (at least 1).
    pub opened: u32,
    /// Paused, and why: nobody new is instructed and no wave opens.
    pub paused: Option<String>,
    /// The current wave succeeded and the next waits for an administrator's approval.
    pub awaiting_approval: bool,
    /// The current wave succeeded and the next opens at this time (UTC seconds) unless it
    /// then waits for approval.
    pub soak_until: Option<u64>,
    /// Per wave: failures accepted by a resume (the thresholds count those beyond).
    pub accepted_failures: Vec<u32>,
    /// Aborted, and why: the job ended and the participants not settled were left.
    pub aborted: Option<String>,
}

impl RolloutState {
    /// A rollout at its start: wave 1 open.
    pub fn new(ends: Vec<u32>) -> Self {
        RolloutState {
            accepted_failures: vec![0; ends.len()],
            ends,
            opened: 1,
            paused: None,
            awaiting_approval: false,
            soak_until: None,
            aborted: None,
        }
    }

    /// The wave (0-based) of the participant at `position` in the job's order.
    pub fn wave_of(&self, position: u32) -> usize {
        self.ends
            .iter()
            .position(|&end| position < end)
            .unwrap_or(self.ends.len().saturating_sub(1))
    }

    /// The participant positions of wave `w` (0-based); the last takes every later one.
    pub(super) fn range(&self, w: usize, parts: u32) -> core::ops::Range<u32> {
        let start = if w == 0 { 0 } else { self.ends[w - 1] };
        let end = if w + 1 >= self.ends.len() {
            parts
        } else {
            self.ends[w]
        };
        start.min(end)..end
    }

    /// `aborted`, `paused`, `awaiting_approval`, `soaking`, `running` (a wave is still
    /// open to go) or `complete` (the last wave is open).
    pub fn name(&self) -> &'static str {
        if self.aborted.is_some() {
            "aborted"
        } else if self.paused.is_some() {
            "paused"
        } else if self.awaiting_approval {
            "awaiting_approval"
        } else if self.soak_until.is_some() {
            "soaking"
        } else if (self.opened as usize) < self.ends.len() {
            "running"
        } else {
            "complete"
        }
    }
}

impl Part {
    fn new(id: AgentId, state: ParticipantState) -> Self {
        let verified = match state {
            ParticipantState::Fetching { verified } => verified,
            _ => 0,
        };
        Part {
            id,
            state,
            verified,
            online: false,
            instructed: false,
            ever_instructed: false,
            end_sent: false,
            dirty: false,
            sources_queued: false,
            deadline: None,
            pleas: 0,
            segment: 0,
            segment_known: false,
            throttle: 0,
            standing: Default::default(),
            credited: 0,
            install: None,
            install_deadline: None,
            retries: 0,
            retry_at: None,
        }
    }

    /// Whether nothing more is expected of it in this job: delivery failed, or it confirmed
    /// and its install step reached a final state (running, failed, rolled back), and no
    /// retry is pending.
    pub(super) fn settled(&self) -> bool {
        if self.retry_at.is_some() {
            return false;
        }
        match self.state {
            ParticipantState::Failed(_) => true,
            ParticipantState::Confirmed => self.install.is_some_and(|s| s.is_final()),
            _ => false,
        }
    }
}

/// The relay plan's view of an agent: the policy's, with its segment number (`0` unless the
/// policy keeps content local) and whether it leads its segment.
pub(super) fn node_info(
    policy: &Policy,
    segment: u32,
    leaders: &HashMap<Name, AgentId>,
    id: &AgentId,
    profile: &Profile,
) -> NodeInfo {
    NodeInfo {
        segment: if policy.segment_local { segment } else { 0 },
        leader: leaders.get(&profile.segment) == Some(id),
        ..policy.node_info(id, profile)
    }
}

impl Job {
    pub(super) fn new(spec: JobSpec, chunks: u32, plan: Option<RelayPlan>) -> Self {
        Job {
            spec,
            chunks,
            plan,
            parts: Vec::new(),
            index: HashMap::new(),
            outcome: JobOutcome::Running,
            dirty: Vec::new(),
            bytes: BTreeMap::new(),
            flush_at: None,
            last_flush: None,
            confirmed: 0,
            failed: 0,
            segments: Segments::default(),
            segment_parts: HashMap::new(),
            warnings: Vec::new(),
            opens_at: None,
            closes_at: None,
            regroup_until: None,
            regroup_missing: 0,
            restored_upload: Vec::new(),
            restored_applied: false,
            throttle_segments: BTreeSet::new(),
            throttle_parts: Vec::new(),
            rates: Default::default(),
            staging: None,
        }
    }

    /// The plan's view of participant `idx` if its agent is online (numbering its segment).
    pub(super) fn online_info(
        &mut self,
        agents: &HashMap<AgentId, Agent>,
        leaders: &HashMap<Name, AgentId>,
        idx: u32,
    ) -> Option<NodeInfo> {
        let agent = agents.get(&self.parts[idx as usize].id)?;
        // Known agents get their segment numbered even when offline (for rate caps).
        let info = self.info_of(leaders, idx, &agent.profile);
        agent.online.then_some(info)
    }

    /// The plan's view of participant `idx` with `profile` (its upload as measured in this
    /// job, once it has delivered to fetchers); records its segment.
    pub(super) fn info_of(
        &mut self,
        leaders: &HashMap<Name, AgentId>,
        idx: u32,
        profile: &Profile,
    ) -> NodeInfo {
        let segment = self.segments.id(&profile.segment);
        let p = &mut self.parts[idx as usize];
        if !p.segment_known || p.segment != segment {
            if p.segment_known
                && p.segment != 0
                && let Some(list) = self.segment_parts.get_mut(&p.segment)
            {
                list.retain(|&i| i != idx);
            }
            if segment != 0 {
                self.segment_parts.entry(segment).or_default().push(idx);
            }
            p.segment = segment;
            p.segment_known = true;
        }
        let mut info = node_info(
            &self.spec.policy,
            segment,
            leaders,
            &self.parts[idx as usize].id,
            profile,
        );
        if info.server {
            if let Some(believed) = self.rates.believed(idx, info.up_bps) {
                info.up_bps = believed;
            } else if self.restored_applied
                && let Ok(at) = self.restored_upload.binary_search_by_key(&idx, |r| r.0)
            {
                info.up_bps = self.restored_upload[at].1;
            }
        }
        info
    }

    pub(super) fn add_part(&mut self, id: AgentId, state: ParticipantState) -> u32 {
        let idx = self.parts.len() as u32;
        self.index.insert(id.clone(), idx);
        self.parts.push(Part::new(id, state));
        idx
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn fail_causes_round_trip_through_text() {
        for cause in [
            FailCause::GaveUp,
            FailCause::Agent(FailReason::StorageFull),
            FailCause::Agent(FailReason::ChunkTooLarge),
            FailCause::Agent(FailReason::NotListed),
            FailCause::Agent(FailReason::VersionReused),
            FailCause::Agent(FailReason::NoTrust),
        ] {
            assert_eq!(cause.to_string().parse::<FailCause>(), Ok(cause));
        }
        assert!("bored".parse::<FailCause>().is_err());
    }
}
