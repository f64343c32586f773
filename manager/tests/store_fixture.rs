//! A database written by an earlier build (schema version 2, `fixtures/schema-v2.db`, see
//! `fixtures/README.md`) opens with this build's store: it migrates to the current schema
//! and keeps its agents, jobs, groups, policies, administrators, API tokens and enrolment
//! tokens.

use baton_manager::http::web::users;
use baton_manager::roles::Role;
use baton_manager::store::{JobState, PartState, SCHEMA_VERSION, SqliteStore, Store};

/// The API token `ci` that `make-schema-v2.sh` printed.
const CI_TOKEN: &str = "bt_3370cddd4e14c2ddb3739d3e49d8c6563670efda98c97294";

/// A copy of the fixture in a temporary directory (opening it migrates it), and the store.
fn open_fixture() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-v2.db");
    std::fs::copy(&fixture, &path).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    (dir, store)
}

#[test]
fn a_schema_2_database_migrates_and_keeps_everything() {
    let (_dir, mut store) = open_fixture();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);

    let agents = store.agents().unwrap();
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["fx-a1", "fx-a2"]);
    for a in &agents {
        assert_eq!(a.site.as_deref(), Some("lab"), "{}", a.id);
        assert_eq!(a.segment.as_deref(), Some("seg-x"), "{}", a.id);
        // Migration 5: not placed yet (their next report places them).
        assert_eq!(
            (a.placed_segment.as_deref(), a.election_score),
            (None, None)
        );
        let labels = &a.report.as_ref().unwrap()["labels"];
        assert_eq!(
            labels,
            &serde_json::json!([{ "key": "role", "value": "fixture" }])
        );
    }

    let jobs = store.jobs().unwrap();
    assert_eq!(jobs.len(), 1);
    let job = store.job(1).unwrap().unwrap();
    assert_eq!(job.state, JobState::Finished);
    assert_eq!((job.confirmed, job.failed), (Some(2), Some(0)));
    assert!(job.finished_at.is_some());
    let content = store.content(&job.root).unwrap().unwrap();
    assert_eq!(
        (content.name.as_str(), content.length),
        ("content.bin", 300_000)
    );
    let participants = store.participants(1).unwrap();
    assert_eq!(participants.len(), 2);
    assert!(participants.iter().all(|p| p.state == PartState::Confirmed));
    let mut confirmed: Vec<String> = store
        .confirmations(1)
        .unwrap()
        .into_iter()
        .map(|c| c.agent)
        .collect();
    confirmed.sort();
    assert_eq!(confirmed, ["fx-a1", "fx-a2"]);
    assert!(store.unfinished_jobs().unwrap().is_empty());

    let group = store.group("fixture").unwrap().unwrap();
    assert!(group.agents.is_empty());
    assert_eq!(
        group.selector,
        [("role".to_string(), "fixture".to_string())].into()
    );
    let policy = store.policy("slow").unwrap().unwrap();
    assert_eq!(policy.policy["agent_rate_cap_bps"], 2_097_152);
    assert_eq!(policy.policy["max_peers_per_source"], 4);

    assert_eq!(store.admins().unwrap(), ["ops"]);
    let hash = store.admin_hash("ops").unwrap().unwrap();
    assert!(users::password_matches("fixture-password-1", &hash));
    assert!(!users::password_matches("fixture-password-2", &hash));
    // Migration 8: made before roles existed, they keep every right they had.
    assert_eq!(
        users::api_token(&store, CI_TOKEN).unwrap(),
        Some(("ci".to_string(), Role::Admin))
    );
    assert_eq!(store.admin_role("ops").unwrap(), Some(Role::Admin));

    // Migration 6: the unused enrolment token, which never expired, expires a day after it
    // was made, and can be listed and revoked.
    let tokens = store.tokens(0).unwrap();
    assert_eq!(tokens.len(), 1);
    let token = &tokens[0];
    assert_eq!(token.expires_at, token.created_at + 86_400);
    assert_eq!((token.state, token.bound_id.as_deref()), ("unused", None));
    assert_eq!(store.tokens(token.expires_at).unwrap()[0].state, "expired");
    assert!(store.revoke_token(&token.id, token.created_at + 1).unwrap());
    assert_eq!(store.tokens(0).unwrap()[0].state, "revoked");

    // The tables of the new migration work on the migrated file.
    let totals = store.totals().unwrap();
    assert_eq!(totals.jobs_by_state, [("finished".to_string(), 1)]);
    assert!(totals.bytes_from_manager + totals.bytes_from_relays >= 600_000);
    let session = baton_manager::store::SessionRecord {
        id_hash: [1; 32],
        admin: "ops".into(),
        csrf: "c".into(),
        created_at: 1,
        last_used: 1,
    };
    assert!(store.create_session(&session, &hash).unwrap());
    assert_eq!(store.session(&[1; 32]).unwrap(), Some(session));
    // The audit log (a later migration) starts empty and records.
    assert!(store.audit(None, 10).unwrap().is_empty());
    let entry = baton_manager::store::AuditEntry {
        id: 0,
        at: 5,
        via: "cli".into(),
        who: "root".into(),
        address: "local".into(),
        action: "admin.add".into(),
        target: "ops".into(),
        result: "ok".into(),
        status: None,
        error: None,
    };
    let id = store.add_audit(&entry, 10).unwrap();
    assert_eq!(
        store.audit(None, 10).unwrap(),
        [baton_manager::store::AuditEntry { id, ..entry }]
    );
}
