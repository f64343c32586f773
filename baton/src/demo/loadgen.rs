//! `baton loadgen`: N real, authenticated agent sessions from one process against a real
//! `baton serve`, to measure what one session costs the manager.
//!
//! The manager is started as a child process (as `baton demo` starts it, with its own
//! root and publisher keys); the N agents are enrolled by key in its database before it
//! starts. Every session is agent-core's sans-IO [`Agent`] (the state machine `baton agent`
//! runs: report, `Welcome`, trust document, manifest check, chunk requests, `Have`) over
//! agent-core's link layer (the same Noise handshake) on its own TCP connection, bound to
//! one of many source addresses on 127.0.0.0/8 so that no address runs out of ports. The
//! agents keep no content bytes: [`CountingStore`] records which chunks were verified and
//! refuses to serve them (the sessions do not serve peers). The content is tiny (1 KiB by
//! default, one chunk): every session fetches it from the manager and confirms it with the
//! usual `Have` — the manager takes no confirmation it would not take from `baton agent`.
//!
//! Phases, each bounded by `--timeout`: sessions set up (until every one is welcomed),
//! a push to all (until every session is instructed, then every one confirmed, then the
//! manager counts every confirmation), and `--storms` report storms (every session sends a
//! new report, then a ping; the manager answers the ping after it has queued the report
//! for its engine, so the storm is over when every pong is back — with at most the
//! engine's input queue, 1024 reports, not yet written). It prints the manager's RSS
//! (`VmRSS`, total and per session over its RSS before the sessions), handshakes per
//! second, the seconds from the push to every session instructed and confirmed, reports
//! per second, and the manager's CPU seconds (`utime + stime`) per phase.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use baton_agent_core::agent::{Agent, AgentClock, AgentConfig, ConnId, Event};
use baton_agent_core::linux::admission;
use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_agent_core::store::{ContentStore, Held, StoreError, StoredAnchor, VersionRecord};
use baton_protocol::identity::Identity;
use baton_protocol::merkle::Proof;
use baton_protocol::session::{Hello, Role};
use baton_protocol::{AgentId, Digest, MAX_FRAME, Manifest, Message, PublicKey, caps};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::{DemoProcesses, Setup, check_alive};

/// Flags of `baton loadgen`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Agent sessions to open.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Sessions being set up at once (connect, handshake, until welcomed).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Sessions per source address at most (127.1.0.1, 127.1.0.2, …; each has its own
    /// ports). Sessions take the addresses in turn, and there are enough of them that at
    /// most 32 sessions being set up share one (the manager's default cap on handshakes
    /// per address is 64).
    #[arg(long, default_value_t = 1000)]
    pub per_address: usize,
    /// Size in bytes of the content pushed to every session (fetched from the manager).
    #[arg(long, default_value_t = 1024)]
    pub content_size: u64,
    /// Report storms after the job: every session sends a new report at once, this many times.
    #[arg(long, default_value_t = 2)]
    pub storms: u32,
    /// Seconds between each session's pings to the manager (`baton agent` pings every 10 s;
    /// 0 = none).
    #[arg(long, default_value_t = 10)]
    pub ping_secs: u64,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Exit with status 1 unless every session was welcomed, instructed and confirmed.
    #[arg(long)]
    pub check: bool,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep the scratch directory (manager data and log).
    #[arg(long)]
    pub keep: bool,
}

