//! A policy's time window closing mid-job, with real processes: a manager whose upload is
//! capped (`--up-bps`) so the job spans the close, three `baton agent`s, and a policy of two
//! windows a minute apart built around the wall clock's next minute (UTC). At the close
//! transfers stop within 5 s (the agents' status files say they were told to stop and their
//! verified chunks stop growing; the bytes they receive on the wire stop; the manager's
//! stored progress settles), nothing moves during the closed minute, the job's warnings say
//! when it resumes, and at the next opening the job resumes from what the agents hold and
//! completes with the content intact.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_test_support::AgentProc;
use baton_test_support::Manager;
use serde_json::{Value, json};

use crate::common::BATON;

/// The content: 48 chunks of 4 KiB.
const SIZE: usize = 192 * 1024;
/// Chunk size.
const CHUNK: u64 = 4096;
/// Transfers must stop within this long of the close.
const STOP_WITHIN: Duration = Duration::from_secs(5);
/// The job must still be running this long after the close would have let it finish early.
const MIN_BEFORE_CLOSE: u64 = 14;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One look at the job during the test, `at` seconds from the close.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    agents_verified: u64,
    stopped: bool,
    wire: u64,
    manager_verified: u64,
}

/// Chunks verified over every participant, as the manager last stored them.
fn verified(job: &Value) -> u64 {
    job["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            if p["state"] == "confirmed" {
                p["total"].as_u64().unwrap_or(0)
            } else {
                p["verified"].as_u64().unwrap_or(0)
            }
        })
        .sum()
}

/// Bytes every agent says it received on the wire (status files).
fn wire_received(agents: &[AgentProc]) -> u64 {
    agents
        .iter()
        .filter_map(|a| a.status("status.json"))
        .map(|s| s["wire_bytes_received"].as_u64().unwrap_or(0))
        .sum()
}

/// `{"start_minute", "end_minute"}` of the UTC minutes `from..to` (unix minutes).
fn window(from: u64, to: u64) -> Value {
    json!({ "start_minute": from % 1440, "end_minute": to % 1440, "zone": "UTC" })
}

