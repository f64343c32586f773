//! The Baton run: real [`Agent`]s and the real manager [`Engine`] over the link model.
//!
//! One process, one simulated clock (`now`), one event queue ordered by
//! time (a [`crate::queue::EventQueue`]; equal times pop in a fixed order). Each step pops the earliest event, feeds it to the node
//! it concerns (`handle_*` with `now`), then drains that node's outputs in the
//! documented order — for an agent `poll_transmit` then `poll_event`, for the
//! engine `poll_persist`, `poll_transmit`, `poll_event` — turning frames into
//! link-model events, and re-arms the node's timer at its `poll_timeout`.
//! Nothing reads a wall clock; every random choice (content, links, loss,
//! faults) comes from the scenario's seed, so the same seed replays exactly.
//!
//! What is real: the agents' and the engine's state machines, every message
//! encoded and decoded as on the wire (plaintext frames from `poll_transmit`
//! fed to `handle_frame`), manifests and Welcome certificates signed with
//! Ed25519, every chunk verified against the Merkle root by the agent. What is
//! modelled: the Noise handshake and encryption are skipped (a connection is up
//! 1.5 round trips after it is asked for; a frame is delivered as sent, in
//! order per connection and direction), chunk payloads are 256 real bytes
//! charged by the link model at their virtual size (see [`crate::content`]),
//! and the network is [`crate::net`]'s.
//!
//! The manager node is what `baton serve` does around its engine: it drives
//! the real manager session ([`AgentSession`]) on each agent connection, which
//! answers the first `Report` with `Welcome` and says where each message goes;
//! the node carries that out (reports and agent messages to the engine,
//! segment report pages to an [`Assembler`], `ChunkRequest`s answered from the
//! true content, a later session of the same agent taking over the earlier
//! one), keeps the persisted records, and after a restart builds a new engine
//! with the next epoch and resumes the job from those records.
//!
//! Each agent's `LinkInfo` carries the rates it *declares* (the scenario's
//! [`RatesMode`](crate::scenario::RatesMode): true, unknown or wrong), while
//! the link model serves at its true ones; a scenario's rate change sets the
//! chosen agents' upload ports to their new rate at its time, and they keep
//! declaring what they did. The manager's own upload is always known.
//!
//! Invariants are checked as the run goes (see [`Simulation::violations`]): after
//! every event, no store holds a chunk that is not the true one; every chunk
//! an honest agent sends is true and verified in its store; an agent that
//! completes, or that the engine confirms, holds every chunk; the engine
//! persists before it transmits; the engine demotes no honest agent as a
//! trouble reporter (agents here report only what they saw); and at the end
//! every live agent must have confirmed within a bound after the last fault
//! healed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use baton_agent_core::agent::{Agent, AgentConfig, ConnId, Direction, Event, PeerInfo};
use baton_manager_core::engine::{
    Engine, EngineConfig, EngineEvent, JobSpec, ParticipantState, Persist, Targets,
};
use baton_manager_core::planner::Policy;
use baton_manager_core::segments::Assembler;
use baton_manager_core::session::{AgentSession, SessionConfig, SessionEvent};
use baton_protocol::identity::Identity;
use baton_protocol::message::{CHUNK_OVERHEAD, Refusal, Trouble};
use baton_protocol::{
    AgentId, Digest, LinkInfo, MAX_CHUNK_SIZE, Message, Name, PeerAddr, PublicKey,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::content::{REAL_CHUNK, Truth};
use crate::net::{MANAGER, Net, Route, Step};
use crate::queue::EventQueue;
use crate::scenario::{Built, Fault, Scenario, scaled};
use crate::store::RamStore;

/// The agent type the simulator runs: the Linux agent's shape (64 peer connections).
pub type SimAgent = Agent<RamStore, 2, 64, 512>;

/// The job every run distributes.
pub const JOB: u64 = 1;
/// When the job starts (agents connect from time zero).
pub const JOB_START: Duration = Duration::from_secs(1);
/// A connection attempt to an unreachable peer fails after this long (the link layer's).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection across a partition breaks after this long (TCP user timeout / keepalive).
const USER_TIMEOUT: Duration = Duration::from_secs(10);
/// Least retransmission timeout for a lost frame.
const RTO_MIN: Duration = Duration::from_millis(200);
/// The agent driver's first reconnection backoff (doubling up to [`BACKOFF_MAX`]).
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// The agent driver's longest reconnection backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A manager session that lasted this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// Events at one instant, at most, before the run is declared stalled (a livelock).
const STALL_LIMIT: u64 = 5_000_000;
/// Outputs drained from one node after one input, at most (a node that never runs dry is a bug).
const DRAIN_LIMIT: usize = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    /// A frame reaches its next port.
    Hop(u32),
    /// A frame arrives.
    Deliver(u32),
    AgentTimer {
        agent: u32,
        inc: u32,
    },
    EngineTimer {
        inc: u32,
    },
    /// An agent dials the manager.
    Dial {
        agent: u32,
        inc: u32,
    },
    /// The manager session's handshake is done.
    ManagerUp {
        conn: u32,
        serial: u32,
    },
    /// A manager-side agent session's timer (its first-report deadline).
    SessionTimer {
        conn: u32,
        serial: u32,
    },
    /// A peer connection attempt ends (success or failure).
    Connect(u32),
    /// One end learns its connection closed.
    Closed {
        conn: u32,
        serial: u32,
        side: u8,
    },
    StartJob,
    FaultStart(u32),
    FaultEnd(u32),
    /// Connections across a partition break (if it is still there).
    PartitionTimeout(u32),
    /// The scenario's rate change: the chosen agents' uploads take their new rate.
    RateChange,
}

/// One end of a connection: a node (0 = manager), the agent's `ConnId`, the node's incarnation.
#[derive(Clone, Copy, Debug)]
struct End {
    node: usize,
    conn_id: u32,
    inc: u32,
}

