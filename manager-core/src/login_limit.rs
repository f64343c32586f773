//! Back-off for failed logins, per client address and per administrator name.
//!
//! Each key (an address or a name) counts its failed logins. Once a key has
//! failed [`LoginLimits::free_failures`] times, every further failure locks it
//! for a time that doubles with each failure (from [`LoginLimits::first_lock`]
//! up to [`LoginLimits::longest_lock`]); while a key is locked, logins that
//! involve it are answered `429 Too Many Requests` with `Retry-After` and the
//! password is not even checked. A successful login clears the name's and the
//! address's count. A key that has not failed for [`LoginLimits::forget_after`]
//! is forgotten.
//!
//! Sans-IO: every call takes `now`, so tests drive the clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most keys remembered at once; beyond, the stalest is dropped.
const MAX_KEYS: usize = 50_000;

/// The limits' tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures per name before the name is locked.
    pub free_failures_per_name: u32,
    /// Failures per client address before the address is locked (higher than per name: an
    /// office behind one address has several administrators).
    pub free_failures_per_address: u32,
    /// The lock after the first failure past the free ones.
    pub first_lock: Duration,
    /// The longest lock.
    pub longest_lock: Duration,
    /// A key without failures this long is forgotten.
    pub forget_after: Duration,
}

impl LoginLimits {
    /// Failures allowed for a key of this kind.
    fn free_failures(&self, key: &LoginKey) -> u32 {
        match key {
            LoginKey::Name(_) => self.free_failures_per_name,
            LoginKey::Address(_) => self.free_failures_per_address,
        }
    }
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            free_failures_per_name: 5,
            free_failures_per_address: 10,
            first_lock: Duration::from_secs(1),
            longest_lock: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(3600),
        }
    }
}

/// What a count is kept for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LoginKey {
    /// The client's address.
    Address(IpAddr),
    /// The administrator name tried (trimmed, lower case).
    Name(String),
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Failed-login counts and locks.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    limits: LoginLimits,
    keys: HashMap<LoginKey, Failures>,
}

impl LoginLimiter {
    /// With these limits.
    pub fn new(limits: LoginLimits) -> Self {
        LoginLimiter {
            limits,
            keys: HashMap::new(),
        }
    }

    /// The keys a login from `address` for `name` involves.
    pub fn keys(address: IpAddr, name: &str) -> [LoginKey; 2] {
        [
            LoginKey::Address(address),
            LoginKey::Name(name.trim().to_lowercase()),
        ]
    }