#[test]
fn a_window_closing_mid_job_stops_transfers_and_the_job_completes_after_the_next_opening() {
    // The close: the next minute boundary at least `MIN_BEFORE_CLOSE` s away.
    let now = unix_now();
    let mut close = (now / 60.0).ceil() as u64 * 60;
    if (close as f64) - now < MIN_BEFORE_CLOSE as f64 {
        close += 60;
    }
    let until_close = close as f64 - now;
    // The manager's upload lets one copy of the content out in about the time to the close
    // plus 12 s: the job is mid-way at the close (the agents relay what enters).
    let up_bps = (SIZE as f64 / (until_close + 12.0)) as u64;
    let m = Manager::start_args(BATON, &["--up-bps", &up_bps.to_string()]);
    let root = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let file = files.path().join("window.bin");
    let content = baton_test_support::pseudo_random(SIZE, 33);
    std::fs::write(&file, &content).unwrap();
    let names = ["w0", "w1", "w2"];
    let agents: Vec<AgentProc> = names
        .iter()
        .map(|name| {
            let status = root.path().join(name).join("status.json");
            AgentProc::spawn(
                &m,
                root.path(),
                name,
                &["--status-file", status.to_str().unwrap()],
            )
        })
        .collect();
    m.wait_connected(&names);
    let (close_min, open_min) = (close / 60, close / 60 + 1);
    let policy = json!({
        "windows": [window(close_min - 2, close_min), window(open_min, open_min + 15)],
    });
    let job = m.create_job(
        &file,
        &names,
        json!({ "name": "window-app", "chunk_size": CHUNK, "policy": policy }),
    );
    let total = 3 * (SIZE as u64 / CHUNK);

    // Until the reopening, every 200 ms: what the agents' status files say (chunks verified,
    // whether all were told to stop), the bytes they received on the wire, and the chunks
    // verified as the manager stored them.
    let reopen = (close + 60) as f64;
    let mut samples: Vec<Sample> = Vec::new();
    while unix_now() < reopen - 0.5 {
        let statuses: Vec<Option<Value>> = agents
            .iter()
            .map(|a| a.job_status("status.json", job))
            .collect();
        let at = unix_now();
        let j = m.job(job);
        assert_eq!(j["state"], "running", "finished before the reopening: {j}");
        samples.push(Sample {
            at: at - close as f64,
            agents_verified: statuses
                .iter()
                .map(|s| {
                    s.as_ref()
                        .map_or(0, |s| s["verified"].as_u64().unwrap_or(0))
                })
                .sum(),
            stopped: statuses.iter().all(|s| {
                s.as_ref()
                    .is_some_and(|s| s["state"] == "cancelled" || s["state"] == "complete")
            }),
            wire: wire_received(&agents),
            manager_verified: verified(&j),
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let around: Vec<String> = samples
        .iter()
        .filter(|s| s.at.abs() < 7.0)
        .map(|s| {
            format!(
                "{:+.1}s {}/{} {} {}",
                s.at, s.agents_verified, s.manager_verified, s.stopped, s.wire
            )
        })
        .collect();
    eprintln!(
        "window e2e: around the close (s, chunks verified by the agents/at the manager, all told to stop, wire bytes): {around:?}"
    );
    let at_close = samples
        .iter()
        .rev()
        .find(|s| s.at <= 0.0)
        .copied()
        .expect("samples before the close");
    assert!(
        at_close.agents_verified > 0 && at_close.agents_verified < total,
        "the job must be mid-way at the close: {} of {total} chunks verified",
        at_close.agents_verified
    );
    let last = samples.last().copied().unwrap();
    // When each measure stopped moving after the close: the first sample at its final value.
    let settled = |value: fn(&Sample) -> u64| {
        samples
            .iter()
            .find(|s| s.at > 0.0 && value(s) == value(&last))
            .map_or(0.0, |s| s.at)
    };
    let verified_stop = settled(|s| s.agents_verified);
    let manager_stop = settled(|s| s.manager_verified);
    let told = samples
        .iter()
        .find(|s| s.at > 0.0 && s.stopped)
        .map_or(f64::INFINITY, |s| s.at);
    // A chunk on the wire is at least `CHUNK` bytes within a second (keepalives are smaller).
    let mut wire_stop = 0.0f64;
    for (i, a) in samples.iter().enumerate().filter(|(_, s)| s.at > 0.0) {
        for b in samples[i + 1..].iter().take_while(|b| b.at - a.at <= 1.0) {
            if b.wire - a.wire >= CHUNK {
                wire_stop = wire_stop.max(b.at);
            }
        }
    }
    let after_stop = samples.iter().find(|s| s.at >= wire_stop).unwrap().wire;
    eprintln!(
        "window e2e: {} of {total} chunks at the close; every agent told to stop {told:.1} s after the close; chunks verified by the agents stopped {verified_stop:.1} s after, chunk bytes on the wire {wire_stop:.1} s after, the manager's stored count {manager_stop:.1} s after; {} B on the wire in the rest of the closed minute; manager up {up_bps} B/s",
        at_close.agents_verified,
        last.wire - after_stop,
    );
    let limit = STOP_WITHIN.as_secs_f64();
    assert!(
        told <= limit,
        "agents told to stop {told:.1} s after the close"
    );
    assert!(
        verified_stop <= limit,
        "agents still verified chunks {verified_stop:.1} s after the close"
    );
    assert!(
        wire_stop <= limit,
        "agents still received chunks {wire_stop:.1} s after the close"
    );
    // The manager's view settles too (its stored progress may trail the agents' by a flush).
    assert!(
        manager_stop <= 2.0 * limit,
        "the manager's progress still grew {manager_stop:.1} s after the close"
    );
    assert!(last.manager_verified < total);
    let j = m.job(job);
    let warnings = j["warnings"].to_string();
    assert!(
        warnings.contains("window closed at") && warnings.contains("they resume at"),
        "{j}"
    );

    // The next window opens: the job resumes from what the agents hold and completes.
    let started = Instant::now();
    let done = m.wait_job(job, Duration::from_secs(60), |j| j["state"] == "finished");
    eprintln!(
        "window e2e: finished {:.1} s after the reopening",
        unix_now() - reopen
    );
    assert_eq!(done["confirmed_count"], 3, "{done}");
    assert!(started.elapsed() < Duration::from_secs(60));
    for a in &agents {
        a.wait_export(&content);
    }
    let warnings = done["warnings"].to_string();
    assert!(warnings.contains("window opened at"), "{done}");
}
