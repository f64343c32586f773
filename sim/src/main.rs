//! `baton-sim`: run a simulated fleet (or a sweep of faulty seeds) and report against the lower bound.
//!
//! See the crate documentation of `baton_sim` for the model, and `--help` for
//! every scenario option.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use baton_sim::report::{StrategyResult, Summary};
use baton_sim::scenario::{LateJoin, RateChange, RatesMode, Scenario, SweepSize, binding_term};
use baton_sim::simulation::Simulation;
use baton_sim::strategies::{self, Strategy};
use baton_sim::sweep;
use baton_sim::units::{parse_bytes, parse_duration};
use clap::Parser;
use serde_json::json;

/// Errors of the binary are messages for people.
type Result<T> = std::result::Result<T, String>;

/// Agent × chunk transfers above which the default chunk count is lowered: 1024 chunks
/// (32 MiB) up to 10 240 agents, about 2.5 minutes of CPU at 10 000 (the simulator's cost is
/// per chunk transfer, about 14 µs each). Fewer chunks cost ratio: every hop of a stripe's
/// tree lags its parent by up to one chunk per fetcher of that parent.
const DEFAULT_WORK: u64 = 10_485_760;

const ABOUT: &str = "Deterministic simulation of a Baton fleet: the real agents and the real manager \
engine over a modelled network, compared with the Kumar-Ross lower bound and with baseline strategies.";

const LONG_ABOUT: &str =
    "Deterministic simulation of a Baton fleet: the real agents and the real manager \
engine over a modelled network, compared with the Kumar-Ross lower bound \
T* = max(S/u_s, S/d_min, N*S/(u_s + sum u_i)) and with baseline strategies \
(unicast, chain_whole_file, binomial) on the same scenario and seed.

Sizes and rates take SI (k, M, G) or binary (Ki, Mi, Gi) prefixes, rates in bytes per second \
(8MB = 8 000 000 B/s); durations take us, ms, s, min. The same seed always gives the same run.

Each chunk is 256 real bytes (hashed and verified by the agents) that the link model charges at \
its virtual size, content-size / chunks.