#[derive(Debug)]
struct Conn {
    serial: u32,
    open: bool,
    ends: [End; 2],
    seq_out: [u64; 2],
    seq_in: [u64; 2],
    /// Frames that arrived before an earlier one of their direction, by sequence.
    stash: [BTreeMap<u64, u32>; 2],
    /// Ends not yet told the connection closed.
    unnotified: u8,
    /// When it closed (frames on the wire by then still arrive, ahead of the reset).
    closed_at: Duration,
    /// Which ends have been told it closed (nothing more is delivered to them).
    notified: [bool; 2],
    /// Per direction: a frame went missing (serial drops), so the next one fails to decrypt.
    poisoned: [bool; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drop {
    No,
    /// The connection breaks (TCP): both ends learn it when the frame would have arrived.
    Reset,
    /// Lost on a serial link: the next frame in this direction fails to decrypt.
    Serial,
}

#[derive(Debug)]
struct Frame {
    conn: u32,
    serial: u32,
    dir: u8,
    seq: u64,
    size: u64,
    extra: Duration,
    route: Route,
    drop: Drop,
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct Attempt {
    from: usize,
    inc: u32,
    to: Option<usize>,
    peer: AgentId,
}

#[derive(Debug)]
struct AgentNode {
    id: AgentId,
    key: PublicKey,
    config: AgentConfig,
    malicious: bool,
    agent: Option<Box<SimAgent>>,
    /// The store while the agent is down.
    parked: Option<RamStore>,
    inc: u32,
    /// `(ConnId, connection)` of its peer connections.
    conns: Vec<(u32, u32)>,
    next_conn_id: u32,
    /// The manager session (dialing or up).
    mgr_conn: Option<u32>,
    backoff: Duration,
    session_since: Duration,
    timer: Option<Duration>,
    /// Never comes back.
    dead: bool,
    complete_at: Option<Duration>,
    confirmed_at: Option<Duration>,
    violations_seen: usize,
}

impl AgentNode {
    fn store(&self) -> Option<&RamStore> {
        self.agent
            .as_ref()
            .map(|a| a.store())
            .or(self.parked.as_ref())
    }
}

#[derive(Debug, Default)]
struct StoredJob {
    epoch: u32,
    order: Vec<AgentId>,
    states: HashMap<AgentId, ParticipantState>,
    /// The last measured upload of each participant that has one.
    measured: BTreeMap<AgentId, u64>,
    finished: bool,
}

#[derive(Debug)]
struct ManagerNode {
    /// What every agent session shares (the identity and publishers of the `Welcome`).
    session_config: Arc<SessionConfig>,
    engine: Option<Engine>,
    config: EngineConfig,
    epoch: u32,
    inc: u32,
    /// Per agent: the connection of its registered (welcomed, current) session.
    sessions: Vec<Option<u32>>,
    /// The session of each manager connection that is still read, by connection (with its serial).
    live: HashMap<u32, (u32, AgentSession)>,
    /// Segment report assembly (the server's registry does it there).
    segments: Assembler,
    /// Per agent: the segment it named in its latest report.
    reported: Vec<Option<Name>>,
    timer: Option<Duration>,
    spec: JobSpec,
    stored: BTreeMap<u64, StoredJob>,
}

/// Counters of what happened in a run, for the summary and for diagnosis.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Events processed.
    pub events: u64,
    /// Most events pending at once.
    pub max_queue: u64,
    /// Frames sent (all kinds).
    pub frames: u64,
    /// Frames sent, by message variant index (`Report` = 0 … `Pong` = 15).
    pub frames_by_kind: [u64; 16],
    /// Chunk frames sent by agents.
    pub peer_chunks: u64,
    /// Chunk frames sent by the manager.
    pub manager_chunks: u64,
    /// Chunk payload bytes the manager served (virtual).
    pub origin_bytes: u64,
    /// Frames lost to the link's loss rate (retransmitted).
    pub lost: u64,
    /// Frames dropped by the drop fault.
    pub dropped: u64,
    /// Frames written to a connection that had already closed.
    pub stale_frames: u64,
    /// Errors the engine returned for agents' messages.
    pub engine_errors: u64,
    /// `PeerTrouble` events raised by agents.
    pub peer_trouble: u64,
    /// Of those, bad chunks (a malicious or broken source caught by verification).
    pub bad_chunks: u64,
    /// Agents' `Ignored` events, by reason.
    pub ignored: BTreeMap<&'static str, u64>,
    /// Participants the engine failed or gave up.
    pub participant_failures: u64,
    /// Participants the engine demoted as trouble reporters (none is honest: a violation).
    pub reporters_demoted: u64,
    /// `PeerTrouble` reports the engine ignored: the reporter was not (or no longer) assigned
    /// to the peer, as far as the engine knew.
    pub unfounded_reports: u64,
    /// Agents that gave up a job.
    pub agent_failures: u64,
    /// Manager restarts done.
    pub manager_restarts: u64,
    /// Agent crashes done.
    pub crashes: u64,
    /// Partitions done.
    pub partitions: u64,
    /// Timers an agent asked for in the past right after handling its timeout (spin guard).
    pub timer_spins: u64,
    /// Each time the engine re-planned a job on measured rates: what it then believed of
    /// the agents' uploads, against their true ones (not merged over a sweep).
    pub replans: Vec<BelievedRates>,
}

/// The upload rates a re-plan used, against the agents' true ones at the start: quantiles of
/// believed ÷ true over the agents it measured (1.0 = exact, below = underestimated).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BelievedRates {
    /// Simulated time of the re-plan.
    pub at: Duration,
    /// Agents whose rate it used.
    pub measured: usize,
    /// Believed ÷ true at the 10th, 50th and 90th percentile.
    pub p10_p50_p90: [f64; 3],
}

impl Stats {
    /// Adds `other`'s counters to these (for sweeps).
    pub fn merge(&mut self, other: &Stats) {
        self.events += other.events;
        self.max_queue = self.max_queue.max(other.max_queue);
        self.frames += other.frames;
        for (a, b) in self.frames_by_kind.iter_mut().zip(other.frames_by_kind) {
            *a += b;
        }
        self.peer_chunks += other.peer_chunks;
        self.manager_chunks += other.manager_chunks;
        self.origin_bytes += other.origin_bytes;
        self.lost += other.lost;
        self.dropped += other.dropped;
        self.stale_frames += other.stale_frames;
        self.engine_errors += other.engine_errors;
        self.peer_trouble += other.peer_trouble;
        self.bad_chunks += other.bad_chunks;
        for (k, v) in &other.ignored {
            *self.ignored.entry(k).or_default() += v;
        }
        self.participant_failures += other.participant_failures;
        self.reporters_demoted += other.reporters_demoted;
        self.unfounded_reports += other.unfounded_reports;
        self.agent_failures += other.agent_failures;
        self.manager_restarts += other.manager_restarts;
        self.crashes += other.crashes;
        self.partitions += other.partitions;
        self.timer_spins += other.timer_spins;
    }
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Agents in the fleet.
    pub agents: usize,
    /// Agents the engine confirmed.
    pub confirmed: usize,
    /// Per agent: seconds from the job's start until it held every chunk (`None` = never).
    pub completion: Vec<Option<f64>>,
    /// Kumar–Ross lower bound `T*`, seconds.
    pub lower_bound: f64,
    /// Simulated time when the run stopped, seconds after the job's start.
    pub ended_at: f64,
    /// Invariant violations (empty when the run is correct).
    pub violations: Vec<String>,
    /// Counters.
    pub stats: Stats,
    /// Virtual bytes each node uploaded (index 0 is the manager, `k + 1` agent `k`).
    pub uploaded: Vec<u64>,
    /// Upload rate of each node at the start, bytes/s (same indexing).
    pub up_rates: Vec<u64>,
    /// Seconds each node's upload was busy sending (same indexing): its bytes over the rate
    /// each was sent at, which a rate change makes differ from `uploaded / up_rates`.
    pub upload_seconds: Vec<f64>,
}

impl Outcome {
    /// The last agent's completion time, seconds (over the agents that completed).
    pub fn makespan(&self) -> f64 {
        self.completion
            .iter()
            .flatten()
            .fold(0.0, |a: f64, &b| a.max(b))
    }
}

/// One simulated run of a scenario: the fleet's agents, the manager and the network (see the module documentation).
pub struct Simulation {
    now: Duration,
    queue: EventQueue<Ev>,
    net: Net,
    truth: Arc<Truth>,
    scenario: Scenario,
    built: Built,
    agents: Vec<AgentNode>,
    ids: HashMap<AgentId, usize>,
    manager: ManagerNode,
    /// Per node (the manager first): its incarnation and whether it runs, copied
    /// from `manager` and `agents` so that the check of every frame in flight
    /// reads 8 bytes instead of a whole agent node (a cache miss at 10 000 agents).
    node_state: Vec<(u32, bool)>,
    conns: Vec<Conn>,
    free_conns: Vec<u32>,
    frames: Vec<Option<Frame>>,
    free_frames: Vec<u32>,
    pool: Vec<Vec<u8>>,
    attempts: Vec<Option<Attempt>>,
    free_attempts: Vec<u32>,
    rng: ChaCha8Rng,
    buf: Vec<u8>,
    drops: Option<(f64, bool)>,
    violations: Vec<String>,
    stats: Stats,
    live_unconfirmed: usize,
    deadline: Duration,
    trace: bool,
    /// Node whose every frame is traced.
    watch: Option<usize>,
    same_time: u64,
    /// With `BATON_SIM_CRITICAL`: per `(agent, chunk)`, who delivered it and when.
    arrivals: Option<HashMap<(usize, u32), (usize, Duration)>>,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("now", &self.now)
            .field("agents", &self.agents.len())
            .field("queue", &self.queue.len())
            .finish_non_exhaustive()
    }
}

/// Node index of agent `k`.
fn agent_node(k: usize) -> usize {
    k + 1
}

/// The address agent `k` listens on.
fn addr(k: usize) -> PeerAddr {
    PeerAddr::V4([10, (k >> 16) as u8, (k >> 8) as u8, k as u8], 7000)
}

/// The agent listening on `a`, if it is one of ours.
fn agent_at(a: &PeerAddr) -> Option<usize> {
    match *a {
        PeerAddr::V4([10, x, y, z], 7000) => {
            Some(((x as usize) << 16) | ((y as usize) << 8) | z as usize)
        }
        _ => None,
    }
}

impl Simulation {
    /// Builds the run of `scenario`: agents, links, content, manager, and the fault schedule.
    pub fn new(scenario: &Scenario) -> Self {
        let built = scenario.build();
        let truth = Arc::new(Truth::new(
            scenario.seed,
            scenario.chunks.max(1),
            scenario.virtual_chunk(),
        ));
        let net = built.network(scenario);

        let mut agents = Vec::with_capacity(built.agents.len());
        let mut ids = HashMap::with_capacity(built.agents.len());
        for (k, p) in built.agents.iter().enumerate() {
            let id = AgentId::try_from(format!("a{k:05}").as_str()).expect("short id");
            let mut seed = [0x5A; 32];
            seed[..8].copy_from_slice(&(k as u64).to_le_bytes());
            let key = Identity::from_seed(seed).public();
            let mut config = AgentConfig::new(id.clone());
            config.listen = p.serves.then(|| addr(k));
            config.can_serve = p.serves;
            if let Some(s) = p.segment {
                config.segment = Name::try_from(format!("seg-{s}").as_str()).expect("short name");
                config.site = config.segment.clone();
            }
            config.link = LinkInfo {
                up_bps: p.declared_up,
                down_bps: p.declared_down,
                loss_ppm: (p.loss * 1e6) as u32,
                uptime_s: 0,
            };
            config.window = scenario.window;
            config.max_peers = scenario.max_peers;
            config.roots = [truth.root_key().public()].into_iter().collect();
            let store = RamStore::new(&id, truth.clone());
            ids.insert(id.clone(), k);
            agents.push(AgentNode {
                id,
                key,
                agent: Some(Box::new(Agent::new(config.clone(), store))),
                config,
                malicious: p.malicious,
                parked: None,
                inc: 0,
                conns: Vec::new(),
                next_conn_id: 1,
                mgr_conn: None,
                backoff: BACKOFF_MIN,
                session_since: Duration::ZERO,
                timer: None,
                dead: false,
                complete_at: None,
                confirmed_at: None,
                violations_seen: 0,
            });
        }
        let policy = Policy {
            max_stripes: scenario.max_stripes,
            max_peers_per_source: scenario.max_peers_per_source,
            manager_max_copies: scenario.manager_copies,
            ..Policy::default()
        };
        let spec = JobSpec {
            id: JOB,
            manifest: truth.manifest().clone(),
            targets: Targets::Agents(agents.iter().map(|a| a.id.clone()).collect()),
            policy,
        };
        let config = EngineConfig {
            give_up_after: scenario.give_up_after,
            progress_flush: Duration::from_secs(1),
            manager_up_bps: scenario.manager_up,
            // Agents' reports of received bytes are scaled to the virtual chunk size.
            reported_bytes_per_byte: (truth.virtual_chunk() / u64::from(REAL_CHUNK)).max(1),
            ..EngineConfig::default()
        };
        let n = agents.len();
        let manager = ManagerNode {
            session_config: Arc::new(SessionConfig::new(
                Identity::from_seed([0x4D; 32]),
                [truth.publisher().public()],
            )),
            engine: Some(Engine::new(1, config.clone())),
            config,
            epoch: 1,
            inc: 0,
            sessions: vec![None; n],
            live: HashMap::new(),
            segments: Assembler::new(),
            reported: vec![None; n],
            timer: None,
            spec,
            stored: BTreeMap::new(),
        };
        // A slower upload later lengthens the bound the liveness deadline counts from.
        let slowest_bound = built.rate_change.as_ref().map_or(built.lower_bound, |c| {
            c.lower_bound_after.max(built.lower_bound)
        });
        let deadline = JOB_START + built.healed_at() + scenario.liveness_bound(slowest_bound);
        let mut sim = Simulation {
            now: Duration::ZERO,
            queue: EventQueue::new(),
            net,
            truth,
            scenario: scenario.clone(),
            live_unconfirmed: n,
            built,
            agents,
            ids,
            manager,
            node_state: vec![(0, true); n + 1],
            conns: Vec::new(),
            free_conns: Vec::new(),
            frames: Vec::new(),
            free_frames: Vec::new(),
            pool: Vec::new(),
            attempts: Vec::new(),
            free_attempts: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(scenario.seed ^ 0x11_4E7),
            buf: vec![0u8; MAX_CHUNK_SIZE as usize + CHUNK_OVERHEAD + 64],
            drops: None,
            violations: Vec::new(),
            stats: Stats::default(),
            deadline,
            trace: false,
            watch: None,
            same_time: 0,
            arrivals: std::env::var_os("BATON_SIM_CRITICAL").map(|_| HashMap::new()),
        };
        let late = sim.built.late.clone();
        for k in 0..n {
            // Agents start within the first 100 ms (late ones as long after the job started).
            let mut at = Duration::from_micros(sim.rng.gen_range(0..100_000));
            if let Some(l) = &late
                && l.agents.binary_search(&k).is_ok()
            {
                at += JOB_START + l.at;
            }
            sim.push(
                at,
                Ev::Dial {
                    agent: k as u32,
                    inc: 0,
                },
            );
        }
        sim.push(JOB_START, Ev::StartJob);
        if let Some(c) = &sim.built.rate_change {
            sim.push(JOB_START + c.at, Ev::RateChange);
        }
        for (i, f) in sim.built.faults.clone().iter().enumerate() {
            sim.push(JOB_START + f.start(), Ev::FaultStart(i as u32));
        }
        sim
    }

