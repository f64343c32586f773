//! Segment discovery and leader election (claims 7, 9, 11), sans-IO.
//!
//! Agents on one LAN segment find each other with signed UDP datagrams
//! ([`baton_protocol::discovery`]), elect a leader, measure round-trip times
//! to each other, and the leader sends the manager a paged
//! [`SegmentReport`]. [`Segment`] holds no socket and reads no clock: the
//! driver calls, with `now` on its monotonic timeline,
//!
//! - [`Segment::start`] once the manager's `Welcome` gave the agent its
//!   certificate and the manager's clock (and a boot-unique sequence base,
//!   e.g. Unix microseconds); again at every later `Welcome`;
//! - [`Segment::handle_datagram`] for every datagram received on the
//!   discovery port (broadcast or unicast), with its source address;
//! - [`Segment::handle_timeout`] when [`Segment::poll_timeout`] is reached;
//! - [`Segment::set_capabilities`] when what the agent reports changes;
//!
//! and after every input drains, in this order and until `None`,
//! [`Segment::poll_transmit`] (datagrams to broadcast or unicast),
//! [`Segment::poll_report`] (report pages for the manager session, only on
//! the leader) and [`Segment::poll_event`] (leader changes, joins, leaves).
//!
//! **Election.** Every agent computes `leader = max (score, id)` over the
//! live members it hears, itself included. There are no voting rounds: all
//! agents that hear the same beacons pick the same leader. A member is live
//! while it was heard less than `leader_timeout` ago; [`Segment::poll_timeout`]
//! includes each member's expiry, so a silent leader is dropped, and the next
//! one chosen, exactly `leader_timeout` after its last datagram, which is
//! within `leader_timeout + beacon_interval` of it falling silent.
//!
//! **Score** ([`capability_score`]): lexicographic, from the agent's own report:
//! whether it serves peers, then its link class (bit length of
//! `min(up_bps, down_bps)`), then its performance, then its storage class
//! (bit length of free MiB). Classes are powers of two so that measured link
//! rates that wobble do not make the leadership flap.
//!
//! **What the manager certifies.** Every datagram carries its sender's
//! [`AgentCert`], which names the segment the administrator placed the agent
//! in and the highest score it may claim. A datagram whose certificate names
//! another segment than ours is dropped (so an agent cannot join, let alone
//! lead, a segment it was not placed in), and the election uses
//! `min(declared score, certified score)`, for this agent too: an agent whose
//! own certificate names another segment competes with score 0.
//!
//! **Freshness and replay.** Every datagram carries the time it was sent on
//! the manager's clock as its sender estimates it (the `Welcome`'s
//! `unix_time` plus the monotonic time elapsed since); a datagram more than
//! `max_clock_skew` away from our own estimate is dropped. It also carries
//! the sender's sequence number; a datagram whose sequence number is not
//! above the last one accepted from that sender is dropped. That state is
//! the members table, a fixed `MEMBERS` entries: entries of silent members
//! are kept (not live) until their slot is needed, so their last sequence
//! number is remembered too; once a slot is reused, the freshness window
//! still bounds how old a replay can be. The driver starts the sequence at a
//! boot-unique base so a restarted agent is not taken for a replay.
//!
//! **Cost.** Checking a datagram takes two Ed25519 verifications (the
//! certificate, then the signature), the expensive part. They come last,
//! after the cheap checks in this order: size and decoding, our own
//! loop-back, the segment named and certified, the sender's certificate not
//! revoked by the manager's list nor expired ([`Segment::set_revocations`];
//! the claimed certificate, so a forgery naming a revoked agent costs nothing),
//! freshness, replay, whether
//! the sender may send this kind of datagram, and a per-sender token bucket
//! (`sender_rate` datagrams per second, bursts of `sender_burst`; senders
//! not in the table share one bucket of the same size). So a flood costs at
//! most `2 × (MEMBERS + 1) × sender_rate` verifications per second after the
//! bursts, whatever ids it claims ([`Segment::signature_checks`] counts them).
//! A refused datagram changes nothing, but a flood forging a member's id
//! spends that member's tokens and can delay its datagrams while it lasts.
//!
//! **Traffic.** A beacon every `beacon_interval` (broadcast); a probe to every
//! live member every `probe_interval` (unicast, answered by an echo); a
//! member's capabilities and delays to the leader every `member_interval`
//! and at once when the leader changes; the leader's report every
//! `report_interval` and, at most once per `beacon_interval`, when the
//! membership or leader changes (the first one `2 × beacon_interval` after
//! start, once the segment has been heard).

use core::net::SocketAddr;
use core::time::Duration;

use crate::revocation::{CertRefusal, peer_cert_acceptable};
use baton_protocol::discovery::{self, Announcement, Datagram, DiscoveryError};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{MAX_MEMBERS_PER_PAGE, SegmentMember, SegmentReport};
use baton_protocol::revocation::RevocationList;
use baton_protocol::{AgentId, Delay, DelayTo, LinkInfo, MAX_DELAYS, Name, PeerAddr, PublicKey};
use heapless::{Deque, Vec};

/// Default capacity of the members table (other agents on the segment).
pub const MAX_MEMBERS: usize = 32;

/// Datagrams waiting to be sealed.
const OUTBOX: usize = 80;
/// Events waiting to be drained.
const EVENTS: usize = 16;

/// Timing and identity of the segment state machine.
#[derive(Clone, Debug)]
pub struct SegmentConfig {
    /// This agent's id.
    pub id: AgentId,
    /// The segment it reports; beacons of other segments are ignored.
    pub segment: Name,
    /// How often a beacon is broadcast.
    pub beacon_interval: Duration,
    /// A member (the leader included) not heard for this long is dropped.
    pub leader_timeout: Duration,
    /// How often each live member's round-trip time is measured.
    pub probe_interval: Duration,
    /// How often a member sends its capabilities to the leader.
    pub member_interval: Duration,
    /// How often the leader sends the manager its report when nothing changed.
    pub report_interval: Duration,
    /// A datagram sent further than this from our estimate of the manager's clock is dropped.
    pub max_clock_skew: Duration,
    /// Datagrams per second each sender may have checked (token bucket refill); senders not
    /// in the members table share one bucket.
    pub sender_rate: u32,
    /// Burst size of each sender's token bucket.
    pub sender_burst: u32,
}

impl SegmentConfig {
    /// Defaults: beacon 1 s, leader timeout 3 s, probes 5 s, member info 2 s, report 10 s,
    /// clock skew 30 s, 10 datagrams per second per sender in bursts of 20.
    pub fn new(id: AgentId, segment: Name) -> Self {
        SegmentConfig {
            id,
            segment,
            beacon_interval: Duration::from_secs(1),
            leader_timeout: Duration::from_secs(3),
            probe_interval: Duration::from_secs(5),
            member_interval: Duration::from_secs(2),
            report_interval: Duration::from_secs(10),
            max_clock_skew: Duration::from_secs(30),
            sender_rate: 10,
            sender_burst: 20,
        }
    }
}

/// What the agent says of itself on the segment (from its own report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Where it serves peers.
    pub listen: Option<PeerAddr>,
    /// Performance class (1..=1000).
    pub performance: u32,
    /// Free storage for content, in bytes.
    pub free_storage: u64,
    /// Whether it serves peers.
    pub can_serve: bool,
    /// Link speed and reliability.
    pub link: LinkInfo,
    /// Its measured round-trip time to the manager, microseconds.
    pub manager_rtt_us: Option<u32>,
}

/// The capability score the election compares (higher leads; ties go to the larger id),
/// as [`discovery::capability_score`] computes it from the agent's capabilities.
pub fn capability_score(c: &Capabilities) -> u32 {
    discovery::capability_score(c.can_serve, &c.link, c.performance, c.free_storage)
}

/// A token bucket in thousandths of a datagram (no floating point on the firmware).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli: u64,
    at: Duration,
}

impl Bucket {
    /// A full bucket at `now`.
    fn full(now: Duration, burst: u32) -> Self {
        Bucket {
            milli: u64::from(burst) * 1000,
            at: now,
        }
    }

