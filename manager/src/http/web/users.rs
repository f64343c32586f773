//! Administrators and named API tokens, kept in the manager's database file.
//!
//! These tables sit beside the job store's in the same SQLite file but are
//! reached through their own connection ([`WebStore`]), so `baton admin add`
//! works whether or not a manager is running, and the job store's schema
//! migrations stay untouched: the tables are created with `IF NOT EXISTS`.
//! Passwords are stored as argon2id PHC strings; API tokens as SHA-256
//! hashes. The same connection answers the read-only aggregate queries
//! behind `/metrics`.

use std::path::Path;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rusqlite::{Connection, OptionalExtension, params};
use sha2_std::{Digest as _, Sha256};

/// Shortest password `baton admin add` accepts.
pub const MIN_PASSWORD_LEN: usize = 8;

/// Why an administrator or token operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The name is empty, too long or has spaces or control characters.
    #[error("name {0:?} must be 1 to 64 characters without spaces")]
    BadName(String),
    /// The password is too short.
    #[error("the password must have at least {MIN_PASSWORD_LEN} characters")]
    ShortPassword,
    /// Hashing failed (should not happen with valid parameters).
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Result of a [`WebStore`] operation.
pub type Result<T, E = UserError> = std::result::Result<T, E>;

/// What [`WebStore::set_admin`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminSet {
    /// A new administrator was added.
    Added,
    /// An existing administrator's password was replaced.
    PasswordChanged,
}

/// Aggregates for `/metrics`, read from the job store's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreTotals {
    /// Jobs per state name (`pending`, `running`, `finished`, ...).
    pub jobs_by_state: Vec<(String, u64)>,
    /// Verified bytes agents received from the manager, all jobs.
    pub bytes_from_manager: u64,
    /// Verified bytes agents received from relaying peers, all jobs.
    pub bytes_from_relays: u64,
}

const SCHEMA: &str = "
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
";

/// The administrators' and tokens' tables, on their own connection to the database file.
#[derive(Debug)]
pub struct WebStore {
    conn: Mutex<Connection>,
}

/// Checks an administrator or token name.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.chars().count() > 64
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(UserError::BadName(name.to_string()));
    }
    Ok(())
}

/// Hashes a password as an argon2id PHC string with a random salt.
pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| UserError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash` (a malformed hash never matches).
pub fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// SHA-256 of an API token, as stored.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn sum_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl WebStore {
    /// Opens the database file at `path` (creating it if needed) and the web tables in it.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch(SCHEMA)?;
        Ok(WebStore {
            conn: Mutex::new(conn),
        })
    }

    /// A private in-memory database (tests).
    pub fn in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(WebStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds administrator `name`, or replaces its password.
    pub fn set_admin(&self, name: &str, password: &str, now: u64) -> Result<AdminSet> {
        check_name(name)?;
        if password.chars().count() < MIN_PASSWORD_LEN {
            return Err(UserError::ShortPassword);
        }
        let hash = hash_password(password)?;
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE admin_users SET password_hash = ?2, updated_at = ?3 WHERE name = ?1",
            params![name, hash, now as i64],
        )?;
        if changed > 0 {
            return Ok(AdminSet::PasswordChanged);
        }
        conn.execute(
            "INSERT INTO admin_users (name, password_hash, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
            params![name, hash, now as i64],
        )?;
        Ok(AdminSet::Added)
    }

    /// The stored password hash of administrator `name`.
    pub fn admin_hash(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT password_hash FROM admin_users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Names of all administrators.
    pub fn admins(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM admin_users ORDER BY name")?;
        let names = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(names)
    }

    /// Creates (or replaces) the named API token and returns the token itself (shown once).
    pub fn new_api_token(&self, name: &str, now: u64) -> Result<String> {
        check_name(name)?;
        let mut raw = [0u8; 24];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let token = format!("bt_{}", hex::encode(raw));
        self.conn().execute(
            "INSERT INTO api_tokens (name, hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET hash = excluded.hash, created_at = excluded.created_at",
            params![name, token_digest(&token).as_slice(), now as i64],
        )?;
        Ok(token)
    }

    /// The name of the API token `token`, if it is one.
    pub fn api_token_name(&self, token: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name FROM api_tokens WHERE hash = ?1",
                [token_digest(token).as_slice()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Revokes the named API token; whether it existed.
    pub fn revoke_api_token(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM api_tokens WHERE name = ?1", [name])?
            > 0)
    }

    /// Job counts per state and bytes delivered by the manager and by relays (all jobs).
    ///
    /// Reads the job store's tables; before the job store has created them (a database
    /// only `baton admin add` touched) everything is zero.
    pub fn totals(&self) -> Result<StoreTotals> {
        let conn = self.conn();
        let has_jobs: bool = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('jobs', 'source_bytes')",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n == 2)?;
        if !has_jobs {
            return Ok(StoreTotals::default());
        }
        let mut stmt = conn.prepare("SELECT state, count(*) FROM jobs GROUP BY state")?;
        let jobs_by_state = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, sum_u64(r.get(1)?))))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let (from_manager, from_relays): (i64, i64) = conn.query_row(
            "SELECT ifnull(sum(CASE WHEN from_agent IS NULL THEN bytes END), 0),
                    ifnull(sum(CASE WHEN from_agent IS NOT NULL THEN bytes END), 0)
             FROM source_bytes",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(StoreTotals {
            jobs_by_state,
            bytes_from_manager: sum_u64(from_manager),
            bytes_from_relays: sum_u64(from_relays),
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn administrators_and_passwords() {
        let store = WebStore::in_memory().unwrap();
        assert!(matches!(
            store.set_admin("ops", "short", 1),
            Err(UserError::ShortPassword)
        ));
        assert!(matches!(
            store.set_admin("two words", "long enough", 1),
            Err(UserError::BadName(_))
        ));
        assert_eq!(
            store.set_admin("ops", "correct horse", 1).unwrap(),
            AdminSet::Added
        );
        let hash = store.admin_hash("ops").unwrap().unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(password_matches("correct horse", &hash));
        assert!(!password_matches("correct horsE", &hash));
        assert!(!password_matches("correct horse", "not a hash"));
        assert_eq!(
            store.set_admin("ops", "battery staple", 2).unwrap(),
            AdminSet::PasswordChanged
        );
        let hash = store.admin_hash("ops").unwrap().unwrap();
        assert!(!password_matches("correct horse", &hash));
        assert!(password_matches("battery staple", &hash));
        assert_eq!(store.admins().unwrap(), vec!["ops".to_string()]);
        assert_eq!(store.admin_hash("nobody").unwrap(), None);
    }

    #[test]
    fn api_tokens() {
        let store = WebStore::in_memory().unwrap();
        let token = store.new_api_token("ci", 1).unwrap();
        assert_eq!(store.api_token_name(&token).unwrap().as_deref(), Some("ci"));
        assert_eq!(store.api_token_name("bt_guess").unwrap(), None);
        let again = store.new_api_token("ci", 2).unwrap();
        assert_ne!(token, again);
        assert_eq!(store.api_token_name(&token).unwrap(), None, "replaced");
        assert!(store.revoke_api_token("ci").unwrap());
        assert_eq!(store.api_token_name(&again).unwrap(), None);
    }

    #[test]
    fn totals_without_job_tables_are_zero() {
        let store = WebStore::in_memory().unwrap();
        assert_eq!(store.totals().unwrap(), StoreTotals::default());
    }
}
