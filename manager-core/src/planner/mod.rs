//! The planner: who goes first, and who fetches what from whom (claims 2, 3, 4, 9).
//!
//! Two steps, both pure functions of the agents' reports and the job's
//! [`Policy`]:
//!
//! 1. **Ranking.** Each agent gets a score from what it reported (link
//!    speeds, loss, uptime, performance class, round-trip time to the
//!    manager, whether it can serve peers), weighted by the policy; the
//!    prioritized list is the participants sorted by score, ties broken by id
//!    ([`prioritize`]). The engine instructs participants in this order and
//!    names each one's successor on the list as its "next" (claim 3).
//! 2. **Relay plan.** [`RelayPlan`] decides, per chunk range, which source
//!    each participant fetches from, aiming at the Kumar–Ross lower bound
//!    for one file to N peers, `max(S/u_m, S/d_min, N·S/(u_m + Σu_i))` (see
//!    [`lower_bound_secs`]): the content is cut into stripes sized in
//!    proportion to the upload capacity of the group of agents that relays
//!    each one; every participant fetches every stripe, from the manager,
//!    from a confirmed holder or from a member of the stripe's group
//!    (cut-through: a member serves a stripe from its first verified chunk).
//!    The plan keeps each agent within its `max_peers` and `max_sources`,
//!    never names an agent that cannot serve as a source, and is repaired in
//!    place when a source leaves, fails or misbehaves.
//! 3. **Segments.** When agents report LAN segments, the plan is made per
//!    segment: each segment's entry nodes (its elected leader first, then its
//!    best-ranked servers, at most [`Policy::max_wan_transfers_per_segment`])
//!    fetch each stripe from outside once, and it fans out inside the
//!    segment; segments are ranked by their best entry, and
//!    [`RelayPlan::segment_entries`] lists them. Members fetch across the WAN
//!    only when nobody on their segment can serve them (no agent there may
//!    relay, or as a repair).
//!
//! Rate caps, time windows and staged rollouts ([`Rollout`]) are carried out by the engine (`Throttle`
//! messages, a job that waits for its window); leaf-only rules (by id, by
//! labels, by upload) decide who may serve ([`Policy::may_serve`]).
//!
//! Planning is `O(N log N)` in the number of participants.

mod relay;
mod rollout;
mod window;

pub use relay::{Assignment, Holder, NodeInfo, RelayPlan, Seed, SegmentEntry};
pub use rollout::{MAX_SOAK_SECS, MAX_WAVES, Rollout, Wave};
pub use window::{Day, MAX_WINDOWS, TimeWindow, WindowState, window_state};

use std::collections::BTreeMap;

use baton_protocol::message::Report;
use baton_protocol::types::{AgentId, DelayTo, LinkInfo, Name, PeerAddr};
use serde::{Deserialize, Serialize};

/// How much each reported parameter counts in an agent's score (claims 2, 4).
///
/// Every component of the score is normalised to `0.0..=1.0` before it is
/// weighted, so the weights compare directly; a weight of `0` ignores that
/// parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Weights {
    /// Upload speed (`LinkInfo::up_bps`, logarithmic).
    pub up: f64,
    /// Download speed (`LinkInfo::down_bps`, logarithmic).
    pub down: f64,
    /// Link reliability from the loss rate (`LinkInfo::loss_ppm`; 1 % loss halves it).
    pub loss: f64,
    /// Stability from uptime (`LinkInfo::uptime_s`; one hour gives one half).
    pub uptime: f64,
    /// Performance class (`Report::performance`, 0..=1000).
    pub performance: f64,
    /// Closeness to the manager (measured round-trip time; 20 ms gives one half).
    pub delay: f64,
    /// Bonus for agents that can serve peers (they relay, so they should go first).
    pub serve: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            up: 4.0,
            down: 2.0,
            loss: 2.0,
            uptime: 1.0,
            performance: 1.0,
            delay: 1.0,
            serve: 3.0,
        }
    }
}

