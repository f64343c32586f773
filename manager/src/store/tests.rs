//! Tests of the stores through the [`Store`] trait: migrations, each table's
//! operations, transactions that happen whole or not at all.
//!
//! Most tests are written once, over a function that opens the store under test
//! (again, on the same database: reopening is part of some tests), and
//! [`on_every_backend!`] runs each on [`SqliteStore`] (a file in a temporary
//! directory) and on [`PostgresStore`] (a database of its own on the test server,
//! [`super::test_database`]). The tests of SQLite's file handling and of old
//! SQLite files stay SQLite's own; PostgreSQL's own follow at the end.

use rusqlite::Connection;

use super::schema::MIGRATIONS;
use super::*;
use crate::roles::Role;
use baton_manager_core::engine::{FailCause, ParticipantState, Persist};
use baton_protocol::types::{AgentId, LinkInfo};

use super::test_database::TestDatabase;

/// Opens the store under test, on the same database each time.
type Open<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// Runs each named test (a `fn(Open)`) on SQLite and on PostgreSQL, as
/// `on_sqlite::NAME` and `on_postgres::NAME`.
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            use super::*;
            $(
                #[test]
                fn $test() {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("baton.db");
                    super::$test(&|| Box::new(SqliteStore::open(&path).unwrap()) as Box<dyn Store>);
                }
            )*
        }
        mod on_postgres {
            use super::*;
            $(
                #[test]
                fn $test() {
                    let Some(db) = TestDatabase::create(stringify!($test)) else {
                        return;
                    };
                    super::$test(&|| Box::new(db.open()) as Box<dyn Store>);
                }
            )*
        }
    };
}

on_every_backend!(
    a_fresh_database_migrates_and_reopening_keeps_data,
    enrolment_is_idempotent_and_conflicts_are_refused,
    tokens_are_one_time_and_atomic,
    tokens_expire_are_revoked_and_bound_to_their_id,
    reports_update_main_columns,
    a_batch_of_reports_is_recorded_and_an_unknown_agent_fails_alone,
    content_versions_by_name,
    engine_records_apply_in_one_transaction,
    a_failing_batch_changes_nothing,
    jobs_list_states_and_unfinished,
    segment_reports_replace_the_view_and_record_leader_changes,
    groups_and_policies_are_named_and_unique,
    jobs_keep_group_policy_warnings_and_transfers,
    meta_round_trips,
    administrators_and_api_tokens,
    sessions_are_touched_and_expire,
    a_new_password_ends_the_administrators_sessions,
    sessions_survive_reopening,
    totals_count_jobs_and_bytes_by_source,
    audit_entries_are_listed_newest_first_and_paged,
    the_audit_log_keeps_only_the_newest_entries_and_cuts_long_texts,
    the_trust_chain_only_grows_and_keeps_the_newest,
    certificate_serials_only_grow_also_across_a_reopen,
    a_revoked_agent_leaves_the_views_its_entry_lives_until_its_certificates_expire,
    install_states_and_running_versions_are_kept_and_read_back,
    a_rollout_state_is_kept_and_an_abort_cancels_the_job,
);

fn a_rollout_state_is_kept_and_an_abort_cancels_the_job(open: Open<'_>) {
    use baton_manager_core::engine::RolloutState;
    let mut s = open();
    s.put_content(&content(1, "fw", 1)).unwrap();
    let job = s.create_job(&[1; 32], &TargetSpec::All, 1).unwrap();
    assert_eq!(s.job(job).unwrap().unwrap().rollout, None);
    s.apply(
        &[Persist::JobStarted {
            job,
            epoch: 1,
            order: vec![id("a1"), id("a2")],
        }],
        2,
    )
    .unwrap();
    let mut state = RolloutState::new(vec![1, 2]);
    state.paused = Some("wave 1: 2 participants failed (more than 1)".into());
    state.soak_until = Some(1_900_000_000);
    s.apply(
        &[Persist::Rollout {
            job,
            state: state.clone(),
        }],
        3,
    )
    .unwrap();
    drop(s);
    // Read back after reopening, as a restarted manager does.
    let s2 = open();
    let kept = s2.job(job).unwrap().unwrap();
    assert_eq!(kept.state, JobState::Running);
    let back: RolloutState = serde_json::from_value(kept.rollout.clone().unwrap()).unwrap();
    assert_eq!(back, state);
    assert_eq!(
        s2.unfinished_jobs()
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect::<Vec<_>>(),
        vec![job]
    );
    drop(s2);
    // An abort cancels the job, and the end that follows keeps it cancelled.
    let mut s3 = open();
    state.aborted = Some("aborted by an administrator".into());
    s3.apply(
        &[
            Persist::Rollout { job, state },
            Persist::JobFinished {
                job,
                confirmed: 1,
                failed: 0,
            },
        ],
        9,
    )
    .unwrap();
    let ended = s3.job(job).unwrap().unwrap();
    assert_eq!(ended.state, JobState::Cancelled);
    assert_eq!(ended.finished_at, Some(9));
    assert_eq!(
        ended.rollout.unwrap()["aborted"],
        "aborted by an administrator"
    );
}

fn id(s: &str) -> AgentId {
    AgentId::try_from(s).unwrap()
}

fn report(agent: &str) -> Report {
    Report {
        id: id(agent),
        listen: Some(baton_protocol::PeerAddr::V4([127, 0, 0, 1], 7701)),
        site: "fra-2".try_into().unwrap(),
        segment: "fra-2/rack-4".try_into().unwrap(),
        performance: 100,
        free_storage: 1 << 30,
        can_serve: true,
        max_chunk: 32768,
        max_sources: 4,
        max_peers: 8,
        link: LinkInfo {
            up_bps: 1_000_000,
            down_bps: u64::MAX,
            loss_ppm: 0,
            uptime_s: 5,
        },
        delays: heapless::Vec::new(),
        labels: heapless::Vec::new(),
        holdings: heapless::Vec::new(),
    }
}

/// A content record of 100 000 bytes in 32 KiB chunks (its file is not read).
pub(super) fn content(root: u8, name: &str, version: u64) -> ContentRecord {
    ContentRecord {
        root: [root; 32],
        name: name.into(),
        version,
        length: 100_000,
        chunk_size: 32768,
        path: "/tmp/x".into(),
        manifest: vec![1, 2, 3],
        created_at: 10,
    }
}

fn a_fresh_database_migrates_and_reopening_keeps_data(open: Open<'_>) {
    {
        let mut s = open();
        assert_eq!(s.epoch().unwrap(), 0);
        assert_eq!(s.next_epoch().unwrap(), 1);
        s.enrol("edge-1", &PublicKey([1; 32]), 5).unwrap();
    }
    let mut s = open();
    assert_eq!(s.epoch().unwrap(), 1);
    assert_eq!(s.next_epoch().unwrap(), 2);
    assert_eq!(s.agent("edge-1").unwrap().unwrap().key, PublicKey([1; 32]));
}

