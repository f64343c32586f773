//! Several managers on one PostgreSQL database: one active, the others standing by.
//!
//! [`Lease`] drives the lease row of [`crate::store::lease`] from async code: a
//! standby tries to take it every [`Lease::poll_every`] (and learns meanwhile which
//! manager is active, for its read-only API: [`Activity`]); the active manager
//! renews it every third of its time-to-live and, when a renewal is refused or none
//! succeeds before the lease would expire by its own monotonic clock, reports it
//! lost so that the manager stops acting at once ([`Lease::keep`]). Its own clock
//! errs on the safe side: the lease counts from when a renewal was *sent* (the
//! database counts from when it ran it), less a tenth. A manager frozen past its
//! lease (SIGSTOP, a paused VM) counts it lost at its first check after it runs again,
//! as far as its monotonic clock has advanced (`CLOCK_MONOTONIC` does not count a host
//! suspend, so a suspended host's manager may act until a renewal is refused); the
//! writes that matter are refused by the database ([`crate::store::fence::LeaseFence`]),
//! but frames already queued on its sockets may still go out: agents ignore instructions
//! of an older epoch once they have seen the new one.
//!
//! Bounds: the time-to-live is at most [`MAX_LEASE_TTL`] (default
//! [`DEFAULT_LEASE_TTL`]); a standby polls at least every second; every database
//! call of the lease has its own connection pool and is abandoned (the lease counted
//! lost) when it does not answer before the lease would expire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::fence::LeaseFence;
use crate::store::lease::{LeaseTake, LeaseView};
use crate::store::{PostgresStore, StoreError};

/// The lease's default time-to-live: a dead active manager is replaced within about this
/// long (plus a standby's poll).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(9);
/// The longest time-to-live `--lease-ttl` accepts.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(10);
/// The shortest time-to-live `--lease-ttl` accepts (renewals every third of it).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// The wait before a renewal that failed (the database did not answer) is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(500);
/// The longest a standby waits between two attempts to take the lease.
const MAX_POLL: Duration = Duration::from_secs(1);

/// Whether this manager is active or a standby, and which manager is active, for the
/// status API and the read-only refusals.
#[derive(Debug, Default)]
pub struct Activity {
    standby: bool,
    active: Mutex<Option<LeaseView>>,
    /// On an active manager sharing a database: its fence; changes are refused once it no
    /// longer acts ([`LeaseFence::acting`]).
    fence: Option<Arc<LeaseFence>>,
}

impl Activity {
    /// The active manager (also a manager on SQLite, the only one).
    pub fn active() -> Arc<Self> {
        Arc::new(Activity::default())
    }

    /// A standby; who is active is learnt as it polls the lease.
    pub fn standby() -> Arc<Self> {
        Arc::new(Activity {
            standby: true,
            active: Mutex::new(None),
            fence: None,
        })
    }

    /// The active manager holding the lease of `fence`: once the lease has run out by its
    /// own clock, it refuses changes like a standby, before it has stepped down.
    pub fn active_fenced(fence: Arc<LeaseFence>) -> Arc<Self> {
        Arc::new(Activity {
            standby: false,
            active: Mutex::new(None),
            fence: Some(fence),
        })
    }

    /// Whether requests that change something are refused: a standby, or an active manager
    /// whose lease ran out.
    pub fn refuses_changes(&self) -> bool {
        self.standby || self.fence.as_ref().is_some_and(|f| !f.acting())
    }

    /// Whether this manager stands by (serves reads only, takes no agent).
    pub fn is_standby(&self) -> bool {
        self.standby
    }

    /// `active` or `standby`.
    pub fn role(&self) -> &'static str {
        if self.standby { "standby" } else { "active" }
    }

    /// The lease as a standby last saw it (`None`: an active manager, or not read yet).
    pub fn active_manager(&self) -> Option<LeaseView> {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn saw(&self, view: LeaseView) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }
}

/// A holder id for this process: host name, process id and a random part (two processes
/// never share one, even on one host).
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "host".to_string()
    } else {
        host
    };
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// This manager's side of the lease: its own connection pool, its holder id and fence.
#[derive(Clone, Debug)]
pub struct Lease {
    store: Arc<PostgresStore>,
    fence: Arc<LeaseFence>,
    ttl: Duration,
}

/// Runs a blocking lease call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("lease call: {e}"))))
}

impl Lease {
    /// The lease of `fence`'s holder over `store` (a connection pool of its own), lasting
    /// `ttl` (clamped to [`MIN_LEASE_TTL`]..=[`MAX_LEASE_TTL`]).
    pub fn new(store: PostgresStore, fence: Arc<LeaseFence>, ttl: Duration) -> Self {
        Lease {
            store: Arc::new(store),
            fence,
            ttl: ttl.clamp(MIN_LEASE_TTL, MAX_LEASE_TTL),
        }
    }

    /// This manager's fence (the engine task checks [`LeaseFence::acting`] before it
    /// instructs).
    pub fn fence(&self) -> Arc<LeaseFence> {
        self.fence.clone()
    }

    /// Its time-to-live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often a standby tries to take the lease: a third of its time-to-live, at most a
    /// second.
    pub fn poll_every(&self) -> Duration {
        (self.ttl / 3).min(MAX_POLL)
    }

