//! The manager's database: enrolled agents and their latest reports, one-time
//! enrolment tokens (expiring, revocable, optionally bound to one agent id), published content, jobs, participants, confirmations and
//! the bytes each source delivered (claim 8); the segments their leaders
//! report, with each segment's leader history; what administrators define:
//! content groups and named distribution policies (claim 9); and the web UI's
//! administrators, named API tokens and sessions; the audit log of changes.
//!
//! [`Store`] is the one way into the database for the rest of the manager
//! (and for `baton admin`), so another backend (PostgreSQL) can be added beside
//! [`SqliteStore`], the default. The job engine's [`Persist`] records are
//! applied with [`Store::apply`], all of one batch in one transaction, before
//! any instruction that depends on them is sent (persist before instruct).
//! Secrets never reach the store in the clear: it keeps password hashes and
//! token and session-id digests, computed by the callers (`http::web::users`).
//!
//! - this module: the [`Store`] trait, [`StoreError`] and the records it reads
//!   and writes (re-exported from `baton_manager_core::records`);
//! - [`schema`]: the one list of migrations, which creates every table, and
//!   [`SCHEMA_VERSION`];
//! - [`sqlite`]: [`SqliteStore`], one SQLite file in WAL mode;
//! - [`postgres`]: [`PostgresStore`], a PostgreSQL database (`--db postgres://…`),
//!   over the connection pool of `pg`;
//! - [`lease`]: which of several managers on one PostgreSQL database is active, and the
//!   fence that keeps the others' writes out;
//! - [`copy`]: `baton db copy`, an installation moved from SQLite to PostgreSQL;
//! - [`test_database`]: throwaway PostgreSQL databases for the tests of both.

pub mod copy;
pub mod fence;
pub mod lease;
mod pg;
pub mod postgres;
pub mod schema;
pub mod sqlite;
pub mod test_database;

pub use postgres::{PostgresStore, is_postgres_url};
pub use schema::SCHEMA_VERSION;
pub use sqlite::SqliteStore;

use std::collections::BTreeMap;

use baton_protocol::message::Report;
use baton_protocol::types::{AgentId, Digest, PublicKey};

use crate::roles::Role;

use baton_manager_core::engine::{FailCause, ParticipantState, Persist};
pub use baton_manager_core::records::*;

/// What a store keeps of a secret (an enrolment token, an API token, a web session's id):
/// its SHA-256, never the secret itself.
pub fn secret_digest(secret: &str) -> [u8; 32] {
    use sha2_std::Digest as _;
    sha2_std::Sha256::digest(secret.as_bytes()).into()
}

/// The public name of an enrolment token in listings and `--revoke`: the first 12 hex
/// digits of its digest (the token itself is never stored).
pub fn token_id(hash: &Digest) -> String {
    hex::encode(&hash[..6])
}

/// How long an enrolment token is valid when its maker does not say (24 h), in seconds.
pub const DEFAULT_TOKEN_LIFETIME: u64 = 24 * 3600;

/// What a new enrolment token is valid for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewToken {
    /// Unix time after which it is refused.
    pub expires_at: u64,
    /// The one agent id it may enrol; `None`: any id.
    pub bound_id: Option<String>,
    /// Labels the agent it enrols must report, in every report from then on (empty: none).
    pub labels: BTreeMap<String, String>,
}

