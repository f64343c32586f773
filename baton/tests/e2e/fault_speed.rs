//! Fair shares after faults, end to end (issue 20): a real `baton serve` and eight real
//! `baton agent` processes on loopback, each serving agent and the manager capped at the
//! same upload rate (1 MiB/s), so that the relay of 6 MiB takes seconds and a fault lands
//! mid-job.
//!
//! After a manager restart (SIGKILL a quarter of the way in, restarted at once on the
//! same agent port and data), and for agents that join a job for all agents once the
//! other servers hold the content (a slow leaf keeps the job running), no source serves
//! more than twice its upload-proportional share of the bytes still to be carried. What
//! a source served after the fault is its total over the job's per-edge transfers in the
//! API at the end, less its total read just before the fault (so bytes it served in
//! between count against it); the bytes still to be carried are the sum of that over
//! all sources. The content's length for every participant less what it had verified
//! is printed beside it: after a restart it is larger by what the agents reported to
//! the killed manager in its last second, which it never stored. An ignored test holds
//! the same check for late agents named as targets when the job starts, which fails
//! today: their stripes are seeded by the manager to every early agent.
//!
//! Faults are triggered by observed progress, never by a timer; every wait is bounded
//! by the test's deadline, and every child process is killed when its handle is dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use baton_protocol::types::PublicKey;
use baton_test_support::{AgentProc, Manager, free_loopback_addr, pseudo_random, wait_for};
use serde_json::{Value, json};

/// The most any one test here may take.
const LIMIT: Duration = Duration::from_secs(60);
/// Every serving agent's and the manager's upload cap, bytes per second.
const UP: u64 = 1 << 20;
/// [`UP`] as a command-line size.
const UP_ARG: &str = "1MiB";
/// The content's length: a few seconds of relay at [`UP`].
const LEN: usize = 6 << 20;
/// The content's chunk size.
const CHUNK: u64 = 32 * 1024;
/// The content's chunks.
const CHUNKS: u64 = (LEN as u64).div_ceil(CHUNK);
/// The `serve` flags of every manager here: the upload cap and a lenient give-up.
const SERVE: [&str; 4] = ["--give-up", "30", "--up-bps", UP_ARG];
/// The flags of a serving agent: the upload cap, no segment discovery.
const SERVER: [&str; 4] = ["--up-bps", UP_ARG, "--discovery-port", "0"];
/// The flags of an agent that serves nobody and downloads slowly: it keeps a job running.
const LEAF: [&str; 6] = [
    "--max-peers",
    "0",
    "--down-bps",
    "512KiB",
    "--discovery-port",
    "0",
];

/// Starts agent `name` with `flags`, enrolling with a token unless it is `enrolled` already.
fn agent(m: &Manager, root: &Path, name: &str, flags: &[&str], enrolled: bool) -> AgentProc {
    if enrolled {
        AgentProc::spawn_enrolled(m, root, name, flags)
    } else {
        AgentProc::spawn(m, root, name, flags)
    }
}

