//! Admission of incoming connections: caps on handshakes in progress (in all
//! and per source address), a cap on all connections derived from the
//! descriptor limit, and the descriptor limit itself.
//!
//! The manager's agent port and the Linux agent's peer listener take
//! connections from anyone; the handshake decides who is let in. Until it has,
//! a connection costs a descriptor, a task and a handshake's buffers (about
//! 4 KiB) for nobody in particular. [`Admission`] counts them: a connection
//! that arrives while a cap is reached is accepted and closed at once, so it
//! does not wait in the listen backlog in front of agents, and the cap is named
//! in a log line written at most once per [`LOG_EVERY`] per cap. An accepted
//! connection holds an [`Admitted`]: [`Admitted::authenticated`] gives back its
//! handshake place once the handshake succeeded (it then counts only against
//! the connection cap), and dropping it gives back both. A handshake must end
//! within [`AdmissionLimits::handshake_timeout`].
//!
//! Source addresses are counted by [`SourceKey`]: an IPv4 address (an
//! IPv4-mapped IPv6 address counts as its IPv4 address), or an IPv6 address's
//! /64 network, which one host can fill on its own.
//!
//! The connection cap leaves descriptors for everything else the process
//! opens: [`connection_cap`] is the descriptor limit less a reserve
//! ([`DESCRIPTOR_RESERVE`], and the manager adds its HTTP connections).
//! [`raise_descriptor_limit`] lifts the soft descriptor limit to the hard one
//! at start. The handshakes in progress are at most half the connection cap
//! ([`AdmissionLimits::checked`]): the places left are for authenticated
//! connections, which no flood of unauthenticated ones can take.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::spaced::SpacedLog;

use tokio::net::{TcpListener, TcpStream};

/// Default time a handshake may take on a listener (the link's own bound is 10 s).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Descriptors kept out of the connection cap for the process's other files and
/// sockets: its database or store files, content being read or written, the
/// log, listeners, discovery sockets and outgoing connections (an agent opens
/// at most 64 peer connections and one to the manager).
pub const DESCRIPTOR_RESERVE: u64 = 256;
/// A cap's log line is written at most once per this long (the refusals in
/// between are counted in the next line).
pub const LOG_EVERY: Duration = super::spaced::WARN_EVERY;
/// Wait after a failed `accept` (for instance out of descriptors) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The caps of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections open at once, authenticated or not (see [`connection_cap`]).
    pub max_connections: usize,
    /// Handshakes in progress at once, from all addresses.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one [`SourceKey`].
    pub max_handshakes_per_address: usize,
    /// Time from accepting a connection to the end of its handshake.
    pub handshake_timeout: Duration,
}

impl AdmissionLimits {
    /// These limits made consistent: every cap at least 1, the handshakes in
    /// progress at most half the connection cap (the other half at least is
    /// left to authenticated connections), the per-address cap at most the
    /// global one, the timeout at least 100 ms.
    pub fn checked(self) -> AdmissionLimits {
        let max_connections = self.max_connections.max(1);
        let max_handshakes = self.max_handshakes.clamp(1, (max_connections / 2).max(1));
        AdmissionLimits {
            max_connections,
            max_handshakes,
            max_handshakes_per_address: self.max_handshakes_per_address.clamp(1, max_handshakes),
            handshake_timeout: self.handshake_timeout.max(Duration::from_millis(100)),
        }
    }
}

/// Where a connection comes from, as far as the per-address cap is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 address (or an IPv4-mapped IPv6 one).
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address: its /64 network.
    V6Net([u8; 8]),
}

impl SourceKey {
    /// The key `ip` is counted under.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey::V4(v4),
            IpAddr::V6(v6) => {
                let mut net = [0u8; 8];
                net.copy_from_slice(&v6.octets()[..8]);
                SourceKey::V6Net(net)
            }
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKey::V4(a) => write!(f, "{a}"),
            SourceKey::V6Net(net) => {
                let mut octets = [0u8; 16];
                octets[..8].copy_from_slice(net);
                write!(f, "{}/64", std::net::Ipv6Addr::from(octets))
            }
        }
    }
}

/// Which cap turned a connection away, with the counts at that moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// All connections: `open` of `max` are open.
    Connections {
        /// Connections open.
        open: usize,
        /// The cap.
        max: usize,
    },
    /// Handshakes from all addresses: `in_progress` of `max`.
    Handshakes {
        /// Handshakes in progress.
        in_progress: usize,
        /// The cap.
        max: usize,
    },
    /// Handshakes from one address: `in_progress` of `max` from `source`.
    HandshakesFromAddress {
        /// The address (or /64 network).
        source: SourceKey,
        /// Handshakes in progress from it.
        in_progress: usize,
        /// The cap.
        max: usize,
    },
}