    /// Refills for the time since the last call and takes one token if there is one.
    fn take(&mut self, now: Duration, rate: u32, burst: u32) -> bool {
        let elapsed_ms = u64::try_from(now.saturating_sub(self.at).as_millis()).unwrap_or(u64::MAX);
        self.at = self.at.max(now);
        // `rate` per second is `rate` thousandths per millisecond.
        self.milli = self
            .milli
            .saturating_add(elapsed_ms.saturating_mul(u64::from(rate)))
            .min(u64::from(burst) * 1000);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// To the segment's broadcast address on the discovery port.
    Broadcast,
    /// To one member, at the address its datagrams came from.
    Unicast(SocketAddr),
}

/// A sealed datagram for the driver: `buf[..len]` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Where to send it.
    pub to: Destination,
    /// Bytes at the start of the buffer.
    pub len: usize,
}

/// What changed on the segment, for logs and status.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SegmentEvent {
    /// The elected leader changed.
    LeaderChanged {
        /// The new leader.
        leader: AgentId,
        /// Whether it is this agent.
        is_self: bool,
    },
    /// A member was heard for the first time, or again after falling silent.
    MemberJoined {
        /// Its id.
        id: AgentId,
    },
    /// A member was not heard for `leader_timeout`.
    MemberLeft {
        /// Its id.
        id: AgentId,
    },
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SegmentError {
    /// Discovery has not started (no certificate yet).
    NotStarted,
    /// Bad bytes, a certificate not from our manager, or a bad signature.
    Discovery(DiscoveryError),
    /// The sequence number is not above the last one accepted from the sender.
    Replay,
    /// A beacon of another segment.
    OtherSegment,
    /// A probe, echo or member datagram from an agent not (or no longer) on the segment.
    UnknownSender,
    /// A member datagram that describes another agent than its sender.
    Mismatch,
    /// No room for another member (every slot is live).
    TableFull,
    /// The sender's certificate places it in another segment than ours.
    UncertifiedSegment,
    /// Sent too far from our estimate of the manager's clock (stale, or from the future).
    Stale,
    /// The sender (or, for senders not in the table, all of them together) exceeded its rate.
    RateLimited,
    /// The sender's certificate is revoked or expired ([`crate::revocation`]).
    Certificate(CertRefusal),
}

