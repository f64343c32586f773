//! End to end: content groups, named policies and segment reports against a real
//! `baton serve`, real `baton agent` processes and the `baton` client commands.
//!
//! A job for a content group reaches exactly the group's members (by id or by
//! label selector) and nothing reaches the other agents; a job for a group with a
//! label selector takes in the agents that enrol carrying its labels while it
//! runs; policies are added,
//! changed, refused with the offending field named, and used by jobs; a
//! segment report from an agent that is not the leader it names, or for a
//! segment it is not in, is refused, and complete reports replace the
//! segment's view and record leader changes. Every wait is bounded.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use baton_protocol::identity::Identity;
use baton_protocol::message::{Message, SegmentMember, SegmentReport};
use baton_protocol::types::{Delay, DelayTo, LinkInfo};
use baton_test_support::{
    AgentProc, Manager, free_loopback_addr, manager::BOUND, pseudo_random, wait_for,
};
use serde_json::{Value, json};

/// Runs a command that must fail; returns its stderr.
fn fails(m: &Manager, args: &[&str]) -> String {
    let out = cli(m, args);
    assert!(!out.success, "baton {args:?} should fail:\n{}", out.stdout);
    out.stderr
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(String::from))
        .collect();
    out.sort();
    out
}

fn participant_ids(job: &Value) -> Vec<String> {
    let mut out: Vec<String> = job["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["agent"].as_str().map(String::from))
        .collect();
    out.sort();
    out
}

fn spawn(m: &Manager, root: &Path, name: &str, labels: &[&str]) -> AgentProc {
    let status = root.join(name).join("status.json");
    let mut extra = vec!["--status-file", status.to_str().unwrap()];
    for l in labels {
        extra.extend(["--label", l]);
    }
    let extra: Vec<String> = extra.into_iter().map(String::from).collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    AgentProc::spawn(m, root, name, &extra)
}

/// The agent holds nothing of job `job`: no export, and its status lists no such job.
fn received_nothing(a: &AgentProc, job: u64, file: &str) {
    let status = wait_for(
        &format!("{} writes its status file", a.name),
        BOUND,
        || a.log(),
        || a.status("status.json"),
    );
    assert!(
        a.job_status("status.json", job).is_none(),
        "{} has job {job}: {status}",
        a.name
    );
    let export = a.dir.join("out");
    if let Ok(bytes) = std::fs::read(&export) {
        let content = std::fs::read(file).unwrap();
        assert_ne!(bytes, content, "{} exported the job's content", a.name);
    }
}

#[test]
fn a_group_job_reaches_its_members_and_nothing_reaches_the_others() {
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let agents = [
        spawn(&m, &root, "g1", &["role=edge", "site=fra"]),
        spawn(&m, &root, "g2", &[]),
        spawn(&m, &root, "g3", &["role=edge"]),
        spawn(&m, &root, "g4", &["role=core"]),
    ];
    m.wait_connected(&["g1", "g2", "g3", "g4"]);

    // A group by id: g2 and g4.
    let added = json_of(&ok(
        &m,
        &[
            "groups", "add", "pair", "--agent", "g2", "--agent", "g4", "--json",
        ],
    ));
    assert_eq!(ids(&added["members"]), ["g2", "g4"]);
    // A group by label selector: every agent with role=edge (g1 and g3).
    let edge = json_of(&ok(
        &m,
        &["groups", "add", "edge", "--label", "role=edge", "--json"],
    ));
    assert_eq!(ids(&edge["members"]), ["g1", "g3"]);
    let list = ok(&m, &["groups", "list"]);
    assert!(
        list.contains("pair") && list.contains("role=edge"),
        "{list}"
    );

    let first = root.join("first.bin");
    std::fs::write(&first, pseudo_random(400_000, 3)).unwrap();
    let job1 = json_of(&ok(
        &m,
        &[
            "push",
            first.to_str().unwrap(),
            "--group",
            "pair",
            "--wait",
            "--json",
        ],
    ));
    let id1 = job1["id"].as_u64().unwrap();
    assert_eq!(job1["group"], "pair", "{job1}");
    assert_eq!(job1["confirmed_count"], 2, "{job1}");
    assert_eq!(participant_ids(&job1), ["g2", "g4"]);
    assert_eq!(job1["targets"], json!({ "agents": ["g2", "g4"] }));
    let carried: u64 = job1["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["bytes"].as_u64().unwrap())
        .sum();
    assert!(carried >= 2 * 400_000, "transfers account for both: {job1}");
    assert!(
        job1["transfers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["to"] == "g2" || t["to"] == "g4"),
        "{job1}"
    );
    let content1 = std::fs::read(&first).unwrap();
    agents[1].wait_export(&content1);
    agents[3].wait_export(&content1);
    received_nothing(&agents[0], id1, first.to_str().unwrap());
    received_nothing(&agents[2], id1, first.to_str().unwrap());

    let second = root.join("second.bin");
    std::fs::write(&second, pseudo_random(300_000, 4)).unwrap();
    let job2 = json_of(&ok(
        &m,
        &[
            "push",
            second.to_str().unwrap(),
            "--group",
            "edge",
            "--wait",
            "--json",
        ],
    ));
    let id2 = job2["id"].as_u64().unwrap();
    assert_eq!(participant_ids(&job2), ["g1", "g3"], "{job2}");
    assert_eq!(job2["confirmed_count"], 2, "{job2}");
    let content2 = std::fs::read(&second).unwrap();
    agents[0].wait_export(&content2);
    agents[2].wait_export(&content2);
    for outside in [&agents[1], &agents[3]] {
        received_nothing(outside, id2, second.to_str().unwrap());
        // Still holding the first job's content, not the second's.
        assert_eq!(std::fs::read(outside.dir.join("out")).unwrap(), content1);
    }

    // The selector takes every label: role=edge and site=fra is g1 alone.
    let narrow = json_of(&ok(
        &m,
        &[
            "groups",
            "set",
            "edge",
            "--label",
            "role=edge",
            "--label",
            "site=fra",
            "--json",
        ],
    ));
    assert_eq!(ids(&narrow["members"]), ["g1"]);
    // A group that resolves to nobody is refused with a clear message, and no job is made.
    ok(&m, &["groups", "add", "nobody", "--label", "role=none"]);
    let err = fails(&m, &["push", second.to_str().unwrap(), "--group", "nobody"]);
    assert!(err.contains("group \"nobody\" has no members"), "{err}");
    let err = fails(&m, &["push", second.to_str().unwrap(), "--group", "ghosts"]);
    assert!(err.contains("no content group \"ghosts\""), "{err}");
    let jobs = json_of(&ok(&m, &["jobs", "--json"]));
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");

    // Listed agents must be enrolled; duplicate names and unknown names are refused.
    let err = fails(&m, &["groups", "add", "bad", "--agent", "g1,stranger"]);
    assert!(err.contains("not enrolled: stranger"), "{err}");
    let err = fails(&m, &["groups", "add", "pair", "--agent", "g1"]);
    assert!(
        err.contains("409") && err.contains("already exists"),
        "{err}"
    );
    let (status, body) = m.api(
        "POST",
        "/api/v1/groups",
        Some(json!({ "name": "x", "agents": ["g1"], "labels": {} })),
    );
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("labels")),
        "{body}"
    );
    let (status, body) = m.api(
        "POST",
        "/api/v1/groups",
        Some(json!({ "name": "bad name", "agents": ["g1"] })),
    );
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("name")),
        "{body}"
    );
    ok(&m, &["groups", "rm", "nobody"]);
    let err = fails(&m, &["groups", "show", "nobody"]);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn policies_are_managed_checked_and_used_by_jobs() {
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let _agents = [spawn(&m, &root, "p1", &[]), spawn(&m, &root, "p2", &[])];
    m.wait_connected(&["p1", "p2"]);

    let added = json_of(&ok(
        &m,
        &[
            "policies",
            "add",
            "careful",
            "--max-peers-per-source",
            "2",
            "--leaf-only",
            "p2",
            "--weight",
            "up=7.5",
            "--json",
        ],
    ));
    assert_eq!(added["name"], "careful");
    assert_eq!(added["max_peers_per_source"], 2);
    assert_eq!(added["leaf_only"], json!(["p2"]));
    assert_eq!(added["weights"]["up"], 7.5);
    // Defaults fill in what was not given.
    assert_eq!(added["relay"], true, "{added}");

    // `set` changes only the fields given.
    let set = json_of(&ok(
        &m,
        &["policies", "set", "careful", "--max-stripes", "2", "--json"],
    ));
    assert_eq!(
        (
            set["max_stripes"].as_u64(),
            set["max_peers_per_source"].as_u64()
        ),
        (Some(2), Some(2))
    );
    let shown = ok(&m, &["policies", "show", "careful"]);
    assert!(shown.contains("max_stripes = 2"), "{shown}");
    let listed = ok(&m, &["policies", "list"]);
    assert!(
        listed.contains("careful") && listed.contains("max_peers_per_source=2"),
        "{listed}"
    );

    // From a file; the flags override it.
    let file = root.join("policy.json");
    std::fs::write(&file, r#"{"max_peers_per_source": 5, "relay": false}"#).unwrap();
    let from_file = json_of(&ok(
        &m,
        &[
            "policies",
            "add",
            "plain",
            "--from-file",
            file.to_str().unwrap(),
            "--max-peers-per-source",
            "4",
            "--json",
        ],
    ));
    assert_eq!(
        (
            from_file["max_peers_per_source"].as_u64(),
            from_file["relay"].as_bool()
        ),
        (Some(4), Some(false))
    );

    // Refusals name what is wrong.
    let err = fails(&m, &["policies", "add", "careful"]);
    assert!(err.contains("already exists"), "{err}");
    std::fs::write(&file, r#"{"max_peers_per_sauce": 5}"#).unwrap();
    let err = fails(
        &m,
        &[
            "policies",
            "add",
            "typo",
            "--from-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("unknown policy field \"max_peers_per_sauce\""),
        "{err}"
    );
    let err = fails(&m, &["policies", "add", "w", "--weight", "upp=1"]);
    assert!(err.contains("weights.upp"), "{err}");
    let err = fails(&m, &["policies", "add", "w", "--max-stripes", "0"]);
    assert!(err.contains("max_stripes"), "{err}");
    let err = fails(&m, &["policies", "add", "w", "--window", "25:00-01:00"]);
    assert!(err.contains("25:00"), "{err}");
    let err = fails(&m, &["policies", "set", "absent", "--max-stripes", "2"]);
    assert!(err.contains("no policy \"absent\""), "{err}");
    let (status, body) = m.api(
        "POST",
        "/api/v1/policies",
        Some(json!({ "name": "t", "max_peers_per_source": "many" })),
    );
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("max_peers_per_source")),
        "{body}"
    );
    let names: Vec<String> = json_of(&ok(&m, &["policies", "list", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["careful", "plain"],
        "refused policies were not stored"
    );

    // The rate caps, WAN limit, window and label leaves of the planner's policy.
    let capped = json_of(&ok(
        &m,
        &[
            "policies",
            "add",
            "capped",
            "--agent-rate-cap",
            "1MiB/s",
            "--segment-rate-cap",
            "4MiB/s",
            "--max-wan-transfers",
            "2",
            "--window",
            "22:00-06:30",
            "--window",
            "sat,sun 09:00-12:00 Europe/Berlin",
            "--leaf-only-label",
            "class=mcu",
            "--json",
        ],
    ));
    assert_eq!(capped["agent_rate_cap_bps"], 1024 * 1024, "{capped}");
    assert_eq!(capped["segment_rate_cap_bps"], 4 * 1024 * 1024, "{capped}");
    assert_eq!(capped["max_wan_transfers_per_segment"], 2, "{capped}");
    assert_eq!(
        capped["windows"],
        json!([
            { "start_minute": 1320, "end_minute": 390, "zone": "UTC",
              "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"] },
            { "start_minute": 540, "end_minute": 720, "zone": "Europe/Berlin", "days": ["sat", "sun"] },
        ]),
        "{capped}"
    );
    let shown = ok(&m, &["policies", "show", "capped"]);
    assert!(
        shown.contains("windows = 22:00-06:30 UTC, sat,sun 09:00-12:00 Europe/Berlin"),
        "{shown}"
    );
    // Bad windows get a clear error naming the field, from the CLI and the API.
    let bad = crate::common::cli(
        &m,
        &[
            "policies",
            "add",
            "tz",
            "--window",
            "mon 10:00-11:00 Mars/Olympus",
        ],
    );
    assert!(!bad.success);
    assert!(
        bad.stderr.contains("unknown time zone \"Mars/Olympus\""),
        "{}",
        bad.stderr
    );
    for (window, field) in [
        (
            json!({ "start_minute": 60, "end_minute": 120, "days": [] }),
            "windows.days",
        ),
        (
            json!({ "start_minute": 60, "end_minute": 1500 }),
            "windows.end_minute",
        ),
        (
            json!({ "start_minute": 60, "end_minute": 120, "zone": "Nowhere/Town" }),
            "windows.zone",
        ),
    ] {
        let (status, body) = m.api(
            "POST",
            "/api/v1/policies",
            Some(json!({ "name": "t", "windows": [window] })),
        );
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some(field)),
            "{body}"
        );
    }
    assert_eq!(
        capped["leaf_only_labels"],
        json!({ "class": "mcu" }),
        "{capped}"
    );
    let (status, body) = m.api(
        "POST",
        "/api/v1/policies",
        Some(json!({ "name": "t", "window": { "start_minute": 1440, "end_minute": 0 } })),
    );
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("windows.start_minute")),
        "{body}"
    );
    let unwindowed = json_of(&ok(
        &m,
        &["policies", "set", "capped", "--no-window", "--json"],
    ));
    assert_eq!(unwindowed["windows"], json!([]));
    assert_eq!(unwindowed["agent_rate_cap_bps"], 1024 * 1024);
    ok(&m, &["policies", "rm", "capped"]);

    // A job under a named policy records its name and a copy of its fields.
    let bin = root.join("p.bin");
    std::fs::write(&bin, pseudo_random(200_000, 9)).unwrap();
    let job = json_of(&ok(
        &m,
        &[
            "push",
            bin.to_str().unwrap(),
            "--agents",
            "p1,p2",
            "--policy",
            "careful",
            "--wait",
            "--json",
        ],
    ));
    assert_eq!(job["policy"], "careful", "{job}");
    assert_eq!(job["policy_spec"]["max_peers_per_source"], 2, "{job}");
    assert_eq!(job["confirmed_count"], 2, "{job}");
    assert!(job["warnings"].is_array(), "{job}");
    // p2 is leaf-only under this policy: it served no one.
    assert!(
        job["transfers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["from"] != "p2"),
        "{job}"
    );
    // A policy that cannot be met is reported with the job, not silently ignored.
    ok(&m, &["policies", "add", "leaves", "--leaf-only", "p1,p2"]);
    let leafy = json_of(&ok(
        &m,
        &[
            "push",
            bin.to_str().unwrap(),
            "--agents",
            "p1,p2",
            "--name",
            "leafy",
            "--policy",
            "leaves",
            "--wait",
            "--json",
        ],
    ));
    assert_eq!(leafy["confirmed_count"], 2, "{leafy}");
    let warnings: Vec<&str> = leafy["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("no participant may relay")),
        "{leafy}"
    );
    let shown = ok(&m, &["job", &leafy["id"].to_string()]);
    assert!(
        shown.contains("warning: no participant may relay"),
        "{shown}"
    );
    let err = fails(
        &m,
        &["push", bin.to_str().unwrap(), "--all", "--policy", "absent"],
    );
    assert!(err.contains("no policy \"absent\""), "{err}");

    // Removing a policy leaves the job's copy.
    ok(&m, &["policies", "rm", "careful"]);
    let err = fails(&m, &["policies", "rm", "careful"]);
    assert!(err.contains("404"), "{err}");
    let id = job["id"].as_u64().unwrap();
    assert_eq!(m.job(id)["policy_spec"]["max_peers_per_source"], 2);
}