    /// Prints the manager's instructions, faults and the agents' job events to stderr.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on;
    }

    /// Also prints every frame agent `id` sends or receives (with `set_trace`).
    pub fn watch(&mut self, id: &str) {
        self.watch = self.ids.get(id).map(|&k| agent_node(k));
    }

    fn trace(&self, what: std::fmt::Arguments<'_>) {
        if self.trace {
            eprintln!("{:>10.4} {what}", self.now.as_secs_f64());
        }
    }

    /// The scenario as drawn from its seed.
    pub fn built(&self) -> &Built {
        &self.built
    }

    /// The content.
    pub fn truth(&self) -> &Truth {
        &self.truth
    }

    /// The simulated time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Invariant violations found so far.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Runs until every live agent is confirmed, an invariant breaks, or the deadline passes.
    pub fn run(mut self) -> Outcome {
        while self.step() {}
        self.finish()
    }

    /// Processes one event; `false` when the run is over.
    pub fn step(&mut self) -> bool {
        if !self.violations.is_empty() || self.live_unconfirmed == 0 {
            return false;
        }
        let Some((at, ev)) = self.queue.pop() else {
            return false;
        };
        if at > self.deadline {
            self.now = self.deadline;
            return false;
        }
        debug_assert!(at >= self.now, "time went backwards");
        if at == self.now {
            self.same_time += 1;
            if self.same_time > STALL_LIMIT {
                self.violation(format!(
                    "the simulation stalled: {STALL_LIMIT} events without time advancing"
                ));
                return false;
            }
        } else {
            self.same_time = 0;
        }
        self.now = at;
        self.stats.events += 1;
        self.stats.max_queue = self.stats.max_queue.max(self.queue.len() as u64);
        self.handle(ev);
        true
    }

    fn finish(mut self) -> Outcome {
        self.tally_unfounded();
        if self.violations.is_empty() && self.live_unconfirmed > 0 && self.trace {
            self.dump_stuck();
        }
        if self.violations.is_empty() && self.live_unconfirmed > 0 {
            let missing: Vec<&str> = self
                .agents
                .iter()
                .filter(|a| !a.dead && a.confirmed_at.is_none())
                .map(|a| a.id.as_str())
                .take(8)
                .collect();
            let healed = JOB_START + self.built.healed_at();
            self.violations.push(format!(
                "liveness: {} live agent(s) not confirmed by {:.1}s (faults healed at {:.1}s, job started at {:.1}s), e.g. {}",
                self.live_unconfirmed,
                self.now.as_secs_f64(),
                healed.as_secs_f64(),
                JOB_START.as_secs_f64(),
                missing.join(", ")
            ));
        }
        if self.arrivals.is_some() {
            self.print_critical_path();
        }
        let start = JOB_START;
        let completion = self
            .agents
            .iter()
            .map(|a| a.complete_at.map(|t| t.saturating_sub(start).as_secs_f64()))
            .collect();
        let confirmed = self
            .agents
            .iter()
            .filter(|a| a.confirmed_at.is_some())
            .count();
        let uploaded = (0..self.net.len()).map(|n| self.net.uploaded(n)).collect();
        let up_rates = (0..self.net.len()).map(|n| self.net.link(n).up).collect();
        let upload_seconds = (0..self.net.len())
            .map(|n| self.net.upload_busy(n).as_secs_f64())
            .collect();
        Outcome {
            agents: self.agents.len(),
            confirmed,
            completion,
            lower_bound: self.built.lower_bound,
            ended_at: self.now.saturating_sub(start).as_secs_f64(),
            violations: std::mem::take(&mut self.violations),
            stats: std::mem::take(&mut self.stats),
            uploaded,
            up_rates,
            upload_seconds,
        }
    }

    /// Prints, for `BATON_SIM_CRITICAL`, the path by which the last agent's last chunk
    /// came from the manager: every hop with its sender's link and the time it took.
    fn print_critical_path(&self) {
        let Some(arrivals) = &self.arrivals else {
            return;
        };
        let start = JOB_START;
        let last_chunk = |k: usize| {
            arrivals
                .iter()
                .filter(|((a, _), _)| *a == k)
                .max_by_key(|(_, (_, t))| *t)
                .map(|((_, c), &(from, t))| (*c, from, t))
        };
        let mut by_done: Vec<(Duration, usize)> = self
            .agents
            .iter()
            .enumerate()
            .filter_map(|(k, a)| a.complete_at.map(|t| (t, k)))
            .collect();
        by_done.sort();
        let link = |n: usize| self.net.link(n);
        for &(done, k) in by_done.iter().rev().take(3) {
            let Some((chunk, mut from, mut t)) = last_chunk(k) else {
                continue;
            };
            eprintln!(
                "critical path of {} (done {:.3}s), last chunk {chunk}:",
                self.agents[k].id,
                done.saturating_sub(start).as_secs_f64()
            );
            let mut node = k + 1;
            for _ in 0..64 {
                let prev = if from == MANAGER {
                    None
                } else {
                    arrivals.get(&(from - 1, chunk)).copied()
                };
                let since = prev.map_or(start, |(_, pt)| pt);
                eprintln!(
                    "  {:>8} -> {:>8} at {:.3}s (+{:5.1} ms; sender up {:.1} MB/s, uploads {:.2} T*, lat {:.1}+{:.1} ms)",
                    self.node_name(from),
                    self.node_name(node),
                    t.saturating_sub(start).as_secs_f64(),
                    t.saturating_sub(since).as_secs_f64() * 1e3,
                    link(from).up as f64 / 1e6,
                    self.net.upload_busy(from).as_secs_f64() / self.built.lower_bound,
                    link(from).latency.as_secs_f64() * 1e3,
                    link(node).latency.as_secs_f64() * 1e3,
                );
                let Some((pf, pt)) = prev else {
                    break;
                };
                node = from;
                from = pf;
                t = pt;
            }
        }
    }

    /// Prints what the unconfirmed agents and the engine think, for traces.
    fn dump_stuck(&self) {
        let status = self.manager.engine.as_ref().and_then(|e| e.job_status(JOB));
        for node in self
            .agents
            .iter()
            .filter(|a| !a.dead && a.confirmed_at.is_none())
            .take(6)
        {
            let agent = node.agent.as_ref();
            eprintln!(
                "stuck {}: alive {}, manager session {}, jobs {:?}, store {} chunks",
                node.id,
                agent.is_some(),
                agent.is_some_and(|a| a.manager_connected()),
                agent.map(|a| a
                    .jobs()
                    .map(|j| (j.job, j.state, j.stats))
                    .collect::<Vec<_>>()),
                node.store().map_or(0, |s| s.count(self.truth.root())),
            );
            if let Some(store) = node.store() {
                let missing: Vec<u32> = (0..self.truth.chunks())
                    .filter(|&i| !store.holds(self.truth.root(), i))
                    .take(10)
                    .collect();
                let holders = missing.first().map_or(0, |&i| {
                    self.agents
                        .iter()
                        .filter(|a| a.store().is_some_and(|s| s.holds(self.truth.root(), i)))
                        .count()
                });
                eprintln!("  missing {missing:?}; {holders} agents hold the first");
            }
            if let Some(p) = status
                .as_ref()
                .and_then(|st| st.participants.iter().find(|p| p.agent == node.id))
            {
                eprintln!(
                    "  engine: {:?}, online {}, sources {:?}",
                    p.state, p.online, p.sources
                );
            }
        }
    }

    // ------------------------------------------------------------ plumbing

    fn push(&mut self, at: Duration, ev: Ev) {
        self.queue.push(at, ev);
    }

    fn violation(&mut self, what: String) {
        self.violations
            .push(format!("t={:.3}s: {what}", self.now.as_secs_f64()));
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Hop(f) => self.on_hop(f),
            Ev::Deliver(f) => self.on_deliver(f),
            Ev::AgentTimer { agent, inc } => self.on_agent_timer(agent as usize, inc),
            Ev::EngineTimer { inc } => self.on_engine_timer(inc),
            Ev::Dial { agent, inc } => self.on_dial(agent as usize, inc),
            Ev::ManagerUp { conn, serial } => self.on_manager_up(conn, serial),
            Ev::SessionTimer { conn, serial } => self.on_session_timer(conn, serial),
            Ev::Connect(a) => self.on_connect(a),
            Ev::Closed { conn, serial, side } => self.on_closed(conn, serial, side),
            Ev::StartJob => self.on_start_job(),
            Ev::FaultStart(i) => self.on_fault(i as usize, true),
            Ev::FaultEnd(i) => self.on_fault(i as usize, false),
            Ev::PartitionTimeout(i) => self.on_partition_timeout(i as usize),
            Ev::RateChange => self.on_rate_change(),
        }
    }

    fn node_name(&self, n: usize) -> &str {
        if n == MANAGER {
            "manager"
        } else {
            &self.agents[n - 1].id
        }
    }

    fn node_inc(&self, n: usize) -> u32 {
        self.node_state[n].0
    }

    fn node_alive(&self, n: usize) -> bool {
        self.node_state[n].1
    }

    /// Copies node `n`'s incarnation and liveness into `node_state`.
    fn sync_node_state(&mut self, n: usize) {
        self.node_state[n] = if n == MANAGER {
            (self.manager.inc, self.manager.engine.is_some())
        } else {
            let node = &self.agents[n - 1];
            (node.inc, node.agent.is_some())
        };
    }

    fn new_conn(&mut self, a: End, b: End) -> u32 {
        let c = Conn {
            serial: 0,
            open: true,
            ends: [a, b],
            seq_out: [0; 2],
            seq_in: [0; 2],
            stash: [BTreeMap::new(), BTreeMap::new()],
            unnotified: 2,
            closed_at: Duration::MAX,
            notified: [false; 2],
            poisoned: [false; 2],
        };
        match self.free_conns.pop() {
            Some(i) => {
                let serial = self.conns[i as usize].serial + 1;
                self.conns[i as usize] = Conn { serial, ..c };
                i
            }
            None => {
                self.conns.push(c);
                (self.conns.len() - 1) as u32
            }
        }
    }

    /// Closes a connection; each end learns it after its delay (`None`: at once).
    fn close(&mut self, conn: u32, delays: [Duration; 2]) {
        let c = &mut self.conns[conn as usize];
        if !c.open {
            return;
        }
        c.open = false;
        c.closed_at = self.now;
        let serial = c.serial;
        for side in 0..2u8 {
            self.push(
                self.now + delays[side as usize],
                Ev::Closed { conn, serial, side },
            );
        }
    }

    /// Closes `conn` as `side` would: it learns at once, the other end one latency later.
    fn close_from(&mut self, conn: u32, side: usize) {
        let c = &self.conns[conn as usize];
        let lat = self.net.latency(c.ends[0].node, c.ends[1].node);
        let mut delays = [lat; 2];
        delays[side] = Duration::ZERO;
        self.close(conn, delays);
    }

    fn free_frame(&mut self, f: u32) {
        if let Some(frame) = self.frames[f as usize].take() {
            self.pool.push(frame.bytes);
        }
        self.free_frames.push(f);
    }

    /// Sends `bytes` on `conn` from end `dir`; `size` is the virtual size the link charges.
    fn send(&mut self, conn: u32, dir: usize, bytes: &[u8], size: u64) {
        let c = &mut self.conns[conn as usize];
        if !c.open {
            self.stats.stale_frames += 1;
            return;
        }
        self.stats.frames += 1;
        if let Some(&k) = bytes.first() {
            self.stats.frames_by_kind[(k as usize).min(15)] += 1;
        }
        let seq = c.seq_out[dir];
        c.seq_out[dir] += 1;
        let (from, to) = (c.ends[dir].node, c.ends[1 - dir].node);
        let serial = c.serial;
        let mut drop = Drop::No;
        if let Some((rate, serial)) = self.drops
            && self.rng.gen_bool(rate)
        {
            self.stats.dropped += 1;
            drop = if serial { Drop::Serial } else { Drop::Reset };
        }
        let mut extra = Duration::ZERO;
        let loss = self.scenario.loss;
        if loss > 0.0 {
            let p = 1.0 - (1.0 - self.link_loss(from)) * (1.0 - self.link_loss(to));
            if p > 0.0 && self.rng.gen_bool(p.min(1.0)) {
                self.stats.lost += 1;
                extra = RTO_MIN.max(self.net.rtt(from, to) * 2);
            }
        }
        let (route, step) = self.net.send(self.now, from, to, size);
        let mut v = self.pool.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(bytes);
        let frame = Frame {
            conn,
            serial,
            dir: dir as u8,
            seq,
            size,
            extra,
            route,
            drop,
            bytes: v,
        };
        let f = match self.free_frames.pop() {
            Some(f) => {
                self.frames[f as usize] = Some(frame);
                f
            }
            None => {
                self.frames.push(Some(frame));
                (self.frames.len() - 1) as u32
            }
        };
        match step {
            Step::Hop(t) => self.push(t, Ev::Hop(f)),
            Step::Deliver(t) => self.push(t + extra, Ev::Deliver(f)),
        }
    }

    fn link_loss(&self, n: usize) -> f64 {
        if n == MANAGER {
            0.0
        } else {
            self.built.agents[n - 1].loss
        }
    }

    /// Whether a frame may still arrive: its connection is open, or it was on the wire before
    /// the connection closed and its receiver has not yet learnt of the close.
    fn frame_live(&self, f: u32) -> bool {
        let Some(frame) = &self.frames[f as usize] else {
            return false;
        };
        let c = &self.conns[frame.conn as usize];
        let to = c.ends[1 - frame.dir as usize];
        c.serial == frame.serial
            && self.node_inc(to.node) == to.inc
            && self.node_alive(to.node)
            && (c.open
                || (frame.route.left_sender() <= c.closed_at
                    && !c.notified[1 - frame.dir as usize]))
    }

    fn on_hop(&mut self, f: u32) {
        if !self.frame_live(f) {
            self.free_frame(f);
            return;
        }
        let frame = self.frames[f as usize].as_mut().expect("live");
        let (size, extra) = (frame.size, frame.extra);
        let mut route = frame.route;
        let step = self.net.advance(self.now, &mut route, size);
        self.frames[f as usize].as_mut().expect("live").route = route;
        match step {
            Step::Hop(t) => self.push(t, Ev::Hop(f)),
            Step::Deliver(t) => self.push(t + extra, Ev::Deliver(f)),
        }
    }

    fn on_deliver(&mut self, f: u32) {
        if !self.frame_live(f) {
            self.free_frame(f);
            return;
        }
        let frame = self.frames[f as usize].as_ref().expect("live");
        let (conn, dir, seq, serial) = (frame.conn, frame.dir as usize, frame.seq, frame.serial);
        let c = &self.conns[conn as usize];
        let (from, to) = (c.ends[dir].node, c.ends[1 - dir].node);
        if let Some(until) = self.net.cut_until(from, to)
            && until > self.now
        {
            // Held by the partition: TCP retransmits it once the path is back.
            self.push(until, Ev::Deliver(f));
            return;
        }
        let c = &mut self.conns[conn as usize];
        if seq != c.seq_in[dir] {
            c.stash[dir].insert(seq, f);
            return;
        }
        self.dispatch(f);
        // Frames that were waiting for this one.
        loop {
            let c = &mut self.conns[conn as usize];
            if c.serial != serial {
                break;
            }
            let next = c.seq_in[dir];
            let Some(g) = c.stash[dir].remove(&next) else {
                break;
            };
            if self.frame_live(g) {
                self.dispatch(g);
            } else {
                self.free_frame(g);
                break;
            }
        }
    }

    /// Hands an in-order frame to its receiver.
    fn dispatch(&mut self, f: u32) {
        let frame = self.frames[f as usize].take().expect("live frame");
        self.free_frames.push(f);
        let conn = frame.conn;
        let dir = frame.dir as usize;
        self.conns[conn as usize].seq_in[dir] += 1;
        let poisoned = self.conns[conn as usize].poisoned[dir];
        match frame.drop {
            Drop::Serial => {
                self.conns[conn as usize].poisoned[dir] = true;
                self.pool.push(frame.bytes);
                return;
            }
            Drop::Reset => {
                self.pool.push(frame.bytes);
                self.close_from(conn, 1 - dir);
                return;
            }
            Drop::No if poisoned => {
                // A frame is missing before this one: it fails to decrypt; the receiver closes.
                self.pool.push(frame.bytes);
                self.close_from(conn, 1 - dir);
                return;
            }
            Drop::No => {}
        }
        let to = self.conns[conn as usize].ends[1 - dir];
        if self.watch.is_some() {
            let from = self.conns[conn as usize].ends[dir].node;
            if self.watch == Some(from) || self.watch == Some(to.node) {
                self.trace(format_args!(
                    "frame {} -> {}: {}",
                    self.node_name(from),
                    self.node_name(to.node),
                    brief(&frame.bytes)
                ));
            }
        }
        if let Some(arrivals) = self.arrivals.as_mut()
            && to.node != MANAGER
            && let Ok(Message::Chunk { index, .. }) = Message::decode(&frame.bytes)
        {
            let from = self.conns[conn as usize].ends[dir].node;
            arrivals
                .entry((to.node - 1, index))
                .or_insert((from, self.now));
        }
        if to.node == MANAGER {
            let agent = self.conns[conn as usize].ends[dir].node - 1;
            self.manager_receive(agent, conn, &frame.bytes);
        } else {
            let k = to.node - 1;
            let now = self.now;
            if let Some(a) = self.agents[k].agent.as_mut() {
                if let Err(e) = a.handle_frame(now, ConnId(to.conn_id), &frame.bytes)
                    && e.must_close()
                    && to.conn_id != ConnId::MANAGER.0
                {
                    self.close_from(conn, 1 - dir);
                }
                self.drain_agent(k);
            }
        }
        self.pool.push(frame.bytes);
    }

    // ------------------------------------------------------------- agents

    fn drain_agent(&mut self, k: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        let now = self.now;
        for _ in 0..DRAIN_LIMIT {
            let Some(a) = self.agents[k].agent.as_mut() else {
                break;
            };
            let Some(t) = a.poll_transmit(now, &mut buf) else {
                break;
            };
            self.agent_transmit(k, t.conn, &mut buf[..t.len]);
        }
        self.buf = buf;
        for _ in 0..DRAIN_LIMIT {
            let Some(a) = self.agents[k].agent.as_mut() else {
                break;
            };
            let Some(ev) = a.poll_event() else { break };
            self.agent_event(k, ev);
        }
        let Some(a) = self.agents[k].agent.as_ref() else {
            return;
        };
        let timeout = a.poll_timeout();
        let v = a.store().violations();
        let seen = self.agents[k].violations_seen;
        if v.len() > seen {
            let what = v[seen].clone();
            self.agents[k].violations_seen = v.len();
            self.violation(what);
        }
        if let Some(t) = timeout {
            let node = &mut self.agents[k];
            if node.timer.is_none_or(|s| t < s) {
                node.timer = Some(t);
                let inc = node.inc;
                self.push(
                    t.max(now),
                    Ev::AgentTimer {
                        agent: k as u32,
                        inc,
                    },
                );
            }
        }
    }

    fn agent_transmit(&mut self, k: usize, conn_id: ConnId, bytes: &mut [u8]) {
        let node = &self.agents[k];
        let conn = if conn_id == ConnId::MANAGER {
            node.mgr_conn
        } else {
            node.conns
                .iter()
                .find(|&&(id, _)| id == conn_id.0)
                .map(|&(_, c)| c)
        };
        let Some(conn) = conn else {
            self.stats.stale_frames += 1;
            return;
        };
        let mut size = bytes.len() as u64;
        if let Some((index, data)) = self.truth.parse_chunk(bytes) {
            self.stats.peer_chunks += 1;
            size = size - REAL_CHUNK as u64 + self.truth.virtual_chunk();
            let held = node
                .agent
                .as_ref()
                .is_some_and(|a| a.store().holds(self.truth.root(), index));
            if data != self.truth.chunk(index) || !held {
                let what = format!(
                    "{} relayed chunk {index} that is {}",
                    node.id,
                    if held {
                        "not the true chunk"
                    } else {
                        "not verified in its store"
                    }
                );
                self.violation(what);
            }
            if self.agents[k].malicious {
                let last = bytes.len() - 1;
                bytes[last] ^= 0xA5;
            }
        }
        let dir = if self.conns[conn as usize].ends[0].node == agent_node(k) {
            0
        } else {
            1
        };
        self.send(conn, dir, bytes, size);
    }

    fn agent_event(&mut self, k: usize, ev: Event) {
        if self.trace
            && !matches!(
                ev,
                Event::Ignored { .. } | Event::Connect { .. } | Event::Close { .. }
            )
        {
            self.trace(format_args!("{}: {ev:?}", self.agents[k].id));
        }
        match ev {
            Event::Connect { peer, addr, key } => self.start_connect(k, peer, addr, key),
            Event::Close { conn } => {
                let node = &mut self.agents[k];
                if let Some(pos) = node.conns.iter().position(|&(id, _)| id == conn.0) {
                    let (_, c) = node.conns[pos];
                    let side = if self.conns[c as usize].ends[0].node == agent_node(k) {
                        0
                    } else {
                        1
                    };
                    self.close_from(c, side);
                }
            }
            Event::JobComplete { .. } => {
                let node = &self.agents[k];
                let ok = node.store().is_some_and(RamStore::complete_and_true);
                if !ok {
                    let what = format!("{} reported complete without every true chunk", node.id);
                    self.violation(what);
                }
                let node = &mut self.agents[k];
                if node.complete_at.is_none() {
                    node.complete_at = Some(self.now);
                }
            }
            Event::JobFailed { .. } => self.stats.agent_failures += 1,
            Event::PeerTrouble { trouble, .. } => {
                self.stats.peer_trouble += 1;
                if matches!(trouble, Trouble::BadChunk { .. }) {
                    self.stats.bad_chunks += 1;
                }
            }
            Event::Ignored { what } => *self.stats.ignored.entry(what).or_default() += 1,
            _ => {}
        }
    }

    fn on_agent_timer(&mut self, k: usize, inc: u32) {
        let node = &mut self.agents[k];
        if node.inc != inc || node.agent.is_none() {
            return;
        }
        if node.timer.is_none_or(|s| s > self.now) {
            return; // superseded by an earlier timer that already ran
        }
        node.timer = None;
        let now = self.now;
        let a = node.agent.as_mut().expect("alive");
        if a.poll_timeout().is_some_and(|t| t <= now) {
            a.handle_timeout(now);
            if a.poll_timeout().is_some_and(|t| t < now) {
                self.stats.timer_spins += 1;
            }
        }
        self.drain_agent(k);
        // Guard against an agent that keeps asking for a wake-up in the past.
        let node = &mut self.agents[k];
        if let Some(t) = node.timer
            && t <= now
            && let Some(a) = node.agent.as_ref()
            && a.poll_timeout().is_some_and(|t| t <= now)
        {
            node.timer = Some(now + Duration::from_millis(1));
            let inc = node.inc;
            self.push(
                now + Duration::from_millis(1),
                Ev::AgentTimer {
                    agent: k as u32,
                    inc,
                },
            );
        }
    }

    fn on_dial(&mut self, k: usize, inc: u32) {
        let node = &self.agents[k];
        if node.inc != inc || node.agent.is_none() || node.mgr_conn.is_some() {
            return;
        }
        let n = agent_node(k);
        let rtt = self.net.rtt(n, MANAGER);
        let fail_after = if self.manager.engine.is_none() {
            Some(rtt) // refused
        } else if self.net.cut(n, MANAGER) {
            Some(HANDSHAKE_TIMEOUT)
        } else {
            None
        };
        if let Some(after) = fail_after {
            self.redial(k, after);
            return;
        }
        let a = End {
            node: n,
            conn_id: ConnId::MANAGER.0,
            inc,
        };
        let m = End {
            node: MANAGER,
            conn_id: 0,
            inc: self.manager.inc,
        };
        let conn = self.new_conn(a, m);
        self.agents[k].mgr_conn = Some(conn);
        let serial = self.conns[conn as usize].serial;
        self.push(self.now + rtt * 3 / 2, Ev::ManagerUp { conn, serial });
    }

    /// Schedules the next dial after `after` plus the backoff (times a jitter of 0.5-1, as the
    /// driver draws it), and doubles the backoff.
    fn redial(&mut self, k: usize, after: Duration) {
        let jitter = self.rng.gen_range(0.5..=1.0);
        let node = &mut self.agents[k];
        let at = self.now + after + node.backoff.mul_f64(jitter);
        node.backoff = (node.backoff * 2).min(BACKOFF_MAX);
        let inc = node.inc;
        self.push(
            at,
            Ev::Dial {
                agent: k as u32,
                inc,
            },
        );
    }

    fn on_manager_up(&mut self, conn: u32, serial: u32) {
        let c = &self.conns[conn as usize];
        if !c.open || c.serial != serial {
            return;
        }
        let k = c.ends[0].node - 1;
        let now = self.now;
        // The manager's side: the handshake authenticated the agent; its session begins.
        let (id, key) = (self.agents[k].id.clone(), self.agents[k].key);
        let session = AgentSession::new(now, id, key, self.manager.session_config.clone());
        if let Some(t) = session.poll_timeout() {
            self.push(t, Ev::SessionTimer { conn, serial });
        }
        self.manager.live.insert(conn, (serial, session));
        let node = &mut self.agents[k];
        node.session_since = now;
        if let Some(a) = node.agent.as_mut() {
            a.handle_manager_connected(now);
            self.drain_agent(k);
        }
    }

    fn start_connect(&mut self, k: usize, peer: AgentId, address: PeerAddr, key: PublicKey) {
        let to = agent_at(&address)
            .filter(|&j| j < self.agents.len() && j != k)
            .filter(|&j| self.agents[j].id == peer && self.agents[j].key == key);
        let (a, b) = (agent_node(k), to.map_or(MANAGER, agent_node));
        let after = match to {
            None => Duration::ZERO,
            Some(j) if self.agents[j].agent.is_none() => self.net.rtt(a, b),
            Some(_) if self.net.cut(a, b) => HANDSHAKE_TIMEOUT,
            Some(_) => self.net.rtt(a, b) * 3 / 2,
        };
        let attempt = Attempt {
            from: k,
            inc: self.agents[k].inc,
            to,
            peer,
        };
        let i = match self.free_attempts.pop() {
            Some(i) => {
                self.attempts[i as usize] = Some(attempt);
                i
            }
            None => {
                self.attempts.push(Some(attempt));
                (self.attempts.len() - 1) as u32
            }
        };
        self.push(self.now + after, Ev::Connect(i));
    }

    fn on_connect(&mut self, i: u32) {
        let Some(at) = self.attempts[i as usize].take() else {
            return;
        };
        self.free_attempts.push(i);
        let k = at.from;
        if self.agents[k].inc != at.inc || self.agents[k].agent.is_none() {
            return;
        }
        let now = self.now;
        let ok = at.to.filter(|&j| {
            self.agents[j].agent.is_some() && !self.net.cut(agent_node(k), agent_node(j))
        });
        let Some(j) = ok else {
            let a = self.agents[k].agent.as_mut().expect("alive");
            a.handle_connect_failed(now, &at.peer);
            self.drain_agent(k);
            return;
        };
        let (ka, kb) = (self.agents[k].next_conn_id, self.agents[j].next_conn_id);
        self.agents[k].next_conn_id += 1;
        self.agents[j].next_conn_id += 1;
        let conn = self.new_conn(
            End {
                node: agent_node(k),
                conn_id: ka,
                inc: self.agents[k].inc,
            },
            End {
                node: agent_node(j),
                conn_id: kb,
                inc: self.agents[j].inc,
            },
        );
        self.agents[k].conns.push((ka, conn));
        self.agents[j].conns.push((kb, conn));
        let a_id = self.agents[k].id.clone();
        let b = self.agents[j].agent.as_mut().expect("alive");
        let accepted = b
            .handle_connected(
                now,
                ConnId(kb),
                PeerInfo {
                    id: a_id,
                    direction: Direction::Incoming,
                },
            )
            .is_ok();
        if !accepted {
            // The responder refuses after the handshake: the initiator learns when it reads.
            self.close_from(conn, 1);
        }
        self.drain_agent(j);
        let b_id = self.agents[j].id.clone();
        let a = self.agents[k].agent.as_mut().expect("alive");
        if a.handle_connected(
            now,
            ConnId(ka),
            PeerInfo {
                id: b_id,
                direction: Direction::Outgoing,
            },
        )
        .is_err()
        {
            self.close_from(conn, 0);
        }
        self.drain_agent(k);
    }

    fn on_closed(&mut self, conn: u32, serial: u32, side: u8) {
        let c = &mut self.conns[conn as usize];
        if c.serial != serial {
            return;
        }
        let end = c.ends[side as usize];
        let peer_node = c.ends[1 - side as usize].node;
        c.notified[side as usize] = true;
        // Frames towards this end that wait for an earlier one will never be delivered.
        let stashed: Vec<u32> = std::mem::take(&mut c.stash[1 - side as usize])
            .into_values()
            .collect();
        c.unnotified -= 1;
        if c.unnotified == 0 {
            self.free_conns.push(conn);
        }
        for f in stashed {
            self.free_frame(f);
        }
        if self.node_inc(end.node) != end.inc || !self.node_alive(end.node) {
            return;
        }
        let now = self.now;
        if end.node == MANAGER {
            let k = peer_node - 1;
            if self.manager.live.get(&conn).is_some_and(|l| l.0 == serial) {
                self.manager.live.remove(&conn);
            }
            if self.manager.sessions[k] == Some(conn) {
                self.manager.sessions[k] = None;
                let id = self.agents[k].id.clone();
                if let Some(e) = self.manager.engine.as_mut() {
                    e.agent_offline(now, &id);
                }
                self.drain_engine();
            }
            return;
        }
        let k = end.node - 1;
        let node = &mut self.agents[k];
        if end.conn_id == ConnId::MANAGER.0 {
            if node.mgr_conn != Some(conn) {
                return;
            }
            node.mgr_conn = None;
            if now.saturating_sub(node.session_since) > BACKOFF_RESET {
                node.backoff = BACKOFF_MIN;
            }
            node.agent
                .as_mut()
                .expect("alive")
                .handle_disconnected(now, ConnId::MANAGER);
            self.redial(k, Duration::ZERO);
        } else {
            node.conns.retain(|&(_, c)| c != conn);
            node.agent
                .as_mut()
                .expect("alive")
                .handle_disconnected(now, ConnId(end.conn_id));
        }
        self.drain_agent(k);
    }

    // ------------------------------------------------------------ manager

    /// A frame from agent `k` on manager connection `conn`: its session applies the rules.
    fn manager_receive(&mut self, k: usize, conn: u32, bytes: &[u8]) {
        let now = self.now;
        // Frames on a connection whose session ended are not read (the server stops reading).
        let Some((_, session)) = self.manager.live.get_mut(&conn) else {
            return;
        };
        session.handle_frame(now, unix_time(now), bytes);
        self.drain_session(k, conn);
    }

    fn on_session_timer(&mut self, conn: u32, serial: u32) {
        let c = &self.conns[conn as usize];
        let k = c.ends[0].node - 1;
        let now = self.now;
        let Some((s, session)) = self.manager.live.get_mut(&conn) else {
            return;
        };
        if *s != serial {
            return;
        }
        session.handle_timeout(now);
        self.drain_session(k, conn);
    }

    /// Carries out what agent `k`'s session on `conn` asks: its transmits, then its events.
    fn drain_session(&mut self, k: usize, conn: u32) {
        let now = self.now;
        while let Some(msg) = self
            .manager
            .live
            .get_mut(&conn)
            .and_then(|(_, s)| s.poll_transmit())
        {
            self.manager_send(conn, &msg);
            if matches!(msg, Message::Welcome { .. }) {
                // The manager relays the root-signed trust document after `Welcome`.
                let truth = self.truth.clone();
                let n = truth.trust_message().len();
                self.send(conn, 1, truth.trust_message(), n as u64);
            }
        }
        while let Some(event) = self
            .manager
            .live
            .get_mut(&conn)
            .and_then(|(_, s)| s.poll_event())
        {
            let (id, key) = (self.agents[k].id.clone(), self.agents[k].key);
            match event {
                SessionEvent::Online { report } => {
                    if let Some(old) = self.manager.sessions[k].replace(conn) {
                        // Taken over (the server's registry does the same): the old
                        // connection is closed and no longer read, and the engine sees the
                        // agent go before it comes back.
                        self.manager.live.remove(&old);
                        self.close_from(old, 1);
                        if let Some(e) = self.manager.engine.as_mut() {
                            e.agent_offline(now, &id);
                        }
                    }
                    self.manager.reported[k] = Some(report.segment.clone());
                    if let Some(e) = self.manager.engine.as_mut() {
                        e.agent_online(now, id, key, *report);
                    }
                }
                SessionEvent::Report(report) => {
                    self.manager.reported[k] = Some(report.segment.clone());
                    if let Some(e) = self.manager.engine.as_mut() {
                        e.agent_online(now, id, key, *report);
                    }
                }
                SessionEvent::ForEngine(mut msg) => {
                    // Agents count the real bytes of the chunks they received; the engine
                    // measures rates from them, so they are scaled to the virtual size.
                    if let Message::Progress { received, .. } = &mut msg {
                        let scale = self.truth.virtual_chunk() / u64::from(REAL_CHUNK);
                        for r in received.iter_mut() {
                            r.bytes = r.bytes.saturating_mul(scale.max(1));
                        }
                    }
                    if let Some(e) = self.manager.engine.as_mut()
                        && e.handle_message(now, &id, &msg).is_err()
                    {
                        self.stats.engine_errors += 1;
                    }
                }
                SessionEvent::ChunkRequest { root, index } => {
                    self.answer_chunk(conn, root, index);
                }
                SessionEvent::SegmentPage(page) => {
                    let reported = self.manager.reported[k].as_deref();
                    let last = Message::SegmentReport(page.clone());
                    let unix_ms = unix_time(now) * 1000 + u64::from(now.subsec_millis());
                    if let Ok(Some(_)) = self
                        .manager
                        .segments
                        .handle_page(&id, reported, page, unix_ms)
                        && let Some(e) = self.manager.engine.as_mut()
                        && e.handle_message(now, &id, &last).is_err()
                    {
                        self.stats.engine_errors += 1;
                    }
                }
                SessionEvent::Close(_) => {
                    self.manager.live.remove(&conn);
                    self.close_from(conn, 1);
                }
                _ => {}
            }
        }
        self.drain_engine();
    }

    /// Answers a chunk request on `conn` from the true content: the simulator's library.
    fn answer_chunk(&mut self, conn: u32, root: Digest, index: u32) {
        if root == *self.truth.root() && index < self.truth.chunks() {
            let mut buf = std::mem::take(&mut self.buf);
            let n = self.truth.encode_chunk(index, &mut buf);
            self.stats.manager_chunks += 1;
            self.stats.origin_bytes += self.truth.virtual_chunk();
            let size = n as u64 - REAL_CHUNK as u64 + self.truth.virtual_chunk();
            self.send(conn, 1, &buf[..n], size);
            self.buf = buf;
        } else {
            let refuse = Message::Refuse {
                root,
                index,
                reason: Refusal::Unknown,
            };
            self.manager_send(conn, &refuse);
        }
    }

    fn manager_send(&mut self, conn: u32, msg: &Message<'_>) {
        let mut buf = std::mem::take(&mut self.buf);
        if let Ok(out) = msg.encode(&mut buf) {
            let n = out.len();
            self.send(conn, 1, &buf[..n], n as u64);
        }
        self.buf = buf;
    }

    fn drain_engine(&mut self) {
        let now = self.now;
        for _ in 0..DRAIN_LIMIT {
            let Some(engine) = self.manager.engine.as_mut() else {
                return;
            };
            let early = engine.poll_transmit();
            let mut persisted = false;
            while let Some(p) = engine.poll_persist() {
                persisted = true;
                if let Persist::MeasuredUpload { rates, .. } = &p {
                    let believed = believed_rates(&self.ids, &self.built.agents, now, rates);
                    self.stats.replans.push(believed);
                }
                apply(&mut self.manager.stored, p);
            }
            let engine = self.manager.engine.as_mut().expect("alive");
            let mut out: Vec<_> = early.into_iter().collect();
            let early = !out.is_empty();
            out.extend(std::iter::from_fn(|| engine.poll_transmit()));
            let events: Vec<EngineEvent> = std::iter::from_fn(|| engine.poll_event()).collect();
            if early && persisted {
                self.violation(
                    "the engine released a message before its records were persisted".into(),
                );
            }
            if out.is_empty() && events.is_empty() && !persisted {
                break;
            }
            for (to, msg) in out {
                if self.trace {
                    self.trace(format_args!("manager -> {to}: {}", describe(&msg)));
                }
                if let Some(&k) = self.ids.get(&to)
                    && let Some(conn) = self.manager.sessions[k]
                {
                    self.manager_send(conn, &msg);
                } else {
                    self.stats.stale_frames += 1;
                }
            }
            for ev in events {
                self.engine_event(ev);
            }
        }
        if let Some(t) = self.manager.engine.as_ref().and_then(Engine::poll_timeout)
            && self.manager.timer.is_none_or(|s| t < s)
        {
            self.manager.timer = Some(t);
            let inc = self.manager.inc;
            self.push(t.max(now), Ev::EngineTimer { inc });
        }
    }

    fn engine_event(&mut self, ev: EngineEvent) {
        match ev {
            EngineEvent::Confirmed { agent, .. } => {
                let Some(&k) = self.ids.get(&agent) else {
                    return;
                };
                let node = &self.agents[k];
                if !node.store().is_some_and(RamStore::complete_and_true) {
                    let what = format!("the engine confirmed {agent}, which lacks true chunks");
                    self.violation(what);
                }
                let node = &mut self.agents[k];
                if node.confirmed_at.is_none() {
                    node.confirmed_at = Some(self.now);
                    if !node.dead {
                        self.live_unconfirmed -= 1;
                    }
                }
            }
            EngineEvent::ParticipantFailed { .. } => self.stats.participant_failures += 1,
            EngineEvent::ReporterDemoted { agent, reason, .. } => {
                self.stats.reporters_demoted += 1;
                // Agents here report only what they saw: only a malicious one may be demoted.
                if self
                    .ids
                    .get(&agent)
                    .is_none_or(|&k| !self.agents[k].malicious)
                {
                    self.violation(format!(
                        "the engine demoted {agent}, an honest reporter: {reason}"
                    ));
                }
            }
            _ => {}
        }
    }

    fn on_engine_timer(&mut self, inc: u32) {
        if self.manager.inc != inc || self.manager.engine.is_none() {
            return;
        }
        if self.manager.timer.is_none_or(|s| s > self.now) {
            return;
        }
        self.manager.timer = None;
        let now = self.now;
        let e = self.manager.engine.as_mut().expect("alive");
        if e.poll_timeout().is_some_and(|t| t <= now) {
            e.handle_timeout(now);
        }
        self.drain_engine();
    }

    fn on_start_job(&mut self) {
        let now = self.now;
        let spec = self.manager.spec.clone();
        if let Some(e) = self.manager.engine.as_mut()
            && let Err(err) = e.start_job(now, spec)
        {
            self.violation(format!("the engine refused the job: {err}"));
        }
        self.drain_engine();
    }

    // ------------------------------------------------------------- faults

    fn on_fault(&mut self, i: usize, start: bool) {
        let fault = self.built.faults[i].clone();
        self.trace(format_args!(
            "fault {} {fault:?}",
            if start { "starts" } else { "ends" }
        ));
        match fault {
            Fault::Crash {
                agent,
                restart_after,
                ..
            } => {
                if start {
                    self.crash_agent(agent, restart_after.is_none());
                    if let Some(after) = restart_after {
                        self.push(self.now + after, Ev::FaultEnd(i as u32));
                    }
                } else {
                    self.restart_agent(agent);
                }
            }
            Fault::Partition {
                members, duration, ..
            } => {
                if start {
                    self.stats.partitions += 1;
                    let nodes: Vec<usize> = members.iter().map(|&m| agent_node(m)).collect();
                    self.net.partition(i as u64, &nodes, self.now + duration);
                    self.push(self.now + duration, Ev::FaultEnd(i as u32));
                    self.push(self.now + USER_TIMEOUT, Ev::PartitionTimeout(i as u32));
                } else {
                    self.net.heal(i as u64);
                }
            }
            Fault::ManagerRestart { downtime, .. } => {
                if start {
                    self.crash_manager();
                    self.push(self.now + downtime, Ev::FaultEnd(i as u32));
                } else {
                    self.restart_manager();
                }
            }
            Fault::Drops {
                from,
                until,
                rate,
                serial,
            } => {
                if start {
                    self.drops = Some((rate, serial));
                    self.push(self.now + (until - from), Ev::FaultEnd(i as u32));
                } else {
                    self.drops = None;
                }
            }
        }
    }

    fn on_rate_change(&mut self) {
        let Some(change) = self.built.rate_change.clone() else {
            return;
        };
        self.trace(format_args!(
            "upload × {} for {} agents",
            change.factor,
            change.agents.len()
        ));
        for k in change.agents {
            let n = agent_node(k);
            let rate = scaled(self.net.link(n).up, change.factor);
            self.net.set_up_rate(n, rate);
        }
    }

    fn on_partition_timeout(&mut self, i: usize) {
        if !self.net.active(i as u64) {
            return;
        }
        for c in 0..self.conns.len() as u32 {
            let conn = &self.conns[c as usize];
            if conn.open && self.net.cut(conn.ends[0].node, conn.ends[1].node) {
                // Both ends' timers run out about together.
                self.close(c, [Duration::ZERO; 2]);
            }
        }
    }

    fn open_conns_of(&self, n: usize) -> Vec<(u32, usize)> {
        (0..self.conns.len() as u32)
            .filter_map(|c| {
                let conn = &self.conns[c as usize];
                if !conn.open {
                    return None;
                }
                (0..2)
                    .find(|&s| conn.ends[s].node == n && conn.ends[s].inc == self.node_inc(n))
                    .map(|s| (c, s))
            })
            .collect()
    }

    fn crash_agent(&mut self, k: usize, forever: bool) {
        let Some(mut agent) = self.agents[k].agent.take() else {
            return;
        };
        self.sync_node_state(agent_node(k));
        self.stats.crashes += 1;
        let store = std::mem::take(agent.store_mut());
        drop(agent);
        // The process is gone: its peers' kernels answer with a reset.
        for (c, side) in self.open_conns_of(agent_node(k)) {
            self.close_from(c, side);
        }
        let node = &mut self.agents[k];
        node.parked = Some(store);
        node.inc += 1;
        node.conns.clear();
        node.mgr_conn = None;
        node.timer = None;
        if forever {
            node.dead = true;
            if node.confirmed_at.is_none() {
                self.live_unconfirmed -= 1;
            }
        }
        self.sync_node_state(agent_node(k));
    }

    fn restart_agent(&mut self, k: usize) {
        let node = &mut self.agents[k];
        if node.agent.is_some() || node.dead {
            return;
        }
        let store = node.parked.take().unwrap_or_default();
        node.agent = Some(Box::new(Agent::new(node.config.clone(), store)));
        node.backoff = BACKOFF_MIN;
        let inc = node.inc;
        self.sync_node_state(agent_node(k));
        self.push(
            self.now,
            Ev::Dial {
                agent: k as u32,
                inc,
            },
        );
    }

    /// Adds the engine's counts of `PeerTrouble` reports it ignored as unfounded (the
    /// reporter was not assigned to the peer) to the stats; call it before the engine goes.
    fn tally_unfounded(&mut self) {
        let Some(engine) = &self.manager.engine else {
            return;
        };
        for job in engine.jobs() {
            if let Some(status) = engine.job_status(job) {
                let n: u64 = status
                    .participants
                    .iter()
                    .map(|p| u64::from(p.unfounded_reports))
                    .sum();
                self.stats.unfounded_reports += n;
            }
        }
    }

    fn crash_manager(&mut self) {
        self.tally_unfounded();
        if self.manager.engine.take().is_none() {
            return;
        }
        self.sync_node_state(MANAGER);
        for (c, side) in self.open_conns_of(MANAGER) {
            self.close_from(c, side);
        }
        self.manager.inc += 1;
        self.manager.timer = None;
        self.manager.sessions.iter_mut().for_each(|s| *s = None);
        self.manager.live.clear();
        self.sync_node_state(MANAGER);
    }

    fn restart_manager(&mut self) {
        if self.manager.engine.is_some() {
            return;
        }
        self.stats.manager_restarts += 1;
        self.manager.epoch += 1;
        let mut engine = Engine::new(self.manager.epoch, self.manager.config.clone());
        let now = self.now;
        for (&job, stored) in &self.manager.stored {
            if stored.finished || job != self.manager.spec.id {
                continue;
            }
            let mut parts: Vec<(AgentId, ParticipantState)> = stored
                .order
                .iter()
                .map(|id| {
                    let state = stored
                        .states
                        .get(id)
                        .copied()
                        .unwrap_or(ParticipantState::Waiting);
                    (id.clone(), state)
                })
                .collect();
            let mut late: Vec<(&AgentId, &ParticipantState)> = stored
                .states
                .iter()
                .filter(|(id, _)| !stored.order.contains(id))
                .collect();
            late.sort_by(|a, b| a.0.cmp(b.0));
            parts.extend(late.into_iter().map(|(id, s)| (id.clone(), *s)));
            let measured: Vec<(AgentId, u64)> = stored
                .measured
                .iter()
                .map(|(id, up)| (id.clone(), *up))
                .collect();
            engine.resume_job(now, self.manager.spec.clone(), parts, &measured);
        }
        self.manager.engine = Some(engine);
        self.sync_node_state(MANAGER);
        self.drain_engine();
    }
}

