//! Hostile clients, end to end (issue 14, items 2 and 3): real `baton serve` and `baton
//! agent` processes on loopback, and fake agents written here with the link layer.
//!
//! - A peer that asks a real agent for thousands of chunks and never reads the answers:
//!   the serving agent's memory (VmRSS) grows by at most its request window of chunk
//!   buffers plus 4 MiB, the slow reader is dropped after the agent's stall timeout, and
//!   real agents fetching from the same agent meanwhile complete their job.
//! - An enrolled agent flooding the manager with 100,000 `Report`s: the manager's memory
//!   grows by at most 64 MiB, the flooder is limited then disconnected (its log says so),
//!   and the job for real agents completes meanwhile.
//!
//! Memory is read from `/proc/PID/status` every 50 ms while the attack runs; the figures
//! are printed. Every wait is bounded by the test's deadline; child processes are killed
//! when their handles are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use baton_agent_core::linux::link::{self, Limits};
use baton_protocol::Digest;
use baton_protocol::identity::Identity;
use baton_protocol::message::Message;
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::PublicKey;
use baton_test_support::{AgentProc, Manager, manager::bytes_from, pseudo_random, wait_for};
use serde_json::json;
use tokio::net::TcpStream;

/// The most any one test here may take.
const LIMIT: Duration = Duration::from_secs(60);
/// The content's chunk size (the default).
const CHUNK: u64 = 32 * 1024;
/// Frames a serving agent holds for one peer before it stops reading it (`PEER_WINDOW`).
const PEER_WINDOW: u64 = 32;

