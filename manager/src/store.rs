//! The manager's database: enrolled agents and their latest reports, one-time
//! enrolment tokens, published content, jobs, participants, confirmations and
//! the bytes each source delivered (claim 8); the segments their leaders
//! report, with each segment's leader history; and what administrators define:
//! content groups and named distribution policies (claim 9).
//!
//! [`Store`] is the interface the rest of the manager uses, so another
//! backend (PostgreSQL) can be added beside [`SqliteStore`], the default: one
//! SQLite file in WAL mode whose schema is migrated in order by
//! `PRAGMA user_version`. The job engine's [`Persist`] records are applied
//! with [`Store::apply`], all of one batch in one transaction, before any
//! instruction that depends on them is sent (persist before instruct).

use std::path::Path;

use baton_protocol::message::Report;
use baton_protocol::types::{Digest, PublicKey};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use baton_manager_core::engine::{FailCause, ParticipantState, Persist};
pub use baton_manager_core::records::*;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database itself failed (IO, corruption, constraint).
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The database was written by a newer Baton whose schema this build does not know.
    #[error(
        "database schema version {found} is newer than this build knows ({known}); use a newer baton"
    )]
    NewerSchema {
        /// The schema version found in the file.
        found: u32,
        /// The newest schema version this build knows.
        known: u32,
    },
    /// An agent id is already enrolled with another key.
    #[error("agent {0:?} is already enrolled with another key")]
    KeyConflict(String),
    /// The enrolment token is unknown or was already used.
    #[error("enrolment token is unknown or already used")]
    BadToken,
    /// A row holds a value this build cannot read back.
    #[error("corrupt database row: {0}")]
    Corrupt(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Something of that name exists already.
    #[error("{0} already exists")]
    Duplicate(String),
}

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The manager's persistent state. One implementation per database backend.
///
/// Times are Unix seconds passed by the caller. Every method is one
/// transaction: it either happens whole or not at all.
pub trait Store: Send + std::fmt::Debug {
    /// The current manager epoch (0 before the first start).
    fn epoch(&self) -> Result<u32>;
    /// Increments the stored epoch and returns the new value (once per manager start).
    fn next_epoch(&mut self) -> Result<u32>;
    /// A value from the `meta` table.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Sets a value in the `meta` table.
    fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<()>;

    /// Enrols `id` with `key`. The same key again is [`Enrolled::Unchanged`]; another key is
    /// [`StoreError::KeyConflict`].
    fn enrol(&mut self, id: &str, key: &PublicKey, now: u64) -> Result<Enrolled>;
    /// Stores the hash of a new one-time enrolment token.
    fn add_token(&mut self, hash: &Digest, now: u64) -> Result<()>;
    /// Uses the token with this hash to enrol `id` with `key`: both or neither happen.
    fn enrol_with_token(
        &mut self,
        hash: &Digest,
        id: &str,
        key: &PublicKey,
        now: u64,
    ) -> Result<Enrolled>;
    /// One agent.
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>>;
    /// Every enrolled agent, by id.
    fn agents(&self) -> Result<Vec<AgentRecord>>;
    /// Records an agent's latest report (and that it was seen now).
    fn record_report(&mut self, report: &Report, now: u64) -> Result<()>;
    /// Records that an agent was seen now.
    fn mark_seen(&mut self, id: &str, now: u64) -> Result<()>;

    /// Stores content (replacing an earlier record of the same root).
    fn put_content(&mut self, content: &ContentRecord) -> Result<()>;
    /// Content by root.
    fn content(&self, root: &Digest) -> Result<Option<ContentRecord>>;
    /// The highest version published under `name`.
    fn latest_version(&self, name: &str) -> Result<Option<u64>>;

    /// Creates a job in state [`JobState::Pending`] and returns its id.
    fn create_job(&mut self, root: &Digest, targets: &TargetSpec, now: u64) -> Result<u64> {
        self.create_job_from(root, targets, &JobOrigin::default(), now)
    }
    /// Creates a job in state [`JobState::Pending`], recording its group and policy; returns
    /// its id.
    fn create_job_from(
        &mut self,
        root: &Digest,
        targets: &TargetSpec,
        origin: &JobOrigin,
        now: u64,
    ) -> Result<u64>;
    /// Adds a policy rule the planner could not meet to a job (a repeated text is kept once).
    fn add_job_warning(&mut self, job: u64, text: &str, now: u64) -> Result<()>;
    /// Sets a job's state (and error); a final state also sets `finished_at`.
    fn set_job_state(
        &mut self,
        job: u64,
        state: JobState,
        error: Option<&str>,
        now: u64,
    ) -> Result<()>;
    /// One job.
    fn job(&self, job: u64) -> Result<Option<JobRecord>>;
    /// Every job, newest first.
    fn jobs(&self) -> Result<Vec<JobRecord>>;
    /// Jobs that are pending or running, oldest first (to resume after a restart).
    fn unfinished_jobs(&self) -> Result<Vec<JobRecord>>;
    /// A job's participants, in plan order.
    fn participants(&self, job: u64) -> Result<Vec<ParticipantRecord>>;
    /// A job's bytes per receiver and source.
    fn source_bytes(&self, job: u64) -> Result<Vec<SourceBytes>>;
    /// A job's bytes per edge of its relay (source → receiver).
    fn transfers(&self, job: u64) -> Result<Vec<Transfer>> {
        Ok(self
            .source_bytes(job)?
            .into_iter()
            .map(|s| Transfer {
                from: s.from,
                to: s.agent,
                bytes: s.bytes,
            })
            .collect())
    }
    /// A job's confirmations.
    fn confirmations(&self, job: u64) -> Result<Vec<Confirmation>>;

