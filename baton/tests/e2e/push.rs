//! End to end: `baton serve`, real `baton agent` processes and the `baton` client commands.
//!
//! Agents enrol with one-time tokens, `baton push --wait` follows the job to
//! its end, every agent's exported copy equals the file, and the database
//! holds a confirmation for each. A manager killed mid-job resumes it under a
//! new epoch after its restart. Every wait is bounded.

use std::time::Duration;

use crate::common::*;
use baton_test_support::{AgentProc, Manager, free_loopback_addr, manager::BOUND, pseudo_random};
use serde_json::Value;

#[test]
fn push_wait_relays_to_every_agent_and_records_confirmations() {
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let data = m.data_dir();
    let data = data.to_str().unwrap();
    let agents: Vec<AgentProc> = ["a1", "a2", "a3"]
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &["--up-bps", "4MiB"]))
        .collect();
    m.wait_connected(&["a1", "a2", "a3"]);

    let bytes = pseudo_random(1_500_000, 1);
    let file = root.join("firmware.bin");
    std::fs::write(&file, &bytes).unwrap();
    let out = baton(
        &[
            "push",
            file.to_str().unwrap(),
            "--agents",
            "a1,a2,a3",
            "--name",
            "router-fw",
            "--chunk-size",
            "16KiB",
            "--wait",
            "--data-dir",
            data,
        ],
        Duration::from_secs(60),
    );
    assert!(out.success, "push failed:\n{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("3 of 3 participants confirmed"),
        "{}",
        out.stdout
    );
    for a in &agents {
        a.wait_export(&bytes);
    }

    let jobs = baton(&["jobs", "--json", "--data-dir", data], BOUND);
    assert!(jobs.success, "{}", jobs.stderr);
    let jobs: Value = serde_json::from_str(&jobs.stdout).unwrap();
    assert_eq!(jobs[0]["state"], "finished");
    assert_eq!(jobs[0]["name"], "router-fw");
    assert_eq!(jobs[0]["confirmed"], 3);
    let id = jobs[0]["id"].as_u64().unwrap().to_string();
    let job = baton(&["job", &id, "--json", "--data-dir", data], BOUND);
    let job: Value = serde_json::from_str(&job.stdout).unwrap();
    assert_eq!(job["confirmed_count"], 3);
    assert_eq!(job["confirmations"].as_array().unwrap().len(), 3);
    assert_eq!(job["total_chunks"], 92);
    let received: u64 = job["source_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        received >= 3 * bytes.len() as u64,
        "every participant's bytes are accounted for: {job}"
    );
    let agents_out = baton(&["agents", "--json", "--data-dir", data], BOUND);
    let listed: Value = serde_json::from_str(&agents_out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    assert!(
        listed[0]["report"].is_object(),
        "reports are stored: {listed}"
    );
    let table = baton(&["job", &id, "--data-dir", data], BOUND);
    assert!(table.stdout.contains("confirmed"), "{}", table.stdout);

    // Refusals come back as clear errors and a non-zero exit.
    let ghost = baton(
        &[
            "push",
            file.to_str().unwrap(),
            "--agents",
            "a1,ghost",
            "--data-dir",
            data,
        ],
        BOUND,
    );
    assert!(!ghost.success);
    assert!(
        ghost.stderr.contains("not enrolled: ghost"),
        "{}",
        ghost.stderr
    );
}

#[test]
fn client_errors_say_what_to_do() {
    let out = baton(
        &[
            "jobs",
            "--manager-url",
            "http://127.0.0.1:9",
            "--admin-token",
            "x",
        ],
        BOUND,
    );
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .contains("cannot reach manager at http://127.0.0.1:9"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("baton serve"), "{}", out.stderr);

    let m = Manager::start(BATON);
    let url = format!("http://{}", m.info.http_addr);
    let out = baton(
        &["agents", "--manager-url", &url, "--admin-token", "wrong"],
        BOUND,
    );
    assert!(!out.success);
    assert!(out.stderr.contains("admin token"), "{}", out.stderr);
    let empty = tempfile::tempdir().unwrap();
    let out = baton(
        &["agents", "--data-dir", empty.path().to_str().unwrap()],
        BOUND,
    );
    assert!(!out.success);
    assert!(out.stderr.contains("no admin token"), "{}", out.stderr);
    let out = baton(
        &[
            "push",
            "/no/such/file",
            "--all",
            "--data-dir",
            m.data_dir().to_str().unwrap(),
        ],
        BOUND,
    );
    assert!(!out.success);
    assert!(out.stderr.contains("/no/such/file"), "{}", out.stderr);
}

