//! One agent connection as the manager sees it: the session rules, without IO.
//!
//! The server's agent port (TCP and serial lines) and the simulator's manager
//! node both drive an [`AgentSession`] per agent connection, so the rules of a
//! manager session are written once, here:
//!
//! - after the authenticated handshake, the first message must be a `Report`
//!   whose id is the session's authenticated id, within
//!   [`FIRST_REPORT_TIMEOUT`]; it is answered with `Welcome` (the agent's
//!   certificate, the manager's clock and the publisher keys) and the agent is
//!   online;
//! - the certificate carries a serial from the config's [`CertSerials`] (the manager's
//!   persisted counter) and expires after the config's certificate lifetime
//!   ([`DEFAULT_CERT_LIFETIME`]); at half its lifetime the session renews it over the
//!   live connection (`CertRenewed`, from [`AgentSession::handle_timeout`]);
//! - then `Ping` is answered with `Pong`; a `ChunkRequest` is for the content
//!   library; a later `Report` (same id) and `Progress`, `Have`, `Failed`,
//!   `NextPlease`, `PeerTrouble` and `Pong` are for the engine; a
//!   `SegmentReport` page is for segment-report assembly;
//! - a `Report` for another id or a malformed message ends the session; a
//!   message that agents do not send is ignored with a warning;
//! - `Report`, `NextPlease` and `SegmentReport` pages are rate-limited per
//!   session ([`SessionLimits`], token buckets): a message over its limit is
//!   dropped and counted ([`AgentSession::dropped`]; the driver logs it,
//!   rate-limited), and a session that keeps sending over the limits (more
//!   than the `flood` allowance of dropped messages) is closed
//!   ([`SessionError::Flooding`]).
//!   The defaults sit well above what an honest agent sends: a Linux agent
//!   reports when it changes (its measured link every 2 s at most, its delay
//!   to the manager on each 10 s ping), asks `NextPlease` once per finished
//!   job, and a segment leader sends its report (at most 8 pages on Linux, 1,024
//!   by the protocol) at most once per beacon interval.
//!
//! The session holds no socket and reads no clock: the driver passes `now`
//! (time since its origin) and the wall clock, and carries out what comes back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{CodecError, MAX_PUBLISHERS, Message, Report, SegmentReport};
use baton_protocol::types::{AgentId, Digest, PublicKey};

use crate::placement::Placement;
use crate::rate_limit::{Rate, TokenBucket};

/// How long a new session has to receive its first `Report` after the handshake.
pub const FIRST_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent certificate is valid by default (`baton serve --cert-lifetime`); the
/// session renews it at half that.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Where certificate serials come from: the manager's persisted counter, which only grows
/// (a revocation names every certificate of an agent up to one serial).
pub trait CertSerials: Send + Sync + core::fmt::Debug {
    /// The serial of a new certificate for `agent` that expires at `not_after` (Unix
    /// seconds); `Err` says why none can be issued (the session then ends).
    fn next_serial(&self, agent: &AgentId, not_after: u64) -> Result<u64, String>;
}

/// Serials counted in memory from 1 (the simulator and tests; not persisted).
#[derive(Debug, Default)]
pub struct CountedSerials(AtomicU64);

impl CertSerials for CountedSerials {
    fn next_serial(&self, _agent: &AgentId, _not_after: u64) -> Result<u64, String> {
        Ok(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// How many messages of each rate-limited kind one session may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// `Report`s (each is written to the database and re-places the agent in running plans).
    pub report: Rate,
    /// `NextPlease` messages.
    pub next_please: Rate,
    /// `SegmentReport` pages.
    pub segment_pages: Rate,
    /// `InstallStatus` and `Running` messages (each is written to the database).
    pub install: Rate,
    /// Messages dropped over the limits above before the session is closed.
    pub flood: Rate,
}

impl Default for SessionLimits {
    /// Reports: 30 at once, 2 a second; `NextPlease`: 32 at once, 4 a second; segment
    /// report pages: 1,024 at once (one report of the most pages), 256 a second; install
    /// statuses and running versions: 32 at once, 2 a second; a session
    /// is closed once more than 1,000 messages (plus 10 a second) were dropped.
    fn default() -> Self {
        SessionLimits {
            report: Rate::new(30, 2),
            next_please: Rate::new(32, 4),
            segment_pages: Rate::new(1024, 256),
            install: Rate::new(32, 2),
            flood: Rate::new(1000, 10),
        }
    }
}

/// What every session of one manager shares: the identity that signs the
/// agents' certificates and the publisher keys the `Welcome` announces.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    identity: Identity,
    publishers: heapless::Vec<PublicKey, MAX_PUBLISHERS>,
    first_report_timeout: Duration,
    limits: SessionLimits,
    max_election_score: u32,
    cert_lifetime: Duration,
    serials: Arc<dyn CertSerials>,
}

impl SessionConfig {
    /// Sessions of the manager `identity`, announcing `publishers` (the first
    /// [`MAX_PUBLISHERS`]), with the [`FIRST_REPORT_TIMEOUT`].
    pub fn new(identity: Identity, publishers: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut announced = heapless::Vec::new();
        for key in publishers.into_iter().take(MAX_PUBLISHERS) {
            let _ = announced.push(key);
        }
        SessionConfig {
            identity,
            publishers: announced,
            first_report_timeout: FIRST_REPORT_TIMEOUT,
            limits: SessionLimits::default(),
            max_election_score: baton_protocol::discovery::MAX_CAPABILITY_SCORE,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            serials: Arc::new(CountedSerials::default()),
        }
    }