fn member(name: &str, rtt_us: u32) -> SegmentMember {
    let mut delays = heapless::Vec::new();
    delays
        .push(Delay {
            to: DelayTo::Manager,
            rtt_us,
        })
        .unwrap();
    SegmentMember {
        id: id(name),
        score: 100,
        listen: None,
        performance: 100,
        free_storage: 1 << 30,
        can_serve: true,
        link: LinkInfo::default(),
        delays,
        last_heard_ms: 10,
    }
}

fn page(
    segment: &str,
    leader: &str,
    term: u32,
    page: u16,
    pages: u16,
    members: &[&str],
) -> Vec<u8> {
    Message::SegmentReport(SegmentReport {
        segment: segment.try_into().unwrap(),
        leader: id(leader),
        term,
        page,
        pages,
        members: members.iter().map(|n| member(n, 1500)).collect(),
    })
    .to_vec()
}

#[test]
fn segment_reports_are_checked_assembled_and_replace_the_segment_view() {
    let m = Manager::start(BATON);
    let one = Identity::from_seed([31; 32]);
    let two = Identity::from_seed([32; 32]);
    m.enrol("lead-1", &one.public());
    m.enrol("lead-2", &two.public());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Both report segment "loopback" (see common::report).
        let (mut r1, mut w1, _) = join(&m, &one, "lead-1", None).await.unwrap();
        let (mut r2, mut w2, _) = join(&m, &two, "lead-2", None).await.unwrap();

        // lead-1 claims to send lead-2's report, then a report for another segment: refused.
        w1.send(&page("loopback", "lead-2", 1, 0, 1, &["lead-2"]))
            .await
            .unwrap();
        w1.send(&page("elsewhere", "lead-1", 1, 0, 1, &["lead-1"]))
            .await
            .unwrap();
        ping(&mut r1, &mut w1, 1).await;
        let (_, segments) = m.api("GET", "/api/v1/segments", None);
        assert_eq!(segments, json!([]), "nothing refused was stored");
        let log = m.log();
        assert!(
            log.contains("segment report refused") && log.contains("came from agent"),
            "{log}"
        );

        // lead-1's own report in two pages, with a member the manager does not know.
        w1.send(&page("loopback", "lead-1", 1, 1, 2, &["stranger"]))
            .await
            .unwrap();
        ping(&mut r1, &mut w1, 2).await;
        let (_, segments) = m.api("GET", "/api/v1/segments", None);
        assert_eq!(segments, json!([]), "an incomplete report is not stored");
        w1.send(&page("loopback", "lead-1", 1, 0, 2, &["lead-1", "lead-2"]))
            .await
            .unwrap();
        ping(&mut r1, &mut w1, 3).await;
        let (status, seg) = m.api("GET", "/api/v1/segments/loopback", None);
        assert_eq!(status, 200, "{seg}");
        assert_eq!(
            (seg["leader"].as_str(), seg["term"].as_u64()),
            (Some("lead-1"), Some(1))
        );
        let members = seg["members"].as_array().unwrap();
        let names: Vec<&str> = members.iter().map(|x| x["id"].as_str().unwrap()).collect();
        assert_eq!(names, ["lead-1", "lead-2", "stranger"]);
        assert_eq!(members[2]["known"], false);
        assert_eq!(members[0]["known"], true);
        assert_eq!(
            members[0]["delays"],
            json!([{ "to": null, "rtt_us": 1500 }])
        );

        // A new leader: its report replaces the view and the history records the change.
        w2.send(&page("loopback", "lead-2", 1, 0, 1, &["lead-2"]))
            .await
            .unwrap();
        ping(&mut r2, &mut w2, 4).await;
        let (_, seg) = m.api("GET", "/api/v1/segments/loopback", None);
        assert_eq!(seg["leader"], "lead-2", "{seg}");
        assert_eq!(seg["members"].as_array().unwrap().len(), 1, "{seg}");
        let history: Vec<&str> = seg["leader_history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["leader"].as_str().unwrap())
            .collect();
        assert_eq!(history, ["lead-1", "lead-2"]);
        // A repeated term of the same leader changes nothing.
        w2.send(&page("loopback", "lead-2", 1, 0, 1, &["lead-2", "lead-1"]))
            .await
            .unwrap();
        ping(&mut r2, &mut w2, 5).await;
        let (_, seg) = m.api("GET", "/api/v1/segments/loopback", None);
        assert_eq!(seg["members"].as_array().unwrap().len(), 1, "{seg}");

        // An agent that says it moved is not believed: it stays placed where its first
        // report put it, so its report for the new segment is refused...
        let mut moved = report("lead-1");
        moved.segment = "site/lan-9".try_into().unwrap();
        w1.send(&Message::Report(moved).to_vec()).await.unwrap();
        w1.send(&page("site/lan-9", "lead-1", 2, 0, 1, &["lead-1"]))
            .await
            .unwrap();
        ping(&mut r1, &mut w1, 6).await;
        let (_, segments) = m.api("GET", "/api/v1/segments", None);
        let names: Vec<&str> = segments
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(names, ["loopback"], "a self-declared move is not believed");
        // ...until the administrator places it there (names may hold '/'): its session is
        // closed, and in the next one (a certificate for site/lan-9) the report is taken.
        let placed = ok(&m, &["agents", "segment", "lead-1", "site/lan-9"]);
        assert!(placed.contains("site/lan-9"), "{placed}");
        expect_closed(&mut r1).await;
        let (mut r1, mut w1, _) = join(&m, &one, "lead-1", None).await.unwrap();
        w1.send(&page("site/lan-9", "lead-1", 2, 0, 1, &["lead-1"]))
            .await
            .unwrap();
        ping(&mut r1, &mut w1, 7).await;
    });
    let shown = ok(&m, &["segments", "show", "site/lan-9"]);
    assert!(
        shown.contains("segment site/lan-9: leader lead-1"),
        "{shown}"
    );

    let table = ok(&m, &["segments"]);
    assert!(
        table.contains("loopback") && table.contains("lead-2") && table.contains("1.5 ms"),
        "{table}"
    );
    let shown = ok(&m, &["segments", "show", "loopback"]);
    assert!(
        shown.contains("leaders:") && shown.contains("lead-1"),
        "{shown}"
    );
    let listed = json_of(&ok(&m, &["segments", "--json"]));
    assert_eq!(listed[0]["name"], "loopback");
    let err = fails(&m, &["segments", "show", "nowhere"]);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn a_resumed_job_keeps_its_policy() {
    let tmp = tempfile::tempdir().unwrap();
    // A fixed agent port, so that the agents find the restarted manager.
    let listen = free_loopback_addr();
    let mut m = Manager::start_on(BATON, tmp.path(), &listen);
    let root = tmp.path().to_path_buf();
    let agents = AgentProc::spawn_slow(&m, &root, &["k1", "k2", "k3"]);
    // No relaying: every byte comes from the manager, before and after the restart.
    ok(&m, &["policies", "add", "direct", "--relay", "false"]);
    let bytes = pseudo_random(1_500_000, 11);
    let file = root.join("bundle.bin");
    std::fs::write(&file, &bytes).unwrap();
    let created = json_of(&ok(
        &m,
        &[
            "push",
            file.to_str().unwrap(),
            "--agents",
            "k1,k2,k3",
            "--policy",
            "direct",
            "--json",
        ],
    ));
    let id = created["id"].as_u64().unwrap();
    m.wait_job_started(id);
    m.crash();

    let m = Manager::start_on(BATON, tmp.path(), &listen);
    let done = m.wait_job(id, Duration::from_secs(60), |j| j["state"] == "finished");
    assert_eq!(done["confirmed_count"], 3, "{done}");
    assert_eq!(done["policy"], "direct", "{done}");
    assert_eq!(done["policy_spec"]["relay"], false, "{done}");
    assert_eq!(
        done["bytes_from_peers"], 0,
        "the resumed job did not relay: {done}"
    );
    for a in &agents {
        a.wait_export(&bytes);
    }
}