impl Refused {
    /// The cap's index in the log limiter.
    fn cause(&self) -> usize {
        match self {
            Refused::Connections { .. } => 0,
            Refused::Handshakes { .. } => 1,
            Refused::HandshakesFromAddress { .. } => 2,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Connections { open, max } => write!(
                f,
                "connection cap reached: {open} connections open (cap {max}: descriptor limit less the reserve, or --max-connections)"
            ),
            Refused::Handshakes { in_progress, max } => write!(
                f,
                "handshake cap reached: {in_progress} handshakes in progress (--max-handshakes {max})"
            ),
            Refused::HandshakesFromAddress {
                source,
                in_progress,
                max,
            } => write!(
                f,
                "per-address handshake cap reached: {in_progress} handshakes in progress from {source} (--max-handshakes-per-address {max})"
            ),
        }
    }
}

impl std::error::Error for Refused {}

/// Counts the connections of one listener against its [`AdmissionLimits`].
#[derive(Debug)]
pub struct Admission {
    name: &'static str,
    state: Mutex<Counts>,
    /// Per cap (see [`Refused::cause`]), for accept errors, failed handshakes and
    /// refused ones: their warnings, spaced.
    logs: [SpacedLog; 6],
}

#[derive(Debug)]
struct Counts {
    /// The caps in force (replaced by [`Admission::set_limits`]).
    limits: AdmissionLimits,
    connections: usize,
    handshakes: usize,
    per_source: HashMap<SourceKey, usize>,
}

/// The log limiter's slot for accept errors.
const ACCEPT_ERROR: usize = 3;
/// The log limiter's slot for failed handshakes.
const HANDSHAKE_FAILED: usize = 4;
/// The log limiter's slot for handshakes whose peer was refused.
const HANDSHAKE_REFUSED: usize = 5;

impl Admission {
    /// Admission for the listener `name` (it names the listener in log lines).
    pub fn new(name: &'static str, limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            name,
            state: Mutex::new(Counts {
                limits: limits.checked(),
                connections: 0,
                handshakes: 0,
                per_source: HashMap::new(),
            }),
            logs: std::array::from_fn(|_| SpacedLog::new(LOG_EVERY)),
        })
    }

    /// The caps in force.
    pub fn limits(&self) -> AdmissionLimits {
        self.lock().limits
    }

    /// Replaces the caps (a reloaded configuration): connections and handshakes already
    /// admitted stay; the new caps judge the next admissions. Returns the caps now in force.
    pub fn set_limits(&self, limits: AdmissionLimits) -> AdmissionLimits {
        let mut s = self.lock();
        s.limits = limits.checked();
        s.limits
    }

    /// Connections open and handshakes in progress now.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.connections, s.handshakes)
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a connection and a handshake place for a connection from `ip`, or
    /// says which cap is reached (and logs it, rate-limited).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let source = SourceKey::of(ip);
        let mut s = self.lock();
        let from_source = s.per_source.get(&source).copied().unwrap_or(0);
        let limits = s.limits;
        let refused = if s.connections >= limits.max_connections {
            Some(Refused::Connections {
                open: s.connections,
                max: limits.max_connections,
            })
        } else if s.handshakes >= limits.max_handshakes {
            Some(Refused::Handshakes {
                in_progress: s.handshakes,
                max: limits.max_handshakes,
            })
        } else if from_source >= limits.max_handshakes_per_address {
            Some(Refused::HandshakesFromAddress {
                source,
                in_progress: from_source,
                max: limits.max_handshakes_per_address,
            })
        } else {
            None
        };
        if let Some(refused) = refused {
            if let Some(unlogged) = self.logs[refused.cause()].due() {
                tracing::warn!(
                    listener = self.name,
                    %ip,
                    connections = s.connections,
                    handshakes = s.handshakes,
                    "{refused}; new connections are closed at once ({unlogged} more refused since the last such line)"
                );
            }
            return Err(refused);
        }
        s.connections += 1;
        s.handshakes += 1;
        *s.per_source.entry(source).or_insert(0) += 1;
        Ok(Admitted {
            admission: self.clone(),
            source,
            handshaking: true,
        })
    }

    /// Accepts connections on `listener` until one is admitted; the others are
    /// closed at once. A failed `accept` (out of descriptors, say) is logged,
    /// rate-limited, and retried after a short pause.
    pub async fn accept(
        self: &Arc<Self>,
        listener: &TcpListener,
    ) -> (TcpStream, SocketAddr, Admitted) {
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => match self.admit(addr.ip()) {
                    Ok(admitted) => return (stream, addr, admitted),
                    Err(_) => drop(stream),
                },
                Err(e) => {
                    let due = self.logs[ACCEPT_ERROR].due();
                    if let Some(unlogged) = due {
                        tracing::warn!(
                            listener = self.name,
                            "accepting a connection failed: {e} ({unlogged} more failures since the last such line)"
                        );
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }

    /// Counts a failed handshake; returns whether its warning is due (at most
    /// one per [`LOG_EVERY`]; the others belong at debug level), and if so how
    /// many failures went unwritten since the last.
    pub fn handshake_failed(&self) -> Option<u64> {
        self.logs[HANDSHAKE_FAILED].due()
    }

    /// Counts a handshake that succeeded but whose peer was refused (not
    /// enrolled, no valid certificate); returns whether its warning is due, as
    /// [`Admission::handshake_failed`] does.
    pub fn handshake_refused(&self) -> Option<u64> {
        self.logs[HANDSHAKE_REFUSED].due()
    }

    fn release(&self, source: SourceKey, handshaking: bool, connection: bool) {
        let mut s = self.lock();
        if handshaking {
            s.handshakes = s.handshakes.saturating_sub(1);
            if let Some(n) = s.per_source.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    s.per_source.remove(&source);
                }
            }
        }
        if connection {
            s.connections = s.connections.saturating_sub(1);
        }
    }
}

