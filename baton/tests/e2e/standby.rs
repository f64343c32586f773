//! Two managers on one PostgreSQL database, one active and one standing by, with
//! ten real agents given both addresses (`--manager A,B`): the active manager is
//! killed (SIGKILL) mid-job and the standby takes over within the bound, resumes
//! the job under a new epoch and every agent finishes with an identical copy, each
//! confirmation recorded once; an administrator's web session from the first
//! manager works on the second. Then an active manager frozen (SIGSTOP) past its
//! lease is replaced and, woken (SIGCONT), steps down without writing. Without a
//! PostgreSQL test server these fail in CI and say loudly that they are skipped
//! elsewhere (`baton_manager::store::test_database`).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use baton_manager::store::Store;
use baton_manager::store::test_database::TestDatabase;
use baton_test_support::{AgentProc, Manager, pseudo_random, wait_for};
use serde_json::{Value, json};

/// The agents of each test.
const AGENTS: [&str; 10] = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"];

/// `GET /api/v1/status`, or `None` while the manager does not answer (it is restarting
/// its HTTP server as it takes over, or is stopped).
fn status(m: &Manager) -> Option<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let mut resp = agent
        .get(m.url("/api/v1/status"))
        .header("Authorization", format!("Bearer {}", m.info.admin_token))
        .call()
        .ok()?;
    (resp.status() == 200).then_some(())?;
    serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// Starts manager A (active) and manager B (standby) on `db`, B with A's manager key,
/// admin token and trust document (as the README tells the operator), both with these
/// extra flags; waits until B says it stands by and names A.
fn start_pair(db: &TestDatabase, root: &Path, extra: &[&str]) -> (Manager, Manager) {
    let password_file = db.password_file().unwrap().to_str().unwrap().to_string();
    let mut args = vec!["--db", db.url(), "--db-password-file", &password_file];
    args.extend_from_slice(extra);
    let args = &mut args;
    let a_dir = root.join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let a = Manager::start_args_in(BATON, &a_dir, "127.0.0.1:0", args);
    assert_eq!(a.info.role, "active", "{}", a.log());

    // The operator copies the key directory: B presents the same transport identity.
    let b_dir = root.join("b");
    let b_data = b_dir.join("data");
    std::fs::create_dir_all(&b_data).unwrap();
    for file in ["manager.key", "admin.token"] {
        std::fs::copy(a.data_dir().join(file), b_data.join(file)).unwrap();
    }
    let kit = a.kit.as_ref().unwrap();
    let (trust, publisher) = (
        kit.trust_file().to_str().unwrap().to_string(),
        kit.publisher_key_file().to_str().unwrap().to_string(),
    );
    args.extend_from_slice(&["--trust", &trust, "--publisher-key", &publisher]);
    let b = Manager::start_args_in(BATON, &b_dir, "127.0.0.1:0", args);
    assert_eq!(b.info.role, "standby", "{}", b.log());
    assert_eq!(b.info.manager_key, a.info.manager_key);
    let s = status(&b).expect("a standby answers reads");
    assert_eq!(s["role"], "standby", "{s}");
    assert_eq!(s["active_agent_addr"], a.info.agent_addr.as_str(), "{s}");
    assert_eq!(s["active_http_addr"], a.info.http_addr.as_str(), "{s}");
    (a, b)
}

/// Ten agents given both managers' agent ports, A first; waits until A has them all.
fn start_agents(a: &Manager, b: &Manager, root: &Path) -> Vec<AgentProc> {
    let both = format!("{},{}", a.info.agent_addr, b.info.agent_addr);
    let agents = AGENTS
        .iter()
        .map(|n| AgentProc::spawn_custom(a, root, n, &both, true, &[]))
        .collect();
    a.wait_connected(&AGENTS);
    agents
}

/// Publishes `bytes` on A and starts a job to every agent; waits until it is under way.
fn start_job(a: &Manager, bytes: &[u8]) -> u64 {
    let file = a.dir.join("content.bin");
    std::fs::write(&file, bytes).unwrap();
    let job = a.create_job(&file, &AGENTS, json!({ "chunk_size": 16384 }));
    a.wait_job_started(job);
    job
}

/// The sum of the chunks every participant verified, as `m` reports job `job`.
fn verified(m: &Manager, job: u64) -> Option<u64> {
    let (status, detail) = m.api("GET", &format!("/api/v1/jobs/{job}"), None);
    (status == 200).then_some(())?;
    Some(
        detail["participants"]
            .as_array()?
            .iter()
            .filter_map(|p| p["verified"].as_u64())
            .sum(),
    )
}