#[test]
fn a_job_survives_a_manager_crash_and_resumes_under_a_new_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    // A fixed agent port, so that the agents find the restarted manager.
    let listen = free_loopback_addr();
    let mut m = Manager::start_on(BATON, tmp.path(), &listen);
    let root = tmp.path().to_path_buf();
    let agents = AgentProc::spawn_slow(&m, &root, &["r1", "r2"]);
    let bytes = pseudo_random(2_000_000, 7);
    let file = root.join("bundle.bin");
    std::fs::write(&file, &bytes).unwrap();
    let (status, job) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(serde_json::json!({ "path": file, "targets": { "agents": ["r1", "r2"] } })),
    );
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_u64().unwrap();
    m.wait_job_started(id);
    // Crash: no chance to clean up.
    m.crash();

    let m = Manager::start_on(BATON, tmp.path(), &listen);
    assert_eq!(m.info.epoch, 2);
    let done = m.wait_job(id, Duration::from_secs(60), |j| j["state"] == "finished");
    assert_eq!(done["epoch"], 2, "{done}");
    assert_eq!(done["confirmed_count"], 2, "{done}");
    for a in &agents {
        a.wait_export(&bytes);
    }
}

/// Runs `baton args… --data-dir <m's>`, which must fail; its stderr.
fn push_error(m: &Manager, args: &[&str]) -> String {
    let out = cli(m, args);
    assert!(!out.success, "baton {args:?} succeeded:\n{}", out.stdout);
    out.stderr
}

#[test]
fn a_signed_push_names_what_is_wrong() {
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let publisher = m.kit.as_ref().unwrap().publisher_key_file();
    let file = root.join("fw.bin");
    std::fs::write(&file, pseudo_random(20_000, 2)).unwrap();
    let other = root.join("other.bin");
    std::fs::write(&other, pseudo_random(20_000, 3)).unwrap();
    let manifest = root.join("fw.bin.manifest");
    let out = baton(
        &[
            "sign",
            file.to_str().unwrap(),
            "--key",
            publisher.to_str().unwrap(),
            "--name",
            "fw",
            "--version",
            "7",
            "--out",
            manifest.to_str().unwrap(),
        ],
        BOUND,
    );
    assert!(out.success, "{}", out.stderr);
    let push = |f: &std::path::Path| {
        vec![
            "push".to_string(),
            f.to_str().unwrap().to_string(),
            "--manifest".into(),
            manifest.to_str().unwrap().to_string(),
            "--agents".into(),
            "nobody".into(),
        ]
    };
    // Another file than the one signed: the roots differ.
    let args = push(&other);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let why = push_error(&m, &args);
    assert!(
        why.contains("Merkle root") && why.contains("is not the manifest's"),
        "{why}"
    );
    // Not a manifest at all.
    let why = push_error(
        &m,
        &[
            "push",
            file.to_str().unwrap(),
            "--manifest",
            other.to_str().unwrap(),
            "--agents",
            "x",
        ],
    );
    assert!(why.contains("not a manifest"), "{why}");
    // Not a trust document.
    let why = push_error(&m, &["trust", "push", other.to_str().unwrap()]);
    assert!(why.contains("not a trust document"), "{why}");
    // The right file is published (the job then needs an enrolled agent).
    let args = push(&file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let why = push_error(&m, &args);
    assert!(why.contains("not enrolled: nobody"), "{why}");
    // Signed online, a version below the one published is refused.
    let why = push_error(
        &m,
        &[
            "push",
            other.to_str().unwrap(),
            "--name",
            "fw",
            "--version",
            "6",
            "--agents",
            "x",
        ],
    );
    assert!(
        why.contains("\"fw\" version 7 is published already"),
        "{why}"
    );
}
