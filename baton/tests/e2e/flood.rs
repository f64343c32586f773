//! Bounded listeners under a connection flood (issue 14, item 1): a real `baton serve`
//! and real `baton agent` processes on loopback, flooded from another loopback
//! address (127.0.0.2) with idle connections and half-open handshakes (a first
//! handshake message cut short, then nothing).
//!
//! The manager keeps at most its per-address handshake cap of the flood's connections
//! (the others are accepted and closed at once), so its descriptors stay within that
//! cap of where they were, its memory grows by at most [`MAX_RSS_GROWTH`], a new agent
//! (from 127.0.0.1) is online within [`WELCOME_WITHIN`], and a small job to two agents
//! takes at most 1.5 times as long as the same job without the flood, plus [`SLACK`]:
//! the job takes a few hundred milliseconds and the API is polled every 20 ms, so
//! without an absolute slack a scheduling hiccup on a loaded CI machine would fail
//! it. An agent's peer listener flooded with idle connections keeps at most its
//! per-address cap of them and still serves a peer.
//!
//! The figures (RSS, descriptors, times) are printed with `eprintln!` for the CI log.
//! The test raises its own descriptor limit (the flood holds thousands of sockets) and
//! fails, rather than skipping, if the hard limit does not allow it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{fds, rss};
use baton_test_support::{AgentProc, Manager, manager::bytes_from, pseudo_random, wait_for};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;

/// Where the flood comes from: another loopback address than the agents'.
const FLOOD_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Idle connections opened against the manager.
const IDLE: usize = 5_000;
/// Half-open handshakes opened against the manager.
const HALF_OPEN: usize = 500;
/// Idle connections opened against an agent's peer listener.
const PEER_IDLE: usize = 1_000;
/// The manager's memory may grow by this much under the flood.
const MAX_RSS_GROWTH: u64 = 64 << 20;
/// A new agent is online within this while the flood holds.
const WELCOME_WITHIN: Duration = Duration::from_secs(2);
/// Absolute slack on the job's 1.5× bound (see the module comment).
const SLACK: Duration = Duration::from_millis(750);
/// Descriptors a process may open beyond its flood share (log writes, content files,
/// a connection or two in passing).
const FD_SLACK: usize = 32;
/// The manager's per-address handshake cap (its default).
const MANAGER_PER_ADDRESS: usize = baton_manager::agent_port::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS;
/// The agent's per-address handshake cap, given on its command line.
const AGENT_PER_ADDRESS: usize = 16;
/// The handshake timeout both are given, seconds (shorter than the default 5 s, so the
/// test sees a stalled handshake closed and its slot taken again by the flood).
const HANDSHAKE_TIMEOUT: &str = "2";
/// The content of the manager test's jobs: about a quarter of a second at the
/// manager's 4 MiB/s.
const JOB_LEN: usize = 1 << 20;

/// Raises this process's soft descriptor limit to at least `need` (to the hard limit).
fn raise_own_limit(need: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= need,
        "this test needs {need} descriptors; the hard limit is {hard} (raise it, e.g. `ulimit -Hn {need}`)"
    );
    if now.current.unwrap_or(u64::MAX) < need {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum.or(Some(need)),
                maximum: now.maximum,
            },
        )
        .expect("raising the descriptor limit");
    }
}

/// The highest RSS and descriptor count of a process, sampled every 10 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, usize)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut rss_max, mut fds_max) = (0, 0);
            // At most ten minutes of samples, whatever happens to the test.
            for _ in 0..60_000 {
                rss_max = rss_max.max(rss(pid));
                fds_max = fds_max.max(fds(pid));
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (rss_max, fds_max)
        });
        Sampler { stop, thread }
    }

    /// The highest (RSS, descriptors) seen.
    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

/// Opens a connection from [`FLOOD_FROM`] to `target`; `half_open` sends the start of a
/// first handshake message (a header announcing 200 bytes and 10 of them) and nothing more.
async fn flood_one(target: SocketAddr, half_open: bool) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((FLOOD_FROM, 0))).ok()?;
    let mut stream = tokio::time::timeout(Duration::from_secs(3), socket.connect(target))
        .await
        .ok()?
        .ok()?;
    if half_open {
        let mut partial = vec![0u8, 200];
        partial.extend_from_slice(&[7; 10]);
        // The manager may have closed it already (over the cap): that is fine.
        let _ = stream.write_all(&partial).await;
    }
    Some(stream)
}

/// When the other side closed `stream` (end of file or reset), if within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Instant> {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + limit;
    // The manager sends nothing before the first handshake message is complete.
    for _ in 0..16 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => continue,
        }
    }
    None
}

/// Opens `n` connections to `target` one after another; returns them (held open on this
/// side) and how many could not be opened.
async fn flood(target: SocketAddr, n: usize, half_open: bool) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match flood_one(target, half_open).await {
            Some(s) => held.push(s),
            None => failed += 1,
        }
    }
    (held, failed)
}