/// Administrator rules for one job's ranking and relay plan (claim 9).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Ordering weights over the reported parameters.
    pub weights: Weights,
    /// Most peers one agent serves for this job; `0` = only the agent's own `max_peers`.
    pub max_peers_per_source: u16,
    /// Most stripes the content is cut into (each a separately relayed chunk range), at least 1.
    pub max_stripes: u16,
    /// Whether agents relay to each other at all; `false` = everyone fetches from the manager.
    pub relay: bool,
    /// Agents that only receive and never serve (weak devices), by id.
    pub leaf_only: Vec<AgentId>,
    /// Agents whose reported upload is known and below this (bytes/s) only receive; `0` = off.
    pub leaf_below_up_bps: u64,
    /// Prefer sources on the fetcher's own LAN segment, so content crosses into each segment
    /// about once per stripe and fans out inside it.
    pub segment_local: bool,
    /// Most copies of the content the manager sends by plan (at least 1: every stripe is
    /// seeded once). Above 1 the manager also serves fetchers directly, in proportion to
    /// its upload; repairs after faults come on top.
    pub manager_max_copies: f64,
    /// Agents carrying every one of these labels only receive and never serve; empty = off
    /// (the same matching as a content group's selector).
    pub leaf_only_labels: BTreeMap<String, String>,
    /// Most verified bytes per second each participant fetches (sent as `Throttle`); `0` = none.
    pub agent_rate_cap_bps: u64,
    /// Most bytes per second entering one segment across its WAN link, split evenly over the
    /// segment's participants that fetch from outside it (sent as `Throttle`); `0` = none.
    pub segment_rate_cap_bps: u64,
    /// Most participants of one segment that fetch from outside it at once (the content
    /// enters through at most this many entry nodes); `0` = no limit.
    pub max_wan_transfers_per_segment: u16,
    /// When the job may transfer: while any of these windows is open (see [`window_state`]);
    /// a job waits for an opening, and a running one stops its transfers at a close and
    /// resumes them at the next opening. Empty = any time. Read also from the single
    /// `"window"` (an object or `null`) of policies stored before.
    #[serde(alias = "window", deserialize_with = "window::one_or_many")]
    pub windows: Vec<TimeWindow>,
    /// Times a failed participant is instructed again (after [`Policy::retry_after_secs`])
    /// before it stays failed: a failed fetch, a failed install or a rollback; `0` = never.
    pub max_retries: u32,
    /// Seconds between a participant's failure and its retry.
    pub retry_after_secs: u64,
    /// A staged rollout: the participants in waves, the next opening once the current one
    /// succeeded. `None` = everyone at once.
    pub rollout: Option<Rollout>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            weights: Weights::default(),
            max_peers_per_source: 32,
            max_stripes: 8,
            relay: true,
            leaf_only: Vec::new(),
            leaf_below_up_bps: 0,
            segment_local: true,
            manager_max_copies: 1.0,
            leaf_only_labels: BTreeMap::new(),
            agent_rate_cap_bps: 0,
            segment_rate_cap_bps: 0,
            max_wan_transfers_per_segment: 0,
            windows: Vec::new(),
            max_retries: DEFAULT_MAX_RETRIES,
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            rollout: None,
        }
    }
}

