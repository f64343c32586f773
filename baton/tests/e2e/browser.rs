//! The web UI in a real browser: headless Chromium driven over WebDriver.
//!
//! An administrator logs in, creates a content group (after a validation
//! error shown next to the field) and a policy, uploads content and pushes it
//! to the group's real local agents, watches the job page until every
//! participant shows confirmed, and checks that the relay tree's edges are the
//! transfers that carried bytes; the audit log page lists the logins and the changes.
//! Screenshots go to `target/ui-screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs
//! them); without them the test fails, it does not skip.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use baton_test_support::webdriver::Browser;
use baton_test_support::{AgentProc, Manager, manager::BOUND, pseudo_random};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots")
}

/// Checks the relay tree on the page: every agent one column right of the source that gave
/// it the most bytes, every edge labelled (main-source labels visible), no two nodes
/// overlapping, every segment's agents inside their segment's box; answers what it checked.
const TREE_CHECK: &str = r#"
const svg = document.querySelector('#relay-tree');
const nodes = [...svg.querySelectorAll('g.node')];
const col = new Map(nodes.map(g => [g.dataset.node, Number(g.dataset.column)]));
const edges = [...svg.querySelectorAll('path.edge')];
const problems = [];
for (const g of nodes) {
  const n = g.dataset.node;
  if (n === 'manager') { if (col.get(n) !== 0) problems.push('manager not in column 0'); continue; }
  const ins = edges.filter(e => e.dataset.to === n).sort((a, b) => b.dataset.bytes - a.dataset.bytes);
  const main = ins.find(e => e.dataset.main === '1');
  const biggest = ins.length && main && Number(main.dataset.bytes) === Number(ins[0].dataset.bytes);
  if (biggest) {
    if (col.get(n) !== col.get(main.dataset.from) + 1) problems.push(n + ' column ' + col.get(n) + ' vs source ' + main.dataset.from);
  } else if (ins.length) {
    // Only where agents fed each other in a loop: the loop hangs off the manager.
    if (col.get(n) !== 1 || (main && main.dataset.from !== 'manager')) problems.push(n + ': main source is not the biggest');
  }
}
const labels = [...svg.querySelectorAll('text.edge-label')];
for (const e of edges) {
  const l = labels.find(t => t.dataset.from === e.dataset.from && t.dataset.to === e.dataset.to);
  if (!l) problems.push('no label for ' + e.dataset.from + '->' + e.dataset.to);
  else if (e.dataset.main === '1' && getComputedStyle(l).opacity === '0') problems.push('main label hidden ' + e.dataset.to);
}
const boxes = nodes.map(g => [g.dataset.node, g.querySelector('rect').getBoundingClientRect()]);
for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
  const [a, r] = boxes[i], [b, q] = boxes[j];
  if (r.left < q.right - 1 && q.left < r.right - 1 && r.top < q.bottom - 1 && q.top < r.bottom - 1) problems.push('overlap ' + a + ' ' + b);
}
const segments = [...svg.querySelectorAll('g.segment-box')];
for (const box of segments) {
  const r = box.querySelector('rect').getBoundingClientRect();
  for (const [n, q] of boxes) {
    const inside = q.left >= r.left && q.right <= r.right && q.top >= r.top && q.bottom <= r.bottom;
    const member = (arguments[0] || {})[n] === box.dataset.segment;
    if (member && !inside) problems.push(n + ' outside its segment box ' + box.dataset.segment);
    if (!member && inside && n !== 'manager') problems.push(n + ' inside foreign segment box ' + box.dataset.segment);
  }
}
return { problems, nodes: nodes.length, edges: edges.length, segments: segments.length,
  leaders: svg.querySelectorAll('g.node.leader').length, columns: Math.max(...col.values()) + 1 };
"#;

