//! The fence on a PostgreSQL database shared by several managers: which writes
//! this manager may still make ([`LeaseFence`]).
//!
//! The writes that matter (the engine's records — participant states,
//! confirmations, job completion —, job states and new jobs) first check, in their
//! own transaction, that the lease row (`manager_lease`, see [`super::lease`]) is
//! still this holder's with this epoch and unexpired, holding the row with
//! `FOR SHARE` so that a takeover (which takes it `FOR UPDATE`) waits until they
//! commit. A manager that was frozen past its lease and wakes up cannot write: its
//! transaction finds the lease gone and fails with [`StoreError::Fenced`].
//!
//! A module of its own so that the store ([`super::postgres`]) and the lease
//! calls ([`super::lease`], which extend the store) do not import each other.

use std::sync::atomic::{AtomicU32, Ordering};

use super::pg::Conn;
use super::{Result, StoreError};

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
    /// share-locked until the transaction ends, so no takeover commits in between.
    pub(super) fn check(&self, tx: &Conn<'_>) -> Result<()> {
        let epoch = self.epoch();
        if epoch == 0 {
            return Err(StoreError::Fenced("it never took it".into()));
        }
        let held = tx.opt(
            "SELECT 1 FROM manager_lease
             WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()
             FOR SHARE",
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
