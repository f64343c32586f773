//! The managers' lease on a PostgreSQL database: which of several `baton serve`
//! processes sharing it is active, and the fence that keeps the others' writes out.
//!
//! One row ([`super::schema::POSTGRES_LEASE`]) names the holder, its addresses,
//! the epoch it took the lease with and when the lease expires. Every time is the
//! database's clock (`clock_timestamp()`), never a manager's. Taking the lease
//! ([`PostgresStore::lease_take`]) succeeds only when it is free, expired or already
//! this holder's, and gives it a new epoch — one above both the lease's and the
//! stored manager epoch — so the engine of the new active manager resumes every
//! unfinished job under a new epoch, as after a restart. Renewing
//! ([`PostgresStore::lease_renew`]) succeeds only while the lease is still this
//! holder's, with this epoch, and unexpired.
//!
//! The fence that keeps a former holder's writes out is [`super::fence::LeaseFence`]
//! (a module of its own, which the store's write paths use).

use std::time::Duration;

use super::postgres::PostgresStore;
use super::{Result, StoreError};

/// The lease as the database holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// The holder id of the manager that holds (or last held) it; `None`: never taken.
    pub holder: Option<String>,
    /// That manager's agent port.
    pub agent_addr: Option<String>,
    /// That manager's HTTP API.
    pub http_addr: Option<String>,
    /// The epoch it was taken with.
    pub epoch: u32,
    /// Whether it is still valid (not expired, by the database's clock).
    pub live: bool,
    /// Milliseconds until it expires (negative: expired that long ago).
    pub expires_in_ms: i64,
}

/// What [`PostgresStore::lease_take`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseTake {
    /// Taken (or it was this holder's already) with this epoch.
    Taken(u32),
    /// Another manager holds it.
    Held(LeaseView),
}

fn u32_of(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("lease epoch {v}")))
}

/// `ttl` as a PostgreSQL interval parameter (milliseconds, as `BIGINT`).
fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

const VIEW_COLUMNS: &str = "holder, agent_addr, http_addr, epoch, expires_at > clock_timestamp(),
    (extract(epoch from (expires_at - clock_timestamp())) * 1000)::bigint";

fn view(r: &tokio_postgres::Row) -> Result<LeaseView> {
    Ok(LeaseView {
        holder: r.try_get(0)?,
        agent_addr: r.try_get(1)?,
        http_addr: r.try_get(2)?,
        epoch: u32_of(r.try_get(3)?)?,
        live: r.try_get(4)?,
        expires_in_ms: r.try_get(5)?,
    })
}

impl PostgresStore {
    /// The lease as it stands.
    pub fn lease(&self) -> Result<LeaseView> {
        view(&self.conn()?.one(
            &format!("SELECT {VIEW_COLUMNS} FROM manager_lease WHERE id = 1"),
            &[],
        )?)
    }