    /// Applies the engine's records in order, all in one transaction.
    fn apply(&mut self, records: &[Persist], now: u64) -> Result<()>;

    /// Replaces the stored view of `segment.name` with this complete report; a new leader is
    /// recorded in the segment's history. Returns whether the leader changed.
    fn replace_segment(&mut self, segment: &SegmentRecord) -> Result<bool>;
    /// Every reported segment, by name.
    fn segments(&self) -> Result<Vec<SegmentRecord>>;
    /// One segment.
    fn segment(&self, name: &str) -> Result<Option<SegmentRecord>>;
    /// A segment's leaders, oldest first.
    fn leader_history(&self, name: &str) -> Result<Vec<LeaderChange>>;

    /// Adds a content group; [`StoreError::Duplicate`] if the name is taken.
    fn add_group(&mut self, group: &GroupRecord, now: u64) -> Result<()>;
    /// Replaces a content group; [`StoreError::NotFound`] if there is none of that name.
    fn set_group(&mut self, group: &GroupRecord, now: u64) -> Result<()>;
    /// Removes a content group; [`StoreError::NotFound`] if there is none of that name.
    fn remove_group(&mut self, name: &str) -> Result<()>;
    /// One content group.
    fn group(&self, name: &str) -> Result<Option<GroupRecord>>;
    /// Every content group, by name.
    fn groups(&self) -> Result<Vec<GroupRecord>>;

    /// Adds a named policy; [`StoreError::Duplicate`] if the name is taken.
    fn add_policy(&mut self, policy: &PolicyRecord, now: u64) -> Result<()>;
    /// Replaces a named policy; [`StoreError::NotFound`] if there is none of that name.
    fn set_policy(&mut self, policy: &PolicyRecord, now: u64) -> Result<()>;
    /// Removes a named policy; [`StoreError::NotFound`] if there is none of that name.
    fn remove_policy(&mut self, name: &str) -> Result<()>;
    /// One named policy.
    fn policy(&self, name: &str) -> Result<Option<PolicyRecord>>;
    /// Every named policy, by name.
    fn policies(&self) -> Result<Vec<PolicyRecord>>;
}

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
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
];

/// Newest schema version this build knows.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The SQLite backend: one database file in WAL mode.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::with_connection(conn)
    }

    /// A private in-memory database (tests, throwaway runs).
    pub fn in_memory() -> Result<Self> {
        Self::with_connection(Connection::open_in_memory()?)
    }

    fn with_connection(mut conn: Connection) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers do not block the writer. NORMAL sync: a committed
        // transaction survives a crash of the process (not necessarily of the OS).
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut conn)?;
        Ok(SqliteStore { conn })
    }

    /// A job record with its warnings filled in.
    fn job_with_warnings(&self, mut job: JobRecord) -> Result<JobRecord> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT text FROM job_warnings WHERE job = ?1 ORDER BY added_at, rowid",
        )?;
        job.warnings = stmt
            .query_map([job.id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(job)
    }

    /// A job record with its warnings and transfers filled in.
    fn job_with_details(&self, job: JobRecord) -> Result<JobRecord> {
        let mut job = self.job_with_warnings(job)?;
        job.transfers = self.transfers(job.id)?;
        Ok(job)
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }
}

/// Applies every migration the database has not seen, each in its own transaction.
fn migrate(conn: &mut Connection) -> Result<()> {
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

/// A `u64` as SQLite's signed 64-bit integer; values past `i64::MAX` ("unlimited") saturate.
fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn key_from(bytes: Vec<u8>) -> Result<PublicKey> {
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("agent key is not 32 bytes".into()))?;
    Ok(PublicKey(arr))
}

fn digest_from(bytes: Vec<u8>) -> Result<Digest> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("content root is not 32 bytes".into()))
}

const AGENT_COLUMNS: &str = "id, key, enrolled_at, last_seen, report, site, segment, listen, \
     performance, up_bps, down_bps, free_storage";

