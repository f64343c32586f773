//! The web UI in a real browser: headless Chromium driven over WebDriver.
//!
//! An administrator logs in, creates a content group (after a validation
//! error shown next to the field) and a policy, uploads content and pushes it
//! to the group's real local agents, watches the job page until every
//! participant shows confirmed, and checks that the relay tree's edges are the
//! transfers that carried bytes. Screenshots go to `target/ui-screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs
//! them); without them the test fails, it does not skip.

mod common;
#[path = "support/webdriver.rs"]
mod webdriver;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use webdriver::Browser;

const WAIT: Duration = Duration::from_secs(20);

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots")
}

fn content(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Edges of the relay tree as drawn: (from, to) → bytes.
fn drawn_edges(b: &Browser) -> BTreeMap<(String, String), u64> {
    let v = b.eval(
        "return [...document.querySelectorAll('#relay-tree path.edge')]
            .map(e => [e.dataset.from, e.dataset.to, Number(e.dataset.bytes)])",
        json!([]),
    );
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                (
                    e[0].as_str().unwrap().to_string(),
                    e[1].as_str().unwrap().to_string(),
                ),
                e[2].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The job's transfers that carried bytes, from the API: (from, to) → bytes.
fn carried(job: &Value) -> BTreeMap<(String, String), u64> {
    job["transfers"]
        .as_array()
        .expect("job JSON has transfers")
        .iter()
        .filter(|t| t["bytes"].as_u64().unwrap() > 0)
        .map(|t| {
            (
                (
                    t["from"].as_str().unwrap_or("manager").to_string(),
                    t["to"].as_str().unwrap().to_string(),
                ),
                t["bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn administrator_pushes_to_a_group_and_watches_the_relay() {
    let m = Manager::start();
    let root = m.dir.clone();
    let data = m.data_dir();
    let password_file = root.join("password");
    std::fs::write(&password_file, "s3cret-pass\n").unwrap();
    let out = baton(
        &[
            "admin",
            "add",
            "ops",
            "--password-file",
            password_file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        BOUND,
    );
    assert!(out.success, "{}", out.stderr);

    // Four real agents; three carry the label the group selects.
    let port = std::net::UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let agents: Vec<AgentProc> = [
        ("edge-a", "role=edge"),
        ("edge-b", "role=edge"),
        ("edge-c", "role=edge"),
        ("spare-1", "role=spare"),
    ]
    .iter()
    .map(|(name, label)| {
        let performance = if *name == "edge-a" { "900" } else { "300" };
        AgentProc::spawn(
            &m,
            &root,
            name,
            &[
                "--segment",
                "rack-1",
                "--performance",
                performance,
                "--discovery-port",
                &port,
                "--discovery-broadcast",
                "127.255.255.255",
                "--beacon-interval-ms",
                "200",
                "--leader-timeout-ms",
                "1000",
                "--up-bps",
                "3MiB",
                "--down-bps",
                "3MiB",
                "--label",
                label,
                "--site",
                "lab",
            ],
        )
    })
    .collect();
    m.wait_connected(&["edge-a", "edge-b", "edge-c", "spare-1"]);

    // The agents share one LAN segment: they find each other by UDP broadcast on loopback,
    // elect the strongest (edge-a) and its report reaches the manager.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let segment = loop {
        let (status, segs) = m.api("GET", "/api/v1/segments", None);
        assert_eq!(status, 200, "{segs}");
        // Wait for a report that also carries measured delays between members.
        if let Some(seg) = segs.as_array().unwrap().iter().find(|s| {
            s["name"] == "rack-1"
                && s["members"].as_array().is_some_and(|m| {
                    m.len() == 4
                        && m.iter().any(|m| {
                            m["delays"]
                                .as_array()
                                .is_some_and(|d| d.iter().any(|d| d["to"].is_string()))
                        })
                })
        }) {
            break seg.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report of segment rack-1 with 4 members: {segs}; log:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(segment["leader"], "edge-a", "{segment}");
    let bytes = content(6_000_000);
    let file = root.join("router-fw-2.4.bin");
    std::fs::write(&file, &bytes).unwrap();

    let b = Browser::start(1366, 900);
    let base = m.url("");

    // Log in.
    b.goto(&base);
    b.find("input[type=password]");
    b.screenshot(&shots().join("01-login.png"));
    b.fill(&b.find("#name"), "ops");
    b.fill(&b.find("#password"), "wrong-password");
    b.click(&b.find("button[type=submit]"));
    let err = b.find(".form-error");
    assert!(b.text(&err).contains("Wrong name or password"));
    b.fill(&b.find("#password"), "s3cret-pass");
    b.click(&b.find("button[type=submit]"));
    b.wait_find("#nav", WAIT);

    // The fleet shows the four agents, connected.
    b.wait_until(
        "four connected agents in the fleet, edge-a marked leader",
        "return document.querySelectorAll('tr[data-agent] .pill[data-state=connected]').length === 4 \
            && !!document.querySelector('tr[data-agent=edge-a] .badge.leader')",
        WAIT,
    );
    b.screenshot(&shots().join("02-fleet.png"));

    // The segment: leader, members, delays between them.
    b.goto(&format!("{base}/#/segments"));
    b.wait_find("[data-segment=rack-1] tr[data-agent=spare-1]", WAIT);
    let text = b.text(&b.find("[data-segment=rack-1]"));
    assert!(text.contains("leader edge-a"), "{text}");
    let peer_rtts = b.eval(
        "return [...document.querySelectorAll('[data-segment=rack-1] .matrix td')]
            .filter(td => td.textContent.endsWith(' ms')).length",
        json!([]),
    );
    assert!(
        peer_rtts.as_u64() > Some(0),
        "no delay between members shown: {text}"
    );
    b.screenshot(&shots().join("02b-segments.png"));

    // A content group: a bad name is refused next to the field, then it is created.
    b.goto(&format!("{base}/#/groups/new"));
    b.fill(&b.find("#f-name"), "edge devices");
    b.fill(&b.find("#f-selector"), "role=edge");
    b.click(&b.find("#save-group"));
    let e = b.find("#e-name");
    b.wait_until(
        "the name's error next to the field",
        "return document.querySelector('#e-name').textContent.length > 0",
        WAIT,
    );
    assert!(b.text(&e).contains("use letters, digits"), "{}", b.text(&e));
    assert_eq!(
        b.eval(
            "return document.querySelector('#w-name').classList.contains('has-error')",
            json!([])
        ),
        true,
        "the error is shown at the name field"
    );
    b.screenshot(&shots().join("03-group-validation.png"));
    b.fill(&b.find("#f-name"), "edge");
    b.click(&b.find("#save-group"));
    b.wait_until(
        "group edge listed with three members",
        "const r = document.querySelector('tr[data-group=edge]'); return !!r && r.cells[3].textContent === '3'",
        WAIT,
    );
    let (status, group) = m.api("GET", "/api/v1/groups/edge", None);
    assert_eq!(status, 200);
    assert_eq!(group["members"], json!(["edge-a", "edge-b", "edge-c"]));

    // A policy.
    b.goto(&format!("{base}/#/policies/new"));
    b.fill(&b.find("#f-name"), "night-relay");
    b.fill(&b.find("#f-max_peers_per_source"), "2");
    b.fill(&b.find("#f-agent_rate_cap_bps"), "abc");
    b.click(&b.find("#save-policy"));
    b.wait_until(
        "the rate cap's error next to the field",
        "return document.querySelector('#e-agent_rate_cap_bps').textContent.length > 0",
        WAIT,
    );
    b.fill(&b.find("#f-agent_rate_cap_bps"), "0");
    b.screenshot(&shots().join("04-policy-form.png"));
    b.click(&b.find("#save-policy"));
    b.wait_find("tr[data-policy=night-relay]", WAIT);
    let (status, policy) = m.api("GET", "/api/v1/policies/night-relay", None);
    assert_eq!(status, 200, "{policy}");
    assert_eq!(policy["max_peers_per_source"], 2);

    // Push: upload the file, to the group, under the policy.
    b.goto(&format!("{base}/#/jobs/new"));
    b.type_into(&b.find("#f-file"), file.to_str().unwrap());
    b.eval(
        "const s = document.querySelector('#f-policy'); s.value = 'night-relay'; \
         const t = document.querySelector('#f-target'); t.value = 'group:edge';",
        json!([]),
    );
    b.click(&b.find("#start-job"));
    b.wait_find("#job-page", WAIT);
    let url = b.url();
    let id: u64 = url
        .rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not on a job page: {url}"));
    b.wait_until(
        "participants fetching",
        "return document.querySelectorAll('tr.participant').length === 3",
        WAIT,
    );
    b.screenshot(&shots().join("05-job-running.png"));

    // Watch the live page until every participant shows confirmed.
    b.wait_until(
        "every participant confirmed on the job page",
        "return document.querySelectorAll('tr.participant[data-state=confirmed]').length === 3 \
            && document.querySelectorAll('.confirmed-mark').length === 3",
        Duration::from_secs(90),
    );
    for a in &agents[..3] {
        a.wait_export(&bytes);
    }
    let job = m.wait_job(id, WAIT, |j| j["state"] == "finished");
    assert_eq!(job["group"], "edge");
    assert_eq!(job["policy"], "night-relay");
    let participants: Vec<&str> = job["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["agent"].as_str().unwrap())
        .collect();
    assert!(
        !participants.contains(&"spare-1"),
        "the spare is not in the group"
    );

    // The relay tree draws exactly the transfers that carried bytes.
    let want = carried(&job);
    b.wait_until(
        "the relay tree shows the final transfers",
        &format!(
            "return document.querySelectorAll('#relay-tree path.edge').length === {}",
            want.len()
        ),
        WAIT,
    );
    let drawn = drawn_edges(&b);
    assert_eq!(drawn, want, "relay tree edges vs the job's transfers");
    assert!(
        want.keys().any(|(from, _)| from != "manager"),
        "some content was relayed between agents: {want:?}"
    );
    for p in &participants {
        let received: u64 = want
            .iter()
            .filter(|((_, to), _)| to == p)
            .map(|(_, n)| n)
            .sum();
        assert!(
            received >= bytes.len() as u64,
            "{p} received {received} bytes by the edges drawn"
        );
    }
    let confirmed_nodes = b.eval(
        "return document.querySelectorAll('#relay-tree g.node.confirmed').length",
        json!([]),
    );
    assert_eq!(confirmed_nodes, 3);
    b.screenshot(&shots().join("06-job-confirmed.png"));

    b.goto(&format!("{base}/#/jobs"));
    b.wait_find(
        &format!("tr[data-job='{id}'] .pill[data-state=finished]"),
        WAIT,
    );
    b.screenshot(&shots().join("07-jobs.png"));

    // A phone-sized window.
    b.resize(390, 844);
    b.goto(&format!("{base}/#/jobs/{id}"));
    b.wait_find("#relay-tree", WAIT);
    b.screenshot(&shots().join("08-job-phone.png"));
    b.goto(&format!("{base}/#/fleet"));
    b.wait_find("tr[data-agent]", WAIT);
    b.screenshot(&shots().join("09-fleet-phone.png"));

    // Sign out: the login form again, and the API refuses the old cookie.
    b.resize(1366, 900);
    b.click(&b.find("#logout"));
    b.wait_find("input[type=password]", WAIT);

    // The metrics reflect the job: bytes served by the manager and by relays, as drawn.
    let (_, status) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status["connected_agents"], 4);
    let metrics = ureq::get(m.url("/metrics"))
        .header("Authorization", &format!("Bearer {}", m.info.admin_token))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    let relayed: u64 = want
        .iter()
        .filter(|((from, _), _)| from != "manager")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        value("baton_served_bytes_total{source=\"relays\"}"),
        relayed
    );
    assert_eq!(
        value("baton_served_bytes_total{source=\"manager\"}"),
        job["bytes_from_manager"].as_u64().unwrap()
    );
    assert_eq!(value("baton_connected_agents"), 4);
    assert_eq!(value("baton_jobs{state=\"finished\"}"), 1);
}
