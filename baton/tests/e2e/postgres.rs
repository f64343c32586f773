//! End to end on PostgreSQL: a real `baton serve --db postgresql://…` (password from
//! `--db-password-file`) on a database of its own on the test server, three real
//! agents, and a push followed to completion; the job and its confirmations are
//! read back over the API and straight from PostgreSQL, and no SQLite file is made.
//! Without a test server it fails in CI and says loudly that it is skipped elsewhere
//! (`baton_manager::store::test_database`).

use std::time::Duration;

use crate::common::*;
use baton_manager::store::Store;
use baton_manager::store::test_database::TestDatabase;
use baton_test_support::{AgentProc, Manager, pseudo_random};

#[test]
fn the_manager_runs_on_postgresql() {
    let Some(db) = TestDatabase::create("e2e_manager_on_postgresql") else {
        return;
    };
    let password_file = db
        .password_file()
        .expect("the test cluster has a password (scripts/pg-test-cluster.sh)")
        .to_str()
        .unwrap()
        .to_string();
    let m = Manager::start_args(
        BATON,
        &["--db", db.url(), "--db-password-file", &password_file],
    );
    assert!(m.log().contains("database: PostgreSQL"), "{}", m.log());
    let root = m.dir.clone();
    let names = ["p1", "p2", "p3"];
    let agents: Vec<AgentProc> = names
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &["--up-bps", "4MiB"]))
        .collect();
    m.wait_connected(&names);

    let bytes = pseudo_random(600_000, 7);
    let file = root.join("firmware.bin");
    std::fs::write(&file, &bytes).unwrap();
    let data = m.data_dir();
    let out = baton(
        &[
            "push",
            file.to_str().unwrap(),
            "--agents",
            "p1,p2,p3",
            "--name",
            "pg-fw",
            "--chunk-size",
            "16KiB",
            "--wait",
            "--data-dir",
            data.to_str().unwrap(),
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

    // The API answers from PostgreSQL...
    let (status, jobs) = m.api("GET", "/api/v1/jobs", None);
    assert_eq!(status, 200, "{jobs}");
    let id = jobs[0]["id"].as_u64().unwrap();
    let job = m.job(id);
    assert_eq!(job["state"], "finished", "{job}");
    assert_eq!(job["confirmed_count"], 3, "{job}");
    assert_eq!(job["confirmations"].as_array().unwrap().len(), 3, "{job}");
    // ...which holds the job, one confirmation per agent and the agents, and no SQLite
    // file was made beside the keys.
    let store = db.open();
    let stored = store.job(id).unwrap().expect("the job is in PostgreSQL");
    assert_eq!(stored.confirmed, Some(3));
    let mut confirmed: Vec<String> = store
        .confirmations(id)
        .unwrap()
        .into_iter()
        .map(|c| c.agent)
        .collect();
    confirmed.sort();
    assert_eq!(confirmed, names);
    assert_eq!(store.agents().unwrap().len(), 3);
    assert!(store.epoch().unwrap() >= 1);
    // `baton admin` writes to the same database when given the same --db.
    add_admin_on_postgresql(&db, &root, "ops", "correct horse battery");
    assert_eq!(store.admins().unwrap(), ["ops"]);
    assert!(!data.join("baton.db").exists());
}

#[test]
fn an_installation_moves_from_sqlite_to_postgresql_with_db_copy() {
    let Some(db) = TestDatabase::create("e2e_db_copy") else {
        return;
    };
    let password_file = db.password_file().unwrap().to_str().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let listen = baton_test_support::free_loopback_addr();
    // A year on SQLite: two agents, one job done.
    let mut m = Manager::start_on(BATON, tmp.path(), &listen);
    let agents: Vec<AgentProc> = ["c1", "c2"]
        .iter()
        .map(|n| AgentProc::spawn(&m, tmp.path(), n, &[]))
        .collect();
    m.wait_connected(&["c1", "c2"]);
    let first = pseudo_random(100_000, 3);
    let file = tmp.path().join("first.bin");
    std::fs::write(&file, &first).unwrap();
    let job = m.create_job(&file, &["c1", "c2"], serde_json::json!({}));
    m.wait_job(job, Duration::from_secs(30), |j| j["state"] == "finished");
    m.stop();

    let db_file = format!("sqlite:{}", m.data_dir().join("baton.db").display());
    let copy = |expect_ok: bool| {
        let out = baton(
            &[
                "db",
                "copy",
                "--from",
                &db_file,
                "--to",
                db.url(),
                "--db-password-file",
                &password_file,
            ],
            Duration::from_secs(30),
        );
        assert_eq!(out.success, expect_ok, "{}\n{}", out.stdout, out.stderr);
        out
    };
    let out = copy(true);
    assert!(out.stdout.contains("confirmations"), "{}", out.stdout);
    assert!(out.stdout.contains("copied "), "{}", out.stdout);
    // Copying again into the now used database is refused.
    assert!(copy(false).stderr.contains("empty"));

    // The same data directory, now on PostgreSQL: the old job is there, the epoch goes
    // on from the copied one, the agents come back and the next job completes.
    let m = Manager::start_args_in(
        BATON,
        tmp.path(),
        &listen,
        &["--db", db.url(), "--db-password-file", &password_file],
    );
    assert_eq!(m.info.epoch, 2);
    let old = m.job(job);
    assert_eq!(old["state"], "finished", "{old}");
    assert_eq!(old["confirmed_count"], 2, "{old}");
    m.wait_connected(&["c1", "c2"]);
    let second = pseudo_random(120_000, 4);
    let file = tmp.path().join("second.bin");
    std::fs::write(&file, &second).unwrap();
    let next = m.create_job(&file, &["c1", "c2"], serde_json::json!({}));
    assert_eq!(next, job + 1);
    let done = m.wait_job(next, Duration::from_secs(30), |j| j["state"] == "finished");
    assert_eq!(done["confirmed_count"], 2, "{done}");
    for a in &agents {
        a.wait_export(&second);
    }
    assert_eq!(db.open().confirmations(next).unwrap().len(), 2);
}