/// An agent row read raw (conversions that can fail happen after the query).
type AgentRow = (
    String,
    Vec<u8>,
    u64,
    Option<u64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u32>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

fn agent_record(row: AgentRow) -> Result<AgentRecord> {
    let (
        id,
        key,
        enrolled_at,
        last_seen,
        report,
        site,
        segment,
        listen,
        performance,
        up_bps,
        down_bps,
        free_storage,
    ) = row;
    let report = match report {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("report of {id}: {e}")))?,
        ),
        None => None,
    };
    Ok(AgentRecord {
        key: key_from(key)?,
        id,
        enrolled_at,
        last_seen,
        report,
        site,
        segment,
        listen,
        performance,
        up_bps,
        down_bps,
        free_storage,
    })
}

const JOB_COLUMNS: &str = "id, root, epoch, state, created_at, finished_at, targets, confirmed, \
     failed, error, group_name, policy_name, policy";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get(0)?,
        root: r.get(1)?,
        epoch: r.get(2)?,
        state: r.get(3)?,
        created_at: r.get(4)?,
        finished_at: r.get(5)?,
        targets: r.get(6)?,
        confirmed: r.get(7)?,
        failed: r.get(8)?,
        error: r.get(9)?,
        group: r.get(10)?,
        policy_name: r.get(11)?,
        policy: r.get(12)?,
    })
}

/// A job row read raw (conversions that can fail happen after the query).
struct JobRow {
    id: u64,
    root: Vec<u8>,
    epoch: Option<u32>,
    state: String,
    created_at: u64,
    finished_at: Option<u64>,
    targets: String,
    confirmed: Option<u32>,
    failed: Option<u32>,
    error: Option<String>,
    group: Option<String>,
    policy_name: Option<String>,
    policy: Option<String>,
}

fn job_record(row: JobRow) -> Result<JobRecord> {
    let id = row.id;
    let policy_spec = match row.policy {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("policy of job {id}: {e}")))?,
        ),
        None => None,
    };
    Ok(JobRecord {
        id,
        root: digest_from(row.root)?,
        epoch: row.epoch,
        state: JobState::parse(&row.state)
            .ok_or_else(|| StoreError::Corrupt(format!("job state {:?}", row.state)))?,
        created_at: row.created_at,
        finished_at: row.finished_at,
        targets: serde_json::from_str(&row.targets)
            .map_err(|e| StoreError::Corrupt(format!("targets of job {id}: {e}")))?,
        confirmed: row.confirmed,
        failed: row.failed,
        error: row.error,
        group: row.group,
        policy: row.policy_name,
        policy_spec,
        warnings: Vec::new(),
        transfers: Vec::new(),
    })
}

fn enrol_in(tx: &Transaction<'_>, id: &str, key: &PublicKey, now: u64) -> Result<Enrolled> {
    let existing: Option<Vec<u8>> = tx
        .query_row("SELECT key FROM agents WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    match existing {
        Some(k) if k == key.0 => Ok(Enrolled::Unchanged),
        Some(_) => Err(StoreError::KeyConflict(id.to_string())),
        None => {
            tx.execute(
                "INSERT INTO agents (id, key, enrolled_at) VALUES (?1, ?2, ?3)",
                params![id, &key.0[..], now],
            )?;
            Ok(Enrolled::New)
        }
    }
}

/// The stored columns for an engine participant state: state, verified (if known), reason,
/// cause (JSON).
type StateColumns = (PartState, Option<u32>, Option<String>, Option<String>);

fn participant_columns(state: &ParticipantState) -> StateColumns {
    match state {
        ParticipantState::Waiting => (PartState::Waiting, None, None, None),
        ParticipantState::Fetching { verified } => {
            (PartState::Fetching, Some(*verified), None, None)
        }
        ParticipantState::Confirmed => (PartState::Confirmed, None, None, None),
        ParticipantState::Failed(cause) => (
            PartState::Failed,
            None,
            Some(cause.to_string()),
            serde_json::to_string(cause).ok(),
        ),
    }
}

/// The engine state a stored participant resumes in.
pub fn resume_state(p: &ParticipantRecord) -> ParticipantState {
    match p.state {
        PartState::Waiting => ParticipantState::Waiting,
        PartState::Fetching => ParticipantState::Fetching {
            verified: p.verified,
        },
        PartState::Confirmed => ParticipantState::Confirmed,
        PartState::Failed => ParticipantState::Failed(
            p.cause
                .as_deref()
                .and_then(|c| serde_json::from_str::<FailCause>(c).ok())
                .unwrap_or(FailCause::GaveUp),
        ),
    }
}

