//! Scenarios: the fleet, its links and its faults, generated from a seed.
//!
//! A [`Scenario`] is the description a run starts from (sizes, rate ranges,
//! latency, loss, segments, fault counts, what the agents declare of their
//! rates and whether some uploads change mid-job); [`Scenario::build`] draws
//! every agent's link and the fault schedule from the seed, so the same
//! scenario and seed always give the same [`Built`] fleet — and the same run.
//!
//! The rates an agent *declares* (its `LinkInfo`, what the manager plans
//! with) are kept apart from its true ones (what the link model serves at):
//! [`RatesMode`] says how they relate, and each draw that only concerns the
//! declared rates or the rate change comes from its own stream of the seed,
//! so switching modes never changes the fleet's true links or faults.

use std::str::FromStr;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::net::{Link, Net, Wan};

/// How many faults of each kind a run injects, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// Probability that a frame sent during the fault window is dropped. On a TCP link a
    /// frame cannot vanish: a drop is the connection breaking (both ends learn it).
    pub drop_rate: f64,
    /// Drops as on a lossy serial link: the frame vanishes, and the session breaks only when
    /// the next frame in that direction fails to decrypt (if none follows, nobody notices).
    pub serial_drops: bool,
    /// Partitions: a segment (or a random tenth of the fleet) cut off from everyone else.
    pub partitions: u32,
    /// Agent crashes followed by a restart over the same store.
    pub crashes: u32,
    /// Agent crashes without restart.
    pub permanent_crashes: u32,
    /// Agents that corrupt every chunk they serve.
    pub malicious: u32,
    /// Manager crashes followed by a restart with a higher epoch.
    pub manager_restarts: u32,
    /// Faults start within this long after the job starts (default: the lower bound).
    pub window: Option<Duration>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            drop_rate: 0.0,
            serial_drops: false,
            partitions: 0,
            crashes: 0,
            permanent_crashes: 0,
            malicious: 0,
            manager_restarts: 0,
            window: None,
        }
    }
}

impl FaultConfig {
    /// Whether any fault is configured.
    pub fn any(&self) -> bool {
        self.drop_rate > 0.0
            || self.partitions > 0
            || self.crashes > 0
            || self.permanent_crashes > 0
            || self.malicious > 0
            || self.manager_restarts > 0
    }
}

/// How big the fleets of a faulty sweep are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepSize {
    /// 3–12 agents, 8–48 chunks: the CI sweep (a thousand seeds in seconds, even in debug).
    Small,
    /// 13–64 agents, 32–128 chunks: enough sources over time to fill an agent's source table.
    Medium,
}

/// What the agents declare of their link rates (`LinkInfo::up_bps`/`down_bps`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RatesMode {
    /// Every agent declares its true rates (as one started with the right `--up-bps` and
    /// `--down-bps`).
    #[default]
    Declared,
    /// Every agent declares 0 for both (unknown: an agent started without `--up-bps` or
    /// `--down-bps`, before it has measured anything); whatever the agent core measures and
    /// reports later is what the manager gets.
    Blind,
    /// Every agent declares its true rates times a factor drawn per agent from the seed,
    /// log-uniform in [`WRONG_FACTOR_MIN`]`..=`[`WRONG_FACTOR_MAX`], independently for upload
    /// and download.
    Wrong,
}

/// Least factor between a [`RatesMode::Wrong`] agent's declared and true rate.
pub const WRONG_FACTOR_MIN: f64 = 0.3;
/// Greatest factor between a [`RatesMode::Wrong`] agent's declared and true rate.
pub const WRONG_FACTOR_MAX: f64 = 3.0;

impl RatesMode {
    /// Every mode, in the order a sweep draws them from.
    pub const ALL: [RatesMode; 3] = [RatesMode::Declared, RatesMode::Blind, RatesMode::Wrong];

    /// The name on the command line and in reports: `declared`, `blind` or `wrong`.
    pub fn name(self) -> &'static str {
        match self {
            RatesMode::Declared => "declared",
            RatesMode::Blind => "blind",
            RatesMode::Wrong => "wrong",
        }
    }
}

impl FromStr for RatesMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        RatesMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("{s:?}: expected declared, blind or wrong"))
    }
}

/// A change of some agents' upload capacity mid-job (`--rate-change FACTOR@TIME_FRACTION`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateChange {
    /// The changed agents' upload is multiplied by this (> 0).
    pub factor: f64,
    /// When, as a fraction of the scenario's lower bound `T*` after the job starts.
    pub at_fraction: f64,
}

/// Fraction of the agents whose upload a [`RateChange`] changes (at least one agent).
pub const RATE_CHANGE_SHARE: f64 = 0.1;

impl FromStr for RateChange {
    type Err = String;

