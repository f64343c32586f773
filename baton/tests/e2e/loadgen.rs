//! `baton loadgen` at CI size: 2,000 real agent sessions from one process against a real
//! `baton serve`; every session must be welcomed, instructed and confirmed, and the manager
//! must count every confirmation (the benchmark's 10,000 and 100,000 runs are
//! `scripts/bench-sessions.sh`, not CI).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::BATON;

/// Sessions in the CI run.
const SESSIONS: u64 = 2_000;
/// The whole run (enrolment, manager start, set-up, job, one storm) on two busy cores.
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn two_thousand_sessions_are_all_welcomed_instructed_and_confirmed() {
    // The load generator holds a descriptor per session and raises its soft limit to the
    // hard one; the manager it starts does the same. Say so when the hard limit is too low
    // rather than skip.
    let hard = hard_descriptor_limit();
    assert!(
        hard >= SESSIONS + 256,
        "the hard descriptor limit is {hard}: this test needs {} (ulimit -Hn)",
        SESSIONS + 256
    );
    let started = Instant::now();
    let sessions = SESSIONS.to_string();
    let limit = LIMIT.as_secs().to_string();
    let out = Command::new(BATON)
        .args([
            "loadgen",
            "--sessions",
            &sessions,
            "--storms",
            "1",
            "--ping-secs",
            "0",
        ])
        .args(["--timeout", &limit, "--json", "--check"])
        .output()
        .expect("baton loadgen runs");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "baton loadgen failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    eprintln!("{report:#}");
    for field in ["welcomed", "instructed", "confirmed", "manager_confirmed"] {
        assert_eq!(
            report[field].as_u64(),
            Some(SESSIONS),
            "{field}: {report:#}"
        );
    }
    assert_eq!(
        report["reports_per_second"].as_array().map(Vec::len),
        Some(1)
    );
    assert!(
        report["manager_rss_bytes"].as_u64().unwrap_or(0) > 0,
        "the manager's RSS was read"
    );
    assert!(took < LIMIT, "the run took {took:?}");
}

/// The hard `RLIMIT_NOFILE` of this process (`ulimit -Hn` of a shell it starts).
fn hard_descriptor_limit() -> u64 {
    let out = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .expect("sh runs");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if text == "unlimited" {
        return u64::MAX;
    }
    text.parse().unwrap_or(0)
}
