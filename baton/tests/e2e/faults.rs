//! Faults, end to end: a real `baton serve` and real `baton agent` processes on loopback.
//!
//! Each test provokes one fault of issue 2 §7 that the other end-to-end tests
//! do not: a peer serving corrupted chunks (a malicious peer written here
//! with the link layer), a source agent killed mid-job, an agent killed and
//! restarted mid-transfer, an agent whose disk is full, a replayed
//! handshake and a tampered frame between a real agent and the manager
//! (through a recording proxy written here), and a participant that falsely
//! reports honest peers (a lying fake agent written here; issue 14). Kills
//! are triggered by observed progress (status files, the API), never by a
//! timer; upload caps stretch transfers so that a kill lands mid-transfer. Every test runs under a
//! deadline, and every child process is killed when its handle is dropped,
//! also when a test panics.

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_protocol::identity::Identity;
use baton_protocol::merkle::{self, Proof};
use baton_protocol::message::{Message, Received, Refusal, Report, Source, Trouble};
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::{JobRef, LinkInfo, Name};
use baton_protocol::{Digest, caps};
use baton_test_support::{
    AgentProc, Manager,
    manager::{BOUND, bytes_from, participant},
    pseudo_random, wait_for,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most any one test here may take.
const LIMIT: Duration = Duration::from_secs(60);

/// Writes `bytes` to `name` under the manager's directory.
fn publish_file(m: &Manager, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = m.dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Lines of `log` that contain every one of `words`.
fn lines_with<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

/// Context for a failed wait: the manager's job view and log tail, and the agents' logs.
fn context(m: &Manager, job: Option<u64>, agents: &[&AgentProc]) -> String {
    let mut out = String::new();
    if let Some(job) = job {
        let (_, detail) = m.api("GET", &format!("/api/v1/jobs/{job}"), None);
        out.push_str(&format!("job: {detail}\n"));
    }
    let log = m.log();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    out.push_str("manager log (last lines):\n");
    for l in tail.iter().rev() {
        out.push_str(l);
        out.push('\n');
    }
    for a in agents {
        out.push_str(&format!("--- {} log:\n{}\n", a.name, a.log()));
    }
    out
}

/// The agents connected now, sorted.
fn connected(m: &Manager) -> Vec<String> {
    let (_, status) = m.api("GET", "/api/v1/status", None);
    let mut ids: Vec<String> = status["connected"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The agents named as sources in a participant's source note (`"a 0..5, manager 5..9"`).
fn sources_in_note(note: &str) -> Vec<String> {
    note.split(", ")
        .filter_map(|part| part.split(' ').next())
        .filter(|name| !name.is_empty() && *name != "manager" && !name.starts_with('+'))
        .map(String::from)
        .collect()
}

fn note_of(job: &Value, agent: &str) -> String {
    participant(job, agent)["source"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// (a) A peer that serves corrupted chunks.

/// How the malicious peer falsifies the chunks it serves.
#[derive(Default)]
pub(crate) enum Tamper {
    /// The genuine chunk and proof with one byte flipped.
    #[default]
    FlipByte,
    /// The chunk of the same index of other content (by index: its bytes and its genuine
    /// proof in that content's tree): a mix-and-match of two manifests.
    OtherContent(HashMap<u32, (Vec<u8>, Proof)>),
    /// The genuine chunk and proof followed by this many more bytes (endless data).
    Longer(usize),
}

/// What the malicious peer saw and did, shared with the test.
#[derive(Default)]
pub(crate) struct Mallory {
    /// How it falsifies what it serves.
    pub(crate) tamper: Tamper,
    /// Genuine chunks fetched from the manager, with their proofs.
    pub(crate) chunks: Mutex<HashMap<u32, (Vec<u8>, Proof)>>,
    /// Agents that asked it for a chunk.
    pub(crate) askers: Mutex<HashSet<String>>,
    /// Chunks it served falsified: (agent, index).
    pub(crate) corrupted: Mutex<Vec<(String, u32)>>,
    /// It fetched everything and confirmed with `Have`.
    pub(crate) confirmed: AtomicBool,
    /// Errors of its tasks, for the test's messages.
    pub(crate) errors: Mutex<Vec<String>>,
}

/// The malicious peer's agent id.
pub(crate) const MALLORY: &str = "mallory";

/// What the malicious peer reports: the fastest agent there is, so the planner makes it a source.
fn mallory_report(listen: SocketAddr) -> Report {
    Report {
        id: id(MALLORY),
        listen: Some(listen.into()),
        site: Name::new(),
        segment: Name::new(),
        performance: 1000,
        free_storage: 1 << 40,
        can_serve: true,
        max_chunk: 32 * 1024,
        max_sources: 8,
        max_peers: 16,
        link: LinkInfo {
            up_bps: 1 << 30,
            down_bps: 1 << 30,
            loss_ppm: 0,
            uptime_s: 86_400,
        },
        delays: heapless::Vec::new(),
        labels: heapless::Vec::new(),
        holdings: heapless::Vec::new(),
    }
}

/// Asks for the first chunks of `root` (up to 8, a fake agent's request window); returns the
/// index of the next chunk to ask for.
async fn request_first_chunks(w: &mut Writer, root: Digest, chunks: u32) -> Result<u32, String> {
    let first = chunks.min(8);
    for index in 0..first {
        let req = Message::ChunkRequest { root, index };
        w.send(&req.to_vec()).await.map_err(|e| e.to_string())?;
    }
    Ok(first)
}

/// Tells the manager a fake agent verified all `chunks` (`bytes` of them from the manager)
/// and holds the content: `Progress`, `Have`, `NextPlease`.
async fn confirm_from_manager(
    w: &mut Writer,
    job: JobRef,
    root: Digest,
    chunks: u32,
    bytes: u64,
) -> Result<(), String> {
    let mut from = heapless::Vec::new();
    let _ = from.push(Received { from: None, bytes });
    for msg in [
        Message::Progress {
            job,
            verified: chunks,
            received: from,
        },
        Message::Have { job, root },
        Message::NextPlease { job },
    ] {
        w.send(&msg.to_vec()).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Mallory's manager session after `Welcome`: fetches every chunk honestly (window of 8),
/// then confirms; answers pings.
async fn mallory_session(mut r: Reader, mut w: Writer, state: Arc<Mallory>) -> Result<(), String> {
    let mut job: Option<(JobRef, Digest, u32)> = None;
    let mut next = 0u32;
    let mut received = 0u64;
    loop {
        let frame = r.recv().await.map_err(|e| format!("session: {e}"))?;
        let msg = Message::decode(frame).map_err(|e| format!("decode: {e:?}"))?;
        match msg {
            Message::Fetch {
                job: j, manifest, ..
            } if job.is_none() => {
                let chunks = manifest.chunks();
                job = Some((j, manifest.root, chunks));
                next = request_first_chunks(&mut w, manifest.root, chunks).await?;
            }
            Message::Chunk {
                root,
                index,
                proof,
                data,
            } => {
                let Some((j, want, chunks)) = job else {
                    continue;
                };
                if root != want
                    || merkle::verify_leaf(&root, chunks, index, &merkle::leaf_hash(data), &proof)
                        .is_err()
                {
                    return Err(format!("the manager sent a bad chunk {index}"));
                }
                received += data.len() as u64;
                let held = {
                    let mut held = state.chunks.lock().unwrap();
                    held.insert(index, (data.to_vec(), proof.clone()));
                    held.len() as u32
                };
                if next < chunks {
                    let req = Message::ChunkRequest { root, index: next };
                    w.send(&req.to_vec()).await.map_err(|e| e.to_string())?;
                    next += 1;
                }
                if held == chunks && !state.confirmed.load(Ordering::SeqCst) {
                    confirm_from_manager(&mut w, j, root, chunks, received).await?;
                    state.confirmed.store(true, Ordering::SeqCst);
                }
            }
            Message::Ping { nonce } => {
                w.send(&Message::Pong { nonce }.to_vec())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            _ => {}
        }
    }
}

/// Serves one peer that connected to Mallory: every chunk it asks for comes with its genuine
/// proof and one flipped byte. Answers wait until `gate` distinct agents have asked (at most
/// 10 s), so that every honest agent is caught before the manager reroutes anyone.
async fn mallory_serve_peer(
    stream: TcpStream,
    me: Identity,
    hello: Hello,
    state: Arc<Mallory>,
    gate: usize,
) -> Result<(), String> {
    // Mallory checks nothing about who connects.
    let (link, ()) = link::accept(stream, &me, hello, &Limits::default(), |_| Ok(()))
        .await
        .map_err(|e| format!("accept: {e}"))?;
    let peer = link.remote.id.to_string();
    let (mut r, mut w) = link.split();
    let first_ask = tokio::time::Instant::now();
    loop {
        let frame = match r.recv().await {
            Ok(f) => f,
            Err(LinkError::Closed) => return Ok(()),
            Err(e) => return Err(format!("{peer}: {e}")),
        };
        let reply = match Message::decode(frame).map_err(|e| format!("decode: {e:?}"))? {
            Message::ChunkRequest { root, index } => {
                state.askers.lock().unwrap().insert(peer.clone());
                let deadline = first_ask + Duration::from_secs(10);
                while state.askers.lock().unwrap().len() < gate
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                let held = loop {
                    let held = state.chunks.lock().unwrap().get(&index).cloned();
                    if held.is_some() || tokio::time::Instant::now() > deadline {
                        break held;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let held = held.map(|(mut data, mut proof)| {
                    match &state.tamper {
                        Tamper::FlipByte => {
                            let mid = data.len() / 2;
                            data[mid] ^= 0x01;
                        }
                        Tamper::OtherContent(other) => {
                            if let Some((d, p)) = other.get(&index) {
                                (data, proof) = (d.clone(), p.clone());
                            }
                        }
                        Tamper::Longer(extra) => data.resize(data.len() + extra, 0x5a),
                    }
                    (data, proof)
                });
                match held {
                    Some((data, proof)) => {
                        state.corrupted.lock().unwrap().push((peer.clone(), index));
                        Message::Chunk {
                            root,
                            index,
                            proof,
                            data: &data,
                        }
                        .to_vec()
                    }
                    None => Message::Refuse {
                        root,
                        index,
                        reason: Refusal::NotYet,
                    }
                    .to_vec(),
                }
            }
            Message::Ping { nonce } => Message::Pong { nonce }.to_vec(),
            _ => continue,
        };
        if w.send(&reply).await.is_err() {
            return Ok(());
        }
    }
}

/// Starts the malicious peer for `m` on `rt`: enrolled like any agent, reporting a huge
/// upload so that it is made a source; it fetches the content honestly, confirms, then
/// serves falsified chunks (`state.tamper`) to every peer, once `gate` peers asked.
pub(crate) fn start_mallory(
    m: &Manager,
    rt: &tokio::runtime::Runtime,
    state: &Arc<Mallory>,
    gate: usize,
) {
    let me = Identity::from_seed([66; 32]);
    m.enrol(MALLORY, &me.public());
    let (listener, listen) = rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    });
    let (r, w, cert) = rt.block_on(async {
        let stream = TcpStream::connect(m.agent_addr()).await.unwrap();
        let hello = Hello::new(Role::Agent, id(MALLORY), caps::ALL, None);
        let link = link::connect(stream, &me, &m.key(), hello, &Limits::default())
            .await
            .expect("mallory's handshake");
        let (mut r, mut w) = link.split();
        w.send(&Message::Report(mallory_report(listen)).to_vec())
            .await
            .unwrap();
        let cert = recv_until(&mut r, |msg| match msg {
            Message::Welcome { cert, .. } => Some(cert),
            _ => None,
        })
        .await;
        (r, w, cert)
    });
    cert.verify(&m.key())
        .expect("mallory's certificate is the manager's");
    assert_eq!(cert.id, id(MALLORY));
    {
        let state = state.clone();
        rt.spawn(async move {
            if let Err(e) = mallory_session(r, w, state.clone()).await {
                state.errors.lock().unwrap().push(e);
            }
        });
    }
    let state = state.clone();
    let hello = Hello::new(Role::Agent, id(MALLORY), caps::ALL, Some(cert));
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (me, hello, state) = (me.clone(), hello.clone(), state.clone());
            tokio::spawn(async move {
                if let Err(e) = mallory_serve_peer(stream, me, hello, state.clone(), gate).await {
                    state.errors.lock().unwrap().push(e);
                }
            });
        }
    });
}

#[test]
fn a_peer_serving_corrupted_chunks_is_reported_and_routed_around() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start_args(BATON, &["--give-up", "10"]);
    let root = m.dir.clone();
    let rt = runtime();
    let state = Arc::new(Mallory::default());

    let honest = ["h1", "h2", "h3"];
    start_mallory(&m, &rt, &state, honest.len());

    let agents: Vec<AgentProc> = honest
        .iter()
        .map(|n| {
            let status = root.join(n).join("status.json");
            AgentProc::spawn(
                &m,
                &root,
                n,
                &[
                    "--up-bps",
                    "2MiB",
                    "--status-file",
                    status.to_str().unwrap(),
                ],
            )
        })
        .collect();
    let all: Vec<&AgentProc> = agents.iter().collect();
    m.wait_connected(&[MALLORY, "h1", "h2", "h3"]);

    let bytes = pseudo_random(1_000_000, 11);
    let file = publish_file(&m, "content.bin", &bytes);
    let job = m.create_job(
        &file,
        &[MALLORY, "h1", "h2", "h3"],
        json!({ "chunk_size": 16384 }),
    );
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");

    // The planner made Mallory a source of every honest agent (each asked it for chunks
    // before any bad chunk was served), and each got corrupted chunks.
    let askers = state.askers.lock().unwrap().clone();
    let corrupted = state.corrupted.lock().unwrap().clone();
    let errors = state.errors.lock().unwrap().clone();
    assert_eq!(
        askers,
        honest.iter().map(|s| s.to_string()).collect::<HashSet<_>>(),
        "every honest agent was sent to mallory; errors: {errors:?}; {}",
        context(&m, Some(job), &all)
    );
    for h in honest {
        assert!(
            corrupted.iter().any(|(a, _)| a == h),
            "{h} got a corrupted chunk: {corrupted:?}"
        );
    }
    assert!(state.confirmed.load(Ordering::SeqCst), "errors: {errors:?}");

    // The honest agents rejected every bad chunk before storing it and got it elsewhere.
    for a in &agents {
        a.wait_export(&bytes);
        let s = wait_for(
            "status file shows the job done",
            t.left(),
            || a.log(),
            || {
                a.job_status("status.json", job)
                    .filter(|s| s["state"] == "done")
            },
        );
        assert!(
            s["bad_chunks"].as_u64().unwrap() >= 1,
            "{} counted its bad chunks: {s}",
            a.name
        );
        eprintln!("{}: bad_chunks {}", a.name, s["bad_chunks"]);
        assert_eq!(s["verified"], s["chunks"], "{s}");
        let p = participant(&done, &a.name);
        assert_eq!(p["state"], "confirmed", "{done}");
        assert_eq!(
            bytes_from(&done, &a.name, Some(MALLORY)),
            0,
            "no byte from mallory verified: {done}"
        );
        let total: u64 = done["source_bytes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["agent"] == a.name.as_str())
            .map(|s| s["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(total, bytes.len() as u64, "all bytes from others: {done}");
        assert!(
            !sources_in_note(&note_of(&done, &a.name)).contains(&MALLORY.to_string()),
            "{}'s sources no longer name mallory: {done}",
            a.name
        );
    }
    assert_eq!(done["confirmed_count"], 4, "{done}");

    // The manager heard of it from the agents.
    let log = m.log();
    let reports = lines_with(&log, &["peer trouble", "peer=mallory", "BadChunk"]);
    assert!(
        !reports.is_empty(),
        "PeerTrouble{{BadChunk}} reached the manager; log:\n{log}"
    );
    // Each reporter was routed around it at once; two reports are the evidence that retires
    // it for everyone (issue 14); nobody honest is demoted for reporting it.
    assert_eq!(
        lines_with(&log, &["retired as a source", "agent=mallory"]).len(),
        1,
        "mallory retired once the second report was in; log:\n{log}"
    );
    assert!(
        lines_with(&log, &["trouble reporter demoted"]).is_empty(),
        "no honest reporter demoted; log:\n{log}"
    );
    eprintln!(
        "mallory served {} corrupted chunks; the manager logged {} BadChunk reports; \
         bytes per source: {}",
        corrupted.len(),
        reports.len(),
        done["source_bytes"]
    );
    drop(rt);
}

// ---------------------------------------------------------------------------------------
// (b) A source killed mid-job.

#[test]
fn a_source_killed_mid_job_is_routed_around_and_given_up() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start_args(BATON, &["--give-up", "3", "--up-bps", "256KiB"]);
    let root = m.dir.clone();
    let names = ["k1", "k2", "k3", "k4", "k5"];
    let mut agents: Vec<AgentProc> = names
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &["--up-bps", "256KiB"]))
        .collect();
    m.wait_connected(&names);
    let bytes = pseudo_random(2_000_000, 5);
    let file = publish_file(&m, "bundle.bin", &bytes);
    let job = m.create_job(&file, &names, json!({ "chunk_size": 16384 }));

    // The victim: the agent from which the others have verified the most bytes so far, once
    // that is at least two chunks, and while some of its fetchers still fetch from it.
    let (victim, before) = wait_for(
        "others verified chunks from a peer source",
        t.left(),
        || context(&m, Some(job), &[]),
        || {
            let j = m.job(job);
            let best = names
                .iter()
                .map(|n| {
                    let served: u64 = names.iter().map(|f| bytes_from(&j, f, Some(n))).sum();
                    (served, *n)
                })
                .max()?;
            (best.0 >= 2 * 16384).then(|| (best.1.to_string(), j))
        },
    );
    let fetching_from_victim: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| {
            let p = participant(&before, n);
            p["state"] != "confirmed" && sources_in_note(&note_of(&before, n)).contains(&victim)
        })
        .collect();
    assert!(
        !fetching_from_victim.is_empty(),
        "mid-job: someone still fetches from {victim}: {before}"
    );
    let pos = names.iter().position(|n| *n == victim).unwrap();
    agents[pos].kill();
    let killed_at = Instant::now();
    eprintln!(
        "killed {victim}, a source of {fetching_from_victim:?}; bytes per source then: {}",
        before["source_bytes"]
    );
    let others: Vec<&str> = names.iter().copied().filter(|n| *n != victim).collect();

    // Reassigned: no participant still fetching names the dead source.
    wait_for(
        "fetchers reassigned away from the killed source",
        t.left(),
        || context(&m, Some(job), &[]),
        || {
            let j = m.job(job);
            others
                .iter()
                .all(|n| {
                    participant(&j, n)["state"] == "confirmed"
                        || !sources_in_note(&note_of(&j, n)).contains(&victim)
                })
                .then_some(())
        },
    );
    eprintln!(
        "fetchers reassigned {:?} after the kill",
        killed_at.elapsed()
    );
    let after = m.job(job);
    for n in &others {
        eprintln!("{n}: {:?} -> {:?}", note_of(&before, n), note_of(&after, n));
    }
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    eprintln!("job finished {:?} after the kill", killed_at.elapsed());
    let killed = participant(&done, &victim);
    assert_eq!(killed["state"], "failed", "{done}");
    assert!(
        killed["reason"].as_str().unwrap().contains("given up"),
        "{done}"
    );
    assert_eq!(done["confirmed_count"], 4, "{done}");
    assert_eq!(done["failed_count"], 1, "{done}");
    for (i, a) in agents.iter().enumerate() {
        if i != pos {
            assert_eq!(participant(&done, &a.name)["state"], "confirmed", "{done}");
            a.wait_export(&bytes);
        }
    }
    let log = m.log();
    assert!(
        !lines_with(&log, &["participant failed", &format!("agent={victim}")]).is_empty(),
        "the give-up is logged"
    );
}

// ---------------------------------------------------------------------------------------
// (c) An agent killed and restarted mid-transfer.

#[test]
fn a_killed_agent_resumes_and_refetches_at_most_its_window() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start_args(BATON, &["--give-up", "30", "--up-bps", "768KiB"]);
    let root = m.dir.clone();
    let window = 4u64;
    let chunk = 16384u64;
    let args = |status: &str| {
        vec![
            "--window".to_string(),
            window.to_string(),
            "--status-file".to_string(),
            root.join("r1").join(status).to_str().unwrap().to_string(),
        ]
    };
    let first = args("status-1.json");
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut a = AgentProc::spawn(&m, &root, "r1", &first);
    m.wait_connected(&["r1"]);
    let bytes = pseudo_random(2_000_000, 3);
    let total = bytes.len().div_ceil(chunk as usize) as u64;
    let file = publish_file(&m, "image.bin", &bytes);
    let job = m.create_job(&file, &["r1"], json!({ "chunk_size": chunk }));

    // Killed (SIGKILL) once its status file shows a third of the chunks verified.
    let before = wait_for(
        "a third of the chunks verified",
        t.left(),
        || a.log(),
        || {
            let v = a.job_status("status-1.json", job)?["verified"].as_u64()?;
            (v >= total / 3).then_some(v)
        },
    );
    a.kill();
    assert!(before < total, "killed mid-transfer ({before} of {total})");

    let second = args("status-2.json");
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let a = AgentProc::spawn_enrolled(&m, &root, "r1", &second);
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    assert_eq!(done["confirmed_count"], 1, "{done}");
    a.wait_export(&bytes);
    let s = wait_for(
        "status file shows the job done",
        t.left(),
        || a.log(),
        || {
            a.job_status("status-2.json", job)
                .filter(|s| s["state"] == "done")
        },
    );
    let resumed = s["resumed"].as_u64().unwrap();
    let fetched = s["fetched"].as_u64().unwrap();
    assert!(
        resumed >= before,
        "resumed {resumed} of the {before} verified before the kill: {s}"
    );
    assert_eq!(resumed + fetched, total, "{s}");
    assert!(
        fetched <= total - before + window,
        "fetched {fetched} after the restart, more than {} missing + window {window}: {s}",
        total - before
    );
    // The manager's side: what it sent over the wire is the content once, plus at most a
    // window of chunks lost in flight, plus framing and proofs (under 512 bytes a chunk).
    let (_, status) = m.api("GET", "/api/v1/status", None);
    let sent = status["bytes_sent"].as_u64().unwrap();
    let bound = bytes.len() as u64 + window * chunk + (total + window) * 512 + 16 * 1024;
    eprintln!(
        "killed at {before} of {total} verified; after the restart: resumed {resumed}, \
         fetched {fetched}; the manager sent {sent} bytes for {} (bound {bound})",
        bytes.len()
    );
    assert!(
        sent <= bound,
        "manager sent {sent} bytes for {} of content (bound {bound})",
        bytes.len()
    );
}

// ---------------------------------------------------------------------------------------
// (d) An agent's disk is full.

#[test]
fn an_agent_with_a_full_disk_fails_and_is_routed_around() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start_args(BATON, &["--give-up", "10"]);
    let root = m.dir.clone();
    // The full one reports the fastest upload, so the planner wants it as a source.
    let full = AgentProc::spawn(
        &m,
        &root,
        "d1",
        &[
            "--max-storage",
            "256KiB",
            "--up-bps",
            "64MiB",
            "--status-file",
            root.join("d1/status.json").to_str().unwrap(),
        ],
    );
    let others: Vec<AgentProc> = ["d2", "d3"]
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &["--up-bps", "1MiB"]))
        .collect();
    m.wait_connected(&["d1", "d2", "d3"]);
    let bytes = pseudo_random(1_000_000, 9);
    let file = publish_file(&m, "big.bin", &bytes);
    let job = m.create_job(&file, &["d1", "d2", "d3"], json!({ "chunk_size": 16384 }));
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");

    let p = participant(&done, "d1");
    assert_eq!(p["state"], "failed", "{done}");
    assert!(
        p["reason"].as_str().unwrap().contains("StorageFull"),
        "failed with StorageFull: {done}"
    );
    assert_eq!(done["failed_count"], 1, "{done}");
    assert_eq!(done["confirmed_count"], 2, "{done}");
    for a in &others {
        assert_eq!(participant(&done, &a.name)["state"], "confirmed", "{done}");
        assert_eq!(bytes_from(&done, &a.name, Some("d1")), 0, "{done}");
        assert!(
            !sources_in_note(&note_of(&done, &a.name)).contains(&"d1".to_string()),
            "{}'s sources no longer name d1: {done}",
            a.name
        );
        a.wait_export(&bytes);
    }
    // The agent says why. (Its status file does not list a job that failed before it
    // opened its content slot, so the log is where it shows.)
    wait_for(
        "the full agent logs the failure",
        t.left(),
        || full.log(),
        || (!lines_with(&full.log(), &["job failed", "StorageFull"]).is_empty()).then_some(()),
    );
    assert!(
        !full.dir.join("out").exists(),
        "nothing exported by the full agent"
    );
}