    /// Parses `FACTOR@TIME_FRACTION`, e.g. `0.5@0.33`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("{s:?}: expected FACTOR@TIME_FRACTION, e.g. 0.5@0.33");
        let (factor, at) = s.split_once('@').ok_or_else(usage)?;
        let factor: f64 = factor.trim().parse().map_err(|_| usage())?;
        let at_fraction: f64 = at.trim().parse().map_err(|_| usage())?;
        if !(factor.is_finite() && factor > 0.0) {
            return Err(format!("{s:?}: the factor must be above 0"));
        }
        if !(at_fraction.is_finite() && at_fraction >= 0.0) {
            return Err(format!("{s:?}: the time fraction must be 0 or more"));
        }
        Ok(RateChange {
            factor,
            at_fraction,
        })
    }
}

/// Agents that start only after the job did (`--late COUNT@TIME_FRACTION`): they are
/// participants from the start, offline until then, and are placed as they connect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LateJoin {
    /// How many agents start late (at most all of them).
    pub count: u32,
    /// When they start, as a fraction of the lower bound `T*` after the job starts.
    pub at_fraction: f64,
}

impl FromStr for LateJoin {
    type Err = String;

    /// Parses `COUNT@TIME_FRACTION`, e.g. `4@0.25`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("{s:?}: expected COUNT@TIME_FRACTION, e.g. 4@0.25");
        let (count, at) = s.split_once('@').ok_or_else(usage)?;
        let count: u32 = count.trim().parse().map_err(|_| usage())?;
        let at_fraction: f64 = at.trim().parse().map_err(|_| usage())?;
        if !(at_fraction.is_finite() && at_fraction >= 0.0) {
            return Err(format!("{s:?}: the time fraction must be 0 or more"));
        }
        Ok(LateJoin { count, at_fraction })
    }
}

/// Everything a run is generated from.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Number of agents.
    pub agents: usize,
    /// Seed for links, content and faults.
    pub seed: u64,
    /// Virtual content size `S` in bytes (what the link model charges).
    pub content_bytes: u64,
    /// Number of chunks (each really [`REAL_CHUNK`](crate::content::REAL_CHUNK) bytes,
    /// virtually `S / chunks`).
    pub chunks: u32,
    /// Agent upload rates are log-uniform in `up_min..=up_max` bytes/s.
    pub up_min: u64,
    /// See `up_min`.
    pub up_max: u64,
    /// Agent download rates are log-uniform in `down_min..=down_max` bytes/s.
    pub down_min: u64,
    /// See `down_min`.
    pub down_max: u64,
    /// The manager's upload rate, bytes/s.
    pub manager_up: u64,
    /// The manager's download rate, bytes/s.
    pub manager_down: u64,
    /// One-way access latency of each agent, uniform in `latency_min..=latency_max`.
    pub latency_min: Duration,
    /// See `latency_min`.
    pub latency_max: Duration,
    /// The manager's one-way access latency.
    pub manager_latency: Duration,
    /// Each agent's loss probability per frame is uniform in `0..=loss`; a lost frame is
    /// retransmitted (TCP): it and later frames on its connection arrive one RTO later.
    pub loss: f64,
    /// LAN segments behind WAN links (`0` = a flat network, no WAN links).
    pub segments: u32,
    /// Upload of each segment's WAN link, bytes/s (shared by its agents' outbound traffic).
    pub wan_up: u64,
    /// Download of each segment's WAN link, bytes/s.
    pub wan_down: u64,
    /// One-way latency of a WAN link.
    pub wan_latency: Duration,
    /// Fraction of agents that do not serve peers.
    pub leaf_fraction: f64,
    /// Chunk requests in flight per source (the agents' `window`). The default is 3, not the
    /// agent's 8: a relay answers its children in request order, so a child with 8 requests
    /// in flight takes 8 chunks in a row while its siblings wait, and every hop of a stripe's
    /// tree lags by more; 2–3 requests already cover a source's bandwidth-delay product here
    /// (10 000 agents, 200 chunks: ratio 1.378 with 8, 1.296 with 3).
    pub window: u16,
    /// Peers each agent serves at once (its `max_peers`).
    pub max_peers: u16,
    /// Most stripes the planner may cut the content into (policy `max_stripes`).
    pub max_stripes: u16,
    /// Most peers one agent serves in a job (policy `max_peers_per_source`).
    pub max_peers_per_source: u16,
    /// Most copies of the content the manager sends by plan (policy `manager_max_copies`).
    pub manager_copies: f64,
    /// Silent and disconnected this long, a participant is given up by the engine.
    pub give_up_after: Duration,
    /// What the agents declare of their rates.
    pub rates: RatesMode,
    /// A change of a tenth of the agents' upload mid-job, if any.
    pub rate_change: Option<RateChange>,
    /// Faults to inject.
    pub faults: FaultConfig,
    /// Agents that start after the job, if any.
    pub late: Option<LateJoin>,
    /// Every live agent must be confirmed this long after the last fault healed (or after the
    /// job started, without faults); `None` = 180 s + 20·T*.
    pub bound: Option<Duration>,
}