    /// The same with certificates valid for `lifetime` (at least one second), renewed at
    /// half that.
    pub fn with_cert_lifetime(mut self, lifetime: Duration) -> Self {
        self.cert_lifetime = lifetime.max(Duration::from_secs(1));
        self
    }

    /// How long the certificates the sessions issue are valid.
    pub fn cert_lifetime(&self) -> Duration {
        self.cert_lifetime
    }

    /// The same with certificate serials from `serials` (default: counted in memory).
    pub fn with_serials(mut self, serials: Arc<dyn CertSerials>) -> Self {
        self.serials = serials;
        self
    }

    /// The same with other rate limits for the sessions' messages.
    pub fn with_limits(mut self, limits: SessionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The rate limits of the sessions' messages.
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// Caps the election score certificates carry at `max` (default: the highest
    /// capability score, i.e. no cap beyond each agent's placement).
    pub fn with_max_election_score(mut self, max: u32) -> Self {
        self.max_election_score = max;
        self
    }

    /// The cap on certified election scores.
    pub fn max_election_score(&self) -> u32 {
        self.max_election_score
    }

    /// The manager's identity (the driver's handshake uses it too).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The publisher keys the `Welcome` announces.
    pub fn publishers(&self) -> &[PublicKey] {
        &self.publishers
    }

    /// How long a session waits for its first `Report`.
    pub fn first_report_timeout(&self) -> Duration {
        self.first_report_timeout
    }

    /// A certificate for agent `id` with key `key`, placed at `placement`, issued at
    /// `unix_time`: the next serial, expiring after the certificate lifetime. The one
    /// place the manager issues certificates (`Welcome` and `CertRenewed`).
    fn certificate(
        &self,
        id: AgentId,
        key: PublicKey,
        placement: &Placement,
        unix_time: u64,
    ) -> Result<AgentCert, SessionError> {
        let not_after = unix_time.saturating_add(self.cert_lifetime.as_secs().max(1));
        let serial = self
            .serials
            .next_serial(&id, not_after)
            .map_err(|reason| SessionError::NoCertificate { reason })?;
        Ok(AgentCert::issue_with_term(
            &self.identity,
            id,
            key,
            placement.segment_name(),
            placement.certified_score(self.max_election_score),
            serial,
            not_after,
        ))
    }
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No `Report` arrived within the first-report timeout.
    #[error("no report within {0:?}")]
    NoFirstReport(Duration),
    /// The first message was not a `Report`.
    #[error("first message is not a report but {kind}")]
    FirstNotReport {
        /// The kind of message it was.
        kind: &'static str,
    },
    /// A `Report` named an id other than the session's authenticated one.
    #[error("report for another id ({claimed})")]
    OtherId {
        /// The id the report named.
        claimed: AgentId,
    },
    /// A frame did not decode as a message.
    #[error("malformed message: {0}")]
    Malformed(CodecError),
    /// No certificate could be issued (the serial could not be recorded).
    #[error("cannot issue a certificate: {reason}")]
    NoCertificate {
        /// Why.
        reason: String,
    },
    /// The agent kept sending messages over the session's rate limits.
    #[error("flooding: {dropped} messages over the rate limits dropped (last: {kind})")]
    Flooding {
        /// The kind of the last message dropped.
        kind: &'static str,
        /// Messages dropped in this session.
        dropped: u64,
    },
}

/// What the driver must carry out for a session, from [`AgentSession::poll_event`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The first report arrived and the `Welcome` is queued: the agent is online.
    /// Register the session (a previous one of the same agent is taken over) and
    /// tell the engine (`Engine::agent_online`).
    Online {
        /// The agent's report about itself.
        report: Box<Report>,
    },
    /// A later report (the agent changed): for the engine (`Engine::agent_online` again).
    Report(Box<Report>),
    /// A message for the engine (`Engine::handle_message`): `Progress`, `Have`,
    /// `Failed`, `NextPlease`, `PeerTrouble`, `Running` or `Pong`.
    ForEngine(Message<'static>),
    /// The agent asks for a chunk: answer it on this connection from the content
    /// (a `Chunk`, or a `Refuse`).
    ChunkRequest {
        /// The content's root.
        root: Digest,
        /// The chunk's index.
        index: u32,
    },
    /// An install report (`InstallStatus`, its output within `MAX_INSTALL_OUTPUT`): for
    /// the engine (`Engine::install_status`).
    Install(Box<crate::engine::InstallReport>),
    /// One page of a segment report: give it to segment-report assembly
    /// ([`crate::segments::Assembler`]); once a report is complete, hand
    /// `Message::SegmentReport` with its last page to the engine.
    SegmentPage(SegmentReport),
    /// The session is over: close the connection. Nothing more comes out.
    Close(SessionError),
}

/// Where a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Handshake done; the first report is due by `deadline`.
    AwaitingReport { deadline: Duration },
    /// Welcomed: messages are routed; the certificate is renewed at `renew_at`.
    Open { renew_at: Duration },
    /// Ended; input is ignored.
    Closed,
}

/// The manager's side of one authenticated agent connection.
///
/// One per connection, made once the link handshake has authenticated the
/// agent. The driver calls, in this order:
///
/// 1. [`AgentSession::new`] after the handshake, then arms a timer at
///    [`AgentSession::poll_timeout`];
/// 2. for each frame received, [`AgentSession::handle_frame`] (with the wall
///    clock, which goes into the `Welcome`); when the timer fires,
///    [`AgentSession::handle_timeout`];
/// 3. after each input, drains [`AgentSession::poll_transmit`] until `None`,
///    sending each message on this connection, **then** drains
///    [`AgentSession::poll_event`] until `None`, carrying each out (the
///    `Welcome` must reach the agent before anything the engine sends it,
///    which can only follow [`SessionEvent::Online`]), and re-arms the timer
///    at [`AgentSession::poll_timeout`].
///
/// After [`SessionEvent::Close`] the driver closes the connection and drops
/// the session. When the connection ends otherwise (the agent closed it, a
/// link error, the manager took it over), the driver drops the session; the
/// session itself has nothing to say about that.
#[derive(Debug)]
pub struct AgentSession {
    agent: AgentId,
    key: PublicKey,
    config: Arc<SessionConfig>,
    placement: Option<Placement>,
    state: State,
    /// The session's clock and the wall clock when the `Welcome` went out (renewed
    /// certificates are dated from them).
    welcomed: (Duration, u64),
    transmit: VecDeque<Message<'static>>,
    events: VecDeque<SessionEvent>,
    buckets: Buckets,
}

/// One session's token buckets and what it dropped.
#[derive(Debug)]
struct Buckets {
    report: TokenBucket,
    next_please: TokenBucket,
    segment_pages: TokenBucket,
    install: TokenBucket,
    flood: TokenBucket,
    /// Messages dropped over a limit in this session.
    dropped: u64,
    /// The session's `Running` came (one per session; later ones are dropped).
    running_seen: bool,
}

impl Buckets {
    fn new(limits: SessionLimits, now: Duration) -> Self {
        Buckets {
            report: TokenBucket::new(limits.report, now),
            next_please: TokenBucket::new(limits.next_please, now),
            segment_pages: TokenBucket::new(limits.segment_pages, now),
            install: TokenBucket::new(limits.install, now),
            flood: TokenBucket::new(limits.flood, now),
            dropped: 0,
            running_seen: false,
        }
    }
}

impl AgentSession {
    /// A session for `agent`, authenticated with `key`, whose handshake ended at `now`.
    pub fn new(now: Duration, agent: AgentId, key: PublicKey, config: Arc<SessionConfig>) -> Self {
        let deadline = now.saturating_add(config.first_report_timeout);
        AgentSession {
            agent,
            key,
            placement: None,
            state: State::AwaitingReport { deadline },
            welcomed: (now, 0),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            buckets: Buckets::new(config.limits, now),
            config,
        }
    }