// ---------------------------------------------------------------------------------------
// (e) A replayed handshake and a tampered frame, between a real agent and the real server.

/// What the proxy saw.
#[derive(Default)]
struct ProxyState {
    /// Per connection, in accept order: its first client → server frames, header included.
    first_frames: Mutex<Vec<Vec<Vec<u8>>>>,
    /// Flip one bit in the next client → server frame after the handshake.
    flip: AtomicBool,
    /// Frames altered so far.
    flipped: AtomicU32,
}

/// Relays one connection to `upstream` frame by frame, recording and maybe altering frames.
async fn proxy_conn(client: TcpStream, upstream: SocketAddr, state: Arc<ProxyState>, n: usize) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    });
    for index in 0usize.. {
        let mut header = [0u8; 2];
        if cr.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u16::from_be_bytes(header) as usize;
        let mut frame = vec![0u8; 2 + len];
        frame[..2].copy_from_slice(&header);
        if cr.read_exact(&mut frame[2..]).await.is_err() {
            break;
        }
        if index < 4 {
            state.first_frames.lock().unwrap()[n].push(frame.clone());
        }
        // Frames 0 and 1 are handshake messages 1 and 3; the rest are encrypted messages.
        if index >= 2 && len > 0 && state.flip.swap(false, Ordering::SeqCst) {
            frame[2 + len / 2] ^= 0x10;
            state.flipped.fetch_add(1, Ordering::SeqCst);
        }
        if sw.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = sw.shutdown().await;
}