--rates says what the agents declare of their rates: their true ones (declared), none (blind: 0, \
as an agent started without --up-bps/--down-bps), or wrong ones (each agent's true rates times \
factors drawn from the seed, log-uniform in 0.3-3). --rate-change F@T multiplies a tenth of the \
agents' upload by F at T x T* after the job starts; the report then also gives the piecewise \
bound after the change and the ratio against it.

With --sweep COUNT, runs COUNT small faulty scenarios (seeds --seed .. --seed+COUNT) checking the \
invariants after every event, and prints failing seeds; BATON_SIM_SEED=S replays seed S alone.
Soak: cargo run --release -p baton-sim -- --sweep 100000";

/// Command-line options.
#[derive(Parser, Debug)]
#[command(name = "baton-sim", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// Number of agents.
    #[arg(long, required_unless_present = "sweep")]
    agents: Option<usize>,
    /// Seed for links, content, loss and faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Strategies to run, comma-separated: baton, unicast, chain_whole_file, binomial.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baton,unicast,chain_whole_file,binomial"
    )]
    strategies: Vec<String>,

    /// Virtual content size S [default: chunks × 32KiB, the protocol's largest chunk].
    #[arg(long, value_parser = parse_bytes)]
    content_size: Option<u64>,
    /// Chunks (each 256 real bytes) [default: 1024, fewer above 10 240 agents so that
    /// agents × chunks ≤ 10 Mi (1024 at 10 000 agents), at least 128].
    #[arg(long)]
    chunks: Option<u32>,
    /// Least agent upload (agent uploads are log-uniform between min and max).
    #[arg(long, value_parser = parse_bytes, default_value = "1MB")]
    up_min: u64,
    /// Greatest agent upload.
    #[arg(long, value_parser = parse_bytes, default_value = "8MB")]
    up_max: u64,
    /// Least agent download (log-uniform between min and max).
    #[arg(long, value_parser = parse_bytes, default_value = "8MB")]
    down_min: u64,
    /// Greatest agent download.
    #[arg(long, value_parser = parse_bytes, default_value = "64MB")]
    down_max: u64,
    /// The manager's upload.
    #[arg(long, value_parser = parse_bytes, default_value = "20MB")]
    manager_up: u64,
    /// Least one-way access latency of an agent (uniform between min and max).
    #[arg(long, value_parser = parse_duration, default_value = "0.5ms")]
    latency_min: Duration,
    /// Greatest one-way access latency of an agent.
    #[arg(long, value_parser = parse_duration, default_value = "20ms")]
    latency_max: Duration,
    /// Greatest per-frame loss probability of an agent's link (each agent's is uniform in
    /// 0..=loss; a lost frame arrives one retransmission timeout late, in order).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// LAN segments behind WAN links (0 = a flat network).
    #[arg(long, default_value_t = 0)]
    segments: u32,
    /// Upload of each segment's WAN link.
    #[arg(long, value_parser = parse_bytes, default_value = "50MB")]
    wan_up: u64,
    /// Download of each segment's WAN link.
    #[arg(long, value_parser = parse_bytes, default_value = "100MB")]
    wan_down: u64,
    /// One-way latency of a WAN link.
    #[arg(long, value_parser = parse_duration, default_value = "10ms")]
    wan_latency: Duration,
    /// Fraction of agents that do not serve peers.
    #[arg(long, default_value_t = 0.0)]
    leaf_fraction: f64,

    /// Chunk requests in flight per source (agent `window`; the agent's own default is 8, but
    /// fewer lets a relay share its upload more evenly among its children).
    #[arg(long, default_value_t = 3)]
    window: u16,
    /// Peers an agent serves at once (agent `max_peers`).
    #[arg(long, default_value_t = 48)]
    max_peers: u16,
    /// Planner: most stripes (policy `max_stripes`).
    #[arg(long, default_value_t = 8)]
    max_stripes: u16,
    /// Planner: most peers one agent serves in a job (policy `max_peers_per_source`).
    #[arg(long, default_value_t = 32)]
    max_peers_per_source: u16,
    /// Planner: most copies the manager sends by plan (policy `manager_max_copies`).
    #[arg(long, default_value_t = 1.0)]
    manager_copies: f64,
    /// What the agents declare of their rates: declared (their true rates), blind (0: unknown,
    /// whatever the agent measures later) or wrong (true × a factor log-uniform in 0.3-3 per
    /// agent and direction, from the seed).
    #[arg(long, default_value = "declared", value_parser = parse_rates)]
    rates: RatesMode,
    /// FACTOR@TIME_FRACTION: a tenth of the agents (at least one, from the seed) get their upload
    /// multiplied by FACTOR at TIME_FRACTION × T* after the job starts (e.g. 0.5@0.33).
    #[arg(long, value_parser = parse_rate_change)]
    rate_change: Option<RateChange>,
    /// COUNT@TIME_FRACTION: COUNT agents (from the seed) start TIME_FRACTION × T* after the job
    /// (e.g. 4@0.25); the report gives the makespan penalty against the same run without.
    #[arg(long, value_parser = parse_late)]
    late: Option<LateJoin>,
    /// Engine: a silent, disconnected participant is given up after this long.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    give_up_after: Duration,

    /// Faults: probability that a frame is dropped during the fault window (a drop breaks its
    /// connection, as on an encrypted session).
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Faults: drops as on a lossy serial link: the frame vanishes and the session breaks only
    /// when the next frame in that direction fails to decrypt.
    #[arg(long)]
    serial_drops: bool,
    /// Faults: partitions (a segment, or a tenth of the fleet, cut off for 0.5-30 s).
    #[arg(long, default_value_t = 0)]
    partitions: u32,
    /// Faults: agent crashes, each followed by a restart over the same store.
    #[arg(long, default_value_t = 0)]
    crashes: u32,
    /// Faults: agent crashes without restart.
    #[arg(long, default_value_t = 0)]
    permanent_crashes: u32,
    /// Faults: agents that corrupt every chunk they serve.
    #[arg(long, default_value_t = 0)]
    malicious: u32,
    /// Faults: manager crashes, each followed by a restart with a higher epoch.
    #[arg(long, default_value_t = 0)]
    manager_restarts: u32,
    /// Faults start within this long after the job starts [default: the lower bound].
    #[arg(long, value_parser = parse_duration)]
    fault_window: Option<Duration>,
    /// Every live agent must be confirmed this long after the last fault heals (after the job
    /// starts, without faults), else the run fails the liveness invariant [default: 180s + 20 T*].
    #[arg(long, value_parser = parse_duration)]
    bound: Option<Duration>,

    /// Instead of one scenario, run this many faulty seeds from --seed and check invariants
    /// (BATON_SIM_SEED replays one seed).
    #[arg(long)]
    sweep: Option<u64>,
    /// Print the manager's instructions, the faults and the agents' job events to stderr.
    #[arg(long)]
    trace: bool,
    /// With --trace, also print every frame this agent (e.g. a00042) sends or receives.
    #[arg(long)]
    watch: Option<String>,
    /// Fleet size of the --sweep scenarios: small (3-12 agents, the CI sweep) or medium (13-64).
    #[arg(long, default_value = "small", value_parser = parse_sweep_size)]
    sweep_size: SweepSize,
    /// Threads for --sweep, and for the baselines next to the Baton run.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

