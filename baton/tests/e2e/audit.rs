//! End to end: the audit log against a real `baton serve` and the `baton` client
//! commands. The admin token and a named API token each make changes (a content group,
//! a push of a small file to a real `baton agent`, the agent's placement) and the API
//! token one that is refused; `baton audit --json`
//! and `GET /api/v1/audit` list them newest first with who made them, from which
//! address, what, and the result; pages follow each other; the log cannot be written
//! through the API.

use std::time::{Duration, Instant};

use crate::common::*;
use baton_test_support::{AgentProc, Manager};
use serde_json::{Value, json};

/// `(via, who, address, action, target, result, status)` of an entry, for comparing.
fn summary(e: &Value) -> (String, String, String, String, String, String, u64) {
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    (
        s("via"),
        s("who"),
        s("address"),
        s("action"),
        s("target"),
        s("result"),
        e["status"].as_u64().unwrap_or(0),
    )
}

fn row(
    via: &str,
    who: &str,
    address: &str,
    action: &str,
    target: &str,
    result: &str,
    status: u64,
) -> (String, String, String, String, String, String, u64) {
    (
        via.into(),
        who.into(),
        address.into(),
        action.into(),
        target.into(),
        result.into(),
        status,
    )
}

#[test]
fn changes_by_the_admin_token_and_a_named_token_are_listed_newest_first() {
    let started = Instant::now();
    let m = Manager::start(BATON);
    let file = m.dir.join("small.bin");
    std::fs::write(&file, vec![7u8; 3000]).unwrap();

    // A named API token, created on the manager's host (recorded as `cli`).
    let ci = ok(&m, &["admin", "token", "ci"]).trim().to_string();
    // A real agent, enrolled with a one-time token the admin token creates.
    let root = m.dir.clone();
    let _agent = AgentProc::spawn(&m, &root, "a1", &[]);
    m.wait_connected(&["a1"]);

    // The admin token (read by the CLI from the data directory): a group and a push.
    ok(&m, &["groups", "add", "edge", "--label", "role=edge"]);
    let pushed: Value = serde_json::from_str(&ok(
        &m,
        &["push", file.to_str().unwrap(), "--agents", "a1", "--json"],
    ))
    .unwrap();
    let admin_job = pushed["id"].as_u64().expect("a job id");

    // The named token over the API: a group, a push, and a group whose name is taken.
    let (status, body) = m.api_with(
        "POST",
        "/api/v1/groups",
        Some(json!({ "name": "core", "selector": { "role": "core" } })),
        Some(&ci),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = m.api_with(
        "POST",
        "/api/v1/jobs",
        Some(json!({ "path": file, "name": "fw", "targets": { "agents": ["a1"] } })),
        Some(&ci),
    );
    assert_eq!(status, 201, "{body}");
    let ci_job = body["id"].as_u64().unwrap();
    let (status, refused) = m.api_with(
        "POST",
        "/api/v1/groups",
        Some(json!({ "name": "edge", "selector": { "role": "x" } })),
        Some(&ci),
    );
    assert_eq!(status, 409, "{refused}");
    // The admin token places the agent (PATCH /api/v1/agents/a1).
    ok(&m, &["agents", "score", "a1", "5"]);
    // Reading changes nothing and is not recorded; the log has no route that writes.
    let (status, _) = m.api_with("GET", "/api/v1/groups", None, Some(&ci));
    assert_eq!(status, 200);

    let expected = [
        row(
            "admin-token",
            "",
            "127.0.0.1",
            "agent.place",
            "a1",
            "ok",
            200,
        ),
        row(
            "api-token",
            "ci",
            "127.0.0.1",
            "group.create",
            "edge",
            "refused",
            409,
        ),
        row(
            "api-token",
            "ci",
            "127.0.0.1",
            "job.start",
            &format!("job {ci_job}: fw v1"),
            "ok",
            201,
        ),
        row(
            "api-token",
            "ci",
            "127.0.0.1",
            "group.create",
            "core",
            "ok",
            201,
        ),
        row(
            "admin-token",
            "",
            "127.0.0.1",
            "job.start",
            &format!("job {admin_job}: small.bin v1"),
            "ok",
            201,
        ),
        row(
            "admin-token",
            "",
            "127.0.0.1",
            "group.create",
            "edge",
            "ok",
            201,
        ),
    ];

    // `baton audit --json`: newest first, the `cli` entry last.
    let listed: Value = serde_json::from_str(&ok(&m, &["audit", "--json"])).unwrap();
    let listed = listed.as_array().expect("an array").clone();
    assert_eq!(listed.len(), 8, "{listed:#?}");
    let got: Vec<_> = listed.iter().take(6).map(summary).collect();
    assert_eq!(got, expected, "{listed:#?}");
    assert_eq!(
        summary(&listed[6]),
        row(
            "admin-token",
            "",
            "127.0.0.1",
            "enrolment-token.create",
            "",
            "ok",
            201
        )
    );
    let cli_entry = &listed[7];
    assert_eq!(
        (
            cli_entry["via"].as_str(),
            cli_entry["address"].as_str(),
            cli_entry["action"].as_str(),
            cli_entry["target"].as_str(),
            cli_entry["result"].as_str()
        ),
        (
            Some("cli"),
            Some("local"),
            Some("api-token.create"),
            Some("ci"),
            Some("ok")
        )
    );
    assert!(
        listed[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("already exists")),
        "{}",
        listed[1]
    );
    let ids: Vec<u64> = listed.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(listed.iter().all(|e| {
        let at = e["at"].as_u64().unwrap();
        at <= now && now - at < 120
    }));

    // The table names the same.
    let table = ok(&m, &["audit", "--limit", "3"]);
    assert!(
        table.contains("api-token ci") && table.contains("refused 409"),
        "{table}"
    );

    // `GET /api/v1/audit` with the named token, in pages of two.
    let (status, page) = m.api_with("GET", "/api/v1/audit?limit=2", None, Some(&ci));
    assert_eq!(status, 200, "{page}");
    let first: Vec<_> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(summary)
        .collect();
    assert_eq!(first, expected[..2]);
    let next = page["next"].as_u64().expect("a next page");
    let (_, page) = m.api_with(
        "GET",
        &format!("/api/v1/audit?limit=2&before={next}"),
        None,
        Some(&ci),
    );
    let second: Vec<_> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(summary)
        .collect();
    assert_eq!(second, expected[2..4]);

    // Not writable: a POST is refused (and that refusal is recorded, nothing else is).
    let (status, _) = m.api_with("POST", "/api/v1/audit", Some(json!({})), Some(&ci));
    assert_eq!(status, 405);
    let (_, page) = m.api_with("GET", "/api/v1/audit?limit=1", None, Some(&ci));
    let newest = &page["entries"][0];
    assert_eq!(newest["result"], "refused", "{newest}");
    assert_eq!(newest["status"], 405);
    // Without credentials, nothing is read and nothing recorded.
    let (status, _) = m.api_with("POST", "/api/v1/groups", Some(json!({"name": "x"})), None);
    assert_eq!(status, 401);
    let (status, _) = m.api_with("GET", "/api/v1/audit", None, None);
    assert_eq!(status, 401);
    let (_, page) = m.api_with("GET", "/api/v1/audit?limit=1", None, Some(&ci));
    assert_eq!(page["entries"][0]["id"], newest["id"]);

    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}