    /// Messages dropped over the rate limits in this session.
    pub fn dropped(&self) -> u64 {
        self.buckets.dropped
    }

    /// Sets where the administrator placed the agent (its certificate says so); without
    /// one, the first report places it ([`Placement::at_enrolment`]).
    pub fn with_placement(mut self, placement: Option<Placement>) -> Self {
        self.placement = placement;
        self
    }

    /// The agent's placement: the one given, or, once the first report arrived, the one it
    /// made (the driver records it then).
    pub fn placement(&self) -> Option<&Placement> {
        self.placement.as_ref()
    }

    /// The authenticated agent.
    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// The agent's authenticated key.
    pub fn key(&self) -> PublicKey {
        self.key
    }

    /// Whether the first report arrived and the session is not over.
    pub fn is_online(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Takes one frame (one plaintext message) from the agent, received at `now`;
    /// `unix_time` is the wall clock (UTC seconds), which the `Welcome` carries.
    pub fn handle_frame(&mut self, now: Duration, unix_time: u64, frame: &[u8]) {
        match self.state {
            State::Closed => {}
            State::AwaitingReport { deadline } if now >= deadline => {
                self.close(SessionError::NoFirstReport(
                    self.config.first_report_timeout,
                ));
            }
            State::AwaitingReport { .. } => self.first(now, unix_time, frame),
            State::Open { .. } => self.route(now, frame),
        }
    }

    /// The timer armed at [`AgentSession::poll_timeout`] fired at `now`: the first report
    /// is overdue, or the certificate is at half its lifetime and is renewed
    /// (`CertRenewed`).
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state {
            State::AwaitingReport { deadline } if now >= deadline => {
                self.close(SessionError::NoFirstReport(
                    self.config.first_report_timeout,
                ));
            }
            State::Open { renew_at } if now >= renew_at => self.renew(now),
            _ => {}
        }
    }