/// After the job finished on the new active manager: every agent holds an identical copy,
/// and the database holds exactly one confirmation per agent, every participant
/// confirmed, and the job's confirmed count.
fn assert_finished_once(
    db: &TestDatabase,
    b: &Manager,
    agents: &[AgentProc],
    job: u64,
    bytes: &[u8],
) {
    let done = b.wait_job(job, Duration::from_secs(60), |j| j["state"] == "finished");
    assert_eq!(done["confirmed_count"], AGENTS.len(), "{done}");
    for agent in agents {
        agent.wait_export(bytes);
    }
    let store = db.open();
    let mut confirmed: Vec<String> = store
        .confirmations(job)
        .unwrap()
        .into_iter()
        .map(|c| c.agent)
        .collect();
    confirmed.sort();
    assert_eq!(confirmed, AGENTS, "one confirmation per agent, none twice");
    let participants = store.participants(job).unwrap();
    assert_eq!(participants.len(), AGENTS.len());
    assert!(
        participants
            .iter()
            .all(|p| p.state == baton_manager::store::PartState::Confirmed),
        "{participants:?}"
    );
    let stored = store.job(job).unwrap().unwrap();
    assert_eq!(stored.confirmed, Some(AGENTS.len() as u32));
    assert_eq!(
        stored.epoch,
        Some(b.info_epoch()),
        "the job ran last under B's epoch"
    );
}

/// B's epoch as its status says (it took the lease after starting, so not its ready file's).
trait Epoch {
    fn info_epoch(&self) -> u32;
}

impl Epoch for Manager {
    fn info_epoch(&self) -> u32 {
        status(self).expect("status")["epoch"].as_u64().unwrap() as u32
    }
}

/// Logs `name` in through the web form on `m`; returns the session cookie.
fn web_login(m: &Manager, name: &str, password: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let page = agent.get(m.url("/")).call().unwrap();
    let cookie_of = |headers: &ureq::http::HeaderMap, name: &str| {
        headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok()?.split(';').next()?.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let csrf = cookie_of(page.headers(), "baton_login_csrf").expect("login CSRF cookie");
    let answer = agent
        .post(m.url("/login"))
        .header("cookie", format!("baton_login_csrf={csrf}"))
        .content_type("application/x-www-form-urlencoded")
        .send(format!("name={name}&password={password}&csrf={csrf}"))
        .unwrap();
    assert_eq!(answer.status(), 303);
    cookie_of(answer.headers(), "baton_session").expect("session cookie")
}

/// `GET path` on `m` with the session cookie; the status.
fn get_with_session(m: &Manager, path: &str, session: &str) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    agent
        .get(m.url(path))
        .header("cookie", format!("baton_session={session}"))
        .call()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn a_standby_takes_over_a_killed_manager_mid_job() {
    let Some(db) = TestDatabase::create("e2e_standby_takes_over") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The default lease time-to-live (9 s); the manager's upload capped so the job lasts.
    let (mut a, b) = start_pair(&db, root, &["--give-up", "30", "--up-bps", "192KiB"]);
    let agents = start_agents(&a, &b, root);

    // An administrator signs in on A; the session is kept in the database.
    add_admin_on_postgresql(&db, root, "ops", "correct-horse");
    let password_file = db.password_file().unwrap().to_str().unwrap().to_string();
    let session = web_login(&a, "ops", "correct-horse");
    assert_eq!(get_with_session(&a, "/api/v1/jobs", &session), 200);
    // The standby serves reads and refuses changes, naming the active manager.
    let (refused, why) = b.api("POST", "/api/v1/enrolment-tokens", None);
    assert_eq!(refused, 503, "{why}");
    assert!(
        why["error"].as_str().unwrap().contains(&a.info.http_addr),
        "{why}"
    );
    // The CLI says which manager is active.
    let out = baton(
        &[
            "status",
            "--manager-url",
            &b.url(""),
            "--admin-token",
            &b.info.admin_token,
        ],
        Duration::from_secs(30),
    );
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("standby manager")
            && out
                .stdout
                .contains(&format!("active manager: agent port {}", a.info.agent_addr)),
        "{}",
        out.stdout
    );
    // A manager with another key is refused by the database's managers.
    let stranger = root.join("stranger");
    let out = baton(
        &[
            "serve",
            "--data-dir",
            stranger.join("data").to_str().unwrap(),
            "--db",
            db.url(),
            "--db-password-file",
            &password_file,
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        Duration::from_secs(30),
    );
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("is not the key this database's managers use"),
        "{}",
        out.stderr
    );

    let bytes = pseudo_random(1_500_000, 23);
    let job = start_job(&a, &bytes);
    let a_epoch = a.info.epoch;
    let total_chunks = (bytes.len() as u64).div_ceil(16384) * AGENTS.len() as u64;

    a.crash();
    let killed = Instant::now();
    let active = wait_for(
        "the standby takes over",
        Duration::from_secs(15),
        || b.log(),
        || status(&b).filter(|s| s["role"] == "active"),
    );
    let to_active = killed.elapsed();
    assert!(to_active <= Duration::from_secs(15), "{to_active:?}");
    let b_epoch = active["epoch"].as_u64().unwrap() as u32;
    assert!(
        b_epoch > a_epoch,
        "a takeover is a new epoch ({a_epoch} → {b_epoch})"
    );
    // What A had recorded when it died: the job was mid-way.
    let before = verified(&b, job).unwrap();
    assert!(
        before < total_chunks,
        "the job is mid-way when A dies ({before} of {total_chunks})"
    );
    wait_for(
        "B resumes the job",
        Duration::from_secs(30),
        || b.log(),
        || verified(&b, job).filter(|v| *v > before),
    );
    let to_progress = killed.elapsed();
    b.wait_connected(&AGENTS);
    let to_agents = killed.elapsed();
    eprintln!(
        "failover (lease TTL 9 s): SIGKILL → standby active {:.1} s, → the job progresses again {:.1} s, → all 10 agents on B {:.1} s",
        to_active.as_secs_f64(),
        to_progress.as_secs_f64(),
        to_agents.as_secs_f64()
    );

    assert_finished_once(&db, &b, &agents, job, &bytes);
    // The web session from A works on B.
    assert_eq!(get_with_session(&b, "/api/v1/jobs", &session), 200);
    assert!(b.log().contains("took the managers' lease"), "{}", b.log());

    // A restarted stands by; B stopped cleanly gives the lease up and A takes over at once.
    let (lease_db, lease_password) = (db.url().to_string(), password_file.clone());
    // (On its agent port of before: the agents know that address.)
    let mut a = Manager::start_args_in(
        BATON,
        &a.dir.clone(),
        &a.info.agent_addr.clone(),
        &[
            "--db",
            &lease_db,
            "--db-password-file",
            &lease_password,
            "--give-up",
            "30",
        ],
    );
    assert_eq!(a.info.role, "standby", "{}", a.log());
    let mut b = b;
    b.stop();
    let stopped = Instant::now();
    wait_for(
        "A takes over from a cleanly stopped B",
        Duration::from_secs(5),
        || a.log(),
        || status(&a).filter(|s| s["role"] == "active"),
    );
    let handover = stopped.elapsed();
    assert!(handover <= Duration::from_secs(3), "{handover:?}");
    eprintln!(
        "clean stop (SIGTERM) → standby active {:.1} s",
        handover.as_secs_f64()
    );
    a.wait_connected(&AGENTS);
    a.stop();
}