fn apply_one(tx: &Transaction<'_>, record: &Persist, now: u64) -> Result<()> {
    match record {
        Persist::JobStarted { job, epoch, order } => {
            let changed = tx.execute(
                "UPDATE jobs SET epoch = ?2, state = 'running' WHERE id = ?1",
                params![job, epoch],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("job {job}")));
            }
            for (position, agent) in order.iter().enumerate() {
                tx.execute(
                    "INSERT INTO participants (job, agent, state, updated_at, position)
                     VALUES (?1, ?2, 'waiting', ?3, ?4)
                     ON CONFLICT (job, agent) DO UPDATE SET position = excluded.position",
                    params![job, agent.as_str(), now, position as u32],
                )?;
            }
        }
        Persist::Participant {
            job,
            agent,
            state,
            source_note,
        } => {
            let (state, verified, reason, cause) = participant_columns(state);
            tx.execute(
                "INSERT INTO participants
                    (job, agent, state, verified, updated_at, reason, cause, source)
                 VALUES (?1, ?2, ?3, ifnull(?4, 0), ?5, ?6, ?7, ?8)
                 ON CONFLICT (job, agent) DO UPDATE SET
                    state = excluded.state,
                    verified = ifnull(?4, verified),
                    updated_at = excluded.updated_at,
                    reason = excluded.reason,
                    cause = excluded.cause,
                    source = ifnull(excluded.source, source)",
                params![
                    job,
                    agent.as_str(),
                    state.as_str(),
                    verified,
                    now,
                    reason,
                    cause,
                    source_note
                ],
            )?;
            if state == PartState::Confirmed {
                // A confirmed participant holds every chunk.
                tx.execute(
                    "UPDATE participants SET verified = (
                        SELECT (c.length + c.chunk_size - 1) / c.chunk_size
                        FROM jobs j JOIN content c ON c.root = j.root WHERE j.id = ?1)
                     WHERE job = ?1 AND agent = ?2",
                    params![job, agent.as_str()],
                )?;
                tx.execute(
                    "INSERT OR IGNORE INTO confirmations (job, agent, confirmed_at)
                     VALUES (?1, ?2, ?3)",
                    params![job, agent.as_str(), now],
                )?;
            }
        }
        Persist::Progress { job, updates } => {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO participants (job, agent, state, verified, updated_at)
                 VALUES (?1, ?2, 'fetching', ?3, ?4)
                 ON CONFLICT (job, agent) DO UPDATE SET
                    verified = max(verified, excluded.verified),
                    state = CASE state WHEN 'waiting' THEN 'fetching' ELSE state END,
                    updated_at = excluded.updated_at",
            )?;
            for (agent, verified) in updates {
                stmt.execute(params![job, agent.as_str(), verified, now])?;
            }
        }
        Persist::SourceBytes {
            job,
            agent,
            from,
            bytes,
        } => {
            let from = from.as_ref().map(|f| f.as_str());
            let changed = tx.execute(
                "UPDATE source_bytes SET bytes = bytes + ?4
                 WHERE job = ?1 AND agent = ?2 AND from_agent IS ?3",
                params![job, agent.as_str(), from, bytes],
            )?;
            if changed == 0 {
                tx.execute(
                    "INSERT INTO source_bytes (job, agent, from_agent, bytes) VALUES (?1, ?2, ?3, ?4)",
                    params![job, agent.as_str(), from, bytes],
                )?;
            }
        }
        Persist::JobFinished {
            job,
            confirmed,
            failed,
        } => {
            tx.execute(
                "UPDATE jobs SET
                    state = CASE state WHEN 'cancelled' THEN 'cancelled' ELSE 'finished' END,
                    finished_at = ifnull(finished_at, ?2),
                    confirmed = ?3, failed = ?4
                 WHERE id = ?1",
                params![job, now, confirmed, failed],
            )?;
        }
    }
    Ok(())
}

/// Adds a warning to a job (kept once per text); also for use inside an [`apply`] batch
/// (a `Transaction` derefs to its `Connection`).
///
/// [`apply`]: Store::apply
fn insert_warning(conn: &Connection, job: u64, text: &str, now: u64) -> Result<()> {
    let exists: Option<u64> = conn
        .query_row("SELECT id FROM jobs WHERE id = ?1", [job], |r| r.get(0))
        .optional()?;
    if exists.is_none() {
        return Err(StoreError::NotFound(format!("job {job}")));
    }
    conn.execute(
        "INSERT OR IGNORE INTO job_warnings (job, text, added_at) VALUES (?1, ?2, ?3)",
        params![job, text, now],
    )?;
    Ok(())
}

/// A table of records known by a unique name (content groups, policies): the statements
/// they share, and the word for one record in errors.
#[derive(Debug, Clone, Copy)]
struct NamedTable {
    /// The SQL table.
    table: &'static str,
    /// The columns after `name`, in the order the statements bind them (`?2`, `?3`, ...).
    columns: &'static [&'static str],
    /// What one record is called in `Duplicate` / `NotFound` errors.
    kind: &'static str,
}

/// The content groups: `name, agents, selector`.
const GROUPS: NamedTable = NamedTable {
    table: "content_groups",
    columns: &["agents", "selector"],
    kind: "group",
};