/// What a run measured.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    /// Sessions asked for.
    pub sessions: usize,
    /// Source addresses used.
    pub source_addresses: usize,
    /// Sessions welcomed (at least once).
    pub welcomed: usize,
    /// Sessions instructed (their `Fetch` arrived).
    pub instructed: usize,
    /// Sessions that verified the content and confirmed it.
    pub confirmed: usize,
    /// Confirmations the manager counts for the job.
    pub manager_confirmed: usize,
    /// Connections that failed or were refused and were tried again.
    pub retries: u64,
    /// Seconds from the first connection to the last session welcomed.
    pub setup_seconds: f64,
    /// Sessions welcomed per second over [`LoadReport::setup_seconds`].
    pub handshakes_per_second: f64,
    /// The manager's RSS before the sessions (bytes).
    pub manager_rss_idle_bytes: u64,
    /// The manager's RSS with every session welcomed (bytes).
    pub manager_rss_bytes: u64,
    /// ([`LoadReport::manager_rss_bytes`] − idle) / sessions.
    pub manager_rss_per_session_bytes: u64,
    /// The manager's RSS once every confirmation is counted (bytes).
    pub manager_rss_after_job_bytes: u64,
    /// The manager's RSS after the job and the storms (bytes).
    pub manager_rss_end_bytes: u64,
    /// The manager's peak RSS (`VmHWM`, bytes).
    pub manager_rss_peak_bytes: u64,
    /// Seconds from the push to the last session instructed (its `Fetch` arrived).
    pub push_to_all_instructed_seconds: f64,
    /// Sessions whose agent checked the manifest and started the job.
    pub started: usize,
    /// Seconds from the push to the last session started: with the load generator's own
    /// work (a manifest signature checked per session) on the same CPUs.
    pub push_to_all_started_seconds: f64,
    /// Seconds from the push to the last session confirmed (the content moves).
    pub push_to_all_confirmed_seconds: f64,
    /// Seconds from the push until the manager counts every confirmation.
    pub push_to_manager_confirmed_seconds: f64,
    /// Per storm: reports per second (every session's report queued for the engine).
    pub reports_per_second: Vec<f64>,
    /// The manager's CPU seconds (user + system) setting the sessions up.
    pub manager_cpu_setup_seconds: f64,
    /// The manager's CPU seconds from the push to every confirmation counted.
    pub manager_cpu_job_seconds: f64,
    /// The manager's CPU seconds over the storms.
    pub manager_cpu_storms_seconds: f64,
    /// The manager's CPU seconds in all, since it started.
    pub manager_cpu_seconds: f64,
    /// This process's peak RSS (bytes): the sessions' side.
    pub loadgen_rss_peak_bytes: u64,
    /// Seconds enrolling the agents in the database before the manager started.
    pub enrol_seconds: f64,
}

/// The agent state machine of one session: one job, no peers.
type LoadAgent = Agent<CountingStore, 1, 1, 1>;