impl Args {
    fn scenario(&self, agents: usize) -> Scenario {
        let mut s = Scenario::new(agents, self.seed);
        let default_chunks = (DEFAULT_WORK / agents.max(1) as u64).clamp(128, 1024) as u32;
        s.chunks = self.chunks.unwrap_or(default_chunks).max(1);
        s.content_bytes = self
            .content_size
            .unwrap_or(s.chunks as u64 * 32 * 1024)
            .max(s.chunks as u64);
        s.up_min = self.up_min;
        s.up_max = self.up_max;
        s.down_min = self.down_min;
        s.down_max = self.down_max;
        s.manager_up = self.manager_up;
        s.latency_min = self.latency_min;
        s.latency_max = self.latency_max.max(self.latency_min);
        s.loss = self.loss.clamp(0.0, 1.0);
        s.segments = self.segments;
        s.wan_up = self.wan_up;
        s.wan_down = self.wan_down;
        s.wan_latency = self.wan_latency;
        s.leaf_fraction = self.leaf_fraction.clamp(0.0, 1.0);
        s.window = self.window.max(1);
        s.max_peers = self.max_peers;
        s.max_stripes = self.max_stripes.max(1);
        s.max_peers_per_source = self.max_peers_per_source;
        s.manager_copies = self.manager_copies;
        s.give_up_after = self.give_up_after;
        s.rates = self.rates;
        s.rate_change = self.rate_change;
        s.late = self.late;
        let f = &mut s.faults;
        f.drop_rate = self.drop_rate.clamp(0.0, 1.0);
        f.serial_drops = self.serial_drops;
        f.partitions = self.partitions;
        f.crashes = self.crashes;
        f.permanent_crashes = self.permanent_crashes;
        f.malicious = self.malicious;
        f.manager_restarts = self.manager_restarts;
        f.window = self.fault_window;
        s.bound = self.bound;
        s
    }
}

fn parse_rates(s: &str) -> Result<RatesMode> {
    s.parse()
}

fn parse_late(s: &str) -> Result<LateJoin> {
    s.parse()
}

fn parse_rate_change(s: &str) -> Result<RateChange> {
    s.parse()
}

