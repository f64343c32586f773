//! End to end: scoped access against a real `baton serve` and the `baton` client
//! commands. Named API tokens made with `baton admin token NAME --role R` may do what
//! their role allows and get `403` naming the role needed and the role held beyond it;
//! the manager publishes files only from its upload directory and the `--content-dir`
//! directories, never from its data directory, also through a symlink; the web UI shows
//! an administrator only the actions its role allows.

use std::time::{Duration, Instant};

use crate::common::*;
use baton_protocol::identity::Identity;
use baton_test_support::Manager;
use serde_json::{Value, json};

/// Asserts a `403` that names the role needed and the role held.
fn assert_refused(what: &str, status: u16, body: &Value, needed: &str, held: &str) {
    assert_eq!(status, 403, "{what}: {body}");
    assert_eq!(body["needed"], needed, "{what}: {body}");
    assert_eq!(body["role"], held, "{what}: {body}");
    let error = body["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&format!("needs the {needed} role")) && error.contains(held),
        "{what}: {body}"
    );
}

#[test]
fn a_read_token_cannot_push_and_an_operate_token_cannot_enrol() {
    let started = Instant::now();
    let m = Manager::start(BATON);
    let file = m.dir.join("fw.bin");
    std::fs::write(&file, vec![5u8; 5000]).unwrap();
    let token = |name: &str, role: &str| {
        ok(&m, &["admin", "token", name, "--role", role])
            .trim()
            .to_string()
    };
    let read = token("viewer", "read");
    let operate = token("ci", "operate");
    let admin = token("ops", "admin");
    // A job needs a target: an enrolled agent (it need not be connected).
    m.enrol("t1", &Identity::from_seed([60; 32]).public());
    let push = json!({ "path": file, "name": "fw", "targets": { "agents": ["t1"] } });
    let key = hex::encode(Identity::from_seed([61; 32]).public().0);

    // Each token knows its role.
    for (t, name, role) in [
        (&read, "viewer", "read"),
        (&operate, "ci", "operate"),
        (&admin, "ops", "admin"),
    ] {
        let (status, me) = m.api_with("GET", "/api/v1/me", None, Some(t));
        assert_eq!(status, 200, "{me}");
        assert_eq!(
            (me["via"].as_str(), me["name"].as_str(), me["role"].as_str()),
            (Some("api-token"), Some(name), Some(role)),
            "{me}"
        );
    }

    // read: lists (positive control) and metrics; cannot push, add a group or enrol.
    let (status, body) = m.api_with("GET", "/api/v1/agents", None, Some(&read));
    assert_eq!(status, 200, "{body}");
    let (status, body) = m.api_with("GET", "/api/v1/jobs", None, Some(&read));
    assert_eq!(status, 200, "{body}");
    let (status, body) = m.api_with("POST", "/api/v1/jobs", Some(push.clone()), Some(&read));
    assert_refused("read pushes", status, &body, "operate", "read");
    let (status, body) = m.api_with(
        "POST",
        "/api/v1/groups",
        Some(json!({ "name": "edge", "selector": { "role": "edge" } })),
        Some(&read),
    );
    assert_refused("read adds a group", status, &body, "operate", "read");
    // The client command says so too.
    let out = cli(
        &m,
        &[
            "push",
            file.to_str().unwrap(),
            "--agents",
            "t1",
            "--admin-token",
            &read,
        ],
    );
    assert!(!out.success, "a read token pushed: {}", out.stdout);
    assert!(
        out.stderr.contains("needs the operate role"),
        "{}",
        out.stderr
    );

    // operate: pushes (positive control) and cancels; cannot enrol nor make enrolment tokens.
    let (status, job) = m.api_with("POST", "/api/v1/jobs", Some(push), Some(&operate));
    assert_eq!(status, 201, "operate could not push: {job}");
    let id = job["id"].as_u64().unwrap();
    let (status, body) = m.api_with(
        "POST",
        &format!("/api/v1/jobs/{id}/cancel"),
        None,
        Some(&operate),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = m.api_with(
        "POST",
        "/api/v1/agents",
        Some(json!({ "id": "d1", "key": key })),
        Some(&operate),
    );
    assert_refused("operate enrols", status, &body, "admin", "operate");
    let (status, body) = m.api_with(
        "POST",
        "/api/v1/enrolment-tokens",
        Some(json!({})),
        Some(&operate),
    );
    assert_refused(
        "operate makes an enrolment token",
        status,
        &body,
        "admin",
        "operate",
    );
    let (status, body) = m.api_with("GET", "/api/v1/agents/d1", None, Some(&operate));
    assert_eq!(status, 404, "the refused enrolment enrolled: {body}");

    // admin: enrols (positive control) and makes enrolment tokens.
    let (status, body) = m.api_with(
        "POST",
        "/api/v1/agents",
        Some(json!({ "id": "d1", "key": key })),
        Some(&admin),
    );
    assert_eq!(status, 201, "admin could not enrol: {body}");
    let (status, body) = m.api_with(
        "POST",
        "/api/v1/enrolment-tokens",
        Some(json!({})),
        Some(&admin),
    );
    assert_eq!(status, 201, "{body}");
    // The admin token of the data directory is admin.
    let (status, me) = m.api("GET", "/api/v1/me", None);
    assert_eq!((status, me["role"].as_str()), (200, Some("admin")), "{me}");

    // The refusals are in the audit log, by name, as 403.
    let (status, log) = m.api_with("GET", "/api/v1/audit", None, Some(&read));
    assert_eq!(status, 200, "{log}");
    let refused: Vec<(String, u64)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == 403)
        .map(|e| {
            (
                e["who"].as_str().unwrap_or("").to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    for who in ["viewer", "ci"] {
        assert!(
            refused.iter().any(|(w, _)| w == who),
            "no refusal of {who} in {log}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn the_data_directory_cannot_be_published() {
    let started = Instant::now();
    let content = tempfile::tempdir().unwrap();
    let fw = content.path().join("fw-2.4.bin");
    std::fs::write(&fw, vec![9u8; 4000]).unwrap();
    let m = Manager::start_args(
        BATON,
        &[
            "--give-up",
            "5",
            "--content-dir",
            content.path().to_str().unwrap(),
        ],
    );
    let data = m.data_dir();
    let key = data.join("manager.key");
    assert!(key.is_file());
    // A link in the allowed directory to the key, and one to the whole data directory.
    std::os::unix::fs::symlink(&key, content.path().join("innocent.bin")).unwrap();
    std::os::unix::fs::symlink(&data, content.path().join("data")).unwrap();
    // A file outside every allowed directory (beside the data directory).
    let outside = m.dir.join("outside.bin");
    std::fs::write(&outside, vec![1u8; 100]).unwrap();
    // A job needs a target: an enrolled agent (it need not be connected).
    m.enrol("t1", &Identity::from_seed([62; 32]).public());
    let job = |path: &std::path::Path| {
        m.api(
            "POST",
            "/api/v1/jobs",
            Some(json!({ "path": path, "name": "x", "targets": { "agents": ["t1"] } })),
        )
    };

    for (what, path) in [
        ("the manager key", key.clone()),
        ("the admin token", data.join("admin.token")),
        ("the database", data.join("baton.db")),
        ("a link to the key", content.path().join("innocent.bin")),
        (
            "the key through a linked directory",
            content.path().join("data/manager.key"),
        ),
        (
            "the key through ..",
            content.path().join("../").join(
                key.strip_prefix(content.path().parent().unwrap())
                    .unwrap_or(&key),
            ),
        ),
    ] {
        let (status, body) = job(&path);
        assert_eq!(
            status,
            403,
            "{what} ({}) was published: {body}",
            path.display()
        );
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("never published")),
            "{what}: {body}"
        );
    }
    let (status, body) = job(&outside);
    assert_eq!(status, 403, "a file outside was published: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--content-dir")),
        "{body}"
    );
    // Nothing was published.
    let (_, jobs) = m.api("GET", "/api/v1/jobs", None);
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs}");

    // Positive control: the file in the allowed directory, by the client command too.
    let (status, body) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({ "path": fw, "targets": { "agents": ["t1"] } })),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["name"], "fw-2.4.bin", "{body}");
    let pushed: Value = serde_json::from_str(&ok(
        &m,
        &["push", fw.to_str().unwrap(), "--agents", "t1", "--json"],
    ))
    .unwrap();
    assert!(pushed["id"].as_u64().is_some(), "{pushed}");
    // And the client says why when it is refused.
    let out = cli(&m, &["push", key.to_str().unwrap(), "--agents", "t1"]);
    assert!(!out.success);
    assert!(out.stderr.contains("never published"), "{}", out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// Logs `name` in with `password` at `base` and waits for the UI.
fn log_in(b: &baton_test_support::webdriver::Browser, base: &str, name: &str, password: &str) {
    b.goto(base);
    b.fill(&b.find("#name"), name);
    b.fill(&b.find("#password"), password);
    b.click(&b.find("button[type=submit]"));
    b.wait_find("#nav", Duration::from_secs(20));
}

/// Signs out and waits for the login form, so the next page load cannot race the sign-out.
fn log_out(b: &baton_test_support::webdriver::Browser) {
    b.click(&b.find("#logout"));
    b.wait_find("#name", Duration::from_secs(20));
}

#[test]
fn the_web_ui_hides_what_the_role_may_not_do() {
    let started = Instant::now();
    let wait = Duration::from_secs(20);
    let m = Manager::start(BATON);
    let password_file = m.dir.join("password");
    std::fs::write(&password_file, "s3cret-pass\n").unwrap();
    let password = password_file.to_str().unwrap();
    ok(
        &m,
        &[
            "admin",
            "add",
            "viewer",
            "--role",
            "read",
            "--password-file",
            password,
        ],
    );
    ok(
        &m,
        &[
            "admin",
            "add",
            "deployer",
            "--role",
            "operate",
            "--password-file",
            password,
        ],
    );
    ok(
        &m,
        &[
            "admin",
            "add",
            "ops",
            "--role",
            "admin",
            "--password-file",
            password,
        ],
    );
    ok(&m, &["groups", "add", "edge", "--label", "role=edge"]);
    m.enrol("edge-1", &Identity::from_seed([21; 32]).public());
    let b = baton_test_support::webdriver::Browser::start(1200, 800);
    let base = m.url("");
    // Counts of the elements matching each selector on the current page.
    let count = |css: &str| b.find_all(css).len();
    // Goes to `view` and waits until its page, titled `title`, is drawn.
    let page = |view: &str, title: &str| {
        b.goto(&format!("{base}/#/{view}"));
        b.wait_until(
            &format!("the page {title}"),
            &format!(
                "const h = document.querySelector('.page-head h1'); return !!h && h.textContent === '{title}'"
            ),
            wait,
        );
    };
    // What a POST from the page's own session answers.
    let post_group = r#"return fetch('/api/v1/groups', { method: 'POST',
        headers: { 'Content-Type': 'application/json',
                   'X-CSRF-Token': document.querySelector('meta[name="csrf-token"]').content },
        body: JSON.stringify({ name: 'from-' + arguments[0], selector: { role: 'x' } }) })
        .then(r => r.status)"#;

    // read: sees the groups and jobs, without a single action.
    log_in(&b, &base, "viewer", "s3cret-pass");
    assert_eq!(b.text(&b.find("#role")), "read");
    page("groups", "Content groups");
    b.wait_find("tr[data-group=edge]", wait);
    assert_eq!(count("#new-group"), 0, "{}", b.page_text());
    page("groups/edge", "Group edge");
    b.wait_find("#group-form", wait);
    assert_eq!(count("#save-group") + count("#delete-group"), 0);
    page("policies", "Policies");
    assert_eq!(count("#new-policy"), 0);
    page("jobs", "Jobs");
    assert_eq!(count("#new-job"), 0);
    page("jobs/new", "New job");
    assert_eq!(count("#job-form") + count("#start-job"), 0);
    page("fleet", "Fleet");
    b.wait_find("tr[data-agent=edge-1]", wait);
    assert_eq!(count("[data-revoke]"), 0, "no Revoke for read");
    // The server refuses what the page does not offer.
    assert_eq!(b.eval(post_group, json!(["viewer"])), json!(403));
    log_out(&b);

    // operate (positive control): the same pages offer the actions, and they work.
    log_in(&b, &base, "deployer", "s3cret-pass");
    assert_eq!(b.text(&b.find("#role")), "operate");
    page("groups", "Content groups");
    assert_eq!(count("#new-group"), 1);
    page("groups/edge", "Group edge");
    b.wait_find("#save-group", wait);
    assert_eq!(count("#delete-group"), 1);
    page("policies", "Policies");
    assert_eq!(count("#new-policy"), 1);
    page("jobs", "Jobs");
    assert_eq!(count("#new-job"), 1);
    page("jobs/new", "New job");
    assert_eq!(count("#start-job"), 1);
    assert_eq!(b.eval(post_group, json!(["deployer"])), json!(201));
    let (_, groups) = m.api("GET", "/api/v1/groups", None);
    let names: Vec<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, ["edge", "from-deployer"], "{groups}");
    page("fleet", "Fleet");
    b.wait_find("tr[data-agent=edge-1]", wait);
    assert_eq!(count("[data-revoke]"), 0, "no Revoke for operate");
    log_out(&b);

    // admin: the fleet offers Revoke, and it revokes (the confirmation answered yes).
    log_in(&b, &base, "ops", "s3cret-pass");
    page("fleet", "Fleet");
    b.wait_find("[data-revoke=edge-1]", wait);
    // Clicked from the page itself: the fleet view redraws on live events, and a button
    // found by one WebDriver call can be gone (stale) by the next.
    b.eval(
        "window.confirm = () => true; document.querySelector('[data-revoke=edge-1]').click(); return true",
        json!([]),
    );
    b.wait_until(
        "edge-1 gone from the fleet",
        "return document.querySelector('tr[data-agent=edge-1]') === null && !!document.querySelector('.page-head h1')",
        wait,
    );
    assert_eq!(m.api("GET", "/api/v1/agents/edge-1", None).0, 404);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
