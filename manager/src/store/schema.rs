//! The database schema: the one list of migrations, which creates every table
//! the manager keeps, and the code that applies them.
//!
//! [`MIGRATIONS`] is written in SQLite's dialect; PostgreSQL runs the same list
//! translated word by word ([`postgres_migration`]: `INTEGER` → `BIGINT`, `BLOB`
//! → `BYTEA`, `AUTOINCREMENT` → an identity column, `TEXT` compared byte by byte
//! like SQLite's, `ifnull` → `coalesce`), plus [`POSTGRES_EXTRA`], the few
//! statements that stand in for what SQLite has implicitly (`rowid`).
//!
//! A database records how many migrations it has seen (SQLite: `PRAGMA
//! user_version`; PostgreSQL: the one row of `schema_version`); opening it
//! applies the rest, in order, each in its own transaction. A database from a
//! newer build (more migrations than [`MIGRATIONS`]) is refused rather than
//! guessed at. Nothing outside this module creates or alters a table.

use rusqlite::Connection;

use super::{Result, StoreError};

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
///
/// Only append: a released migration never changes.
pub const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    CREATE TABLE agents (
        id           TEXT PRIMARY KEY,
        key          BLOB NOT NULL,
        enrolled_at  INTEGER NOT NULL,
        last_seen    INTEGER,
        report       TEXT,
        site         TEXT,
        segment      TEXT,
        listen       TEXT,
        performance  INTEGER,
        up_bps       INTEGER,
        down_bps     INTEGER,
        free_storage INTEGER
    );
    CREATE TABLE enrolment_tokens (
        hash       BLOB PRIMARY KEY,
        created_at INTEGER NOT NULL,
        used_at    INTEGER,
        used_by    TEXT
    );
    CREATE TABLE content (
        root       BLOB PRIMARY KEY,
        name       TEXT NOT NULL,
        version    INTEGER NOT NULL,
        length     INTEGER NOT NULL,
        chunk_size INTEGER NOT NULL,
        path       TEXT NOT NULL,
        manifest   BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX content_by_name ON content(name, version);
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        root        BLOB NOT NULL REFERENCES content(root),
        epoch       INTEGER,
        state       TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        finished_at INTEGER,
        targets     TEXT NOT NULL,
        confirmed   INTEGER,
        failed      INTEGER,
        error       TEXT
    );
    CREATE TABLE participants (
        job        INTEGER NOT NULL REFERENCES jobs(id),
        agent      TEXT NOT NULL,
        state      TEXT NOT NULL,
        verified   INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL,
        reason     TEXT,
        cause      TEXT,
        source     TEXT,
        position   INTEGER,
        PRIMARY KEY (job, agent)
    );
    CREATE TABLE source_bytes (
        job        INTEGER NOT NULL REFERENCES jobs(id),
        agent      TEXT NOT NULL,
        from_agent TEXT,
        bytes      INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX source_bytes_key ON source_bytes(job, agent, ifnull(from_agent, ''));
    CREATE TABLE confirmations (
        job          INTEGER NOT NULL REFERENCES jobs(id),
        agent        TEXT NOT NULL,
        confirmed_at INTEGER NOT NULL,
        PRIMARY KEY (job, agent)
    );
    ",
    // 2: segments and their leaders, content groups, named policies; a job's group, policy
    // and warnings.
    "
    CREATE TABLE segments (
        name        TEXT PRIMARY KEY,
        leader      TEXT NOT NULL,
        term        INTEGER NOT NULL,
        reported_at INTEGER NOT NULL
    );
    CREATE TABLE segment_members (
        segment       TEXT NOT NULL REFERENCES segments(name) ON DELETE CASCADE,
        id            TEXT NOT NULL,
        score         INTEGER NOT NULL,
        listen        TEXT,
        performance   INTEGER NOT NULL,
        free_storage  INTEGER NOT NULL,
        can_serve     INTEGER NOT NULL,
        up_bps        INTEGER NOT NULL,
        down_bps      INTEGER NOT NULL,
        loss_ppm      INTEGER NOT NULL,
        uptime_s      INTEGER NOT NULL,
        delays        TEXT NOT NULL,
        last_heard_ms INTEGER NOT NULL,
        known         INTEGER NOT NULL,
        PRIMARY KEY (segment, id)
    );
    CREATE TABLE leader_history (
        segment  TEXT NOT NULL,
        leader   TEXT NOT NULL,
        term     INTEGER NOT NULL,
        since_ms INTEGER NOT NULL
    );
    CREATE INDEX leader_history_by_segment ON leader_history(segment, since_ms);
    CREATE TABLE content_groups (
        name       TEXT PRIMARY KEY,
        agents     TEXT NOT NULL,
        selector   TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE policies (
        name       TEXT PRIMARY KEY,
        policy     TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN group_name TEXT;
    ALTER TABLE jobs ADD COLUMN policy_name TEXT;
    ALTER TABLE jobs ADD COLUMN policy TEXT;
    CREATE TABLE job_warnings (
        job      INTEGER NOT NULL REFERENCES jobs(id),
        text     TEXT NOT NULL,
        added_at INTEGER NOT NULL,
        PRIMARY KEY (job, text)
    );
    ",
    // 3: administrators and named API tokens (earlier builds created these two outside the
    // migrations, hence `IF NOT EXISTS`), and the web UI's sessions.
    "
    CREATE TABLE IF NOT EXISTS admin_users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS api_tokens (
        name       TEXT PRIMARY KEY,
        hash       BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE web_sessions (
        id_hash    BLOB PRIMARY KEY,
        admin      TEXT NOT NULL,
        csrf       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        last_used  INTEGER NOT NULL
    );
    CREATE INDEX web_sessions_by_use ON web_sessions(last_used);
    ",
    // 4: each participant's measured upload, so a job resumed after a restart is planned
    // with the rates it had found rather than blind again.
    "
    ALTER TABLE participants ADD COLUMN measured_up_bps INTEGER;
    ",
    // 5: where the administrator placed each agent (segment and highest election score),
    // which its certificate carries; NULL until its first report or the administrator
    // places it (agents of older databases are placed at their next report).
    "
    ALTER TABLE agents ADD COLUMN placed_segment TEXT;
    ALTER TABLE agents ADD COLUMN election_score INTEGER;
    ",
    // 6: the audit log: every change made through the manager, who made it, from where,
    // and its result; ids only grow (AUTOINCREMENT), so a page's cursor stays valid while
    // the oldest entries are dropped.
    "
    CREATE TABLE audit_log (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        via     TEXT NOT NULL,
        who     TEXT NOT NULL,
        address TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        result  TEXT NOT NULL,
        status  INTEGER,
        error   TEXT
    );
    ",
    // 7: enrolment tokens expire, may be bound to one agent id and to labels (JSON object;
    // the agent it enrols must report them, `agents.bound_labels`), and can be revoked.
    // Tokens of older databases, which never expired, expire a day after they were made.
    "
    ALTER TABLE enrolment_tokens ADD COLUMN expires_at INTEGER;
    ALTER TABLE enrolment_tokens ADD COLUMN bound_id TEXT;
    ALTER TABLE enrolment_tokens ADD COLUMN labels TEXT;
    ALTER TABLE enrolment_tokens ADD COLUMN revoked_at INTEGER;
    ALTER TABLE agents ADD COLUMN bound_labels TEXT;
    UPDATE enrolment_tokens SET expires_at = created_at + 86400;
    ",
    // 8: scoped access: each API token and administrator has a role (`read`, `operate`,
    // `admin`); those made before roles existed could do everything, so they are `admin`.
    "
    ALTER TABLE admin_users ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
    ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
    ",
    // 9: the chain of root-signed trust documents the manager was given (encoded
    // `SignedTrust`, by version), which it relays to agents; only the newest few are kept.
    "
    CREATE TABLE trust_documents (
        version  INTEGER PRIMARY KEY,
        document BLOB NOT NULL,
        added_at INTEGER NOT NULL
    );
    ",
    // 10: agent certificates and their revocation. `counters` holds the certificate serial
    // (it only grows, so a revocation can name every certificate up to one serial) and the
    // revocation list's version; each agent records the last serial issued to it and when
    // that certificate expires; a revoked agent keeps its row (history: job records name
    // it) with `revoked_at` set, and leaves the fleet views. `revocations` holds what the
    // signed list must still carry: until every certificate it covers has expired.
    "
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO counters (name, value) VALUES ('cert_serial', 0), ('revocation_list', 0);
    ALTER TABLE agents ADD COLUMN last_serial INTEGER;
    ALTER TABLE agents ADD COLUMN cert_not_after INTEGER;
    ALTER TABLE agents ADD COLUMN revoked_at INTEGER;
    CREATE TABLE revocations (
        id           TEXT PRIMARY KEY,
        up_to_serial INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        revoked_at   INTEGER NOT NULL
    );
    ",
    // 11: the states past delivery. Each confirmed participant's install step (`pending`
    // while its agent has not reported, `installing`, `installed`, `running`, `failed`,
    // `rolled_back`) with the deciding command's exit code and output tail; and the version
    // of each content name running on each agent. Plain SQL, for every backend.
    "
    ALTER TABLE participants ADD COLUMN install_state TEXT;
    ALTER TABLE participants ADD COLUMN install_exit_code INTEGER;
    ALTER TABLE participants ADD COLUMN install_output TEXT;
    ALTER TABLE participants ADD COLUMN install_at BIGINT;
    CREATE TABLE agent_versions (
        agent      TEXT NOT NULL,
        name       TEXT NOT NULL,
        version    BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (agent, name)
    );
    ",
    // 12: staged rollouts. Where a job's rollout stands (JSON of the engine's
    // `RolloutState`: the waves' ends in the participant order, the waves opened, a pause,
    // a wait for approval, a soak's end, the failures accepted, an abort), so the wave plan
    // and the administrator's decisions survive a restart. Plain SQL, for every backend.
    "
    ALTER TABLE jobs ADD COLUMN rollout TEXT;
    ",
    // 13: the managers' lease (PostgreSQL only: [`POSTGRES_LEASE`], run as this migration's
    // extra statement; SQLite has one manager and nothing to add). A numbered migration so
    // that a manager built before the lease existed refuses the database (a newer schema)
    // instead of running beside the lease holder, unfenced.
    "
    -- 13: nothing on SQLite.
    ",
];

/// The managers' lease, PostgreSQL only (several `baton serve` on one database; SQLite has
/// one manager): one row naming the manager that may act (its holder id and addresses), the
/// epoch it took the lease with (one more at every takeover; the engine runs under it) and
/// when it expires (the database's clock). Created by migration 13 on PostgreSQL (its
/// [`POSTGRES_EXTRA`]), idempotently: databases of the build that created it outside the
/// migrations already have it. `baton db copy` has nothing of it to move (a copy starts
/// unheld).
pub const POSTGRES_LEASE: &str = "
    CREATE TABLE IF NOT EXISTS manager_lease (
        id         BIGINT PRIMARY KEY CHECK (id = 1),
        holder     TEXT COLLATE \"C\",
        agent_addr TEXT COLLATE \"C\",
        http_addr  TEXT COLLATE \"C\",
        epoch      BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO manager_lease (id, epoch, expires_at) VALUES (1, 0, 'epoch')
        ON CONFLICT (id) DO NOTHING;
";

/// Newest schema version this build knows.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Statements PostgreSQL runs right after the migration of the same version (1-based),
/// standing in for what SQLite has implicitly: the `rowid` that orders a job's warnings
/// and a segment's leaders in insertion order. Only append, like [`MIGRATIONS`].
pub const POSTGRES_EXTRA: &[(u32, &str)] = &[
    (
        2,
        "
    ALTER TABLE job_warnings ADD COLUMN rowid BIGINT GENERATED BY DEFAULT AS IDENTITY;
    ALTER TABLE leader_history ADD COLUMN rowid BIGINT GENERATED BY DEFAULT AS IDENTITY;
    ",
    ),
    (13, POSTGRES_LEASE),
];

/// Migration `version` (1-based) in PostgreSQL's dialect: [`MIGRATIONS`]`[version - 1]`
/// translated word by word, then its [`POSTGRES_EXTRA`] statements.
pub fn postgres_migration(version: u32) -> String {
    let sqlite = MIGRATIONS[version as usize - 1];
    let mut out = String::with_capacity(sqlite.len() + 64);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(match word.as_str() {
            "INTEGER" => "BIGINT",
            "BLOB" => "BYTEA",
            // SQLite compares text byte by byte; so does the "C" collation, whatever the
            // database's locale (names sort and compare the same on both backends).
            "TEXT" => "TEXT COLLATE \"C\"",
            "AUTOINCREMENT" => "GENERATED BY DEFAULT AS IDENTITY",
            "ifnull" => "coalesce",
            other => other,
        });
        word.clear();
    };
    for c in sqlite.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    for (_, extra) in POSTGRES_EXTRA.iter().filter(|(v, _)| *v == version) {
        out.push_str(extra);
    }
    out
}

/// Applies every migration the database has not seen, each in its own transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}