/// An enrolment token as listed (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TokenRecord {
    /// Its public name ([`token_id`]).
    pub id: String,
    /// When it was made (Unix seconds).
    pub created_at: u64,
    /// When it expires (Unix seconds).
    pub expires_at: u64,
    /// The one agent id it may enrol, if bound.
    pub bound_id: Option<String>,
    /// Labels the agent it enrols must report (empty: none).
    pub labels: BTreeMap<String, String>,
    /// `unused`, `used`, `expired` or `revoked`, at the time of listing.
    pub state: &'static str,
    /// The agent it enrolled, once used.
    pub used_by: Option<String>,
    /// When it was used (Unix seconds).
    pub used_at: Option<u64>,
    /// When it was revoked (Unix seconds).
    pub revoked_at: Option<u64>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database itself failed (IO, corruption, constraint).
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The PostgreSQL server or the connection to it failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The PostgreSQL connection URL is malformed or carries a password.
    #[error("database URL: {0}")]
    BadUrl(String),
    /// No connection to the database could be had (pool exhausted, thread not started).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A value beyond the database's signed 64-bit integers.
    #[error("value {0} does not fit the database's 64-bit integers")]
    TooLarge(u64),
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
    /// The enrolment token is unknown (never made, or mistyped).
    #[error("enrolment token is unknown")]
    BadToken,
    /// The enrolment token was used already (tokens are one-time).
    #[error("enrolment token was already used (by {0:?})")]
    TokenUsed(String),
    /// The enrolment token expired at this Unix time.
    #[error("enrolment token expired at {0} (Unix seconds)")]
    TokenExpired(u64),
    /// The enrolment token was revoked.
    #[error("enrolment token was revoked")]
    TokenRevoked,
    /// The enrolment token enrols only this other agent id.
    #[error("enrolment token is bound to agent {0:?}")]
    TokenBoundElsewhere(String),
    /// A row holds a value this build cannot read back.
    #[error("corrupt database row: {0}")]
    Corrupt(String),
    /// This manager does not hold the lease (another one took it over, or it expired): the
    /// write was refused.
    #[error("not written: this manager no longer holds the lease ({0})")]
    Fenced(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Something of that name exists already.
    #[error("{0} already exists")]
    Duplicate(String),
    /// The database file could not be created owner-only or made so.
    #[error(transparent)]
    File(#[from] baton_agent_core::linux::datadir::DataDirError),
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
    /// Stores the hash of a new one-time enrolment token, valid until `token.expires_at`
    /// and, if `token.bound_id` is set, for that agent id only.
    fn add_token(&mut self, hash: &Digest, token: &NewToken, now: u64) -> Result<()>;
    /// Every enrolment token, newest first, with its state at `now`.
    fn tokens(&self, now: u64) -> Result<Vec<TokenRecord>>;
    /// Per agent enrolled with a label-bound token: the labels it must report.
    fn bound_labels(&self) -> Result<Vec<(String, BTreeMap<String, String>)>>;
    /// Revokes the unused tokens whose listed id ([`token_id`]) is `id`; whether there was one.
    fn revoke_token(&mut self, id: &str, now: u64) -> Result<bool>;
    /// Uses the token with this hash to enrol `id` with `key` (binding it to the token's
    /// labels): all or nothing happens. A
    /// token that is unknown, used, expired, revoked or bound to another id is refused with
    /// the error naming which.
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
    /// Records a batch of reports (each as [`Store::record_report`]) and of agents seen now
    /// (as [`Store::mark_seen`]), in one transaction where the database has them, so that a
    /// storm of reports costs one commit per batch rather than one per report. An agent
    /// not enrolled fails only its own record: those errors are returned, in order; an
    /// error of the database itself is `Err` (nothing of the batch is then recorded).
    fn record_reports(
        &mut self,
        reports: &[Report],
        seen: &[AgentId],
        now: u64,
    ) -> Result<Vec<StoreError>> {
        let mut refused = Vec::new();
        for report in reports {
            match self.record_report(report, now) {
                Ok(()) => {}
                Err(e @ StoreError::NotFound(_)) => refused.push(e),
                Err(e) => return Err(e),
            }
        }
        for id in seen {
            self.mark_seen(id.as_str(), now)?;
        }
        Ok(refused)
    }
    /// Places agent `id` (administrator action): sets the given segment and election
    /// score, keeps the other; `NotFound` if it is not enrolled.
    fn place_agent(&mut self, id: &str, segment: Option<&str>, score: Option<u32>) -> Result<()>;
    /// Records the placement an agent's first report makes, if it has none yet (a score the
    /// administrator set is kept); returns whether it was recorded.
    fn place_at_enrolment(&mut self, id: &str, segment: &str, score: u32) -> Result<bool>;

    /// Stores content (replacing an earlier record of the same root).
    fn put_content(&mut self, content: &ContentRecord) -> Result<()>;
    /// Content by root.
    fn content(&self, root: &Digest) -> Result<Option<ContentRecord>>;
    /// The highest version published under `name`.
    fn latest_version(&self, name: &str) -> Result<Option<u64>>;

    /// Appends a signed trust document (encoded `SignedTrust`) of `version`, which must be
    /// above every stored one ([`StoreError::Duplicate`] otherwise), and drops the oldest
    /// beyond the newest `keep`.
    fn add_trust(&mut self, version: u64, document: &[u8], now: u64, keep: usize) -> Result<()>;
    /// The stored trust documents (encoded), oldest first.
    fn trust_chain(&self) -> Result<Vec<Vec<u8>>>;

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
    /// The versions running on agents, per content name (migration 11), by agent then name;
    /// `agent`: one agent's only.
    fn running_versions(&self, agent: Option<&str>) -> Result<Vec<RunningRecord>>;

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

    /// Adds administrator `name` with `password_hash` (a PHC string), or replaces the hash
    /// of an existing one and ends its web sessions (a stolen session ends with the password).
    /// `role`: the administrator's role (`None`: `admin` when added, unchanged when replaced).
    fn set_admin(
        &mut self,
        name: &str,
        password_hash: &str,
        role: Option<Role>,
        now: u64,
    ) -> Result<AdminSet>;
    /// The role of administrator `name` (`None`: no such administrator).
    fn admin_role(&self, name: &str) -> Result<Option<Role>>;
    /// The stored password hash of administrator `name`.
    fn admin_hash(&self, name: &str) -> Result<Option<String>>;
    /// Every administrator's name, sorted.
    fn admins(&self) -> Result<Vec<String>>;

    /// Stores the API token `name` by its hash, replacing an earlier token of that name.
    fn new_api_token(&mut self, name: &str, hash: &Digest, role: Role, now: u64) -> Result<()>;
    /// The name and role of the API token with this hash, if there is one.
    fn api_token(&self, hash: &Digest) -> Result<Option<(String, Role)>>;
    /// Deletes the API token `name`; whether there was one.
    fn revoke_api_token(&mut self, name: &str) -> Result<bool>;

    /// Stores a new web UI session if its administrator's password hash is still
    /// `password_hash`, the one the login verified (a login racing a password change
    /// creates none); whether it was stored.
    fn create_session(&mut self, session: &SessionRecord, password_hash: &str) -> Result<bool>;
    /// The session whose id has this hash.
    fn session(&self, id_hash: &Digest) -> Result<Option<SessionRecord>>;
    /// Marks a session used at `now` (the wall clock, also if it stepped back); whether it exists.
    fn touch_session(&mut self, id_hash: &Digest, now: u64) -> Result<bool>;
    /// Ends a session; whether it existed.
    fn delete_session(&mut self, id_hash: &Digest) -> Result<bool>;
    /// Ends every session last used at or before `idle_since`, then the least recently used
    /// ones beyond the `keep` most recent; returns how many ended.
    fn expire_sessions(&mut self, idle_since: u64, keep: usize) -> Result<u64>;

    /// Jobs per state and the bytes the manager and relays delivered, over all jobs.
    fn totals(&self) -> Result<StoreTotals>;

    /// Appends `entry` to the audit log (its `id` is ignored) and drops the oldest entries
    /// beyond the newest `keep`; returns the new entry's id.
    fn add_audit(&mut self, entry: &AuditEntry, keep: u64) -> Result<u64>;
    /// Audit entries, newest first: at most `limit`, only those with an id below `before`
    /// when it is given (the next page starts before the last id of this one).
    fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<AuditEntry>>;

    // ---- certificates and revocation (migration 10)

    /// The next certificate serial for enrolled agent `id` (the counter only grows, also
    /// across restarts), recording it and the certificate's expiry `not_after` (Unix
    /// seconds) as the agent's latest.
    fn next_cert_serial(&mut self, id: &str, not_after: u64) -> Result<u64>;
    /// Revokes enrolled agent `id` at `now`: it leaves the fleet views ([`Store::agents`],
    /// [`Store::agent`]) and its certificates up to the last serial issued to it are
    /// recorded for the revocation list. `None` if no such agent is enrolled (an agent
    /// revoked already is answered with its record again).
    fn revoke_agent(&mut self, id: &str, now: u64) -> Result<Option<RevocationRecord>>;
    /// The ids of every revoked agent (refused at the handshake).
    fn revoked_agents(&self) -> Result<Vec<String>>;
    /// Revocations whose certificates have not all expired at `now`, latest expiry first;
    /// those that have are deleted (the agents stay revoked).
    fn live_revocations(&mut self, now: u64) -> Result<Vec<RevocationRecord>>;
    /// The next revocation list version (grows, also across restarts).
    fn next_revocation_version(&mut self) -> Result<u64>;
}

/// One revoked agent as the revocation list carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The agent's id.
    pub id: String,
    /// The last certificate serial issued to it before the revocation (0: none).
    pub up_to_serial: u64,
    /// When the last of those certificates expires (Unix seconds; 0: none was issued).
    pub expires_at: u64,
    /// When it was revoked (Unix seconds).
    pub revoked_at: u64,
}

