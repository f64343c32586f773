//! The agent port: the TCP accept loop and one handler per agent connection.
//!
//! [`run_agent_port`] is the accept loop (`run(listener, shutdown)`). Its
//! [`Admission`] caps the connections open and the handshakes in progress (in
//! all and per source address): a connection beyond a cap is closed at once.
//! Each connection runs the handshake through the link layer with
//! [`Registry::authorize`], within the admission's handshake timeout, and from
//! then on counts only against the connection cap. Then it drives one
//! [`AgentSession`] (the session rules: first report, `Welcome`, where each
//! message goes) and carries out what it asks, IO only:
//! - sends what the session transmits (`Welcome`, `CertRenewed`, `Pong`) on the
//!   connection, and after the `Welcome` the revocation list in force;
//! - renews the agent's certificate when the session's timer says so (half its lifetime);
//! - registers the session in the [`Registry`] once the agent is online and
//!   tells the [`EngineTask`] (online, its messages, offline);
//! - answers `ChunkRequest`s from the [`Library`] on a blocking task;
//! - hands segment report pages to the registry's assembly, and complete
//!   reports to the engine;
//! - carries the engine's instructions back out (the writer task).
//!
//! Serial lines ([`crate::serial`]) hand their sessions to the same handler.
//! A malformed, oversized or undecryptable frame closes that one connection
//! with a logged reason; nothing else is disturbed.
//!
//! Every queue of a connection is bounded: at most [`DATA_QUEUE`] chunk
//! answers and pongs, at most [`CONTROL_QUEUE`] instructions (an agent that
//! lets it fill is disconnected), and the engine's input ([`ENGINE_QUEUE`]),
//! whose sender waits: a connection's frames are not read while it cannot
//! take them. An agent that takes no byte for [`WRITE_STALL_TIMEOUT`] is
//! disconnected, so an agent that never reads costs at most those queues.
//!
//! [`CONTROL_QUEUE`]: crate::registry::CONTROL_QUEUE
//! [`ENGINE_QUEUE`]: crate::engine_task::ENGINE_QUEUE
//!
//! [`EngineTask`]: crate::engine_task::EngineTask

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_agent_core::linux::admission::{Admission, Admitted};
use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_agent_core::linux::spaced::{SpacedLog, WARN_EVERY};
use baton_manager_core::placement::Placement;
use baton_manager_core::session::{AgentSession, SessionConfig, SessionError, SessionEvent};
use baton_protocol::message::{Message, Report};
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::{AgentId, Digest, PublicKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::content::Library;
use crate::engine_task::{EngineInput, EngineSender};
use crate::registry::{
    AuthError, CONTROL_QUEUE, Registry, Session, StoppedRoots, reason_for_agent, unix_now,
};

/// Largest frame the manager accepts from an agent (agents send small control messages).
pub const MAX_AGENT_FRAME: usize = 16 * 1024;
/// Default cap on agent handshakes in progress from all addresses (`--max-handshakes`);
/// a stalled one holds about 4 KiB until its timeout.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
/// Default cap on agent handshakes in progress from one address or IPv6 /64
/// (`--max-handshakes-per-address`): room for a site's agents behind one NAT
/// coming back together, which retry with backoff when turned away.
pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 64;
/// Chunk answers queued per connection before its reader waits (backpressure).
pub const DATA_QUEUE: usize = 8;
/// An agent that takes no byte of a frame for this long is disconnected (it does not read).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages dropped over the sessions' rate limits.
static DROPPED_LOG: SpacedLog = SpacedLog::new(WARN_EVERY);
/// Sessions closed for flooding.
static FLOODERS_LOG: SpacedLog = SpacedLog::new(WARN_EVERY);

/// What every agent connection shares.
#[derive(Debug)]
pub struct AgentPort {
    /// The manager's identity (the handshake's and the certificates') and the
    /// publisher keys announced in `Welcome`.
    pub session: Arc<SessionConfig>,
    /// Enrolled keys and live sessions.
    pub registry: Arc<Registry>,
    /// Content served to `ChunkRequest`s.
    pub library: Arc<Library>,
    /// Upload cap and byte counters.
    pub limits: Limits,
    /// The engine task's input (bounded: senders wait).
    pub engine: EngineSender,
    /// Caps connections and handshakes in progress; its handshake timeout
    /// applies to serial sessions too.
    pub admission: Arc<Admission>,
}

/// Accepts agent connections on `listener` until `shutdown` completes.
pub async fn run_agent_port(
    listener: TcpListener,
    server: Arc<AgentPort>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, addr, admitted) = tokio::select! {
            _ = &mut shutdown => break,
            a = server.admission.accept(&listener) => a,
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(server.handle(stream, addr, Some(admitted)));
    }
    server.registry.close_all();
}