/// A connection's place at a listener: its connection place, and its handshake
/// place until [`Admitted::authenticated`]. Dropping it gives both back.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    source: SourceKey,
    handshaking: bool,
}

impl Admitted {
    /// The handshake succeeded: the connection no longer counts against the handshake caps.
    pub fn authenticated(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.admission.release(self.source, true, false);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.release(self.source, self.handshaking, true);
    }
}

/// The process's descriptor limit after [`raise_descriptor_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorLimit {
    /// The soft limit found at start.
    pub soft_before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// Most descriptors asked for when the hard limit is unlimited (the kernel's
/// usual `fs.nr_open`).
const UNLIMITED_TARGET: u64 = 1 << 20;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs both; if that
/// fails the soft limit stays as it was (logged as a warning).
pub fn raise_descriptor_limit() -> DescriptorLimit {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let found = getrlimit(Resource::Nofile);
    let soft_before = found.current.unwrap_or(u64::MAX);
    let target = found.maximum.unwrap_or(UNLIMITED_TARGET);
    let mut soft = soft_before;
    if soft_before < target {
        let wanted = Rlimit {
            current: Some(target),
            maximum: found.maximum,
        };
        match setrlimit(Resource::Nofile, wanted) {
            Ok(()) => soft = target,
            Err(e) => {
                tracing::warn!(
                    "cannot raise the descriptor limit from {soft_before} to {target}: {e}"
                )
            }
        }
    }
    let limit = DescriptorLimit {
        soft_before,
        soft,
        hard: found.maximum,
    };
    let hard = limit
        .hard
        .map_or_else(|| "unlimited".to_string(), |h| h.to_string());
    tracing::info!(
        "descriptor limit (RLIMIT_NOFILE): soft {soft} (was {soft_before}), hard {hard}"
    );
    limit
}