/// Reads one length-prefixed frame from a blocking socket.
fn read_frame(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 2];
    s.read_exact(&mut header)?;
    let mut body = vec![0u8; u16::from_be_bytes(header) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// Whether the peer closes the blocking socket (EOF or reset) within the bound.
fn closed_by_peer(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..1000 {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn a_replayed_handshake_and_a_tampered_frame_are_refused_at_the_server() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start_args(BATON, &["--give-up", "10"]);
    let root = m.dir.clone();
    let rt = runtime();
    let proxy = Arc::new(ProxyState::default());
    let upstream = m.agent_addr();
    let proxy_addr = {
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = proxy.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let n = {
                    let mut all = state.first_frames.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                tokio::spawn(proxy_conn(client, upstream, state.clone(), n));
            }
        });
        addr
    };
    // p1 talks to the manager through the proxy; p2 directly.
    let p1 = AgentProc::spawn_custom(&m, &root, "p1", &proxy_addr.to_string(), true, &[]);
    let p2 = AgentProc::spawn(&m, &root, "p2", &[]);
    m.wait_connected(&["p1", "p2"]);
    let agents = [&p1, &p2];

    // Replay p1's recorded handshake messages 1 and 3 on a new connection: the manager
    // answers message 1 with a fresh message 2, so the recorded message 3 cannot decrypt.
    let recorded = wait_for(
        "the proxy recorded p1's handshake",
        t.left(),
        || context(&m, None, &agents),
        || {
            let all = proxy.first_frames.lock().unwrap();
            all.first().filter(|f| f.len() >= 3).cloned()
        },
    );
    let failed_before = lines_with(&m.log(), &["agent handshake failed"]).len();
    let mut s = std::net::TcpStream::connect(upstream).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(&recorded[0]).unwrap();
    let msg2 = read_frame(&mut s).expect("the manager answers a replayed message 1");
    assert!(!msg2.is_empty());
    s.write_all(&recorded[1]).unwrap();
    assert!(closed_by_peer(&mut s), "replayed message 3 is refused");
    // Replaying the session's first encrypted frame after it changes nothing either.
    let mut s = std::net::TcpStream::connect(upstream).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(&recorded[0]).unwrap();
    read_frame(&mut s).unwrap();
    s.write_all(&recorded[1]).unwrap();
    let _ = s.write_all(&recorded[2]);
    assert!(closed_by_peer(&mut s), "replayed session is refused");
    let refused = wait_for(
        "both replays are logged as failed handshakes",
        t.left(),
        || m.log(),
        || {
            let log = m.log();
            let lines = lines_with(&log, &["agent handshake failed"]);
            (lines.len() >= failed_before + 2).then(|| {
                lines[failed_before..]
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
            })
        },
    );
    for line in &refused {
        assert!(line.contains("handshake message refused"), "{line}");
        eprintln!("replay: {line}");
    }
    assert_eq!(connected(&m), ["p1", "p2"]);
    assert_eq!(
        lines_with(&m.log(), &["agent connected", "agent=p1"]).len(),
        1,
        "no replay took p1's session over"
    );

    // A flipped bit in p1's next encrypted frame: the manager closes that connection with a
    // logged reason, p1 reconnects, and the job completes for both.
    proxy.flip.store(true, Ordering::SeqCst);
    let bytes = pseudo_random(600_000, 13);
    let file = publish_file(&m, "fw.bin", &bytes);
    let job = m.create_job(&file, &["p1", "p2"], json!({ "chunk_size": 16384 }));
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    assert_eq!(proxy.flipped.load(Ordering::SeqCst), 1);
    assert_eq!(done["confirmed_count"], 2, "{done}");
    p1.wait_export(&bytes);
    p2.wait_export(&bytes);
    let log = m.log();
    let closed = lines_with(&log, &["closing connection", "agent=p1"]);
    assert_eq!(closed.len(), 1, "the tampered frame is logged; log:\n{log}");
    assert!(
        closed[0].contains("frame failed authentication"),
        "{}",
        closed[0]
    );
    eprintln!("tamper: {}", closed[0]);
    assert_eq!(
        lines_with(&log, &["agent connected", "agent=p1"]).len(),
        2,
        "p1 reconnected once; log:\n{log}"
    );
    assert!(proxy.first_frames.lock().unwrap().len() >= 2);
    // p2 never noticed.
    assert_eq!(
        lines_with(&log, &["agent connected", "agent=p2"]).len(),
        1,
        "{log}"
    );
    assert!(lines_with(&log, &["agent disconnected", "agent=p2"]).is_empty());
    assert!(!p2.log().contains("manager session ended"), "{}", p2.log());
    assert_eq!(connected(&m), ["p1", "p2"]);
    drop(rt);
}