#[test]
fn fresh_file_migrates_and_reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    {
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.epoch().unwrap(), 0);
        assert_eq!(s.next_epoch().unwrap(), 1);
        s.enrol("edge-1", &PublicKey([1; 32]), 5).unwrap();
    }
    let mut s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.epoch().unwrap(), 1);
    assert_eq!(s.next_epoch().unwrap(), 2);
    assert_eq!(s.agent("edge-1").unwrap().unwrap().key, PublicKey([1; 32]));
    // WAL is a property of the file: another connection sees it.
    let mode: String = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn the_database_and_its_companions_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    let wal = dir.path().join("baton.db-wal");
    let shm = dir.path().join("baton.db-shm");
    {
        let mut s = SqliteStore::open(&path).unwrap();
        s.enrol("edge-1", &PublicKey([1; 32]), 5).unwrap();
        // While open (WAL mode), SQLite keeps both companions beside the file.
        for p in [&path, &wal, &shm] {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
    }
    // A database an older build left readable by others (or a copy) is tightened on open.
    let copy = dir.path().join("copy.db");
    std::fs::copy(&path, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = SqliteStore::open(&copy).unwrap();
    assert_eq!(mode(&copy), 0o600);
    assert!(s.agent("edge-1").unwrap().is_some());
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    match SqliteStore::open(&path) {
        Err(StoreError::NewerSchema { found, known }) => {
            assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
}

fn enrolment_is_idempotent_and_conflicts_are_refused(open: Open<'_>) {
    let mut s = open();
    assert_eq!(s.enrol("a", &PublicKey([1; 32]), 1).unwrap(), Enrolled::New);
    assert_eq!(
        s.enrol("a", &PublicKey([1; 32]), 2).unwrap(),
        Enrolled::Unchanged
    );
    assert!(matches!(
        s.enrol("a", &PublicKey([2; 32]), 3),
        Err(StoreError::KeyConflict(_))
    ));
    let a = s.agent("a").unwrap().unwrap();
    assert_eq!((a.key, a.enrolled_at), (PublicKey([1; 32]), 1));
    assert!(s.agent("b").unwrap().is_none());
}

fn tokens_are_one_time_and_atomic(open: Open<'_>) {
    let mut s = open();
    let hash = [7; 32];
    let day = NewToken {
        expires_at: 1 + DEFAULT_TOKEN_LIFETIME,
        ..NewToken::default()
    };
    s.add_token(&hash, &day, 1).unwrap();
    assert!(matches!(
        s.enrol_with_token(&[8; 32], "x", &PublicKey([1; 32]), 2),
        Err(StoreError::BadToken)
    ));
    // A conflicting enrolment does not use the token up.
    s.enrol("taken", &PublicKey([9; 32]), 1).unwrap();
    assert!(matches!(
        s.enrol_with_token(&hash, "taken", &PublicKey([1; 32]), 2),
        Err(StoreError::KeyConflict(_))
    ));
    assert_eq!(
        s.enrol_with_token(&hash, "x", &PublicKey([1; 32]), 3)
            .unwrap(),
        Enrolled::New
    );
    assert!(matches!(
        s.enrol_with_token(&hash, "y", &PublicKey([2; 32]), 4),
        Err(StoreError::TokenUsed(by)) if by == "x"
    ));
    assert!(s.agent("y").unwrap().is_none());
}

fn tokens_expire_are_revoked_and_bound_to_their_id(open: Open<'_>) {
    let mut s = open();
    let key = PublicKey([1; 32]);
    let short = NewToken {
        expires_at: 110,
        ..NewToken::default()
    };
    s.add_token(&[1; 32], &short, 100).unwrap();
    // Valid until its expiry, refused from then on (naming when it expired).
    assert!(matches!(
        s.enrol_with_token(&[1; 32], "late", &key, 110),
        Err(StoreError::TokenExpired(110))
    ));
    assert_eq!(
        s.enrol_with_token(&[1; 32], "early", &key, 109).unwrap(),
        Enrolled::New
    );

    let bound = NewToken {
        expires_at: 1000,
        bound_id: Some("edge-7".into()),
        labels: [("role".to_string(), "edge".to_string())].into(),
    };
    s.add_token(&[2; 32], &bound, 100).unwrap();
    assert!(matches!(
        s.enrol_with_token(&[2; 32], "edge-8", &key, 101),
        Err(StoreError::TokenBoundElsewhere(b)) if b == "edge-7"
    ));
    assert!(s.agent("edge-8").unwrap().is_none());
    assert!(s.bound_labels().unwrap().is_empty());
    s.enrol_with_token(&[2; 32], "edge-7", &PublicKey([2; 32]), 102)
        .unwrap();
    // The agent it enrolled is bound to the token's labels.
    assert_eq!(
        s.bound_labels().unwrap(),
        [(
            "edge-7".to_string(),
            [("role".to_string(), "edge".to_string())].into()
        )]
    );

    s.add_token(&[3; 32], &bound, 100).unwrap();
    let revoked_id = token_id(&[3; 32]);
    assert!(!s.revoke_token("not-an-id", 103).unwrap());
    assert!(s.revoke_token(&revoked_id.to_uppercase(), 103).unwrap());
    // Revoking twice, or revoking a used token, changes nothing.
    assert!(!s.revoke_token(&revoked_id, 104).unwrap());
    assert!(!s.revoke_token(&token_id(&[2; 32]), 104).unwrap());
    assert!(matches!(
        s.enrol_with_token(&[3; 32], "edge-7", &key, 105),
        Err(StoreError::TokenRevoked)
    ));

    s.add_token(&[4; 32], &short, 105).unwrap();
    // Newest first; each with its state at the time of listing.
    let listed = s.tokens(106).unwrap();
    let states: Vec<(&str, &str)> = listed.iter().map(|t| (t.id.as_str(), t.state)).collect();
    let id = |h: u8| token_id(&[h; 32]);
    assert_eq!(
        states,
        [
            (id(4).as_str(), "unused"),
            (id(1).as_str(), "used"),
            (id(2).as_str(), "used"),
            (id(3).as_str(), "revoked"),
        ]
    );
    assert_eq!(listed[1].used_by.as_deref(), Some("early"));
    assert_eq!(listed[2].bound_id.as_deref(), Some("edge-7"));
    assert_eq!(listed[2].labels["role"], "edge");
    assert!(listed[0].labels.is_empty());
    assert_eq!(listed[3].revoked_at, Some(103));
    assert_eq!(s.tokens(110).unwrap()[0].state, "expired");
    assert_eq!(id(4).len(), 12);
}

fn reports_update_main_columns(open: Open<'_>) {
    let mut s = open();
    assert!(matches!(
        s.record_report(&report("a"), 1),
        Err(StoreError::NotFound(_))
    ));
    s.enrol("a", &PublicKey([1; 32]), 1).unwrap();
    s.record_report(&report("a"), 9).unwrap();
    let a = s.agent("a").unwrap().unwrap();
    assert_eq!(a.last_seen, Some(9));
    assert_eq!(a.site.as_deref(), Some("fra-2"));
    assert_eq!(a.listen.as_deref(), Some("127.0.0.1:7701"));
    assert_eq!(a.up_bps, Some(1_000_000));
    assert_eq!(a.down_bps, Some(i64::MAX as u64));
    let back: Report = serde_json::from_value(a.report.unwrap()).unwrap();
    assert_eq!(back, report("a"));
    s.mark_seen("a", 12).unwrap();
    assert_eq!(s.agents().unwrap()[0].last_seen, Some(12));
}

fn a_batch_of_reports_is_recorded_and_an_unknown_agent_fails_alone(open: Open<'_>) {
    let mut s = open();
    s.enrol("a", &PublicKey([1; 32]), 1).unwrap();
    s.enrol("b", &PublicKey([2; 32]), 1).unwrap();
    s.enrol("c", &PublicKey([3; 32]), 1).unwrap();
    let refused = s
        .record_reports(&[report("a"), report("ghost"), report("b")], &[id("c")], 20)
        .unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(matches!(&refused[0], StoreError::NotFound(what) if what.contains("ghost")));
    for agent in ["a", "b"] {
        let a = s.agent(agent).unwrap().unwrap();
        assert_eq!(a.last_seen, Some(20));
        let back: Report = serde_json::from_value(a.report.unwrap()).unwrap();
        assert_eq!(back, report(agent));
    }
    let c = s.agent("c").unwrap().unwrap();
    assert_eq!(c.last_seen, Some(20));
    assert!(c.report.is_none());
}

fn content_versions_by_name(open: Open<'_>) {
    let mut s = open();
    assert_eq!(s.latest_version("fw").unwrap(), None);
    s.put_content(&content(1, "fw", 1)).unwrap();
    s.put_content(&content(2, "fw", 2)).unwrap();
    s.put_content(&content(3, "other", 7)).unwrap();
    assert_eq!(s.latest_version("fw").unwrap(), Some(2));
    let c = s.content(&[2; 32]).unwrap().unwrap();
    assert_eq!(c, content(2, "fw", 2));
    assert_eq!(c.chunks(), 4);
    // Re-publishing the same root replaces its record.
    s.put_content(&content(2, "fw", 5)).unwrap();
    assert_eq!(s.latest_version("fw").unwrap(), Some(5));
    assert!(s.content(&[4; 32]).unwrap().is_none());
}

fn engine_records_apply_in_one_transaction(open: Open<'_>) {
    let mut s = open();
    s.put_content(&content(1, "fw", 1)).unwrap();
    let job = s
        .create_job(
            &[1; 32],
            &TargetSpec::Agents(vec!["a".into(), "b".into()]),
            1,
        )
        .unwrap();
    assert_eq!(s.job(job).unwrap().unwrap().state, JobState::Pending);
    s.apply(
        &[
            Persist::JobStarted {
                job,
                epoch: 3,
                order: vec![id("b"), id("a")],
            },
            Persist::Participant {
                job,
                agent: id("b"),
                state: ParticipantState::Fetching { verified: 0 },
                source_note: Some("manager".into()),
            },
            Persist::Progress {
                job,
                updates: vec![(id("b"), 2), (id("a"), 1)],
            },
            Persist::SourceBytes {
                job,
                agent: id("b"),
                from: None,
                bytes: 1000,
            },
            Persist::SourceBytes {
                job,
                agent: id("b"),
                from: None,
                bytes: 500,
            },
            Persist::SourceBytes {
                job,
                agent: id("a"),
                from: Some(id("b")),
                bytes: 700,
            },
            Persist::MeasuredUpload {
                job,
                rates: vec![(id("b"), 250_000)],
            },
            Persist::MeasuredUpload {
                job,
                rates: vec![(id("b"), 300_000)],
            },
        ],
        2,
    )
    .unwrap();
    let j = s.job(job).unwrap().unwrap();
    assert_eq!((j.state, j.epoch), (JobState::Running, Some(3)));
    let p = s.participants(job).unwrap();
    assert_eq!(p.len(), 2);
    // The last measurement stands; a participant never measured has none.
    assert_eq!(p[0].measured_up_bps, Some(300_000));
    assert_eq!(p[1].measured_up_bps, None);
    assert_eq!((p[0].agent.as_str(), p[0].position), ("b", Some(0)));
    assert_eq!((p[0].state, p[0].verified), (PartState::Fetching, 2));
    assert_eq!(p[0].source.as_deref(), Some("manager"));
    assert_eq!((p[1].state, p[1].verified), (PartState::Fetching, 1));
    let bytes = s.source_bytes(job).unwrap();
    assert_eq!(
        bytes,
        vec![
            SourceBytes {
                agent: "a".into(),
                from: Some("b".into()),
                bytes: 700
            },
            SourceBytes {
                agent: "b".into(),
                from: None,
                bytes: 1500
            },
        ]
    );
    s.apply(
        &[
            Persist::Participant {
                job,
                agent: id("b"),
                state: ParticipantState::Confirmed,
                source_note: None,
            },
            Persist::JobFinished {
                job,
                confirmed: 1,
                failed: 1,
            },
        ],
        4,
    )
    .unwrap();
    let p = s.participants(job).unwrap();
    assert_eq!((p[0].state, p[0].verified), (PartState::Confirmed, 4));
    assert_eq!(resume_state(&p[0]), ParticipantState::Confirmed);
    assert_eq!(
        resume_state(&p[1]),
        ParticipantState::Fetching { verified: 1 }
    );
    let cause = FailCause::Agent(baton_protocol::message::FailReason::StorageFull);
    s.apply(
        &[Persist::Participant {
            job,
            agent: id("a"),
            state: ParticipantState::Failed(cause),
            source_note: None,
        }],
        4,
    )
    .unwrap();
    let p = s.participants(job).unwrap();
    assert_eq!(p[1].state, PartState::Failed);
    assert!(p[1].reason.as_deref().unwrap().contains("StorageFull"));
    assert_eq!(resume_state(&p[1]), ParticipantState::Failed(cause));
    let c = s.confirmations(job).unwrap();
    assert_eq!(
        c,
        vec![Confirmation {
            agent: "b".into(),
            confirmed_at: 4
        }]
    );
    let j = s.job(job).unwrap().unwrap();
    assert_eq!(
        (j.state, j.finished_at, j.confirmed, j.failed),
        (JobState::Finished, Some(4), Some(1), Some(1))
    );
    assert!(s.unfinished_jobs().unwrap().is_empty());
}

fn a_failing_batch_changes_nothing(open: Open<'_>) {
    let mut s = open();
    s.put_content(&content(1, "fw", 1)).unwrap();
    let job = s.create_job(&[1; 32], &TargetSpec::All, 1).unwrap();
    let err = s.apply(
        &[
            Persist::Progress {
                job,
                updates: vec![(id("a"), 1)],
            },
            Persist::JobStarted {
                job: job + 100,
                epoch: 1,
                order: vec![],
            },
        ],
        2,
    );
    assert!(matches!(err, Err(StoreError::NotFound(_))));
    assert!(s.participants(job).unwrap().is_empty());
}

fn jobs_list_states_and_unfinished(open: Open<'_>) {
    let mut s = open();
    s.put_content(&content(1, "fw", 1)).unwrap();
    let a = s.create_job(&[1; 32], &TargetSpec::All, 1).unwrap();
    let b = s.create_job(&[1; 32], &TargetSpec::All, 2).unwrap();
    let c = s.create_job(&[1; 32], &TargetSpec::All, 3).unwrap();
    s.set_job_state(b, JobState::Cancelled, None, 5).unwrap();
    s.set_job_state(c, JobState::Refused, Some("no targets"), 5)
        .unwrap();
    let ids: Vec<u64> = s.jobs().unwrap().iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![c, b, a]);
    let open: Vec<u64> = s.unfinished_jobs().unwrap().iter().map(|j| j.id).collect();
    assert_eq!(open, vec![a]);
    let cj = s.job(c).unwrap().unwrap();
    assert_eq!(cj.error.as_deref(), Some("no targets"));
    assert_eq!(cj.finished_at, Some(5));
    assert_eq!(cj.targets, TargetSpec::All);
    // A job finishing after it was cancelled stays cancelled.
    s.apply(
        &[Persist::JobFinished {
            job: b,
            confirmed: 0,
            failed: 0,
        }],
        6,
    )
    .unwrap();
    assert_eq!(s.job(b).unwrap().unwrap().state, JobState::Cancelled);
    assert!(matches!(
        s.set_job_state(99, JobState::Running, None, 1),
        Err(StoreError::NotFound(_))
    ));
}

fn member(id: &str, known: bool) -> MemberRecord {
    MemberRecord {
        id: id.into(),
        score: 7,
        listen: Some("10.0.0.2:7701".into()),
        performance: 100,
        free_storage: 1 << 40,
        can_serve: true,
        link: LinkRecord {
            up_bps: 5_000_000,
            down_bps: 1000,
            loss_ppm: 3,
            uptime_s: 60,
        },
        delays: vec![
            DelayRecord {
                to: None,
                rtt_us: 1500,
            },
            DelayRecord {
                to: Some("b".into()),
                rtt_us: 200,
            },
        ],
        last_heard_ms: 40,
        known,
    }
}

fn segment_reports_replace_the_view_and_record_leader_changes(open: Open<'_>) {
    let mut s = open();
    let report = |leader: &str, term, at, members: Vec<MemberRecord>| SegmentRecord {
        name: "lan-1".into(),
        leader: leader.into(),
        term,
        reported_at_ms: at,
        members,
    };
    assert!(
        s.replace_segment(&report(
            "a",
            1,
            1000,
            vec![member("a", true), member("b", true)]
        ))
        .unwrap()
    );
    assert!(
        !s.replace_segment(&report(
            "a",
            2,
            2000,
            vec![member("a", true), member("z", false)]
        ))
        .unwrap()
    );
    let seg = s.segment("lan-1").unwrap().unwrap();
    assert_eq!(
        (seg.leader.as_str(), seg.term, seg.reported_at_ms),
        ("a", 2, 2000)
    );
    let ids: Vec<&str> = seg.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["a", "z"], "the old view is replaced");
    assert_eq!(seg.members[0], member("a", true));
    assert!(!seg.members[1].known);
    assert!(
        s.replace_segment(&report("b", 1, 3000, vec![member("b", true)]))
            .unwrap()
    );
    let history = s.leader_history("lan-1").unwrap();
    assert_eq!(
        history,
        vec![
            LeaderChange {
                leader: "a".into(),
                term: 1,
                since_ms: 1000
            },
            LeaderChange {
                leader: "b".into(),
                term: 1,
                since_ms: 3000
            },
        ]
    );
    assert_eq!(s.segments().unwrap().len(), 1);
    assert!(s.segment("other").unwrap().is_none());
}

fn groups_and_policies_are_named_and_unique(open: Open<'_>) {
    let mut s = open();
    let mut g = GroupRecord {
        name: "edge".into(),
        agents: vec!["a".into()],
        selector: [("role".to_string(), "edge".to_string())].into(),
    };
    s.add_group(&g, 1).unwrap();
    assert!(matches!(s.add_group(&g, 2), Err(StoreError::Duplicate(_))));
    g.agents.push("b".into());
    s.set_group(&g, 3).unwrap();
    assert_eq!(s.group("edge").unwrap().unwrap(), g);
    assert_eq!(s.groups().unwrap(), vec![g.clone()]);
    g.name = "none".into();
    assert!(matches!(s.set_group(&g, 3), Err(StoreError::NotFound(_))));
    s.remove_group("edge").unwrap();
    assert!(matches!(
        s.remove_group("edge"),
        Err(StoreError::NotFound(_))
    ));
    assert!(s.groups().unwrap().is_empty());

    let p = PolicyRecord {
        name: "slow".into(),
        policy: serde_json::json!({ "max_peers_per_source": 2 }),
    };
    s.add_policy(&p, 1).unwrap();
    assert!(matches!(s.add_policy(&p, 1), Err(StoreError::Duplicate(_))));
    let p2 = PolicyRecord {
        policy: serde_json::json!({ "max_peers_per_source": 3 }),
        ..p.clone()
    };
    s.set_policy(&p2, 2).unwrap();
    assert_eq!(s.policy("slow").unwrap().unwrap(), p2);
    assert_eq!(s.policies().unwrap().len(), 1);
    s.remove_policy("slow").unwrap();
    assert!(s.policy("slow").unwrap().is_none());
    assert!(matches!(
        s.remove_policy("slow"),
        Err(StoreError::NotFound(_))
    ));
}

fn jobs_keep_group_policy_warnings_and_transfers(open: Open<'_>) {
    let mut s = open();
    s.put_content(&content(1, "fw", 1)).unwrap();
    let origin = JobOrigin {
        group: Some("edge".into()),
        policy_name: Some("slow".into()),
        policy: Some(serde_json::json!({ "max_peers_per_source": 2 })),
    };
    let job = s
        .create_job_from(&[1; 32], &TargetSpec::Agents(vec!["a".into()]), &origin, 1)
        .unwrap();
    s.add_job_warning(job, "rule one cannot be met", 2).unwrap();
    s.add_job_warning(job, "rule two cannot be met", 3).unwrap();
    s.add_job_warning(job, "rule one cannot be met", 4).unwrap();
    assert!(matches!(
        s.add_job_warning(job + 1, "x", 4),
        Err(StoreError::NotFound(_))
    ));
    s.apply(
        &[Persist::SourceBytes {
            job,
            agent: id("a"),
            from: None,
            bytes: 100,
        }],
        5,
    )
    .unwrap();
    let j = s.job(job).unwrap().unwrap();
    assert_eq!(j.group.as_deref(), Some("edge"));
    assert_eq!(j.policy.as_deref(), Some("slow"));
    assert_eq!(j.policy_spec, origin.policy);
    assert_eq!(
        j.warnings,
        ["rule one cannot be met", "rule two cannot be met"]
    );
    assert_eq!(
        j.transfers,
        vec![Transfer {
            from: None,
            to: "a".into(),
            bytes: 100
        }]
    );
    let listed = &s.unfinished_jobs().unwrap()[0];
    assert_eq!(listed.warnings.len(), 2);
    assert_eq!(listed.policy_spec, origin.policy);
    // A job created without an origin has none.
    let plain = s.create_job(&[1; 32], &TargetSpec::All, 6).unwrap();
    let p = s.job(plain).unwrap().unwrap();
    assert_eq!((p.group, p.policy, p.policy_spec), (None, None, None));
}

#[test]
fn a_version_1_database_migrates_and_keeps_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO content (root, name, version, length, chunk_size, path, manifest,
                created_at) VALUES (?1, 'fw', 1, 10, 256, '/x', x'00', 1)",
            [&[1u8; 32][..]],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO jobs (root, state, created_at, targets)
             VALUES (?1, 'running', 1, '\"all\"')",
            [&[1u8; 32][..]],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    let jobs = s.unfinished_jobs().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].policy_spec, None);
    assert!(jobs[0].warnings.is_empty());
}