fn parse_sweep_size(s: &str) -> Result<SweepSize> {
    match s {
        "small" => Ok(SweepSize::Small),
        "medium" => Ok(SweepSize::Medium),
        other => Err(format!("{other:?}: expected small or medium")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.sweep {
        Some(count) => run_sweep(&args, count),
        None => run_one(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton-sim: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_sweep(args: &Args, count: u64) -> Result<ExitCode> {
    let (first, count) = match sweep::replay_seed() {
        Some(seed) => {
            eprintln!("replaying seed {seed} ({} is set)", sweep::SEED_VAR);
            if args.trace {
                let mut sim = Simulation::new(&Scenario::faulty_sized(seed, args.sweep_size));
                sim.set_trace(true);
                if let Some(id) = &args.watch {
                    sim.watch(id);
                }
                eprintln!("{:#?}", sim.built());
                let out = sim.run();
                eprintln!("{:?}\nviolations: {:#?}", out.stats, out.violations);
            }
            (seed, 1)
        }
        None => (args.seed, count),
    };
    let r = sweep::sweep_sized(first, count, args.threads, args.sweep_size);
    for f in &r.failures {
        eprint!("{f}");
    }
    let st = &r.stats;
    let line = json!({
        "exercised": {
            "crashes": st.crashes,
            "partitions": st.partitions,
            "manager_restarts": st.manager_restarts,
            "dropped_frames": st.dropped,
            "lost_frames": st.lost,
            "bad_chunks_caught": st.bad_chunks,
            "peer_trouble": st.peer_trouble,
            "participants_failed": st.participant_failures,
            "reporters_demoted": st.reporters_demoted,
            "unfounded_reports": st.unfounded_reports,
            "engine_errors": st.engine_errors,
        },
        "seeds": r.seeds,
        "first_seed": first,
        "failures": r.failures.iter().map(|f| f.seed).collect::<Vec<_>>(),
        "events": r.events,
        "wall_seconds": r.wall.as_secs_f64(),
        "events_per_second": r.events as f64 / r.wall.as_secs_f64().max(1e-9),
    });
    if !args.json {
        println!(
            "{} seeds from {first}: {} failed, {} events in {:.1} s",
            r.seeds,
            r.failures.len(),
            r.events,
            r.wall.as_secs_f64()
        );
    }
    println!("{line}");
    Ok(if r.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_one(args: &Args) -> Result<ExitCode> {
    let agents = args.agents.ok_or("--agents is required")?;
    if agents == 0 || agents > 1 << 20 {
        return Err(format!("--agents must be between 1 and {}", 1 << 20));
    }
    let scenario = args.scenario(agents);
    let mut baselines = Vec::new();
    let mut baton = false;
    for name in &args.strategies {
        match name.as_str() {
            "baton" => baton = true,
            other => baselines.push(
                Strategy::ALL
                    .into_iter()
                    .find(|s| s.name() == other)
                    .ok_or_else(|| format!("unknown strategy {other:?}"))?,
            ),
        }
    }
    let started = Instant::now();
    let mut sim = Simulation::new(&scenario);
    sim.set_trace(args.trace);
    if let Some(id) = &args.watch {
        sim.watch(id);
    }
    let built = sim.built().clone();
    let setup = started.elapsed();

    // With faults or late starts, the same run without them, for the makespan penalty.
    let faulty = baton && (scenario.faults.any() || scenario.late.is_some());
    let (baton_out, base_results, calm_out) = std::thread::scope(|scope| {
        let base = scope.spawn(|| {
            baselines
                .iter()
                .map(|&s| strategies::run(s, &scenario, &built))
                .collect::<Vec<_>>()
        });
        let calm =
            scope.spawn(|| faulty.then(|| Simulation::new(&scenario.without_faults()).run()));
        let out = baton.then(|| sim.run());
        (out, base.join(), calm.join())
    });
    let base_results = base_results.map_err(|_| "a baseline panicked".to_string())?;
    let calm_out = calm_out.map_err(|_| "the fault-free run panicked".to_string())?;
    let wall = started.elapsed();

    let mut summary = Summary {
        agents,
        confirmed: 0,
        lower_bound: built.lower_bound,
        binding: binding_term(scenario.content_bytes, scenario.manager_up, &built.agents),
        rates: scenario.rates.name(),
        lower_bound_after_change: built.rate_change.as_ref().map(|c| c.lower_bound_after),
        content_bytes: scenario.content_bytes,
        strategies: Vec::new(),
        extra: BTreeMap::new(),
    };
    let mut ok = true;
    if let Some(out) = &baton_out {
        summary.confirmed = out.confirmed;
        summary.strategies.push(StrategyResult::new(
            "baton",
            &out.completion,
            out.stats.origin_bytes,
        ));
        let st = &out.stats;
        let e = &mut summary.extra;
        e.insert("seed".into(), json!(scenario.seed));
        e.insert("chunks".into(), json!(scenario.chunks));
        if let Some(c) = &built.rate_change {
            e.insert(
                "rate_change".into(),
                json!({
                    "factor": c.factor,
                    "at_seconds": c.at.as_secs_f64(),
                    "agents": c.agents.len(),
                }),
            );
        }
        e.insert("events".into(), json!(st.events));
        e.insert(
            "events_per_second".into(),
            json!(st.events as f64 / wall.saturating_sub(setup).as_secs_f64().max(1e-9)),
        );
        e.insert("wall_seconds".into(), json!(wall.as_secs_f64()));
        e.insert(
            "frames".into(),
            json!({
                "total": st.frames,
                "chunk_requests": st.frames_by_kind[11],
                "chunks": st.frames_by_kind[12],
                "refusals": st.frames_by_kind[13],
                "progress": st.frames_by_kind[1],
            }),
        );
        // How long the busiest uploader had to send (bytes / rate): if it is near the
        // makespan, the plan's load balance limits; if well below, the protocol's dynamics do.
        let busiest = out
            .upload_seconds
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if std::env::var_os("BATON_SIM_UPLOADERS").is_some() {
            let mut v: Vec<(usize, f64, u64, u64)> = out
                .uploaded
                .iter()
                .zip(&out.up_rates)
                .zip(&out.upload_seconds)
                .enumerate()
                .map(|(n, ((&b, &r), &secs))| (n, secs / built.lower_bound, b, r))
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (n, ratio, b, r) in v.iter().take(30) {
                eprintln!(
                    "uploader {n}: {ratio:.3} T*, {b} B at {r} B/s, done {:?}",
                    out.completion.get(n.wrapping_sub(1))
                );
            }
        }
        if let Some((n, secs)) = busiest {
            e.insert(
                "busiest_uploader".into(),
                json!({
                    "node": if n == 0 { "manager".to_string() } else { format!("a{:05}", n - 1) },
                    "upload_seconds": secs,
                    "ratio": secs / built.lower_bound,
                }),
            );
        }
        if let Some(calm) = &calm_out {
            let cost = fault_cost(out, calm, &built);
            eprintln!("{}", cost.1);
            e.insert("fault_cost".into(), cost.0);
        }
        e.insert("peer_trouble".into(), json!(st.peer_trouble));
        // Each re-plan on measured rates: believed ÷ true upload (1.0 = exact).
        e.insert(
            "replans".into(),
            json!(
                st.replans
                    .iter()
                    .map(|r| json!({
                        "at_seconds": r.at.as_secs_f64(),
                        "measured": r.measured,
                        "believed_over_true_p10_p50_p90": r.p10_p50_p90,
                    }))
                    .collect::<Vec<_>>()
            ),
        );
        e.insert("agents_ignored".into(), json!(st.ignored));
        e.insert("engine_errors".into(), json!(st.engine_errors));
        e.insert("violations".into(), json!(out.violations));
        ok = out.violations.is_empty() && out.confirmed == agents;
    }
    for (r, _) in base_results {
        summary.strategies.push(r);
    }
    if let Some(out) = &baton_out {
        for v in &out.violations {
            eprintln!("violation: {v}");
        }
    }
    print!("{}", summary.text());
    if args.json {
        println!("{}", summary.to_json());
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the faults and late starts of a run cost: its makespan against the same run without
/// them, the manager's downtime, and when the last late agent finished (JSON and one line).
fn fault_cost(
    out: &baton_sim::simulation::Outcome,
    calm: &baton_sim::simulation::Outcome,
    built: &baton_sim::scenario::Built,
) -> (serde_json::Value, String) {
    let (with, without) = (out.makespan(), calm.makespan());
    let downtime = built.manager_downtime().as_secs_f64();
    let mut line = format!(
        "fault cost: makespan {with:.3} s against {without:.3} s without faults: {:+.3} s \
         ({:+.1} %), manager down {downtime:.3} s",
        with - without,
        100.0 * (with / without - 1.0)
    );
    let mut value = json!({
        "makespan_without_seconds": without,
        "penalty_seconds": with - without,
        "penalty_fraction": with / without - 1.0,
        "manager_downtime_seconds": downtime,
    });
    if let Some(l) = &built.late {
        let last = l
            .agents
            .iter()
            .filter_map(|&k| out.completion.get(k).copied().flatten())
            .fold(0.0f64, f64::max);
        let at = l.at.as_secs_f64();
        line.push_str(&format!(
            "; {} late agents started at {at:.3} s, the last done at {last:.3} s \
             (start + 1.15 x the makespan without: {:.3} s)",
            l.agents.len(),
            at + 1.15 * without
        ));
        value["late"] = json!({
            "agents": l.agents.len(),
            "at_seconds": at,
            "last_done_seconds": last,
            "target_seconds": at + 1.15 * without,
        });
    }
    (value, line)
}