impl Scenario {
    /// The default heterogeneous scenario for `agents` agents: upload 1–8 MB/s (8×), download
    /// 8–64 MB/s, 32 MiB in 1024 chunks (32 KiB virtual each), manager 20 MB/s up, latency
    /// 0.5–20 ms one way, no loss, a flat network, declared rates, no rate change, no faults.
    pub fn new(agents: usize, seed: u64) -> Self {
        Scenario {
            agents,
            seed,
            content_bytes: 32 << 20,
            chunks: 1024,
            up_min: 1_000_000,
            up_max: 8_000_000,
            down_min: 8_000_000,
            down_max: 64_000_000,
            manager_up: 20_000_000,
            manager_down: 100_000_000,
            latency_min: Duration::from_micros(500),
            latency_max: Duration::from_millis(20),
            manager_latency: Duration::from_millis(1),
            loss: 0.0,
            segments: 0,
            wan_up: 50_000_000,
            wan_down: 100_000_000,
            wan_latency: Duration::from_millis(10),
            leaf_fraction: 0.0,
            window: 3,
            max_peers: 48,
            max_stripes: 8,
            max_peers_per_source: 32,
            manager_copies: 1.0,
            give_up_after: Duration::from_secs(60),
            rates: RatesMode::Declared,
            rate_change: None,
            faults: FaultConfig::default(),
            late: None,
            bound: None,
        }
    }

    /// The same fleet, links and content without faults or late starts: the run a fault's
    /// makespan penalty is measured against.
    pub fn without_faults(&self) -> Self {
        Scenario {
            faults: FaultConfig::default(),
            late: None,
            ..self.clone()
        }
    }

    /// How long after the faults heal every live agent must be confirmed (see `bound`).
    pub fn liveness_bound(&self, lower_bound: f64) -> Duration {
        self.bound.unwrap_or_else(|| {
            Duration::from_secs(180) + Duration::from_secs_f64(20.0 * lower_bound.max(0.0))
        })
    }

    /// A small scenario with faults drawn from `seed`, for seed sweeps (kept small so a debug
    /// build runs a thousand seeds in a few minutes). Links are slow (0.1–0.8 MB/s up) so that
    /// the transfer takes seconds and the faults, spread over the lower bound, hit it midway.
    pub fn faulty(seed: u64) -> Self {
        Self::faulty_sized(seed, SweepSize::Small)
    }

