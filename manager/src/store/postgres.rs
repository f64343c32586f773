//! [`PostgresStore`]: the [`Store`] on a PostgreSQL database, for an operator
//! who wants the manager's state in a database they already run, back up and
//! replicate (`baton serve --db postgres://…`).
//!
//! It keeps the same tables as [`super::SqliteStore`] (the one migration list,
//! translated: [`super::schema::postgres_migration`]) and answers every call the
//! same way; the store test suite runs on both. Integers are `BIGINT`; a `u64`
//! beyond `i64::MAX` is saturated where SQLite's store saturates and refused
//! ([`StoreError::TooLarge`]) where SQLite's refuses. The `epoch` entry of
//! `meta` is kept as decimal text. The connection pool and why the synchronous
//! calls are safe from async code: [`super::pg`].
//!
//! The password never comes from the URL (a command line is visible to every
//! user of the host): [`PostgresStore::connect`] refuses a URL that carries one
//! and takes it as a separate argument (read by `baton serve` from
//! `--db-password-file`, `BATON_DB_PASSWORD` or `PGPASSWORD`).

use std::str::FromStr;

use baton_protocol::message::{MAX_RUNNING, Report};
use baton_protocol::types::{Digest, PublicKey};
use tokio_postgres::Row;

use super::fence::LeaseFence;
use super::pg::{Conn, Params, Pool};
use super::schema::{SCHEMA_VERSION, postgres_migration};
use super::*;
use baton_manager_core::engine::{ParticipantState, Persist};

/// Whether `db` names a PostgreSQL database rather than a SQLite file: a
/// `postgres://` or `postgresql://` URL, or a `key=value` connection string with a
/// `host=` or `dbname=` key (`host=/run/postgresql dbname=baton`).
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://")
        || db.starts_with("postgresql://")
        || db
            .split_whitespace()
            .any(|kv| kv.starts_with("host=") || kv.starts_with("dbname="))
}

/// The environment variable holding the PostgreSQL password (when no file is given).
pub const PASSWORD_VAR: &str = "BATON_DB_PASSWORD";

/// The PostgreSQL password: the first line of `file` when one is given, else the
/// environment's `BATON_DB_PASSWORD`, else libpq's `PGPASSWORD`; `None` when there is
/// none (the server may not ask for one: a trusted or peer-authenticated socket).
pub fn read_password(file: Option<&std::path::Path>) -> Result<Option<String>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            StoreError::BadUrl(format!("database password file {}: {e}", path.display()))
        })?;
        return Ok(Some(text.lines().next().unwrap_or("").to_string()));
    }
    Ok([PASSWORD_VAR, "PGPASSWORD"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|p| !p.is_empty())))
}

/// The PostgreSQL backend: a small pool of connections to one database.
#[derive(Debug)]
pub struct PostgresStore {
    pool: Pool,
    /// Set when managers share the database: the engine's records, job states, new jobs,
    /// enrolments, agent revocations and trust documents (what a manager taking over loads
    /// into its caches) are written only while this manager holds the lease ([`LeaseFence`]).
    fence: Option<std::sync::Arc<LeaseFence>>,
}

/// Advisory lock key held while migrating (two managers starting at once migrate once).
const MIGRATION_LOCK: i64 = 0x6261_746f_6e5f_6d69;

impl PostgresStore {
    /// Connects to the database `url` names (see [`is_postgres_url`]) with `password`
    /// (none: the server's own rules, e.g. peer or trust authentication on a unix
    /// socket), and migrates it to [`SCHEMA_VERSION`]. A URL carrying a password is
    /// refused.
    pub fn connect(url: &str, password: Option<&str>) -> Result<Self> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{}: {e}", redact(url))))?;
        if config.get_password().is_some() {
            return Err(StoreError::BadUrl(
                "the database URL carries a password; give it with --db-password-file or \
                 the BATON_DB_PASSWORD environment variable instead"
                    .into(),
            ));
        }
        if let Some(password) = password {
            config.password(password);
        }
        let store = PostgresStore {
            pool: Pool::open(config)?,
            fence: None,
        };
        store.migrate()?;
        Ok(store)
    }

    /// From now on, writes that matter (the engine's records, job states, new jobs) are made
    /// only while `fence`'s holder holds the lease, checked in their transaction.
    pub fn fence_writes(&mut self, fence: std::sync::Arc<LeaseFence>) {
        self.fence = Some(fence);
    }

    /// Checks, inside `tx`, that this manager holds the lease (if it is fenced), and keeps a
    /// takeover from committing until `tx` ends.
    fn check_fence(&self, tx: &Conn<'_>) -> Result<()> {
        match &self.fence {
            Some(fence) => fence.check(tx),
            None => Ok(()),
        }
    }

    /// One connection for one call.
    pub(super) fn conn(&self) -> Result<Conn<'_>> {
        self.pool.get()
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<u32> {
        let row = self
            .conn()?
            .one("SELECT version FROM schema_version", &[])?;
        u32_at(&row, 0)
    }

    /// Applies every migration the database has not seen, each in its own transaction,
    /// holding an advisory lock so that two processes starting at once do not both.
    fn migrate(&self) -> Result<()> {
        let mut conn = self.conn()?;
        conn.exec("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
        let done = migrate_locked(&mut conn);
        let unlocked = conn.exec("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
        done.and(unlocked.map(drop))
    }

    /// A job record with its warnings filled in.
    fn job_with_warnings(&self, conn: &Conn<'_>, mut job: JobRecord) -> Result<JobRecord> {
        job.warnings = conn
            .query(
                "SELECT text FROM job_warnings WHERE job = $1 ORDER BY added_at, rowid",
                &[&int(job.id)?],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect::<Result<_>>()?;
        Ok(job)
    }
}

fn migrate_locked(conn: &mut Conn<'_>) -> Result<()> {
    conn.batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);
         INSERT INTO schema_version (version)
            SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM schema_version);",
    )?;
    let found = u32_at(&conn.one("SELECT version FROM schema_version", &[])?, 0)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for version in found + 1..=SCHEMA_VERSION {
        let tx = conn.begin()?;
        tx.batch(&postgres_migration(version))?;
        tx.exec(
            "UPDATE schema_version SET version = $1",
            &[&i64::from(version)],
        )?;
        tx.commit()?;
        tracing::info!(version, "database schema migrated (PostgreSQL)");
    }
    Ok(())
}

/// `url` with any password replaced by `***`, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ if url.contains("password=") => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => url.to_string(),
    }
}

/// A `u64` as PostgreSQL's `BIGINT`; beyond `i64::MAX` it is refused (as SQLite's store does).
fn int(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::TooLarge(v))
}

/// A `u64` as `BIGINT`; values past `i64::MAX` ("unlimited") saturate.
fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An optional `u64` as `BIGINT` ([`int`]).
fn opt_int(v: Option<u64>) -> Result<Option<i64>> {
    v.map(int).transpose()
}

/// Column `i` read as an unsigned value.
fn u64_at(r: &Row, i: usize) -> Result<u64> {
    let v: i64 = r.try_get(i)?;
    u64::try_from(v).map_err(|_| corrupt_int(r, i, v))
}

/// Column `i` read as an optional unsigned value.
fn opt_u64_at(r: &Row, i: usize) -> Result<Option<u64>> {
    let v: Option<i64> = r.try_get(i)?;
    v.map(|v| u64::try_from(v).map_err(|_| corrupt_int(r, i, v)))
        .transpose()
}

/// Column `i` read as a `u32`.
fn u32_at(r: &Row, i: usize) -> Result<u32> {
    let v: i64 = r.try_get(i)?;
    u32::try_from(v).map_err(|_| corrupt_int(r, i, v))
}