/// The connection cap for a listener in a process allowed `soft_limit`
/// descriptors that keeps `reserve` for the rest: `soft_limit - reserve`, but
/// at least a quarter of the limit when the limit is small.
pub fn connection_cap(soft_limit: u64, reserve: u64) -> usize {
    let cap = soft_limit
        .saturating_sub(reserve)
        .max(soft_limit / 4)
        .max(1);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// Logs at start the caps a listener (`listener`, e.g. "agent port") admits connections
/// by, and where its connection cap comes from: the descriptor limit `soft_limit` less
/// `reserve`, and `bound`, any further bound (", at most --max-connections"; "" for none).
pub fn log_caps(
    listener: &str,
    caps: &AdmissionLimits,
    soft_limit: u64,
    reserve: u64,
    bound: &str,
) {
    tracing::info!(
        max_connections = caps.max_connections,
        max_handshakes = caps.max_handshakes,
        max_handshakes_per_address = caps.max_handshakes_per_address,
        handshake_timeout = ?caps.handshake_timeout,
        "{listener} caps (connections: the descriptor limit {soft_limit} less {reserve} reserved{bound})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(conns: usize, hs: usize, per: usize) -> AdmissionLimits {
        AdmissionLimits {
            max_connections: conns,
            max_handshakes: hs,
            max_handshakes_per_address: per,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_is_capped_and_others_still_get_in() {
        let a = Admission::new("test", limits(100, 10, 3));
        let held: Vec<Admitted> = (0..3).map(|_| a.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(
            a.admit(ip("10.0.0.1")).unwrap_err(),
            Refused::HandshakesFromAddress {
                source: SourceKey::V4(Ipv4Addr::new(10, 0, 0, 1)),
                in_progress: 3,
                max: 3
            }
        );
        let other = a.admit(ip("10.0.0.2")).expect("another address gets in");
        assert_eq!(a.counts(), (4, 4));
        drop(other);
        drop(held);
        assert_eq!(a.counts(), (0, 0));
        assert!(a.lock().per_source.is_empty(), "no entry is left behind");
    }

    #[test]
    fn new_limits_judge_the_next_admissions_and_keep_what_was_admitted() {
        let a = Admission::new("test", limits(100, 10, 4));
        let held: Vec<Admitted> = (0..3).map(|_| a.admit(ip("10.0.0.1")).unwrap()).collect();
        // Lowered below what is held: nothing is dropped, the next one is refused.
        assert_eq!(
            a.set_limits(limits(100, 10, 2)).max_handshakes_per_address,
            2
        );
        assert_eq!(a.counts(), (3, 3));
        assert!(matches!(
            a.admit(ip("10.0.0.1")),
            Err(Refused::HandshakesFromAddress { max: 2, .. })
        ));
        drop(held);
        assert!(a.admit(ip("10.0.0.1")).is_ok());
        // Raised again: more get in.
        a.set_limits(limits(100, 10, 8));
        let more: Vec<Admitted> = (0..8).map(|_| a.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(more.len(), 8);
        // Checked like the first caps (handshakes at most half the connections).
        assert_eq!(a.set_limits(limits(10, 9, 9)).max_handshakes, 5);
    }

    #[test]
    fn the_global_cap_holds_over_all_addresses() {
        let a = Admission::new("test", limits(100, 5, 2));
        let held: Vec<Admitted> = (0..5)
            .map(|i| a.admit(ip(&format!("10.0.0.{i}"))).unwrap())
            .collect();
        assert_eq!(
            a.admit(ip("10.9.9.9")).unwrap_err(),
            Refused::Handshakes {
                in_progress: 5,
                max: 5
            }
        );
        drop(held);
        assert!(a.admit(ip("10.9.9.9")).is_ok());
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_address_and_mapped_ipv4_as_ipv4() {
        let a = Admission::new("test", limits(100, 10, 2));
        let _one = a.admit(ip("2001:db8:1:2::1")).unwrap();
        let _two = a.admit(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")).unwrap();
        let refused = a.admit(ip("2001:db8:1:2:aaaa::7")).unwrap_err();
        assert!(
            matches!(
                refused,
                Refused::HandshakesFromAddress { in_progress: 2, .. }
            ),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("2001:db8:1:2::/64"),
            "{refused}"
        );
        let _next_net = a
            .admit(ip("2001:db8:1:3::1"))
            .expect("the next /64 is another source");
        let _v4 = a.admit(ip("192.0.2.1")).unwrap();
        let _mapped = a.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert!(
            a.admit(ip("192.0.2.1")).is_err(),
            "a mapped address counts as its IPv4 address"
        );
    }

    #[test]
    fn an_authenticated_connection_leaves_the_handshake_caps_but_not_the_connection_cap() {
        let a = Admission::new("test", limits(4, 2, 1));
        let mut first = a.admit(ip("10.0.0.1")).unwrap();
        assert!(a.admit(ip("10.0.0.1")).is_err());
        first.authenticated();
        first.authenticated(); // twice is the same as once
        assert_eq!(a.counts(), (1, 0));
        let mut second = a
            .admit(ip("10.0.0.1"))
            .expect("the address may handshake again");
        second.authenticated();
        let _third = a.admit(ip("10.0.0.1")).unwrap();
        let _fourth = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.3")).unwrap_err(),
            Refused::Connections { open: 4, max: 4 }
        );
        drop(first);
        assert_eq!(a.counts(), (3, 2));
        assert_eq!(
            a.admit(ip("10.0.0.3")).unwrap_err(),
            Refused::Handshakes {
                in_progress: 2,
                max: 2
            }
        );
        drop(second);
        assert_eq!(
            a.counts(),
            (2, 2),
            "authenticated: only its connection place was held"
        );
    }

    #[test]
    fn caps_are_made_consistent() {
        let l = limits(10, 50, 70).checked();
        assert_eq!(
            (
                l.max_connections,
                l.max_handshakes,
                l.max_handshakes_per_address
            ),
            (10, 5, 5)
        );
        let l = limits(0, 0, 0).checked();
        assert_eq!(
            (
                l.max_connections,
                l.max_handshakes,
                l.max_handshakes_per_address
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn the_connection_cap_keeps_the_reserve() {
        assert_eq!(connection_cap(1_048_576, 768), 1_048_576 - 768);
        assert_eq!(connection_cap(20_000, 256), 19_744);
        // A small limit: a quarter of it rather than nothing.
        assert_eq!(connection_cap(1024, 1000), 256);
        assert_eq!(connection_cap(0, 256), 1);
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_limit() {
        let l = raise_descriptor_limit();
        assert!(l.soft >= l.soft_before);
        if let Some(hard) = l.hard {
            assert_eq!(l.soft, hard);
        }
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current.unwrap_or(u64::MAX), l.soft);
    }
}