/// One entry of the audit log: a change someone made through the manager, and its result.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Its id: entries are numbered in the order they were made; ids are never reused.
    pub id: u64,
    /// When (Unix seconds).
    pub at: u64,
    /// How the caller authenticated: `admin-token`, `api-token`, `session` (an
    /// administrator in the web UI), `login` (a login attempt) or `cli` (a command that
    /// opened the database on the manager's host).
    pub via: String,
    /// Who: the API token's or administrator's name (empty for the admin token; for
    /// `cli`, the user running it).
    pub who: String,
    /// The client's IP address (`local` for `cli`).
    pub address: String,
    /// What was done, e.g. `group.create`, `job.start`, `login`.
    pub action: String,
    /// What it was done to (a name, a job, an agent), at most [`AUDIT_MAX_TEXT`] bytes.
    pub target: String,
    /// `ok` or `refused`.
    pub result: String,
    /// The HTTP status answered, if it went through the API.
    pub status: Option<u16>,
    /// Why it was refused, at most [`AUDIT_MAX_TEXT`] bytes.
    pub error: Option<String>,
}

/// Longest `target` or `error` an audit entry keeps, in bytes; longer ones are cut (at a
/// character boundary) and end in `…`.
pub const AUDIT_MAX_TEXT: usize = 256;

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The install state a stored confirmed participant resumes in, if it is not running:
/// `Some(None)` while its agent's report is awaited, `Some(Some(state))` for a state
/// reported; `None` for a running one (or a record from before install states were kept).
pub fn resume_install(
    p: &ParticipantRecord,
) -> Option<Option<baton_protocol::message::InstallState>> {
    if p.state != PartState::Confirmed {
        return None;
    }
    let phase = p.install.as_ref()?.state;
    (phase != InstallPhase::Running).then(|| phase.state())
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

#[cfg(test)]
mod tests;

/// The store shared by the manager's tasks.
pub type SharedStore = std::sync::Arc<std::sync::Mutex<Box<dyn Store>>>;

/// Locks the shared store (a panic elsewhere does not make it unusable).
pub fn lock(store: &SharedStore) -> std::sync::MutexGuard<'_, Box<dyn Store>> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}