/// Retries of a failed participant unless the policy says otherwise: none, as in Mender's
/// deployments (a failure stays final and counts at once in a rollout's thresholds; the
/// operator opts in per policy).
pub const DEFAULT_MAX_RETRIES: u32 = 0;
/// Seconds before a failed participant is retried unless the policy says otherwise.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 30;
/// Most retries a policy may ask for.
pub const MAX_RETRIES: u32 = 100;
/// Longest wait before a retry a policy may ask for: a day.
pub const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// A policy field out of range (for the API's `400 {"error", "field"}` answers).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The field's name, as in the policy's JSON (`window.start_minute`, `max_stripes`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Policy {
    /// Checks every field's range: windows (minutes within a day, days, a known zone), retries, at least one stripe, the
    /// manager's copies and the weights finite and not negative.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |field: &'static str, reason: &str| {
            Err(PolicyError {
                field,
                reason: reason.to_string(),
            })
        };
        if self.windows.len() > MAX_WINDOWS {
            return err("windows", &format!("at most {MAX_WINDOWS} windows"));
        }
        for w in &self.windows {
            if let Err((field, reason)) = w.validate() {
                return Err(PolicyError { field, reason });
            }
        }
        if self.max_retries > MAX_RETRIES {
            return err("max_retries", &format!("at most {MAX_RETRIES}"));
        }
        if self.retry_after_secs > MAX_RETRY_AFTER_SECS {
            return err(
                "retry_after_secs",
                &format!("at most {MAX_RETRY_AFTER_SECS} (a day)"),
            );
        }
        if let Some(r) = &self.rollout
            && let Err((field, reason)) = r.validate()
        {
            return Err(PolicyError { field, reason });
        }
        if self.max_stripes == 0 {
            return err("max_stripes", "must be at least 1");
        }
        if !self.manager_max_copies.is_finite() || self.manager_max_copies < 1.0 {
            return err("manager_max_copies", "must be a number of at least 1");
        }
        let w = &self.weights;
        for (field, value) in [
            ("weights.up", w.up),
            ("weights.down", w.down),
            ("weights.loss", w.loss),
            ("weights.uptime", w.uptime),
            ("weights.performance", w.performance),
            ("weights.delay", w.delay),
            ("weights.serve", w.serve),
        ] {
            if !value.is_finite() || value < 0.0 {
                return err(field, "must be a number of at least 0");
            }
        }
        Ok(())
    }

    /// Whether `id` (with `profile`) may serve peers in a job under this policy.
    pub fn may_serve(&self, id: &AgentId, profile: &Profile) -> bool {
        self.relay
            && profile.can_serve
            && profile.listen.is_some()
            && profile.max_peers > 0
            && !(self.leaf_below_up_bps > 0
                && profile.link.up_bps > 0
                && profile.link.up_bps < self.leaf_below_up_bps)
            && !self.leaf_only.iter().any(|l| l == id)
            && !self.leaf_by_labels(profile)
    }

    /// Whether `profile` carries every label of [`leaf_only_labels`](Self::leaf_only_labels)
    /// (never when that is empty).
    pub fn leaf_by_labels(&self, profile: &Profile) -> bool {
        !self.leaf_only_labels.is_empty()
            && self.leaf_only_labels.iter().all(|(k, v)| {
                profile
                    .labels
                    .iter()
                    .any(|(pk, pv)| **pk == **k && **pv == **v)
            })
    }

    /// The relay plan's view of one agent under this policy (its segment number is left `0`;
    /// the caller numbers segments, see [`Segments`]).
    pub fn node_info(&self, id: &AgentId, profile: &Profile) -> NodeInfo {
        let capacity = match self.max_peers_per_source {
            0 => profile.max_peers,
            cap => cap.min(profile.max_peers),
        };
        let server = self.may_serve(id, profile) && capacity > 0;
        NodeInfo {
            up_bps: profile.link.up_bps,
            server,
            capacity: if server { capacity } else { 0 },
            max_sources: profile.max_sources.max(1),
            segment: 0,
            leader: false,
        }
    }
}

/// Numbers LAN segment names for the relay plan ([`NodeInfo::segment`]); the empty name is `0`.
#[derive(Clone, Debug, Default)]
pub struct Segments {
    ids: std::collections::HashMap<Name, u32>,
}

impl Segments {
    /// The number of `segment` (the same name always gets the same number).
    pub fn id(&mut self, segment: &Name) -> u32 {
        if segment.is_empty() {
            return 0;
        }
        let next = self.ids.len() as u32 + 1;
        *self.ids.entry(segment.clone()).or_insert(next)
    }

    /// The name numbered `id`, if any.
    pub fn name(&self, id: u32) -> Option<&Name> {
        self.ids
            .iter()
            .find(|(_, n)| **n == id)
            .map(|(name, _)| name)
    }
}