fn meta_round_trips(open: Open<'_>) {
    let mut s = open();
    assert_eq!(s.meta("k").unwrap(), None);
    s.set_meta("k", b"v1").unwrap();
    s.set_meta("k", b"v2").unwrap();
    assert_eq!(s.meta("k").unwrap().as_deref(), Some(&b"v2"[..]));
}

fn administrators_and_api_tokens(open: Open<'_>) {
    let mut s = open();
    assert_eq!(
        s.set_admin("ops", "$hash-1", None, 1).unwrap(),
        AdminSet::Added
    );
    assert_eq!(
        s.set_admin("ops", "$hash-2", None, 2).unwrap(),
        AdminSet::PasswordChanged
    );
    s.set_admin("dev", "$hash-3", None, 3).unwrap();
    assert_eq!(s.admin_hash("ops").unwrap().as_deref(), Some("$hash-2"));
    assert_eq!(s.admin_hash("nobody").unwrap(), None);
    assert_eq!(s.admins().unwrap(), ["dev", "ops"]);

    s.new_api_token("ci", &[1; 32], Role::Admin, 1).unwrap();
    assert_eq!(
        s.api_token(&[1; 32]).unwrap(),
        Some(("ci".to_string(), Role::Admin))
    );
    s.new_api_token("ci", &[2; 32], Role::Admin, 2).unwrap();
    assert_eq!(s.api_token(&[1; 32]).unwrap(), None, "replaced");
    assert_eq!(
        s.api_token(&[2; 32]).unwrap().map(|t| t.0).as_deref(),
        Some("ci")
    );
    assert!(s.revoke_api_token("ci").unwrap());
    assert!(!s.revoke_api_token("ci").unwrap());
    assert_eq!(s.api_token(&[2; 32]).unwrap(), None);
}