/// Enrols agent `name` with the key `baton agent --print-key` makes, before it ever connects.
fn enrol_ahead(m: &Manager, root: &Path, name: &str) {
    let data = root.join(name).join("data");
    let out = baton(
        &[
            "agent",
            "--print-key",
            "--id",
            name,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(out.success, "--print-key: {}", out.stderr);
    let key: [u8; 32] = hex::decode(out.stdout.trim()).unwrap().try_into().unwrap();
    m.enrol(name, &PublicKey(key));
}

/// Writes the test's content under the manager's directory; returns its path and bytes.
fn content(m: &Manager, seed: u32) -> (std::path::PathBuf, Vec<u8>) {
    let bytes = pseudo_random(LEN, seed);
    let file = m.dir.join("image.bin");
    std::fs::write(&file, &bytes).unwrap();
    (file, bytes)
}

/// Bytes each source served in a job, by its per-edge transfers (`"manager"` for the manager).
fn served_by_source(job: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for t in job["transfers"].as_array().expect("job JSON has transfers") {
        let from = t["from"].as_str().unwrap_or("manager").to_string();
        *out.entry(from).or_insert(0) += t["bytes"].as_u64().unwrap();
    }
    out
}

/// Chunks verified by all participants together.
fn verified_chunks(job: &Value) -> u64 {
    job["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["verified"].as_u64().unwrap_or(0))
        .sum()
}

/// Bytes the participants miss: the content's length less what each has verified.
fn missing_bytes(job: &Value) -> u64 {
    let len = LEN as u64;
    job["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| len - (p["verified"].as_u64().unwrap_or(0) * CHUNK).min(len))
        .sum()
}

/// Checks each source's bytes served from `before` to `after` against twice its share by `ups`.
fn assert_fair(what: &str, before: &Value, after: &Value, missing: u64, ups: &[(&str, u64)]) {
    // `ups`: the upload of every source that may serve (any other gets no share); `missing`:
    // the bytes missing by the verified counts, of which most must be carried after.
    let (was, is) = (served_by_source(before), served_by_source(after));
    let mut sources: Vec<&str> = ups.iter().map(|(n, _)| *n).collect();
    let others: Vec<&str> = is
        .keys()
        .map(String::as_str)
        .filter(|n| !sources.contains(n))
        .collect();
    sources.extend(others);
    let served = |n: &str| {
        let at = |m: &BTreeMap<String, u64>| m.get(n).copied().unwrap_or(0);
        (at(&was), at(&is), at(&is).saturating_sub(at(&was)))
    };
    let carried: u64 = sources.iter().map(|n| served(n).2).sum();
    let total_up: u64 = ups.iter().map(|(_, up)| up).sum();
    let mut table = format!(
        "{what}: {carried} bytes carried after ({missing} missing by the verified counts)\n  \
         source: upload, served before, at the end, after <= bound (twice the share)\n"
    );
    let mut over = Vec::new();
    for n in &sources {
        let up = ups.iter().find(|(s, _)| s == n).map_or(0, |(_, up)| *up);
        let (before, end, after) = served(n);
        let bound = (2 * carried as u128 * up as u128 / total_up as u128) as u64;
        let flag = if after > bound { "  OVER" } else { "" };
        table.push_str(&format!(
            "  {n:>8}: {up}, {before}, {end}, {after} <= {bound}{flag}\n"
        ));
        if after > bound {
            over.push(n.to_string());
        }
    }
    eprint!("{table}");
    assert!(
        carried >= missing / 2,
        "{what}: at least half the missing bytes are carried after:\n{table}"
    );
    assert!(
        over.is_empty(),
        "{what}: {over:?} served more than twice their share:\n{table}"
    );
}

/// The names `prefix1..=prefixN`.
fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

/// The upload of each of `agents` ([`UP`]) and of the manager ([`UP`]).
fn uploads<'a>(agents: &[&'a str]) -> Vec<(&'a str, u64)> {
    agents
        .iter()
        .map(|a| (*a, UP))
        .chain([("manager", UP)])
        .collect()
}

/// Manager log lines about the job's resumption and the agents' connections.
fn resumption_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("resumed job planned")
                || l.contains("job resumed")
                || l.contains("agent connected")
        })
        .collect()
}

/// A manager killed a quarter of the way in and restarted: the resumed job shares the rest fairly.
#[test]
fn after_a_manager_restart_no_source_serves_over_twice_its_share() {
    let t = Deadline::start(LIMIT);
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    // A fixed agent port, so that the agents find the restarted manager.
    let listen = free_loopback_addr();
    let mut m = Manager::start_args_in(BATON, &root, &listen, &SERVE);
    let names = names("r", 8);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let agents: Vec<AgentProc> = names
        .iter()
        .map(|n| agent(&m, &root, n, &SERVER, false))
        .collect();
    m.wait_connected(&names);
    let (file, bytes) = content(&m, 20);
    let job = m.create_job(&file, &names, json!({ "chunk_size": CHUNK }));

    // SIGKILL once a quarter of all chunks are verified; the view just before is the baseline.
    let all = names.len() as u64 * CHUNKS;
    let before = wait_for(
        "a quarter of the chunks verified",
        t.left(),
        || format!("{}\nlog:\n{}", m.job(job), m.log()),
        || Some(m.job(job)).filter(|j| verified_chunks(j) >= all / 4),
    );
    m.crash();
    let killed_at = Instant::now();
    let logged = m.log().len();

    let m = Manager::start_args_in(BATON, &root, &listen, &SERVE);
    let back = killed_at.elapsed();
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    eprintln!(
        "killed at {} of {all} chunks verified; manager back after {back:?}; job finished \
         {:?} after the kill, {:?} after the test began",
        verified_chunks(&before),
        killed_at.elapsed(),
        started.elapsed()
    );
    let log = m.log();
    for line in resumption_lines(&log[logged.min(log.len())..]) {
        eprintln!("  manager: {line}");
    }
    assert_eq!(done["confirmed_count"], names.len(), "{done}");
    assert_eq!(done["epoch"], 2, "resumed under the new epoch: {done}");
    assert_fair(
        "after the manager restart",
        &before,
        &done,
        missing_bytes(&before),
        &uploads(&names),
    );
    for a in &agents {
        a.wait_export(&bytes);
    }
}