#[test]
fn a_label_selector_job_takes_in_matching_agents_that_enrol_while_it_runs() {
    // The manager's upload is capped so the job is still running when the newcomers come.
    let m = Manager::start_args(BATON, &["--up-bps", "64KiB"]);
    let root = m.dir.clone();
    let _first = spawn(&m, &root, "s1", &["role=edge"]);
    let _core = spawn(&m, &root, "s2", &["role=core"]);
    m.wait_connected(&["s1", "s2"]);
    ok(&m, &["groups", "add", "edge", "--label", "role=edge"]);
    let file = root.join("follow.bin");
    let content = pseudo_random(640 * 1024, 7);
    std::fs::write(&file, &content).unwrap();
    let job = json_of(&ok(
        &m,
        &["push", file.to_str().unwrap(), "--group", "edge", "--json"],
    ));
    let id = job["id"].as_u64().unwrap();
    // Two agents enrol and connect while it runs: one carries the selector's label.
    let late = spawn(&m, &root, "s3", &["role=edge", "site=ams"]);
    let other = spawn(&m, &root, "s4", &["role=core"]);
    m.wait_connected(&["s3", "s4"]);
    let running = m.job(id);
    assert_eq!(running["state"], "running", "finished too soon: {running}");
    let done = m.wait_job(id, Duration::from_secs(60), |j| j["state"] == "finished");
    assert_eq!(participant_ids(&done), ["s1", "s3"], "{done}");
    assert_eq!(done["confirmed_count"], 2, "{done}");
    assert_eq!(
        done["targets"],
        json!({ "group": { "agents": ["s1"], "selector": { "role": "edge" } } }),
        "{done}"
    );
    late.wait_export(&content);
    received_nothing(&other, id, file.to_str().unwrap());
}