// ---------------------------------------------------------------------------------------
// (f) A participant that lies in `PeerTrouble` reports (issue 14, item 4).

/// What the lying fake agent did, shared with the test.
#[derive(Default)]
struct Liar {
    /// The honest peer it accused of a bad chunk (the first it was told to fetch from).
    accused: Mutex<Option<String>>,
    /// It fetched everything (from the manager) and confirmed with `Have`.
    confirmed: AtomicBool,
    /// Errors of its task, for the test's messages.
    errors: Mutex<Vec<String>>,
}

const LIAR: &str = "liar";

/// The liar's manager session after `Welcome`: the first peer named in its sources is
/// accused of a bad chunk at once (it never even connects to it); it fetches every chunk
/// from the manager (window of 8), then confirms; answers pings. One lie only: a reporter
/// that accuses more than a few peers is demoted for that alone.
async fn liar_session(mut r: Reader, mut w: Writer, state: Arc<Liar>) -> Result<(), String> {
    let mut job: Option<(JobRef, Digest, u32)> = None;
    let (mut next, mut held, mut received) = (0u32, 0u32, 0u64);
    loop {
        let frame = r.recv().await.map_err(|e| format!("session: {e}"))?;
        let msg = Message::decode(frame).map_err(|e| format!("decode: {e:?}"))?;
        let (j, sources) = match msg {
            Message::Fetch {
                job: j,
                manifest,
                sources,
                ..
            } => {
                if job.is_none() {
                    let chunks = manifest.chunks();
                    job = Some((j, manifest.root, chunks));
                    next = request_first_chunks(&mut w, manifest.root, chunks).await?;
                }
                (j, sources.to_vec())
            }
            Message::Sources { job: j, sources } => (j, sources.to_vec()),
            Message::Chunk { root, data, .. } => {
                let Some((j, _, chunks)) = job else {
                    continue;
                };
                held += 1;
                received += data.len() as u64;
                if next < chunks {
                    let req = Message::ChunkRequest { root, index: next };
                    w.send(&req.to_vec()).await.map_err(|e| e.to_string())?;
                    next += 1;
                }
                if held == chunks && !state.confirmed.load(Ordering::SeqCst) {
                    confirm_from_manager(&mut w, j, root, chunks, received).await?;
                    state.confirmed.store(true, Ordering::SeqCst);
                }
                continue;
            }
            Message::Ping { nonce } => {
                w.send(&Message::Pong { nonce }.to_vec())
                    .await
                    .map_err(|e| e.to_string())?;
                continue;
            }
            _ => continue,
        };
        if state.accused.lock().unwrap().is_some() {
            continue;
        }
        for range in sources {
            let Source::Peer { id: peer, .. } = range.source else {
                continue;
            };
            let lie = Message::PeerTrouble {
                job: j,
                peer: peer.clone(),
                trouble: Trouble::BadChunk { index: range.first },
            };
            w.send(&lie.to_vec()).await.map_err(|e| e.to_string())?;
            *state.accused.lock().unwrap() = Some(peer.to_string());
            break;
        }
    }
}

