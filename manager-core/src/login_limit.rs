//! Back-off for failed logins, per client address, per administrator name from
//! that address, and per name from everywhere.
//!
//! Each key counts its failed logins. Once a key has failed its free failures,
//! every further failure locks it for a time that doubles with each failure
//! (from [`LoginLimits::first_lock`] up to [`LoginLimits::longest_lock`]); while
//! a key is locked, logins that involve it are answered `429 Too Many Requests`
//! with `Retry-After` and the password is not even checked. A successful login
//! clears its keys' counts. A key that has not failed for
//! [`LoginLimits::forget_after`] is forgotten.
//!
//! The keys are chosen so that nobody can lock an administrator out from where
//! they usually sign in: an address (an IPv6 client by its /64, which one
//! subscriber usually holds whole) is locked after its own failures; a name is
//! locked from an address after a few failures from there; and a name is locked
//! *everywhere* only after many failures (a guessing attack spread over
//! addresses), and even then not for addresses it signed in from before
//! ([`LoginLimits::remember_success`]).
//!
//! Sans-IO: every call takes `now`, so tests drive the clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The name key of every name that is no administrator's (not a valid name itself).
const UNKNOWN_NAME: &str = "\0unknown";

/// Most keys remembered at once; beyond, the stalest is dropped.
const MAX_KEYS: usize = 50_000;

/// The limits' tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures per name from one address before the name is locked from that address.
    pub free_failures_per_name: u32,
    /// Failures per name from all addresses before the name is locked everywhere, except
    /// from addresses it signed in from.
    pub free_failures_per_name_everywhere: u32,
    /// Failures per client address before the address is locked (higher than per name: an
    /// office behind one address has several administrators).
    pub free_failures_per_address: u32,
    /// The lock after the first failure past the free ones.
    pub first_lock: Duration,
    /// The longest lock.
    pub longest_lock: Duration,
    /// A key without failures this long is forgotten.
    pub forget_after: Duration,
    /// How long an address a name signed in from stays exempt from that name's lock
    /// everywhere.
    pub remember_success: Duration,
}

impl LoginLimits {
    /// Failures allowed for a key of this kind.
    fn free_failures(&self, key: &LoginKey) -> u32 {
        match key {
            LoginKey::NameFrom(..) => self.free_failures_per_name,
            LoginKey::Name(_) => self.free_failures_per_name_everywhere,
            LoginKey::Address(_) => self.free_failures_per_address,
        }
    }
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            free_failures_per_name: 5,
            free_failures_per_name_everywhere: 50,
            free_failures_per_address: 10,
            first_lock: Duration::from_secs(1),
            longest_lock: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(3600),
            remember_success: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What a count is kept for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LoginKey {
    /// The client's address ([`client_prefix`]).
    Address(IpAddr),
    /// The administrator name tried (trimmed, lower case), from this address.
    NameFrom(String, IpAddr),
    /// The administrator name tried, from anywhere.
    Name(String),
}

/// The part of a client's address that identifies it: the whole IPv4 address (also
/// when mapped into IPv6), the /64 prefix of an IPv6 address.
pub fn client_prefix(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
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
    /// (name, address) pairs that signed in, and when they last did.
    signed_in_from: HashMap<(String, IpAddr), Instant>,
    /// When quiet keys were last forgotten.
    swept: Option<Instant>,
}

impl LoginLimiter {
    /// With these limits.
    pub fn new(limits: LoginLimits) -> Self {
        LoginLimiter {
            limits,
            keys: HashMap::new(),
            signed_in_from: HashMap::new(),
            swept: None,
        }
    }

    /// The keys a login from `address` for `name` involves.
    pub fn keys(address: IpAddr, name: &str) -> [LoginKey; 3] {
        let address = client_prefix(address);
        let name = name.trim().to_lowercase();
        [
            LoginKey::Address(address),
            LoginKey::NameFrom(name.clone(), address),
            LoginKey::Name(name),
        ]
    }

    /// The keys a login from `address` for a name that is no administrator's involves: the
    /// address, and one name key shared by all such names (junk names cost no memory, and
    /// cannot lock anyone out).
    pub fn keys_for_unknown_name(address: IpAddr) -> [LoginKey; 2] {
        [
            LoginKey::Address(client_prefix(address)),
            LoginKey::Name(UNKNOWN_NAME.to_string()),
        ]
    }

    /// Whether `keys` hold a name and address that signed in recently.
    fn known(&self, keys: &[LoginKey], now: Instant) -> bool {
        keys.iter().any(|k| match k {
            LoginKey::NameFrom(name, address) => self
                .signed_in_from
                .get(&(name.clone(), *address))
                .is_some_and(|at| now.duration_since(*at) < self.limits.remember_success),
            _ => false,
        })
    }

