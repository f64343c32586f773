//! The audit log: every change made through the manager — publishing and uploads,
//! jobs and their cancellation, groups, policies, enrolment, agent placement,
//! administrators and API tokens — and every login attempt, with who made it, from
//! which address, what it was, when, and whether it went through.
//!
//! Entries are kept in the store ([`crate::store::Store::add_audit`]); the HTTP API
//! records its changes in one place (the [`crate::http::audit`] layer), logins are
//! recorded by the login form, and the `baton admin` commands, which open the database
//! directly, record themselves as `cli`. The log grows to at most [`AUDIT_KEEP`]
//! entries; each new entry then drops the oldest. Each text field is cut to
//! [`crate::store::AUDIT_MAX_TEXT`] bytes, so the log stays within a few tens of
//! megabytes. It cannot be written or cleared through the API.

use baton_agent_core::linux::spaced::{SpacedLog, WARN_EVERY};

use crate::registry::unix_now;
use crate::store::{AuditEntry, Store};

/// Entries the audit log keeps; beyond it each new entry drops the oldest.
pub const AUDIT_KEEP: u64 = 50_000;

/// The warning about entries that could not be stored, spaced.
static NOT_RECORDED: SpacedLog = SpacedLog::new(WARN_EVERY);

/// Stores `entry` (stamped now if its time is 0), keeping the newest [`AUDIT_KEEP`];
/// a store that fails is warned about (spaced), never fails the change itself.
pub fn record(store: &mut dyn Store, mut entry: AuditEntry) {
    if entry.at == 0 {
        entry.at = unix_now();
    }
    if let Err(e) = store.add_audit(&entry, AUDIT_KEEP)
        && let Some(held_back) = NOT_RECORDED.due()
    {
        tracing::warn!(
            action = %entry.action,
            held_back,
            "cannot record an audit entry: {e}"
        );
    }
}

/// An entry for a change made by a command on the manager's host (`baton admin ...`):
/// `via` = `cli`, `who` = the user running it, `address` = `local`.
pub fn cli_entry(action: &str, target: &str, outcome: Result<(), String>) -> AuditEntry {
    let who = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let (result, error) = match outcome {
        Ok(()) => ("ok", None),
        Err(e) => ("refused", Some(e)),
    };
    AuditEntry {
        id: 0,
        at: unix_now(),
        via: "cli".into(),
        who,
        address: "local".into(),
        action: action.into(),
        target: target.into(),
        result: result.into(),
        status: None,
        error,
    }
}
