//! Administrators' passwords and named API tokens: the secrets, kept apart from
//! the database work.
//!
//! The [`Store`] keeps what is safe to keep: a password as an argon2id PHC
//! string, an API token as its SHA-256 digest. This module checks names and
//! passwords, hashes and verifies them, makes tokens and digests them, and
//! hands the results to the store; `baton admin` and the HTTP layer both go
//! through it.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::roles::Role;
use crate::store::{AdminSet, Store, StoreError, secret_digest};

/// Shortest password `baton admin add` accepts.
pub const MIN_PASSWORD_LEN: usize = 8;

/// Why an administrator or token operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// Result of an administrator or token operation.
pub type Result<T, E = UserError> = std::result::Result<T, E>;

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

/// Adds administrator `name` with `password`, or replaces its password; `role` as
/// [`Store::set_admin`] takes it (`None`: `admin` when added, unchanged when replaced).
pub fn set_admin(
    store: &mut dyn Store,
    name: &str,
    password: &str,
    role: Option<Role>,
    now: u64,
) -> Result<AdminSet> {
    check_name(name)?;
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(UserError::ShortPassword);
    }
    let hash = hash_password(password)?;
    Ok(store.set_admin(name, &hash, role, now)?)
}

/// Creates (or replaces) the named API token with `role` and returns the token itself
/// (shown once).
pub fn new_api_token(store: &mut dyn Store, name: &str, role: Role, now: u64) -> Result<String> {
    check_name(name)?;
    let token = format!("bt_{}", super::random_hex(24));
    store.new_api_token(name, &secret_digest(&token), role, now)?;
    Ok(token)
}

/// The name and role of the API token `token`, if it is one.
pub fn api_token(store: &dyn Store, token: &str) -> Result<Option<(String, Role)>> {
    Ok(store.api_token(&secret_digest(token))?)
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn administrators_and_passwords() {
        let mut store = SqliteStore::in_memory().unwrap();
        assert!(matches!(
            set_admin(&mut store, "ops", "short", None, 1),
            Err(UserError::ShortPassword)
        ));
        assert!(matches!(
            set_admin(&mut store, "two words", "long enough", None, 1),
            Err(UserError::BadName(_))
        ));
        assert_eq!(
            set_admin(&mut store, "ops", "correct horse", None, 1).unwrap(),
            AdminSet::Added
        );
        let hash = store.admin_hash("ops").unwrap().unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(password_matches("correct horse", &hash));
        assert!(!password_matches("correct horsE", &hash));
        assert!(!password_matches("correct horse", "not a hash"));
        assert_eq!(
            set_admin(&mut store, "ops", "battery staple", Some(Role::Read), 2).unwrap(),
            AdminSet::PasswordChanged
        );
        let hash = store.admin_hash("ops").unwrap().unwrap();
        assert!(!password_matches("correct horse", &hash));
        assert!(password_matches("battery staple", &hash));
        assert_eq!(store.admin_role("ops").unwrap(), Some(Role::Read));
        assert_eq!(store.admin_hash("nobody").unwrap(), None);
        assert_eq!(store.admin_role("nobody").unwrap(), None);
        assert_eq!(store.admins().unwrap(), vec!["ops".to_string()]);
        users_keep_their_role_when_the_password_changes(&mut store);
    }

    fn users_keep_their_role_when_the_password_changes(store: &mut SqliteStore) {
        set_admin(store, "ops", "another password", None, 3).unwrap();
        assert_eq!(store.admin_role("ops").unwrap(), Some(Role::Read));
        set_admin(store, "root", "root password", None, 3).unwrap();
        assert_eq!(store.admin_role("root").unwrap(), Some(Role::Admin));
    }

    #[test]
    fn api_tokens() {
        let mut store = SqliteStore::in_memory().unwrap();
        let token = new_api_token(&mut store, "ci", Role::Operate, 1).unwrap();
        assert!(token.starts_with("bt_") && token.len() == 51, "{token}");
        assert_eq!(
            api_token(&store, &token).unwrap(),
            Some(("ci".to_string(), Role::Operate))
        );
        assert_eq!(api_token(&store, "bt_guess").unwrap(), None);
        let again = new_api_token(&mut store, "ci", Role::Read, 2).unwrap();
        assert_ne!(token, again);
        assert_eq!(api_token(&store, &token).unwrap(), None, "replaced");
        assert_eq!(
            api_token(&store, &again).unwrap(),
            Some(("ci".to_string(), Role::Read))
        );
        assert!(store.revoke_api_token("ci").unwrap());
        assert_eq!(api_token(&store, &again).unwrap(), None);
        assert!(matches!(
            new_api_token(&mut store, "", Role::Admin, 3),
            Err(UserError::BadName(_))
        ));
    }
}
