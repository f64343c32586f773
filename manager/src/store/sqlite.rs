//! [`SqliteStore`]: the [`Store`] on one SQLite file in WAL mode (readers do
//! not block the writer, so `baton admin` can write beside a running manager).
//!
//! The database file and its `-wal` and `-shm` companions are owner-only
//! (0600): the file is created so before SQLite opens it (SQLite gives the
//! companions the database's mode), and one left open to others by an older
//! build is tightened, with a warning.
//!
//! Opening a file migrates it to [`SCHEMA_VERSION`] ([`super::schema`]). Rows
//! are read raw and converted after the query, so a value this build cannot
//! read back is [`StoreError::Corrupt`] rather than a panic.

use std::path::Path;

use baton_agent_core::linux::datadir::{self, DataDirError};
use baton_protocol::message::{MAX_RUNNING, Report};
use baton_protocol::types::{Digest, PublicKey};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::schema::migrate;
use super::*;
use baton_manager_core::engine::{ParticipantState, Persist};

/// The SQLite backend: one database file in WAL mode.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating it owner-only if needed) the database at `path` and migrates it to
    /// [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Self> {
        make_private(path)?;
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

    /// The open connection (`baton db copy` reads every table through it).
    pub(super) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }
}

/// Creates the database file at `path` with mode 0600 if it is absent (SQLite then creates
/// its `-wal` and `-shm` files with the same mode), and takes group and other permissions
/// off the file and its companions if an older build left them open.
fn make_private(path: &Path) -> Result<()> {
    let created = datadir::open_private(
        std::fs::OpenOptions::new().write(true).create(true),
        path,
        datadir::Existing::Keep,
    );
    if let Err(source) = created {
        return Err(StoreError::File(DataDirError::Io {
            path: path.to_path_buf(),
            source,
        }));
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        datadir::tighten(Path::new(&companion))?;
    }
    Ok(())
}

/// A `u64` as SQLite's signed 64-bit integer; values past `i64::MAX` ("unlimited") saturate.
/// Records an agent's latest report and that it was seen `now` (see [`Store::record_report`]).
fn record_report_in(conn: &Connection, report: &Report, now: u64) -> Result<()> {
    let json = serde_json::to_string(report)
        .map_err(|e| StoreError::Corrupt(format!("report does not encode: {e}")))?;
    let changed = conn
        .prepare_cached(
            "UPDATE agents SET last_seen = ?2, report = ?3, site = ?4, segment = ?5, listen = ?6,
                performance = ?7, up_bps = ?8, down_bps = ?9, free_storage = ?10
             WHERE id = ?1",
        )?
        .execute(params![
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
        ])?;
    if changed == 0 {
        return Err(StoreError::NotFound(format!("agent {}", report.id)));
    }
    Ok(())
}

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
     performance, up_bps, down_bps, free_storage, placed_segment, election_score";

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
    Option<String>,
    Option<u32>,
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
        r.get(12)?,
        r.get(13)?,
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
        placed_segment,
        election_score,
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
        placed_segment,
        election_score,
    })
}

const JOB_COLUMNS: &str = "id, root, epoch, state, created_at, finished_at, targets, confirmed, \
     failed, error, group_name, policy_name, policy, rollout";

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
        rollout: r.get(13)?,
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
    rollout: Option<String>,
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
    let rollout = row
        .rollout
        .map(|json| {
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("rollout of job {id}: {e}")))
        })
        .transpose()?;
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
        rollout,
        warnings: Vec::new(),
        transfers: Vec::new(),
    })
}

/// Labels as stored (a JSON object), `None` when there are none.
fn labels_json(labels: &BTreeMap<String, String>) -> Option<String> {
    (!labels.is_empty()).then(|| serde_json::to_string(labels).expect("a map of strings"))
}

/// Stored labels read back (`None`: none).
fn parse_labels(text: Option<&str>) -> Result<BTreeMap<String, String>> {
    text.map(|t| {
        serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("labels {t:?}: {e}")))
    })
    .transpose()
    .map(Option::unwrap_or_default)
}

