//! Enrolment tokens against real `baton serve` and `baton agent` processes (issue 13,
//! item 5): a token expires, can be revoked, may be bound to one agent id and is
//! one-time; an agent reads it from `--token-file` or `BATON_TOKEN`. Each refusal reaches
//! the refused agent's log with its cause, and each test has its valid counterpart
//! enrol in the same test.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use baton_test_support::manager::BOUND;
use baton_test_support::{AgentProc, Manager, wait_for};
use serde_json::Value;

/// Runs `baton enroll ARGS… --json` against `m`; its JSON answer.
fn enroll(m: &Manager, args: &[&str]) -> Value {
    let data_dir = m.data_dir();
    let data = data_dir.to_str().unwrap();
    let mut all = vec!["enroll", "--json", "--data-dir", data];
    all.extend_from_slice(args);
    let out = baton(&all, BOUND);
    assert!(
        out.success,
        "baton {all:?} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    serde_json::from_str(out.stdout.trim()).expect("JSON from baton enroll --json")
}

/// A token from `baton enroll --token ARGS…`: (the token, its public id).
fn new_token(m: &Manager, args: &[&str]) -> (String, String) {
    let mut all = vec!["--token"];
    all.extend_from_slice(args);
    let answer = enroll(m, &all);
    (
        answer["token"].as_str().expect("token").to_string(),
        answer["id"].as_str().expect("token id").to_string(),
    )
}

/// The state `baton enroll --list` shows for token `id`.
fn listed_state(m: &Manager, id: &str) -> String {
    let list = enroll(m, &["--list"]);
    let token = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("token {id} is not listed: {list}"));
    assert!(
        token.get("token").is_none(),
        "the list never shows a token: {token}"
    );
    token["state"].as_str().unwrap().to_string()
}

/// Writes `token` to an owner-only file under `root`; its path.
fn token_file(root: &Path, name: &str, token: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(format!("{name}.token"));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_string()
}

/// Starts agent `name` with its token in a file (`--token-file`).
fn agent_with_token(m: &Manager, root: &Path, name: &str, token: &str) -> AgentProc {
    let file = token_file(root, name, token);
    let addr = m.agent_addr().to_string();
    AgentProc::spawn_custom(m, root, name, &addr, false, &["--token-file", &file])
}

/// Waits until the agent's log says the manager refused it and names `cause`; the line.
fn wait_refused(agent: &AgentProc, cause: &str) -> String {
    wait_for(
        &format!("{} to log its refusal ({cause})", agent.name),
        BOUND,
        || agent.log(),
        || {
            agent
                .log()
                .lines()
                .find(|l| l.contains("the manager refused this agent") && l.contains(cause))
                .map(str::to_string)
        },
    )
}

/// Whether the manager lists `id` as enrolled.
fn enrolled(m: &Manager, id: &str) -> bool {
    m.api("GET", &format!("/api/v1/agents/{id}"), None).0 == 200
}

#[test]
fn an_expired_enrolment_token_is_refused() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let (short, short_id) = new_token(&m, &["--expires", "1s"]);
    let (valid, valid_id) = new_token(&m, &[]);
    // The default lifetime is 24 h.
    let answer = enroll(&m, &["--list"]);
    let expiry = |id: &str| {
        let t = answer
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()
            .clone();
        t["expires_at"].as_u64().unwrap() - t["created_at"].as_u64().unwrap()
    };
    assert_eq!((expiry(&short_id), expiry(&valid_id)), (1, 24 * 3600));
    // Lifetimes are 1 s to 30 days.
    for bad in [0, 30 * 86_400 + 1] {
        let (status, body) = m.api(
            "POST",
            "/api/v1/enrolment-tokens",
            Some(serde_json::json!({ "expires_in_secs": bad })),
        );
        assert_eq!(
            (status, &body["field"]),
            (400, &serde_json::json!("expires_in_secs"))
        );
    }

    // The short one expires within its second (plus the clock's rounding).
    wait_for(
        "the 1 s token to be listed as expired",
        Duration::from_secs(3),
        || listed_state(&m, &short_id),
        || (listed_state(&m, &short_id) == "expired").then_some(()),
    );
    let late = agent_with_token(&m, root.path(), "late", &short);
    let line = wait_refused(&late, "expired at");
    assert!(line.contains("\"late\""), "{line}");
    assert!(
        m.log().contains("expired at"),
        "the manager logs the refusal"
    );

    // Positive control: a token within its lifetime enrols its agent.
    let _on_time = agent_with_token(&m, root.path(), "on-time", &valid);
    m.wait_connected(&["on-time"]);
    assert!(!enrolled(&m, "late"));
    assert_eq!(listed_state(&m, &valid_id), "used");
    assert_eq!(listed_state(&m, &short_id), "expired");
}