#[test]
fn a_lying_trouble_reporter_retires_nobody_and_is_demoted() {
    let t = Deadline::start(Duration::from_secs(40));
    let m = Manager::start_args(BATON, &["--give-up", "10", "--up-bps", "1MiB"]);
    let root = m.dir.clone();
    let rt = runtime();
    let state = Arc::new(Liar::default());

    // The liar: enrolled like any agent, a leaf, so the plan sends it to honest peers.
    let me = Identity::from_seed([77; 32]);
    m.enrol(LIAR, &me.public());
    let (r, w) = rt.block_on(async {
        let stream = TcpStream::connect(m.agent_addr()).await.unwrap();
        let hello = Hello::new(Role::Agent, id(LIAR), caps::ALL, None);
        let link = link::connect(stream, &me, &m.key(), hello, &Limits::default())
            .await
            .expect("the liar's handshake");
        let (mut r, mut w) = link.split();
        let report = Report {
            site: Name::new(),
            segment: Name::new(),
            ..report(LIAR)
        };
        w.send(&Message::Report(report).to_vec()).await.unwrap();
        recv_until(&mut r, |msg| match msg {
            Message::Welcome { .. } => Some(()),
            _ => None,
        })
        .await;
        (r, w)
    });
    {
        let state = state.clone();
        rt.spawn(async move {
            if let Err(e) = liar_session(r, w, state.clone()).await {
                state.errors.lock().unwrap().push(e);
            }
        });
    }
    let honest = ["t1", "t2", "t3", "t4"];
    let agents: Vec<AgentProc> = honest
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &["--up-bps", "1MiB"]))
        .collect();
    let all: Vec<&AgentProc> = agents.iter().collect();
    let mut names = honest.to_vec();
    names.push(LIAR);
    m.wait_connected(&names);

    let bytes = pseudo_random(3_000_000, 14);
    let file = publish_file(&m, "content.bin", &bytes);
    let job = m.create_job(&file, &names, json!({ "chunk_size": 16384 }));
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    let accused = state.accused.lock().unwrap().clone();
    let errors = state.errors.lock().unwrap().clone();
    eprintln!(
        "the liar accused {accused:?}; bytes per source: {}; warnings: {}",
        done["source_bytes"], done["warnings"]
    );
    let Some(peer) = accused else {
        panic!(
            "the liar was sent to an honest peer; errors: {errors:?}; {}",
            context(&m, Some(job), &all)
        );
    };
    assert!(state.confirmed.load(Ordering::SeqCst), "errors: {errors:?}");

    // Every honest agent got the content; the accused kept serving the other honest agents.
    assert_eq!(done["confirmed_count"], 5, "{done}");
    for a in &agents {
        a.wait_export(&bytes);
        assert_eq!(participant(&done, &a.name)["state"], "confirmed", "{done}");
    }
    // Retired at the lie, it would have served little more than what was in flight then (a
    // window of chunks per fetcher, a sixth of this content to the three); it served its
    // stripe (a quarter of the content) to each of the others.
    let served: Vec<u64> = honest
        .iter()
        .filter(|h| **h != peer)
        .map(|h| bytes_from(&done, h, Some(&peer)))
        .collect();
    assert!(
        served.iter().sum::<u64>() >= bytes.len() as u64 / 2,
        "{peer} kept serving the other honest agents: {served:?}; {done}"
    );
    let log = m.log();
    // The report reached the engine from an assigned fetcher, and retired nobody.
    assert_eq!(
        lines_with(
            &log,
            &[
                "peer trouble",
                "agent=liar",
                &format!("peer={peer}"),
                "BadChunk"
            ]
        )
        .len(),
        1,
        "the liar's report was heard; log:\n{log}"
    );
    assert!(
        lines_with(&log, &["retired as a source"]).is_empty(),
        "nobody was retired; log:\n{log}"
    );

    // The liar, and only the liar, is demoted, for the contradiction: a warning line in
    // the log and a warning with the job.
    let demoted = lines_with(&log, &["trouble reporter demoted"]);
    assert_eq!(demoted.len(), 1, "one demotion; log:\n{log}");
    assert!(
        demoted[0].contains("agent=liar")
            && demoted[0].contains(&format!("report about {peer} was contradicted")),
        "{}",
        demoted[0]
    );
    eprintln!("{}", demoted[0]);
    let warnings: Vec<&str> = done["warnings"]
        .as_array()
        .map(|w| w.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("liar demoted as a trouble reporter")),
        "the job's warnings name the liar: {done}"
    );
    drop(rt);
}