/// Column `i` read as an optional `u32`.
fn opt_u32_at(r: &Row, i: usize) -> Result<Option<u32>> {
    let v: Option<i64> = r.try_get(i)?;
    v.map(|v| u32::try_from(v).map_err(|_| corrupt_int(r, i, v)))
        .transpose()
}

fn corrupt_int(r: &Row, i: usize, v: i64) -> StoreError {
    StoreError::Corrupt(format!("{} = {v} is out of range", r.columns()[i].name()))
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

/// The `epoch` entry of `meta` (decimal text) read back.
fn epoch_from(value: &[u8]) -> Result<u32> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("epoch {value:?}")))
}

const AGENT_COLUMNS: &str = "id, key, enrolled_at, last_seen, report, site, segment, listen, \
     performance, up_bps, down_bps, free_storage, placed_segment, election_score";

fn agent_record(r: &Row) -> Result<AgentRecord> {
    let id: String = r.try_get(0)?;
    let report: Option<String> = r.try_get(4)?;
    let report = match report {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("report of {id}: {e}")))?,
        ),
        None => None,
    };
    Ok(AgentRecord {
        key: key_from(r.try_get(1)?)?,
        enrolled_at: u64_at(r, 2)?,
        last_seen: opt_u64_at(r, 3)?,
        report,
        site: r.try_get(5)?,
        segment: r.try_get(6)?,
        listen: r.try_get(7)?,
        performance: opt_u32_at(r, 8)?,
        up_bps: opt_u64_at(r, 9)?,
        down_bps: opt_u64_at(r, 10)?,
        free_storage: opt_u64_at(r, 11)?,
        placed_segment: r.try_get(12)?,
        election_score: opt_u32_at(r, 13)?,
        id,
    })
}

const JOB_COLUMNS: &str = "id, root, epoch, state, created_at, finished_at, targets, confirmed, \
     failed, error, group_name, policy_name, policy, rollout";