/// The part of a [`Report`] the planner and engine keep per agent (compact: no labels or holdings).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Profile {
    /// Where peers reach it, if it serves peers.
    pub listen: Option<PeerAddr>,
    /// Site or location.
    pub site: Name,
    /// LAN segment.
    pub segment: Name,
    /// Performance class (1..=1000, higher is faster).
    pub performance: u32,
    /// Free storage for content, bytes.
    pub free_storage: u64,
    /// Whether it is willing to serve chunks to peers.
    pub can_serve: bool,
    /// Largest chunk size it can receive.
    pub max_chunk: u32,
    /// Most distinct sources it can track for one job.
    pub max_sources: u16,
    /// Most peers it serves at once.
    pub max_peers: u16,
    /// Link speed and reliability.
    pub link: LinkInfo,
    /// Measured round-trip time to the manager, microseconds, if reported.
    pub manager_rtt_us: Option<u32>,
    /// Labels from its configuration, `(key, value)` (for label-based policy rules).
    pub labels: Vec<(Box<str>, Box<str>)>,
}

impl From<&Report> for Profile {
    fn from(r: &Report) -> Self {
        Profile {
            listen: r.listen,
            site: r.site.clone(),
            segment: r.segment.clone(),
            performance: r.performance,
            free_storage: r.free_storage,
            can_serve: r.can_serve,
            max_chunk: r.max_chunk,
            max_sources: r.max_sources,
            max_peers: r.max_peers,
            link: r.link,
            manager_rtt_us: r
                .delays
                .iter()
                .filter(|d| d.to == DelayTo::Manager)
                .map(|d| d.rtt_us)
                .min(),
            labels: r
                .labels
                .iter()
                .map(|l| (l.key.as_str().into(), l.value.as_str().into()))
                .collect(),
        }
    }
}

/// A speed in bytes/s mapped to `0..=1` on a log scale (10 GB/s → 1); unknown (0) → 0.5.
fn speed_component(bps: u64) -> f64 {
    if bps == 0 {
        0.5
    } else {
        ((1.0 + bps as f64).log10() / 10.0).min(1.0)
    }
}

impl Profile {
    /// This agent's score under `policy`: higher goes earlier in the list.
    pub fn score(&self, id: &AgentId, policy: &Policy) -> f64 {
        let w = &policy.weights;
        let loss = 1.0 / (1.0 + self.link.loss_ppm as f64 / 10_000.0);
        let uptime = self.link.uptime_s as f64 / (self.link.uptime_s as f64 + 3600.0);
        let performance = self.performance.min(1000) as f64 / 1000.0;
        let delay = match self.manager_rtt_us {
            Some(rtt) => 1.0 / (1.0 + rtt as f64 / 20_000.0),
            None => 0.5,
        };
        let serve = if policy.may_serve(id, self) { 1.0 } else { 0.0 };
        w.up * speed_component(self.link.up_bps)
            + w.down * speed_component(self.link.down_bps)
            + w.loss * loss
            + w.uptime * uptime
            + w.performance * performance
            + w.delay * delay
            + w.serve * serve
    }
}

/// The score of the agent that sent `report`, under `policy` (claims 2, 4).
pub fn score(report: &Report, policy: &Policy) -> f64 {
    Profile::from(report).score(&report.id, policy)
}

/// The prioritized list: agents sorted by descending score, ties by ascending id (claims 3, 4).
///
/// Returns each agent's id with its score, best first.
pub fn prioritize<'a>(
    agents: impl IntoIterator<Item = (&'a AgentId, &'a Profile)>,
    policy: &Policy,
) -> Vec<(AgentId, f64)> {
    let mut list: Vec<(AgentId, f64)> = agents
        .into_iter()
        .map(|(id, p)| (id.clone(), p.score(id, policy)))
        .collect();
    list.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    list
}