/// Sessions being set up from one source address at most (see `--per-address`).
const SETTING_UP_PER_ADDRESS: usize = 32;
/// Attempts at a session before it is given up.
const MAX_ATTEMPTS: u32 = 20;
/// The nonce base of the storms' pings (the agent's own pings use its clock in microseconds).
const STORM_NONCE: u64 = u64::MAX - 1_000_000;
/// Sessions per status line on stderr.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Runs `baton loadgen` and prints its figures; with `--check`, status 1 unless every
/// session was welcomed, instructed and confirmed.
pub fn main(args: LoadgenArgs) -> anyhow::Result<ExitCode> {
    let report = run(&args)?;
    print(&report, args.json);
    let all = report.welcomed == args.sessions
        && report.instructed == args.sessions
        && report.started == args.sessions
        && report.confirmed == args.sessions
        && report.manager_confirmed == args.sessions;
    if args.check && !all {
        eprintln!(
            "loadgen: not every session was welcomed, instructed and confirmed ({} / {} / {} / {} of {})",
            report.welcomed,
            report.instructed,
            report.confirmed,
            report.manager_confirmed,
            args.sessions
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// What every session shares: where the manager is, the keys to pin, the counters.
struct Shared {
    manager_addr: SocketAddr,
    manager_key: PublicKey,
    root_key: PublicKey,
    run_seed: [u8; 32],
    addresses: usize,
    ping: Duration,
    setting_up: Semaphore,
    origin: Instant,
    limits: Limits,
    storm: watch::Sender<u32>,
    welcomed: AtomicUsize,
    instructed: AtomicUsize,
    started: AtomicUsize,
    confirmed: AtomicUsize,
    storm_acks: AtomicUsize,
    retries: AtomicU64,
    given_up: AtomicUsize,
    /// Microseconds since `origin` of the latest welcome, instruction and confirmation.
    last_welcomed_us: AtomicU64,
    last_instructed_us: AtomicU64,
    last_started_us: AtomicU64,
    last_confirmed_us: AtomicU64,
    /// The latest connection or session error (shown when a phase stalls).
    last_error: std::sync::Mutex<String>,
}

impl Shared {
    fn micros(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    fn note_error(&self, what: String) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }
}

/// Agent `i`'s id.
fn agent_id(i: usize) -> AgentId {
    AgentId::try_from(format!("lg-{i:06}").as_str()).expect("short id")
}

/// Agent `i`'s identity, derived from the run's seed (the enrolment and the session agree).
fn identity(run_seed: &[u8; 32], i: usize) -> Identity {
    use sha2_std::Digest as _;
    let mut h = sha2_std::Sha256::new();
    h.update(run_seed);
    h.update((i as u64).to_le_bytes());
    Identity::from_seed(h.finalize().into())
}

/// Session `i`'s source address: sessions take 127.1.0.1, 127.1.0.2, … up to the
/// `addresses`-th in turn.
fn source_address(i: usize, addresses: usize) -> Ipv4Addr {
    let k = (i % addresses.max(1)) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + k)
}

fn run(args: &LoadgenArgs) -> anyhow::Result<LoadReport> {
    if args.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    let per_address = args.per_address.clamp(1, 20_000);
    let addresses = args
        .sessions
        .div_ceil(per_address)
        .max(args.concurrency.div_ceil(SETTING_UP_PER_ADDRESS))
        .min(args.sessions);
    if addresses > 60_000 {
        bail!("--sessions / --per-address needs more than 60000 source addresses");
    }
    // One descriptor per session here, and as many in the manager (which raises its own
    // soft limit to the hard one at start, as this process does now).
    let descriptors = admission::raise_descriptor_limit();
    let needed = args.sessions as u64 + 256;
    if descriptors.soft < needed {
        bail!(
            "the descriptor limit is {} (hard {:?}), below the {needed} this run needs (a session each, for this process and for the manager): raise the hard limit first, e.g. `ulimit -Hn {}` as root (scripts/bench-sessions.sh does)",
            descriptors.soft,
            descriptors.hard,
            needed.max(1 << 20)
        );
    }
    let setup = Setup::prepare("baton-loadgen", args.sessions, args.content_size, args.keep)?;
    let dir = setup.scratch.path.clone();
    let mut run_seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut run_seed);
    let mut report = LoadReport {
        sessions: args.sessions,
        source_addresses: addresses,
        ..LoadReport::default()
    };

    // Enrolled by key in the manager's database before it starts (one API call each would
    // take minutes at 100 000).
    let enrol_started = std::time::Instant::now();
    enrol(&dir.join("manager"), &run_seed, args.sessions)?;
    report.enrol_seconds = enrol_started.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} agents enrolled in {:.1} s",
        args.sessions, report.enrol_seconds
    );

    let mut cmd = Command::new(&setup.exe);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    cmd.args(["--max-connections", &(args.sessions + 16).to_string()]);
    let mut fleet = DemoProcesses::start_manager(cmd, &dir)?;
    let pid = fleet.kids[0].child.id();
    let manager_addr: SocketAddr = fleet
        .agent_addr
        .parse()
        .context("the manager's agent address")?;
    let manager_key = parse_key(&fleet.manager_key).context("the manager's key")?;
    let root_key = parse_key(&fleet.root_key).context("the demo's root key")?;
    std::thread::sleep(Duration::from_millis(500));
    report.manager_rss_idle_bytes = proc_status(pid, "VmRSS:");
    let cpu_idle = cpu_seconds(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let (storm, _) = watch::channel(0u32);
    let shared = Arc::new(Shared {
        manager_addr,
        manager_key,
        root_key,
        run_seed,
        addresses,
        ping: Duration::from_secs(args.ping_secs),
        setting_up: Semaphore::new(args.concurrency.max(1)),
        origin: rt.block_on(async { Instant::now() }),
        limits: Limits::default(),
        storm,
        welcomed: AtomicUsize::new(0),
        instructed: AtomicUsize::new(0),
        started: AtomicUsize::new(0),
        confirmed: AtomicUsize::new(0),
        storm_acks: AtomicUsize::new(0),
        retries: AtomicU64::new(0),
        given_up: AtomicUsize::new(0),
        last_welcomed_us: AtomicU64::new(0),
        last_instructed_us: AtomicU64::new(0),
        last_started_us: AtomicU64::new(0),
        last_confirmed_us: AtomicU64::new(0),
        last_error: std::sync::Mutex::new(String::new()),
    });
    let timeout = Duration::from_secs(args.timeout);
    let n = args.sessions;

    // Phase 1: every session up and welcomed.
    let setup_start = shared.micros();
    for i in 0..n {
        rt.spawn(session(i, shared.clone()));
    }
    let welcomed = wait_for(&mut fleet, "welcomed", timeout, &shared, |s| {
        s.welcomed.load(Ordering::Relaxed) + s.given_up.load(Ordering::Relaxed) >= n
    });
    report.welcomed = shared.welcomed.load(Ordering::Relaxed);
    report.setup_seconds =
        (shared.last_welcomed_us.load(Ordering::Relaxed) as f64 - setup_start as f64) / 1e6;
    report.handshakes_per_second = report.welcomed as f64 / report.setup_seconds.max(1e-6);
    // The engine takes the first reports after the welcomes: let it settle.
    std::thread::sleep(Duration::from_secs(2));
    report.manager_rss_bytes = proc_status(pid, "VmRSS:");
    report.manager_rss_per_session_bytes = report
        .manager_rss_bytes
        .saturating_sub(report.manager_rss_idle_bytes)
        / report.welcomed.max(1) as u64;
    let cpu_setup = cpu_seconds(pid);
    report.manager_cpu_setup_seconds = cpu_setup - cpu_idle;
    eprintln!(
        "loadgen: {} of {n} welcomed in {:.1} s; manager RSS {} MiB",
        report.welcomed,
        report.setup_seconds,
        report.manager_rss_bytes >> 20
    );

    // Phase 2: a push to all.
    if welcomed.is_ok() {
        let request = serde_json::json!({
            "path": setup.content,
            "name": "loadgen",
            "targets": { "all": true },
        });
        let pushed = shared.micros();
        let job: Value = fleet.api.post("/api/v1/jobs", &request)?;
        let job_id = job["id"].as_u64().context("the job answer has no id")?;
        let _ = wait_for(&mut fleet, "instructed", timeout, &shared, |s| {
            s.instructed.load(Ordering::Relaxed) >= report.welcomed
        });
        report.instructed = shared.instructed.load(Ordering::Relaxed);
        report.push_to_all_instructed_seconds =
            (shared.last_instructed_us.load(Ordering::Relaxed) as f64 - pushed as f64) / 1e6;
        let _ = wait_for(&mut fleet, "started", timeout, &shared, |s| {
            s.started.load(Ordering::Relaxed) >= report.instructed
        });
        report.started = shared.started.load(Ordering::Relaxed);
        report.push_to_all_started_seconds =
            (shared.last_started_us.load(Ordering::Relaxed) as f64 - pushed as f64) / 1e6;
        let _ = wait_for(&mut fleet, "confirmed", timeout, &shared, |s| {
            s.confirmed.load(Ordering::Relaxed) >= report.instructed
        });
        report.confirmed = shared.confirmed.load(Ordering::Relaxed);
        report.push_to_all_confirmed_seconds =
            (shared.last_confirmed_us.load(Ordering::Relaxed) as f64 - pushed as f64) / 1e6;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            check_alive(&mut fleet.kids)?;
            let jobs: Value = fleet.api.get("/api/v1/jobs")?;
            report.manager_confirmed = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["id"].as_u64() == Some(job_id)))
                .and_then(|j| j["confirmed"].as_u64())
                .unwrap_or(0) as usize;
            if report.manager_confirmed >= report.confirmed {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        report.push_to_manager_confirmed_seconds = (shared.micros() - pushed) as f64 / 1e6;
        report.manager_rss_after_job_bytes = proc_status(pid, "VmRSS:");
        let cpu_job = cpu_seconds(pid);
        report.manager_cpu_job_seconds = cpu_job - cpu_setup;
        eprintln!(
            "loadgen: push → {} instructed in {:.2} s, {} started in {:.2} s, {} confirmed in {:.2} s (manager counts {})",
            report.instructed,
            report.push_to_all_instructed_seconds,
            report.started,
            report.push_to_all_started_seconds,
            report.confirmed,
            report.push_to_all_confirmed_seconds,
            report.manager_confirmed
        );

        // Phase 3: report storms.
        let cpu_before = cpu_seconds(pid);
        for round in 1..=args.storms {
            // The manager's report rate per session: 2 a second after a burst.
            std::thread::sleep(Duration::from_millis(600));
            let started = std::time::Instant::now();
            shared.storm.send_replace(round);
            let want = report.welcomed * round as usize;
            let done = wait_for(&mut fleet, "storm", timeout, &shared, |s| {
                s.storm_acks.load(Ordering::Relaxed) >= want
            });
            if done.is_err() {
                break;
            }
            let rate = report.welcomed as f64 / started.elapsed().as_secs_f64();
            eprintln!("loadgen: report storm {round}: {rate:.0} reports/s");
            report.reports_per_second.push(rate);
        }
        report.manager_cpu_storms_seconds = cpu_seconds(pid) - cpu_before;
    }
    report.retries = shared.retries.load(Ordering::Relaxed);
    report.manager_rss_end_bytes = proc_status(pid, "VmRSS:");
    report.manager_rss_peak_bytes = proc_status(pid, "VmHWM:");
    report.manager_cpu_seconds = cpu_seconds(pid);
    report.loadgen_rss_peak_bytes = proc_status(std::process::id(), "VmHWM:");
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(fleet);
    Ok(report)
}