/// The warning that an agent does not report the labels its enrolment token bound it
/// to, spaced (all agents).
static BOUND_LABELS_LOG: SpacedLog = SpacedLog::new(WARN_EVERY);

/// Longest the manager spends telling a refused agent why ([`tell_refused`]).
const NOT_ACCEPTED_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends a refused agent one [`Message::NotAccepted`] naming why (as
/// [`AuthError::told_to_agent`] words it), within [`NOT_ACCEPTED_SEND_TIMEOUT`], then
/// closes the session.
async fn tell_refused<S>(link: link::Link<S>, why: &AuthError)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let reason = why.told_to_agent();
    let (_reader, mut writer) = link.split();
    let msg = Message::NotAccepted { reason: &reason };
    let _ = tokio::time::timeout(NOT_ACCEPTED_SEND_TIMEOUT, async {
        writer.send(&msg.to_vec()).await?;
        writer.close().await
    })
    .await;
}

impl AgentPort {
    fn hello(&self) -> Hello {
        Hello::new(
            Role::Manager,
            AgentId::try_from("manager").expect("short id"),
            baton_protocol::caps::RELAY_V1 | baton_protocol::caps::SERVE,
            None,
        )
    }

    /// Serves one agent connection until it ends: a TCP stream with its place
    /// at the [`Admission`], or a serial line's session (see [`crate::serial`]),
    /// which has neither an address nor a place of its own.
    pub async fn handle<S>(self: Arc<Self>, stream: S, addr: SocketAddr, admitted: Option<Admitted>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Given back when this connection ends, whichever way.
        let mut admitted = admitted;
        let registry = self.registry.clone();
        let identity = self.session.identity();
        // A refusal is not a failed handshake: the session is up, so the agent is told why.
        let handshake = link::accept(stream, identity, self.hello(), &self.limits, |hs| {
            Ok(registry.authorize(hs))
        });
        // Boxed, as the other steps that hold much while they run and nothing after: the
        // connection's task then keeps only what lives as long as the session (see
        // `a_session_task_is_small`).
        let accepted = Box::pin(tokio::time::timeout(
            self.admission.limits().handshake_timeout,
            handshake,
        ))
        .await
        .unwrap_or(Err(LinkError::Timeout));
        let (link, auth) = match accepted {
            Ok((link, Ok(auth))) => {
                if let Some(a) = admitted.as_mut() {
                    a.authenticated();
                }
                (link, auth)
            }
            // Anyone can fail a handshake or be refused, as often as the caps let
            // them: one warning per few seconds for each, the rest at debug level.
            Ok((link, Err(why))) => {
                match self.admission.handshake_refused() {
                    Some(unlogged) => tracing::warn!(
                        %addr,
                        "agent refused: {why} ({unlogged} more refused since the last such line)"
                    ),
                    None => tracing::debug!(%addr, "agent refused: {why}"),
                }
                Box::pin(tell_refused(link, &why)).await;
                return;
            }
            Err(e) => {
                match self.admission.handshake_failed() {
                    Some(unlogged) => tracing::warn!(
                        %addr,
                        "agent handshake failed: {e} ({unlogged} more failed since the last such line)"
                    ),
                    None => tracing::debug!(%addr, "agent handshake failed: {e}"),
                }
                return;
            }
        };
        let id = auth.id;
        let (mut reader, mut writer) = link.split();
        reader.set_max_frame(MAX_AGENT_FRAME);
        writer.set_stall_timeout(WRITE_STALL_TIMEOUT);
        // The session's clock: time since this connection's handshake.
        let origin = Instant::now();
        let mut session =
            AgentSession::new(origin.elapsed(), id.clone(), auth.key, self.session.clone())
                .with_placement(self.registry.placement(&id));

        // Until the session is online (its first report): answers go out directly.
        let Some(report) =
            Box::pin(self.until_online(&mut session, origin, &mut reader, &mut writer, addr)).await
        else {
            return;
        };
        if !self.registry.may_come_online(&id) {
            return;
        }
        // The segment the agent is placed in is the one the manager plans with.
        let mut report = report;
        if let Some(placed) = session.placement() {
            match self.registry.place_at_enrolment(&id, placed) {
                Ok(p) => self.set_placed_segment(&mut report, &p),
                Err(e) => tracing::error!(agent = %id, "cannot record the agent's placement: {e}"),
            }
        }
        self.registry.note_report(&report);

        let (control_tx, control_rx) = mpsc::channel::<Vec<u8>>(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel::<Data>(DATA_QUEUE);
        let close = Arc::new(Notify::new());
        let stopped = StoppedRoots::default();
        let generation = self.registry.next_generation();
        let took_over = self.registry.register(
            id.clone(),
            Session {
                generation,
                key: auth.key,
                addr,
                control: control_tx,
                close: close.clone(),
                stopped: stopped.clone(),
            },
        );
        tracing::info!(agent = %id, %addr, took_over, "agent connected");
        if self.registry.is_revoked(&id) {
            // Revoked while this session was starting.
            close.notify_one();
        } else if let Some(list) = self.registry.revocation_frame() {
            self.registry.send(&id, list.as_ref().clone());
        }
        if self.registry.placement(&id).as_ref() != session.placement() {
            // The administrator placed the agent while this session was starting: its
            // certificate is already stale, so it reconnects for a new one.
            tracing::info!(agent = %id, "placement changed while the session started; reconnecting it");
            close.notify_one();
        }
        if took_over {
            // The previous session is dead (e.g. the device lost power and came back
            // before the old connection timed out) and will not report it: the id now
            // belongs to this session. The engine must see it go, so it instructs again.
            let _ = self
                .engine
                .send(EngineInput::Offline { id: id.clone() })
                .await;
        }
        let _ = self
            .engine
            .send(EngineInput::Online {
                id: id.clone(),
                key: auth.key,
                report,
            })
            .await;

        // Writer: engine instructions first, then chunk answers.
        let writer_task = tokio::spawn(write_loop(
            writer,
            control_rx,
            data_rx,
            close.clone(),
            id.clone(),
            stopped.clone(),
        ));

        let reason = self
            .read_loop(
                &mut session,
                origin,
                &mut reader,
                &data_tx,
                &close,
                &stopped,
            )
            .await;
        tracing::info!(agent = %id, %addr, "agent disconnected: {reason}");
        // Unregister before the writer can close the stream: whoever sees the
        // connection closed also sees the agent gone from the registry.
        if self.registry.unregister(&id, generation) {
            let _ = self
                .engine
                .send(EngineInput::Offline { id: id.clone() })
                .await;
        }
        drop(data_tx);
        if tokio::time::timeout(Duration::from_secs(5), writer_task)
            .await
            .is_err()
        {
            tracing::debug!(agent = %id, "writer did not finish in time");
        }
    }

    /// Runs a new session until the agent's first report (the session answers directly:
    /// `Welcome`, or a refusal); `None` when the connection ended before.
    async fn until_online<R, W>(
        &self,
        session: &mut AgentSession,
        origin: Instant,
        reader: &mut link::LinkReader<R>,
        writer: &mut link::LinkWriter<W>,
        addr: SocketAddr,
    ) -> Option<Box<Report>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let id = session.agent().clone();
        loop {
            let deadline = session.poll_timeout().map(|t| origin + t);
            let frame = tokio::select! {
                _ = sleep_until(deadline) => None,
                r = reader.recv() => Some(r),
            };
            match frame {
                None => session.handle_timeout(origin.elapsed()),
                Some(Err(e)) => {
                    tracing::warn!(agent = %id, %addr, "connection failed before the first report: {e}");
                    return None;
                }
                Some(Ok(bytes)) => {
                    // A report without the labels the agent's enrolment token bound it to
                    // is refused before it is answered (no Welcome, no certificate).
                    let unbound = match Message::decode(bytes) {
                        Ok(Message::Report(r)) => {
                            self.registry.check_bound_labels(&id, &r.labels).err()
                        }
                        _ => None,
                    };
                    if let Some(why) = unbound {
                        if let Some(held_back) = BOUND_LABELS_LOG.due() {
                            tracing::warn!(agent = %id, %addr, held_back, "{why}; closing");
                        }
                        let reason = reason_for_agent(why);
                        let refusal = Message::NotAccepted { reason: &reason }.to_vec();
                        let _ =
                            tokio::time::timeout(NOT_ACCEPTED_SEND_TIMEOUT, writer.send(&refusal))
                                .await;
                        return None;
                    }
                    session.handle_frame(origin.elapsed(), unix_now(), bytes)
                }
            }
            while let Some(msg) = session.poll_transmit() {
                if let Err(e) = writer.send(&msg.to_vec()).await {
                    tracing::warn!(agent = %id, %addr, "cannot send {}: {e}", msg.kind());
                    return None;
                }
            }
            let mut online = None;
            while let Some(event) = session.poll_event() {
                match event {
                    SessionEvent::Online { report } => online = Some(report),
                    SessionEvent::Close(why) => {
                        tracing::warn!(agent = %id, %addr, "{why}; closing");
                        return None;
                    }
                    other => {
                        tracing::error!(agent = %id, "session event before the first report: {other:?}")
                    }
                }
            }
            if let Some(report) = online {
                return Some(report);
            }
        }
    }