impl core::fmt::Display for SegmentError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SegmentError::NotStarted => f.write_str("discovery not started"),
            SegmentError::Discovery(e) => write!(f, "{e}"),
            SegmentError::Replay => f.write_str("replayed discovery datagram"),
            SegmentError::OtherSegment => f.write_str("beacon of another segment"),
            SegmentError::UnknownSender => f.write_str("datagram from an agent not on the segment"),
            SegmentError::Mismatch => f.write_str("member datagram about another agent"),
            SegmentError::TableFull => f.write_str("members table full"),
            SegmentError::UncertifiedSegment => {
                f.write_str("sender's certificate names another segment")
            }
            SegmentError::Stale => f.write_str("datagram too far from the manager's clock"),
            SegmentError::RateLimited => f.write_str("sender over its datagram rate"),
            SegmentError::Certificate(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for SegmentError {}

/// One other agent heard on the segment.
#[derive(Clone, Debug)]
struct Member {
    id: AgentId,
    key: PublicKey,
    addr: SocketAddr,
    last_seq: u64,
    last_heard: Duration,
    live: bool,
    /// Its election score: `min(declared, certified)`.
    score: u32,
    /// The highest score its certificate allows.
    certified_score: u32,
    /// Its datagram allowance.
    bucket: Bucket,
    listen: Option<PeerAddr>,
    /// The last capabilities it sent (only the leader receives them).
    info: Option<SegmentMember>,
    /// Nonce of the probe in flight.
    probe: Option<u64>,
    rtt_us: Option<u32>,
}

/// A datagram to seal at the next [`Segment::poll_transmit`].
#[derive(Clone, Copy, Debug)]
enum Pending {
    Beacon,
    Probe { to: SocketAddr, nonce: u64 },
    Echo { to: SocketAddr, nonce: u64 },
    Member { to: SocketAddr },
}

/// A report being paged out.
#[derive(Clone, Copy, Debug)]
struct Paging {
    term: u32,
    next: u16,
    pages: u16,
}

/// The segment state machine with room for `MEMBERS` other agents (see the module docs).
pub struct Segment<const MEMBERS: usize = MAX_MEMBERS> {
    config: SegmentConfig,
    identity: Identity,
    manager: PublicKey,
    cert: Option<AgentCert>,
    seq: u64,
    /// The manager's clock as learnt from the last `Welcome`: (our time then, its Unix ms then).
    clock: (Duration, u64),
    caps: Capabilities,
    /// The score this agent declares (from its capabilities).
    declared: u32,
    /// Its election score: `min(declared, certified)`, 0 if certified for another segment.
    score: u32,
    /// The shared allowance of senders not in the members table, and of datagrams naming a
    /// member but coming from another address than its verified one.
    newcomers: Bucket,
    /// Ed25519 verifications done on received datagrams.
    signature_checks: u64,
    members: Vec<Member, MEMBERS>,
    /// The manager's newest revocation list: datagrams of agents it revokes are dropped.
    revocations: Option<RevocationList>,
    leader: Option<AgentId>,
    term: u32,
    started_at: Duration,
    next_beacon: Duration,
    next_probe: Duration,
    next_member: Duration,
    next_report: Duration,
    report_due: bool,
    last_report: Option<Duration>,
    paging: Option<Paging>,
    outbox: Deque<Pending, OUTBOX>,
    events: Deque<SegmentEvent, EVENTS>,
}

impl<const MEMBERS: usize> core::fmt::Debug for Segment<MEMBERS> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.config.id)
            .field("segment", &self.config.segment)
            .field("leader", &self.leader)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl<const MEMBERS: usize> Segment<MEMBERS> {
    /// A segment machine for the agent with `identity`, trusting certificates of `manager`.
    pub fn new(config: SegmentConfig, identity: Identity, manager: PublicKey) -> Self {
        Segment {
            config,
            identity,
            manager,
            cert: None,
            seq: 0,
            clock: (Duration::ZERO, 0),
            caps: Capabilities::default(),
            declared: 0,
            score: 0,
            newcomers: Bucket::full(Duration::ZERO, 0),
            signature_checks: 0,
            members: Vec::new(),
            revocations: None,
            leader: None,
            term: 0,
            started_at: Duration::ZERO,
            next_beacon: Duration::ZERO,
            next_probe: Duration::ZERO,
            next_member: Duration::ZERO,
            next_report: Duration::ZERO,
            report_due: false,
            last_report: None,
            paging: None,
            outbox: Deque::new(),
            events: Deque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SegmentConfig {
        &self.config
    }

    /// Starts discovery with the manager's certificate for this agent and the manager's
    /// clock, `manager_unix_ms` (the `Welcome`'s `unix_time`, in ms) at `now`.
    ///
    /// `seq_base` must be above any sequence number an earlier run of this
    /// agent used (e.g. Unix time in microseconds at start). Calling it again
    /// (a new `Welcome`) only replaces the certificate and the clock.
    pub fn start(&mut self, now: Duration, cert: AgentCert, seq_base: u64, manager_unix_ms: u64) {
        let first = self.cert.is_none();
        self.cert = Some(cert);
        self.clock = (now, manager_unix_ms);
        let rescore = self.rescore();
        if !first {
            if rescore {
                self.elect(now);
            }
            return;
        }
        self.newcomers = Bucket::full(now, self.config.sender_burst);
        self.seq = self.seq.max(seq_base);
        self.started_at = now;
        self.next_beacon = now;
        self.next_probe = now + self.config.probe_interval;
        self.next_member = now + self.config.member_interval;
        self.next_report = now + self.config.beacon_interval * 2;
        self.elect(now);
    }

    /// Replaces this agent's certificate (renewed by the manager over the live session);
    /// the clock and the sequence numbers go on.
    pub fn set_cert(&mut self, now: Duration, cert: AgentCert) {
        if self.cert.is_none() {
            return;
        }
        self.cert = Some(cert);
        if self.rescore() {
            self.elect(now);
        }
    }

    /// Takes the manager's newest revocation list: from now on datagrams of agents it
    /// revokes (or whose certificates expired) are dropped, and members it names leave the
    /// table at once (a member enrolled again comes back with its next beacon).
    pub fn set_revocations(&mut self, now: Duration, list: RevocationList) {
        let mut left: Vec<AgentId, MEMBERS> = Vec::new();
        self.members.retain(|m| {
            let named = list.entries.iter().any(|e| e.id == m.id);
            if named && m.live {
                let _ = left.push(m.id.clone());
            }
            !named
        });
        self.revocations = Some(list);
        if !left.is_empty() {
            for id in left {
                self.event(SegmentEvent::MemberLeft { id });
            }
            self.report_due = true;
            self.elect(now);
        }
    }

    /// Asks for a report as soon as the spacing allows (e.g. the manager session
    /// came back, so the manager's view may be stale). Only the leader reports.
    pub fn request_report(&mut self) {
        self.report_due = true;
    }

    /// Whether [`Segment::start`] was called.
    pub fn started(&self) -> bool {
        self.cert.is_some()
    }

    /// Updates what this agent says of itself; its score follows at once.
    pub fn set_capabilities(&mut self, now: Duration, caps: Capabilities) {
        self.declared = capability_score(&caps);
        self.caps = caps;
        if self.rescore() && self.started() {
            self.elect(now);
        }
    }

    /// Recomputes this agent's election score from its declared score and certificate;
    /// returns whether it changed.
    fn rescore(&mut self) -> bool {
        let score = match &self.cert {
            Some(c) if c.segment == self.config.segment => self.declared.min(c.score),
            Some(_) => 0,
            None => self.declared,
        };
        let changed = score != self.score;
        self.score = score;
        changed
    }

    /// This agent's election score: its capability score, capped by its certificate.
    pub fn score(&self) -> u32 {
        self.score
    }

    /// Ed25519 verifications done on received datagrams so far (each costs far more than
    /// every other check together).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks
    }

    /// Our estimate of the manager's clock at `now`, Unix milliseconds.
    fn manager_ms(&self, now: Duration) -> u64 {
        let (at, ms) = self.clock;
        let elapsed = u64::try_from(now.saturating_sub(at).as_millis()).unwrap_or(u64::MAX);
        ms.saturating_add(elapsed)
    }

    /// The elected leader, once started.
    pub fn leader(&self) -> Option<&AgentId> {
        self.leader.as_ref()
    }

    /// Whether this agent is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref() == Some(&self.config.id)
    }

    /// Live members, this agent included (0 before start).
    pub fn member_count(&self) -> usize {
        if !self.started() {
            return 0;
        }
        1 + self.members.iter().filter(|m| m.live).count()
    }

    /// The term of the last report this agent sent as leader.
    pub fn term(&self) -> u32 {
        self.term
    }

    /// Measured round-trip times to live members, nearest first (at most `N`).
    pub fn peer_delays<const N: usize>(&self) -> Vec<Delay, N> {
        let mut all: Vec<(u32, &AgentId), MEMBERS> = Vec::new();
        for m in self.members.iter().filter(|m| m.live) {
            if let Some(rtt) = m.rtt_us {
                let _ = all.push((rtt, &m.id));
            }
        }
        all.sort_unstable();
        all.iter()
            .take(N)
            .map(|(rtt_us, id)| Delay {
                to: DelayTo::Peer((*id).clone()),
                rtt_us: *rtt_us,
            })
            .collect()
    }

    fn event(&mut self, e: SegmentEvent) {
        if self.events.is_full() {
            self.events.pop_front();
        }
        let _ = self.events.push_back(e);
    }

    fn queue(&mut self, p: Pending) {
        // A full outbox drops the datagram: every kind is repeated periodically.
        let _ = self.outbox.push_back(p);
    }

    /// Recomputes the leader over live members and this agent.
    fn elect(&mut self, now: Duration) {
        let mut best: (u32, &AgentId) = (self.score, &self.config.id);
        for m in self.members.iter().filter(|m| m.live) {
            if (m.score, &m.id) > best {
                best = (m.score, &m.id);
            }
        }
        if self.leader.as_ref() == Some(best.1) {
            return;
        }
        let leader = best.1.clone();
        self.leader = Some(leader.clone());
        let is_self = leader == self.config.id;
        if is_self {
            self.report_due = true;
        } else {
            // Tell the new leader about ourselves at once.
            self.next_member = now;
        }
        self.event(SegmentEvent::LeaderChanged { leader, is_self });
    }

    // ---------------------------------------------------------------- inputs

    /// One datagram received from `from` (its source address).
    ///
    /// Our own broadcasts, looped back, are accepted and ignored. A refused
    /// datagram changes nothing.
    pub fn handle_datagram(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<(), SegmentError> {
        if !self.started() {
            return Err(SegmentError::NotStarted);
        }
        let unverified = discovery::decode(bytes).map_err(SegmentError::Discovery)?;
        if unverified.claimed().sender.id == self.config.id {
            // Our own broadcast, looped back (or a forgery of it): nothing to learn.
            return Ok(());
        }
        let pos = self.check_cheaply(now, from, unverified.claimed())?;
        let dg = self.verify(unverified)?;
        let pos = match pos {
            Some(p) => p,
            None => self.admit(&dg.sender, from, now)?,
        };
        let mut joined = false;
        {
            let m = &mut self.members[pos];
            m.last_seq = dg.seq;
            m.last_heard = now;
            m.addr = from;
            m.key = dg.sender.key;
            m.certified_score = dg.sender.score;
            if !m.live {
                m.live = true;
                m.probe = None;
                joined = true;
            }
        }
        if joined {
            let id = self.members[pos].id.clone();
            self.event(SegmentEvent::MemberJoined { id });
            self.report_due = true;
        }
        match dg.body {
            Announcement::Beacon { score, listen, .. } => {
                let m = &mut self.members[pos];
                let score = score.min(m.certified_score);
                let rescore = m.score != score;
                m.score = score;
                m.listen = listen;
                if rescore || joined {
                    self.elect(now);
                }
            }
            Announcement::Probe { nonce } => self.queue(Pending::Echo { to: from, nonce }),
            Announcement::Echo { nonce } => {
                let m = &mut self.members[pos];
                if m.probe == Some(nonce) {
                    m.probe = None;
                    let rtt = micros(now).saturating_sub(nonce);
                    m.rtt_us = Some(u32::try_from(rtt).unwrap_or(u32::MAX));
                }
            }
            Announcement::Member(info) => {
                let m = &mut self.members[pos];
                let first = m.info.is_none();
                let score = info.score.min(m.certified_score);
                let rescore = m.score != score;
                m.score = score;
                m.listen = info.listen;
                m.info = Some(info);
                if rescore {
                    self.elect(now);
                }
                if first && self.is_leader() {
                    self.report_due = true;
                }
            }
        }
        Ok(())
    }

    /// The checks of a decoded datagram that cost no signature verification, in the order
    /// of the module docs; `Ok` (with the sender's slot in the table, if it has one) when
    /// the datagram is worth verifying. Takes one token of the sender's bucket if it comes
    /// from the sender's verified address, else of the shared one of newcomers: a forgery
    /// of a member's id from elsewhere cannot spend the member's own allowance.
    fn check_cheaply(
        &mut self,
        now: Duration,
        from: SocketAddr,
        dg: &Datagram,
    ) -> Result<Option<usize>, SegmentError> {
        match &dg.body {
            Announcement::Beacon { segment, .. } if *segment != self.config.segment => {
                return Err(SegmentError::OtherSegment);
            }
            Announcement::Member(m) if m.id != dg.sender.id => {
                return Err(SegmentError::Mismatch);
            }
            _ => {}
        }
        if dg.sender.segment != self.config.segment {
            return Err(SegmentError::UncertifiedSegment);
        }
        let ours = self.manager_ms(now);
        peer_cert_acceptable(&dg.sender, self.revocations.as_ref(), Some(ours / 1000))
            .map_err(SegmentError::Certificate)?;
        let skew = u64::try_from(self.config.max_clock_skew.as_millis()).unwrap_or(u64::MAX);
        if dg.time_ms.abs_diff(ours) > skew {
            return Err(SegmentError::Stale);
        }
        let pos = self.members.iter().position(|m| m.id == dg.sender.id);
        let beacon = matches!(dg.body, Announcement::Beacon { .. });
        match pos {
            Some(p) if dg.seq <= self.members[p].last_seq => return Err(SegmentError::Replay),
            Some(p) if !beacon && !self.members[p].live => {
                return Err(SegmentError::UnknownSender);
            }
            None if !beacon => return Err(SegmentError::UnknownSender),
            None if self.members.is_full() && self.members.iter().all(|m| m.live) => {
                return Err(SegmentError::TableFull);
            }
            _ => {}
        }
        let (rate, burst) = (self.config.sender_rate, self.config.sender_burst);
        let allowed = match pos {
            Some(p) if self.members[p].addr == from => {
                self.members[p].bucket.take(now, rate, burst)
            }
            _ => self.newcomers.take(now, rate, burst),
        };
        if !allowed {
            return Err(SegmentError::RateLimited);
        }
        Ok(pos)
    }

    /// The two Ed25519 verifications (certificate, then signature), counted.
    fn verify(&mut self, unverified: discovery::Unverified<'_>) -> Result<Datagram, SegmentError> {
        let result = unverified.verify(&self.manager);
        self.signature_checks += match result {
            Err(DiscoveryError::BadCert) => 1,
            _ => 2,
        };
        result.map_err(SegmentError::Discovery)
    }

    /// Makes room for a new member: a free slot, else the slot of the longest-silent one.
    fn admit(
        &mut self,
        sender: &AgentCert,
        from: SocketAddr,
        now: Duration,
    ) -> Result<usize, SegmentError> {
        let fresh = Member {
            id: sender.id.clone(),
            key: sender.key,
            addr: from,
            last_seq: 0,
            last_heard: now,
            live: false,
            score: 0,
            certified_score: sender.score,
            bucket: Bucket::full(now, self.config.sender_burst),
            listen: None,
            info: None,
            probe: None,
            rtt_us: None,
        };
        if self.members.push(fresh.clone()).is_ok() {
            return Ok(self.members.len() - 1);
        }
        let silent = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.live)
            .min_by_key(|(_, m)| m.last_heard)
            .map(|(i, _)| i)
            .ok_or(SegmentError::TableFull)?;
        self.members[silent] = fresh;
        Ok(silent)
    }

    /// Time passed: expire silent members, send what is due.
    pub fn handle_timeout(&mut self, now: Duration) {
        if !self.started() {
            return;
        }
        let timeout = self.config.leader_timeout;
        let mut left: Vec<AgentId, MEMBERS> = Vec::new();
        for m in self.members.iter_mut() {
            if m.live && now >= m.last_heard + timeout {
                m.live = false;
                m.probe = None;
                m.info = None;
                let _ = left.push(m.id.clone());
            }
        }
        if !left.is_empty() {
            for id in left {
                self.event(SegmentEvent::MemberLeft { id });
            }
            self.report_due = true;
            self.elect(now);
        }
        if now >= self.next_beacon {
            self.queue(Pending::Beacon);
            self.next_beacon = now + self.config.beacon_interval;
        }
        if now >= self.next_probe {
            self.next_probe = now + self.config.probe_interval;
            let nonce = micros(now);
            let mut probes: Vec<SocketAddr, MEMBERS> = Vec::new();
            for m in self.members.iter_mut().filter(|m| m.live) {
                m.probe = Some(nonce);
                let _ = probes.push(m.addr);
            }
            for to in probes {
                self.queue(Pending::Probe { to, nonce });
            }
        }
        if now >= self.next_member {
            self.next_member = now + self.config.member_interval;
            if let Some(to) = self.leader_addr() {
                self.queue(Pending::Member { to });
            }
        }
        if self.is_leader() && self.paging.is_none() && self.report_ready(now) {
            self.report_due = false;
            self.last_report = Some(now);
            self.next_report = now + self.config.report_interval;
            self.term = self.term.wrapping_add(1);
            let members = self.member_count();
            let pages = members.div_ceil(MAX_MEMBERS_PER_PAGE).max(1);
            self.paging = Some(Paging {
                term: self.term,
                next: 0,
                pages: u16::try_from(pages).unwrap_or(u16::MAX),
            });
        }
    }

    fn leader_addr(&self) -> Option<SocketAddr> {
        let leader = self.leader.as_ref()?;
        self.members
            .iter()
            .find(|m| m.live && m.id == *leader)
            .map(|m| m.addr)
    }

    /// When the leader's next report may go out (changes wait for the first
    /// `2 × beacon_interval` after start and at most one per `beacon_interval`).
    fn report_at(&self) -> Duration {
        let settled = self.started_at + self.config.beacon_interval * 2;
        if self.report_due {
            let spaced = self
                .last_report
                .map_or(settled, |l| l + self.config.beacon_interval);
            spaced.max(settled).min(self.next_report.max(settled))
        } else {
            self.next_report.max(settled)
        }
    }

    fn report_ready(&self, now: Duration) -> bool {
        now >= self.report_at()
    }

    // --------------------------------------------------------------- outputs

    /// When [`Segment::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.started() {
            return None;
        }
        let mut t = self.next_beacon.min(self.next_probe);
        if self.leader_addr().is_some() {
            t = t.min(self.next_member);
        }
        for m in self.members.iter().filter(|m| m.live) {
            t = t.min(m.last_heard + self.config.leader_timeout);
        }
        if self.is_leader() && self.paging.is_none() {
            t = t.min(self.report_at());
        }
        Some(t)
    }

    /// This agent as a segment member, as it tells the leader.
    fn own_member(&self) -> SegmentMember {
        let mut delays: Vec<Delay, MAX_DELAYS> = Vec::new();
        if let Some(rtt_us) = self.caps.manager_rtt_us {
            let _ = delays.push(Delay {
                to: DelayTo::Manager,
                rtt_us,
            });
        }
        let peers: Vec<Delay, MAX_DELAYS> = self.peer_delays();
        for d in peers {
            if delays.push(d).is_err() {
                break;
            }
        }
        SegmentMember {
            id: self.config.id.clone(),
            score: self.score,
            listen: self.caps.listen,
            performance: self.caps.performance,
            free_storage: self.caps.free_storage,
            can_serve: self.caps.can_serve,
            link: self.caps.link,
            delays,
            last_heard_ms: 0,
        }
    }

    /// Seals the next datagram into `buf` (at least [`discovery::MAX_DATAGRAM`] bytes).
    pub fn poll_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<Outgoing> {
        while let Some(p) = self.outbox.pop_front() {
            let (to, body) = match p {
                Pending::Beacon => (
                    Destination::Broadcast,
                    Announcement::Beacon {
                        segment: self.config.segment.clone(),
                        score: self.score,
                        listen: self.caps.listen,
                        leader: self.leader.clone(),
                    },
                ),
                Pending::Probe { to, nonce } => {
                    (Destination::Unicast(to), Announcement::Probe { nonce })
                }
                Pending::Echo { to, nonce } => {
                    (Destination::Unicast(to), Announcement::Echo { nonce })
                }
                Pending::Member { to } => (
                    Destination::Unicast(to),
                    Announcement::Member(self.own_member()),
                ),
            };
            let time_ms = self.manager_ms(now);
            let cert = self.cert.as_ref()?;
            let seq = self.seq + 1;
            match discovery::seal(&self.identity, cert, seq, time_ms, &body, buf) {
                Ok(len) => {
                    self.seq = seq;
                    return Some(Outgoing { to, len });
                }
                Err(_) => continue,
            }
        }
        None
    }

    /// The next page of the leader's report for the manager, if one is due.
    ///
    /// Drain every page after each input: pages are built from the members
    /// table as it stands, in a fixed order (this agent first, then members
    /// by table slot). An agent configured without a segment name reports nothing: the
    /// manager only records named segments.
    pub fn poll_report(&mut self, now: Duration) -> Option<SegmentReport> {
        let paging = self.paging?;
        if !self.is_leader() || paging.next >= paging.pages || self.config.segment.is_empty() {
            self.paging = None;
            return None;
        }
        let first = usize::from(paging.next) * MAX_MEMBERS_PER_PAGE;
        let mut members = Vec::new();
        let mut index = 0usize;
        if first == 0 {
            let _ = members.push(self.own_member());
        }
        index += 1;
        for m in self.members.iter().filter(|m| m.live) {
            if index >= first && index < first + MAX_MEMBERS_PER_PAGE {
                let mut info = m.info.clone().unwrap_or_else(|| SegmentMember {
                    id: m.id.clone(),
                    score: m.score,
                    listen: m.listen,
                    performance: 0,
                    free_storage: 0,
                    can_serve: false,
                    link: LinkInfo::default(),
                    delays: Vec::new(),
                    last_heard_ms: 0,
                });
                info.score = m.score;
                info.last_heard_ms = millis_u32(now.saturating_sub(m.last_heard));
                let _ = members.push(info);
            }
            index += 1;
        }
        let page = SegmentReport {
            segment: self.config.segment.clone(),
            leader: self.config.id.clone(),
            term: paging.term,
            page: paging.next,
            pages: paging.pages,
            members,
        };
        let next = paging.next + 1;
        self.paging = (next < paging.pages).then_some(Paging { next, ..paging });
        Some(page)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<SegmentEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod test {
    extern crate std;

    use std::vec;
    use std::vec::Vec as StdVec;

    use super::*;

    const MANAGER_SEED: u8 = 1;
    /// The manager's Unix time (ms) when the simulated agents start at time 0.
    const T0_MS: u64 = 1_800_000_000_000;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn name(s: &str) -> Name {
        Name::try_from(s).unwrap()
    }

    fn manager() -> Identity {
        Identity::from_seed([MANAGER_SEED; 32])
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// The manager's certificate for `agent` in `segment`, allowing every capability score.
    fn cert_in(agent: &str, key: &Identity, segment: &str) -> AgentCert {
        AgentCert::issue_certified(
            &manager(),
            id(agent),
            key.public(),
            name(segment),
            discovery::MAX_CAPABILITY_SCORE,
        )
    }

    fn caps(performance: u32) -> Capabilities {
        Capabilities {
            listen: None,
            performance,
            free_storage: 1 << 30,
            can_serve: true,
            link: LinkInfo {
                up_bps: 1 << 20,
                down_bps: 1 << 20,
                loss_ppm: 0,
                uptime_s: 0,
            },
            manager_rtt_us: Some(500),
        }
    }

    /// One simulated agent: its machine, identity, address and what it saw.
    struct Node {
        seg: Segment,
        identity: Identity,
        cert: AgentCert,
        addr: SocketAddr,
        alive: bool,
        reports: StdVec<SegmentReport>,
        events: StdVec<(Duration, SegmentEvent)>,
    }

    /// A deterministic segment: datagrams arrive `latency` after they are sent
    /// (broadcasts to every other live node), the clock jumps to the next event.
    struct Net {
        nodes: StdVec<Node>,
        now: Duration,
        latency: Duration,
        in_flight: StdVec<(Duration, usize, SocketAddr, StdVec<u8>)>,
        errors: StdVec<(usize, SegmentError)>,
    }

    impl Net {
        fn new(specs: &[(&str, &str, u32)]) -> Net {
            let mut nodes = StdVec::new();
            for (i, (agent, segment, performance)) in specs.iter().enumerate() {
                let identity = Identity::from_seed([10 + i as u8; 32]);
                let cert = cert_in(agent, &identity, segment);
                let mut config = SegmentConfig::new(id(agent), name(segment));
                config.beacon_interval = ms(1000);
                config.leader_timeout = ms(3000);
                let mut seg = Segment::new(config, identity.clone(), manager().public());
                seg.set_capabilities(Duration::ZERO, caps(*performance));
                nodes.push(Node {
                    seg,
                    identity,
                    cert,
                    addr: SocketAddr::from(([10, 0, 0, 1 + i as u8], 40000)),
                    alive: true,
                    reports: StdVec::new(),
                    events: StdVec::new(),
                });
            }
            Net {
                nodes,
                now: Duration::ZERO,
                latency: ms(1),
                in_flight: StdVec::new(),
                errors: StdVec::new(),
            }
        }

        fn start_all(&mut self) {
            let now = self.now;
            for (i, n) in self.nodes.iter_mut().enumerate() {
                n.seg.start(
                    now,
                    n.cert.clone(),
                    1000 * (i as u64 + 1),
                    T0_MS + micros(now) / 1000,
                );
            }
            self.drain_all();
        }

        fn drain(&mut self, i: usize) {
            let now = self.now;
            let mut buf = [0u8; discovery::MAX_DATAGRAM];
            while let Some(out) = self.nodes[i].seg.poll_transmit(now, &mut buf) {
                let bytes = buf[..out.len].to_vec();
                let from = self.nodes[i].addr;
                for (j, n) in self.nodes.iter().enumerate() {
                    let hit = match out.to {
                        Destination::Broadcast => true, // our own loops back too
                        Destination::Unicast(a) => a == n.addr,
                    };
                    if hit {
                        self.in_flight
                            .push((now + self.latency, j, from, bytes.clone()));
                    }
                }
            }
            while let Some(r) = self.nodes[i].seg.poll_report(now) {
                self.nodes[i].reports.push(r);
            }
            while let Some(e) = self.nodes[i].seg.poll_event() {
                self.nodes[i].events.push((now, e));
            }
        }

        fn drain_all(&mut self) {
            for i in 0..self.nodes.len() {
                if self.nodes[i].alive {
                    self.drain(i);
                }
            }
        }

        /// Advances to the next timer or delivery, up to `until`.
        fn step(&mut self, until: Duration) -> bool {
            let mut next = until;
            for n in self.nodes.iter().filter(|n| n.alive) {
                if let Some(t) = n.seg.poll_timeout() {
                    next = next.min(t);
                }
            }
            for (t, ..) in &self.in_flight {
                next = next.min(*t);
            }
            assert!(next >= self.now, "time went backwards");
            self.now = next;
            let due: StdVec<_> = {
                let (due, later) = core::mem::take(&mut self.in_flight)
                    .into_iter()
                    .partition(|(t, ..)| *t <= next);
                self.in_flight = later;
                due
            };
            for (_, j, from, bytes) in due {
                if !self.nodes[j].alive {
                    continue;
                }
                if let Err(e) = self.nodes[j].seg.handle_datagram(next, from, &bytes) {
                    self.errors.push((j, e));
                }
                self.drain(j);
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].alive
                    && self.nodes[i].seg.poll_timeout().is_some_and(|t| t <= next)
                {
                    self.nodes[i].seg.handle_timeout(next);
                    self.drain(i);
                    let after = self.nodes[i].seg.poll_timeout().unwrap();
                    assert!(after > next, "node {i} asks to be woken again at once");
                }
            }
            next < until
        }

        fn run_until(&mut self, until: Duration) {
            for _ in 0..100_000 {
                if !self.step(until) {
                    return;
                }
            }
            panic!("simulation did not reach {until:?}");
        }

        fn leaders(&self) -> StdVec<Option<AgentId>> {
            self.nodes
                .iter()
                .filter(|n| n.alive)
                .map(|n| n.seg.leader().cloned())
                .collect()
        }
    }

    #[test]
    fn score_orders_serving_then_link_then_performance_then_storage() {
        let base = caps(100);
        let mut no_serve = base.clone();
        no_serve.can_serve = false;
        no_serve.link.up_bps = u64::MAX;
        no_serve.link.down_bps = u64::MAX;
        no_serve.performance = 1000;
        assert!(capability_score(&base) > capability_score(&no_serve));
        let mut faster = base.clone();
        faster.link.up_bps *= 2;
        faster.link.down_bps *= 2;
        faster.performance = 1;
        assert!(capability_score(&faster) > capability_score(&base));
        // The slower direction counts: a fast uplink alone does not help.
        let mut lopsided = base.clone();
        lopsided.link.up_bps *= 1024;
        assert_eq!(capability_score(&lopsided), capability_score(&base));
        let mut stronger = base.clone();
        stronger.performance = 101;
        stronger.free_storage = 0;
        assert!(capability_score(&stronger) > capability_score(&base));
        let mut bigger = base.clone();
        bigger.free_storage *= 4;
        assert!(capability_score(&bigger) > capability_score(&base));
        // Small wobbles of a measured rate do not change the score.
        let mut wobble = base.clone();
        wobble.link.up_bps += 1000;
        wobble.link.down_bps += 1000;
        assert_eq!(capability_score(&wobble), capability_score(&base));
        // Extreme values stay in range and keep the order.
        let mut max = base.clone();
        max.performance = u32::MAX;
        max.free_storage = u64::MAX;
        max.link.up_bps = u64::MAX;
        max.link.down_bps = u64::MAX;
        assert!(capability_score(&max) < 1 << 25);
    }

    #[test]
    fn highest_score_is_elected_by_everyone() {
        let mut net = Net::new(&[("a", "s", 100), ("b", "s", 300), ("c", "s", 200)]);
        net.start_all();
        net.run_until(ms(2500));
        assert_eq!(net.leaders(), [Some(id("b")), Some(id("b")), Some(id("b"))]);
        assert!(net.nodes[1].seg.is_leader());
        assert_eq!(net.nodes[0].seg.member_count(), 3);
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    #[test]
    fn ties_go_to_the_larger_id() {
        let mut net = Net::new(&[
            ("edge-2", "s", 100),
            ("edge-10", "s", 100),
            ("edge-1", "s", 100),
        ]);
        net.start_all();
        net.run_until(ms(2500));
        // Equal scores: "edge-2" > "edge-10" > "edge-1" bytewise.
        assert_eq!(
            net.leaders(),
            [Some(id("edge-2")), Some(id("edge-2")), Some(id("edge-2"))]
        );
    }

    #[test]
    fn a_silent_leader_is_replaced_within_the_bound() {
        let mut net = Net::new(&[
            ("a", "s", 100),
            ("b", "s", 400),
            ("c", "s", 300),
            ("d", "s", 200),
        ]);
        net.start_all();
        net.run_until(ms(5000));
        assert_eq!(net.leaders(), vec![Some(id("b")); 4]);
        // Kill the leader at an awkward moment: just after its beacon went out.
        let beacon = net.nodes[1].seg.next_beacon;
        net.run_until(beacon + ms(2));
        let killed_at = net.now;
        net.nodes[1].alive = false;
        let timeout = ms(3000);
        let bound = timeout + ms(1000);
        net.run_until(killed_at + bound);
        for i in [0, 2, 3] {
            let n = &net.nodes[i];
            assert_eq!(n.seg.leader(), Some(&id("c")), "node {i}");
            let (at, _) = n
                .events
                .iter()
                .rev()
                .find(|(_, e)| matches!(e, SegmentEvent::LeaderChanged { leader, .. } if *leader == id("c")))
                .expect("leader change event");
            assert!(
                *at <= killed_at + bound,
                "node {i} elected the new leader {:?} after the kill, bound {bound:?}",
                *at - killed_at
            );
            // And not before the old one could have been declared silent.
            assert!(*at >= killed_at + timeout - ms(1000) - ms(3));
        }
        // The new leader reports within the same bound plus one spacing.
        let term_reports: StdVec<_> = net.nodes[2]
            .reports
            .iter()
            .filter(|r| r.page == 0)
            .collect();
        assert!(!term_reports.is_empty(), "new leader sent no report");
        assert_eq!(term_reports.last().unwrap().pages, 1);
        assert_eq!(net.nodes[2].reports.last().unwrap().members.len(), 3);
    }

    #[test]
    fn other_segments_are_ignored() {
        let mut net = Net::new(&[("a", "s1", 100), ("b", "s2", 300)]);
        net.start_all();
        net.run_until(ms(2500));
        assert_eq!(net.leaders(), [Some(id("a")), Some(id("b"))]);
        assert_eq!(net.nodes[0].seg.member_count(), 1);
        assert!(
            net.errors
                .iter()
                .all(|(_, e)| *e == SegmentError::OtherSegment)
        );
        assert!(!net.errors.is_empty());
    }

    #[test]
    fn a_revoked_member_leaves_at_once_and_its_datagrams_are_dropped() {
        let mut net = Net::new(&[("a", "s", 100), ("b", "s", 300), ("c", "s", 200)]);
        net.start_all();
        net.run_until(ms(2500));
        assert_eq!(net.leaders(), [Some(id("b")), Some(id("b")), Some(id("b"))]);
        let entries = [baton_protocol::revocation::Revoked {
            id: id("b"),
            up_to_serial: 0,
        }]
        .into_iter()
        .collect();
        let list = RevocationList::sign(&manager(), 1, T0_MS / 1000, entries);
        for i in [0, 2] {
            let now = net.now;
            net.nodes[i].seg.set_revocations(now, list.clone());
            assert_eq!(
                net.nodes[i].seg.leader(),
                Some(&id("c")),
                "re-elected at once"
            );
            assert_eq!(net.nodes[i].seg.member_count(), 2);
            // What the new leader owes (its report) is due now: a driver fires at once.
            net.nodes[i].seg.handle_timeout(now);
        }
        net.errors.clear();
        net.run_until(ms(6000));
        assert_eq!(net.nodes[0].seg.leader(), Some(&id("c")));
        assert_eq!(
            net.nodes[0].seg.member_count(),
            2,
            "b is not admitted again"
        );
        assert!(
            net.errors
                .iter()
                .any(|(_, e)| *e == SegmentError::Certificate(CertRefusal::Revoked)),
            "{:?}",
            net.errors
        );
    }

    #[test]
    fn round_trip_times_are_measured_and_reported() {
        let mut net = Net::new(&[("a", "s", 100), ("b", "s", 300), ("c", "s", 200)]);
        net.latency = ms(3);
        net.start_all();
        net.run_until(ms(12_000));
        let delays: Vec<Delay, 4> = net.nodes[0].seg.peer_delays();
        assert_eq!(delays.len(), 2);
        for d in &delays {
            assert_eq!(d.rtt_us, 6000, "{d:?}");
        }
        // The leader's report carries every member with its delays, manager first.
        let last = net.nodes[1].reports.last().expect("leader reported");
        assert_eq!(last.leader, id("b"));
        assert_eq!(last.members.len(), 3);
        let a = last.members.iter().find(|m| m.id == id("a")).unwrap();
        assert_eq!(a.delays[0].to, DelayTo::Manager);
        assert_eq!(a.delays.len(), 3);
        assert!(a.last_heard_ms <= 2000);
        assert!(a.can_serve && a.performance == 100);
        // Terms grow report by report.
        let terms: StdVec<u32> = net.nodes[1].reports.iter().map(|r| r.term).collect();
        assert!(terms.windows(2).all(|w| w[0] < w[1]), "{terms:?}");
    }

    /// `body` from `node`, sent at time `now` on the simulated timeline.
    fn sealed_at(node: &Node, seq: u64, now: Duration, body: &Announcement) -> StdVec<u8> {
        let mut buf = [0u8; discovery::MAX_DATAGRAM];
        let time = T0_MS + micros(now) / 1000;
        let n = discovery::seal(&node.identity, &node.cert, seq, time, body, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn sealed(node: &Node, seq: u64, body: &Announcement) -> StdVec<u8> {
        sealed_at(node, seq, ms(10), body)
    }

    fn beacon(segment: &str, score: u32) -> Announcement {
        Announcement::Beacon {
            segment: name(segment),
            score,
            listen: None,
            leader: None,
        }
    }

    #[test]
    fn replays_and_forgeries_are_dropped() {
        let net = Net::new(&[("a", "s", 100), ("b", "s", 300)]);
        let (mut a, b) = {
            let mut it = net.nodes.into_iter();
            (it.next().unwrap(), it.next().unwrap())
        };
        let now = ms(10);
        let dg = sealed(&b, 5, &beacon("s", u32::MAX));
        assert_eq!(
            a.seg.handle_datagram(now, b.addr, &dg),
            Err(SegmentError::NotStarted)
        );
        a.seg.start(now, a.cert.clone(), 1, T0_MS + 10);
        assert_eq!(a.seg.handle_datagram(now, b.addr, &dg), Ok(()));
        assert_eq!(a.seg.leader(), Some(&id("b")));
        // The same datagram again, and an older one: replays.
        assert_eq!(
            a.seg.handle_datagram(now, b.addr, &dg),
            Err(SegmentError::Replay)
        );
        let old = sealed(&b, 4, &beacon("s", 1));
        assert_eq!(
            a.seg.handle_datagram(now, b.addr, &old),
            Err(SegmentError::Replay)
        );
        // A flipped byte in the body: bad signature, and the score stays.
        let mut bad = sealed(&b, 6, &beacon("s", 1));
        let at = bad.len() - 70;
        bad[at] ^= 1;
        assert!(matches!(
            a.seg.handle_datagram(now, b.addr, &bad),
            Err(SegmentError::Discovery(_))
        ));
        // A certificate from another manager.
        let stranger = Identity::from_seed([99; 32]);
        let mut forged_node = Node {
            cert: AgentCert::issue_certified(
                &stranger,
                id("b"),
                b.identity.public(),
                name("s"),
                u32::MAX,
            ),
            ..b
        };
        let forged = sealed(&forged_node, 7, &beacon("s", 1));
        assert_eq!(
            a.seg.handle_datagram(now, forged_node.addr, &forged),
            Err(SegmentError::Discovery(DiscoveryError::BadCert))
        );
        assert_eq!(a.seg.leader(), Some(&id("b")));
        // A member datagram about someone else.
        forged_node.cert = cert_in("b", &forged_node.identity, "s");
        let mut info = a.seg.own_member();
        info.id = id("c");
        let lie = sealed(&forged_node, 8, &Announcement::Member(info));
        assert_eq!(
            a.seg.handle_datagram(now, forged_node.addr, &lie),
            Err(SegmentError::Mismatch)
        );
        // A probe from an agent never heard on the segment.
        let c_identity = Identity::from_seed([50; 32]);
        let c = Node {
            cert: cert_in("c", &c_identity, "s"),
            identity: c_identity,
            ..forged_node
        };
        let probe = sealed(&c, 1, &Announcement::Probe { nonce: 1 });
        assert_eq!(
            a.seg.handle_datagram(now, c.addr, &probe),
            Err(SegmentError::UnknownSender)
        );
        // Nothing refused changed the table or produced an echo.
        assert_eq!(a.seg.member_count(), 2);
        let mut buf = [0u8; discovery::MAX_DATAGRAM];
        let mut echoes = 0;
        while let Some(out) = a.seg.poll_transmit(now, &mut buf) {
            let dg = discovery::open(&buf[..out.len], &manager().public()).unwrap();
            echoes += usize::from(matches!(dg.body, Announcement::Echo { .. }));
        }
        assert_eq!(echoes, 0);
    }

    /// A datagram from `key` showing `cert`, sent at `now` on the simulated timeline.
    fn forged(
        key: &Identity,
        cert: &AgentCert,
        seq: u64,
        now: Duration,
        body: &Announcement,
    ) -> StdVec<u8> {
        let mut buf = [0u8; discovery::MAX_DATAGRAM];
        let time = T0_MS + micros(now) / 1000;
        let n = discovery::seal(key, cert, seq, time, body, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    impl Net {
        /// Delivers `bytes` from `from` to every live node now; returns what each said.
        fn inject(&mut self, from: SocketAddr, bytes: &[u8]) -> StdVec<Result<(), SegmentError>> {
            let now = self.now;
            let mut out = StdVec::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].alive {
                    out.push(self.nodes[i].seg.handle_datagram(now, from, bytes));
                    self.drain(i);
                }
            }
            out
        }

        /// Runs to `until` while `rogue` broadcasts a beacon (score `u32::MAX`, and a
        /// member datagram with that score) every 500 ms; returns every answer it got.
        fn run_with_rogue(
            &mut self,
            until: Duration,
            key: &Identity,
            cert: &AgentCert,
        ) -> StdVec<Result<(), SegmentError>> {
            let from = SocketAddr::from(([10, 0, 0, 99], 40000));
            let mut answers = StdVec::new();
            let mut seq = 1;
            for _ in 0..1000 {
                if self.now >= until {
                    break;
                }
                let mut me = SegmentMember {
                    id: cert.id.clone(),
                    score: u32::MAX,
                    listen: None,
                    performance: 1000,
                    free_storage: u64::MAX,
                    can_serve: true,
                    link: LinkInfo {
                        up_bps: u64::MAX,
                        down_bps: u64::MAX,
                        loss_ppm: 0,
                        uptime_s: 0,
                    },
                    delays: Vec::new(),
                    last_heard_ms: 0,
                };
                me.score = u32::MAX;
                for body in [beacon("s", u32::MAX), Announcement::Member(me)] {
                    let bytes = forged(key, cert, seq, self.now, &body);
                    seq += 1;
                    answers.extend(self.inject(from, &bytes));
                }
                let next = (self.now + ms(500)).min(until);
                self.run_until(next);
            }
            answers
        }
    }

    #[test]
    fn an_agent_certified_for_another_segment_does_not_lead_even_with_the_maximum_score() {
        let mut net = Net::new(&[("a", "s", 100), ("b", "s", 300)]);
        net.start_all();
        net.run_until(ms(2500));
        assert_eq!(net.leaders(), [Some(id("b")), Some(id("b"))]);
        let key = Identity::from_seed([77; 32]);
        // "z" is enrolled (its certificate is the manager's) but placed in "other".
        let cert = cert_in("z", &key, "other");
        let answers = net.run_with_rogue(ms(8000), &key, &cert);
        assert!(!answers.is_empty());
        assert!(
            answers
                .iter()
                .all(|r| *r == Err(SegmentError::UncertifiedSegment)),
            "{answers:?}"
        );
        assert_eq!(net.leaders(), [Some(id("b")), Some(id("b"))]);
        assert_eq!(net.nodes[0].seg.member_count(), 2);
        // Nor does it appear in the leader's report.
        let last = net.nodes[1].reports.last().expect("b reported");
        assert!(last.members.iter().all(|m| m.id != id("z")));
        assert_eq!(last.members.len(), 2);
    }

    #[test]
    fn a_claimed_score_is_capped_by_the_certified_one() {
        // Certified for "s" with a low score: it joins, but cannot outbid b.
        let mut net = Net::new(&[("a", "s", 100), ("b", "s", 300)]);
        net.start_all();
        net.run_until(ms(2500));
        let key = Identity::from_seed([77; 32]);
        let low = AgentCert::issue_certified(&manager(), id("z"), key.public(), name("s"), 5);
        let answers = net.run_with_rogue(ms(8000), &key, &low);
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(net.leaders(), [Some(id("b")), Some(id("b"))]);
        assert_eq!(net.nodes[0].seg.member_count(), 3, "z is a member");
        let last = net.nodes[1].reports.last().expect("b reported");
        let z = last.members.iter().find(|m| m.id == id("z")).expect("z");
        assert_eq!(z.score, 5, "reported with its certified score");
        // Positive control: certified with every score, the same claims make it the leader.
        let mut net = Net::new(&[("a", "s", 100), ("b", "s", 300)]);
        net.start_all();
        net.run_until(ms(2500));
        let high = cert_in("z", &key, "s");
        net.run_with_rogue(ms(8000), &key, &high);
        assert_eq!(net.leaders(), [Some(id("z")), Some(id("z"))]);
    }

    #[test]
    fn own_certificate_for_another_segment_gives_score_zero() {
        let me = Identity::from_seed([2; 32]);
        let mut seg: Segment = Segment::new(
            SegmentConfig::new(id("me"), name("s")),
            me.clone(),
            manager().public(),
        );
        seg.set_capabilities(ms(0), caps(500));
        assert!(seg.score() > 0);
        seg.start(ms(0), cert_in("me", &me, "other"), 1, T0_MS);
        assert_eq!(seg.score(), 0);
        // A new `Welcome` placing it in its segment gives its score back, capped.
        let capped = AgentCert::issue_certified(&manager(), id("me"), me.public(), name("s"), 7);
        seg.start(ms(10), capped, 1, T0_MS + 10);
        assert_eq!(seg.score(), 7);
    }

    #[test]
    fn stale_replayed_and_flooding_datagrams_are_dropped_before_any_signature_check() {
        let net = Net::new(&[("a", "s", 100), ("b", "s", 300)]);
        let (mut a, b) = {
            let mut it = net.nodes.into_iter();
            (it.next().unwrap(), it.next().unwrap())
        };
        let t = ms(40_000);
        a.seg.start(ms(0), a.cert.clone(), 1, T0_MS);
        let good = sealed_at(&b, 5, t, &beacon("s", 300));
        assert_eq!(a.seg.handle_datagram(t, b.addr, &good), Ok(()));
        assert_eq!(
            a.seg.signature_checks(),
            2,
            "one certificate, one signature"
        );
        // Replayed, stale (31 s old), from the future, certified elsewhere: no check.
        assert_eq!(
            a.seg.handle_datagram(t, b.addr, &good),
            Err(SegmentError::Replay)
        );
        let old = sealed_at(&b, 6, t - ms(31_000), &beacon("s", 300));
        assert_eq!(
            a.seg.handle_datagram(t, b.addr, &old),
            Err(SegmentError::Stale)
        );
        let future = sealed_at(&b, 7, t + ms(31_000), &beacon("s", 300));
        assert_eq!(
            a.seg.handle_datagram(t, b.addr, &future),
            Err(SegmentError::Stale)
        );
        let elsewhere = forged(
            &b.identity,
            &cert_in("b", &b.identity, "x"),
            8,
            t,
            &beacon("s", 1),
        );
        assert_eq!(
            a.seg.handle_datagram(t, b.addr, &elsewhere),
            Err(SegmentError::UncertifiedSegment)
        );
        // Within the window both ways it is accepted.
        let late = sealed_at(&b, 9, t - ms(29_000), &beacon("s", 300));
        assert_eq!(a.seg.handle_datagram(t, b.addr, &late), Ok(()));
        assert_eq!(a.seg.signature_checks(), 4);

        // A flood: 2000 datagrams in one second claiming b's id (fresh seqs, bad signatures)
        // and 2000 from made-up newcomers (certificates of another manager).
        let stranger = Identity::from_seed([98; 32]);
        let before = a.seg.signature_checks();
        let mut refused = 0;
        for i in 0..2000u64 {
            let now = t + ms(i / 2);
            let mut spoof = sealed_at(&b, 100 + i, now, &beacon("s", 300));
            *spoof.last_mut().unwrap() ^= 1;
            refused += usize::from(a.seg.handle_datagram(now, b.addr, &spoof).is_err());
            let fake = AgentCert::issue_certified(
                &stranger,
                id(&std::format!("n{i}")),
                stranger.public(),
                name("s"),
                u32::MAX,
            );
            let newcomer = forged(&stranger, &fake, 1, now, &beacon("s", u32::MAX));
            refused += usize::from(a.seg.handle_datagram(now, b.addr, &newcomer).is_err());
        }
        assert_eq!(refused, 4000);
        let checks = a.seg.signature_checks() - before;
        // Each bucket: a burst of 20 and 10 per second; 2 checks per datagram at most.
        let bound = 2 * 2 * (20 + 10 + 1);
        std::eprintln!("flood of 4000 datagrams: {checks} signature checks (bound {bound})");
        assert!(
            checks <= bound,
            "{checks} signature checks for 4000 datagrams, bound {bound}"
        );
        // Honest b goes on being heard once its bucket refills.
        let later = t + ms(1500);
        let honest = sealed_at(&b, 10_000, later, &beacon("s", 300));
        assert_eq!(a.seg.handle_datagram(later, b.addr, &honest), Ok(()));
        assert_eq!(a.seg.member_count(), 2);

        // Forgeries of b's id from another address spend the newcomers' allowance, not
        // b's: b is heard at once, in the middle of them.
        let elsewhere_addr: SocketAddr = "10.9.9.9:7790".parse().unwrap();
        let then = later + ms(2000);
        for i in 0..200u64 {
            let mut spoof = sealed_at(&b, 20_000 + i, then, &beacon("s", 300));
            *spoof.last_mut().unwrap() ^= 1;
            assert!(a.seg.handle_datagram(then, elsewhere_addr, &spoof).is_err());
        }
        let heard = sealed_at(&b, 30_000, then, &beacon("s", 300));
        assert_eq!(a.seg.handle_datagram(then, b.addr, &heard), Ok(()));
    }

    #[test]
    fn own_broadcasts_are_ignored() {
        let mut net = Net::new(&[("a", "s", 100)]);
        net.start_all();
        net.run_until(ms(3500));
        assert!(net.errors.is_empty(), "{:?}", net.errors);
        assert_eq!(net.nodes[0].seg.member_count(), 1);
        assert!(net.nodes[0].seg.is_leader());
    }

    #[test]
    fn a_full_table_refuses_newcomers_until_a_slot_goes_silent() {
        let manager = manager();
        let me = Identity::from_seed([2; 32]);
        let mut seg: Segment<2> = Segment::new(
            SegmentConfig::new(id("me"), name("s")),
            me.clone(),
            manager.public(),
        );
        seg.start(ms(0), cert_in("me", &me, "s"), 1, T0_MS);
        let others: StdVec<(Identity, AgentCert)> = (0..3)
            .map(|i| {
                let k = Identity::from_seed([60 + i; 32]);
                let c = cert_in(&std::format!("m{i}"), &k, "s");
                (k, c)
            })
            .collect();
        let send = |seg: &mut Segment<2>, i: usize, seq: u64, now: Duration| {
            let mut buf = [0u8; discovery::MAX_DATAGRAM];
            let (k, c) = &others[i];
            let time = T0_MS + micros(now) / 1000;
            let n = discovery::seal(k, c, seq, time, &beacon("s", 1), &mut buf).unwrap();
            seg.handle_datagram(now, SocketAddr::from(([10, 0, 0, 9], 1)), &buf[..n])
        };
        assert_eq!(send(&mut seg, 0, 1, ms(0)), Ok(()));
        assert_eq!(send(&mut seg, 1, 1, ms(100)), Ok(()));
        assert_eq!(send(&mut seg, 2, 1, ms(200)), Err(SegmentError::TableFull));
        assert_eq!(seg.member_count(), 3);
        // m1 keeps beaconing, m0 falls silent and expires; m2 then gets m0's slot.
        assert_eq!(send(&mut seg, 1, 2, ms(2000)), Ok(()));
        seg.handle_timeout(ms(3000));
        assert_eq!(seg.member_count(), 2);
        assert_eq!(send(&mut seg, 2, 2, ms(3100)), Ok(()));
        assert_eq!(seg.member_count(), 3);
        let mut left = StdVec::new();
        while let Some(e) = seg.poll_event() {
            if let SegmentEvent::MemberLeft { id } = e {
                left.push(id);
            }
        }
        assert_eq!(left, [id("m0")]);
    }

    #[test]
    fn an_unnamed_segment_elects_but_does_not_report() {
        let mut net = Net::new(&[("a", "", 100), ("b", "", 900), ("c", "", 300)]);
        net.start_all();
        net.run_until(ms(4000));
        assert!(net.nodes[1].seg.is_leader(), "b is elected");
        assert!(net.nodes.iter().all(|n| n.reports.is_empty()), "no reports");
    }

    #[test]
    fn a_report_of_nine_members_takes_three_pages() {
        let specs: StdVec<(std::string::String, u32)> = (0..9)
            .map(|i| (std::format!("n{i}"), if i == 4 { 900 } else { 100 + i }))
            .collect();
        let refs: StdVec<(&str, &str, u32)> =
            specs.iter().map(|(n, p)| (n.as_str(), "s", *p)).collect();
        let mut net = Net::new(&refs);
        net.start_all();
        net.run_until(ms(4000));
        let leader = &net.nodes[4];
        assert!(leader.seg.is_leader());
        let last_term = leader.reports.last().unwrap().term;
        let pages: StdVec<&SegmentReport> = leader
            .reports
            .iter()
            .filter(|r| r.term == last_term)
            .collect();
        assert_eq!(pages.len(), 3);
        assert!(pages.iter().all(|p| p.pages == 3));
        assert_eq!(
            pages.iter().map(|p| p.page).collect::<StdVec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(
            pages.iter().map(|p| p.members.len()).collect::<StdVec<_>>(),
            [4, 4, 1]
        );
        let mut ids: StdVec<AgentId> = pages
            .iter()
            .flat_map(|p| p.members.iter().map(|m| m.id.clone()))
            .collect();
        assert_eq!(pages[0].members[0].id, id("n4"));
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 9);
        // Only the leader reports.
        for (i, n) in net.nodes.iter().enumerate() {
            if i != 4 {
                assert!(n.reports.iter().all(|r| r.leader == n.seg.config().id));
                assert!(n.reports.is_empty(), "node {i} reported");
            }
        }
    }
}