/// Keeps opening half-open handshakes against `target` (100 per second, at most
/// `max`) until `stop`, so the per-address slots are taken again as soon as they free.
async fn keep_flooding(
    target: SocketAddr,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    max: usize,
) -> Vec<TcpStream> {
    let mut held = Vec::new();
    while !stop.load(Ordering::Relaxed) && held.len() < max {
        for _ in 0..10 {
            if let Some(s) = flood_one(target, true).await {
                held.push(s);
                opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held
}

/// Writes `len` bytes of content (seed `seed`) under the manager's directory.
fn content(m: &Manager, name: &str, len: usize, seed: u32) -> (std::path::PathBuf, Vec<u8>) {
    let bytes = pseudo_random(len, seed);
    let path = m.dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// Runs a job of `file` to `agents` to its end; returns how long it took.
fn timed_job(m: &Manager, file: &Path, agents: &[&str]) -> Duration {
    let started = Instant::now();
    let id = m.create_job(file, agents, json!({ "chunk_size": 16 * 1024 }));
    let done = m.wait_job(id, Duration::from_secs(30), |j| j["state"] == "finished");
    let took = started.elapsed();
    assert_eq!(done["confirmed_count"], agents.len(), "{done}");
    took
}

/// The log lines of `log` naming the per-address handshake cap.
fn cap_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("per-address handshake cap reached"))
        .count()
}

#[test]
fn a_flood_of_idle_and_half_open_connections_leaves_the_manager_bounded_and_serving() {
    raise_own_limit(2 * (IDLE + HALF_OPEN) as u64);
    // One worker: the refill runs beside the test's own waits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let t = Deadline::start(Duration::from_secs(90));
    // The manager's upload is capped so that the job takes long enough to compare.
    let m = Manager::start_args(
        BATON,
        &[
            "--give-up",
            "10",
            "--up-bps",
            "4MiB",
            "--handshake-timeout",
            HANDSHAKE_TIMEOUT,
        ],
    );
    let root = m.dir.clone();
    let _agents: Vec<AgentProc> = ["f1", "f2"]
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &["--discovery-port", "0"]))
        .collect();
    m.wait_connected(&["f1", "f2"]);
    let (first, _) = content(&m, "first.bin", JOB_LEN, 31);
    let (second, _) = content(&m, "second.bin", JOB_LEN, 32);
    let baseline = timed_job(&m, &first, &["f1", "f2"]);

    let pid = m.pid();
    let (rss_before, fds_before) = (rss(pid), fds(pid));
    let sampler = Sampler::start(pid);
    let flood_started = Instant::now();
    let target = m.agent_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let refills = Arc::new(AtomicUsize::new(0));
    let (half_open, idle, refill, closed_at_once, probe) = runtime.block_on(async {
        // The first half-open handshake takes a slot and is watched until the manager
        // closes it at the handshake timeout.
        let mut first = flood_one(target, true).await.expect("the first connection");
        let opened = Instant::now();
        let probe = tokio::spawn(async move {
            closed_within(&mut first, Duration::from_secs(10))
                .await
                .map(|at| at.duration_since(opened))
        });
        let mut half_open = flood(target, HALF_OPEN, true).await;
        // The last half-open connection came while the per-address cap was reached (the
        // first 64 hold their places for the 2 s handshake timeout; the 500 take a fraction
        // of that): it was accepted and closed at once, not left in the backlog.
        let flooded_in = opened.elapsed();
        let last = half_open.0.last_mut().expect("half-open connections");
        let closed_at_once = closed_within(last, Duration::from_secs(1)).await;
        assert!(
            closed_at_once.is_some() || flooded_in >= Duration::from_millis(1_500),
            "a connection over the cap was left open ({HALF_OPEN} half-open in {flooded_in:?})"
        );
        let idle = flood(target, IDLE, false).await;
        let refill = tokio::spawn(keep_flooding(target, stop.clone(), refills.clone(), 3_000));
        (half_open, idle, refill, closed_at_once, probe)
    });
    let flood_took = flood_started.elapsed();
    // The flood holds (its connections open on this side, the refill taking every freed
    // slot): a new agent is welcomed, and a job runs.
    let welcome_started = Instant::now();
    let _late = AgentProc::spawn(&m, &root, "f3", &["--discovery-port", "0"]);
    wait_for(
        "the new agent online while the flood holds",
        WELCOME_WITHIN,
        || format!("connected: {:?}", m.connected()),
        || m.connected().iter().any(|c| c == "f3").then_some(()),
    );
    let welcomed = welcome_started.elapsed();
    let flooded = timed_job(&m, &second, &["f1", "f2"]);
    let stalled_for = runtime.block_on(probe).expect("the probe");
    stop.store(true, Ordering::Relaxed);
    let refilled = runtime.block_on(refill).unwrap();
    let (rss_max, fds_max) = sampler.finish();
    let rss_after = rss(pid);
    let log = m.log();

    eprintln!(
        "manager flood: {} half-open ({} not connected) and {} idle ({} not connected) \
         connections from {FLOOD_FROM} in {flood_took:?}, {} more half-open while it held; \
         RSS {} KiB before, {} KiB after, {} KiB at most; descriptors {fds_before} before, \
         {fds_max} at most (per-address cap {MANAGER_PER_ADDRESS}); new agent online in \
         {welcomed:?}; job {baseline:?} without the flood, {flooded:?} with it; {} cap log lines; \
         a stalled handshake closed after {stalled_for:?}; a connection over the cap \
         closed at once: {}",
        half_open.0.len(),
        half_open.1,
        idle.0.len(),
        idle.1,
        refills.load(Ordering::Relaxed),
        rss_before / 1024,
        rss_after / 1024,
        rss_max / 1024,
        cap_lines(&log),
        closed_at_once.is_some(),
    );
    assert!(
        half_open.0.len() + idle.0.len() >= (IDLE + HALF_OPEN) / 2,
        "the flood mostly connected: it was accepted and closed, not left in the backlog"
    );
    assert!(
        rss_max <= rss_before + MAX_RSS_GROWTH,
        "RSS grew from {rss_before} to {rss_max} bytes"
    );
    assert!(
        fds_max <= fds_before + MANAGER_PER_ADDRESS + FD_SLACK,
        "descriptors went from {fds_before} to {fds_max}; the flood may hold {MANAGER_PER_ADDRESS}"
    );
    let stalled_for = stalled_for.expect("the stalled handshake is closed");
    assert!(
        stalled_for >= Duration::from_millis(1_900) && stalled_for < Duration::from_secs(4),
        "a stalled handshake is closed at the 2 s timeout, not after {stalled_for:?}"
    );
    assert!(welcomed <= WELCOME_WITHIN);
    assert!(
        flooded <= baseline.mul_f64(1.5) + SLACK,
        "the job took {flooded:?} under the flood, {baseline:?} without"
    );
    // The cap is named, and at most once per 5 s (plus the first line).
    let lines = cap_lines(&log);
    let held_for = flood_started.elapsed();
    assert!(
        lines >= 1,
        "the per-address cap is logged:\n{}",
        baton_test_support::tail(&log, 40)
    );
    assert!(
        lines as u64 <= held_for.as_secs() / 5 + 2,
        "{lines} cap lines in {held_for:?}: not rate-limited"
    );
    drop((half_open, idle, refilled));
    assert!(
        t.left() > Duration::from_millis(1),
        "within the test's time"
    );
}