/// The wall clock the manager reads at simulated time `now` (UTC seconds).
fn unix_time(now: Duration) -> u64 {
    1_700_000_000 + now.as_secs()
}

/// A short description of any frame, for traces.
fn brief(bytes: &[u8]) -> String {
    match Message::decode(bytes) {
        Ok(Message::ChunkRequest { index, .. }) => format!("ChunkRequest {index}"),
        Ok(Message::Chunk { index, .. }) => format!("Chunk {index}"),
        Ok(Message::Refuse { index, reason, .. }) => format!("Refuse {index} {reason:?}"),
        Ok(Message::Progress { verified, .. }) => format!("Progress {verified}"),
        Ok(m @ (Message::Fetch { .. } | Message::Sources { .. })) => describe(&m),
        Ok(m) => m.kind().to_string(),
        Err(e) => format!("undecodable ({e})"),
    }
}

/// A one-line description of an instruction, for traces.
fn describe(msg: &Message<'_>) -> String {
    let ranges = |sources: &[baton_protocol::message::SourceRange]| {
        sources
            .iter()
            .map(|r| {
                let who = match &r.source {
                    baton_protocol::message::Source::Manager => "manager".to_string(),
                    baton_protocol::message::Source::Peer { id, .. } => id.to_string(),
                };
                format!("{who} {}..{}", r.first, r.end)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match msg {
        Message::Fetch { job, sources, .. } => {
            format!("Fetch epoch {} [{}]", job.epoch, ranges(sources))
        }
        Message::Sources { job, sources } => {
            format!("Sources epoch {} [{}]", job.epoch, ranges(sources))
        }
        other => other.kind().to_string(),
    }
}

/// Applies one persisted record to the manager's store.
fn apply(stored: &mut BTreeMap<u64, StoredJob>, p: Persist) {
    match p {
        Persist::JobStarted { job, epoch, order } => {
            let j = stored.entry(job).or_default();
            j.epoch = epoch;
            j.order = order;
        }
        Persist::Participant {
            job, agent, state, ..
        } => {
            stored.entry(job).or_default().states.insert(agent, state);
        }
        Persist::Progress { job, updates } => {
            let j = stored.entry(job).or_default();
            for (agent, verified) in updates {
                let s = j.states.entry(agent).or_insert(ParticipantState::Waiting);
                if let ParticipantState::Fetching { .. } | ParticipantState::Waiting = s {
                    *s = ParticipantState::Fetching { verified };
                }
            }
        }
        Persist::SourceBytes { .. }
        | Persist::Install { .. }
        | Persist::Running { .. }
        | Persist::Rollout { .. } => {}
        Persist::MeasuredUpload { job, rates } => {
            stored.entry(job).or_default().measured.extend(rates);
        }
        Persist::JobFinished { job, .. } => stored.entry(job).or_default().finished = true,
    }
}

/// What a re-plan at `now` believed of the agents' uploads, against their true ones.
fn believed_rates(
    ids: &HashMap<AgentId, usize>,
    agents: &[crate::scenario::AgentParams],
    now: Duration,
    rates: &[(AgentId, u64)],
) -> BelievedRates {
    let mut ratios: Vec<f64> = rates
        .iter()
        .filter_map(|(id, up)| {
            let k = *ids.get(id)?;
            Some(*up as f64 / agents[k].up.max(1) as f64)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ratios
            .get(((ratios.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    BelievedRates {
        at: now,
        measured: ratios.len(),
        p10_p50_p90: [at(0.1), at(0.5), at(0.9)],
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn small(agents: usize, seed: u64) -> Scenario {
        let mut s = Scenario::new(agents, seed);
        s.chunks = 32;
        s.content_bytes = 32 * 32 * 1024;
        s
    }

    #[test]
    fn re_plans_on_measured_rates_are_reported_against_the_true_rates() {
        let mut s = Scenario::new(48, 1);
        s.rates = crate::scenario::RatesMode::Blind;
        let out = Simulation::new(&s).run();
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        let first = out
            .stats
            .replans
            .first()
            .expect("a blind job is planned again");
        assert!(first.measured > 0 && first.measured <= 48);
        let [p10, p50, p90] = first.p10_p50_p90;
        assert!(0.0 < p10 && p10 <= p50 && p50 <= p90, "{first:?}");
    }

    #[test]
    fn a_small_fleet_gets_the_content() {
        let out = Simulation::new(&small(8, 1)).run();
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.confirmed, 8);
        assert!(out.completion.iter().all(Option::is_some));
        assert!(
            out.makespan() >= out.lower_bound * 0.99,
            "{} < {}",
            out.makespan(),
            out.lower_bound
        );
        assert!(out.stats.peer_chunks > 0, "agents relay");
    }

    #[test]
    fn same_seed_same_run() {
        let a = Simulation::new(&small(6, 9)).run();
        let b = Simulation::new(&small(6, 9)).run();
        assert_eq!(a.completion, b.completion);
        assert_eq!(a.stats.events, b.stats.events);
        assert_eq!(a.stats.frames, b.stats.frames);
    }

    #[test]
    fn faults_are_survived_and_a_malicious_peer_is_caught() {
        let mut s = small(10, 4);
        s.faults.malicious = 2;
        s.faults.crashes = 2;
        s.faults.partitions = 1;
        s.faults.drop_rate = 0.01;
        s.give_up_after = Duration::from_secs(120);
        let out = Simulation::new(&s).run();
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.confirmed, 10);
        assert!(out.stats.bad_chunks > 0, "{:?}", out.stats);
        assert_eq!(out.stats.crashes, 2);
        // A manager restart on top: the job resumes under the next epoch.
        s.faults.manager_restarts = 1;
        let out = Simulation::new(&s).run();
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.confirmed, 10);
        assert_eq!(out.stats.manager_restarts, 1);
    }

    /// A manager restart costs about its downtime and the agents' way back, not a star
    /// around the first agent done: with declared rates the plan over holdings is the plan
    /// before (a tenth of the fault-free makespan at most on top of the gap), blind it starts
    /// from the rates measured before (the estimates it had not finished are lost: a quarter).
    /// Before the resumed job was planned over holdings, a restart cost 6x the makespan here.
    #[test]
    fn a_manager_restart_costs_its_gap_not_the_relay() {
        for (rates, slack) in [
            (crate::scenario::RatesMode::Declared, 0.10),
            (crate::scenario::RatesMode::Blind, 0.25),
        ] {
            for seed in 1..=3 {
                let mut s = Scenario::new(40, seed);
                s.chunks = 256;
                s.content_bytes = 256 * 32 * 1024;
                s.rates = rates;
                s.faults.manager_restarts = 1;
                // Within the first 1.5 s: mid-job (T* is about 3 s here, blind runs last 9).
                s.faults.window = Some(Duration::from_millis(1500));
                let sim = Simulation::new(&s);
                let down = sim.built().manager_downtime().as_secs_f64();
                let out = sim.run();
                let calm = Simulation::new(&s.without_faults()).run();
                assert!(out.violations.is_empty(), "{:?}", out.violations);
                assert_eq!(out.confirmed, 40);
                // The gap: down, then the agents' reconnection backoff (at most 8 s).
                let gap = down + BACKOFF_MAX.as_secs_f64();
                let penalty = out.makespan() - calm.makespan();
                assert!(
                    penalty <= gap + slack * calm.makespan(),
                    "{rates:?} seed {seed}: {:.2} s against {:.2} s without, down {down:.2} s",
                    out.makespan(),
                    calm.makespan()
                );
            }
        }
    }

    #[test]
    fn blind_agents_declare_no_rates_and_still_get_the_content() {
        let mut s = small(8, 2);
        s.rates = crate::scenario::RatesMode::Blind;
        let sim = Simulation::new(&s);
        for node in &sim.agents {
            assert_eq!((node.config.link.up_bps, node.config.link.down_bps), (0, 0));
        }
        let out = sim.run();
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.confirmed, 8);
    }

    #[test]
    fn wrong_agents_declare_their_drawn_rates() {
        let mut s = small(8, 2);
        s.rates = crate::scenario::RatesMode::Wrong;
        let sim = Simulation::new(&s);
        for (node, p) in sim.agents.iter().zip(&sim.built.agents) {
            let link = node.config.link;
            assert_eq!(
                (link.up_bps, link.down_bps),
                (p.declared_up, p.declared_down)
            );
            assert_ne!(link.up_bps, p.up);
        }
        let out = sim.run();
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.confirmed, 8);
    }

    #[test]
    fn a_rate_change_reaches_the_upload_ports() {
        let mut s = small(10, 3);
        s.rate_change = Some(crate::scenario::RateChange {
            factor: 0.5,
            at_fraction: 0.2,
        });
        let mut sim = Simulation::new(&s);
        let change = sim.built.rate_change.clone().expect("scheduled");
        assert_eq!(change.agents.len(), 1);
        let n = agent_node(change.agents[0]);
        let before = sim.net.up_rate(n);
        let at = JOB_START + change.at;
        while sim.now < at {
            assert_eq!(sim.net.up_rate(n), before);
            assert!(sim.step(), "the run ended before the change");
        }
        while sim.now <= at && sim.step() {}
        assert_eq!(sim.net.up_rate(n), scaled(before, 0.5));
        let out = sim.run();
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.confirmed, 10);
    }

    #[test]
    fn addresses_round_trip() {
        for k in [0, 1, 255, 256, 70_000] {
            assert_eq!(agent_at(&addr(k)), Some(k));
        }
    }
}