/// The Kumar–Ross lower bound, in seconds, on the time to bring `content_bytes` to every participant.
///
/// `T* = max(S/u_m, S/d_min, N·S/(u_m + Σu_i))` with `participants` given as
/// `(up_bps, down_bps)`. Unknown (0) download speeds are left out of `d_min`;
/// the last term is left out if any upload speed is unknown. `None` if the
/// manager's upload is unknown or there are no participants.
pub fn lower_bound_secs(
    content_bytes: u64,
    manager_up_bps: u64,
    participants: &[(u64, u64)],
) -> Option<f64> {
    if manager_up_bps == 0 || participants.is_empty() {
        return None;
    }
    let s = content_bytes as f64;
    let mut bound = s / manager_up_bps as f64;
    if let Some(d_min) = participants.iter().map(|p| p.1).filter(|&d| d > 0).min() {
        bound = bound.max(s / d_min as f64);
    }
    if participants.iter().all(|p| p.0 > 0) {
        let total: f64 =
            manager_up_bps as f64 + participants.iter().map(|p| p.0 as f64).sum::<f64>();
        bound = bound.max(participants.len() as f64 * s / total);
    }
    Some(bound)
}

#[cfg(test)]
mod test {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn profile(up: u64, loss_ppm: u32, serve: bool) -> Profile {
        Profile {
            listen: serve.then_some(PeerAddr::V4([10, 0, 0, 1], 7000)),
            can_serve: serve,
            max_sources: 8,
            max_peers: 16,
            performance: 500,
            link: LinkInfo {
                up_bps: up,
                down_bps: up,
                loss_ppm,
                uptime_s: 3600,
            },
            ..Profile::default()
        }
    }

    #[test]
    fn faster_and_more_reliable_agents_rank_first_ties_by_id() {
        let policy = Policy::default();
        let (a, b, c, d, e) = (id("a"), id("b"), id("c"), id("d"), id("e"));
        let fast = profile(100_000_000, 0, true);
        let slow = profile(1_000_000, 0, true);
        let lossy = profile(100_000_000, 50_000, true);
        let leaf = profile(100_000_000, 0, false);
        let agents = [
            (&e, &slow),
            (&d, &fast),
            (&c, &lossy),
            (&b, &fast),
            (&a, &leaf),
        ];
        let list = prioritize(agents, &policy);
        let order: Vec<&str> = list.iter().map(|(i, _)| i.as_str()).collect();
        // b and d tie (same profile): by id. Then the slow one, the lossy one (5 % loss), and
        // last the fast leaf (no serve bonus).
        assert_eq!(order, ["b", "d", "e", "c", "a"]);
        assert!(list[0].1 > list[2].1);
    }

    #[test]
    fn weights_change_the_order() {
        let (a, b) = (id("a"), id("b"));
        let near = Profile {
            manager_rtt_us: Some(1_000),
            ..profile(1_000_000, 0, true)
        };
        let far_fast = Profile {
            manager_rtt_us: Some(200_000),
            ..profile(1_000_000_000, 0, true)
        };
        let mut policy = Policy::default();
        let list = prioritize([(&a, &near), (&b, &far_fast)], &policy);
        assert_eq!(list[0].0, b);
        policy.weights = Weights {
            up: 0.0,
            down: 0.0,
            delay: 10.0,
            ..Weights::default()
        };
        let list = prioritize([(&a, &near), (&b, &far_fast)], &policy);
        assert_eq!(list[0].0, a);
    }

    #[test]
    fn report_profile_takes_manager_delay() {
        let mut r = Report {
            id: id("x"),
            listen: None,
            site: Name::new(),
            segment: Name::new(),
            performance: 10,
            free_storage: 0,
            can_serve: false,
            max_chunk: 4096,
            max_sources: 2,
            max_peers: 0,
            link: LinkInfo::default(),
            delays: Default::default(),
            labels: Default::default(),
            holdings: Default::default(),
        };
        r.delays
            .push(baton_protocol::types::Delay {
                to: DelayTo::Peer(id("y")),
                rtt_us: 5,
            })
            .unwrap();
        r.delays
            .push(baton_protocol::types::Delay {
                to: DelayTo::Manager,
                rtt_us: 900,
            })
            .unwrap();
        let p = Profile::from(&r);
        assert_eq!(p.manager_rtt_us, Some(900));
        assert!(score(&r, &Policy::default()).is_finite());
    }