fn session(id: u8, admin: &str, last_used: u64) -> SessionRecord {
    SessionRecord {
        id_hash: [id; 32],
        admin: admin.into(),
        csrf: format!("csrf-{id}"),
        created_at: last_used,
        last_used,
    }
}

fn sessions_are_touched_and_expire(open: Open<'_>) {
    let mut s = open();
    s.set_admin("ops", "hash-1", None, 1).unwrap();
    s.set_admin("dev", "hash-2", None, 1).unwrap();
    assert!(s.create_session(&session(1, "ops", 100), "hash-1").unwrap());
    assert!(s.create_session(&session(2, "ops", 200), "hash-1").unwrap());
    assert!(s.create_session(&session(3, "dev", 300), "hash-2").unwrap());
    // Not for a password the administrator no longer has, nor for nobody.
    assert!(!s.create_session(&session(4, "ops", 300), "hash-0").unwrap());
    assert!(
        !s.create_session(&session(5, "nobody", 300), "hash-1")
            .unwrap()
    );
    assert_eq!(s.session(&[4; 32]).unwrap(), None);
    assert_eq!(s.session(&[1; 32]).unwrap(), Some(session(1, "ops", 100)));
    assert_eq!(s.session(&[9; 32]).unwrap(), None);
    assert!(s.touch_session(&[1; 32], 400).unwrap());
    assert!(!s.touch_session(&[9; 32], 400).unwrap());
    let touched = s.session(&[1; 32]).unwrap().unwrap();
    assert_eq!((touched.created_at, touched.last_used), (100, 400));
    // Idle at or before 200: session 2 ends.
    assert_eq!(s.expire_sessions(200, 10).unwrap(), 1);
    assert_eq!(s.session(&[2; 32]).unwrap(), None);
    // Keep the most recently used one only: session 3 (last used 300) ends.
    assert_eq!(s.expire_sessions(0, 1).unwrap(), 1);
    assert!(s.session(&[1; 32]).unwrap().is_some());
    assert!(s.session(&[3; 32]).unwrap().is_none());
    assert!(s.delete_session(&[1; 32]).unwrap());
    assert!(!s.delete_session(&[1; 32]).unwrap());
}