    /// Feeds the agent's frames to its online session and carries out what it
    /// asks until the connection ends; returns why it ended.
    async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
        &self,
        session: &mut AgentSession,
        origin: Instant,
        reader: &mut link::LinkReader<R>,
        data_tx: &mpsc::Sender<Data>,
        close: &Notify,
        stopped: &StoppedRoots,
    ) -> String {
        loop {
            // The session's timer: when its certificate is renewed.
            let deadline = session.poll_timeout().map(|t| origin + t);
            let frame = tokio::select! {
                _ = close.notified() => return "closed by the manager (revoked, placed elsewhere, reconnected elsewhere or shutting down)".into(),
                _ = sleep_until(deadline) => None,
                r = reader.recv() => Some(r),
            };
            let Some(frame) = frame else {
                session.handle_timeout(origin.elapsed());
                if let Err(reason) = Box::pin(self.drain(session, data_tx, stopped)).await {
                    return reason;
                }
                continue;
            };
            let bytes = match frame {
                Ok(b) => b,
                Err(LinkError::Closed) => return "closed by the agent".into(),
                Err(e) => {
                    tracing::warn!(agent = %session.agent(), "closing connection: {e}");
                    return format!("link error: {e}");
                }
            };
            let dropped = session.dropped();
            session.handle_frame(origin.elapsed(), unix_now(), bytes);
            if session.dropped() > dropped
                && let Some(n) = DROPPED_LOG.note(session.dropped() - dropped)
            {
                tracing::warn!(
                    agent = %session.agent(),
                    dropped = n,
                    "messages over the session's rate limit dropped (Report, NextPlease, SegmentReport; count since the last such line, all agents)"
                );
            }
            if let Err(reason) = Box::pin(self.drain(session, data_tx, stopped)).await {
                return reason;
            }
        }
    }

    /// Sends what an online session transmits and carries out its events; `Err` ends the
    /// connection with that reason.
    async fn drain(
        &self,
        session: &mut AgentSession,
        data_tx: &mpsc::Sender<Data>,
        stopped: &StoppedRoots,
    ) -> Result<(), String> {
        // Pongs and renewed certificates queue behind the chunk answers.
        // Encoded before waiting: the decoded message is not held while the queue is full.
        while let Some(frame) = session.poll_transmit().map(|m| m.to_vec()) {
            if data_tx.send((None, frame)).await.is_err() {
                return Err("writer stopped".into());
            }
        }
        // Decided before waiting, the event consumed in the closure: a binding of it here
        // would keep its 2.4 KB in this future while a queue is full.
        let (id, key) = (session.agent().clone(), session.key());
        while let Some(step) = session.poll_event().map(|e| self.step(&id, key, e)) {
            self.carry_out(step, data_tx, stopped).await?;
        }
        Ok(())
    }

    /// Replaces the segment an agent's report declares with the one it is placed in (the
    /// engine plans with it; segment report pages are checked against it), warning (spaced)
    /// when they differ.
    fn set_placed_segment(&self, report: &mut Report, placed: &Placement) {
        let name = placed.segment_name();
        if report.segment != name {
            if let Some(held_back) = self.registry.placement_warning.due() {
                tracing::warn!(agent = %report.id, declared = %report.segment, placed = %name, held_back, "agent declares another segment than the one it is placed in; the manager uses its placement");
            }
            report.segment = name;
        }
    }

    /// Carries out what one event of an online session asks ([`AgentPort::step`]); `Err`
    /// ends the connection with that reason.
    ///
    /// It takes the small step, not the event: a session event is 2.4 KB, and during a
    /// push to every agent each session waits here for the engine's queue at once.
    async fn carry_out(
        &self,
        step: Step,
        data_tx: &mpsc::Sender<Data>,
        stopped: &StoppedRoots,
    ) -> Result<(), String> {
        match step {
            Step::Nothing => Ok(()),
            Step::Engine(input) => self
                .engine
                .send(input)
                .await
                .map_err(|_| "manager shutting down".to_string()),
            // The agent was told to stop working on this content: no answer.
            Step::Chunk { root, .. } if stopped.contains(&root) => Ok(()),
            Step::Chunk { root, index } => {
                let library = self.library.clone();
                let answer = match tokio::task::spawn_blocking(move || library.answer(&root, index))
                    .await
                {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!("chunk reader task failed: {e}");
                        crate::content::refuse(root, index, baton_protocol::message::Refusal::Busy)
                    }
                };
                data_tx
                    .send((Some(root), answer))
                    .await
                    .map_err(|_| "writer stopped".to_string())
            }
            Step::Refuse { frame, why } => {
                let _ = data_tx.send((None, frame)).await;
                Err(why)
            }
            Step::Close(why) => Err(why),
        }
    }

    /// Decides what one event of an online session asks (see [`AgentPort::carry_out`]).
    fn step(&self, id: &AgentId, key: PublicKey, event: SessionEvent) -> Step {
        let for_engine = match event {
            SessionEvent::ChunkRequest { root, index } => return Step::Chunk { root, index },
            SessionEvent::SegmentPage(page) => {
                // The engine plans with the segment's leader as its first entry node: it
                // hears of a report once the report is complete (with its last page).
                let last = Message::SegmentReport(page.clone());
                match self.registry.segment_report(id, page) {
                    Ok(Some(s)) => {
                        tracing::info!(agent = %id, segment = %s.segment, members = s.members, unknown = s.unknown, leader_changed = s.leader_changed, "segment report stored");
                        last
                    }
                    Ok(None) => return Step::Nothing,
                    Err(e) => {
                        if let Some(held_back) = self.registry.segment_warning.due() {
                            tracing::warn!(agent = %id, held_back, "segment report refused: {e}");
                        }
                        return Step::Nothing;
                    }
                }
            }
            SessionEvent::Report(mut report) => {
                if let Err(why) = self.registry.check_bound_labels(id, &report.labels) {
                    if let Some(held_back) = BOUND_LABELS_LOG.due() {
                        tracing::warn!(agent = %id, held_back, "{why}; closing");
                    }
                    let reason = reason_for_agent(why.clone());
                    let frame = Message::NotAccepted { reason: &reason }.to_vec();
                    return Step::Refuse { frame, why };
                }
                if let Some(p) = self.registry.placement(id) {
                    self.set_placed_segment(&mut report, &p);
                }
                self.registry.note_report(&report);
                return Step::Engine(EngineInput::Online {
                    id: id.clone(),
                    key,
                    report,
                });
            }
            SessionEvent::ForEngine(msg) => msg,
            SessionEvent::Install(report) => {
                return Step::Engine(EngineInput::Install {
                    id: id.clone(),
                    report,
                });
            }
            SessionEvent::Close(why @ SessionError::Flooding { .. }) => {
                if let Some(n) = FLOODERS_LOG.note(1) {
                    tracing::warn!(agent = %id, closed = n, "{why}; closing (sessions closed for flooding since the last such line, all agents)");
                }
                return Step::Close(why.to_string());
            }
            SessionEvent::Close(why) => {
                tracing::warn!(agent = %id, "{why}; closing");
                return Step::Close(why.to_string());
            }
            other => {
                tracing::error!(agent = %id, "unexpected session event: {other:?}");
                return Step::Nothing;
            }
        };
        Step::Engine(EngineInput::message(id.clone(), &for_engine))
    }
}