#[test]
fn a_revoked_enrolment_token_is_refused() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let (revoked, revoked_id) = new_token(&m, &[]);
    let (kept, _) = new_token(&m, &[]);
    assert_eq!(listed_state(&m, &revoked_id), "unused");
    let answer = enroll(&m, &["--revoke", &revoked_id]);
    assert_eq!(answer["revoked"], true);
    assert_eq!(listed_state(&m, &revoked_id), "revoked");
    // Revoking it again is an error that names the id.
    let data_dir = m.data_dir();
    let data = data_dir.to_str().unwrap();
    let again = baton(
        &["enroll", "--revoke", &revoked_id, "--data-dir", data],
        BOUND,
    );
    assert!(
        !again.success && again.stderr.contains(&revoked_id),
        "{}",
        again.stderr
    );

    let refused = agent_with_token(&m, root.path(), "edge-r", &revoked);
    wait_refused(&refused, "revoked enrolment token");
    // Positive control: the token that was not revoked enrols its agent.
    let _kept = agent_with_token(&m, root.path(), "edge-k", &kept);
    m.wait_connected(&["edge-k"]);
    assert!(!enrolled(&m, "edge-r"));
}

#[test]
fn a_token_bound_to_another_id_is_refused() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let (bound, id) = new_token(&m, &["--id", "edge-b"]);
    let list = enroll(&m, &["--list"]);
    assert_eq!(list[0]["bound_id"], "edge-b", "{list}");

    let other = agent_with_token(&m, root.path(), "edge-x", &bound);
    let line = wait_refused(&other, "bound to agent \"edge-b\"");
    assert!(line.contains("\"edge-x\""), "{line}");
    // The refusal did not use the token up: the id it is bound to enrols with it.
    let _right = agent_with_token(&m, root.path(), "edge-b", &bound);
    m.wait_connected(&["edge-b"]);
    assert!(!enrolled(&m, "edge-x"));
    assert_eq!(listed_state(&m, &id), "used");
}

#[test]
fn an_agent_enrolled_with_a_label_bound_token_must_report_the_labels() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let (for_core, _) = new_token(&m, &["--label", "role=edge"]);
    let (for_edge, id) = new_token(&m, &["--label", "role=edge", "--label", "tier=1"]);
    let list = enroll(&m, &["--list"]);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap();
    assert_eq!(
        listed["labels"],
        serde_json::json!({"role": "edge", "tier": "1"})
    );

    // The token enrols it, but a session whose report lacks the labels is refused.
    let file = token_file(root.path(), "core-1", &for_core);
    let addr = m.agent_addr().to_string();
    let core = AgentProc::spawn_custom(
        &m,
        root.path(),
        "core-1",
        &addr,
        false,
        &["--token-file", &file, "--label", "role=core"],
    );
    let line = wait_refused(&core, "role=edge");
    assert!(line.contains("\"core-1\""), "{line}");
    // Positive control: an agent that reports the token's labels (and more) connects.
    let file = token_file(root.path(), "edge-1", &for_edge);
    let _edge = AgentProc::spawn_custom(
        &m,
        root.path(),
        "edge-1",
        &addr,
        false,
        &[
            "--token-file",
            &file,
            "--label",
            "tier=1",
            "--label",
            "role=edge",
            "--label",
            "x=y",
        ],
    );
    m.wait_connected(&["edge-1"]);
    assert!(!m.connected().contains(&"core-1".to_string()));
}

#[test]
fn a_token_file_or_the_environment_enrols_once_without_the_token_in_the_command_line() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let (from_file, _) = new_token(&m, &[]);
    let (from_env, _) = new_token(&m, &[]);
    let by_file = agent_with_token(&m, root.path(), "by-file", &from_file);
    let addr = m.agent_addr().to_string();
    let by_env = AgentProc::spawn_with_env(
        &m,
        root.path(),
        "by-env",
        &addr,
        false,
        &[],
        &[("BATON_TOKEN", &from_env)],
    );
    m.wait_connected(&["by-env", "by-file"]);
    // `ps` shows neither token.
    for (agent, token) in [(&by_file, &from_file), (&by_env, &from_env)] {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid())).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(token.as_str()), "{cmdline}");
    }

    // One-time: another agent with a used token is refused, naming who used it.
    let twice = agent_with_token(&m, root.path(), "twice", &from_file);
    wait_refused(&twice, "agent \"by-file\" already used");
    assert!(!enrolled(&m, "twice"));
}