fn a_new_password_ends_the_administrators_sessions(open: Open<'_>) {
    let mut s = open();
    s.set_admin("ops", "hash-1", None, 1).unwrap();
    s.set_admin("dev", "hash-2", None, 1).unwrap();
    assert!(s.create_session(&session(1, "ops", 100), "hash-1").unwrap());
    assert!(s.create_session(&session(2, "dev", 100), "hash-2").unwrap());
    assert_eq!(
        s.set_admin("ops", "hash-3", None, 2).unwrap(),
        AdminSet::PasswordChanged
    );
    assert_eq!(s.session(&[1; 32]).unwrap(), None);
    assert!(s.session(&[2; 32]).unwrap().is_some(), "others keep theirs");
    // A clock that stepped back is taken as it is: the session can still go idle.
    assert!(s.touch_session(&[2; 32], 50).unwrap());
    assert_eq!(s.session(&[2; 32]).unwrap().unwrap().last_used, 50);
}

fn sessions_survive_reopening(open: Open<'_>) {
    let mut first = open();
    first.set_admin("ops", "hash-1", None, 1).unwrap();
    assert!(
        first
            .create_session(&session(1, "ops", 100), "hash-1")
            .unwrap()
    );
    drop(first);
    let s = open();
    assert_eq!(s.session(&[1; 32]).unwrap(), Some(session(1, "ops", 100)));
}

fn totals_count_jobs_and_bytes_by_source(open: Open<'_>) {
    let mut s = open();
    assert_eq!(s.totals().unwrap(), StoreTotals::default());
    s.put_content(&content(1, "fw", 1)).unwrap();
    let a = s.create_job(&[1; 32], &TargetSpec::All, 1).unwrap();
    let b = s.create_job(&[1; 32], &TargetSpec::All, 2).unwrap();
    s.create_job(&[1; 32], &TargetSpec::All, 3).unwrap();
    s.set_job_state(b, JobState::Cancelled, None, 4).unwrap();
    s.apply(
        &[
            Persist::SourceBytes {
                job: a,
                agent: id("a"),
                from: None,
                bytes: 1000,
            },
            Persist::SourceBytes {
                job: a,
                agent: id("b"),
                from: Some(id("a")),
                bytes: 600,
            },
            Persist::SourceBytes {
                job: b,
                agent: id("c"),
                from: Some(id("a")),
                bytes: 50,
            },
        ],
        5,
    )
    .unwrap();
    assert_eq!(
        s.totals().unwrap(),
        StoreTotals {
            jobs_by_state: vec![("cancelled".into(), 1), ("pending".into(), 2)],
            bytes_from_manager: 1000,
            bytes_from_relays: 650,
            installs_by_state: Vec::new(),
        }
    );
}