/// What one event of an online session asks of its connection ([`AgentPort::step`]).
enum Step {
    /// Nothing more.
    Nothing,
    /// Hand this to the engine (waiting while its queue is full).
    Engine(EngineInput),
    /// Read this chunk (on a blocking thread) and queue the answer.
    Chunk {
        /// The content.
        root: baton_protocol::types::Digest,
        /// The chunk.
        index: u32,
    },
    /// Tell the agent why it is refused (`NotAccepted`), then close with `why`.
    Refuse {
        /// The encoded `NotAccepted`.
        frame: Vec<u8>,
        /// The reason logged and returned.
        why: String,
    },
    /// Close the connection for this reason.
    Close(String),
}

/// A frame for the data queue: a chunk answer (with its content's root) or a pong.
type Data = (Option<Digest>, Vec<u8>);

/// A connection's writer task: sends engine instructions first, then chunk answers and
/// pongs, until both queues close or a send fails (then the session is told to close).
/// Chunk answers of content the agent was told to stop working on are dropped.
/// A send is boxed: an idle writer, the common case, holds only its queues.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: link::LinkWriter<W>,
    mut control_rx: mpsc::Receiver<Vec<u8>>,
    mut data_rx: mpsc::Receiver<Data>,
    close: Arc<Notify>,
    id: AgentId,
    stopped: StoppedRoots,
) {
    // Engine instructions do not wait for the manager's upload cap (their bytes delay the
    // chunk answers that follow): a `Cancel` goes out while an answer waits for the cap.
    let mut control_open = true;
    loop {
        let (urgent, next) = tokio::select! {
            biased;
            m = control_rx.recv(), if control_open => match m {
                Some(bytes) => (true, Some((None, bytes))),
                None => {
                    control_open = false;
                    continue;
                }
            },
            m = data_rx.recv() => (false, m),
        };
        let Some((root, bytes)) = next else { break };
        if root.is_some_and(|r| stopped.contains(&r)) {
            continue;
        }
        let wait = writer.reserve_upload(bytes.len());
        if !urgent && let Some(wait) = wait {
            let until = Instant::now() + wait;
            // Only a chunk answer is overtaken: a session frame queued with the data (the
            // `Welcome`, a renewed certificate, a pong) keeps its place before every engine
            // instruction, which the agent may act on only once it is welcomed.
            while control_open && root.is_some() {
                tokio::select! {
                    biased;
                    m = control_rx.recv() => match m {
                        Some(urgent) => {
                            let _ = writer.reserve_upload(urgent.len());
                            if let Err(e) = Box::pin(writer.send_reserved(&urgent)).await {
                                tracing::info!(agent = %id, "sending failed: {e}");
                                close.notify_one();
                                return;
                            }
                        }
                        None => control_open = false,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            tokio::time::sleep_until(until).await;
            if root.is_some_and(|r| stopped.contains(&r)) {
                // Stopped while it waited (its bytes stay taken).
                continue;
            }
        }
        if let Err(e) = Box::pin(writer.send_reserved(&bytes)).await {
            tracing::info!(agent = %id, "sending failed: {e}");
            close.notify_one();
            return;
        }
    }
    let _ = Box::pin(writer.close()).await;
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod test {
    use std::sync::Mutex;

    use baton_agent_core::linux::admission::AdmissionLimits;
    use baton_protocol::identity::Identity;

    use super::*;
    use crate::registry::SharedStore;
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;

    /// A manager's agent port over an in-memory store.
    fn server() -> Arc<AgentPort> {
        let store: SharedStore = Arc::new(Mutex::new(
            Box::new(SqliteStore::in_memory().unwrap()) as Box<dyn Store>
        ));
        let (engine, _inputs) = crate::engine_task::channel();
        Arc::new(AgentPort {
            session: Arc::new(SessionConfig::new(
                Identity::from_seed([1; 32]),
                [Identity::from_seed([2; 32]).public()],
            )),
            registry: Arc::new(Registry::load(store).unwrap()),
            library: Arc::new(Library::new()),
            limits: Limits::default(),
            engine,
            admission: Admission::new(
                "test agent port",
                AdmissionLimits {
                    max_connections: 10,
                    max_handshakes: 10,
                    max_handshakes_per_address: 10,
                    handshake_timeout: Duration::from_secs(1),
                },
            ),
        })
    }

    /// The task of every agent connection keeps its future for the session's whole life:
    /// what runs only for a while (the handshake, the steps before the first report, a
    /// refusal, carrying out one event) is boxed, so 100 000 idle sessions do not each
    /// hold room for them (the future was 11.9 KB before, 2.3 KB after).
    #[tokio::test]
    async fn a_session_task_is_small() {
        let port = server();
        let (stream, _other) = tokio::io::duplex(64);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let task = port.clone().handle(stream, addr, None);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 3 * 1024, "a session's future is {size} bytes");
        // What each session holds while it waits for the engine (during a push, all do).
        let (data_tx, _data_rx) = mpsc::channel(DATA_QUEUE);
        let mut session = AgentSession::new(
            Duration::ZERO,
            AgentId::try_from("a1").unwrap(),
            Identity::from_seed([3; 32]).public(),
            port.session.clone(),
        );
        let stopped = StoppedRoots::default();
        let draining = port.drain(&mut session, &data_tx, &stopped);
        let size = std::mem::size_of_val(&draining);
        assert!(size <= 1024, "a session's drain future is {size} bytes");
        // The writer task of the same connection, over a real link.
        let (agent_end, manager_end) = tokio::io::duplex(4096);
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([3; 32]);
        let hello = |role, id| Hello::new(role, AgentId::try_from(id).unwrap(), 0, None);
        let limits = Limits::default();
        let manager_key = manager.public();
        let (agent_link, manager_link) = tokio::join!(
            link::connect(
                agent_end,
                &agent,
                &manager_key,
                hello(Role::Agent, "a1"),
                &limits
            ),
            link::accept(
                manager_end,
                &manager,
                hello(Role::Manager, "manager"),
                &limits,
                |_| Ok(())
            ),
        );
        let _agent_link = agent_link.unwrap();
        let (_reader, writer) = manager_link.unwrap().0.split();
        let (_control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (_data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let close = Arc::new(Notify::new());
        let task = write_loop(
            writer,
            control_rx,
            data_rx,
            close,
            AgentId::try_from("a1").unwrap(),
            stopped.clone(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "a session's writer future is {size} bytes");
    }
}

#[cfg(test)]
mod writer_test {
    use baton_agent_core::linux::rate::RateLimiter;
    use baton_protocol::identity::Identity;

    use super::*;

    /// A manager's link writer over an in-memory stream under `limits`, and the agent's end.
    async fn pair(
        limits: Limits,
    ) -> (
        link::LinkWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
        link::LinkReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
    ) {
        let (agent_end, manager_end) = tokio::io::duplex(1 << 20);
        let (manager, agent) = (Identity::from_seed([1; 32]), Identity::from_seed([3; 32]));
        let hello = |role, id| Hello::new(role, AgentId::try_from(id).unwrap(), 0, None);
        let manager_key = manager.public();
        let agent_limits = Limits::default();
        let (agent_link, manager_link) = tokio::join!(
            link::connect(
                agent_end,
                &agent,
                &manager_key,
                hello(Role::Agent, "a1"),
                &agent_limits
            ),
            link::accept(
                manager_end,
                &manager,
                hello(Role::Manager, "manager"),
                &limits,
                |_| Ok(())
            ),
        );
        let (reader, _) = agent_link.unwrap().split();
        let (_, writer) = manager_link.unwrap().0.split();
        (writer, reader)
    }

    /// Every frame the agent reads until the link closes.
    async fn frames<R: AsyncRead + Unpin>(reader: &mut link::LinkReader<R>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Ok(f) = reader.recv().await {
            out.push(f.to_vec());
        }
        out
    }

    #[tokio::test]
    async fn stopped_content_is_not_sent_and_instructions_overtake_answers_waiting_for_the_cap() {
        // 20 KB/s: a 4 KiB answer waits about 0.2 s for the cap.
        let limits = Limits {
            up: Some(Arc::new(RateLimiter::new(20_000))),
            ..Limits::default()
        };
        let (writer, mut reader) = pair(limits).await;
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel::<Data>(DATA_QUEUE);
        let stopped = StoppedRoots::default();
        let (kept, cancelled) = ([1u8; 32], [2u8; 32]);
        let task = tokio::spawn(write_loop(
            writer,
            control_rx,
            data_rx,
            Arc::new(Notify::new()),
            AgentId::try_from("a1").unwrap(),
            stopped.clone(),
        ));
        data_tx.send((Some(kept), vec![b'k'; 4096])).await.unwrap();
        data_tx
            .send((Some(cancelled), vec![b'c'; 4096]))
            .await
            .unwrap();
        data_tx.send((None, b"pong".to_vec())).await.unwrap();
        // While the first answer waits for the cap, the engine stops `cancelled` and sends
        // its instruction: it goes out first, and the stopped answer never does.
        tokio::time::sleep(Duration::from_millis(20)).await;
        stopped.stop(cancelled);
        control_tx.send(b"cancel".to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop((control_tx, data_tx));
        task.await.unwrap();
        let got = frames(&mut reader).await;
        let heads: Vec<&[u8]> = got.iter().map(|f| &f[..f.len().min(6)]).collect();
        assert_eq!(heads, [&b"cancel"[..], b"kkkkkk", b"pong"]);
        stopped.resume(&cancelled);
        assert!(!stopped.contains(&cancelled));
    }

    #[tokio::test]
    async fn a_welcome_waiting_for_the_cap_is_not_overtaken_by_instructions() {
        // 20 KB/s: an 8 KiB frame (the session's `Welcome` stands for any frame without a
        // content root) waits about 0.4 s for the cap.
        let limits = Limits {
            up: Some(Arc::new(RateLimiter::new(20_000))),
            ..Limits::default()
        };
        let (writer, mut reader) = pair(limits).await;
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel::<Data>(DATA_QUEUE);
        let task = tokio::spawn(write_loop(
            writer,
            control_rx,
            data_rx,
            Arc::new(Notify::new()),
            AgentId::try_from("a1").unwrap(),
            StoppedRoots::default(),
        ));
        data_tx.send((None, vec![b'w'; 8192])).await.unwrap();
        // The engine's instruction comes while the `Welcome` is taken and waits for the cap.
        tokio::time::sleep(Duration::from_millis(20)).await;
        control_tx.send(b"fetch!".to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop((control_tx, data_tx));
        task.await.unwrap();
        let got = frames(&mut reader).await;
        let heads: Vec<&[u8]> = got.iter().map(|f| &f[..f.len().min(6)]).collect();
        assert_eq!(heads, [&b"wwwwww"[..], b"fetch!"]);
    }
}
