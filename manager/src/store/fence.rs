//! The fence on a PostgreSQL database shared by several managers: which writes
//! this manager may still make ([`LeaseFence`]).
//!
//! The writes that matter (the engine's records — participant states,
//! confirmations, job completion —, job states and new jobs) first check, in their
//! own transaction, that the lease row (`manager_lease`, see [`super::lease`]) is
//! still this holder's with this epoch and unexpired, holding the row with
//! `FOR KEY SHARE` so that a takeover (which takes it `FOR UPDATE`) waits until they
//! commit, while renewals (an `UPDATE` of non-key columns, which takes `FOR NO KEY
//! UPDATE`) do not conflict with it. The wait is bounded ([`FENCE_LOCK_TIMEOUT`]),
//! and a connection left idle in a transaction is ended by the server (see
//! `pg::IDLE_IN_TRANSACTION_TIMEOUT`), so a frozen process cannot hold the
//! row forever. A manager that was frozen past its lease and wakes up cannot write: its
//! transaction finds the lease gone and fails with [`StoreError::Fenced`].
//!
//! A module of its own so that the store ([`super::postgres`]) and the lease
//! calls ([`super::lease`], which extend the store) do not import each other.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::pg::Conn;
use super::{Result, StoreError};

/// Longest a fenced write waits for the lease row's lock (a takeover holding it): a third
/// of the longest lease time-to-live. A takeover's transaction is short; one held longer is
/// a frozen process, and waiting on it would stall this manager past its own lease.
pub const FENCE_LOCK_TIMEOUT: Duration = Duration::from_millis(3_000);

/// Who may write: the lease holder id of this manager and the epoch it holds the lease
/// with (0: it does not hold it, and every fenced write is refused).
///
/// It also keeps this manager's own view, by its monotonic clock, of until when the lease
/// is valid ([`LeaseFence::acting`]): the engine task checks it before it instructs agents,
/// so that a manager woken after its lease ran out sends nothing, whichever of its tasks
/// runs first.
#[derive(Debug)]
pub struct LeaseFence {
    holder: String,
    epoch: AtomicU32,
    valid_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl LeaseFence {
    /// A fence for holder `holder` that holds no lease yet.
    pub fn new(holder: String) -> Self {
        LeaseFence {
            holder,
            epoch: AtomicU32::new(0),
            valid_until: std::sync::Mutex::new(None),
        }
    }

    /// This manager's holder id.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The epoch this manager holds the lease with (0: none).
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Records that the lease was taken with `epoch` (0: lost or released).
    pub fn set_epoch(&self, epoch: u32) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Records until when the lease is valid by this manager's clock (taken or renewed).
    pub fn set_valid_until(&self, until: std::time::Instant) {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
    }

    /// Whether this manager may act now: it holds the lease and, by its own clock, the
    /// lease has not run out.
    pub fn acting(&self) -> bool {
        let until = *self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch() != 0 && until.is_some_and(|u| std::time::Instant::now() < u)
    }

    /// Inside a transaction: whether this manager still holds the lease; the row stays
    /// key-share-locked until the transaction ends, so no takeover commits in between
    /// (renewals do).
    pub(super) fn check(&self, tx: &Conn<'_>) -> Result<()> {
        let epoch = self.epoch();
        if epoch == 0 {
            return Err(StoreError::Fenced("it never took it".into()));
        }
        tx.batch(&format!(
            "SET LOCAL lock_timeout = {}",
            FENCE_LOCK_TIMEOUT.as_millis()
        ))?;
        let held = tx.opt(
            "SELECT 1 FROM manager_lease
             WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()
             FOR KEY SHARE",
            &[&self.holder, &i64::from(epoch)],
        )?;
        match held {
            Some(_) => Ok(()),
            None => Err(StoreError::Fenced(format!(
                "epoch {epoch} expired or taken over"
            ))),
        }
    }
}