fn install_states_and_running_versions_are_kept_and_read_back(open: Open) {
    use baton_protocol::message::{InstallState, MAX_RUNNING};
    let mut s = open();
    s.put_content(&content(1, "app", 7)).unwrap();
    let job = s
        .create_job(
            &[1; 32],
            &TargetSpec::Agents(vec!["a".into(), "b".into(), "c".into()]),
            1,
        )
        .unwrap();
    let confirmed = |agent: &str| Persist::Participant {
        job,
        agent: id(agent),
        state: ParticipantState::Confirmed,
        source_note: None,
    };
    let install =
        |agent: &str, state: Option<InstallState>, code: Option<i32>, out: &str| Persist::Install {
            job,
            agent: id(agent),
            state,
            exit_code: code,
            output: out.into(),
        };
    s.apply(
        &[
            Persist::JobStarted {
                job,
                epoch: 1,
                order: vec![id("a"), id("b"), id("c")],
            },
            confirmed("a"),
            confirmed("b"),
            confirmed("c"),
            install("a", None, None, ""),
            install("b", Some(InstallState::Installing), None, ""),
            install("b", Some(InstallState::RolledBack), Some(0), "restored 6"),
            install("c", Some(InstallState::Running), None, ""),
            Persist::Running {
                agent: id("c"),
                versions: vec![("app".into(), 6), ("os".into(), 2)],
                whole: true,
            },
            Persist::Running {
                agent: id("c"),
                versions: vec![("app".into(), 7)],
                whole: false,
            },
        ],
        40,
    )
    .unwrap();
    let p = s.participants(job).unwrap();
    let of = |agent: &str| p.iter().find(|r| r.agent == agent).unwrap().clone();
    let a = of("a").install.unwrap();
    assert_eq!(
        (a.state, a.exit_code, a.output),
        (InstallPhase::Pending, None, None)
    );
    let b = of("b").install.unwrap();
    assert_eq!(b.state, InstallPhase::RolledBack);
    assert_eq!(b.exit_code, Some(0));
    assert_eq!(b.output.as_deref(), Some("restored 6"));
    assert_eq!(b.at, 40);
    // What a restart resumes: a waits for its report, b is final, c runs (not listed).
    assert_eq!(resume_install(&of("a")), Some(None));
    assert_eq!(
        resume_install(&of("b")),
        Some(Some(InstallState::RolledBack))
    );
    assert_eq!(resume_install(&of("c")), None);
    // The newest version per name stands.
    let running: Vec<(String, String, u64)> = s
        .running_versions(None)
        .unwrap()
        .into_iter()
        .map(|r| (r.agent, r.name, r.version))
        .collect();
    assert_eq!(
        running,
        vec![("c".into(), "app".into(), 7), ("c".into(), "os".into(), 2)]
    );
    assert!(s.running_versions(Some("a")).unwrap().is_empty());
    let totals = s.totals().unwrap();
    assert_eq!(
        totals.installs_by_state,
        vec![
            ("pending".into(), 1),
            ("rolled_back".into(), 1),
            ("running".into(), 1)
        ]
    );
    // A `Running` replaces the agent's whole set: names from earlier ones are gone, and
    // however many distinct names come over time, at most `MAX_RUNNING` rows stand.
    let rows = |s: &dyn Store| s.running_versions(Some("c")).unwrap().len();
    for round in 0..4u64 {
        let versions = (0..MAX_RUNNING as u64)
            .map(|i| (format!("n{round}-{i}"), i))
            .collect();
        s.apply(
            &[Persist::Running {
                agent: id("c"),
                versions,
                whole: true,
            }],
            41 + round,
        )
        .unwrap();
        assert_eq!(rows(&*s), MAX_RUNNING);
    }
    for i in 0..20u64 {
        s.apply(
            &[Persist::Running {
                agent: id("c"),
                versions: vec![(format!("single-{i}"), i)],
                whole: false,
            }],
            50 + i,
        )
        .unwrap();
    }
    let names: Vec<String> = s
        .running_versions(Some("c"))
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names.len(), MAX_RUNNING);
    assert!(names.contains(&"single-19".to_string()), "{names:?}");
    s.apply(
        &[Persist::Running {
            agent: id("c"),
            versions: vec![],
            whole: true,
        }],
        80,
    )
    .unwrap();
    assert_eq!(rows(&*s), 0, "an empty set clears the agent's rows");
}

#[test]
fn a_version_10_database_migrates_to_install_states_and_keeps_its_participants() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    {
        let conn = Connection::open(&path).unwrap();
        for m in &MIGRATIONS[..10] {
            conn.execute_batch(m).unwrap();
        }
        conn.pragma_update(None, "user_version", 10).unwrap();
        conn.execute_batch(
            "INSERT INTO content VALUES (x'0101010101010101010101010101010101010101010101010101010101010101', 'fw', 1, 10, 256, '/x', x'00', 1);
             INSERT INTO jobs (id, root, epoch, state, created_at, targets) VALUES
                (1, x'0101010101010101010101010101010101010101010101010101010101010101', 1, 'running', 1, '\"all\"');
             INSERT INTO participants (job, agent, state, verified, updated_at) VALUES (1, 'a', 'confirmed', 1, 5);",
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    let p = s.participants(1).unwrap();
    assert_eq!(p.len(), 1);
    // Confirmed before install states were kept: it resumes as running.
    assert_eq!(p[0].install, None);
    assert_eq!(resume_install(&p[0]), None);
    assert!(s.running_versions(None).unwrap().is_empty());
}

#[test]
fn a_version_11_database_migrates_to_rollouts_and_its_jobs_have_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    {
        let conn = Connection::open(&path).unwrap();
        for m in &MIGRATIONS[..11] {
            conn.execute_batch(m).unwrap();
        }
        conn.pragma_update(None, "user_version", 11).unwrap();
        conn.execute_batch(
            "INSERT INTO content VALUES (x'0101010101010101010101010101010101010101010101010101010101010101', 'fw', 1, 10, 256, '/x', x'00', 1);
             INSERT INTO jobs (id, root, epoch, state, created_at, targets) VALUES
                (1, x'0101010101010101010101010101010101010101010101010101010101010101', 1, 'running', 1, '\"all\"');",
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    let job = s.job(1).unwrap().unwrap();
    assert_eq!(job.state, JobState::Running);
    // Started before rollouts were kept: it resumes as it ran, everyone at once.
    assert_eq!(job.rollout, None);
}

#[test]
fn a_version_2_database_with_web_tables_migrates_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(MIGRATIONS[1]).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        // What earlier builds created beside the migrations, with a row in each.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS admin_users (
                name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,
                created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS api_tokens (
                name TEXT PRIMARY KEY, hash BLOB NOT NULL UNIQUE, created_at INTEGER NOT NULL);
             INSERT INTO admin_users VALUES ('ops', '$old', 1, 1);
             INSERT INTO api_tokens VALUES ('ci', x'0707070707070707070707070707070707070707070707070707070707070707', 1);",
        )
        .unwrap();
    }
    let mut s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.admin_hash("ops").unwrap().as_deref(), Some("$old"));
    // Made before roles existed: they keep every right they had.
    assert_eq!(
        s.api_token(&[7; 32]).unwrap(),
        Some(("ci".to_string(), Role::Admin))
    );
    assert_eq!(s.admin_role("ops").unwrap(), Some(Role::Admin));
    assert!(s.create_session(&session(1, "ops", 1), "$old").unwrap());
}

fn audit_entry(action: &str, target: &str, at: u64) -> AuditEntry {
    AuditEntry {
        id: 0,
        at,
        via: "api-token".into(),
        who: "ci".into(),
        address: "192.0.2.7".into(),
        action: action.into(),
        target: target.into(),
        result: "ok".into(),
        status: Some(201),
        error: None,
    }
}

fn audit_entries_are_listed_newest_first_and_paged(open: Open<'_>) {
    let mut s = open();
    assert!(s.audit(None, 10).unwrap().is_empty());
    let mut ids = Vec::new();
    for i in 0..7u64 {
        ids.push(
            s.add_audit(
                &audit_entry("group.create", &format!("g{i}"), 100 + i),
                1000,
            )
            .unwrap(),
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let refused = AuditEntry {
        result: "refused".into(),
        status: Some(404),
        error: Some("group \"x\" not found".into()),
        ..audit_entry("group.delete", "x", 200)
    };
    let last = s.add_audit(&refused, 1000).unwrap();
    let first_page = s.audit(None, 3).unwrap();
    let targets: Vec<&str> = first_page.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["x", "g6", "g5"]);
    assert_eq!(
        first_page[0],
        AuditEntry {
            id: last,
            ..refused
        }
    );
    // The next page starts below the last id of this one; the last page is short.
    let second = s.audit(Some(first_page[2].id), 3).unwrap();
    let targets: Vec<&str> = second.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["g4", "g3", "g2"]);
    let third = s.audit(Some(second[2].id), 3).unwrap();
    let targets: Vec<&str> = third.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["g1", "g0"]);
    assert!(s.audit(Some(third[1].id), 3).unwrap().is_empty());
}