fn enrol_in(tx: &Transaction<'_>, id: &str, key: &PublicKey, now: u64) -> Result<Enrolled> {
    let existing: Option<(Vec<u8>, Option<u64>)> = tx
        .query_row(
            "SELECT key, revoked_at FROM agents WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match existing {
        // Enrolling a revoked id again (with any key) starts it afresh: its later
        // certificates have higher serials, which the revocation does not cover.
        Some((_, Some(_))) => {
            tx.execute(
                "UPDATE agents SET key = ?2, enrolled_at = ?3, revoked_at = NULL,
                        placed_segment = NULL, election_score = NULL, bound_labels = NULL
                 WHERE id = ?1",
                params![id, &key.0[..], now],
            )?;
            Ok(Enrolled::New)
        }
        Some((k, None)) if k == key.0 => Ok(Enrolled::Unchanged),
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
        Persist::MeasuredUpload { job, rates } => {
            let mut stmt = tx.prepare_cached(
                "UPDATE participants SET measured_up_bps = ?3 WHERE job = ?1 AND agent = ?2",
            )?;
            for (agent, up) in rates {
                stmt.execute(params![job, agent.as_str(), up])?;
            }
        }
        Persist::Install {
            job,
            agent,
            state,
            exit_code,
            output,
        } => {
            let output = (!output.is_empty()).then_some(output.as_str());
            tx.execute(
                "UPDATE participants SET install_state = ?3, install_exit_code = ?4,
                    install_output = ?5, install_at = ?6, updated_at = ?6
                 WHERE job = ?1 AND agent = ?2",
                params![
                    job,
                    agent.as_str(),
                    InstallPhase::of(*state).as_str(),
                    exit_code,
                    output,
                    now
                ],
            )?;
        }
        Persist::Running {
            agent,
            versions,
            whole,
        } => {
            // Within the batch's transaction: the agent's rows never exceed `MAX_RUNNING`.
            if *whole {
                tx.execute(
                    "DELETE FROM agent_versions WHERE agent = ?1",
                    [agent.as_str()],
                )?;
            }
            let mut stmt = tx.prepare_cached(
                "INSERT INTO agent_versions (agent, name, version, updated_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (agent, name) DO UPDATE SET
                    version = excluded.version, updated_at = excluded.updated_at",
            )?;
            for (name, version) in versions.iter().take(MAX_RUNNING) {
                stmt.execute(params![agent.as_str(), name, version, now])?;
            }
            if !*whole {
                // Only the newest per agent (this name's row is among them: just written).
                tx.execute(
                    "DELETE FROM agent_versions WHERE agent = ?1 AND name NOT IN
                       (SELECT name FROM agent_versions WHERE agent = ?1
                        ORDER BY updated_at DESC, name = ?3 DESC LIMIT ?2)",
                    params![
                        agent.as_str(),
                        MAX_RUNNING as i64,
                        versions.first().map(|v| v.0.as_str()).unwrap_or("")
                    ],
                )?;
            }
        }
        Persist::Rollout { job, state } => {
            let json = serde_json::to_string(state).expect("a rollout state encodes");
            tx.execute(
                "UPDATE jobs SET rollout = ?2 WHERE id = ?1",
                params![job, json],
            )?;
            if state.aborted.is_some() {
                tx.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ifnull(finished_at, ?2)
                     WHERE id = ?1 AND state IN ('pending', 'running')",
                    params![job, now],
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

/// A stored role; a value this build does not know (written by a newer one) counts as
/// the weakest role, `read`, rather than failing every request.
fn stored_role(text: &str) -> Role {
    text.parse().unwrap_or(Role::Read)
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

    fn add_token(&mut self, hash: &Digest, token: &NewToken, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO enrolment_tokens (hash, created_at, expires_at, bound_id, labels)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &hash[..],
                now,
                token.expires_at,
                token.bound_id,
                labels_json(&token.labels)
            ],
        )?;
        Ok(())
    }

    fn tokens(&self, now: u64) -> Result<Vec<TokenRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT hash, created_at, expires_at, bound_id, used_at, used_by, revoked_at, labels
             FROM enrolment_tokens ORDER BY created_at DESC, hash",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, Option<u64>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<u64>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<u64>>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, created_at, expires_at, bound_id, used_at, used_by, revoked_at, labels) =
                row?;
            let hash: Digest = hash
                .try_into()
                .map_err(|_| StoreError::Corrupt("enrolment token digest".into()))?;
            let expires_at = expires_at.unwrap_or(created_at + DEFAULT_TOKEN_LIFETIME);
            let state = if used_at.is_some() {
                "used"
            } else if revoked_at.is_some() {
                "revoked"
            } else if now >= expires_at {
                "expired"
            } else {
                "unused"
            };
            out.push(TokenRecord {
                id: token_id(&hash),
                created_at,
                expires_at,
                bound_id,
                labels: parse_labels(labels.as_deref())?,
                state,
                used_by,
                used_at,
                revoked_at,
            });
        }
        Ok(out)
    }

    fn revoke_token(&mut self, id: &str, now: u64) -> Result<bool> {
        if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(false);
        }
        let n = self.conn.execute(
            "UPDATE enrolment_tokens SET revoked_at = ?2
             WHERE substr(hex(hash), 1, 12) = upper(?1) AND used_at IS NULL AND revoked_at IS NULL",
            params![id, now],
        )?;
        Ok(n > 0)
    }

    fn enrol_with_token(
        &mut self,
        hash: &Digest,
        id: &str,
        key: &PublicKey,
        now: u64,
    ) -> Result<Enrolled> {
        let tx = self.conn.transaction()?;
        let row = tx
            .query_row(
                "SELECT created_at, expires_at, bound_id, used_by, revoked_at, used_at, labels
                 FROM enrolment_tokens WHERE hash = ?1",
                params![&hash[..]],
                |r| {
                    Ok((
                        r.get::<_, u64>(0)?,
                        r.get::<_, Option<u64>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<u64>>(4)?,
                        r.get::<_, Option<u64>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((created_at, expires_at, bound_id, used_by, revoked_at, used_at, labels)) = row
        else {
            return Err(StoreError::BadToken);
        };
        if used_at.is_some() {
            return Err(StoreError::TokenUsed(used_by.unwrap_or_default()));
        }
        if revoked_at.is_some() {
            return Err(StoreError::TokenRevoked);
        }
        let expires_at = expires_at.unwrap_or(created_at + DEFAULT_TOKEN_LIFETIME);
        if now >= expires_at {
            return Err(StoreError::TokenExpired(expires_at));
        }
        if let Some(bound) = bound_id.filter(|b| b != id) {
            return Err(StoreError::TokenBoundElsewhere(bound));
        }
        tx.execute(
            "UPDATE enrolment_tokens SET used_at = ?2, used_by = ?3 WHERE hash = ?1",
            params![&hash[..], now, id],
        )?;
        let done = enrol_in(&tx, id, key, now)?;
        if labels.is_some() {
            tx.execute(
                "UPDATE agents SET bound_labels = ?2 WHERE id = ?1",
                params![id, labels],
            )?;
        }
        tx.commit()?;
        Ok(done)
    }

    fn bound_labels(&self) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, bound_labels FROM agents WHERE bound_labels IS NOT NULL ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, labels) = row?;
            out.push((id, parse_labels(Some(&labels))?));
        }
        Ok(out)
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1 AND revoked_at IS NULL"),
                [id],
                agent_row,
            )
            .optional()?;
        row.map(agent_record).transpose()
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE revoked_at IS NULL ORDER BY id"
        ))?;
        let rows = stmt.query_map([], agent_row)?;
        rows.map(|r| agent_record(r?)).collect()
    }

    fn record_report(&mut self, report: &Report, now: u64) -> Result<()> {
        record_report_in(&self.conn, report, now)
    }

    fn record_reports(
        &mut self,
        reports: &[Report],
        seen: &[AgentId],
        now: u64,
    ) -> Result<Vec<StoreError>> {
        let tx = self.conn.transaction()?;
        let mut refused = Vec::new();
        for report in reports {
            match record_report_in(&tx, report, now) {
                Ok(()) => {}
                Err(e @ StoreError::NotFound(_)) => refused.push(e),
                Err(e) => return Err(e),
            }
        }
        for id in seen {
            tx.prepare_cached("UPDATE agents SET last_seen = ?2 WHERE id = ?1")?
                .execute(params![id.as_str(), now])?;
        }
        tx.commit()?;
        Ok(refused)
    }

    fn place_agent(&mut self, id: &str, segment: Option<&str>, score: Option<u32>) -> Result<()> {
        let changed = self.conn.execute(
            "UPDATE agents SET placed_segment = COALESCE(?2, placed_segment),
                election_score = COALESCE(?3, election_score)
             WHERE id = ?1",
            params![id, segment, score],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("agent {id}")));
        }
        Ok(())
    }

    fn place_at_enrolment(&mut self, id: &str, segment: &str, score: u32) -> Result<bool> {
        let changed = self.conn.execute(
            "UPDATE agents SET placed_segment = ?2,
                election_score = COALESCE(election_score, ?3)
             WHERE id = ?1 AND placed_segment IS NULL",
            params![id, segment, score],
        )?;
        Ok(changed > 0)
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

    fn add_trust(&mut self, version: u64, document: &[u8], now: u64, keep: usize) -> Result<()> {
        let tx = self.conn.transaction()?;
        let newest: Option<i64> =
            tx.query_row("SELECT max(version) FROM trust_documents", [], |r| r.get(0))?;
        if newest.is_some_and(|v| v >= saturate(version)) {
            return Err(StoreError::Duplicate(format!(
                "trust document version {version} or a newer one"
            )));
        }
        tx.execute(
            "INSERT INTO trust_documents (version, document, added_at) VALUES (?1, ?2, ?3)",
            params![saturate(version), document, saturate(now)],
        )?;
        tx.execute(
            "DELETE FROM trust_documents WHERE version NOT IN
             (SELECT version FROM trust_documents ORDER BY version DESC LIMIT ?1)",
            [keep as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn trust_chain(&self) -> Result<Vec<Vec<u8>>> {
        let mut stmt = self
            .conn
            .prepare("SELECT document FROM trust_documents ORDER BY version")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
            "SELECT agent, state, verified, updated_at, reason, cause, source, position,
                    measured_up_bps, install_state, install_exit_code, install_output, install_at
             FROM participants WHERE job = ?1
             ORDER BY position IS NULL, position, agent",
        )?;
        let rows = stmt.query_map([job], |r| {
            let install: Option<String> = r.get(9)?;
            let install = match install {
                None => None,
                Some(s) => Some((
                    s,
                    r.get::<_, Option<i32>>(10)?,
                    r.get::<_, Option<String>>(11)?,
                    r.get::<_, Option<u64>>(12)?,
                )),
            };
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ),
                (r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?),
                install,
            ))
        })?;
        rows.map(|r| {
            let (
                (agent, state, verified, updated_at, reason),
                (cause, source, position, measured),
                install,
            ) = r?;
            let install = match install {
                None => None,
                Some((phase, exit_code, output, at)) => Some(InstallRecord {
                    state: InstallPhase::parse(&phase)
                        .ok_or_else(|| StoreError::Corrupt(format!("install state {phase:?}")))?,
                    exit_code,
                    output,
                    at: at.unwrap_or(updated_at),
                }),
            };
            Ok(ParticipantRecord {
                install,
                agent,
                state: PartState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("participant state {state:?}")))?,
                verified,
                updated_at,
                reason,
                cause,
                source,
                position,
                measured_up_bps: measured,
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

    fn set_admin(
        &mut self,
        name: &str,
        password_hash: &str,
        role: Option<Role>,
        now: u64,
    ) -> Result<AdminSet> {
        let tx = self.conn.transaction()?;
        let changed = tx.execute(
            "UPDATE admin_users SET password_hash = ?2, updated_at = ?3, role = COALESCE(?4, role)
             WHERE name = ?1",
            params![name, password_hash, saturate(now), role.map(Role::as_str)],
        )?;
        let done = if changed > 0 {
            // A new password ends the sessions signed in with the old one.
            tx.execute("DELETE FROM web_sessions WHERE admin = ?1", [name])?;
            AdminSet::PasswordChanged
        } else {
            tx.execute(
                "INSERT INTO admin_users (name, password_hash, created_at, updated_at, role)
                 VALUES (?1, ?2, ?3, ?3, ?4)",
                params![
                    name,
                    password_hash,
                    saturate(now),
                    role.unwrap_or(Role::Admin).as_str()
                ],
            )?;
            AdminSet::Added
        };
        tx.commit()?;
        Ok(done)
    }

    fn admin_role(&self, name: &str) -> Result<Option<Role>> {
        let role: Option<String> = self
            .conn
            .query_row(
                "SELECT role FROM admin_users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(role.map(|r| stored_role(&r)))
    }

    fn admin_hash(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT password_hash FROM admin_users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn admins(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM admin_users ORDER BY name")?;
        let names = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(names)
    }

    fn new_api_token(&mut self, name: &str, hash: &Digest, role: Role, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO api_tokens (name, hash, created_at, role) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET hash = excluded.hash, created_at = excluded.created_at,
                 role = excluded.role",
            params![name, &hash[..], saturate(now), role.as_str()],
        )?;
        Ok(())
    }

    fn api_token(&self, hash: &Digest) -> Result<Option<(String, Role)>> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT name, role FROM api_tokens WHERE hash = ?1",
                [&hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(name, role)| (name, stored_role(&role))))
    }

    fn revoke_api_token(&mut self, name: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM api_tokens WHERE name = ?1", [name])?
            > 0)
    }

    fn create_session(&mut self, session: &SessionRecord, password_hash: &str) -> Result<bool> {
        // One statement: the check and the insert cannot be split by a password change,
        // whichever process makes it.
        let stored = self.conn.execute(
            "INSERT INTO web_sessions (id_hash, admin, csrf, created_at, last_used)
             SELECT ?1, ?2, ?3, ?4, ?5
             WHERE EXISTS (SELECT 1 FROM admin_users WHERE name = ?2 AND password_hash = ?6)",
            params![
                &session.id_hash[..],
                session.admin,
                session.csrf,
                saturate(session.created_at),
                saturate(session.last_used),
                password_hash
            ],
        )?;
        Ok(stored > 0)
    }

    fn session(&self, id_hash: &Digest) -> Result<Option<SessionRecord>> {
        let row: Option<(Vec<u8>, String, String, u64, u64)> = self
            .conn
            .query_row(
                "SELECT id_hash, admin, csrf, created_at, last_used
                 FROM web_sessions WHERE id_hash = ?1",
                [&id_hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        row.map(|(id_hash, admin, csrf, created_at, last_used)| {
            Ok(SessionRecord {
                id_hash: id_hash
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("session id hash is not 32 bytes".into()))?,
                admin,
                csrf,
                created_at,
                last_used,
            })
        })
        .transpose()
    }

    fn touch_session(&mut self, id_hash: &Digest, now: u64) -> Result<bool> {
        Ok(self.conn.execute(
            "UPDATE web_sessions SET last_used = ?2 WHERE id_hash = ?1",
            params![&id_hash[..], saturate(now)],
        )? > 0)
    }

    fn delete_session(&mut self, id_hash: &Digest) -> Result<bool> {
        Ok(self.conn.execute(
            "DELETE FROM web_sessions WHERE id_hash = ?1",
            [&id_hash[..]],
        )? > 0)
    }

    fn expire_sessions(&mut self, idle_since: u64, keep: usize) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let idle = tx.execute(
            "DELETE FROM web_sessions WHERE last_used <= ?1",
            [saturate(idle_since)],
        )?;
        let beyond = tx.execute(
            "DELETE FROM web_sessions WHERE id_hash NOT IN (
                SELECT id_hash FROM web_sessions
                ORDER BY last_used DESC, created_at DESC, id_hash LIMIT ?1)",
            [saturate(keep as u64)],
        )?;
        tx.commit()?;
        Ok((idle + beyond) as u64)
    }

    fn add_audit(&mut self, e: &AuditEntry, keep: u64) -> Result<u64> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO audit_log (at, via, who, address, action, target, result, status, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                saturate(e.at),
                truncate_text(&e.via, AUDIT_MAX_TEXT),
                truncate_text(&e.who, AUDIT_MAX_TEXT),
                truncate_text(&e.address, AUDIT_MAX_TEXT),
                truncate_text(&e.action, AUDIT_MAX_TEXT),
                truncate_text(&e.target, AUDIT_MAX_TEXT),
                truncate_text(&e.result, AUDIT_MAX_TEXT),
                e.status,
                e.error.as_deref().map(|t| truncate_text(t, AUDIT_MAX_TEXT)),
            ],
        )?;
        let id = tx.last_insert_rowid();
        // Ids only grow, so the newest `keep` are those above `id - keep`.
        tx.execute(
            "DELETE FROM audit_log WHERE id <= ?1",
            [id.saturating_sub(saturate(keep))],
        )?;
        tx.commit()?;
        Ok(u64::try_from(id).unwrap_or(0))
    }

    fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at, via, who, address, action, target, result, status, error
             FROM audit_log WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(
                params![before.map_or(i64::MAX, saturate), saturate(limit as u64)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        (
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                        ),
                        r.get::<_, Option<i64>>(8)?,
                        r.get::<_, Option<String>>(9)?,
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(
                |(id, at, (via, who, address, action, target, result), status, error)| {
                    Ok(AuditEntry {
                        id: u64::try_from(id)
                            .map_err(|_| StoreError::Corrupt(format!("audit id {id}")))?,
                        at: u64::try_from(at).unwrap_or(0),
                        via,
                        who,
                        address,
                        action,
                        target,
                        result,
                        status: status.and_then(|s| u16::try_from(s).ok()),
                        error,
                    })
                },
            )
            .collect()
    }

    fn running_versions(&self, agent: Option<&str>) -> Result<Vec<RunningRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT agent, name, version, updated_at FROM agent_versions
             WHERE ?1 IS NULL OR agent = ?1 ORDER BY agent, name",
        )?;
        let rows = stmt.query_map([agent], |r| {
            Ok(RunningRecord {
                agent: r.get(0)?,
                name: r.get(1)?,
                version: r.get(2)?,
                updated_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn totals(&self) -> Result<StoreTotals> {
        let mut stmt = self
            .conn
            .prepare("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")?;
        let jobs_by_state = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .map(|r| r.map(|(state, n)| (state, u64::try_from(n).unwrap_or(0))))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let (from_manager, from_relays): (i64, i64) = self.conn.query_row(
            "SELECT ifnull(sum(CASE WHEN from_agent IS NULL THEN bytes END), 0),
                    ifnull(sum(CASE WHEN from_agent IS NOT NULL THEN bytes END), 0)
             FROM source_bytes",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut stmt = self.conn.prepare(
            "SELECT install_state, count(*) FROM participants
             WHERE install_state IS NOT NULL GROUP BY install_state ORDER BY install_state",
        )?;
        let installs_by_state = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .map(|r| r.map(|(state, n)| (state, u64::try_from(n).unwrap_or(0))))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(StoreTotals {
            installs_by_state,
            jobs_by_state,
            bytes_from_manager: u64::try_from(from_manager).unwrap_or(0),
            bytes_from_relays: u64::try_from(from_relays).unwrap_or(0),
        })
    }

    fn next_cert_serial(&mut self, id: &str, not_after: u64) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let serial: i64 = tx.query_row(
            "UPDATE counters SET value = value + 1 WHERE name = 'cert_serial' RETURNING value",
            [],
            |r| r.get(0),
        )?;
        let updated = tx.execute(
            "UPDATE agents SET last_serial = ?2, cert_not_after = ?3
             WHERE id = ?1 AND revoked_at IS NULL",
            params![id, serial, not_after],
        )?;
        if updated == 0 {
            return Err(StoreError::NotFound(format!("agent {id}")));
        }
        tx.commit()?;
        u64::try_from(serial).map_err(|_| StoreError::Corrupt(format!("serial {serial}")))
    }

    fn revoke_agent(&mut self, id: &str, now: u64) -> Result<Option<RevocationRecord>> {
        let tx = self.conn.transaction()?;
        let row: Option<(Option<u64>, Option<u64>, Option<u64>)> = tx
            .query_row(
                "SELECT last_serial, cert_not_after, revoked_at FROM agents WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((last_serial, not_after, revoked_at)) = row else {
            return Ok(None);
        };
        let record = match revoked_at {
            Some(at) => tx
                .query_row(
                    "SELECT up_to_serial, expires_at, revoked_at FROM revocations WHERE id = ?1",
                    [id],
                    |r| {
                        Ok(RevocationRecord {
                            id: id.to_string(),
                            up_to_serial: r.get(0)?,
                            expires_at: r.get(1)?,
                            revoked_at: r.get(2)?,
                        })
                    },
                )
                .optional()?
                .unwrap_or(RevocationRecord {
                    id: id.to_string(),
                    up_to_serial: last_serial.unwrap_or(0),
                    expires_at: 0,
                    revoked_at: at,
                }),
            None => {
                let record = RevocationRecord {
                    id: id.to_string(),
                    up_to_serial: last_serial.unwrap_or(0),
                    expires_at: not_after.unwrap_or(0),
                    revoked_at: now,
                };
                tx.execute(
                    "UPDATE agents SET revoked_at = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
                if record.up_to_serial > 0 {
                    tx.execute(
                        "INSERT INTO revocations (id, up_to_serial, expires_at, revoked_at)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (id) DO UPDATE SET up_to_serial = excluded.up_to_serial,
                             expires_at = excluded.expires_at, revoked_at = excluded.revoked_at",
                        params![id, record.up_to_serial, record.expires_at, now],
                    )?;
                }
                record
            }
        };
        tx.commit()?;
        Ok(Some(record))
    }

    fn revoked_agents(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM agents WHERE revoked_at IS NOT NULL ORDER BY id")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(ids)
    }

    fn live_revocations(&mut self, now: u64) -> Result<Vec<RevocationRecord>> {
        // A certificate without an expiry (0) never expires: its entry stays.
        self.conn.execute(
            "DELETE FROM revocations WHERE expires_at != 0 AND expires_at <= ?1",
            [now],
        )?;
        let mut stmt = self.conn.prepare(
            "SELECT id, up_to_serial, expires_at, revoked_at FROM revocations
             ORDER BY expires_at = 0 DESC, expires_at DESC, id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RevocationRecord {
                    id: r.get(0)?,
                    up_to_serial: r.get(1)?,
                    expires_at: r.get(2)?,
                    revoked_at: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn next_revocation_version(&mut self) -> Result<u64> {
        let v: i64 = self.conn.query_row(
            "UPDATE counters SET value = value + 1 WHERE name = 'revocation_list' RETURNING value",
            [],
            |r| r.get(0),
        )?;
        u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("revocation version {v}")))
    }
}