/// The peer port an agent's log says it bound.
fn peer_port(a: &AgentProc) -> SocketAddr {
    wait_for(
        &format!("{} bound its peer listener", a.name),
        Duration::from_secs(10),
        || a.log(),
        || {
            let log = a.log();
            let line = log.lines().find(|l| l.contains("agent starting"))?;
            let bound = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("bound="))?;
            bound.parse().ok()
        },
    )
}

#[test]
fn an_agents_peer_listener_under_a_flood_stays_bounded_and_serves_a_peer() {
    raise_own_limit(2 * PEER_IDLE as u64 + 1024);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The manager uploads slowly, so the leaf fetches from the holder.
    let m = Manager::start_args(BATON, &["--give-up", "10", "--up-bps", "256KiB"]);
    let root = m.dir.clone();
    let per_address = AGENT_PER_ADDRESS.to_string();
    let holder = AgentProc::spawn(
        &m,
        &root,
        "holder",
        &[
            "--discovery-port",
            "0",
            "--max-handshakes-per-address",
            &per_address,
            "--handshake-timeout",
            HANDSHAKE_TIMEOUT,
        ],
    );
    // Serves nobody: its content can come only from the manager and the holder.
    let _leaf = AgentProc::spawn(
        &m,
        &root,
        "leaf",
        &["--discovery-port", "0", "--max-peers", "0"],
    );
    m.wait_connected(&["holder", "leaf"]);
    let target = peer_port(&holder);
    let pid = holder.pid();
    let fds_before = fds(pid);
    let sampler = Sampler::start(pid);
    let (idle, not_connected) = runtime.block_on(flood(target, PEER_IDLE, false));

    let (file, bytes) = content(&m, "peer.bin", 512 * 1024, 33);
    let started = Instant::now();
    let id = m.create_job(
        &file,
        &["holder", "leaf"],
        json!({ "chunk_size": 16 * 1024 }),
    );
    let done = m.wait_job(id, Duration::from_secs(30), |j| j["state"] == "finished");
    let took = started.elapsed();
    let (_, fds_max) = sampler.finish();
    let from_holder = bytes_from(&done, "leaf", Some("holder"));
    eprintln!(
        "peer flood: {} idle connections from {FLOOD_FROM} ({not_connected} not connected); \
         holder descriptors {fds_before} before, {fds_max} at most (per-address cap \
         {AGENT_PER_ADDRESS}); job {took:?}, the leaf got {from_holder} bytes from the holder",
        idle.len()
    );
    assert_eq!(done["confirmed_count"], 2, "{done}");
    assert!(
        from_holder > 0,
        "the leaf fetched from the flooded holder: {done}"
    );
    assert!(
        fds_max <= fds_before + AGENT_PER_ADDRESS + FD_SLACK,
        "the holder's descriptors went from {fds_before} to {fds_max}"
    );
    holder.wait_export(&bytes);
    drop(idle);
}