    /// How long until a login involving `keys` may be tried (`None` = now).
    pub fn locked_for(&self, keys: &[LoginKey], now: Instant) -> Option<Duration> {
        keys.iter()
            .filter_map(|k| self.keys.get(k)?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max()
    }

    /// Starts a login involving `keys`: `Err(wait)` while any key is locked, else the
    /// attempt is counted as a failure right away (the lock it caused, if any, is
    /// returned) and [`LoginLimiter::succeeded`] clears it if the password is right.
    ///
    /// Checking and counting in one call (under the caller's one lock) is what stops
    /// parallel logins from all passing the check before any failure is counted:
    /// at most the free failures of a key pass before it is locked.
    pub fn attempt(
        &mut self,
        keys: &[LoginKey],
        now: Instant,
    ) -> Result<Option<Duration>, Duration> {
        if let Some(wait) = self.locked_for(keys, now) {
            return Err(wait);
        }
        Ok(self.failed(keys, now))
    }

    /// Counts a failed login; returns the lock it caused, if any.
    pub fn failed(&mut self, keys: &[LoginKey], now: Instant) -> Option<Duration> {
        self.keys
            .retain(|_, f| now.duration_since(f.last) < self.limits.forget_after);
        if self.keys.len() + keys.len() > MAX_KEYS {
            let mut by_age: Vec<(LoginKey, Instant)> =
                self.keys.iter().map(|(k, f)| (k.clone(), f.last)).collect();
            by_age.sort_by_key(|(_, last)| *last);
            for (k, _) in by_age.into_iter().take(keys.len()) {
                self.keys.remove(&k);
            }
        }
        let mut longest = None;
        for key in keys {
            let free = self.limits.free_failures(key);
            let f = self.keys.entry(key.clone()).or_insert(Failures {
                count: 0,
                last: now,
                locked_until: None,
            });
            f.count = f.count.saturating_add(1);
            f.last = now;
            if f.count >= free {
                let doublings = (f.count - free).min(30);
                let lock = self
                    .limits
                    .first_lock
                    .saturating_mul(1 << doublings)
                    .min(self.limits.longest_lock);
                f.locked_until = Some(now + lock);
                longest = longest.max(Some(lock));
            }
        }
        longest
    }

    /// Clears the counts of a successful login's keys.
    pub fn succeeded(&mut self, keys: &[LoginKey]) {
        for key in keys {
            self.keys.remove(key);
        }
    }
}

/// `Retry-After` seconds for a lock (rounded up, at least 1).
pub fn retry_after_secs(lock: Duration) -> u64 {
    (lock.as_nanos().div_ceil(1_000_000_000) as u64).max(1)
}

#[cfg(test)]
mod test {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn five_failures_then_doubling_locks() {
        let mut l = LoginLimiter::new(LoginLimits::default());
        let t0 = Instant::now();
        let keys = LoginLimiter::keys(addr(1), "Ops ");
        for i in 0..4 {
            assert_eq!(l.failed(&keys, t0), None, "failure {i} is free");
            assert_eq!(l.locked_for(&keys, t0), None);
        }
        assert_eq!(l.failed(&keys, t0), Some(Duration::from_secs(1)));
        assert_eq!(l.locked_for(&keys, t0), Some(Duration::from_secs(1)));
        // The same name from another address is locked too; another name from the
        // same address is not (the address has 5 of its 10 free failures left).
        assert!(
            l.locked_for(&LoginLimiter::keys(addr(2), "ops"), t0)
                .is_some()
        );
        assert_eq!(
            l.locked_for(&LoginLimiter::keys(addr(1), "other"), t0),
            None
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.locked_for(&keys, t1), None, "the lock lifts");
        assert_eq!(l.failed(&keys, t1), Some(Duration::from_secs(2)));
        assert_eq!(l.failed(&keys, t1), Some(Duration::from_secs(4)));
        for _ in 0..20 {
            l.failed(&keys, t1);
        }
        assert_eq!(
            l.locked_for(&keys, t1),
            Some(LoginLimits::default().longest_lock)
        );
        l.succeeded(&keys);
        assert_eq!(l.locked_for(&keys, t1), None);
    }

    #[test]
    fn an_address_trying_many_names_is_locked() {
        let mut l = LoginLimiter::new(LoginLimits::default());
        let t0 = Instant::now();
        for i in 0..9 {
            l.failed(&LoginLimiter::keys(addr(1), &format!("n{i}")), t0);
        }
        assert_eq!(
            l.locked_for(&LoginLimiter::keys(addr(1), "fresh"), t0),
            None
        );
        l.failed(&LoginLimiter::keys(addr(1), "n9"), t0);
        assert_eq!(
            l.locked_for(&LoginLimiter::keys(addr(1), "fresh"), t0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            l.locked_for(&LoginLimiter::keys(addr(2), "fresh"), t0),
            None
        );
    }

    #[test]
    fn quiet_keys_are_forgotten() {
        let limits = LoginLimits::default();
        let mut l = LoginLimiter::new(limits);
        let t0 = Instant::now();
        let keys = LoginLimiter::keys(addr(1), "ops");
        for _ in 0..4 {
            l.failed(&keys, t0);
        }
        let later = t0 + limits.forget_after;
        assert_eq!(l.failed(&keys, later), None, "old failures no longer count");
    }

    #[test]
    fn parallel_attempts_pass_at_most_the_free_failures() {
        let mut l = LoginLimiter::new(LoginLimits::default());
        let t0 = Instant::now();
        let keys = LoginLimiter::keys(addr(1), "ops");
        // 200 attempts started before any finished: only the name's free failures pass.
        let passed = (0..200).filter(|_| l.attempt(&keys, t0).is_ok()).count();
        assert_eq!(
            passed,
            LoginLimits::default().free_failures_per_name as usize
        );
        // A right password clears the attempt's count.
        let other = LoginLimiter::keys(addr(2), "dev");
        assert_eq!(l.attempt(&other, t0), Ok(None));
        l.succeeded(&other);
        for _ in 0..4 {
            assert_eq!(l.attempt(&other, t0), Ok(None));
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