/// Waits until `done` holds for the counters (status lines every few seconds); `Err` after
/// `timeout`, when the manager exits, or when nothing moved for a minute.
fn wait_for(
    fleet: &mut DemoProcesses,
    what: &str,
    timeout: Duration,
    shared: &Shared,
    done: impl Fn(&Shared) -> bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut next_status = started + STATUS_EVERY;
    while started.elapsed() < timeout {
        check_alive(&mut fleet.kids)?;
        if done(shared) {
            return Ok(());
        }
        if std::time::Instant::now() >= next_status {
            next_status += STATUS_EVERY;
            eprintln!(
                "loadgen: waiting for {what}: {} welcomed, {} instructed, {} confirmed, {} storm answers, {} retries, {} given up; last error: {}",
                shared.welcomed.load(Ordering::Relaxed),
                shared.instructed.load(Ordering::Relaxed),
                shared.confirmed.load(Ordering::Relaxed),
                shared.storm_acks.load(Ordering::Relaxed),
                shared.retries.load(Ordering::Relaxed),
                shared.given_up.load(Ordering::Relaxed),
                shared.last_error.lock().unwrap_or_else(|e| e.into_inner()),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("loadgen: gave up waiting for {what} after {timeout:?}");
    bail!("timed out waiting for {what}")
}

/// Enrols agents `0..n` by key in the database of the manager data directory `data_dir`.
fn enrol(data_dir: &Path, run_seed: &[u8; 32], n: usize) -> anyhow::Result<()> {
    use baton_manager::store::Store as _;
    baton_agent_core::linux::datadir::ensure_private_dir(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut store = baton_manager::store::sqlite::SqliteStore::open(&data_dir.join("baton.db"))
        .context("cannot open the manager's database")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for i in 0..n {
        store
            .enrol(agent_id(i).as_str(), &identity(run_seed, i).public(), now)
            .with_context(|| format!("cannot enrol agent {i}"))?;
    }
    Ok(())
}

fn parse_key(hex_key: &str) -> anyhow::Result<PublicKey> {
    let bytes: [u8; 32] = hex::decode(hex_key)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("not 32 bytes"))?;
    Ok(PublicKey(bytes))
}

/// A `/proc/PID/status` field in kB, as bytes (0 if unreadable).
fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let kib: u64 = l
                    .strip_prefix(field)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                Some(kib * 1024)
            })
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` used, from `/proc/PID/stat` (0 if unreadable).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&k| fields.get(k)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// The kernel's clock ticks per second for `/proc` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// What one session's connection did last.
struct SessionState {
    welcomed: bool,
    instructed: bool,
    started: bool,
    confirmed: bool,
    /// The storm rounds answered.
    storms_answered: u32,
}

/// One agent session: connects (again after a failure, at most [`MAX_ATTEMPTS`] times)
/// and runs its agent until the runtime stops.
async fn session(i: usize, shared: Arc<Shared>) {
    let id = agent_id(i);
    let me = identity(&shared.run_seed, i);
    let mut config = AgentConfig::new(id.clone());
    config.can_serve = false;
    config.roots = heapless::Vec::from_slice(&[shared.root_key]).expect("one root");
    config.manager_key = Some(shared.manager_key);
    config.clock = AgentClock::System;
    config.ping_interval = shared.ping;
    let mut agent: Box<LoadAgent> = Box::new(Agent::new(config, CountingStore::default()));
    let mut state = SessionState {
        welcomed: false,
        instructed: false,
        started: false,
        confirmed: false,
        storms_answered: 0,
    };
    let source = source_address(i, shared.addresses);
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            let backoff = Duration::from_millis(200 << attempt.min(5));
            tokio::time::sleep(backoff).await;
        }
        // Held while the session is set up: `--concurrency` sessions at a time.
        let permit = if state.welcomed {
            None
        } else {
            shared.setting_up.acquire().await.ok()
        };
        let linked = connect(&shared, source, &me, &id).await;
        let link = match linked {
            Ok(l) => l,
            Err(e) => {
                shared.note_error(format!("connect from {source}: {e}"));
                continue;
            }
        };
        let why = drive(&shared, &mut agent, link, &mut state, permit).await;
        agent.handle_disconnected(shared.origin.elapsed(), ConnId::MANAGER);
        shared.note_error(format!("session {id} ended: {why}"));
    }
    shared.given_up.fetch_add(1, Ordering::Relaxed);
}

/// Opens agent `id`'s link to the manager from address `source`.
async fn connect(
    shared: &Shared,
    source: Ipv4Addr,
    me: &Identity,
    id: &AgentId,
) -> Result<link::Link<tokio::net::TcpStream>, LinkError> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = tokio::time::timeout(link::HANDSHAKE_TIMEOUT, socket.connect(shared.manager_addr))
        .await
        .map_err(|_| LinkError::Timeout)??;
    stream.set_nodelay(true)?;
    let hello = Hello::new(Role::Agent, id.clone(), caps::ALL, None);
    link::connect(stream, me, &shared.manager_key, hello, &shared.limits).await
}

/// The agent's frames for the manager now (a buffer per worker thread, none per session).
fn transmits(agent: &mut LoadAgent, now: Duration) -> Vec<Vec<u8>> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_FRAME]);
    }
    BUF.with_borrow_mut(|buf| {
        let mut out = Vec::new();
        while let Some(t) = agent.poll_transmit(now, buf) {
            if t.conn == ConnId::MANAGER {
                out.push(buf[..t.len].to_vec());
            }
        }
        out
    })
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the agent over one established link until it fails; returns why.
async fn drive(
    shared: &Shared,
    agent: &mut LoadAgent,
    link: link::Link<tokio::net::TcpStream>,
    state: &mut SessionState,
    mut permit: Option<tokio::sync::SemaphorePermit<'_>>,
) -> String {
    let (mut reader, mut writer) = link.split();
    let origin = shared.origin;
    let mut storm = shared.storm.subscribe();
    // A storm that began before this connection is answered too.
    let mut storm_due = *storm.borrow_and_update() > state.storms_answered;
    let mut ping_waiting: Option<u64> = None;
    agent.set_system_time(origin.elapsed(), unix_secs());
    agent.handle_manager_connected(origin.elapsed());
    // The session's first report is followed by `Running` (as `baton agent` does).
    let mut running_due = true;
    loop {
        let now = origin.elapsed();
        for frame in transmits(agent, now) {
            let first_report = running_due && frame.first() == Some(&0);
            if let Err(e) = writer.send(&frame).await {
                return format!("send failed: {e}");
            }
            if first_report {
                running_due = false;
                let running = Message::Running {
                    install_step: false,
                    versions: heapless::Vec::new(),
                };
                if let Err(e) = writer.send(&running.to_vec()).await {
                    return format!("send failed: {e}");
                }
            }
        }
        if storm_due && ping_waiting.is_none() && state.welcomed {
            storm_due = false;
            let round = *storm.borrow();
            let mut link_info = agent.config().link;
            link_info.uptime_s = u64::from(round);
            agent.set_link(link_info);
            for frame in transmits(agent, origin.elapsed()) {
                if let Err(e) = writer.send(&frame).await {
                    return format!("send failed: {e}");
                }
            }
            let nonce = STORM_NONCE + u64::from(round);
            if let Err(e) = writer.send(&Message::Ping { nonce }.to_vec()).await {
                return format!("send failed: {e}");
            }
            ping_waiting = Some(nonce);
        }
        while let Some(event) = agent.poll_event() {
            match event {
                Event::Welcomed if !state.welcomed => {
                    state.welcomed = true;
                    drop(permit.take());
                    shared.welcomed.fetch_add(1, Ordering::Relaxed);
                    shared
                        .last_welcomed_us
                        .fetch_max(shared.micros(), Ordering::Relaxed);
                    storm_due = *storm.borrow() > state.storms_answered;
                }
                Event::JobStarted { .. } if !state.started => {
                    state.started = true;
                    shared.started.fetch_add(1, Ordering::Relaxed);
                    shared
                        .last_started_us
                        .fetch_max(shared.micros(), Ordering::Relaxed);
                }
                Event::JobComplete { .. } if !state.confirmed => {
                    state.confirmed = true;
                    shared.confirmed.fetch_add(1, Ordering::Relaxed);
                    shared
                        .last_confirmed_us
                        .fetch_max(shared.micros(), Ordering::Relaxed);
                }
                _ => {}
            }
        }
        let deadline = agent.poll_timeout().map(|t| origin + t);
        tokio::select! {
            frame = reader.recv() => {
                let frame = match frame {
                    Ok(f) => f,
                    Err(e) => return format!("link: {e}"),
                };
                match Message::decode(frame) {
                    Ok(Message::Pong { nonce }) if Some(nonce) == ping_waiting => {
                        ping_waiting = None;
                        state.storms_answered = (nonce - STORM_NONCE) as u32;
                        shared.storm_acks.fetch_add(1, Ordering::Relaxed);
                        storm_due = *storm.borrow() > state.storms_answered;
                        continue;
                    }
                    Ok(Message::Fetch { .. }) if !state.instructed => {
                        state.instructed = true;
                        shared.instructed.fetch_add(1, Ordering::Relaxed);
                        shared
                            .last_instructed_us
                            .fetch_max(shared.micros(), Ordering::Relaxed);
                    }
                    Ok(Message::NotAccepted { reason }) => {
                        return format!("refused by the manager: {reason}");
                    }
                    _ => {}
                }
                let now = origin.elapsed();
                agent.set_system_time(now, unix_secs());
                if let Err(e) = agent.handle_frame(now, ConnId::MANAGER, frame)
                    && e.must_close()
                {
                    agent.handle_disconnected(now, ConnId::MANAGER);
                    return format!("frame refused: {e}");
                }
            }
            _ = sleep_until(deadline) => {
                let now = origin.elapsed();
                agent.set_system_time(now, unix_secs());
                agent.handle_timeout(now);
            }
            changed = storm.changed() => {
                if changed.is_ok() {
                    storm_due = *storm.borrow_and_update() > state.storms_answered;
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Prints the figures (JSON with `json`).
pub fn print(r: &LoadReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("the report serialises")
        );
        return;
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "sessions: {} asked, {} welcomed, {} instructed, {} confirmed ({} counted by the manager); {} source addresses, {} retries",
        r.sessions,
        r.welcomed,
        r.instructed,
        r.confirmed,
        r.manager_confirmed,
        r.source_addresses,
        r.retries
    );
    println!(
        "set-up: {:.1} s, {:.0} handshakes/s (agents enrolled in {:.1} s before the manager started)",
        r.setup_seconds, r.handshakes_per_second, r.enrol_seconds
    );
    println!(
        "manager RSS: {:.1} MiB idle, {:.1} MiB with every session ({:.1} KiB per session), {:.1} MiB after the job, {:.1} MiB at the end, peak {:.1} MiB",
        mib(r.manager_rss_idle_bytes),
        mib(r.manager_rss_bytes),
        r.manager_rss_per_session_bytes as f64 / 1024.0,
        mib(r.manager_rss_after_job_bytes),
        mib(r.manager_rss_end_bytes),
        mib(r.manager_rss_peak_bytes)
    );
    println!(
        "push: every session instructed after {:.2} s (its agent started after {:.2} s), confirmed after {:.2} s, all counted by the manager after {:.2} s",
        r.push_to_all_instructed_seconds,
        r.push_to_all_started_seconds,
        r.push_to_all_confirmed_seconds,
        r.push_to_manager_confirmed_seconds
    );
    let storms: Vec<String> = r
        .reports_per_second
        .iter()
        .map(|x| format!("{x:.0}"))
        .collect();
    println!("report storms: {} reports/s", storms.join(", "));
    println!(
        "manager CPU: {:.1} s set-up, {:.1} s job, {:.1} s storms, {:.1} s in all; load generator peak RSS {:.0} MiB",
        r.manager_cpu_setup_seconds,
        r.manager_cpu_job_seconds,
        r.manager_cpu_storms_seconds,
        r.manager_cpu_seconds,
        mib(r.loadgen_rss_peak_bytes)
    );
}

/// A content store that keeps no bytes: it records which chunks were verified (the agent
/// verified them against the manifest's Merkle root before writing) and the agent's
/// records, and refuses to read a chunk back (the sessions serve no peers).
#[derive(Debug, Default)]
pub struct CountingStore {
    slot: Option<Slot>,
    anchor: Option<StoredAnchor>,
    versions: Vec<(String, VersionRecord)>,
    latest_time: Option<u64>,
}

#[derive(Debug)]
struct Slot {
    manifest: Manifest,
    verified: Vec<bool>,
    count: u32,
}

impl CountingStore {
    fn slot(&self, root: &Digest) -> Option<&Slot> {
        self.slot.as_ref().filter(|s| s.manifest.root == *root)
    }
}

impl ContentStore for CountingStore {
    fn open(&mut self, manifest: &Manifest) -> Result<u32, StoreError> {
        if let Some(s) = self.slot(&manifest.root) {
            return Ok(s.count);
        }
        // One content at a time: a new one replaces the old.
        self.slot = Some(Slot {
            manifest: manifest.clone(),
            verified: vec![false; manifest.chunks() as usize],
            count: 0,
        });
        Ok(0)
    }

    fn manifest(&self, root: &Digest) -> Option<&Manifest> {
        self.slot(root).map(|s| &s.manifest)
    }

    fn verified(&self, root: &Digest) -> Option<u32> {
        self.slot(root).map(|s| s.count)
    }

    fn is_verified(&mut self, root: &Digest, index: u32) -> Result<bool, StoreError> {
        let s = self.slot(root).ok_or(StoreError::Unknown)?;
        s.verified
            .get(index as usize)
            .copied()
            .ok_or(StoreError::BadIndex)
    }

    fn write_chunk(
        &mut self,
        root: &Digest,
        index: u32,
        data: &[u8],
        _proof: &[Digest],
    ) -> Result<(), StoreError> {
        let s = self
            .slot
            .as_mut()
            .filter(|s| s.manifest.root == *root)
            .ok_or(StoreError::Unknown)?;
        if data.len() != s.manifest.chunk_len(index) as usize {
            return Err(StoreError::BadLength);
        }
        let bit = s
            .verified
            .get_mut(index as usize)
            .ok_or(StoreError::BadIndex)?;
        if !*bit {
            *bit = true;
            s.count += 1;
        }
        Ok(())
    }

    fn read_chunk(
        &mut self,
        _root: &Digest,
        _index: u32,
        _data: &mut [u8],
        _proof: &mut Proof,
    ) -> Result<usize, StoreError> {
        Err(StoreError::NotVerified)
    }

    fn held(&self, i: usize) -> Option<Held<'_>> {
        (i == 0)
            .then_some(self.slot.as_ref())
            .flatten()
            .map(|s| Held {
                manifest: &s.manifest,
                verified: s.count,
            })
    }

    fn free_bytes(&self) -> u64 {
        1 << 30
    }

    fn load_anchor(&mut self) -> Result<Option<StoredAnchor>, StoreError> {
        Ok(self.anchor.clone())
    }

    fn save_anchor(&mut self, anchor: &StoredAnchor) -> Result<(), StoreError> {
        self.anchor = Some(anchor.clone());
        Ok(())
    }

    fn version_record(&mut self, name: &str) -> Result<Option<VersionRecord>, StoreError> {
        Ok(self
            .versions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| *r))
    }

    fn put_version_record(&mut self, name: &str, record: &VersionRecord) -> Result<(), StoreError> {
        match self.versions.iter_mut().find(|(n, _)| n == name) {
            Some((_, r)) => *r = *record,
            None => self.versions.push((name.to_string(), *record)),
        }
        Ok(())
    }

    fn load_latest_time(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.latest_time)
    }

    fn save_latest_time(&mut self, unix: u64) -> Result<(), StoreError> {
        self.latest_time = Some(unix);
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn sessions_take_the_source_addresses_in_turn() {
        assert_eq!(source_address(0, 100), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source_address(1, 100), Ipv4Addr::new(127, 1, 0, 2));
        assert_eq!(source_address(100, 100), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source_address(99_999, 100), Ipv4Addr::new(127, 1, 0, 100));
        assert_eq!(source_address(299, 300), Ipv4Addr::new(127, 1, 1, 44));
    }

    #[test]
    fn an_agent_of_a_session_is_small() {
        let size = std::mem::size_of::<LoadAgent>();
        eprintln!("agent state machine: {size} bytes");
        assert!(size < 64 * 1024, "{size} bytes per session");
    }
}
