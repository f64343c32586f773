//! A staged rollout with real processes: a manager and 20 `baton agent`s with an
//! `--install` hook, waves 10 % / 50 % / 100 %, the hook failing on 2 agents of the second
//! wave and the rule "pause when more than 1 participant of a wave fails": the rollout
//! pauses after wave 2, wave 3 receives nothing while paused, `baton job N resume` goes
//! on, every healthy agent ends running, and wave 3's bytes came from waves 1 and 2. And a
//! rollout whose first wave is a content group, waiting for approval, keeps waiting across
//! a manager crash (its second wave uninstructed) until `baton job N approve`.

use std::time::{Duration, Instant};

use baton_test_support::AgentProc;
use baton_test_support::Manager;
use serde_json::{Value, json};

use crate::common::{BATON, ok};

/// The whole scenario's bound.
const LIMIT: Duration = Duration::from_secs(40);
/// How long wave 3 is watched while the rollout is paused.
const PAUSED_WATCH: Duration = Duration::from_secs(3);

/// The agent ids of wave `wave` (from 1) in a job's detail.
fn wave(job: &Value, wave: u64) -> Vec<String> {
    job["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["wave"].as_u64() == Some(wave))
        .map(|p| p["agent"].as_str().unwrap().to_string())
        .collect()
}

/// Bytes `agent` received per source in a job's detail: `(from, bytes)`, `None` = manager.
fn received(job: &Value, agent: &str) -> Vec<(Option<String>, u64)> {
    job["source_bytes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["agent"] == agent)
        .map(|s| {
            (
                s["from"].as_str().map(str::to_string),
                s["bytes"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn failures_in_wave_two_pause_the_rollout_and_wave_three_fetches_from_the_earlier_waves() {
    let started = Instant::now();
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let file = files.path().join("app.bin");
    std::fs::write(&file, baton_test_support::pseudo_random(96 * 1024, 21)).unwrap();
    // Which agents fail is decided once the waves are known: the hook waits (bounded) for
    // the list, then fails if it names its agent.
    let fail_list = root.path().join("fail-list");
    let names: Vec<String> = (0..20).map(|i| format!("s{i:02}")).collect();
    let agents: Vec<AgentProc> = names
        .iter()
        .map(|name| {
            let hook = format!(
                r#"for i in $(seq 1 100); do [ -f '{list}' ] && break; sleep 0.1; done; if grep -qx '{name}' '{list}'; then echo "refusing {name} on purpose" >&2; exit 3; fi; cp "$BATON_CONTENT_PATH" "$BATON_CONTENT_PATH.installed""#,
                list = fail_list.display()
            );
            let status = root.path().join(name).join("status.json");
            AgentProc::spawn(
                &m,
                root.path(),
                name,
                &["--install", &hook, "--status-file", status.to_str().unwrap()],
            )
        })
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    m.wait_connected(&refs);
    let job = m.create_job(
        &file,
        &refs,
        json!({
            "name": "staged-app",
            "chunk_size": 4096,
            "rollout": { "waves": [10, 50, 100], "pause_after_failures": 1 },
        }),
    );
    let detail = m.job(job);
    let (w1, w2, w3) = (wave(&detail, 1), wave(&detail, 2), wave(&detail, 3));
    assert_eq!([w1.len(), w2.len(), w3.len()], [2, 8, 10], "{detail}");
    let failing = [w2[2].clone(), w2[5].clone()];
    let tmp = root.path().join("fail-list.tmp");
    std::fs::write(&tmp, format!("{}\n{}\n", failing[0], failing[1])).unwrap();
    std::fs::rename(&tmp, &fail_list).unwrap();

    // The second failure of wave 2 pauses the rollout; wave 2's other agents finish.
    let paused = m.wait_job(job, LIMIT.saturating_sub(started.elapsed()), |j| {
        j["rollout"]["paused"].is_string()
            && wave(j, 2).iter().all(|a| {
                let p = baton_test_support::manager::participant(j, a);
                p["install"]["state"].is_string() && p["install"]["state"] != "pending"
                    || p["state"] == "failed"
            })
    });
    assert_eq!(paused["state"], "running");
    assert_eq!(paused["rollout"]["opened"], 2, "{paused}");
    let why = paused["rollout"]["paused"].as_str().unwrap();
    assert!(
        why.contains("wave 2: 2 participants failed (more than 1)"),
        "{why}"
    );
    for a in &failing {
        let p = baton_test_support::manager::participant(&paused, a);
        assert_eq!(p["install"]["state"], "failed", "{paused}");
        assert_eq!(p["install"]["exit_code"], 3);
    }
    // While paused, wave 3 gets no instruction and no byte, for a while.
    let watch_end = Instant::now() + PAUSED_WATCH;
    while Instant::now() < watch_end {
        let j = m.job(job);
        for a in &w3 {
            let p = baton_test_support::manager::participant(&j, a);
            assert_eq!(
                p["state"], "waiting",
                "{a} was instructed while paused: {j}"
            );
            assert_eq!(p["rollout"], "held", "{j}");
            assert!(
                received(&j, a).is_empty(),
                "{a} received bytes while paused: {j}"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // The agents' own view: wave 3 has never heard of the job.
    for agent in agents.iter().filter(|a| w3.contains(&a.name)) {
        assert!(
            agent.status("status.json").is_some(),
            "{} wrote no status",
            agent.name
        );
        assert_eq!(
            agent.job_status("status.json", job),
            None,
            "{} knows the job while paused",
            agent.name
        );
        assert!(
            !agent.dir.join("out.installed").exists(),
            "{} installed while paused",
            agent.name
        );
    }
    // While wave 2's agents do (the status files are current).
    for agent in agents.iter().filter(|a| w2.contains(&a.name)) {
        assert!(
            agent.job_status("status.json", job).is_some(),
            "{} does not list the job: {:?}",
            agent.name,
            agent.status("status.json")
        );
    }
    let listed = ok(&m, &["jobs"]);
    assert!(listed.contains("running (rollout paused)"), "{listed}");
    let shown = ok(&m, &["job", &job.to_string()]);
    assert!(shown.contains("rollout paused"), "{shown}");
    assert!(shown.contains("wave 3: not open"), "{shown}");

    let answer = ok(&m, &["job", &job.to_string(), "resume"]);
    assert!(answer.contains("wave 3 of 3 open"), "{answer}");
    let done = m.wait_job(job, LIMIT.saturating_sub(started.elapsed()), |j| {
        j["state"] == "finished"
    });
    let mut running = 0;
    for name in &names {
        let p = baton_test_support::manager::participant(&done, name);
        let expected = if failing.contains(name) {
            "failed"
        } else {
            "running"
        };
        assert_eq!(p["install"]["state"], expected, "{name}: {done}");
        running += (expected == "running") as usize;
    }
    assert_eq!(running, 18);
    assert_eq!(done["rollout"]["opened"], 3);
    // Wave 3's bytes came from the agents of waves 1 and 2, not from the manager.
    let earlier: Vec<&String> = w1.iter().chain(&w2).collect();
    let (mut from_earlier, mut total) = (0u64, 0u64);
    for a in &w3 {
        for (from, bytes) in received(&done, a) {
            total += bytes;
            if from.as_ref().is_some_and(|f| earlier.contains(&f)) {
                from_earlier += bytes;
            }
        }
    }
    assert!(
        total >= 10 * 96 * 1024,
        "wave 3 received {total} bytes: {done}"
    );
    assert!(
        from_earlier * 100 >= total * 90,
        "wave 3 received {from_earlier} of {total} bytes from waves 1-2: {done}"
    );
    eprintln!(
        "staged rollout: {from_earlier} of {total} bytes of wave 3 from waves 1-2, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The audit log has the resume.
    let (status, audit) = m.api("GET", "/api/v1/audit?limit=20", None);
    assert_eq!(status, 200);
    assert!(
        audit.to_string().contains("job.resume"),
        "audit lacks the resume: {audit}"
    );
}

#[test]
fn a_group_wave_waiting_for_approval_keeps_waiting_across_a_manager_crash() {
    let tmp = tempfile::tempdir().unwrap();
    // A fixed agent port, so that the agents find the restarted manager.
    let listen = baton_test_support::net::free_loopback_addr();
    let mut m = Manager::start_on(BATON, tmp.path(), &listen);
    let root = tmp.path().to_path_buf();
    let names = ["c1", "c2", "c3", "c4"];
    let _agents: Vec<AgentProc> = names
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &[]))
        .collect();
    m.wait_connected(&names);
    let file = root.join("bundle.bin");
    std::fs::write(&file, baton_test_support::pseudo_random(64 * 1024, 4)).unwrap();
    // Wave 1 is a content group (resolved to its members when the job is created).
    let (status, group) = m.api(
        "POST",
        "/api/v1/groups",
        Some(json!({ "name": "canary", "agents": ["c3", "c1"] })),
    );
    assert_eq!(status, 201, "{group}");
    let id = m.create_job(
        &file,
        &names,
        json!({ "chunk_size": 4096,
            "rollout": { "waves": [{ "group": "canary" }, { "agents": ["c2"] }], "approval": true } }),
    );
    let waiting = m.wait_job(id, LIMIT, |j| j["rollout"]["awaiting_approval"] == true);
    let mut w1 = wave(&waiting, 1);
    w1.sort();
    assert_eq!(w1, ["c1", "c3"], "{waiting}");
    let mut w2 = wave(&waiting, 2);
    w2.sort();
    assert_eq!(
        w2,
        ["c2", "c4"],
        "the unlisted c4 goes in the last wave: {waiting}"
    );
    // Crash: no chance to clean up.
    m.crash();

    let m = Manager::start_on(BATON, tmp.path(), &listen);
    assert_eq!(m.info.epoch, 2);
    m.wait_connected(&names);
    // Back under the new epoch, still waiting: wave 2 gets nothing for a while.
    let watch_end = Instant::now() + PAUSED_WATCH;
    while Instant::now() < watch_end {
        let j = m.job(id);
        assert_eq!(j["rollout"]["awaiting_approval"], true, "{j}");
        for a in &w2 {
            let p = baton_test_support::manager::participant(&j, a);
            assert_eq!(
                p["state"], "waiting",
                "{a} was instructed before approval: {j}"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let answer = ok(&m, &["job", &id.to_string(), "approve"]);
    assert!(answer.contains("wave 2 of 2 open"), "{answer}");
    let done = m.wait_job(id, LIMIT, |j| j["state"] == "finished");
    assert_eq!(done["epoch"], 2, "{done}");
    assert_eq!(done["install_counts"], json!({ "running": 4 }), "{done}");
    // Approving again is refused: the job is over.
    let out = crate::common::cli(&m, &["job", &id.to_string(), "approve"]);
    assert!(!out.success);
    assert!(out.stderr.contains("already finished"), "{}", out.stderr);
}