    /// Issues the agent a new certificate (same placement, next serial) over this session.
    fn renew(&mut self, now: Duration) {
        let Some(placement) = self.placement.as_ref() else {
            return;
        };
        let (at, unix) = self.welcomed;
        let unix_now = unix.saturating_add(now.saturating_sub(at).as_secs());
        match self
            .config
            .certificate(self.agent.clone(), self.key, placement, unix_now)
        {
            Ok(cert) => {
                self.transmit.push_back(Message::CertRenewed { cert });
                self.state = State::Open {
                    renew_at: now + self.config.cert_lifetime / 2,
                };
            }
            Err(e) => self.close(e),
        }
    }

    /// The next message to send on this connection (`Welcome`, `CertRenewed`, `Pong`).
    ///
    /// The queue's room is given back once it is empty: a message is 2.4 KB, and a manager
    /// holds one session per agent, mostly idle.
    pub fn poll_transmit(&mut self) -> Option<Message<'static>> {
        let next = self.transmit.pop_front();
        if self.transmit.is_empty() {
            self.transmit = VecDeque::new();
        }
        next
    }

    /// The next thing for the driver to carry out.
    ///
    /// As with [`AgentSession::poll_transmit`], the queue's room is given back once it is empty.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let next = self.events.pop_front();
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
        next
    }

    /// When [`AgentSession::handle_timeout`] is due: the first report's deadline while it
    /// is awaited, then when the certificate is renewed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::AwaitingReport { deadline } => Some(deadline),
            State::Open { renew_at } => Some(renew_at),
            State::Closed => None,
        }
    }

    fn close(&mut self, why: SessionError) {
        self.state = State::Closed;
        self.events.push_back(SessionEvent::Close(why));
    }

    /// Whether `msg` is within its kind's rate limit; one that is not is dropped (counted in
    /// [`AgentSession::dropped`]), and past the flood allowance the session is closed.
    fn within_limits(&mut self, now: Duration, msg: &Message<'_>) -> bool {
        let b = &mut self.buckets;
        let bucket = match msg {
            Message::Report(_) => &mut b.report,
            Message::NextPlease { .. } => &mut b.next_please,
            Message::SegmentReport(_) => &mut b.segment_pages,
            Message::InstallStatus { .. } | Message::Running { .. } => &mut b.install,
            _ => return true,
        };
        if bucket.take(now) {
            return true;
        }
        self.drop_message(now, msg.kind());
        false
    }

    /// Counts a message dropped (over its limit, or of a kind agents do not send); past the
    /// flood allowance the session is closed.
    fn drop_message(&mut self, now: Duration, kind: &'static str) {
        let b = &mut self.buckets;
        b.dropped += 1;
        if !b.flood.take(now) {
            let dropped = b.dropped;
            self.close(SessionError::Flooding { kind, dropped });
        }
    }

    /// The first message: the agent's report about itself, answered with `Welcome`.
    fn first(&mut self, now: Duration, unix_time: u64, frame: &[u8]) {
        match Message::decode(frame) {
            Ok(Message::Report(report)) if report.id == self.agent => {
                let cap = self.config.max_election_score;
                let placement = self
                    .placement
                    .get_or_insert_with(|| Placement::at_enrolment(&report, cap));
                let cert = match self.config.certificate(
                    self.agent.clone(),
                    self.key,
                    placement,
                    unix_time,
                ) {
                    Ok(cert) => cert,
                    Err(e) => return self.close(e),
                };
                self.transmit.push_back(Message::Welcome {
                    cert,
                    unix_time,
                    publishers: self.config.publishers.clone(),
                });
                self.welcomed = (now, unix_time);
                self.state = State::Open {
                    renew_at: now + self.config.cert_lifetime / 2,
                };
                self.events.push_back(SessionEvent::Online {
                    report: Box::new(report),
                });
            }
            Ok(Message::Report(report)) => self.close(SessionError::OtherId { claimed: report.id }),
            Ok(other) => self.close(SessionError::FirstNotReport { kind: other.kind() }),
            Err(e) => self.close(SessionError::Malformed(e)),
        }
    }

    /// Any later message: answered, routed, ignored, or the end of the session.
    fn route(&mut self, now: Duration, frame: &[u8]) {
        let msg = match Message::decode(frame) {
            Ok(m) => m,
            Err(e) => return self.close(SessionError::Malformed(e)),
        };
        if !self.within_limits(now, &msg) {
            return;
        }
        let for_engine = match msg {
            Message::Ping { nonce } => {
                self.transmit.push_back(Message::Pong { nonce });
                return;
            }
            Message::ChunkRequest { root, index } => {
                self.events
                    .push_back(SessionEvent::ChunkRequest { root, index });
                return;
            }
            Message::Report(report) if report.id != self.agent => {
                return self.close(SessionError::OtherId { claimed: report.id });
            }
            Message::Report(report) => {
                self.events
                    .push_back(SessionEvent::Report(Box::new(report)));
                return;
            }
            Message::SegmentReport(page) => {
                self.events.push_back(SessionEvent::SegmentPage(page));
                return;
            }
            Message::Progress {
                job,
                verified,
                received,
            } => Message::Progress {
                job,
                verified,
                received,
            },
            Message::Have { job, root } => Message::Have { job, root },
            Message::Failed { job, reason } => Message::Failed { job, reason },
            Message::NextPlease { job } => Message::NextPlease { job },
            Message::PeerTrouble { job, peer, trouble } => {
                Message::PeerTrouble { job, peer, trouble }
            }
            Message::Pong { nonce } => Message::Pong { nonce },
            Message::Running { .. } if self.buckets.running_seen => {
                // One per session (the agent sends it after its first report): a repeat is
                // dropped and counted like a message over its limit.
                tracing::debug!(agent = %self.agent, "a second Running in one session; dropped");
                return self.drop_message(now, "Running");
            }
            Message::Running {
                install_step,
                versions,
            } => {
                self.buckets.running_seen = true;
                Message::Running {
                    install_step,
                    versions,
                }
            }
            Message::InstallStatus { output, .. }
                if output.len() > baton_protocol::message::MAX_INSTALL_OUTPUT =>
            {
                tracing::debug!(agent = %self.agent, bytes = output.len(), "install output over its cap; dropped");
                return self.drop_message(now, "InstallStatus");
            }
            Message::InstallStatus {
                job,
                name,
                version,
                state,
                exit_code,
                output,
            } => {
                let report = crate::engine::InstallReport {
                    job,
                    name,
                    version,
                    state,
                    exit_code,
                    output: output.to_string(),
                };
                self.events
                    .push_back(SessionEvent::Install(Box::new(report)));
                return;
            }
            other => {
                // Dropped and counted like a message over its limit (the driver's warning
                // about dropped messages is spaced; a flood of them closes the session).
                tracing::debug!(agent = %self.agent, kind = other.kind(), "agents do not send this message; dropped");
                return self.drop_message(now, other.kind());
            }
        };
        self.events.push_back(SessionEvent::ForEngine(for_engine));
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::message::{FailReason, Refusal, SegmentMember, Trouble};
    use baton_protocol::types::{JobRef, LinkInfo};

    const UNIX: u64 = 1_700_000_000;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn manager() -> Identity {
        Identity::from_seed([1; 32])
    }

    fn agent_key() -> PublicKey {
        Identity::from_seed([3; 32]).public()
    }

    fn config() -> Arc<SessionConfig> {
        let publishers = [
            Identity::from_seed([2; 32]).public(),
            Identity::from_seed([4; 32]).public(),
        ];
        Arc::new(SessionConfig::new(manager(), publishers))
    }

    fn report(of: &str) -> Report {
        Report {
            id: id(of),
            listen: None,
            site: heapless::String::new(),
            segment: heapless::String::try_from("seg-1").unwrap(),
            performance: 10,
            free_storage: 1 << 24,
            can_serve: false,
            max_chunk: 4096,
            max_sources: 1,
            max_peers: 0,
            link: LinkInfo::default(),
            delays: heapless::Vec::new(),
            labels: heapless::Vec::new(),
            holdings: heapless::Vec::new(),
        }
    }

    fn session() -> AgentSession {
        AgentSession::new(Duration::from_secs(5), id("a1"), agent_key(), config())
    }

    fn transmits(s: &mut AgentSession) -> Vec<Message<'static>> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn events(s: &mut AgentSession) -> Vec<SessionEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn send(s: &mut AgentSession, msg: &Message<'_>) {
        s.handle_frame(Duration::from_secs(6), UNIX, &msg.to_vec());
    }

    /// A session past its first report, with the Welcome and Online drained.
    fn online() -> AgentSession {
        let mut s = session();
        send(&mut s, &Message::Report(report("a1")));
        assert_eq!(transmits(&mut s).len(), 1);
        assert_eq!(events(&mut s).len(), 1);
        s
    }

    fn job() -> JobRef {
        JobRef { id: 7, epoch: 1 }
    }

    #[test]
    fn an_idle_session_keeps_no_room_in_its_queues() {
        let mut s = online();
        assert_eq!(s.transmit.capacity(), 0, "the Welcome's room was kept");
        assert_eq!(s.events.capacity(), 0, "the Online event's room was kept");
        send(&mut s, &Message::Ping { nonce: 9 });
        assert_eq!(transmits(&mut s), [Message::Pong { nonce: 9 }]);
        assert_eq!(s.transmit.capacity(), 0);
    }

    #[test]
    fn the_first_report_is_welcomed_with_a_certificate_the_agents_can_check() {
        let mut s = session();
        assert_eq!(s.poll_timeout(), Some(Duration::from_secs(15)));
        send(&mut s, &Message::Report(report("a1")));
        let sent = transmits(&mut s);
        let [
            Message::Welcome {
                cert,
                unix_time,
                publishers,
            },
        ] = sent.as_slice()
        else {
            panic!("expected one Welcome, got {sent:?}");
        };
        assert_eq!(cert.id, id("a1"));
        assert_eq!(cert.key, agent_key());
        cert.verify(&manager().public())
            .expect("signed by the manager");
        assert!(cert.verify(&agent_key()).is_err());
        assert_eq!(*unix_time, UNIX);
        assert_eq!(publishers.as_slice(), config().publishers());
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Online {
                report: Box::new(report("a1"))
            }]
        );
        assert!(s.is_online());
        assert_eq!(
            s.poll_timeout(),
            Some(Duration::from_secs(6) + DEFAULT_CERT_LIFETIME / 2),
            "once welcomed, the next deadline is the certificate's renewal"
        );
        s.handle_timeout(Duration::from_secs(60));
        assert!(events(&mut s).is_empty() && transmits(&mut s).is_empty());
    }

    /// The certificate in a `Welcome` of a session placed (or not) beforehand.
    fn welcomed_cert(s: &mut AgentSession) -> AgentCert {
        send(s, &Message::Report(report("a1")));
        match transmits(s).as_slice() {
            [Message::Welcome { cert, .. }] => cert.clone(),
            other => panic!("expected one Welcome, got {other:?}"),
        }
    }

    #[test]
    fn the_certificate_carries_the_placement_capped() {
        // Not placed yet: the first report places it (its segment, its score).
        let mut s = session();
        let cert = welcomed_cert(&mut s);
        let declared = Placement::at_enrolment(&report("a1"), u32::MAX);
        assert_eq!(cert.segment.as_str(), "seg-1");
        assert_eq!(cert.score, declared.score);
        assert_eq!(s.placement(), Some(&declared), "for the driver to record");
        // Placed by the administrator elsewhere, with a score above the manager's cap:
        // the report's segment does not matter, the score is capped.
        let capped = Arc::new(
            SessionConfig::new(manager(), [Identity::from_seed([2; 32]).public()])
                .with_max_election_score(40),
        );
        let mut s = AgentSession::new(Duration::from_secs(5), id("a1"), agent_key(), capped)
            .with_placement(Some(Placement {
                segment: "seg-9".into(),
                score: 1000,
            }));
        let cert = welcomed_cert(&mut s);
        assert_eq!(cert.segment.as_str(), "seg-9");
        assert_eq!(cert.score, 40);
        cert.verify(&manager().public()).unwrap();
    }

    #[test]
    fn the_certificate_has_a_serial_and_a_term_and_is_renewed_at_half_its_lifetime() {
        let lifetime = Duration::from_secs(600);
        let config = Arc::new((*config()).clone().with_cert_lifetime(lifetime));
        let mut s = AgentSession::new(Duration::from_secs(5), id("a1"), agent_key(), config);
        let first = welcomed_cert(&mut s);
        assert_eq!(first.not_after, UNIX + 600);
        assert!(first.serial > 0);
        let _ = events(&mut s);
        let renew_at = Duration::from_secs(6 + 300);
        assert_eq!(s.poll_timeout(), Some(renew_at));
        s.handle_timeout(renew_at - Duration::from_millis(1));
        assert!(transmits(&mut s).is_empty(), "not before half its lifetime");
        s.handle_timeout(renew_at);
        let renewed = match transmits(&mut s).as_slice() {
            [Message::CertRenewed { cert }] => cert.clone(),
            other => panic!("expected one CertRenewed, got {other:?}"),
        };
        renewed.verify(&manager().public()).unwrap();
        assert_eq!((renewed.id.clone(), renewed.key), (first.id, first.key));
        assert_eq!(renewed.segment, first.segment);
        assert!(renewed.serial > first.serial, "serials grow");
        assert_eq!(
            renewed.not_after,
            UNIX + 300 + 600,
            "dated from the session's clock"
        );
        assert_eq!(s.poll_timeout(), Some(renew_at + lifetime / 2));
        assert!(s.is_online() && events(&mut s).is_empty());
    }

    /// Serials that cannot be recorded.
    #[derive(Debug)]
    struct NoSerials;

    impl CertSerials for NoSerials {
        fn next_serial(&self, _: &AgentId, _: u64) -> Result<u64, String> {
            Err("database locked".into())
        }
    }

    #[test]
    fn without_a_serial_there_is_no_welcome() {
        let config = Arc::new((*config()).clone().with_serials(Arc::new(NoSerials)));
        let mut s = AgentSession::new(Duration::from_secs(5), id("a1"), agent_key(), config);
        send(&mut s, &Message::Report(report("a1")));
        assert!(transmits(&mut s).is_empty());
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Close(SessionError::NoCertificate {
                reason: "database locked".into()
            })]
        );
    }

    #[test]
    fn a_first_message_that_is_not_a_report_closes() {
        let mut s = session();
        send(&mut s, &Message::Ping { nonce: 1 });
        assert!(transmits(&mut s).is_empty(), "no pong before the report");
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Close(SessionError::FirstNotReport {
                kind: "Ping"
            })]
        );
        assert!(s.is_closed());
        send(&mut s, &Message::Report(report("a1")));
        assert!(transmits(&mut s).is_empty() && events(&mut s).is_empty());
    }

    #[test]
    fn a_first_report_for_another_id_closes() {
        let mut s = session();
        send(&mut s, &Message::Report(report("a2")));
        assert!(transmits(&mut s).is_empty(), "no welcome");
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Close(SessionError::OtherId {
                claimed: id("a2")
            })]
        );
    }

    #[test]
    fn a_later_report_for_another_id_closes_and_one_for_this_id_goes_to_the_engine() {
        let mut s = online();
        let mut changed = report("a1");
        changed.can_serve = true;
        send(&mut s, &Message::Report(changed.clone()));
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Report(Box::new(changed))]
        );
        send(&mut s, &Message::Report(report("a2")));
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Close(SessionError::OtherId {
                claimed: id("a2")
            })]
        );
        assert!(s.is_closed());
    }

    #[test]
    fn no_report_in_time_closes() {
        let mut s = session();
        s.handle_timeout(Duration::from_secs(14));
        assert!(events(&mut s).is_empty(), "not yet");
        s.handle_timeout(Duration::from_secs(15));
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Close(SessionError::NoFirstReport(
                FIRST_REPORT_TIMEOUT
            ))]
        );
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(
            SessionError::NoFirstReport(FIRST_REPORT_TIMEOUT).to_string(),
            "no report within 10s"
        );
    }

    #[test]
    fn a_report_after_the_deadline_is_too_late() {
        let mut s = session();
        let frame = Message::Report(report("a1")).to_vec();
        s.handle_frame(Duration::from_secs(15), UNIX, &frame);
        assert!(transmits(&mut s).is_empty());
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Close(SessionError::NoFirstReport(
                FIRST_REPORT_TIMEOUT
            ))]
        );
    }

    #[test]
    fn a_malformed_frame_closes_before_and_after_the_report() {
        let mut s = session();
        s.handle_frame(Duration::from_secs(6), UNIX, &[0xFF, 0xFF, 0xFF]);
        assert!(matches!(
            events(&mut s).as_slice(),
            [SessionEvent::Close(SessionError::Malformed(_))]
        ));

        let mut s = online();
        s.handle_frame(Duration::from_secs(7), UNIX, &[]);
        let got = events(&mut s);
        assert!(
            matches!(
                got.as_slice(),
                [SessionEvent::Close(SessionError::Malformed(_))]
            ),
            "{got:?}"
        );
    }

    #[test]
    fn ping_is_answered_on_the_connection() {
        let mut s = online();
        send(&mut s, &Message::Ping { nonce: 42 });
        assert_eq!(transmits(&mut s), vec![Message::Pong { nonce: 42 }]);
        assert!(events(&mut s).is_empty());
    }

    #[test]
    fn each_message_kind_goes_where_it_belongs() {
        let mut s = online();
        let root = [9; 32];
        send(&mut s, &Message::ChunkRequest { root, index: 3 });
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::ChunkRequest { root, index: 3 }]
        );

        let page = SegmentReport {
            segment: heapless::String::try_from("seg-1").unwrap(),
            leader: id("a1"),
            term: 1,
            page: 0,
            pages: 1,
            members: heapless::Vec::<SegmentMember, _>::new(),
        };
        send(&mut s, &Message::SegmentReport(page.clone()));
        assert_eq!(events(&mut s), vec![SessionEvent::SegmentPage(page)]);

        let for_engine = [
            Message::Progress {
                job: job(),
                verified: 3,
                received: heapless::Vec::new(),
            },
            Message::Have { job: job(), root },
            Message::Failed {
                job: job(),
                reason: FailReason::StorageFull,
            },
            Message::NextPlease { job: job() },
            Message::PeerTrouble {
                job: job(),
                peer: id("a2"),
                trouble: Trouble::Unreachable,
            },
            Message::Pong { nonce: 5 },
        ];
        for msg in for_engine {
            send(&mut s, &msg);
            assert_eq!(events(&mut s), vec![SessionEvent::ForEngine(msg)]);
            assert!(transmits(&mut s).is_empty());
        }

        // What only the manager sends is ignored; the session goes on.
        let ignored = [
            Message::Done { job: job() },
            Message::Cancel { job: job() },
            Message::Refuse {
                root,
                index: 1,
                reason: Refusal::Unknown,
            },
        ];
        for msg in ignored {
            send(&mut s, &msg);
            assert!(events(&mut s).is_empty() && transmits(&mut s).is_empty());
        }
        assert!(s.is_online());
    }

    #[test]
    fn only_the_first_publishers_are_announced() {
        let keys = (0..MAX_PUBLISHERS as u8 + 3).map(|i| Identity::from_seed([i; 32]).public());
        let c = SessionConfig::new(manager(), keys);
        assert_eq!(c.publishers().len(), MAX_PUBLISHERS);
    }

    // ------------------------------------------------ rate limits (issue 14)

    /// A session welcomed at `ms` milliseconds, its Welcome and Online drained.
    fn online_at(ms: u64) -> AgentSession {
        let mut s = session();
        at(&mut s, ms, &Message::Report(report("a1")));
        let _ = (transmits(&mut s), events(&mut s));
        s
    }

    fn at(s: &mut AgentSession, ms: u64, msg: &Message<'_>) {
        s.handle_frame(Duration::from_millis(ms), UNIX, &msg.to_vec());
    }

    #[test]
    fn an_honest_agents_reports_and_next_pleases_are_never_dropped() {
        let mut s = online_at(6_000);
        // A report every 2 s and one NextPlease every 5 s for an hour, plus a burst of 10
        // reports (a reconnection's changes) every 10 minutes.
        let mut passed = 0;
        for i in 0..1800u64 {
            let t = 6_000 + i * 2_000;
            at(&mut s, t, &Message::Report(report("a1")));
            if i % 300 == 0 {
                for _ in 0..10 {
                    at(&mut s, t, &Message::Report(report("a1")));
                }
            }
            if i % 5 == 0 {
                at(&mut s, t, &Message::NextPlease { job: job() });
            }
            passed += events(&mut s).len();
        }
        assert_eq!(s.dropped(), 0);
        assert_eq!(passed, 1800 + 6 * 10 + 360);
        assert!(!s.is_closed());
    }

    #[test]
    fn reports_over_the_limit_are_dropped_and_a_flooder_is_closed() {
        let limits = SessionLimits::default();
        let mut s = online_at(6_000);
        // 100 000 reports within one second.
        let mut passed = 0;
        let mut closed_after = None;
        for i in 0..100_000u64 {
            at(&mut s, 6_000 + i / 100, &Message::Report(report("a1")));
            for e in events(&mut s) {
                match e {
                    SessionEvent::Report(_) => passed += 1,
                    SessionEvent::Close(SessionError::Flooding { kind, dropped }) => {
                        assert_eq!(kind, "Report");
                        closed_after = Some(dropped);
                    }
                    other => panic!("{other:?}"),
                }
            }
            if s.is_closed() {
                break;
            }
        }
        eprintln!("passed {passed}, closed after {closed_after:?} dropped");
        // The burst and at most a few seconds' refill went through.
        assert!(
            passed >= limits.report.burst as usize && passed <= 40,
            "{passed}"
        );
        let dropped = closed_after.expect("the flooder is closed");
        assert!((1000..=1020).contains(&dropped), "{dropped}");
    }

    #[test]
    fn each_kind_has_its_own_bucket_and_other_messages_are_not_limited() {
        let limits = SessionLimits::default();
        let mut s = online_at(6_000);
        for _ in 0..limits.report.burst + 5 {
            at(&mut s, 6_000, &Message::Report(report("a1")));
        }
        assert_eq!(events(&mut s).len(), limits.report.burst as usize);
        assert_eq!(s.dropped(), 5);
        // Reports are spent; NextPlease, Progress and ChunkRequest still pass.
        at(&mut s, 6_000, &Message::NextPlease { job: job() });
        for i in 0..200 {
            at(
                &mut s,
                6_000,
                &Message::ChunkRequest {
                    root: [1; 32],
                    index: i,
                },
            );
        }
        assert_eq!(events(&mut s).len(), 201);
        // Half a second later one report passes again.
        at(&mut s, 6_500, &Message::Report(report("a1")));
        assert_eq!(events(&mut s).len(), 1);
        assert_eq!(s.dropped(), 5);
    }

    #[test]
    fn install_reports_go_to_the_engine_and_an_output_over_its_cap_is_dropped() {
        use baton_protocol::message::{InstallState, MAX_INSTALL_OUTPUT};
        let mut s = online();
        let _ = (transmits(&mut s), events(&mut s));
        let long = "x".repeat(MAX_INSTALL_OUTPUT + 1);
        let msg = |output: &str| {
            Message::InstallStatus {
                job: job(),
                name: heapless::String::try_from("app").unwrap(),
                version: 2,
                state: InstallState::Failed,
                exit_code: Some(3),
                output,
            }
            .to_vec()
        };
        s.handle_frame(Duration::from_secs(6), 0, &msg(&long));
        assert!(events(&mut s).is_empty());
        assert_eq!(s.dropped(), 1);
        let tail = "y".repeat(MAX_INSTALL_OUTPUT);
        s.handle_frame(Duration::from_secs(6), 0, &msg(&tail));
        match events(&mut s).as_slice() {
            [SessionEvent::Install(r)] => {
                assert_eq!(r.state, InstallState::Failed);
                assert_eq!(r.exit_code, Some(3));
                assert_eq!(r.output, tail);
            }
            other => panic!("expected one install report, got {other:?}"),
        }
    }

    #[test]
    fn only_the_first_running_of_a_session_goes_to_the_engine() {
        let mut s = online();
        let _ = (transmits(&mut s), events(&mut s));
        let running = Message::Running {
            install_step: true,
            versions: heapless::Vec::new(),
        };
        for i in 0..3 {
            at(&mut s, 6_000 + i * 1_000, &running);
        }
        match events(&mut s).as_slice() {
            [SessionEvent::ForEngine(Message::Running { .. })] => {}
            other => panic!("expected one Running for the engine, got {other:?}"),
        }
        assert_eq!(s.dropped(), 2);
    }

    #[test]
    fn segment_pages_are_limited_per_session() {
        let limits = SessionLimits {
            segment_pages: Rate::new(8, 8),
            ..SessionLimits::default()
        };
        let config = Arc::new((*config()).clone().with_limits(limits));
        let mut s = AgentSession::new(Duration::from_secs(5), id("a1"), agent_key(), config);
        at(&mut s, 6_000, &Message::Report(report("a1")));
        let _ = (transmits(&mut s), events(&mut s));
        let page = |p: u16| {
            Message::SegmentReport(SegmentReport {
                segment: heapless::String::try_from("seg-1").unwrap(),
                leader: id("a1"),
                term: 1,
                page: p,
                pages: 20,
                members: heapless::Vec::new(),
            })
        };
        for p in 0..20 {
            at(&mut s, 6_000, &page(p));
        }
        assert_eq!(events(&mut s).len(), 8);
        assert_eq!(s.dropped(), 12);
        // One second refills the burst.
        for p in 0..20 {
            at(&mut s, 7_000, &page(p));
        }
        assert_eq!(events(&mut s).len(), 8);
    }
}