fn the_audit_log_keeps_only_the_newest_entries_and_cuts_long_texts(open: Open<'_>) {
    let mut s = open();
    for i in 0..25u64 {
        s.add_audit(&audit_entry("job.start", &format!("job {i}"), i), 10)
            .unwrap();
    }
    let kept = s.audit(None, 100).unwrap();
    assert_eq!(kept.len(), 10);
    assert_eq!(kept[0].target, "job 24");
    assert_eq!(kept[9].target, "job 15");
    // A smaller bound later drops the excess at the next entry.
    s.add_audit(&audit_entry("job.start", "job 25", 25), 3)
        .unwrap();
    let kept = s.audit(None, 100).unwrap();
    let targets: Vec<&str> = kept.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["job 25", "job 24", "job 23"]);

    // Long texts are cut at a character boundary, with a mark.
    let long = "é".repeat(AUDIT_MAX_TEXT);
    let e = AuditEntry {
        error: Some("x".repeat(10 * AUDIT_MAX_TEXT)),
        ..audit_entry("group.create", &long, 30)
    };
    s.add_audit(&e, 10).unwrap();
    let got = &s.audit(None, 1).unwrap()[0];
    assert!(got.target.len() <= AUDIT_MAX_TEXT, "{}", got.target.len());
    assert!(got.target.ends_with('…') && got.target.starts_with("éé"));
    let error = got.error.as_deref().unwrap();
    assert!(error.len() <= AUDIT_MAX_TEXT && error.ends_with('…'));
}

fn the_trust_chain_only_grows_and_keeps_the_newest(open: Open<'_>) {
    let mut s = open();
    assert!(s.trust_chain().unwrap().is_empty());
    for v in 1..=5u64 {
        s.add_trust(v, &[v as u8; 3], 100, 3).unwrap();
    }
    assert_eq!(
        s.trust_chain().unwrap(),
        vec![vec![3u8; 3], vec![4u8; 3], vec![5u8; 3]],
        "the newest 3, oldest first"
    );
    assert!(matches!(
        s.add_trust(5, &[9], 100, 3),
        Err(StoreError::Duplicate(_))
    ));
    assert!(matches!(
        s.add_trust(2, &[9], 100, 3),
        Err(StoreError::Duplicate(_))
    ));
    assert_eq!(s.trust_chain().unwrap().len(), 3);
}

fn certificate_serials_only_grow_also_across_a_reopen(open: Open<'_>) {
    let key = baton_protocol::identity::Identity::from_seed([2; 32]).public();
    let first = {
        let mut s = open();
        s.enrol("a", &key, 1).unwrap();
        let one = s.next_cert_serial("a", 100).unwrap();
        let two = s.next_cert_serial("a", 200).unwrap();
        assert!(two > one && one > 0);
        assert!(matches!(
            s.next_cert_serial("ghost", 100),
            Err(StoreError::NotFound(_))
        ));
        two
    };
    let mut s = open();
    assert!(s.next_cert_serial("a", 300).unwrap() > first);
}

fn a_revoked_agent_leaves_the_views_its_entry_lives_until_its_certificates_expire(open: Open<'_>) {
    let mut s = open();
    let key = baton_protocol::identity::Identity::from_seed([2; 32]).public();
    let other = baton_protocol::identity::Identity::from_seed([3; 32]).public();
    s.enrol("victim", &key, 1).unwrap();
    s.enrol("keeper", &other, 1).unwrap();
    let serial = s.next_cert_serial("victim", 1_000).unwrap();
    assert_eq!(s.revoke_agent("ghost", 10).unwrap(), None);
    let record = s.revoke_agent("victim", 10).unwrap().unwrap();
    assert_eq!(
        record,
        RevocationRecord {
            id: "victim".into(),
            up_to_serial: serial,
            expires_at: 1_000,
            revoked_at: 10,
        }
    );
    // Revoking again answers the same record.
    assert_eq!(s.revoke_agent("victim", 20).unwrap(), Some(record.clone()));
    // It leaves the fleet views; history (its row) stays for job records.
    assert!(s.agent("victim").unwrap().is_none());
    let ids: Vec<String> = s.agents().unwrap().into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["keeper"]);
    assert_eq!(s.revoked_agents().unwrap(), ["victim"]);
    assert!(matches!(
        s.next_cert_serial("victim", 2_000),
        Err(StoreError::NotFound(_))
    ));
    // Listed until its last certificate expires, then dropped (it stays revoked).
    assert_eq!(s.live_revocations(999).unwrap(), [record]);
    assert!(s.live_revocations(1_000).unwrap().is_empty());
    assert_eq!(s.revoked_agents().unwrap(), ["victim"]);
    // Versions of the list grow.
    let v = s.next_revocation_version().unwrap();
    assert!(s.next_revocation_version().unwrap() > v);
    // Enrolled again (another key): afresh, with later serials.
    assert_eq!(s.enrol("victim", &other, 30).unwrap(), Enrolled::New);
    assert!(s.revoked_agents().unwrap().is_empty());
    assert_eq!(s.agent("victim").unwrap().unwrap().key, other);
    assert!(s.next_cert_serial("victim", 3_000).unwrap() > serial);
}

// ---- PostgreSQL's own

#[test]
fn postgres_refuses_a_newer_schema_and_migrates_once_when_two_open_at_once() {
    let Some(db) = TestDatabase::create("postgres_newer_schema") else {
        return;
    };
    // Two stores migrating the empty database at once: the advisory lock lets one do it.
    let both: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2).map(|_| scope.spawn(|| db.open())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &both {
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    }
    both[0]
        .conn()
        .unwrap()
        .batch(&format!(
            "UPDATE schema_version SET version = {}",
            SCHEMA_VERSION + 1
        ))
        .unwrap();
    drop(both);
    match PostgresStore::connect(db.url(), db.password()) {
        Err(StoreError::NewerSchema { found, known }) => {
            assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
}

#[test]
fn postgres_over_a_unix_socket_with_a_key_value_string() {
    let Some(db) = TestDatabase::create("postgres_unix_socket") else {
        return;
    };
    use super::test_database::{PORT_VAR, SOCKET_DIR_VAR};
    let (Ok(dir), Ok(port)) = (std::env::var(SOCKET_DIR_VAR), std::env::var(PORT_VAR)) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "{SOCKET_DIR_VAR} and {PORT_VAR} unset in CI (scripts/pg-test-cluster.sh sets them)"
        );
        super::test_database::say_skipped(&format!(
            "postgres_over_a_unix_socket: {SOCKET_DIR_VAR} or {PORT_VAR} unset"
        ));
        return;
    };
    let url = format!("host={dir} port={port} user=baton dbname={}", db.name());
    assert!(is_postgres_url(&url));
    // Local connections are trusted by the test cluster: no password.
    let mut s = PostgresStore::connect(&url, None).unwrap();
    s.enrol("edge-1", &PublicKey([1; 32]), 5).unwrap();
    assert!(db.open().agent("edge-1").unwrap().is_some());
}

#[test]
fn postgres_replaces_a_connection_the_server_closed() {
    let Some(db) = TestDatabase::create("postgres_lost_connection") else {
        return;
    };
    let mut s = db.open();
    s.enrol("edge-1", &PublicKey([1; 32]), 5).unwrap();
    // The server ends every other session on this database (a restart, a failover).
    let killer = db.open();
    let ended = killer
        .conn()
        .unwrap()
        .one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid != pg_backend_pid()",
            &[],
        )
        .unwrap();
    assert!(ended.get::<_, i64>(0) >= 1);
    // At most the first call after it fails (the closed connection may not be noticed
    // yet); the next ones run on a new connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut failures = 0;
    loop {
        match s.agent("edge-1") {
            Ok(found) => {
                assert!(found.is_some());
                break;
            }
            Err(e) => {
                failures += 1;
                assert!(failures <= 1, "still failing: {e}");
            }
        }
        assert!(std::time::Instant::now() < deadline);
    }
    s.mark_seen("edge-1", 9).unwrap();
    assert_eq!(killer.agent("edge-1").unwrap().unwrap().last_seen, Some(9));
}