/// A made-up finished-and-running job of 24 agents in four segments, to render.
fn big_job() -> Value {
    let mut participants = Vec::new();
    let mut transfers = Vec::new();
    let mib = 1u64 << 20;
    for s in 0..4 {
        for i in 0..6 {
            let agent = format!("rack{}-node{:02}", s + 1, i);
            let state = match (s, i) {
                (3, 4) => "fetching",
                (3, 5) => "waiting",
                (2, 5) => "failed",
                _ => "confirmed",
            };
            participants.push(json!({"agent": agent, "state": state, "verified": match state { "confirmed" => 128, "waiting" => 0, _ => 40 },
                "total": 128, "segment": format!("rack-{}", s + 1), "leader": i == 0, "connected": true}));
            if i == 0 {
                transfers.push(json!({"from": null, "to": agent, "bytes": 4 * mib}));
            } else if state != "waiting" {
                // Members take most from their leader (or a member relaying on), a little elsewhere.
                let main = if i >= 4 {
                    format!("rack{}-node01", s + 1)
                } else {
                    format!("rack{}-node00", s + 1)
                };
                transfers.push(json!({"from": main, "to": agent, "bytes": 3 * mib}));
                let other = if i % 2 == 0 {
                    Value::Null
                } else {
                    json!(format!("rack{}-node02", s + 1))
                };
                if other.as_str() != Some(agent.as_str()) {
                    transfers.push(json!({"from": other, "to": agent, "bytes": mib}));
                }
            }
        }
    }
    json!({"id": 99, "state": "running", "total_chunks": 128, "participants": participants, "transfers": transfers})
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
    let m = Manager::start(BATON);
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
    let bytes = pseudo_random(6_000_000, 3);
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
    // Time windows, one per line; an unknown time zone is refused next to the field.
    b.fill(
        &b.find("#f-windows"),
        "22:00-06:00\nsat,sun 08:00-20:00 Mars/Olympus",
    );
    b.click(&b.find("#save-policy"));
    b.wait_until(
        "the time zone's error next to the windows",
        "return document.querySelector('#e-windows').textContent.includes('unknown time zone')",
        WAIT,
    );
    b.fill(
        &b.find("#f-windows"),
        "22:00-06:00\nsat,sun 08:00-20:00 Europe/Berlin",
    );
    b.screenshot(&shots().join("04-policy-form.png"));
    b.click(&b.find("#save-policy"));
    b.wait_find("tr[data-policy=night-relay]", WAIT);
    let (status, policy) = m.api("GET", "/api/v1/policies/night-relay", None);
    assert_eq!(status, 200, "{policy}");
    assert_eq!(policy["max_peers_per_source"], 2);
    assert_eq!(policy["windows"][1]["zone"], "Europe/Berlin", "{policy}");
    assert_eq!(
        policy["windows"][1]["days"],
        json!(["sat", "sun"]),
        "{policy}"
    );
    let row = b.text(&b.find("tr[data-policy=night-relay]"));
    assert!(
        row.contains("22:00-06:00 UTC, sat,sun 08:00-20:00 Europe/Berlin"),
        "{row}"
    );

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
    let segment_of: serde_json::Map<String, Value> = job["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((p["agent"].as_str()?.to_string(), p["segment"].clone())))
        .collect();
    let check = b.eval(TREE_CHECK, json!([segment_of]));
    assert_eq!(check["problems"], json!([]), "{check}");
    assert_eq!(check["nodes"], 4, "{check}");
    assert_eq!(
        check["segments"], 1,
        "the agents' segment is boxed: {check}"
    );
    assert_eq!(check["leaders"], 1, "edge-a is marked leader: {check}");
    b.screenshot(&shots().join("06-job-confirmed.png"));

    // A larger job renders readably too: 24 agents in four segments, relaying in layers.
    let big = big_job();
    let big_segments: serde_json::Map<String, Value> = big["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["agent"].as_str().unwrap().to_string(),
                p["segment"].clone(),
            )
        })
        .collect();
    b.eval(
        "const job = arguments[0];
         document.getElementById('view').replaceChildren(h('div', {},
           pageHead('Relay tree of 24 agents', 'Rendered from made-up transfers'),
           h('div', { class: 'card' }, h('div', { class: 'card-body tree-wrap' }, relayTree(job)), transfersTable(job))));
         return true",
        json!([big]),
    );
    let check = b.eval(TREE_CHECK, json!([big_segments]));
    assert_eq!(check["problems"], json!([]), "{check}");
    assert_eq!(check["nodes"], 25, "{check}");
    assert_eq!(check["segments"], 4, "{check}");
    assert_eq!(check["leaders"], 4, "{check}");
    assert_eq!(
        check["columns"], 4,
        "manager, leaders, members, relayed-on members: {check}"
    );
    b.resize(1366, 1240);
    b.screenshot(&shots().join("06b-job-24-agents.png"));
    // Crowded: other sources' bytes show when their receiver is hovered.
    let hidden = "return [...document.querySelectorAll('#relay-tree text.edge-label.on-hover[data-to=\"rack2-node05\"]')].map(t => getComputedStyle(t).opacity)";
    assert_eq!(b.eval(hidden, json!([])), json!(["0"]));
    b.eval(
        "document.querySelector('#relay-tree g.node[data-node=\"rack2-node05\"]').dispatchEvent(new MouseEvent('mouseenter')); return true",
        json!([]),
    );
    b.wait_until(
        "the hovered agent's other source labelled",
        "return [...document.querySelectorAll('#relay-tree text.edge-label[data-to=\"rack2-node05\"]')].every(t => getComputedStyle(t).opacity === '1')",
        WAIT,
    );
    b.screenshot(&shots().join("06c-job-24-agents-hover.png"));
    b.resize(1366, 900);

    // A second job under a policy no one can relay under: its warnings are counted in the list.
    let (status, second) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({"path": file, "name": "router-fw", "group": "edge",
            "policy": {"leaf_only": ["edge-a", "edge-b", "edge-c"]}})),
    );
    assert_eq!(status, 201, "{second}");
    let second_id = second["id"].as_u64().unwrap();
    let second = m.wait_job(second_id, Duration::from_secs(90), |j| {
        j["state"] == "finished"
    });
    let warnings = second["warnings"].as_array().unwrap().len();
    assert!(warnings >= 1, "{second}");
    let (_, list) = m.api("GET", "/api/v1/jobs", None);
    let listed = |job: u64| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == job)
            .cloned()
            .unwrap()
    };
    assert_eq!(listed(second_id)["warnings"], warnings, "{list}");
    assert_eq!(listed(id)["warnings"], 0, "{list}");
    assert_eq!(listed(id)["group"], "edge", "{list}");
    assert_eq!(listed(id)["policy"], "night-relay", "{list}");

    b.goto(&format!("{base}/#/jobs"));
    b.wait_find(
        &format!("tr[data-job='{id}'] .pill[data-state=finished]"),
        WAIT,
    );
    b.wait_find(
        &format!("tr[data-job='{second_id}'] .pill[data-state=finished]"),
        WAIT,
    );
    let shown = b.eval(
        "return [...document.querySelectorAll('tr[data-job]')].map(r => [Number(r.dataset.job), r.querySelector('[data-warnings]').dataset.warnings, r.cells[4].textContent, r.cells[5].textContent])",
        json!([]),
    );
    assert_eq!(
        shown,
        json!([
            [second_id, warnings.to_string(), "edge", "—"],
            [id, "0", "edge", "night-relay"]
        ]),
        "jobs page: warnings, group, policy"
    );
    b.screenshot(&shots().join("07-jobs.png"));

    // The audit log page: the logins (the wrong password too) and the session's changes.
    b.goto(&format!("{base}/#/audit"));
    b.wait_find("tr[data-audit]", WAIT);
    let rows = b.eval(
        "return [...document.querySelectorAll('tr[data-audit]')].map(r => [...r.cells].slice(1).map(c => c.textContent.trim()).join(' | '))",
        json!([]),
    );
    let rows: Vec<String> = serde_json::from_value(rows).unwrap();
    let has = |want: &[&str]| rows.iter().any(|r| want.iter().all(|w| r.contains(w)));
    assert!(
        has(&["login ops", "127.0.0.1", "login", "refused 401"]),
        "{rows:#?}"
    );
    assert!(has(&["login ops", "login", "ok"]), "{rows:#?}");
    assert!(
        has(&["session ops", "group.create", "edge devices", "refused 400"]),
        "{rows:#?}"
    );
    assert!(
        has(&["session ops", "group.create", "| edge |", "ok"]),
        "{rows:#?}"
    );
    assert!(has(&["session ops", "job.start", "ok"]), "{rows:#?}");
    b.screenshot(&shots().join("07b-audit.png"));

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

    // The metrics reflect both jobs: bytes served by the manager and by relays, as drawn.
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
        .chain(carried(&second).iter())
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
            + second["bytes_from_manager"].as_u64().unwrap()
    );
    assert_eq!(value("baton_connected_agents"), 4);
    assert_eq!(value("baton_jobs{state=\"finished\"}"), 2);
}