    /// How long this manager counts a renewal sent at `sent` valid: the time-to-live less a
    /// tenth (the database counts from later, when it ran the renewal).
    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.ttl / 10
    }

    /// One attempt to take the lease for this manager (agent port and HTTP API at these
    /// addresses): the epoch taken and until when it is valid by this manager's clock, or
    /// `None` (another manager holds it, told to `activity`; or the database failed, logged
    /// at most every tenth failure in a row).
    pub async fn try_take(
        &self,
        agent_addr: &str,
        http_addr: &str,
        activity: &Activity,
        failures: &mut u32,
    ) -> Option<(u32, Instant)> {
        let sent = Instant::now();
        let (store, holder, agent, http, ttl) = (
            self.store.clone(),
            self.fence.holder().to_string(),
            agent_addr.to_string(),
            http_addr.to_string(),
            self.ttl,
        );
        // Bounded: a database that does not answer (or a lock held by a frozen process)
        // must not keep a standby from trying again.
        let call = blocking(move || store.lease_take(&holder, &agent, &http, ttl));
        let answer = tokio::time::timeout(self.ttl, call)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    self.ttl.as_millis()
                )))
            });
        match answer {
            Ok(LeaseTake::Taken(epoch)) => {
                let until = self.valid_until(sent);
                self.fence.set_valid_until(until.into_std());
                self.fence.set_epoch(epoch);
                Some((epoch, until))
            }
            Ok(LeaseTake::Held(view)) => {
                *failures = 0;
                let changed = activity
                    .active_manager()
                    .is_none_or(|seen| seen.holder != view.holder || seen.epoch != view.epoch);
                if changed {
                    tracing::info!(
                        active = view.holder.as_deref().unwrap_or("-"),
                        agent_port = view.agent_addr.as_deref().unwrap_or("-"),
                        http = view.http_addr.as_deref().unwrap_or("-"),
                        epoch = view.epoch,
                        expires_in_ms = view.expires_in_ms,
                        "standing by: another manager holds the lease"
                    );
                }
                activity.saw(view);
                None
            }
            Err(e) => {
                *failures += 1;
                // Spaced: the first failure in a row, then one in ten (about every 10 s).
                if *failures % 10 == 1 {
                    tracing::warn!(failures = *failures, "cannot read the managers' lease: {e}");
                }
                None
            }
        }
    }

    /// Stands by until the lease is taken, trying every [`Self::poll_every`]; returns the
    /// epoch taken and until when it is valid by this manager's clock.
    pub async fn take(
        &self,
        agent_addr: &str,
        http_addr: &str,
        activity: &Activity,
    ) -> (u32, Instant) {
        let mut failures = 0;
        loop {
            if let Some(taken) = self
                .try_take(agent_addr, http_addr, activity, &mut failures)
                .await
            {
                return taken;
            }
            tokio::time::sleep(self.poll_every()).await;
        }
    }

    /// Keeps the lease taken with `epoch`, valid until `valid_until`, renewed every third of
    /// its time-to-live; returns (with the fence closed) why it was lost: a renewal
    /// refused, or none succeeded before it would expire.
    pub async fn keep(&self, epoch: u32, mut valid_until: Instant) -> String {
        let renew_every = self.ttl / 3;
        let mut next = Instant::now() + renew_every;
        let mut failures = 0u32;
        // Whether the lease may still stand in the database (no renewal was refused): it is
        // then released, conditionally on this holder and epoch, so that a renewal the
        // database ran late does not keep it from a standby.
        let mut release = true;
        let why = loop {
            tokio::time::sleep_until(next.min(valid_until)).await;
            let sent = Instant::now();
            if sent >= valid_until {
                break format!(
                    "not renewed within its time-to-live ({} ms; was this process frozen, or the database unreachable?)",
                    self.ttl.as_millis()
                );
            }
            let (store, holder, ttl) = (
                self.store.clone(),
                self.fence.holder().to_string(),
                self.ttl,
            );
            let call = blocking(move || store.lease_renew(&holder, epoch, ttl));
            match tokio::time::timeout_at(valid_until, call).await {
                Err(_) => {
                    break "the database did not answer a renewal before the lease expired"
                        .to_string();
                }
                Ok(Ok(true)) => {
                    failures = 0;
                    valid_until = self.valid_until(sent);
                    self.fence.set_valid_until(valid_until.into_std());
                    next = sent + renew_every;
                }
                Ok(Ok(false)) => {
                    release = false;
                    break "the database says it expired or another manager took it over"
                        .to_string();
                }
                Ok(Err(e)) => {
                    // Retried every half second; said once every 2 s at most.
                    failures += 1;
                    if failures % 4 == 1 {
                        tracing::warn!(failures, "cannot renew the lease (retrying): {e}");
                    }
                    next = Instant::now() + RENEW_RETRY;
                }
            }
        };
        self.fence.set_epoch(0);
        if release {
            let lease = self.clone();
            tokio::spawn(async move { lease.release(epoch).await });
        }
        why
    }

    /// [`Self::release`] from synchronous code (a guard's drop): blocks for at most one
    /// database call.
    pub fn release_blocking(&self, epoch: u32) {
        self.fence.set_epoch(0);
        match self.store.lease_release(self.fence.holder(), epoch) {
            Ok(true) => tracing::info!(epoch, "lease released"),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot release the lease (it expires by itself): {e}"),
        }
    }

    /// Gives the lease up now (a clean stop), so a standby takes over at once; waits at most
    /// a time-to-live.
    pub async fn release(&self, epoch: u32) {
        self.fence.set_epoch(0);
        let (store, holder) = (self.store.clone(), self.fence.holder().to_string());
        let call = blocking(move || store.lease_release(&holder, epoch));
        match tokio::time::timeout(self.ttl, call).await {
            Ok(Ok(true)) => tracing::info!(epoch, "lease released"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!("cannot release the lease (it expires by itself): {e}"),
            Err(_) => tracing::warn!("the lease release was not answered (it expires by itself)"),
        }
    }
}