    #[test]
    fn leaves_by_policy() {
        let mut policy = Policy {
            leaf_only: vec![id("weak")],
            ..Policy::default()
        };
        let p = profile(1_000_000, 0, true);
        assert!(policy.node_info(&id("strong"), &p).server);
        assert!(!policy.node_info(&id("weak"), &p).server);
        policy.leaf_below_up_bps = 2_000_000;
        assert!(!policy.node_info(&id("strong"), &p).server);
        policy.leaf_below_up_bps = 0;
        policy.relay = false;
        assert!(!policy.node_info(&id("strong"), &p).server);
        let no_listen = Profile {
            listen: None,
            ..p.clone()
        };
        assert!(
            !Policy::default()
                .node_info(&id("strong"), &no_listen)
                .server
        );
        let info = Policy {
            max_peers_per_source: 4,
            ..Policy::default()
        }
        .node_info(&id("strong"), &p);
        assert_eq!(info.capacity, 4);
    }

    #[test]
    fn policies_validate() {
        assert_eq!(Policy::default().validate(), Ok(()));
        let bad = Policy {
            windows: vec![TimeWindow::daily_utc(1440, 0)],
            ..Policy::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "windows.start_minute");
        let bad = Policy {
            windows: vec![TimeWindow {
                zone: "Nowhere/Town".into(),
                ..TimeWindow::daily_utc(10, 20)
            }],
            ..Policy::default()
        };
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "windows.zone");
        assert!(
            e.reason.contains("unknown time zone \"Nowhere/Town\""),
            "{e}"
        );
        let bad = Policy {
            max_retries: MAX_RETRIES + 1,
            ..Policy::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "max_retries");
        let bad = Policy {
            weights: Weights {
                delay: f64::NAN,
                ..Weights::default()
            },
            ..Policy::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "weights.delay");
    }

    #[test]
    fn partial_policy_json_takes_defaults() {
        // Every field has a default: `{}` and partial JSON are whole policies.
        let p: Policy =
            serde_json::from_str(r#"{"window":{"start_minute":60,"end_minute":120}}"#).unwrap();
        assert_eq!(p.windows, [TimeWindow::daily_utc(60, 120)]);
        assert_eq!(p.max_stripes, 8);
        // Policies stored before several windows: `"window": null` is none.
        let p: Policy = serde_json::from_str(r#"{"window":null,"relay":false}"#).unwrap();
        assert!(p.windows.is_empty() && !p.relay);
        // What is written now reads back.
        let p = Policy {
            windows: vec!["sat,sun 01:00-05:00 Europe/Lisbon".parse().unwrap()],
            ..Policy::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""days":["sat","sun"]"#), "{json}");
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
    }

    #[test]
    fn leaves_by_labels_need_every_label() {
        let mut p = profile(1_000_000, 0, true);
        p.labels = vec![
            ("role".into(), "meter".into()),
            ("site".into(), "fra".into()),
        ];
        let mut policy = Policy::default();
        assert!(policy.may_serve(&id("x"), &p));
        policy
            .leaf_only_labels
            .insert("role".to_string(), "meter".to_string());
        assert!(!policy.may_serve(&id("x"), &p));
        policy
            .leaf_only_labels
            .insert("site".to_string(), "ams".to_string());
        assert!(policy.may_serve(&id("x"), &p));
    }

    #[test]
    fn kumar_ross_bound() {
        // 10 peers of 1 MB/s up, 10 MB/s down; manager 2 MB/s; 12 MB content.
        let peers = vec![(1_000_000, 10_000_000); 10];
        let t = lower_bound_secs(12_000_000, 2_000_000, &peers).unwrap();
        // max(6, 1.2, 10·12/12 = 10)
        assert!((t - 10.0).abs() < 1e-9);
        assert_eq!(lower_bound_secs(1, 0, &peers), None);
        let unknown_up = vec![(0, 1_000_000)];
        let t = lower_bound_secs(10_000_000, 10_000_000, &unknown_up).unwrap();
        assert!((t - 10.0).abs() < 1e-9);
    }
}