fn job_record(r: &Row) -> Result<JobRecord> {
    let id = u64_at(r, 0)?;
    let policy: Option<String> = r.try_get(12)?;
    let policy_spec = match policy {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("policy of job {id}: {e}")))?,
        ),
        None => None,
    };
    let rollout: Option<String> = r.try_get(13)?;
    let rollout = rollout
        .map(|json| {
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("rollout of job {id}: {e}")))
        })
        .transpose()?;
    let state: String = r.try_get(3)?;
    let targets: String = r.try_get(6)?;
    Ok(JobRecord {
        id,
        root: digest_from(r.try_get(1)?)?,
        epoch: opt_u32_at(r, 2)?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job state {state:?}")))?,
        created_at: u64_at(r, 4)?,
        finished_at: opt_u64_at(r, 5)?,
        targets: serde_json::from_str(&targets)
            .map_err(|e| StoreError::Corrupt(format!("targets of job {id}: {e}")))?,
        confirmed: opt_u32_at(r, 7)?,
        failed: opt_u32_at(r, 8)?,
        error: r.try_get(9)?,
        group: r.try_get(10)?,
        policy: r.try_get(11)?,
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

/// A stored role; one this build does not know counts as `read` (as in SQLite's store).
fn stored_role(text: &str) -> Role {
    text.parse().unwrap_or(Role::Read)
}

fn enrol_in(tx: &Conn<'_>, id: &str, key: &PublicKey, now: u64) -> Result<Enrolled> {
    let now = int(now)?;
    let existing = tx.opt(
        "SELECT key, revoked_at FROM agents WHERE id = $1 FOR UPDATE",
        &[&id],
    )?;
    let existing = match existing {
        Some(r) => Some((r.try_get::<_, Vec<u8>>(0)?, r.try_get::<_, Option<i64>>(1)?)),
        None => None,
    };
    match existing {
        // Enrolling a revoked id again (with any key) starts it afresh.
        Some((_, Some(_))) => {
            tx.exec(
                "UPDATE agents SET key = $2, enrolled_at = $3, revoked_at = NULL,
                        placed_segment = NULL, election_score = NULL, bound_labels = NULL
                 WHERE id = $1",
                &[&id, &&key.0[..], &now],
            )?;
            Ok(Enrolled::New)
        }
        Some((k, None)) if k == key.0 => Ok(Enrolled::Unchanged),
        Some(_) => Err(StoreError::KeyConflict(id.to_string())),
        None => {
            tx.exec(
                "INSERT INTO agents (id, key, enrolled_at) VALUES ($1, $2, $3)",
                &[&id, &&key.0[..], &now],
            )?;
            Ok(Enrolled::New)
        }
    }
}

/// The stored columns for an engine participant state: state, verified (if known), reason,
/// cause (JSON).
type StateColumns = (PartState, Option<i64>, Option<String>, Option<String>);

fn participant_columns(state: &ParticipantState) -> StateColumns {
    match state {
        ParticipantState::Waiting => (PartState::Waiting, None, None, None),
        ParticipantState::Fetching { verified } => {
            (PartState::Fetching, Some(i64::from(*verified)), None, None)
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

fn apply_one(tx: &Conn<'_>, record: &Persist, now: u64) -> Result<()> {
    let now = int(now)?;
    match record {
        Persist::JobStarted { job, epoch, order } => {
            let job = int(*job)?;
            let changed = tx.exec(
                "UPDATE jobs SET epoch = $2, state = 'running' WHERE id = $1",
                &[&job, &i64::from(*epoch)],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("job {job}")));
            }
            for (position, agent) in order.iter().enumerate() {
                tx.exec(
                    "INSERT INTO participants (job, agent, state, updated_at, position)
                     VALUES ($1, $2, 'waiting', $3, $4)
                     ON CONFLICT (job, agent) DO UPDATE SET position = excluded.position",
                    &[&job, &agent.as_str(), &now, &(position as i64)],
                )?;
            }
        }
        Persist::Participant {
            job,
            agent,
            state,
            source_note,
        } => {
            let job = int(*job)?;
            let (state, verified, reason, cause) = participant_columns(state);
            tx.exec(
                "INSERT INTO participants
                    (job, agent, state, verified, updated_at, reason, cause, source)
                 VALUES ($1, $2, $3, coalesce($4::bigint, 0), $5, $6, $7, $8)
                 ON CONFLICT (job, agent) DO UPDATE SET
                    state = excluded.state,
                    verified = coalesce($4, participants.verified),
                    updated_at = excluded.updated_at,
                    reason = excluded.reason,
                    cause = excluded.cause,
                    source = coalesce(excluded.source, participants.source)",
                &[
                    &job,
                    &agent.as_str(),
                    &state.as_str(),
                    &verified,
                    &now,
                    &reason,
                    &cause,
                    source_note,
                ],
            )?;
            if state == PartState::Confirmed {
                // A confirmed participant holds every chunk.
                tx.exec(
                    "UPDATE participants SET verified = (
                        SELECT (c.length + c.chunk_size - 1) / c.chunk_size
                        FROM jobs j JOIN content c ON c.root = j.root WHERE j.id = $1)
                     WHERE job = $1 AND agent = $2",
                    &[&job, &agent.as_str()],
                )?;
                tx.exec(
                    "INSERT INTO confirmations (job, agent, confirmed_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&job, &agent.as_str(), &now],
                )?;
            }
        }
        Persist::Progress { job, updates } => {
            let job = int(*job)?;
            for (agent, verified) in updates {
                tx.exec(
                    "INSERT INTO participants (job, agent, state, verified, updated_at)
                     VALUES ($1, $2, 'fetching', $3, $4)
                     ON CONFLICT (job, agent) DO UPDATE SET
                        verified = greatest(participants.verified, excluded.verified),
                        state = CASE participants.state WHEN 'waiting' THEN 'fetching'
                                ELSE participants.state END,
                        updated_at = excluded.updated_at",
                    &[&job, &agent.as_str(), &i64::from(*verified), &now],
                )?;
            }
        }
        Persist::SourceBytes {
            job,
            agent,
            from,
            bytes,
        } => {
            let job = int(*job)?;
            let from = from.as_ref().map(|f| f.as_str());
            let bytes = int(*bytes)?;
            let changed = tx.exec(
                "UPDATE source_bytes SET bytes = bytes + $4
                 WHERE job = $1 AND agent = $2 AND from_agent IS NOT DISTINCT FROM $3",
                &[&job, &agent.as_str(), &from, &bytes],
            )?;
            if changed == 0 {
                tx.exec(
                    "INSERT INTO source_bytes (job, agent, from_agent, bytes)
                     VALUES ($1, $2, $3, $4)",
                    &[&job, &agent.as_str(), &from, &bytes],
                )?;
            }
        }
        Persist::MeasuredUpload { job, rates } => {
            let job = int(*job)?;
            for (agent, up) in rates {
                tx.exec(
                    "UPDATE participants SET measured_up_bps = $3 WHERE job = $1 AND agent = $2",
                    &[&job, &agent.as_str(), &int(*up)?],
                )?;
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
            tx.exec(
                "UPDATE participants SET install_state = $3, install_exit_code = $4,
                    install_output = $5, install_at = $6, updated_at = $6
                 WHERE job = $1 AND agent = $2",
                &[
                    &int(*job)?,
                    &agent.as_str(),
                    &InstallPhase::of(*state).as_str(),
                    &exit_code.map(i64::from),
                    &output,
                    &now,
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
                tx.exec(
                    "DELETE FROM agent_versions WHERE agent = $1",
                    &[&agent.as_str()],
                )?;
            }
            for (name, version) in versions.iter().take(MAX_RUNNING) {
                tx.exec(
                    "INSERT INTO agent_versions (agent, name, version, updated_at)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (agent, name) DO UPDATE SET
                        version = excluded.version, updated_at = excluded.updated_at",
                    &[&agent.as_str(), name, &int(*version)?, &now],
                )?;
            }
            if !*whole {
                // Only the newest per agent (this name's row is among them: just written).
                let this = versions.first().map(|v| v.0.as_str()).unwrap_or("");
                tx.exec(
                    "DELETE FROM agent_versions WHERE agent = $1 AND name NOT IN
                       (SELECT name FROM agent_versions WHERE agent = $1
                        ORDER BY updated_at DESC, name = $3 DESC LIMIT $2)",
                    &[&agent.as_str(), &(MAX_RUNNING as i64), &this],
                )?;
            }
        }
        Persist::Rollout { job, state } => {
            let job = int(*job)?;
            let json = serde_json::to_string(state).expect("a rollout state encodes");
            tx.exec("UPDATE jobs SET rollout = $2 WHERE id = $1", &[&job, &json])?;
            if state.aborted.is_some() {
                tx.exec(
                    "UPDATE jobs SET state = 'cancelled', finished_at = coalesce(finished_at, $2)
                     WHERE id = $1 AND state IN ('pending', 'running')",
                    &[&job, &now],
                )?;
            }
        }
        Persist::JobFinished {
            job,
            confirmed,
            failed,
        } => {
            tx.exec(
                "UPDATE jobs SET
                    state = CASE state WHEN 'cancelled' THEN 'cancelled' ELSE 'finished' END,
                    finished_at = coalesce(finished_at, $2),
                    confirmed = $3, failed = $4
                 WHERE id = $1",
                &[
                    &int(*job)?,
                    &now,
                    &i64::from(*confirmed),
                    &i64::from(*failed),
                ],
            )?;
        }
    }
    Ok(())
}

/// Adds a warning to a job (kept once per text), inside a transaction or not.
fn insert_warning(conn: &Conn<'_>, job: u64, text: &str, now: u64) -> Result<()> {
    let job_id = int(job)?;
    if conn
        .opt("SELECT id FROM jobs WHERE id = $1", &[&job_id])?
        .is_none()
    {
        return Err(StoreError::NotFound(format!("job {job}")));
    }
    conn.exec(
        "INSERT INTO job_warnings (job, text, added_at) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
        &[&job_id, &text, &int(now)?],
    )?;
    Ok(())
}

/// A table of records known by a unique name (content groups, policies).
#[derive(Debug, Clone, Copy)]
struct NamedTable {
    /// The SQL table.
    table: &'static str,
    /// The columns after `name`, in the order the statements bind them (`$2`, `$3`, ...).
    columns: &'static [&'static str],
    /// What one record is called in `Duplicate` / `NotFound` errors.
    kind: &'static str,
}

const GROUPS: NamedTable = NamedTable {
    table: "content_groups",
    columns: &["agents", "selector"],
    kind: "group",
};

const POLICIES: NamedTable = NamedTable {
    table: "policies",
    columns: &["policy"],
    kind: "policy",
};

impl NamedTable {
    /// `$1` is the name, `$2..` the columns, then `now`.
    fn now_param(self) -> usize {
        self.columns.len() + 2
    }

    /// Inserts a new record; binds the name, the columns, then `now`. A taken name is `Duplicate`.
    fn add(self, conn: &Conn<'_>, name: &str, values: Params<'_>) -> Result<()> {
        let now = self.now_param();
        let sql = format!(
            "INSERT INTO {} (name, {}, created_at, updated_at)
             VALUES ({}, ${now}, ${now}) ON CONFLICT (name) DO NOTHING",
            self.table,
            self.columns.join(", "),
            (1..now)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        if conn.exec(&sql, values)? == 0 {
            return Err(StoreError::Duplicate(format!("{} {name:?}", self.kind)));
        }
        Ok(())
    }

    /// Replaces the columns of an existing record; binds as `add`. An unknown name is `NotFound`.
    fn set(self, conn: &Conn<'_>, name: &str, values: Params<'_>) -> Result<()> {
        let now = self.now_param();
        let sets: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, column)| format!("{column} = ${}", i + 2))
            .collect();
        let sql = format!(
            "UPDATE {} SET {}, updated_at = ${now} WHERE name = $1",
            self.table,
            sets.join(", "),
        );
        if conn.exec(&sql, values)? == 0 {
            return Err(StoreError::NotFound(format!("{} {name:?}", self.kind)));
        }
        Ok(())
    }

    /// Deletes a record. An unknown name is `NotFound`.
    fn remove(self, conn: &Conn<'_>, name: &str) -> Result<()> {
        let sql = format!("DELETE FROM {} WHERE name = $1", self.table);
        if conn.exec(&sql, &[&name])? == 0 {
            return Err(StoreError::NotFound(format!("{} {name:?}", self.kind)));
        }
        Ok(())
    }

    /// One record, decoded by `record` from its `SELECT name, columns...` row.
    fn one<R>(
        self,
        conn: &Conn<'_>,
        name: &str,
        record: fn(&Row) -> Result<R>,
    ) -> Result<Option<R>> {
        let sql = format!("{} WHERE name = $1", self.select());
        conn.opt(&sql, &[&name])?.as_ref().map(record).transpose()
    }

    /// Every record by name, decoded by `record`.
    fn all<R>(self, conn: &Conn<'_>, record: fn(&Row) -> Result<R>) -> Result<Vec<R>> {
        let sql = format!("{} ORDER BY name", self.select());
        conn.query(&sql, &[])?.iter().map(record).collect()
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

fn group_columns(group: &GroupRecord) -> Result<(String, String)> {
    let agents = serde_json::to_string(&group.agents)
        .map_err(|e| StoreError::Corrupt(format!("group agents do not encode: {e}")))?;
    let selector = serde_json::to_string(&group.selector)
        .map_err(|e| StoreError::Corrupt(format!("group selector does not encode: {e}")))?;
    Ok((agents, selector))
}

fn group_record(r: &Row) -> Result<GroupRecord> {
    let name: String = r.try_get(0)?;
    let agents: String = r.try_get(1)?;
    let selector: String = r.try_get(2)?;
    Ok(GroupRecord {
        agents: serde_json::from_str(&agents)
            .map_err(|e| StoreError::Corrupt(format!("agents of group {name}: {e}")))?,
        selector: serde_json::from_str(&selector)
            .map_err(|e| StoreError::Corrupt(format!("selector of group {name}: {e}")))?,
        name,
    })
}

fn policy_record(r: &Row) -> Result<PolicyRecord> {
    let name: String = r.try_get(0)?;
    let policy: String = r.try_get(1)?;
    Ok(PolicyRecord {
        policy: serde_json::from_str(&policy)
            .map_err(|e| StoreError::Corrupt(format!("policy {name}: {e}")))?,
        name,
    })
}

fn revocation_record(id: &str, r: &Row) -> Result<RevocationRecord> {
    Ok(RevocationRecord {
        id: id.to_string(),
        up_to_serial: u64_at(r, 0)?,
        expires_at: u64_at(r, 1)?,
        revoked_at: u64_at(r, 2)?,
    })
}

impl Store for PostgresStore {
    fn epoch(&self) -> Result<u32> {
        match self
            .conn()?
            .opt("SELECT value FROM meta WHERE key = 'epoch'", &[])?
        {
            Some(r) => epoch_from(&r.try_get::<_, Vec<u8>>(0)?),
            None => Ok(0),
        }
    }

    fn next_epoch(&mut self) -> Result<u32> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        // Serialised with a takeover (which advances the epoch too) by the lease row's lock,
        // and refused while another manager's lease is valid: the epoch is the holder's.
        tx.batch(&format!(
            "SET LOCAL lock_timeout = {}",
            super::fence::FENCE_LOCK_TIMEOUT.as_millis()
        ))?;
        let lease = tx.one(
            "SELECT holder, expires_at > clock_timestamp() FROM manager_lease WHERE id = 1
             FOR UPDATE",
            &[],
        )?;
        let (holder, live): (Option<String>, bool) = (lease.try_get(0)?, lease.try_get(1)?);
        let mine = self
            .fence
            .as_ref()
            .is_some_and(|f| holder.as_deref() == Some(f.holder()));
        if live && !mine {
            return Err(StoreError::Fenced(format!(
                "manager {} holds the lease; the epoch is its to advance",
                holder.unwrap_or_default()
            )));
        }
        let current = match tx.opt("SELECT value FROM meta WHERE key = 'epoch'", &[])? {
            Some(r) => epoch_from(&r.try_get::<_, Vec<u8>>(0)?)?,
            None => 0,
        };
        let next = current
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("epoch counter overflow".into()))?;
        tx.exec(
            "INSERT INTO meta (key, value) VALUES ('epoch', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&next.to_string().into_bytes()],
        )?;
        tx.commit()?;
        Ok(next)
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.conn()?
            .opt("SELECT value FROM meta WHERE key = $1", &[&key])?
            .map(|r| Ok(r.try_get(0)?))
            .transpose()
    }

    fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.conn()?.exec(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )?;
        Ok(())
    }

    fn enrol(&mut self, id: &str, key: &PublicKey, now: u64) -> Result<Enrolled> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        // Fenced: what a new active manager loads into its caches at takeover.
        self.check_fence(&tx)?;
        let done = enrol_in(&tx, id, key, now)?;
        tx.commit()?;
        Ok(done)
    }

    fn add_token(&mut self, hash: &Digest, token: &NewToken, now: u64) -> Result<()> {
        self.conn()?.exec(
            "INSERT INTO enrolment_tokens (hash, created_at, expires_at, bound_id, labels)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &&hash[..],
                &int(now)?,
                &int(token.expires_at)?,
                &token.bound_id,
                &labels_json(&token.labels),
            ],
        )?;
        Ok(())
    }

    fn tokens(&self, now: u64) -> Result<Vec<TokenRecord>> {
        let rows = self.conn()?.query(
            "SELECT hash, created_at, expires_at, bound_id, used_at, used_by, revoked_at, labels
             FROM enrolment_tokens ORDER BY created_at DESC, hash",
            &[],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let hash: Digest = r
                .try_get::<_, Vec<u8>>(0)?
                .try_into()
                .map_err(|_| StoreError::Corrupt("enrolment token digest".into()))?;
            let created_at = u64_at(r, 1)?;
            let expires_at = opt_u64_at(r, 2)?.unwrap_or(created_at + DEFAULT_TOKEN_LIFETIME);
            let used_at = opt_u64_at(r, 4)?;
            let revoked_at = opt_u64_at(r, 6)?;
            let labels: Option<String> = r.try_get(7)?;
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
                bound_id: r.try_get(3)?,
                labels: parse_labels(labels.as_deref())?,
                state,
                used_by: r.try_get(5)?,
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
        let n = self.conn()?.exec(
            "UPDATE enrolment_tokens SET revoked_at = $2
             WHERE substr(encode(hash, 'hex'), 1, 12) = lower($1)
                AND used_at IS NULL AND revoked_at IS NULL",
            &[&id, &int(now)?],
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
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        // Fenced: what a new active manager loads into its caches at takeover.
        self.check_fence(&tx)?;
        // FOR UPDATE: two enrolments racing for one token take it one after the other.
        let Some(r) = tx.opt(
            "SELECT created_at, expires_at, bound_id, used_by, revoked_at, used_at, labels
             FROM enrolment_tokens WHERE hash = $1 FOR UPDATE",
            &[&&hash[..]],
        )?
        else {
            return Err(StoreError::BadToken);
        };
        let created_at = u64_at(&r, 0)?;
        let expires_at = opt_u64_at(&r, 1)?;
        let bound_id: Option<String> = r.try_get(2)?;
        let used_by: Option<String> = r.try_get(3)?;
        let labels: Option<String> = r.try_get(6)?;
        if opt_u64_at(&r, 5)?.is_some() {
            return Err(StoreError::TokenUsed(used_by.unwrap_or_default()));
        }
        if opt_u64_at(&r, 4)?.is_some() {
            return Err(StoreError::TokenRevoked);
        }
        let expires_at = expires_at.unwrap_or(created_at + DEFAULT_TOKEN_LIFETIME);
        if now >= expires_at {
            return Err(StoreError::TokenExpired(expires_at));
        }
        if let Some(bound) = bound_id.filter(|b| b != id) {
            return Err(StoreError::TokenBoundElsewhere(bound));
        }
        tx.exec(
            "UPDATE enrolment_tokens SET used_at = $2, used_by = $3 WHERE hash = $1",
            &[&&hash[..], &int(now)?, &id],
        )?;
        let done = enrol_in(&tx, id, key, now)?;
        if labels.is_some() {
            tx.exec(
                "UPDATE agents SET bound_labels = $2 WHERE id = $1",
                &[&id, &labels],
            )?;
        }
        tx.commit()?;
        Ok(done)
    }

    fn bound_labels(&self) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let rows = self.conn()?.query(
            "SELECT id, bound_labels FROM agents WHERE bound_labels IS NOT NULL ORDER BY id",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let labels: String = r.try_get(1)?;
                Ok((r.try_get(0)?, parse_labels(Some(&labels))?))
            })
            .collect()
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        self.conn()?
            .opt(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 AND revoked_at IS NULL"),
                &[&id],
            )?
            .as_ref()
            .map(agent_record)
            .transpose()
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.conn()?
            .query(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE revoked_at IS NULL ORDER BY id"),
                &[],
            )?
            .iter()
            .map(agent_record)
            .collect()
    }

    fn record_report(&mut self, report: &Report, now: u64) -> Result<()> {
        let json = serde_json::to_string(report)
            .map_err(|e| StoreError::Corrupt(format!("report does not encode: {e}")))?;
        let changed = self.conn()?.exec(
            "UPDATE agents SET last_seen = $2, report = $3, site = $4, segment = $5, listen = $6,
                performance = $7, up_bps = $8, down_bps = $9, free_storage = $10
             WHERE id = $1",
            &[
                &report.id.as_str(),
                &int(now)?,
                &json,
                &report.site.as_str(),
                &report.segment.as_str(),
                &report.listen.map(|a| a.to_string()),
                &i64::from(report.performance),
                &saturate(report.link.up_bps),
                &saturate(report.link.down_bps),
                &saturate(report.free_storage),
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("agent {}", report.id)));
        }
        Ok(())
    }

    fn mark_seen(&mut self, id: &str, now: u64) -> Result<()> {
        self.conn()?.exec(
            "UPDATE agents SET last_seen = $2 WHERE id = $1",
            &[&id, &int(now)?],
        )?;
        Ok(())
    }

    fn place_agent(&mut self, id: &str, segment: Option<&str>, score: Option<u32>) -> Result<()> {
        let changed = self.conn()?.exec(
            "UPDATE agents SET placed_segment = coalesce($2, placed_segment),
                election_score = coalesce($3, election_score)
             WHERE id = $1",
            &[&id, &segment, &score.map(i64::from)],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("agent {id}")));
        }
        Ok(())
    }

    fn place_at_enrolment(&mut self, id: &str, segment: &str, score: u32) -> Result<bool> {
        let changed = self.conn()?.exec(
            "UPDATE agents SET placed_segment = $2,
                election_score = coalesce(election_score, $3)
             WHERE id = $1 AND placed_segment IS NULL",
            &[&id, &segment, &i64::from(score)],
        )?;
        Ok(changed > 0)
    }

    fn put_content(&mut self, c: &ContentRecord) -> Result<()> {
        self.conn()?.exec(
            "INSERT INTO content (root, name, version, length, chunk_size, path, manifest, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (root) DO UPDATE SET name = excluded.name, version = excluded.version,
                length = excluded.length, chunk_size = excluded.chunk_size, path = excluded.path,
                manifest = excluded.manifest",
            &[
                &&c.root[..],
                &c.name,
                &int(c.version)?,
                &int(c.length)?,
                &i64::from(c.chunk_size),
                &c.path,
                &c.manifest,
                &int(c.created_at)?,
            ],
        )?;
        Ok(())
    }

    fn content(&self, root: &Digest) -> Result<Option<ContentRecord>> {
        let Some(r) = self.conn()?.opt(
            "SELECT root, name, version, length, chunk_size, path, manifest, created_at
             FROM content WHERE root = $1",
            &[&&root[..]],
        )?
        else {
            return Ok(None);
        };
        Ok(Some(ContentRecord {
            root: digest_from(r.try_get(0)?)?,
            name: r.try_get(1)?,
            version: u64_at(&r, 2)?,
            length: u64_at(&r, 3)?,
            chunk_size: u32_at(&r, 4)?,
            path: r.try_get(5)?,
            manifest: r.try_get(6)?,
            created_at: u64_at(&r, 7)?,
        }))
    }

    fn latest_version(&self, name: &str) -> Result<Option<u64>> {
        let r = self
            .conn()?
            .one("SELECT max(version) FROM content WHERE name = $1", &[&name])?;
        opt_u64_at(&r, 0)
    }

    fn add_trust(&mut self, version: u64, document: &[u8], now: u64, keep: usize) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        // Fenced: what a new active manager loads into its caches at takeover.
        self.check_fence(&tx)?;
        tx.batch("LOCK TABLE trust_documents IN EXCLUSIVE MODE")?;
        let newest: Option<i64> = tx
            .one("SELECT max(version) FROM trust_documents", &[])?
            .try_get(0)?;
        if newest.is_some_and(|v| v >= saturate(version)) {
            return Err(StoreError::Duplicate(format!(
                "trust document version {version} or a newer one"
            )));
        }
        tx.exec(
            "INSERT INTO trust_documents (version, document, added_at) VALUES ($1, $2, $3)",
            &[&saturate(version), &document, &saturate(now)],
        )?;
        tx.exec(
            "DELETE FROM trust_documents WHERE version NOT IN
             (SELECT version FROM trust_documents ORDER BY version DESC LIMIT $1)",
            &[&(keep as i64)],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn trust_chain(&self) -> Result<Vec<Vec<u8>>> {
        self.conn()?
            .query("SELECT document FROM trust_documents ORDER BY version", &[])?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
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
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        self.check_fence(&tx)?;
        let r = tx.one(
            "INSERT INTO jobs (root, state, created_at, targets, group_name, policy_name, policy)
             VALUES ($1, 'pending', $2, $3, $4, $5, $6) RETURNING id",
            &[
                &&root[..],
                &int(now)?,
                &targets,
                &origin.group,
                &origin.policy_name,
                &policy,
            ],
        )?;
        let id = u64_at(&r, 0)?;
        tx.commit()?;
        Ok(id)
    }

    fn add_job_warning(&mut self, job: u64, text: &str, now: u64) -> Result<()> {
        insert_warning(&self.conn()?, job, text, now)
    }

    fn set_job_state(
        &mut self,
        job: u64,
        state: JobState,
        error: Option<&str>,
        now: u64,
    ) -> Result<()> {
        let finished = state.is_over().then_some(now);
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        self.check_fence(&tx)?;
        let changed = tx.exec(
            "UPDATE jobs SET state = $2, error = coalesce($3, error),
                finished_at = coalesce(finished_at, $4)
             WHERE id = $1",
            &[&int(job)?, &state.as_str(), &error, &opt_int(finished)?],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("job {job}")));
        }
        tx.commit()
    }

    fn job(&self, job: u64) -> Result<Option<JobRecord>> {
        let conn = self.conn()?;
        let Some(r) = conn.opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
            &[&int(job)?],
        )?
        else {
            return Ok(None);
        };
        let mut job = self.job_with_warnings(&conn, job_record(&r)?)?;
        drop(conn);
        job.transfers = self.transfers(job.id)?;
        Ok(Some(job))
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        let conn = self.conn()?;
        conn.query(
            &format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC"),
            &[],
        )?
        .iter()
        .map(|r| self.job_with_warnings(&conn, job_record(r)?))
        .collect()
    }

    fn unfinished_jobs(&self) -> Result<Vec<JobRecord>> {
        let conn = self.conn()?;
        conn.query(
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('pending', 'running') ORDER BY id"
            ),
            &[],
        )?
        .iter()
        .map(|r| self.job_with_warnings(&conn, job_record(r)?))
        .collect()
    }

    fn participants(&self, job: u64) -> Result<Vec<ParticipantRecord>> {
        self.conn()?
            .query(
                "SELECT agent, state, verified, updated_at, reason, cause, source, position,
                        measured_up_bps, install_state, install_exit_code, install_output,
                        install_at
                 FROM participants WHERE job = $1
                 ORDER BY position IS NULL, position, agent",
                &[&int(job)?],
            )?
            .iter()
            .map(|r| {
                let state: String = r.try_get(1)?;
                let install = match r.try_get::<_, Option<String>>(9)? {
                    None => None,
                    Some(phase) => Some(InstallRecord {
                        state: InstallPhase::parse(&phase).ok_or_else(|| {
                            StoreError::Corrupt(format!("install state {phase:?}"))
                        })?,
                        exit_code: r
                            .try_get::<_, Option<i64>>(10)?
                            .map(|c| {
                                i32::try_from(c).map_err(|_| {
                                    StoreError::Corrupt(format!("install exit code {c}"))
                                })
                            })
                            .transpose()?,
                        output: r.try_get(11)?,
                        at: match opt_u64_at(r, 12)? {
                            Some(at) => at,
                            None => u64_at(r, 3)?,
                        },
                    }),
                };
                Ok(ParticipantRecord {
                    install,
                    agent: r.try_get(0)?,
                    state: PartState::parse(&state).ok_or_else(|| {
                        StoreError::Corrupt(format!("participant state {state:?}"))
                    })?,
                    verified: u32_at(r, 2)?,
                    updated_at: u64_at(r, 3)?,
                    reason: r.try_get(4)?,
                    cause: r.try_get(5)?,
                    source: r.try_get(6)?,
                    position: opt_u32_at(r, 7)?,
                    measured_up_bps: opt_u64_at(r, 8)?,
                })
            })
            .collect()
    }

    fn source_bytes(&self, job: u64) -> Result<Vec<SourceBytes>> {
        self.conn()?
            .query(
                "SELECT agent, from_agent, bytes FROM source_bytes WHERE job = $1
                 ORDER BY agent, from_agent IS NOT NULL, from_agent",
                &[&int(job)?],
            )?
            .iter()
            .map(|r| {
                Ok(SourceBytes {
                    agent: r.try_get(0)?,
                    from: r.try_get(1)?,
                    bytes: u64_at(r, 2)?,
                })
            })
            .collect()
    }

    fn confirmations(&self, job: u64) -> Result<Vec<Confirmation>> {
        self.conn()?
            .query(
                "SELECT agent, confirmed_at FROM confirmations WHERE job = $1
                 ORDER BY confirmed_at, agent",
                &[&int(job)?],
            )?
            .iter()
            .map(|r| {
                Ok(Confirmation {
                    agent: r.try_get(0)?,
                    confirmed_at: u64_at(r, 1)?,
                })
            })
            .collect()
    }

    fn apply(&mut self, records: &[Persist], now: u64) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        self.check_fence(&tx)?;
        for record in records {
            apply_one(&tx, record, now)?;
        }
        tx.commit()
    }

    fn replace_segment(&mut self, segment: &SegmentRecord) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        let previous: Option<String> = tx
            .opt(
                "SELECT leader FROM segments WHERE name = $1 FOR UPDATE",
                &[&segment.name],
            )?
            .map(|r| r.try_get(0))
            .transpose()?;
        let reported_at = saturate(segment.reported_at_ms);
        tx.exec(
            "INSERT INTO segments (name, leader, term, reported_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET leader = excluded.leader, term = excluded.term,
                reported_at = excluded.reported_at",
            &[
                &segment.name,
                &segment.leader,
                &i64::from(segment.term),
                &reported_at,
            ],
        )?;
        tx.exec(
            "DELETE FROM segment_members WHERE segment = $1",
            &[&segment.name],
        )?;
        for m in &segment.members {
            let delays = serde_json::to_string(&m.delays)
                .map_err(|e| StoreError::Corrupt(format!("delays do not encode: {e}")))?;
            tx.exec(
                "INSERT INTO segment_members (segment, id, score, listen, performance,
                    free_storage, can_serve, up_bps, down_bps, loss_ppm, uptime_s, delays,
                    last_heard_ms, known)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (segment, id) DO UPDATE SET score = excluded.score,
                    listen = excluded.listen, performance = excluded.performance,
                    free_storage = excluded.free_storage, can_serve = excluded.can_serve,
                    up_bps = excluded.up_bps, down_bps = excluded.down_bps,
                    loss_ppm = excluded.loss_ppm, uptime_s = excluded.uptime_s,
                    delays = excluded.delays, last_heard_ms = excluded.last_heard_ms,
                    known = excluded.known",
                &[
                    &segment.name,
                    &m.id,
                    &i64::from(m.score),
                    &m.listen,
                    &i64::from(m.performance),
                    &saturate(m.free_storage),
                    &i64::from(m.can_serve),
                    &saturate(m.link.up_bps),
                    &saturate(m.link.down_bps),
                    &i64::from(m.link.loss_ppm),
                    &saturate(m.link.uptime_s),
                    &delays,
                    &i64::from(m.last_heard_ms),
                    &i64::from(m.known),
                ],
            )?;
        }
        let changed = previous.as_deref() != Some(segment.leader.as_str());
        if changed {
            tx.exec(
                "INSERT INTO leader_history (segment, leader, term, since_ms)
                 VALUES ($1, $2, $3, $4)",
                &[
                    &segment.name,
                    &segment.leader,
                    &i64::from(segment.term),
                    &reported_at,
                ],
            )?;
        }
        tx.commit()?;
        Ok(changed)
    }

    fn segments(&self) -> Result<Vec<SegmentRecord>> {
        let names: Vec<String> = self
            .conn()?
            .query("SELECT name FROM segments ORDER BY name", &[])?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(s) = self.segment(&name)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn segment(&self, name: &str) -> Result<Option<SegmentRecord>> {
        let conn = self.conn()?;
        let Some(head) = conn.opt(
            "SELECT name, leader, term, reported_at FROM segments WHERE name = $1",
            &[&name],
        )?
        else {
            return Ok(None);
        };
        let name: String = head.try_get(0)?;
        let rows = conn.query(
            "SELECT id, score, listen, performance, free_storage, can_serve, up_bps, down_bps,
                loss_ppm, uptime_s, delays, last_heard_ms, known
             FROM segment_members WHERE segment = $1 ORDER BY id",
            &[&name],
        )?;
        let mut members = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get(0)?;
            let delays: String = r.try_get(10)?;
            members.push(MemberRecord {
                delays: serde_json::from_str(&delays).map_err(|e| {
                    StoreError::Corrupt(format!("delays of {id} in segment {name}: {e}"))
                })?,
                id,
                score: u32_at(r, 1)?,
                listen: r.try_get(2)?,
                performance: u32_at(r, 3)?,
                free_storage: u64_at(r, 4)?,
                can_serve: r.try_get::<_, i64>(5)? != 0,
                link: LinkRecord {
                    up_bps: u64_at(r, 6)?,
                    down_bps: u64_at(r, 7)?,
                    loss_ppm: u32_at(r, 8)?,
                    uptime_s: u64_at(r, 9)?,
                },
                last_heard_ms: u32_at(r, 11)?,
                known: r.try_get::<_, i64>(12)? != 0,
            });
        }
        Ok(Some(SegmentRecord {
            leader: head.try_get(1)?,
            term: u32_at(&head, 2)?,
            reported_at_ms: u64_at(&head, 3)?,
            name,
            members,
        }))
    }

    fn leader_history(&self, name: &str) -> Result<Vec<LeaderChange>> {
        self.conn()?
            .query(
                "SELECT leader, term, since_ms FROM leader_history WHERE segment = $1
                 ORDER BY since_ms, rowid",
                &[&name],
            )?
            .iter()
            .map(|r| {
                Ok(LeaderChange {
                    leader: r.try_get(0)?,
                    term: u32_at(r, 1)?,
                    since_ms: u64_at(r, 2)?,
                })
            })
            .collect()
    }

    fn add_group(&mut self, group: &GroupRecord, now: u64) -> Result<()> {
        let (agents, selector) = group_columns(group)?;
        GROUPS.add(
            &self.conn()?,
            &group.name,
            &[&group.name, &agents, &selector, &int(now)?],
        )
    }

    fn set_group(&mut self, group: &GroupRecord, now: u64) -> Result<()> {
        let (agents, selector) = group_columns(group)?;
        GROUPS.set(
            &self.conn()?,
            &group.name,
            &[&group.name, &agents, &selector, &int(now)?],
        )
    }

    fn remove_group(&mut self, name: &str) -> Result<()> {
        GROUPS.remove(&self.conn()?, name)
    }

    fn group(&self, name: &str) -> Result<Option<GroupRecord>> {
        GROUPS.one(&self.conn()?, name, group_record)
    }

    fn groups(&self) -> Result<Vec<GroupRecord>> {
        GROUPS.all(&self.conn()?, group_record)
    }

    fn add_policy(&mut self, policy: &PolicyRecord, now: u64) -> Result<()> {
        POLICIES.add(
            &self.conn()?,
            &policy.name,
            &[&policy.name, &policy.policy.to_string(), &int(now)?],
        )
    }

    fn set_policy(&mut self, policy: &PolicyRecord, now: u64) -> Result<()> {
        POLICIES.set(
            &self.conn()?,
            &policy.name,
            &[&policy.name, &policy.policy.to_string(), &int(now)?],
        )
    }

    fn remove_policy(&mut self, name: &str) -> Result<()> {
        POLICIES.remove(&self.conn()?, name)
    }

    fn policy(&self, name: &str) -> Result<Option<PolicyRecord>> {
        POLICIES.one(&self.conn()?, name, policy_record)
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>> {
        POLICIES.all(&self.conn()?, policy_record)
    }

    fn set_admin(
        &mut self,
        name: &str,
        password_hash: &str,
        role: Option<Role>,
        now: u64,
    ) -> Result<AdminSet> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        let now = saturate(now);
        let changed = tx.exec(
            "UPDATE admin_users SET password_hash = $2, updated_at = $3, role = coalesce($4, role)
             WHERE name = $1",
            &[&name, &password_hash, &now, &role.map(Role::as_str)],
        )?;
        let done = if changed > 0 {
            // A new password ends the sessions signed in with the old one.
            tx.exec("DELETE FROM web_sessions WHERE admin = $1", &[&name])?;
            AdminSet::PasswordChanged
        } else {
            tx.exec(
                "INSERT INTO admin_users (name, password_hash, created_at, updated_at, role)
                 VALUES ($1, $2, $3, $3, $4)",
                &[
                    &name,
                    &password_hash,
                    &now,
                    &role.unwrap_or(Role::Admin).as_str(),
                ],
            )?;
            AdminSet::Added
        };
        tx.commit()?;
        Ok(done)
    }

    fn admin_role(&self, name: &str) -> Result<Option<Role>> {
        self.conn()?
            .opt("SELECT role FROM admin_users WHERE name = $1", &[&name])?
            .map(|r| Ok(stored_role(&r.try_get::<_, String>(0)?)))
            .transpose()
    }

    fn admin_hash(&self, name: &str) -> Result<Option<String>> {
        self.conn()?
            .opt(
                "SELECT password_hash FROM admin_users WHERE name = $1",
                &[&name],
            )?
            .map(|r| Ok(r.try_get(0)?))
            .transpose()
    }

    fn admins(&self) -> Result<Vec<String>> {
        self.conn()?
            .query("SELECT name FROM admin_users ORDER BY name", &[])?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    fn new_api_token(&mut self, name: &str, hash: &Digest, role: Role, now: u64) -> Result<()> {
        self.conn()?.exec(
            "INSERT INTO api_tokens (name, hash, created_at, role) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET hash = excluded.hash,
                created_at = excluded.created_at, role = excluded.role",
            &[&name, &&hash[..], &saturate(now), &role.as_str()],
        )?;
        Ok(())
    }

    fn api_token(&self, hash: &Digest) -> Result<Option<(String, Role)>> {
        self.conn()?
            .opt(
                "SELECT name, role FROM api_tokens WHERE hash = $1",
                &[&&hash[..]],
            )?
            .map(|r| {
                let role: String = r.try_get(1)?;
                Ok((r.try_get(0)?, stored_role(&role)))
            })
            .transpose()
    }

    fn revoke_api_token(&mut self, name: &str) -> Result<bool> {
        Ok(self
            .conn()?
            .exec("DELETE FROM api_tokens WHERE name = $1", &[&name])?
            > 0)
    }

    fn create_session(&mut self, session: &SessionRecord, password_hash: &str) -> Result<bool> {
        // One statement: the check and the insert cannot be split by a password change.
        let stored = self.conn()?.exec(
            "INSERT INTO web_sessions (id_hash, admin, csrf, created_at, last_used)
             SELECT $1::bytea, $2::text, $3::text, $4::bigint, $5::bigint
             WHERE EXISTS (SELECT 1 FROM admin_users WHERE name = $2 AND password_hash = $6)",
            &[
                &&session.id_hash[..],
                &session.admin,
                &session.csrf,
                &saturate(session.created_at),
                &saturate(session.last_used),
                &password_hash,
            ],
        )?;
        Ok(stored > 0)
    }

    fn session(&self, id_hash: &Digest) -> Result<Option<SessionRecord>> {
        let Some(r) = self.conn()?.opt(
            "SELECT id_hash, admin, csrf, created_at, last_used
             FROM web_sessions WHERE id_hash = $1",
            &[&&id_hash[..]],
        )?
        else {
            return Ok(None);
        };
        Ok(Some(SessionRecord {
            id_hash: r
                .try_get::<_, Vec<u8>>(0)?
                .try_into()
                .map_err(|_| StoreError::Corrupt("session id hash is not 32 bytes".into()))?,
            admin: r.try_get(1)?,
            csrf: r.try_get(2)?,
            created_at: u64_at(&r, 3)?,
            last_used: u64_at(&r, 4)?,
        }))
    }

    fn touch_session(&mut self, id_hash: &Digest, now: u64) -> Result<bool> {
        Ok(self.conn()?.exec(
            "UPDATE web_sessions SET last_used = $2 WHERE id_hash = $1",
            &[&&id_hash[..], &saturate(now)],
        )? > 0)
    }

    fn delete_session(&mut self, id_hash: &Digest) -> Result<bool> {
        Ok(self.conn()?.exec(
            "DELETE FROM web_sessions WHERE id_hash = $1",
            &[&&id_hash[..]],
        )? > 0)
    }

    fn expire_sessions(&mut self, idle_since: u64, keep: usize) -> Result<u64> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        let idle = tx.exec(
            "DELETE FROM web_sessions WHERE last_used <= $1",
            &[&saturate(idle_since)],
        )?;
        let beyond = tx.exec(
            "DELETE FROM web_sessions WHERE id_hash NOT IN (
                SELECT id_hash FROM web_sessions
                ORDER BY last_used DESC, created_at DESC, id_hash LIMIT $1)",
            &[&saturate(keep as u64)],
        )?;
        tx.commit()?;
        Ok(idle + beyond)
    }

    fn running_versions(&self, agent: Option<&str>) -> Result<Vec<RunningRecord>> {
        self.conn()?
            .query(
                "SELECT agent, name, version, updated_at FROM agent_versions
                 WHERE $1::text IS NULL OR agent = $1 ORDER BY agent, name",
                &[&agent],
            )?
            .iter()
            .map(|r| {
                Ok(RunningRecord {
                    agent: r.try_get(0)?,
                    name: r.try_get(1)?,
                    version: u64_at(r, 2)?,
                    updated_at: u64_at(r, 3)?,
                })
            })
            .collect()
    }

    fn totals(&self) -> Result<StoreTotals> {
        let conn = self.conn()?;
        let jobs_by_state = conn
            .query(
                "SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, u64_at(r, 1)?)))
            .collect::<Result<_>>()?;
        let r = conn.one(
            "SELECT coalesce(sum(CASE WHEN from_agent IS NULL THEN bytes END), 0)::bigint,
                    coalesce(sum(CASE WHEN from_agent IS NOT NULL THEN bytes END), 0)::bigint
             FROM source_bytes",
            &[],
        )?;
        let installs_by_state = conn
            .query(
                "SELECT install_state, count(*) FROM participants
                 WHERE install_state IS NOT NULL GROUP BY install_state ORDER BY install_state",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, u64_at(r, 1)?)))
            .collect::<Result<_>>()?;
        Ok(StoreTotals {
            installs_by_state,
            jobs_by_state,
            bytes_from_manager: u64_at(&r, 0)?,
            bytes_from_relays: u64_at(&r, 1)?,
        })
    }

    fn add_audit(&mut self, e: &AuditEntry, keep: u64) -> Result<u64> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        let r = tx.one(
            "INSERT INTO audit_log (at, via, who, address, action, target, result, status, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            &[
                &saturate(e.at),
                &truncate_text(&e.via, AUDIT_MAX_TEXT),
                &truncate_text(&e.who, AUDIT_MAX_TEXT),
                &truncate_text(&e.address, AUDIT_MAX_TEXT),
                &truncate_text(&e.action, AUDIT_MAX_TEXT),
                &truncate_text(&e.target, AUDIT_MAX_TEXT),
                &truncate_text(&e.result, AUDIT_MAX_TEXT),
                &e.status.map(i64::from),
                &e.error.as_deref().map(|t| truncate_text(t, AUDIT_MAX_TEXT)),
            ],
        )?;
        let id: i64 = r.try_get(0)?;
        // Ids only grow, so the newest `keep` are those above `id - keep`.
        tx.exec(
            "DELETE FROM audit_log WHERE id <= $1",
            &[&id.saturating_sub(saturate(keep))],
        )?;
        tx.commit()?;
        Ok(u64::try_from(id).unwrap_or(0))
    }

    fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<AuditEntry>> {
        self.conn()?
            .query(
                "SELECT id, at, via, who, address, action, target, result, status, error
                 FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&before.map_or(i64::MAX, saturate), &saturate(limit as u64)],
            )?
            .iter()
            .map(|r| {
                let status: Option<i64> = r.try_get(8)?;
                Ok(AuditEntry {
                    id: u64_at(r, 0)?,
                    at: u64_at(r, 1).unwrap_or(0),
                    via: r.try_get(2)?,
                    who: r.try_get(3)?,
                    address: r.try_get(4)?,
                    action: r.try_get(5)?,
                    target: r.try_get(6)?,
                    result: r.try_get(7)?,
                    status: status.and_then(|s| u16::try_from(s).ok()),
                    error: r.try_get(9)?,
                })
            })
            .collect()
    }

    fn next_cert_serial(&mut self, id: &str, not_after: u64) -> Result<u64> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        let serial: i64 = tx
            .one(
                "UPDATE counters SET value = value + 1 WHERE name = 'cert_serial' RETURNING value",
                &[],
            )?
            .try_get(0)?;
        let updated = tx.exec(
            "UPDATE agents SET last_serial = $2, cert_not_after = $3
             WHERE id = $1 AND revoked_at IS NULL",
            &[&id, &serial, &int(not_after)?],
        )?;
        if updated == 0 {
            return Err(StoreError::NotFound(format!("agent {id}")));
        }
        tx.commit()?;
        u64::try_from(serial).map_err(|_| StoreError::Corrupt(format!("serial {serial}")))
    }

    fn revoke_agent(&mut self, id: &str, now: u64) -> Result<Option<RevocationRecord>> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        // Fenced: what a new active manager loads into its caches at takeover.
        self.check_fence(&tx)?;
        let Some(r) = tx.opt(
            "SELECT last_serial, cert_not_after, revoked_at FROM agents WHERE id = $1 FOR UPDATE",
            &[&id],
        )?
        else {
            return Ok(None);
        };
        let (last_serial, not_after, revoked_at) =
            (opt_u64_at(&r, 0)?, opt_u64_at(&r, 1)?, opt_u64_at(&r, 2)?);
        let record = match revoked_at {
            Some(at) => match tx.opt(
                "SELECT up_to_serial, expires_at, revoked_at FROM revocations WHERE id = $1",
                &[&id],
            )? {
                Some(r) => revocation_record(id, &r)?,
                None => RevocationRecord {
                    id: id.to_string(),
                    up_to_serial: last_serial.unwrap_or(0),
                    expires_at: 0,
                    revoked_at: at,
                },
            },
            None => {
                let record = RevocationRecord {
                    id: id.to_string(),
                    up_to_serial: last_serial.unwrap_or(0),
                    expires_at: not_after.unwrap_or(0),
                    revoked_at: now,
                };
                tx.exec(
                    "UPDATE agents SET revoked_at = $2 WHERE id = $1",
                    &[&id, &int(now)?],
                )?;
                if record.up_to_serial > 0 {
                    tx.exec(
                        "INSERT INTO revocations (id, up_to_serial, expires_at, revoked_at)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (id) DO UPDATE SET up_to_serial = excluded.up_to_serial,
                             expires_at = excluded.expires_at, revoked_at = excluded.revoked_at",
                        &[
                            &id,
                            &int(record.up_to_serial)?,
                            &int(record.expires_at)?,
                            &int(now)?,
                        ],
                    )?;
                }
                record
            }
        };
        tx.commit()?;
        Ok(Some(record))
    }

    fn revoked_agents(&self) -> Result<Vec<String>> {
        self.conn()?
            .query(
                "SELECT id FROM agents WHERE revoked_at IS NOT NULL ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    fn live_revocations(&mut self, now: u64) -> Result<Vec<RevocationRecord>> {
        let conn = self.conn()?;
        // A certificate without an expiry (0) never expires: its entry stays.
        conn.exec(
            "DELETE FROM revocations WHERE expires_at != 0 AND expires_at <= $1",
            &[&int(now)?],
        )?;
        conn.query(
            "SELECT id, up_to_serial, expires_at, revoked_at FROM revocations
             ORDER BY expires_at = 0 DESC, expires_at DESC, id",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok(RevocationRecord {
                id: r.try_get(0)?,
                up_to_serial: u64_at(r, 1)?,
                expires_at: u64_at(r, 2)?,
                revoked_at: u64_at(r, 3)?,
            })
        })
        .collect()
    }

    fn next_revocation_version(&mut self) -> Result<u64> {
        let v: i64 = self
            .conn()?
            .one(
                "UPDATE counters SET value = value + 1 WHERE name = 'revocation_list'
                 RETURNING value",
                &[],
            )?
            .try_get(0)?;
        u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("revocation version {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_are_told_from_files_and_passwords_are_redacted() {
        assert!(is_postgres_url("postgres://baton@db:5432/baton"));
        assert!(is_postgres_url("postgresql:///baton?host=/run/postgresql"));
        assert!(is_postgres_url("host=/run/postgresql dbname=baton"));
        assert!(!is_postgres_url("/var/lib/baton/baton.db"));
        assert!(!is_postgres_url("baton.db"));
        assert_eq!(
            redact("postgres://baton:s3cret@db/baton"),
            "postgres://baton:***@db/baton"
        );
        assert_eq!(
            redact("host=db password=s3cret dbname=b"),
            "host=db password=*** dbname=b"
        );
    }

    #[test]
    fn a_url_carrying_a_password_is_refused_before_connecting() {
        for url in [
            "postgres://baton:s3cret@127.0.0.1:1/baton",
            "host=127.0.0.1 port=1 password=s3cret",
        ] {
            match PostgresStore::connect(url, None) {
                Err(StoreError::BadUrl(why)) => {
                    assert!(why.contains("--db-password-file"), "{why}");
                    assert!(!why.contains("s3cret"), "{why}");
                }
                other => panic!("expected BadUrl, got {other:?}"),
            }
        }
    }
}