/// Clicks the element `css` from the page's own script once it is there (the job page
/// redraws on live events, so an element found by one WebDriver call may be stale by the
/// next).
fn click_when_there(b: &Browser, css: &str) {
    b.wait_find(css, WAIT);
    let clicked = b.eval(
        "const e = document.querySelector(arguments[0]); if (!e) return false; e.click(); return true",
        json!([css]),
    );
    assert_eq!(clicked, true, "{css} vanished before the click");
}

#[test]
fn administrator_pauses_and_approves_a_rollout_on_the_job_page() {
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let password_file = root.join("password");
    std::fs::write(&password_file, "s3cret-pass\n").unwrap();
    let data = m.data_dir();
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
    let names = ["r-a", "r-b", "r-c"];
    let _agents: Vec<AgentProc> = names
        .iter()
        .map(|n| AgentProc::spawn(&m, &root, n, &[]))
        .collect();
    m.wait_connected(&names);
    let file = root.join("staged.bin");
    std::fs::write(&file, pseudo_random(64 * 1024, 8)).unwrap();

    let b = Browser::start(1366, 900);
    let base = m.url("");
    b.goto(&base);
    b.fill(&b.find("#name"), "ops");
    b.fill(&b.find("#password"), "s3cret-pass");
    b.click(&b.find("button[type=submit]"));
    b.wait_find("#nav", WAIT);
    // The new-job form: two waves (2 agents, then 1), the second waits for approval. A
    // wave that is not a percentage is refused next to the field first.
    b.goto(&format!("{base}/#/jobs/new"));
    b.type_into(&b.find("#f-file"), file.to_str().unwrap());
    b.eval(
        "document.querySelector('#f-target').value = 'all';          document.querySelector('#f-waves').value = '34, most';          document.querySelector('#f-approval').checked = true; return true",
        json!([]),
    );
    b.click(&b.find("#start-job"));
    b.wait_until(
        "the waves' error next to the field",
        "return document.querySelector('#e-waves').textContent.length > 0",
        WAIT,
    );
    b.eval(
        "document.querySelector('#f-waves').value = '34, 100'; return true",
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
    // Wave 1 runs the content: the page offers to approve wave 2.
    b.wait_find("#rollout[data-rollout=awaiting_approval]", WAIT);
    let waves = b.eval(
        "return [...document.querySelectorAll('#rollout tr.wave')].map(r => [r.dataset.wave, r.dataset.open])",
        json!([]),
    );
    assert_eq!(waves, json!([["1", "yes"], ["2", "no"]]));
    let held = b.eval(
        "return [...document.querySelectorAll('tr.participant')].filter(r => r.textContent.includes('held')).map(r => r.dataset.wave)",
        json!([]),
    );
    assert_eq!(held, json!(["2"]), "the wave-2 participant shows held");
    b.screenshot(&shots().join("10-rollout-awaiting-approval.png"));

    // Pause: the job's rollout is paused, the page shows it and offers Resume, not Approve.
    click_when_there(&b, "#rollout-pause");
    b.wait_find("#rollout[data-rollout=paused]", WAIT);
    let job = m.job(id);
    assert_eq!(
        job["rollout"]["paused"], "paused by an administrator",
        "{job}"
    );
    assert_eq!(
        b.eval(
            "return [!!document.querySelector('#rollout-resume'), !!document.querySelector('#rollout-approve')]",
            json!([])
        ),
        json!([true, false])
    );
    b.screenshot(&shots().join("11-rollout-paused.png"));
    // The jobs list says so too.
    b.goto(&format!("{base}/#/jobs"));
    b.wait_find(
        &format!("tr[data-job='{id}'] .pill[data-state=paused]"),
        WAIT,
    );
    b.goto(&format!("{base}/#/jobs/{id}"));
    click_when_there(&b, "#rollout-resume");
    b.wait_find("#rollout[data-rollout=awaiting_approval]", WAIT);
    assert_eq!(
        m.job(id)["rollout"]["opened"],
        1,
        "resume alone opens nothing"
    );

    // Approve: wave 2 opens and the job finishes with everyone running.
    click_when_there(&b, "#rollout-approve");
    let done = m.wait_job(id, WAIT, |j| j["state"] == "finished");
    assert_eq!(done["rollout"]["opened"], 2, "{done}");
    assert_eq!(done["install_counts"], json!({ "running": 3 }), "{done}");
    b.wait_find("#rollout[data-rollout=complete]", WAIT);
    b.screenshot(&shots().join("12-rollout-complete.png"));
    // Each button press is in the audit log as the session's.
    let (_, audit) = m.api("GET", "/api/v1/audit?limit=50", None);
    let text = audit.to_string();
    for action in ["job.pause", "job.resume", "job.approve"] {
        assert!(text.contains(action), "audit lacks {action}: {audit}");
    }
}