    /// How long until a login involving `keys` may be tried (`None` = now).
    pub fn locked_for(&self, keys: &[LoginKey], now: Instant) -> Option<Duration> {
        let known = self.known(keys, now);
        keys.iter()
            .filter(|k| !(known && matches!(k, LoginKey::Name(_))))
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
        // Forgetting quiet keys walks the table: at most once a second.
        if self
            .swept
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.swept = Some(now);
            self.keys
                .retain(|_, f| now.duration_since(f.last) < self.limits.forget_after);
        }
        let new = keys.iter().filter(|k| !self.keys.contains_key(k)).count();
        if self.keys.len() + new > MAX_KEYS {
            // Full: the stalest addresses go first. A name's count everywhere is never
            // dropped (names are administrators' or one key for all others, so few), or a
            // flood of addresses would reset it.
            let mut by_age: Vec<(LoginKey, Instant)> = self
                .keys
                .iter()
                .filter(|(k, _)| !matches!(k, LoginKey::Name(_)))
                .map(|(k, f)| (k.clone(), f.last))
                .collect();
            by_age.sort_by_key(|(_, last)| *last);
            for (k, _) in by_age.into_iter().take(new) {
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

    /// Clears the counts of a successful login's keys, except the name's everywhere (an
    /// attack spread over addresses goes on while its administrator signs in), and
    /// remembers its name and address.
    pub fn succeeded(&mut self, keys: &[LoginKey], now: Instant) {
        for key in keys {
            match key {
                LoginKey::Name(_) => {}
                LoginKey::NameFrom(name, address) => {
                    self.keys.remove(key);
                    let remember = self.limits.remember_success;
                    self.signed_in_from
                        .retain(|_, at| now.duration_since(*at) < remember);
                    if self.signed_in_from.len() >= MAX_KEYS {
                        let oldest = self.signed_in_from.iter().min_by_key(|(_, at)| **at);
                        if let Some(pair) = oldest.map(|(pair, _)| pair.clone()) {
                            self.signed_in_from.remove(&pair);
                        }
                    }
                    self.signed_in_from.insert((name.clone(), *address), now);
                }
                LoginKey::Address(_) => {
                    self.keys.remove(key);
                }
            }
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
        // The same name from another address is not locked (nobody can lock an
        // administrator out from elsewhere), nor another name from the same address
        // (the address has 5 of its 10 free failures left).
        assert_eq!(l.locked_for(&LoginLimiter::keys(addr(2), "ops"), t0), None);
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
        l.succeeded(&keys, t1);
        assert_eq!(l.locked_for(&keys, t1), None);
    }

    #[test]
    fn a_name_attacked_from_everywhere_stays_open_where_it_signed_in() {
        let limits = LoginLimits::default();
        let mut l = LoginLimiter::new(limits);
        let t0 = Instant::now();
        let home = LoginLimiter::keys(addr(200), "ops");
        assert_eq!(l.attempt(&home, t0), Ok(None));
        l.succeeded(&home, t0);
        // Two failures from each of many addresses: no address or address-name key is
        // locked, but the name is, everywhere but at home.
        for i in 0..limits.free_failures_per_name_everywhere / 2 {
            let keys = LoginLimiter::keys(addr(i as u8), "ops");
            l.failed(&keys, t0);
            l.failed(&keys, t0);
        }
        assert!(
            l.locked_for(&LoginLimiter::keys(addr(150), "ops"), t0)
                .is_some()
        );
        assert_eq!(l.locked_for(&home, t0), None);
        assert_eq!(
            l.locked_for(&LoginLimiter::keys(addr(150), "dev"), t0),
            None
        );
        // The exemption is forgotten in time.
        let later = t0 + limits.remember_success;
        l.failed(&LoginLimiter::keys(addr(1), "ops"), later);
        for _ in 0..limits.free_failures_per_name_everywhere {
            l.failed(&LoginLimiter::keys(addr(7), "ops"), later);
        }
        assert!(l.locked_for(&home, later).is_some());
    }

    #[test]
    fn unknown_names_share_one_key_and_count_against_the_address() {
        let mut l = LoginLimiter::new(LoginLimits::default());
        let t0 = Instant::now();
        for _ in 0..9 {
            assert_eq!(
                l.attempt(&LoginLimiter::keys_for_unknown_name(addr(1)), t0),
                Ok(None)
            );
        }
        assert!(
            l.attempt(&LoginLimiter::keys_for_unknown_name(addr(1)), t0)
                .unwrap()
                .is_some(),
            "the address's tenth failure locks it"
        );
        assert!(
            l.locked_for(&LoginLimiter::keys(addr(1), "ops"), t0)
                .is_some()
        );
        assert_eq!(l.locked_for(&LoginLimiter::keys(addr(2), "ops"), t0), None);
        assert_eq!(l.keys.len(), 2, "one address, one shared name");
    }

    #[test]
    fn an_ipv6_client_is_one_key_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_prefix(a), client_prefix(b));
        assert_ne!(client_prefix(a), client_prefix(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_prefix(mapped), addr(1));
        let mut l = LoginLimiter::new(LoginLimits::default());
        let t0 = Instant::now();
        for i in 0..10u16 {
            let from = IpAddr::from([0x2001, 0xdb8, 1, 2, i, i, i, i]);
            l.failed(&LoginLimiter::keys(from, &format!("n{i}")), t0);
        }
        assert!(l.locked_for(&LoginLimiter::keys(a, "fresh"), t0).is_some());
        assert_eq!(l.locked_for(&LoginLimiter::keys(c, "fresh"), t0), None);
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
        l.succeeded(&other, t0);
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