    /// Takes the lease for `holder` (whose agent port and HTTP API are at these addresses)
    /// for `ttl` if it is free, expired or `holder`'s already; a new take gets a new epoch,
    /// above the lease's and the stored manager epoch, which is advanced to it.
    pub fn lease_take(
        &self,
        holder: &str,
        agent_addr: &str,
        http_addr: &str,
        ttl: Duration,
    ) -> Result<LeaseTake> {
        let mut conn = self.conn()?;
        let tx = conn.begin()?;
        // A frozen process holding the row (a fenced write's share lock) must not hold up a
        // takeover past a third of the time-to-live: this attempt fails, the next retries.
        tx.batch(&format!(
            "SET LOCAL lock_timeout = {}",
            (ttl / 3).as_millis().max(1)
        ))?;
        let current = view(&tx.one(
            &format!("SELECT {VIEW_COLUMNS} FROM manager_lease WHERE id = 1 FOR UPDATE"),
            &[],
        )?)?;
        if current.live {
            if current.holder.as_deref() == Some(holder) {
                return Ok(LeaseTake::Taken(current.epoch));
            }
            return Ok(LeaseTake::Held(current));
        }
        let stored = match tx.opt("SELECT value FROM meta WHERE key = 'epoch'", &[])? {
            Some(r) => {
                let text: Vec<u8> = r.try_get(0)?;
                std::str::from_utf8(&text)
                    .ok()
                    .and_then(|t| t.parse::<u32>().ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("epoch {text:?}")))?
            }
            None => 0,
        };
        let epoch = stored
            .max(current.epoch)
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("epoch counter overflow".into()))?;
        tx.exec(
            "UPDATE manager_lease SET holder = $1, agent_addr = $2, http_addr = $3, epoch = $4,
                expires_at = clock_timestamp() + $5::bigint * interval '1 millisecond'
             WHERE id = 1",
            &[
                &holder,
                &agent_addr,
                &http_addr,
                &i64::from(epoch),
                &ttl_ms(ttl),
            ],
        )?;
        tx.exec(
            "INSERT INTO meta (key, value) VALUES ('epoch', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&epoch.to_string().into_bytes()],
        )?;
        tx.commit()?;
        Ok(LeaseTake::Taken(epoch))
    }

    /// Extends `holder`'s lease of `epoch` to `ttl` from now; `false` if it is no longer
    /// theirs (expired, or taken over).
    pub fn lease_renew(&self, holder: &str, epoch: u32, ttl: Duration) -> Result<bool> {
        let changed = self.conn()?.exec(
            "UPDATE manager_lease
             SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
             WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()",
            &[&holder, &i64::from(epoch), &ttl_ms(ttl)],
        )?;
        Ok(changed == 1)
    }

    /// Ends `holder`'s lease of `epoch` now (a clean stop: a standby takes over at once);
    /// whether it was still theirs.
    pub fn lease_release(&self, holder: &str, epoch: u32) -> Result<bool> {
        let changed = self.conn()?.exec(
            "UPDATE manager_lease SET expires_at = clock_timestamp()
             WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()",
            &[&holder, &i64::from(epoch)],
        )?;
        Ok(changed == 1)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::fence::LeaseFence;
    use crate::store::test_database::TestDatabase;
    use crate::store::{JobState, Store, TargetSpec};
    use baton_manager_core::engine::{ParticipantState, Persist};
    use baton_protocol::types::AgentId;

    fn confirmed(job: u64, agent: &str) -> Persist {
        Persist::Participant {
            job,
            agent: AgentId::try_from(agent).unwrap(),
            state: ParticipantState::Confirmed,
            source_note: None,
        }
    }

    /// A manager acts only while it holds the lease and its own clock says the lease has not
    /// run out: a process woken after its lease's time acts no more, whatever the database.
    #[test]
    fn a_manager_acts_only_until_its_lease_runs_out_by_its_own_clock() {
        let fence = LeaseFence::new("manager-a".into());
        assert!(!fence.acting(), "no lease taken");
        let now = std::time::Instant::now();
        fence.set_valid_until(now + Duration::from_secs(5));
        assert!(!fence.acting(), "no epoch yet");
        fence.set_epoch(4);
        assert!(fence.acting());
        fence.set_valid_until(now - Duration::from_millis(1));
        assert!(!fence.acting(), "ran out");
        fence.set_valid_until(now + Duration::from_secs(5));
        fence.set_epoch(0);
        assert!(!fence.acting(), "lost or released");
    }

    /// Two managers on one database: one takes the lease, the other is told who holds it;
    /// once it expires the other takes it with a higher epoch, and the first can neither
    /// renew nor write (its confirmation and job state are refused, nothing is stored).
    #[test]
    fn a_lease_lost_fences_the_old_holders_writes() {
        let Some(db) = TestDatabase::create("lease_fences_the_old_holder") else {
            return;
        };
        let ttl = Duration::from_millis(600);
        let a_fence = Arc::new(LeaseFence::new("manager-a".into()));
        let mut a = db.open();
        a.fence_writes(a_fence.clone());
        let b = db.open();
        // Before anyone holds it, a fenced write is refused.
        assert!(matches!(
            a.create_job(&[1; 32], &TargetSpec::All, 1),
            Err(StoreError::Fenced(_))
        ));

        let LeaseTake::Taken(first) = a.lease_take("manager-a", "a:7700", "a:7780", ttl).unwrap()
        else {
            panic!("a free lease is taken");
        };
        assert!(first >= 1);
        assert!(a.epoch().unwrap() >= first, "the manager epoch follows");
        a_fence.set_epoch(first);
        match b.lease_take("manager-b", "b:7700", "b:7780", ttl).unwrap() {
            LeaseTake::Held(v) => {
                assert_eq!(v.holder.as_deref(), Some("manager-a"));
                assert_eq!(v.agent_addr.as_deref(), Some("a:7700"));
                assert_eq!(v.http_addr.as_deref(), Some("a:7780"));
                assert!(v.live && v.expires_in_ms > 0, "{v:?}");
            }
            other => panic!("a live lease is held, got {other:?}"),
        }
        assert!(a.lease_renew("manager-a", first, ttl).unwrap());
        assert!(!b.lease_renew("manager-b", first, ttl).unwrap());

        // The holder writes while it holds the lease.
        a.put_content(&crate::store::tests::content(1, "fw", 1))
            .unwrap();
        let job = a.create_job(&[1; 32], &TargetSpec::All, 1).unwrap();
        a.apply(
            &[Persist::JobStarted {
                job,
                epoch: first,
                order: vec![AgentId::try_from("x").unwrap()],
            }],
            1,
        )
        .unwrap();

        // A stops renewing (frozen); the lease expires and B takes it.
        std::thread::sleep(ttl + Duration::from_millis(200));
        let LeaseTake::Taken(second) = b.lease_take("manager-b", "b:7700", "b:7780", ttl).unwrap()
        else {
            panic!("an expired lease is taken");
        };
        assert!(second > first, "a takeover is a new epoch");
        // A wakes up: nothing it writes is kept.
        assert!(!a.lease_renew("manager-a", first, ttl).unwrap());
        assert!(!a.lease_release("manager-a", first).unwrap());
        let refused = a.apply(&[confirmed(job, "x")], 2).unwrap_err();
        assert!(matches!(refused, StoreError::Fenced(_)), "{refused}");
        assert!(matches!(
            a.set_job_state(job, JobState::Finished, None, 2),
            Err(StoreError::Fenced(_))
        ));
        assert!(a.confirmations(job).unwrap().is_empty());
        assert_eq!(a.job(job).unwrap().unwrap().state, JobState::Running);
        // Nor what the new holder loads into its caches: enrolments, revocations, trust.
        let key = baton_protocol::types::PublicKey([7; 32]);
        assert!(matches!(
            a.enrol("late-agent", &key, 2),
            Err(StoreError::Fenced(_))
        ));
        assert!(matches!(
            a.add_trust(1, b"document", 2, 4),
            Err(StoreError::Fenced(_))
        ));
        assert!(matches!(a.revoke_agent("x", 2), Err(StoreError::Fenced(_))));
        assert!(b.agent("late-agent").unwrap().is_none());

        // A clean stop of B frees the lease at once.
        assert!(b.lease_release("manager-b", second).unwrap());
        let freed = a.lease().unwrap();
        assert!(!freed.live, "{freed:?}");
        let LeaseTake::Taken(third) = a.lease_take("manager-a", "a:7700", "a:7780", ttl).unwrap()
        else {
            panic!("a released lease is taken");
        };
        assert!(third > second);
        a_fence.set_epoch(third);
        a.apply(&[confirmed(job, "x")], 3).unwrap();
        assert_eq!(a.confirmations(job).unwrap().len(), 1);
    }

    /// A frozen process holding the lease row (a fenced write's transaction, never ended)
    /// keeps neither renewals out (its `FOR KEY SHARE` does not conflict with their
    /// `UPDATE`) nor a takeover for long: `lease_take` gives up within a third of the
    /// time-to-live instead of waiting, and succeeds once the frozen transaction is gone.
    #[test]
    fn a_frozen_fenced_write_neither_blocks_renewals_nor_a_takeover_for_long() {
        let Some(db) = TestDatabase::create("lease_frozen_lock_holder") else {
            return;
        };
        let ttl = Duration::from_millis(900);
        let a = db.open();
        let b = db.open();
        let LeaseTake::Taken(first) = a.lease_take("manager-a", "a:7700", "a:7780", ttl).unwrap()
        else {
            panic!("a free lease is taken");
        };
        let fence = LeaseFence::new("manager-a".into());
        fence.set_epoch(first);
        let mut frozen = a.conn().unwrap();
        let frozen_tx = frozen.begin().unwrap();
        fence.check(&frozen_tx).unwrap();

        let started = std::time::Instant::now();
        assert!(a.lease_renew("manager-a", first, ttl).unwrap());
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a renewal waited {:?} for a fenced write",
            started.elapsed()
        );

        std::thread::sleep(ttl + Duration::from_millis(200));
        let started = std::time::Instant::now();
        let refused = b.lease_take("manager-b", "b:7700", "b:7780", ttl);
        let waited = started.elapsed();
        assert!(refused.is_err(), "{refused:?}");
        assert!(
            waited < Duration::from_secs(2),
            "a takeover waited {waited:?} behind a frozen transaction"
        );

        drop(frozen_tx);
        drop(frozen);
        let LeaseTake::Taken(second) = b.lease_take("manager-b", "b:7700", "b:7780", ttl).unwrap()
        else {
            panic!("an expired lease is taken once the frozen transaction is gone");
        };
        assert!(second > first);
    }

    /// The epoch is the lease holder's: while another manager's lease is valid, advancing
    /// it outside the lease is refused (it would race a takeover and give one epoch twice);
    /// once the lease is released it is allowed, above the lease's epoch.
    #[test]
    fn the_epoch_is_not_advanced_beside_a_valid_lease() {
        let Some(db) = TestDatabase::create("lease_guards_next_epoch") else {
            return;
        };
        let ttl = Duration::from_secs(5);
        let a = db.open();
        let mut b = db.open();
        let LeaseTake::Taken(epoch) = a.lease_take("manager-a", "a:7700", "a:7780", ttl).unwrap()
        else {
            panic!("a free lease is taken");
        };
        let refused = b.next_epoch().unwrap_err();
        assert!(matches!(refused, StoreError::Fenced(_)), "{refused}");
        assert_eq!(b.epoch().unwrap(), epoch, "nothing advanced");
        assert!(a.lease_release("manager-a", epoch).unwrap());
        assert_eq!(b.next_epoch().unwrap(), epoch + 1);
    }

    /// Migration 13 creates the lease table idempotently: a database of the build that made
    /// it outside the migrations (schema 12, lease table present and held) migrates without
    /// losing the lease.
    #[test]
    fn migration_13_keeps_an_existing_lease_table() {
        let Some(db) = TestDatabase::create("lease_migration_13") else {
            return;
        };
        let a = db.open();
        assert_eq!(a.schema_version().unwrap(), crate::store::SCHEMA_VERSION);
        let LeaseTake::Taken(epoch) = a
            .lease_take("manager-a", "a:7700", "a:7780", Duration::from_secs(5))
            .unwrap()
        else {
            panic!("a free lease is taken");
        };
        a.conn()
            .unwrap()
            .exec("UPDATE schema_version SET version = 12", &[])
            .unwrap();
        let reopened = db.open();
        assert_eq!(
            reopened.schema_version().unwrap(),
            crate::store::SCHEMA_VERSION
        );
        let lease = reopened.lease().unwrap();
        assert_eq!(lease.holder.as_deref(), Some("manager-a"));
        assert_eq!(lease.epoch, epoch);
        assert!(lease.live);
    }
}