    /// Like [`Scenario::faulty`], with fleets and contents of the given size.
    ///
    /// Besides the faults, each seed declares its rates in one of the [`RatesMode`]s (a third
    /// each) and a fifth of the seeds change a tenth of the agents' upload (by a factor of
    /// 0.25–2, log-uniform, at 0–1 × `T*`). These come from their own stream of the seed, so the
    /// fleets and faults of every seed are what they were before rates were drawn.
    pub fn faulty_sized(seed: u64, size: SweepSize) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0xFA_17);
        let (agents, chunks) = match size {
            SweepSize::Small => (r.gen_range(3..=12), r.gen_range(8..=48)),
            SweepSize::Medium => (r.gen_range(13..=64), r.gen_range(32..=128)),
        };
        let mut s = Scenario::new(agents, seed);
        s.chunks = chunks;
        s.content_bytes = s.chunks as u64 * 64 * 1024;
        s.up_min = 100_000;
        s.up_max = 800_000;
        s.down_min = 800_000;
        s.down_max = 6_400_000;
        s.manager_up = 2_000_000;
        s.manager_down = 10_000_000;
        s.segments = if r.gen_bool(0.4) {
            r.gen_range(1..=3)
        } else {
            0
        };
        s.wan_up = 2_000_000;
        s.wan_down = 4_000_000;
        s.loss = if r.gen_bool(0.3) { 0.01 } else { 0.0 };
        s.leaf_fraction = if r.gen_bool(0.2) { 0.3 } else { 0.0 };
        s.window = r.gen_range(1..=8);
        s.max_peers = r.gen_range(2..=8);
        s.max_stripes = r.gen_range(1..=8);
        // Longer than any outage below plus the agents' reconnection backoff, so that no live
        // agent is legitimately given up (which would void the liveness invariant).
        s.give_up_after = Duration::from_secs(120);
        let f = &mut s.faults;
        f.drop_rate = if r.gen_bool(0.4) { 0.005 } else { 0.0 };
        f.serial_drops = r.gen_bool(0.5);
        f.partitions = r.gen_range(0..=2);
        f.crashes = r.gen_range(0..=3);
        f.permanent_crashes = u32::from(r.gen_bool(0.15));
        f.malicious = u32::from(r.gen_bool(0.3));
        f.manager_restarts = r.gen_range(0..=2);
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x8A7E_5EED);
        s.rates = RatesMode::ALL[r.gen_range(0..RatesMode::ALL.len())];
        if r.gen_bool(0.2) {
            s.rate_change = Some(RateChange {
                factor: 0.25 * 8f64.powf(r.gen_range(0.0..=1.0)),
                at_fraction: r.gen_range(0.0..=1.0),
            });
        }
        s
    }

    /// Virtual bytes per chunk.
    pub fn virtual_chunk(&self) -> u64 {
        (self.content_bytes / self.chunks.max(1) as u64).max(1)
    }

    /// Draws every agent's link and the fault schedule from the seed.
    pub fn build(&self) -> Built {
        let mut r = ChaCha8Rng::seed_from_u64(self.seed);
        let log_uniform = |r: &mut ChaCha8Rng, lo: u64, hi: u64| -> u64 {
            let (lo, hi) = (lo.max(1) as f64, hi.max(lo.max(1)) as f64);
            (lo * (hi / lo).powf(r.gen_range(0.0..=1.0))).round() as u64
        };
        let mut agents: Vec<AgentParams> = (0..self.agents)
            .map(|i| {
                let up = log_uniform(&mut r, self.up_min, self.up_max);
                let down = log_uniform(&mut r, self.down_min, self.down_max);
                let lat = r.gen_range(
                    self.latency_min.as_nanos() as u64..=self.latency_max.as_nanos().max(1) as u64,
                );
                let loss = if self.loss > 0.0 {
                    r.gen_range(0.0..=self.loss)
                } else {
                    0.0
                };
                let segment = (self.segments > 0).then(|| (i as u32) % self.segments);
                AgentParams {
                    up,
                    down,
                    declared_up: up,
                    declared_down: down,
                    latency: Duration::from_nanos(lat),
                    loss,
                    segment,
                    serves: true,
                    malicious: false,
                }
            })
            .collect();
        let leaves = (self.leaf_fraction * self.agents as f64).round() as usize;
        for i in pick(&mut r, self.agents, leaves) {
            agents[i].serves = false;
        }

        self.declare_rates(&mut agents);

        let lower_bound = lower_bound(
            self.content_bytes,
            self.manager_up,
            agents.iter().map(|a| (a.up, a.down)),
        );
        let rate_change = self.rate_change.map(|c| {
            let mut r = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5107_C4A6);
            let count = ((RATE_CHANGE_SHARE * self.agents as f64).round() as usize).max(1);
            let changed = pick(&mut r, self.agents, count);
            let at = Duration::from_secs_f64(c.at_fraction * lower_bound.max(0.0));
            let after = lower_bound_after_change(
                self.content_bytes,
                self.manager_up,
                agents.iter().enumerate().map(|(k, a)| {
                    let changed = changed.binary_search(&k).is_ok();
                    (
                        a.up,
                        a.down,
                        if changed {
                            scaled(a.up, c.factor)
                        } else {
                            a.up
                        },
                    )
                }),
                at.as_secs_f64(),
            );
            ScheduledRateChange {
                agents: changed,
                at,
                factor: c.factor,
                lower_bound_after: after,
            }
        });
        let f = &self.faults;
        let window = f
            .window
            .unwrap_or_else(|| Duration::from_secs_f64(lower_bound.max(0.5)));
        let at = |r: &mut ChaCha8Rng| {
            Duration::from_secs_f64(r.gen_range(0.0..=1.0) * window.as_secs_f64())
        };
        let mut faults = Vec::new();
        for _ in 0..f.manager_restarts {
            faults.push(Fault::ManagerRestart {
                at: at(&mut r),
                downtime: Duration::from_millis(r.gen_range(100..=8_000)),
            });
        }
        let crashable = pick(
            &mut r,
            self.agents,
            (f.crashes + f.permanent_crashes + f.malicious) as usize,
        );
        let mut it = crashable.into_iter();
        for _ in 0..f.crashes {
            if let Some(agent) = it.next() {
                faults.push(Fault::Crash {
                    agent,
                    at: at(&mut r),
                    restart_after: Some(Duration::from_millis(r.gen_range(50..=15_000))),
                });
            }
        }
        for _ in 0..f.permanent_crashes {
            if let Some(agent) = it.next() {
                faults.push(Fault::Crash {
                    agent,
                    at: at(&mut r),
                    restart_after: None,
                });
            }
        }
        for _ in 0..f.malicious {
            if let Some(agent) = it.next() {
                agents[agent].malicious = true;
            }
        }
        for _ in 0..f.partitions {
            let members: Vec<usize> = if self.segments > 0 {
                let seg = r.gen_range(0..self.segments);
                (0..self.agents)
                    .filter(|&i| agents[i].segment == Some(seg))
                    .collect()
            } else {
                let n = (self.agents / 10).max(1);
                pick(&mut r, self.agents, n)
            };
            faults.push(Fault::Partition {
                members,
                at: at(&mut r),
                duration: Duration::from_millis(r.gen_range(500..=30_000)),
            });
        }
        if f.drop_rate > 0.0 {
            let from = at(&mut r);
            faults.push(Fault::Drops {
                from,
                until: from + window,
                rate: f.drop_rate,
                serial: f.serial_drops,
            });
        }
        faults.sort_by_key(|f| f.start());
        // From a stream of their own: the fleet and the faults stay those of the seed.
        let late = self.late.map(|l| {
            let mut r = ChaCha8Rng::seed_from_u64(self.seed ^ 0x1A7E_501B);
            ScheduledLateJoin {
                agents: pick(&mut r, self.agents, (l.count as usize).min(self.agents)),
                at: Duration::from_secs_f64(l.at_fraction * lower_bound.max(0.0)),
            }
        });
        Built {
            agents,
            faults,
            lower_bound,
            rate_change,
            late,
        }
    }

    /// Sets every agent's declared rates from its true ones, as [`Scenario::rates`] says.
    fn declare_rates(&self, agents: &mut [AgentParams]) {
        let mut r = ChaCha8Rng::seed_from_u64(self.seed ^ 0xDEC1_A4ED);
        for a in agents {
            (a.declared_up, a.declared_down) = match self.rates {
                RatesMode::Declared => (a.up, a.down),
                RatesMode::Blind => (0, 0),
                RatesMode::Wrong => {
                    let up = wrong_factor(&mut r);
                    let down = wrong_factor(&mut r);
                    (scaled(a.up, up), scaled(a.down, down))
                }
            };
        }
    }
}