/// Two agents joining a job for all once the servers hold the content spread over them.
#[test]
fn late_joiners_spread_over_the_holders_by_upload() {
    let t = Deadline::start(LIMIT);
    let started = Instant::now();
    let m = Manager::start_args(BATON, &SERVE);
    let root = m.dir.clone();
    let servers = names("s", 5);
    let servers: Vec<&str> = servers.iter().map(String::as_str).collect();
    let late = ["late1", "late2"];
    let mut agents: Vec<AgentProc> = servers
        .iter()
        .map(|n| agent(&m, &root, n, &SERVER, false))
        .collect();
    // A slow leaf keeps the job running after the servers confirmed.
    agents.push(agent(&m, &root, "leaf", &LEAF, false));
    let early: Vec<&str> = servers.iter().copied().chain(["leaf"]).collect();
    m.wait_connected(&early);
    let (file, bytes) = content(&m, 21);
    // A job for all agents takes those that connect while it runs.
    let (status, created) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({ "path": file, "targets": { "all": true }, "chunk_size": CHUNK })),
    );
    assert_eq!(status, 201, "{created}");
    let job = created["id"].as_u64().unwrap();

    // The late agents start once every server holds the content, the leaf not yet.
    let before = wait_for(
        "the servers confirmed",
        t.left(),
        || format!("{}\nlog:\n{}", m.job(job), m.log()),
        || Some(m.job(job)).filter(|j| j["confirmed_count"] == servers.len()),
    );
    assert_eq!(
        before["state"], "running",
        "the leaf is still fetching: {before}"
    );
    let joined_at = Instant::now();
    agents.extend(late.iter().map(|n| agent(&m, &root, n, &SERVER, false)));
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    eprintln!(
        "late agents started at {} of {} chunks verified; job finished {:?} after, {:?} \
         after the test began",
        verified_chunks(&before),
        early.len() as u64 * CHUNKS,
        joined_at.elapsed(),
        started.elapsed()
    );
    assert_eq!(done["confirmed_count"], early.len() + late.len(), "{done}");
    let sources: Vec<&str> = servers.iter().chain(&late).copied().collect();
    assert_fair(
        "after the late joiners",
        &before,
        &done,
        missing_bytes(&before) + late.len() as u64 * LEN as u64,
        &uploads(&sources),
    );
    for a in &agents {
        a.wait_export(&bytes);
    }
}

/// Two targets that connect half way through the job are served by upload, the manager too.
#[test]
fn late_targets_named_at_the_start_spread_over_the_holders_by_upload() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start_args(BATON, &SERVE);
    let root = m.dir.clone();
    let all = names("n", 8);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let (early, late) = all.split_at(6);
    let mut agents: Vec<AgentProc> = early
        .iter()
        .map(|n| agent(&m, &root, n, &SERVER, false))
        .collect();
    for n in late {
        enrol_ahead(&m, &root, n);
    }
    m.wait_connected(early);
    let (file, bytes) = content(&m, 22);
    let job = m.create_job(&file, &all, json!({ "chunk_size": CHUNK }));

    // The late targets start once the early ones hold half the content between them.
    let before = wait_for(
        "the early agents half way",
        t.left(),
        || format!("{}\nlog:\n{}", m.job(job), m.log()),
        || Some(m.job(job)).filter(|j| verified_chunks(j) >= early.len() as u64 * CHUNKS / 2),
    );
    agents.extend(late.iter().map(|n| agent(&m, &root, n, &SERVER, true)));
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    assert_eq!(done["confirmed_count"], all.len(), "{done}");
    assert_fair(
        "after the late targets",
        &before,
        &done,
        missing_bytes(&before),
        &uploads(&all),
    );
    for a in &agents {
        a.wait_export(&bytes);
    }
}