/// Samples `pid`'s memory every 50 ms until `until` holds (bounded by `t`); returns the peak.
fn peak_rss_until(pid: u32, t: &Deadline, what: &str, mut until: impl FnMut() -> bool) -> u64 {
    let mut peak = rss(pid);
    let end = Instant::now() + t.left();
    loop {
        peak = peak.max(rss(pid));
        if until() {
            return peak;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Writes `bytes` under the manager's directory and returns the path.
fn publish(m: &Manager, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = m.dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Waits until `job` finished and returns its detail.
fn finished(m: &Manager, job: u64, t: &Deadline) -> serde_json::Value {
    m.wait_job(job, t.left(), |j| j["state"] == "finished")
}

/// The public key of agent `a` (`baton agent --print-key` beside the running agent).
fn agent_key(a: &AgentProc) -> PublicKey {
    let data = a.dir.join("data");
    let out = baton(
        &[
            "agent",
            "--print-key",
            "--id",
            &a.name,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(out.success, "--print-key: {}", out.stderr);
    let bytes: [u8; 32] = hex::decode(out.stdout.trim())
        .expect("hex key")
        .try_into()
        .expect("32 bytes");
    PublicKey(bytes)
}

#[test]
fn a_peer_that_never_reads_costs_its_server_at_most_its_window_and_is_dropped() {
    let t = Deadline::start(LIMIT);
    // The manager's upload is capped so that the real fetchers relay through `src`.
    let m = Manager::start_args(BATON, &["--give-up", "30", "--up-bps", "1MiB"]);
    let root = m.dir.clone();
    let no_discovery = ["--discovery-port", "0"];
    let src = AgentProc::spawn(
        &m,
        &root,
        "src",
        &[
            "--discovery-port",
            "0",
            "--peer-stall-timeout-secs",
            "3",
            "--up-bps",
            "16MiB",
        ],
    );
    m.wait_connected(&["src"]);
    let bytes = pseudo_random(3 << 20, 14);
    let chunks = (bytes.len() as u64).div_ceil(CHUNK) as u32;
    let path = publish(&m, "content.bin", &bytes);
    let first = m.create_job(&path, &["src"], json!({}));
    let detail = finished(&m, first, &t);
    assert_eq!(detail["confirmed_count"], 1, "{detail}");
    let root_hex = detail["content"]["root"]
        .as_str()
        .expect("root")
        .to_string();
    let content_root: Digest = hex::decode(&root_hex).unwrap().try_into().unwrap();
    let (_, view) = m.api("GET", "/api/v1/agents/src", None);
    let listen: std::net::SocketAddr = view["listen"]
        .as_str()
        .expect("src reported its listener")
        .parse()
        .unwrap();
    let src_key = agent_key(&src);
    let fetchers: Vec<AgentProc> = ["f1", "f2"]
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &no_discovery))
        .collect();
    m.wait_connected(&["f1", "f2", "src"]);
    std::thread::sleep(Duration::from_millis(300));
    let before = rss(src.pid());

    // The slow reader: enrolled (its certificate is the manager's), it asks for every chunk
    // over and over and never reads an answer.
    let rt = runtime();
    let me = Identity::from_seed([0x51; 32]);
    let token = m.enrolment_token();
    let (_session_r, _session_w, welcomed) = rt
        .block_on(join(&m, &me, "slow", Some(&token)))
        .expect("the slow reader enrols");
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicBool::new(false));
    let attack = rt.spawn({
        let (sent, refused) = (sent.clone(), refused.clone());
        async move {
            let stream = TcpStream::connect(listen).await.unwrap();
            let hello = Hello::new(
                Role::Agent,
                id("slow"),
                baton_protocol::caps::ALL,
                Some(welcomed.cert),
            );
            let link = link::connect(stream, &me, &src_key, hello, &Limits::default())
                .await
                .expect("src accepts the enrolled peer");
            // The reader is held, never read.
            let (_reader, mut writer) = link.split();
            for i in 0..200_000u32 {
                let req = Message::ChunkRequest {
                    root: content_root,
                    index: i % chunks,
                };
                if writer.send(&req.to_vec()).await.is_err() {
                    refused.store(true, Ordering::SeqCst);
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    // Meanwhile real agents fetch the content, relayed through `src`.
    wait_for(
        "the slow reader's first requests",
        t.left(),
        || src.log(),
        || (sent.load(Ordering::Relaxed) > 0).then_some(()),
    );
    // `src` holds the content already: a confirmed holder, it serves the others.
    let job = m.create_job(&path, &["src", "f1", "f2"], json!({}));
    let started = Instant::now();
    let peak = peak_rss_until(src.pid(), &t, "the job and the slow reader's drop", || {
        let done = m.job(job)["state"] == "finished";
        done && src.log().contains("peer dropped")
    });
    let detail = m.job(job);
    let after = rss(src.pid());
    let window = PEER_WINDOW * CHUNK;
    eprintln!(
        "slow reader: {} requests sent before src stopped reading/dropped it (refused: {}); \
         src VmRSS before {:.1} MiB, peak {:.1} MiB (+{:.2} MiB), after {:.1} MiB; bound \
         +{:.2} MiB; job done in {:?}; f1 got {} B and f2 {} B from src",
        sent.load(Ordering::Relaxed),
        refused.load(Ordering::SeqCst),
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
        mib(after),
        mib(window + (4 << 20)),
        started.elapsed(),
        bytes_from(&detail, "f1", Some("src")),
        bytes_from(&detail, "f2", Some("src")),
    );
    assert_eq!(detail["confirmed_count"], 3, "{detail}");
    let from_src = bytes_from(&detail, "f1", Some("src")) + bytes_from(&detail, "f2", Some("src"));
    assert!(from_src > 0, "src served no honest fetcher: {detail}");
    for f in &fetchers {
        f.wait_export(&bytes);
    }
    assert!(
        peak.saturating_sub(before) <= window + (4 << 20),
        "src grew from {before} to {peak} bytes"
    );
    let src_log = src.log();
    let dropped: Vec<&str> = src_log
        .lines()
        .filter(|l| l.contains("peer dropped"))
        .collect();
    assert!(!dropped.is_empty());
    eprintln!("src: {}", dropped[0]);
    // Dropped: the slow reader's writes fail once src closed its side.
    wait_for(
        "the slow reader to see its connection closed",
        t.left(),
        || format!("sent {}", sent.load(Ordering::Relaxed)),
        || refused.load(Ordering::SeqCst).then_some(()),
    );
    attack.abort();
}

#[test]
fn an_agent_flooding_reports_is_limited_and_dropped_and_the_job_goes_on() {
    let t = Deadline::start(LIMIT);
    // The manager's upload is capped so that the job runs while the flood does.
    let m = Manager::start_args(BATON, &["--give-up", "30", "--up-bps", "2MiB"]);
    let root = m.dir.clone();
    let no_discovery = ["--discovery-port", "0"];
    let agents: Vec<AgentProc> = ["a1", "a2"]
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &no_discovery))
        .collect();
    m.wait_connected(&["a1", "a2"]);
    let bytes = pseudo_random(4 << 20, 41);
    let path = publish(&m, "content.bin", &bytes);

    let rt = runtime();
    let me = Identity::from_seed([0xf1; 32]);
    let token = m.enrolment_token();
    let (first_r, first_w, _) = rt
        .block_on(join(&m, &me, "flooder", Some(&token)))
        .expect("the flooder enrols");
    std::thread::sleep(Duration::from_millis(300));
    let before = rss(m.pid());
    const FLOOD: u64 = 100_000;
    let sent = Arc::new(AtomicU64::new(0));
    let sessions = Arc::new(AtomicU64::new(0));
    let m_addr = (m.agent_addr(), m.key());
    let flood = rt.spawn({
        let (sent, sessions) = (sent.clone(), sessions.clone());
        async move {
            // Reports as fast as the connection takes them; a closed session is opened again
            // (the flooder is enrolled) until 100,000 reports are written in all.
            let frame = Message::Report(report("flooder")).to_vec();
            let mut session = Some((first_r, first_w));
            for _ in 0..1000 {
                let (_r, mut w) = match session.take() {
                    Some(s) => s,
                    None => match rejoin(m_addr, &me).await {
                        Ok(s) => s,
                        Err(_) => continue,
                    },
                };
                sessions.fetch_add(1, Ordering::Relaxed);
                while sent.load(Ordering::Relaxed) < FLOOD {
                    if w.send(&frame).await.is_err() {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                if sent.load(Ordering::Relaxed) >= FLOOD {
                    return;
                }
            }
        }
    });
    let job = m.create_job(&path, &["a1", "a2"], json!({}));
    let started = Instant::now();
    let peak = peak_rss_until(m.pid(), &t, "the job and the flood's end", || {
        m.job(job)["state"] == "finished" && flood.is_finished()
    });
    let took = started.elapsed();
    let detail = m.job(job);
    let after = rss(m.pid());
    let log = m.log();
    eprintln!(
        "flooder: {} reports written over {} sessions; manager VmRSS before {:.1} MiB, peak \
         {:.1} MiB (+{:.2} MiB), after {:.1} MiB; job and flood done in {took:?}",
        sent.load(Ordering::Relaxed),
        sessions.load(Ordering::Relaxed),
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
        mib(after),
    );
    assert_eq!(sent.load(Ordering::Relaxed), FLOOD);
    assert_eq!(detail["confirmed_count"], 2, "{detail}");
    for a in &agents {
        a.wait_export(&bytes);
    }
    assert!(
        peak.saturating_sub(before) <= 64 << 20,
        "the manager grew from {before} to {peak} bytes"
    );
    let limited: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("over the session's rate limit dropped"))
        .collect();
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("flooder") && l.contains("flooding:") && l.contains("WARN"))
        .collect();
    let disconnected = log
        .lines()
        .filter(|l| l.contains("agent disconnected: flooding:"))
        .count();
    eprintln!(
        "manager: {} sessions closed for flooding; {} rate-limit lines, {} flooding lines; {}",
        disconnected,
        limited.len(),
        closed.len(),
        closed.first().unwrap_or(&"no flooding line")
    );
    assert!(disconnected >= 1, "the flooder was never disconnected");
    assert!(!limited.is_empty(), "no rate-limit warning in the log");
    // The warnings are rate-limited (one per 5 s per cause), not one per session.
    let most = took.as_secs() / 5 + 2;
    assert!(limited.len() as u64 <= most, "{limited:?}");
    assert!(closed.len() as u64 <= most, "{closed:?}");
    // The real agents are still connected; the flooder's last session is closed or idle.
    let connected = m.connected();
    assert!(connected.contains(&"a1".to_string()) && connected.contains(&"a2".to_string()));
}

/// Opens a session again as the enrolled agent `flooder` (no token), without `join`'s checks.
async fn rejoin(
    (addr, key): (std::net::SocketAddr, PublicKey),
    me: &Identity,
) -> Result<(Reader, Writer), link::LinkError> {
    let stream = TcpStream::connect(addr).await?;
    let hello = Hello::new(
        Role::Agent,
        id("flooder"),
        baton_protocol::caps::RELAY_V1,
        None,
    );
    let link = link::connect(stream, me, &key, hello, &Limits::default()).await?;
    let (r, mut w) = link.split();
    w.send(&Message::Report(report("flooder")).to_vec()).await?;
    Ok((r, w))
}