/// A factor log-uniform in [`WRONG_FACTOR_MIN`]`..=`[`WRONG_FACTOR_MAX`].
fn wrong_factor(r: &mut ChaCha8Rng) -> f64 {
    WRONG_FACTOR_MIN * (WRONG_FACTOR_MAX / WRONG_FACTOR_MIN).powf(r.gen_range(0.0..=1.0))
}

/// `rate × factor`, rounded, at least 1 byte/s.
pub fn scaled(rate: u64, factor: f64) -> u64 {
    ((rate as f64 * factor).round() as u64).max(1)
}

/// `n` distinct indices out of `0..len`, drawn from `r`, in ascending order.
fn pick(r: &mut ChaCha8Rng, len: usize, n: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..len).collect();
    let n = n.min(len);
    for i in 0..n {
        let j = r.gen_range(i..len);
        all.swap(i, j);
    }
    let mut out = all[..n].to_vec();
    out.sort_unstable();
    out
}

/// The Kumar–Ross lower bound in seconds: `max(S/u_s, S/d_min, N·S/(u_s + Σu_i))`.
pub fn lower_bound(content: u64, manager_up: u64, agents: impl Iterator<Item = (u64, u64)>) -> f64 {
    let s = content as f64;
    let (mut n, mut sum_up, mut d_min) = (0usize, 0f64, f64::INFINITY);
    for (up, down) in agents {
        n += 1;
        sum_up += up as f64;
        d_min = d_min.min(down as f64);
    }
    if n == 0 {
        return 0.0;
    }
    let us = manager_up.max(1) as f64;
    (s / us).max(s / d_min).max(n as f64 * s / (us + sum_up))
}

/// The Kumar–Ross bound when uploads change at `change_at` seconds after the start, from
/// agents given as `(up before, down, up after)`: the manager and download terms as in
/// [`lower_bound`], and the aggregate term piecewise — the fleet uploads at `u_s + Σu` until
/// `t_c` and at `u_s + Σu'` after, so the `T` solving `(u_s+Σu)·t_c + (u_s+Σu')·(T−t_c) = N·S`
/// when that `T` is past `t_c`, else `N·S/(u_s+Σu)` (the change comes too late to matter).
pub fn lower_bound_after_change(
    content: u64,
    manager_up: u64,
    agents: impl Iterator<Item = (u64, u64, u64)>,
    change_at: f64,
) -> f64 {
    let s = content as f64;
    let (mut n, mut sum_before, mut sum_after, mut d_min) = (0usize, 0f64, 0f64, f64::INFINITY);
    for (before, down, after) in agents {
        n += 1;
        sum_before += before as f64;
        sum_after += after as f64;
        d_min = d_min.min(down as f64);
    }
    if n == 0 {
        return 0.0;
    }
    let us = manager_up.max(1) as f64;
    let total = n as f64 * s;
    let (rate_before, rate_after) = (us + sum_before, us + sum_after);
    let aggregate = if total <= rate_before * change_at {
        total / rate_before
    } else {
        change_at + (total - rate_before * change_at) / rate_after
    };
    (s / us).max(s / d_min).max(aggregate)
}