#[test]
fn an_old_active_woken_after_a_takeover_steps_down_without_acting() {
    let Some(db) = TestDatabase::create("e2e_standby_fencing") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut a, b) = start_pair(
        &db,
        root,
        &["--give-up", "30", "--up-bps", "192KiB", "--lease-ttl", "3"],
    );
    let agents = start_agents(&a, &b, root);
    let bytes = pseudo_random(1_200_000, 29);
    let job = start_job(&a, &bytes);

    // A freezes past its lease; B takes over.
    signal(a.pid(), "STOP");
    let stopped = Instant::now();
    let active = wait_for(
        "the standby takes over a frozen manager",
        Duration::from_secs(15),
        || b.log(),
        || status(&b).filter(|s| s["role"] == "active"),
    );
    let to_active = stopped.elapsed();
    let b_epoch = active["epoch"].as_u64().unwrap();
    assert!(b_epoch > u64::from(a.info.epoch));
    let lease = db.open().lease().unwrap();
    assert!(lease.live && lease.epoch as u64 == b_epoch, "{lease:?}");

    // A wakes up: it finds the lease lost and steps down at once, writing nothing.
    signal(a.pid(), "CONT");
    let woken = Instant::now();
    let a_log = a.dir.join("serve.log");
    let status_of_a = wait_for(
        "A steps down and exits",
        Duration::from_secs(15),
        || std::fs::read_to_string(&a_log).unwrap_or_default(),
        || a.exited(),
    );
    let to_exit = woken.elapsed();
    assert!(!status_of_a.success(), "stepping down is an error exit");
    let log = a.log();
    assert!(
        log.contains("lost the managers' lease") && log.contains("stepping down"),
        "{log}"
    );
    // Whatever A's engine still tried to persist was refused by the database.
    for line in log.lines().filter(|l| l.contains("cannot persist")) {
        assert!(line.contains("no longer holds the lease"), "{line}");
    }
    eprintln!(
        "fencing (lease TTL 3 s): SIGSTOP → standby active {:.1} s; SIGCONT → old active exited {:.1} s",
        to_active.as_secs_f64(),
        to_exit.as_secs_f64()
    );
    // The lease and the manager epoch are still B's.
    let store = db.open();
    assert_eq!(store.lease().unwrap().epoch as u64, b_epoch);
    assert_eq!(u64::from(store.epoch().unwrap()), b_epoch);

    assert_finished_once(&db, &b, &agents, job, &bytes);
}