#[test]
fn postgres_store_calls_work_from_inside_async_tasks() {
    // The manager calls the store from its async tasks; the synchronous `postgres` crate
    // would panic there. Both runtime flavours, and a store opened inside the runtime.
    let Some(db) = TestDatabase::create("postgres_from_async") else {
        return;
    };
    let store: SharedStore = std::sync::Arc::new(std::sync::Mutex::new(Box::new(db.open())));
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(async {
        lock(&store)
            .enrol("edge-1", &PublicKey([1; 32]), 5)
            .unwrap();
        let inner = db.open();
        assert!(inner.agent("edge-1").unwrap().is_some());
    });
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    multi.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    lock(&store).mark_seen("edge-1", i).unwrap();
                    lock(&store).agent("edge-1").unwrap().unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().id, "edge-1");
        }
    });
    // Dropping the store inside a runtime (the manager's shutdown) does not panic either.
    current.block_on(async move { drop(store) });
}

// ---- `baton db copy`

/// An installation with a row in every table.
fn fill(s: &mut dyn Store) -> u64 {
    s.next_epoch().unwrap();
    s.next_epoch().unwrap();
    s.set_meta("manager_key", &[9; 32]).unwrap();
    let key = |b| baton_protocol::identity::Identity::from_seed([b; 32]).public();
    for (n, agent) in ["a", "b", "gone"].iter().enumerate() {
        s.enrol(agent, &key(n as u8 + 1), 10).unwrap();
        s.record_report(&report(agent), 11).unwrap();
        s.place_at_enrolment(agent, "lan-1", 5).unwrap();
        s.next_cert_serial(agent, 5_000).unwrap();
    }
    s.add_token(
        &[7; 32],
        &NewToken {
            expires_at: 10_000,
            bound_id: Some("c".into()),
            labels: [("role".to_string(), "edge".to_string())].into(),
        },
        10,
    )
    .unwrap();
    s.revoke_agent("gone", 12).unwrap();
    s.next_revocation_version().unwrap();
    s.put_content(&content(1, "fw", 1)).unwrap();
    let job = s
        .create_job(
            &[1; 32],
            &TargetSpec::Agents(vec!["a".into(), "b".into()]),
            13,
        )
        .unwrap();
    s.add_job_warning(job, "second rule", 13).unwrap();
    s.add_job_warning(job, "first rule", 13).unwrap();
    s.apply(
        &[
            Persist::JobStarted {
                job,
                epoch: 2,
                order: vec![id("a"), id("b")],
            },
            Persist::SourceBytes {
                job,
                agent: id("a"),
                from: None,
                bytes: 100_000,
            },
            Persist::SourceBytes {
                job,
                agent: id("b"),
                from: Some(id("a")),
                bytes: 100_000,
            },
            Persist::Participant {
                job,
                agent: id("a"),
                state: ParticipantState::Confirmed,
                source_note: Some("manager".into()),
            },
            Persist::Participant {
                job,
                agent: id("b"),
                state: ParticipantState::Failed(FailCause::GaveUp),
                source_note: None,
            },
            Persist::MeasuredUpload {
                job,
                rates: vec![(id("a"), 250_000)],
            },
            Persist::Install {
                job,
                agent: id("a"),
                state: Some(baton_protocol::message::InstallState::Running),
                exit_code: Some(0),
                output: "installed".into(),
            },
            Persist::Running {
                agent: id("a"),
                versions: vec![("fw".into(), 3)],
                whole: true,
            },
            Persist::JobFinished {
                job,
                confirmed: 1,
                failed: 1,
            },
        ],
        14,
    )
    .unwrap();
    for (leader, at) in [("a", 100), ("b", 200)] {
        s.replace_segment(&SegmentRecord {
            name: "lan-1".into(),
            leader: leader.into(),
            term: 1,
            reported_at_ms: at,
            members: vec![member("a", true), member("b", false)],
        })
        .unwrap();
    }
    s.add_group(
        &GroupRecord {
            name: "edge".into(),
            agents: vec!["a".into()],
            selector: [("role".to_string(), "edge".to_string())].into(),
        },
        15,
    )
    .unwrap();
    s.add_policy(
        &PolicyRecord {
            name: "slow".into(),
            policy: serde_json::json!({ "max_peers_per_source": 2 }),
        },
        15,
    )
    .unwrap();
    s.set_admin("ops", "hash-1", Some(Role::Operate), 16)
        .unwrap();
    s.new_api_token("ci", &[8; 32], Role::Read, 16).unwrap();
    assert!(s.create_session(&session(1, "ops", 100), "hash-1").unwrap());
    for n in 0..3 {
        s.add_audit(&audit_entry("job.start", &format!("{n}"), 17), 100)
            .unwrap();
    }
    s.add_trust(1, b"trust-1", 18, 5).unwrap();
    job
}

/// Everything a store answers about an installation, to compare two.
fn everything(s: &dyn Store, job: u64) -> String {
    format!(
        "{:#?}",
        (
            (s.epoch().unwrap(), s.meta("manager_key").unwrap()),
            (
                s.agents().unwrap(),
                s.tokens(20).unwrap(),
                s.bound_labels().unwrap()
            ),
            (s.revoked_agents().unwrap(), s.content(&[1; 32]).unwrap()),
            (
                s.jobs().unwrap(),
                s.job(job).unwrap(),
                s.participants(job).unwrap()
            ),
            (s.source_bytes(job).unwrap(), s.confirmations(job).unwrap()),
            (s.segments().unwrap(), s.leader_history("lan-1").unwrap()),
            (
                s.groups().unwrap(),
                s.policies().unwrap(),
                s.admins().unwrap()
            ),
            (s.admin_role("ops").unwrap(), s.api_token(&[8; 32]).unwrap()),
            (s.session(&[1; 32]).unwrap(), s.audit(None, 10).unwrap()),
            (s.trust_chain().unwrap(), s.totals().unwrap()),
        )
    )
}

#[test]
fn db_copy_moves_every_table_from_sqlite_to_an_empty_postgresql() {
    let Some(db) = TestDatabase::create("db_copy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    let job = fill(&mut SqliteStore::open(&path).unwrap());
    let mut source = SqliteStore::open(&path).unwrap();
    let target = db.open();
    let counts = copy::sqlite_to_postgres(&path, &target).unwrap();
    // Every table is copied, and every one of them had rows.
    let conn = source.connection();
    for (table, n) in &counts {
        assert!(*n > 0, "table {table} was empty in the source");
        let in_sqlite: i64 = conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(*n, in_sqlite as u64, "{table}");
    }
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(counts.len() as i64, tables);
    let mut target: Box<dyn Store> = Box::new(target);
    assert_eq!(everything(&source, job), everything(target.as_ref(), job));
    // Counters and ids go on from where the source left them, on both alike.
    for s in [&mut source as &mut dyn Store, target.as_mut()] {
        assert_eq!(s.next_epoch().unwrap(), 3);
        assert_eq!(
            s.create_job(&[1; 32], &TargetSpec::All, 30).unwrap(),
            job + 1
        );
        assert_eq!(s.add_audit(&audit_entry("x", "y", 30), 100).unwrap(), 4);
        assert_eq!(s.next_cert_serial("a", 9_000).unwrap(), 4);
        assert_eq!(s.next_revocation_version().unwrap(), 2);
        s.add_job_warning(job + 1, "later", 31).unwrap();
    }
    // A target with data is refused, and is left as it was.
    let before = everything(target.as_ref(), job);
    match copy::sqlite_to_postgres(&path, &db.open()) {
        Err(StoreError::Duplicate(why)) => assert!(why.contains("empty"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(everything(target.as_ref(), job), before);
}