/// Which term of the lower bound binds: `"manager"`, `"download"` or `"aggregate"`.
pub fn binding_term(content: u64, manager_up: u64, agents: &[AgentParams]) -> &'static str {
    let s = content as f64;
    let us = manager_up.max(1) as f64;
    let d_min = agents.iter().map(|a| a.down).min().unwrap_or(1) as f64;
    let agg = agents.len() as f64 * s / (us + agents.iter().map(|a| a.up as f64).sum::<f64>());
    let (m, d) = (s / us, s / d_min);
    if agg >= m && agg >= d {
        "aggregate"
    } else if d >= m {
        "download"
    } else {
        "manager"
    }
}

/// One agent's link and role, as drawn for a run.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentParams {
    /// True upload at the start, bytes/s (what the link model serves at).
    pub up: u64,
    /// True download, bytes/s.
    pub down: u64,
    /// The upload the agent declares in its `LinkInfo` (0 = unknown), bytes/s.
    pub declared_up: u64,
    /// The download the agent declares in its `LinkInfo` (0 = unknown), bytes/s.
    pub declared_down: u64,
    /// One-way access latency.
    pub latency: Duration,
    /// Per-frame loss probability.
    pub loss: f64,
    /// LAN segment behind a WAN link, if any.
    pub segment: Option<u32>,
    /// Whether it serves peers.
    pub serves: bool,
    /// Whether it corrupts every chunk it serves.
    pub malicious: bool,
}

/// A fault, timed from the start of the job.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Agent `agent` crashes at `at`; it restarts over the same store after `restart_after`.
    Crash {
        /// The agent's index.
        agent: usize,
        /// When.
        at: Duration,
        /// Downtime; `None` = it never comes back.
        restart_after: Option<Duration>,
    },
    /// `members` are cut off from everyone else (the manager included) from `at` for `duration`.
    Partition {
        /// The agents' indices.
        members: Vec<usize>,
        /// When.
        at: Duration,
        /// How long.
        duration: Duration,
    },
    /// The manager crashes at `at` and restarts after `downtime` with a higher epoch.
    ManagerRestart {
        /// When.
        at: Duration,
        /// How long it is down.
        downtime: Duration,
    },
    /// Frames sent between `from` and `until` are dropped with probability `rate`.
    Drops {
        /// Start.
        from: Duration,
        /// End.
        until: Duration,
        /// Probability per frame.
        rate: f64,
        /// Serial-link semantics (see [`FaultConfig::serial_drops`]).
        serial: bool,
    },
}

impl Fault {
    /// When the fault begins.
    pub fn start(&self) -> Duration {
        match self {
            Fault::Crash { at, .. }
            | Fault::Partition { at, .. }
            | Fault::ManagerRestart { at, .. } => *at,
            Fault::Drops { from, .. } => *from,
        }
    }

    /// When the fault has healed (`None` for a permanent crash: it never heals, the agent is
    /// no longer live).
    pub fn end(&self) -> Duration {
        match self {
            Fault::Crash {
                at, restart_after, ..
            } => *at + restart_after.unwrap_or_default(),
            Fault::Partition { at, duration, .. } => *at + *duration,
            Fault::ManagerRestart { at, downtime } => *at + *downtime,
            Fault::Drops { until, .. } => *until,
        }
    }
}

/// A scenario drawn from its seed: every agent's link, the faults, and the lower bound.
#[derive(Clone, Debug)]
pub struct Built {
    /// Per agent.
    pub agents: Vec<AgentParams>,
    /// Faults in order of their start.
    pub faults: Vec<Fault>,
    /// Kumar–Ross lower bound `T*`, seconds (with every agent's upload as at the start).
    pub lower_bound: f64,
    /// The upload change, if the scenario has one.
    pub rate_change: Option<ScheduledRateChange>,
    /// The late starters, if the scenario has some.
    pub late: Option<ScheduledLateJoin>,
}

/// A [`LateJoin`] as drawn for a run: who starts late, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledLateJoin {
    /// The late agents, ascending.
    pub agents: Vec<usize>,
    /// When they start, after the job starts.
    pub at: Duration,
}

