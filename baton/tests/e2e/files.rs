//! Data directories, end to end (issue 14, item 7): real `baton serve` and `baton agent`
//! processes on loopback.
//!
//! A fresh manager's and agent's data directory is owner-only and the files holding
//! secrets or content in it are 0600; a second manager or agent on a data directory in
//! use exits non-zero within 5 s naming the directory, and a killed holder's lock is
//! released; a key file group or others may read stops start-up with the `chmod 600`
//! that fixes it. Every command runs under a time limit ([`baton`]), every wait is bounded.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use baton_test_support::{AgentProc, Manager, pseudo_random};
use serde_json::json;

/// How long a second process on a data directory in use may take to give up.
const REFUSED_WITHIN: Duration = Duration::from_secs(5);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `baton args…`, which must fail within [`REFUSED_WITHIN`]; returns its stderr.
/// Runs a second `baton serve` on `data` (any free ports), which must be refused.
fn serve_refused(data: &std::path::Path) -> String {
    refused(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ])
}

fn refused(args: &[&str]) -> String {
    let started = Instant::now();
    let out = baton(args, REFUSED_WITHIN);
    assert!(
        !out.success,
        "baton {args:?} should have failed; stderr:\n{}",
        out.stderr
    );
    eprintln!(
        "baton {} refused in {:.2} s (exit {:?})",
        args[0],
        started.elapsed().as_secs_f64(),
        out.code
    );
    out.stderr
}

/// The message a second process prints for data directory `dir`.
fn in_use(dir: &Path) -> String {
    format!(
        "data directory {} is in use by another baton process",
        dir.display()
    )
}

#[test]
fn a_second_manager_on_a_data_directory_in_use_exits_naming_it() {
    let m = Manager::start(BATON);
    let data = m.data_dir();
    // A fresh manager: the directory is owner-only, its secrets and database 0600.
    assert_eq!(mode(&data), 0o700);
    for file in [
        "manager.key",
        "admin.token",
        "baton.db",
        "baton.db-wal",
        "baton.db-shm",
        "serve.json",
        "lock",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }

    let stderr = serve_refused(&data);
    assert!(stderr.contains(&in_use(&data)), "{stderr}");
    assert!(
        stderr.contains(&data.join("lock").display().to_string()),
        "{stderr}"
    );
    // The first one runs on, its status file untouched.
    let (status, body) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status, 200, "{body}");
    assert!(data.join("serve.json").exists());
}

#[test]
fn a_second_agent_on_a_data_directory_in_use_exits_naming_it() {
    let m = Manager::start(BATON);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut a = AgentProc::spawn(&m, root, "a1", &[]);
    m.wait_connected(&["a1"]);
    let data = a.dir.join("data");

    let key = m.info.manager_key.clone();
    let addr = m.agent_addr().to_string();
    let second = [
        "agent",
        "--manager",
        &addr,
        "--manager-key",
        &key,
        "--id",
        "a1",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    let stderr = refused(&second);
    assert!(stderr.contains(&in_use(&data)), "{stderr}");

    // Content: the slot it stores is 0600 in an owner-only directory.
    let bytes = pseudo_random(100_000, 14);
    let file = root.join("content.bin");
    std::fs::write(&file, &bytes).unwrap();
    m.create_job(&file, &["a1"], json!({}));
    a.wait_export(&bytes);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("identity.key")), 0o600);
    assert_eq!(mode(&data.join("lock")), 0o600);
    assert_eq!(mode(&data.join("content")), 0o700);
    let slots: Vec<_> = std::fs::read_dir(data.join("content"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert_eq!(mode(&slots[0]), 0o600);

    // SIGKILL gives the agent no chance to unlock: the kernel releases the lock at its
    // death, and the agent starts again on the same directory.
    a.kill();
    let a = AgentProc::spawn_enrolled(&m, root, "a1", &[]);
    m.wait_connected(&["a1"]);
    // Its log says nothing of a directory in use.
    assert!(!a.log().contains("in use by another"), "{}", a.log());
}

#[test]
fn a_key_file_open_to_others_stops_start_up_with_the_fix() {
    // The manager's keys and admin token.
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Manager::start_in(BATON, tmp.path());
    m.stop();
    let data = m.data_dir();
    for file in ["manager.key", "admin.token"] {
        let path = data.join(file);
        chmod(&path, 0o644);
        let stderr = serve_refused(&data);
        assert!(
            stderr.contains(&format!("chmod 600 {}", path.display())),
            "{file}: {stderr}"
        );
        chmod(&path, 0o600);
    }
    // Fixed as told, the manager starts again with the same key.
    let again = Manager::start_in(BATON, tmp.path());
    assert_eq!(again.info.manager_key, m.info.manager_key);
    drop(again);

    // The agent's identity.
    let agent_data = tmp.path().join("agent");
    let key = baton(
        &[
            "agent",
            "--print-key",
            "--data-dir",
            agent_data.to_str().unwrap(),
        ],
        REFUSED_WITHIN,
    );
    assert!(key.success, "{}", key.stderr);
    let identity = agent_data.join("identity.key");
    assert_eq!(mode(&agent_data), 0o700);
    assert_eq!(mode(&identity), 0o600);
    chmod(&identity, 0o640);
    let stderr = refused(&[
        "agent",
        "--manager",
        "127.0.0.1:9",
        "--manager-key",
        &m.info.manager_key,
        "--id",
        "a1",
        "--data-dir",
        agent_data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        stderr.contains(&format!("chmod 600 {}", identity.display())),
        "{stderr}"
    );
}

#[test]
fn an_open_data_directory_is_tightened_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o755);
    let m = Manager::start_in(BATON, tmp.path());
    assert_eq!(mode(&data), 0o700);
    let log = m.log();
    assert!(
        log.contains("open to group or others (mode 755); changed it to 700"),
        "{log}"
    );
}