/// The policies: `name, policy`.
const POLICIES: NamedTable = NamedTable {
    table: "policies",
    columns: &["policy"],
    kind: "policy",
};

impl NamedTable {
    /// `?1` is the name, `?2..` the columns, then `now`.
    fn now_param(self) -> usize {
        self.columns.len() + 2
    }

    /// Inserts a new record; binds the name, the columns, then `now`. A taken name is `Duplicate`.
    fn add(self, conn: &Connection, name: &str, values: &[&dyn rusqlite::ToSql]) -> Result<()> {
        let now = self.now_param();
        let sql = format!(
            "INSERT INTO {} (name, {}, created_at, updated_at)
             VALUES ({}, ?{now}, ?{now}) ON CONFLICT (name) DO NOTHING",
            self.table,
            self.columns.join(", "),
            (1..now)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        if conn.execute(&sql, values)? == 0 {
            return Err(StoreError::Duplicate(format!("{} {name:?}", self.kind)));
        }
        Ok(())
    }

    /// Replaces the columns of an existing record; binds as `add`. An unknown name is `NotFound`.
    fn set(self, conn: &Connection, name: &str, values: &[&dyn rusqlite::ToSql]) -> Result<()> {
        let now = self.now_param();
        let sets: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, column)| format!("{column} = ?{}", i + 2))
            .collect();
        let sql = format!(
            "UPDATE {} SET {}, updated_at = ?{now} WHERE name = ?1",
            self.table,
            sets.join(", "),
        );
        if conn.execute(&sql, values)? == 0 {
            return Err(StoreError::NotFound(format!("{} {name:?}", self.kind)));
        }
        Ok(())
    }

    /// Deletes a record. An unknown name is `NotFound`.
    fn remove(self, conn: &Connection, name: &str) -> Result<()> {
        let sql = format!("DELETE FROM {} WHERE name = ?1", self.table);
        if conn.execute(&sql, [name])? == 0 {
            return Err(StoreError::NotFound(format!("{} {name:?}", self.kind)));
        }
        Ok(())
    }

    /// One record: its `SELECT name, columns...` row read by `row`, then decoded by `record`.
    fn one<T, R>(
        self,
        conn: &Connection,
        name: &str,
        row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        record: fn(T) -> Result<R>,
    ) -> Result<Option<R>> {
        let sql = format!("{} WHERE name = ?1", self.select());
        conn.query_row(&sql, [name], row)
            .optional()?
            .map(record)
            .transpose()
    }

    /// Every record by name: rows read by `row`, then decoded by `record`.
    fn all<T, R>(
        self,
        conn: &Connection,
        row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        record: fn(T) -> Result<R>,
    ) -> Result<Vec<R>> {
        let mut stmt = conn.prepare(&format!("{} ORDER BY name", self.select()))?;
        let rows = stmt.query_map([], row)?;
        rows.map(|r| record(r?)).collect()
    }

    /// `SELECT name, columns... FROM table`.
    fn select(self) -> String {
        format!(
            "SELECT name, {} FROM {}",
            self.columns.join(", "),
            self.table
        )
    }
}

/// The `name, agents, selector` columns of a group row.
fn group_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

/// The `name, policy` columns of a policy row.
fn policy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String)> {
    Ok((r.get(0)?, r.get(1)?))
}

fn group_columns(group: &GroupRecord) -> Result<(String, String)> {
    let agents = serde_json::to_string(&group.agents)
        .map_err(|e| StoreError::Corrupt(format!("group agents do not encode: {e}")))?;
    let selector = serde_json::to_string(&group.selector)
        .map_err(|e| StoreError::Corrupt(format!("group selector does not encode: {e}")))?;
    Ok((agents, selector))
}

fn group_record((name, agents, selector): (String, String, String)) -> Result<GroupRecord> {
    Ok(GroupRecord {
        agents: serde_json::from_str(&agents)
            .map_err(|e| StoreError::Corrupt(format!("agents of group {name}: {e}")))?,
        selector: serde_json::from_str(&selector)
            .map_err(|e| StoreError::Corrupt(format!("selector of group {name}: {e}")))?,
        name,
    })
}

fn policy_record((name, policy): (String, String)) -> Result<PolicyRecord> {
    Ok(PolicyRecord {
        policy: serde_json::from_str(&policy)
            .map_err(|e| StoreError::Corrupt(format!("policy {name}: {e}")))?,
        name,
    })
}

impl Store for SqliteStore {
    fn epoch(&self) -> Result<u32> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get::<_, u32>(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    fn next_epoch(&mut self) -> Result<u32> {
        let tx = self.conn.transaction()?;
        let current: u32 = tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        let next = current
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("epoch counter overflow".into()))?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [next],
        )?;
        tx.commit()?;
        Ok(next)
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn enrol(&mut self, id: &str, key: &PublicKey, now: u64) -> Result<Enrolled> {
        let tx = self.conn.transaction()?;
        let done = enrol_in(&tx, id, key, now)?;
        tx.commit()?;
        Ok(done)
    }