/// A [`RateChange`] as drawn for a run: whose upload changes, when, and the bound after it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledRateChange {
    /// The agents whose upload changes, ascending.
    pub agents: Vec<usize>,
    /// When, after the job starts.
    pub at: Duration,
    /// Their upload is multiplied by this.
    pub factor: f64,
    /// The piecewise lower bound with the change (see [`lower_bound_after_change`]), seconds.
    pub lower_bound_after: f64,
}

impl Built {
    /// The modelled network of this fleet: the manager's link first, then each agent's, and the segments' WAN links.
    pub fn network(&self, scenario: &Scenario) -> Net {
        let mut links = vec![Link {
            up: scenario.manager_up,
            down: scenario.manager_down,
            latency: scenario.manager_latency,
            segment: None,
        }];
        links.extend(self.agents.iter().map(|a| Link {
            up: a.up,
            down: a.down,
            latency: a.latency,
            segment: a.segment,
        }));
        let wans = (0..scenario.segments)
            .map(|_| Wan {
                up: scenario.wan_up,
                down: scenario.wan_down,
                latency: scenario.wan_latency,
            })
            .collect();
        Net::new(links, wans)
    }

    /// When the last fault has healed (relative to the job start).
    pub fn healed_at(&self) -> Duration {
        let late = self.late.as_ref().map(|l| l.at).unwrap_or_default();
        self.faults
            .iter()
            .map(Fault::end)
            .max()
            .unwrap_or_default()
            .max(late)
    }

    /// The manager's total downtime over its restarts.
    pub fn manager_downtime(&self) -> Duration {
        self.faults
            .iter()
            .map(|f| match f {
                Fault::ManagerRestart { downtime, .. } => *downtime,
                _ => Duration::ZERO,
            })
            .sum()
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn same_seed_same_fleet() {
        let a = Scenario::faulty(42).build();
        let b = Scenario::faulty(42).build();
        assert_eq!(a.agents, b.agents);
        assert_eq!(a.faults, b.faults);
    }

    #[test]
    fn default_is_heterogeneous_and_aggregate_bound() {
        let s = Scenario::new(1000, 1);
        let b = s.build();
        let min = b.agents.iter().map(|a| a.up).min().unwrap();
        let max = b.agents.iter().map(|a| a.up).max().unwrap();
        assert!(max >= 4 * min, "rates differ {min}..{max}");
        assert_eq!(
            binding_term(s.content_bytes, s.manager_up, &b.agents),
            "aggregate"
        );
        assert_eq!(s.virtual_chunk(), 32 * 1024);
        assert_eq!(crate::content::REAL_CHUNK, 256);
    }

    #[test]
    fn lower_bound_terms() {
        // 10 agents of 1 MB/s up, 10 MB/s down; manager 2 MB/s; 12 MB: max(6, 1.2, 10).
        let t = lower_bound(
            12_000_000,
            2_000_000,
            (0..10).map(|_| (1_000_000, 10_000_000)),
        );
        assert!((t - 10.0).abs() < 1e-9);
    }

    #[test]
    fn wrong_factors_stay_in_range_and_follow_the_seed() {
        let mut s = Scenario::new(500, 3);
        s.rates = RatesMode::Wrong;
        let a = s.build();
        let factor = |declared: u64, true_rate: u64| declared as f64 / true_rate as f64;
        let (mut below, mut above) = (false, false);
        for p in &a.agents {
            for f in [factor(p.declared_up, p.up), factor(p.declared_down, p.down)] {
                assert!(
                    (WRONG_FACTOR_MIN - 1e-6..=WRONG_FACTOR_MAX + 1e-6).contains(&f),
                    "{f}"
                );
                below |= f < 0.5;
                above |= f > 2.0;
            }
        }
        assert!(below && above, "the factors spread over the range");
        assert_ne!(
            a.agents[0].declared_up as f64 / a.agents[0].up as f64,
            a.agents[0].declared_down as f64 / a.agents[0].down as f64,
            "up and down are drawn independently"
        );
        // Same seed, same factors; the true links are those of declared rates.
        assert_eq!(s.build().agents, a.agents);
        s.rates = RatesMode::Declared;
        let declared = s.build();
        for (w, d) in a.agents.iter().zip(&declared.agents) {
            assert_eq!((w.up, w.down, w.latency), (d.up, d.down, d.latency));
            assert_eq!((d.declared_up, d.declared_down), (d.up, d.down));
        }
        assert_eq!(a.lower_bound, declared.lower_bound);
        // Another seed, other factors.
        s.rates = RatesMode::Wrong;
        s.seed = 4;
        let other = s.build();
        assert_ne!(
            other
                .agents
                .iter()
                .map(|p| factor(p.declared_up, p.up))
                .collect::<Vec<_>>(),
            a.agents
                .iter()
                .map(|p| factor(p.declared_up, p.up))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn blind_declares_nothing() {
        let mut s = Scenario::new(50, 1);
        s.rates = RatesMode::Blind;
        let b = s.build();
        assert!(
            b.agents
                .iter()
                .all(|a| a.declared_up == 0 && a.declared_down == 0 && a.up > 0)
        );
    }

    #[test]
    fn modes_and_rate_changes_parse() {
        for m in RatesMode::ALL {
            assert_eq!(m.name().parse::<RatesMode>(), Ok(m));
        }
        assert!("guessed".parse::<RatesMode>().is_err());
        assert_eq!(
            "0.5@0.33".parse::<RateChange>(),
            Ok(RateChange {
                factor: 0.5,
                at_fraction: 0.33
            })
        );
        for bad in ["0.5", "0@0.5", "-1@0.5", "x@1", "0.5@-1", "0.5@"] {
            assert!(bad.parse::<RateChange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn piecewise_bound() {
        // 10 agents of 1 MB/s up, 10 MB/s down; manager 2 MB/s; 12 MB: T* = 10 s (aggregate).
        let (s, us) = (12_000_000, 2_000_000);
        let fleet = |after: u64| (0..10).map(move |_| (1_000_000, 10_000_000, after));
        let t_star = lower_bound(s, us, (0..10).map(|_| (1_000_000, 10_000_000)));
        // A change at or after T* changes nothing.
        for at in [10.0, 12.0, 100.0] {
            let t = lower_bound_after_change(s, us, fleet(500_000), at);
            assert!((t - t_star).abs() < 1e-9, "{t} at {at}");
        }
        // Unchanged rates: T* whenever the change comes.
        let t = lower_bound_after_change(s, us, fleet(1_000_000), 3.0);
        assert!((t - t_star).abs() < 1e-9);
        // Every upload halves at 2 s: 12 MB/s × 2 s, then 7 MB/s for the remaining 96 MB.
        let t = lower_bound_after_change(s, us, fleet(500_000), 2.0);
        assert!((t - (2.0 + 96.0 / 7.0)).abs() < 1e-9, "{t}");
        // The earlier the halving, the longer.
        let later = lower_bound_after_change(s, us, fleet(500_000), 6.0);
        assert!(t > later && later > t_star, "{t} {later}");
        // The manager and download terms are kept.
        let slow_down = (0..10).map(|_| (1_000_000, 100_000, 500_000));
        assert!((lower_bound_after_change(s, us, slow_down, 2.0) - 120.0).abs() < 1e-9);
    }

    #[test]
    fn a_rate_change_halving_early_raises_the_bound() {
        let mut s = Scenario::new(200, 5);
        s.rate_change = Some(RateChange {
            factor: 0.5,
            at_fraction: 0.1,
        });
        let b = s.build();
        let c = b.rate_change.as_ref().expect("scheduled");
        assert_eq!(c.agents.len(), 20);
        assert!(c.agents.windows(2).all(|w| w[0] < w[1]));
        assert!((c.at.as_secs_f64() - 0.1 * b.lower_bound).abs() < 1e-6);
        assert!(c.lower_bound_after > b.lower_bound * 1.01, "{c:?}");
        assert_eq!(s.build().rate_change, b.rate_change, "follows the seed");
        // After T*, the bound is T*; one agent at least, however small the fleet.
        s.rate_change = Some(RateChange {
            factor: 0.5,
            at_fraction: 1.5,
        });
        let late = s.build();
        let c = late.rate_change.expect("scheduled");
        assert!((c.lower_bound_after - late.lower_bound).abs() < 1e-9);
        s.agents = 3;
        assert_eq!(s.build().rate_change.expect("scheduled").agents.len(), 1);
    }

    #[test]
    fn sweeps_draw_every_rates_mode_without_changing_the_fleets() {
        let modes: Vec<RatesMode> = (0..60).map(|seed| Scenario::faulty(seed).rates).collect();
        for m in RatesMode::ALL {
            let n = modes.iter().filter(|&&x| x == m).count();
            assert!((10..=30).contains(&n), "{m:?}: {n} of 60");
        }
        assert!((0..60).any(|seed| Scenario::faulty(seed).rate_change.is_some()));
        // The rates mode is drawn apart: the same seed's true links are those of declared rates.
        let seed = (0..60)
            .find(|&s| modes[s as usize] == RatesMode::Wrong)
            .unwrap();
        let mut s = Scenario::faulty(seed);
        let wrong = s.build();
        s.rates = RatesMode::Declared;
        s.rate_change = None;
        let declared = s.build();
        assert_eq!(wrong.faults, declared.faults);
        assert!(
            wrong
                .agents
                .iter()
                .zip(&declared.agents)
                .all(|(w, d)| (w.up, w.down, w.serves) == (d.up, d.down, d.serves))
        );
    }
}