    fn add_token(&mut self, hash: &Digest, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO enrolment_tokens (hash, created_at) VALUES (?1, ?2)",
            params![&hash[..], now],
        )?;
        Ok(())
    }

    fn enrol_with_token(
        &mut self,
        hash: &Digest,
        id: &str,
        key: &PublicKey,
        now: u64,
    ) -> Result<Enrolled> {
        let tx = self.conn.transaction()?;
        let used = tx.execute(
            "UPDATE enrolment_tokens SET used_at = ?2, used_by = ?3
             WHERE hash = ?1 AND used_at IS NULL",
            params![&hash[..], now, id],
        )?;
        if used != 1 {
            return Err(StoreError::BadToken);
        }
        let done = enrol_in(&tx, id, key, now)?;
        tx.commit()?;
        Ok(done)
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"),
                [id],
                agent_row,
            )
            .optional()?;
        row.map(agent_record).transpose()
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY id"))?;
        let rows = stmt.query_map([], agent_row)?;
        rows.map(|r| agent_record(r?)).collect()
    }

    fn record_report(&mut self, report: &Report, now: u64) -> Result<()> {
        let json = serde_json::to_string(report)
            .map_err(|e| StoreError::Corrupt(format!("report does not encode: {e}")))?;
        let changed = self.conn.execute(
            "UPDATE agents SET last_seen = ?2, report = ?3, site = ?4, segment = ?5, listen = ?6,
                performance = ?7, up_bps = ?8, down_bps = ?9, free_storage = ?10
             WHERE id = ?1",
            params![
                report.id.as_str(),
                now,
                json,
                report.site.as_str(),
                report.segment.as_str(),
                report.listen.map(|a| a.to_string()),
                report.performance,
                saturate(report.link.up_bps),
                saturate(report.link.down_bps),
                saturate(report.free_storage),
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("agent {}", report.id)));
        }
        Ok(())
    }

    fn mark_seen(&mut self, id: &str, now: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE agents SET last_seen = ?2 WHERE id = ?1",
            params![id, now],
        )?;
        Ok(())
    }

    fn put_content(&mut self, c: &ContentRecord) -> Result<()> {
        self.conn.execute(
            "INSERT INTO content (root, name, version, length, chunk_size, path, manifest, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (root) DO UPDATE SET name = excluded.name, version = excluded.version,
                length = excluded.length, chunk_size = excluded.chunk_size, path = excluded.path,
                manifest = excluded.manifest",
            params![
                &c.root[..],
                c.name,
                c.version,
                c.length,
                c.chunk_size,
                c.path,
                c.manifest,
                c.created_at
            ],
        )?;
        Ok(())
    }

    fn content(&self, root: &Digest) -> Result<Option<ContentRecord>> {
        let row = self
            .conn
            .query_row(
                "SELECT root, name, version, length, chunk_size, path, manifest, created_at
                 FROM content WHERE root = ?1",
                [&root[..]],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                },
            )
            .optional()?;
        row.map(
            |(root, name, version, length, chunk_size, path, manifest, created_at)| {
                Ok(ContentRecord {
                    root: digest_from(root)?,
                    name,
                    version,
                    length,
                    chunk_size,
                    path,
                    manifest,
                    created_at,
                })
            },
        )
        .transpose()
    }

    fn latest_version(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.conn.query_row(
            "SELECT max(version) FROM content WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?)
    }

    fn create_job_from(
        &mut self,
        root: &Digest,
        targets: &TargetSpec,
        origin: &JobOrigin,
        now: u64,
    ) -> Result<u64> {
        let targets = serde_json::to_string(targets)
            .map_err(|e| StoreError::Corrupt(format!("targets do not encode: {e}")))?;
        let policy = origin.policy.as_ref().map(|p| p.to_string());
        self.conn.execute(
            "INSERT INTO jobs (root, state, created_at, targets, group_name, policy_name, policy)
             VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6)",
            params![
                &root[..],
                now,
                targets,
                origin.group,
                origin.policy_name,
                policy
            ],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn add_job_warning(&mut self, job: u64, text: &str, now: u64) -> Result<()> {
        insert_warning(&self.conn, job, text, now)
    }

    fn set_job_state(
        &mut self,
        job: u64,
        state: JobState,
        error: Option<&str>,
        now: u64,
    ) -> Result<()> {
        let finished = state.is_over().then_some(now);
        let changed = self.conn.execute(
            "UPDATE jobs SET state = ?2, error = ifnull(?3, error),
                finished_at = ifnull(finished_at, ?4)
             WHERE id = ?1",
            params![job, state.as_str(), error, finished],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("job {job}")));
        }
        Ok(())
    }

    fn job(&self, job: u64) -> Result<Option<JobRecord>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [job],
                job_row,
            )
            .optional()?;
        row.map(|r| self.job_with_details(job_record(r)?))
            .transpose()
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC"))?;
        let rows = stmt.query_map([], job_row)?;
        rows.map(|r| self.job_with_warnings(job_record(r?)?))
            .collect()
    }

    fn unfinished_jobs(&self) -> Result<Vec<JobRecord>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('pending', 'running') ORDER BY id"
        ))?;
        let rows = stmt.query_map([], job_row)?;
        rows.map(|r| self.job_with_warnings(job_record(r?)?))
            .collect()
    }

    fn participants(&self, job: u64) -> Result<Vec<ParticipantRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT agent, state, verified, updated_at, reason, cause, source, position
             FROM participants WHERE job = ?1
             ORDER BY position IS NULL, position, agent",
        )?;
        let rows = stmt.query_map([job], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })?;
        rows.map(|r| {
            let (agent, state, verified, updated_at, reason, cause, source, position) = r?;
            Ok(ParticipantRecord {
                agent,
                state: PartState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("participant state {state:?}")))?,
                verified,
                updated_at,
                reason,
                cause,
                source,
                position,
            })
        })
        .collect()
    }

    fn source_bytes(&self, job: u64) -> Result<Vec<SourceBytes>> {
        let mut stmt = self.conn.prepare(
            "SELECT agent, from_agent, bytes FROM source_bytes WHERE job = ?1
             ORDER BY agent, from_agent IS NOT NULL, from_agent",
        )?;
        let rows = stmt.query_map([job], |r| {
            Ok(SourceBytes {
                agent: r.get(0)?,
                from: r.get(1)?,
                bytes: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn confirmations(&self, job: u64) -> Result<Vec<Confirmation>> {
        let mut stmt = self.conn.prepare(
            "SELECT agent, confirmed_at FROM confirmations WHERE job = ?1
             ORDER BY confirmed_at, agent",
        )?;
        let rows = stmt.query_map([job], |r| {
            Ok(Confirmation {
                agent: r.get(0)?,
                confirmed_at: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn apply(&mut self, records: &[Persist], now: u64) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for record in records {
            apply_one(&tx, record, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn replace_segment(&mut self, segment: &SegmentRecord) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let previous: Option<String> = tx
            .query_row(
                "SELECT leader FROM segments WHERE name = ?1",
                [&segment.name],
                |r| r.get(0),
            )
            .optional()?;
        tx.execute(
            "INSERT INTO segments (name, leader, term, reported_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET leader = excluded.leader, term = excluded.term,
                reported_at = excluded.reported_at",
            params![
                segment.name,
                segment.leader,
                segment.term,
                saturate(segment.reported_at_ms)
            ],
        )?;
        tx.execute(
            "DELETE FROM segment_members WHERE segment = ?1",
            [&segment.name],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR REPLACE INTO segment_members (segment, id, score, listen, performance,
                    free_storage, can_serve, up_bps, down_bps, loss_ppm, uptime_s, delays,
                    last_heard_ms, known)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            for m in &segment.members {
                let delays = serde_json::to_string(&m.delays)
                    .map_err(|e| StoreError::Corrupt(format!("delays do not encode: {e}")))?;
                insert.execute(params![
                    segment.name,
                    m.id,
                    m.score,
                    m.listen,
                    m.performance,
                    saturate(m.free_storage),
                    m.can_serve,
                    saturate(m.link.up_bps),
                    saturate(m.link.down_bps),
                    m.link.loss_ppm,
                    saturate(m.link.uptime_s),
                    delays,
                    m.last_heard_ms,
                    m.known,
                ])?;
            }
        }
        let changed = previous.as_deref() != Some(segment.leader.as_str());
        if changed {
            tx.execute(
                "INSERT INTO leader_history (segment, leader, term, since_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    segment.name,
                    segment.leader,
                    segment.term,
                    saturate(segment.reported_at_ms)
                ],
            )?;
        }
        tx.commit()?;
        Ok(changed)
    }

    fn segments(&self) -> Result<Vec<SegmentRecord>> {
        let names: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT name FROM segments ORDER BY name")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(s) = self.segment(&name)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn segment(&self, name: &str) -> Result<Option<SegmentRecord>> {
        let head: Option<(String, String, u32, u64)> = self
            .conn
            .query_row(
                "SELECT name, leader, term, reported_at FROM segments WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((name, leader, term, reported_at_ms)) = head else {
            return Ok(None);
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, score, listen, performance, free_storage, can_serve, up_bps, down_bps,
                loss_ppm, uptime_s, delays, last_heard_ms, known
             FROM segment_members WHERE segment = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([&name], |r| {
            Ok((
                MemberRecord {
                    id: r.get(0)?,
                    score: r.get(1)?,
                    listen: r.get(2)?,
                    performance: r.get(3)?,
                    free_storage: r.get(4)?,
                    can_serve: r.get(5)?,
                    link: LinkRecord {
                        up_bps: r.get(6)?,
                        down_bps: r.get(7)?,
                        loss_ppm: r.get(8)?,
                        uptime_s: r.get(9)?,
                    },
                    delays: Vec::new(),
                    last_heard_ms: r.get(11)?,
                    known: r.get(12)?,
                },
                r.get::<_, String>(10)?,
            ))
        })?;
        let mut members = Vec::new();
        for row in rows {
            let (mut member, delays) = row?;
            member.delays = serde_json::from_str(&delays).map_err(|e| {
                StoreError::Corrupt(format!("delays of {} in segment {name}: {e}", member.id))
            })?;
            members.push(member);
        }
        Ok(Some(SegmentRecord {
            name,
            leader,
            term,
            reported_at_ms,
            members,
        }))
    }

    fn leader_history(&self, name: &str) -> Result<Vec<LeaderChange>> {
        let mut stmt = self.conn.prepare(
            "SELECT leader, term, since_ms FROM leader_history WHERE segment = ?1
             ORDER BY since_ms, rowid",
        )?;
        let rows = stmt.query_map([name], |r| {
            Ok(LeaderChange {
                leader: r.get(0)?,
                term: r.get(1)?,
                since_ms: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn add_group(&mut self, group: &GroupRecord, now: u64) -> Result<()> {
        let (agents, selector) = group_columns(group)?;
        GROUPS.add(
            &self.conn,
            &group.name,
            params![group.name, agents, selector, now],
        )
    }

    fn set_group(&mut self, group: &GroupRecord, now: u64) -> Result<()> {
        let (agents, selector) = group_columns(group)?;
        GROUPS.set(
            &self.conn,
            &group.name,
            params![group.name, agents, selector, now],
        )
    }

    fn remove_group(&mut self, name: &str) -> Result<()> {
        GROUPS.remove(&self.conn, name)
    }

    fn group(&self, name: &str) -> Result<Option<GroupRecord>> {
        GROUPS.one(&self.conn, name, group_row, group_record)
    }

    fn groups(&self) -> Result<Vec<GroupRecord>> {
        GROUPS.all(&self.conn, group_row, group_record)
    }

    fn add_policy(&mut self, policy: &PolicyRecord, now: u64) -> Result<()> {
        POLICIES.add(
            &self.conn,
            &policy.name,
            params![policy.name, policy.policy.to_string(), now],
        )
    }

    fn set_policy(&mut self, policy: &PolicyRecord, now: u64) -> Result<()> {
        POLICIES.set(
            &self.conn,
            &policy.name,
            params![policy.name, policy.policy.to_string(), now],
        )
    }

    fn remove_policy(&mut self, name: &str) -> Result<()> {
        POLICIES.remove(&self.conn, name)
    }

    fn policy(&self, name: &str) -> Result<Option<PolicyRecord>> {
        POLICIES.one(&self.conn, name, policy_row, policy_record)
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>> {
        POLICIES.all(&self.conn, policy_row, policy_record)
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::types::{AgentId, LinkInfo};

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

    fn content(root: u8, name: &str, version: u64) -> ContentRecord {
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
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
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

    #[test]
    fn enrolment_is_idempotent_and_conflicts_are_refused() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn tokens_are_one_time_and_atomic() {
        let mut s = SqliteStore::in_memory().unwrap();
        let hash = [7; 32];
        s.add_token(&hash, 1).unwrap();
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
            Err(StoreError::BadToken)
        ));
        assert!(s.agent("y").unwrap().is_none());
    }

    #[test]
    fn reports_update_main_columns() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn content_versions_by_name() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn engine_records_apply_in_one_transaction() {
        let mut s = SqliteStore::in_memory().unwrap();
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
            ],
            2,
        )
        .unwrap();
        let j = s.job(job).unwrap().unwrap();
        assert_eq!((j.state, j.epoch), (JobState::Running, Some(3)));
        let p = s.participants(job).unwrap();
        assert_eq!(p.len(), 2);
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

    #[test]
    fn a_failing_batch_changes_nothing() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn jobs_list_states_and_unfinished() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn segment_reports_replace_the_view_and_record_leader_changes() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn groups_and_policies_are_named_and_unique() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn jobs_keep_group_policy_warnings_and_transfers() {
        let mut s = SqliteStore::in_memory().unwrap();
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

    #[test]
    fn meta_round_trips() {
        let mut s = SqliteStore::in_memory().unwrap();
        assert_eq!(s.meta("k").unwrap(), None);
        s.set_meta("k", b"v1").unwrap();
        s.set_meta("k", b"v2").unwrap();
        assert_eq!(s.meta("k").unwrap().as_deref(), Some(&b"v2"[..]));
    }
}
