//! The agent port and the engine's driver.
//!
//! [`run_agent_server`] is the TCP accept loop (`run(listener, shutdown)`, a
//! semaphore bounding live connections). Each connection runs the handshake
//! through the link layer with [`Registry::authorize`], expects a `Report`
//! from the authenticated agent first, answers `Welcome`, and then:
//! - answers `ChunkRequest` (from the [`Library`]) and `Ping` itself;
//! - forwards what the engine handles (`Report`, `Progress`, `Have`, `Failed`,
//!   `NextPlease`, `PeerTrouble`, `Pong`) to the [`Core`] task;
//! - carries the engine's instructions back out.
//!
//! A malformed, oversized or undecryptable frame closes that one connection
//! with a logged reason; nothing else is disturbed.
//!
//! [`Core`] is the one task that owns the sans-IO [`Engine`]. After every
//! batch of inputs it drains `poll_persist` into the store in one
//! transaction, and only then sends what `poll_transmit` returns (persist
//! before instruct), then publishes `poll_event` as [`JobEvent`]s and arms
//! the timer at `poll_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{MAX_PUBLISHERS, Message, Report};
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::{AgentId, PublicKey};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::content::Library;
use baton_manager_core::engine::{Engine, EngineEvent, JobSpec};
use crate::registry::{Registry, Session, SharedStore, lock, unix_now};
use crate::store::{JobState, StoreError};

/// How long a new connection has to send its first `Report` after the handshake.
pub const FIRST_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame the manager accepts from an agent (agents send small control messages).
pub const MAX_AGENT_FRAME: usize = 16 * 1024;
/// Chunk answers queued per connection before its reader waits (backpressure).
const DATA_QUEUE: usize = 8;
/// Inputs the core takes at once before persisting and transmitting.
const CORE_BATCH: usize = 256;

/// An input to the engine task.
pub enum CoreInput {
    /// An agent connected and sent its first report.
    Online {
        /// The agent.
        id: AgentId,
        /// Its authenticated key.
        key: PublicKey,
        /// Its report.
        report: Box<Report>,
    },
    /// An encoded message from a connected agent, for the engine.
    Message {
        /// The agent.
        id: AgentId,
        /// The decrypted plaintext (one `Message`).
        bytes: Vec<u8>,
    },
    /// An agent's connection ended.
    Offline {
        /// The agent.
        id: AgentId,
    },
    /// Start a job (created in the store as pending).
    StartJob {
        /// What to distribute to whom.
        spec: Box<JobSpec>,
        /// The engine's answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Cancel a job.
    CancelJob {
        /// The job.
        job: u64,
        /// The engine's answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

impl std::fmt::Debug for CoreInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoreInput::Online { id, .. } => write!(f, "Online({id})"),
            CoreInput::Message { id, bytes } => write!(f, "Message({id}, {} bytes)", bytes.len()),
            CoreInput::Offline { id } => write!(f, "Offline({id})"),
            CoreInput::StartJob { spec, .. } => write!(f, "StartJob({})", spec.id),
            CoreInput::CancelJob { job, .. } => write!(f, "CancelJob({job})"),
        }
    }
}

/// Progress of a job, as the API streams it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobEvent {
    /// A participant verified more chunks.
    Progress {
        /// The job.
        job: u64,
        /// The participant.
        agent: String,
        /// Chunks verified.
        verified: u32,
        /// Chunks in the content.
        total: u32,
    },
    /// A participant confirmed.
    Confirmed {
        /// The job.
        job: u64,
        /// The participant.
        agent: String,
    },
    /// A participant failed or was given up.
    Failed {
        /// The job.
        job: u64,
        /// The participant.
        agent: String,
        /// Why.
        reason: String,
    },
    /// Every participant confirmed or was given up.
    Finished {
        /// The job.
        job: u64,
        /// Participants that confirmed.
        confirmed: u32,
        /// Participants that failed.
        failed: u32,
    },
    /// The administrator cancelled the job.
    Cancelled {
        /// The job.
        job: u64,
    },
    /// A rule of the job's policy cannot be met (stored with the job as a warning).
    Warning {
        /// The job.
        job: u64,
        /// What cannot be met, for people.
        text: String,
    },
}

impl JobEvent {
    /// The job the event is about.
    pub fn job(&self) -> u64 {
        match self {
            JobEvent::Progress { job, .. }
            | JobEvent::Confirmed { job, .. }
            | JobEvent::Failed { job, .. }
            | JobEvent::Finished { job, .. }
            | JobEvent::Warning { job, .. }
            | JobEvent::Cancelled { job } => *job,
        }
    }

    /// Whether nothing more will happen to the job after this event.
    pub fn is_final(&self) -> bool {
        matches!(self, JobEvent::Finished { .. } | JobEvent::Cancelled { .. })
    }

    fn from_engine(event: EngineEvent) -> Self {
        match event {
            EngineEvent::Progress {
                job,
                agent,
                verified,
                total,
            } => JobEvent::Progress {
                job,
                agent: agent.to_string(),
                verified,
                total,
            },
            EngineEvent::Confirmed { job, agent } => JobEvent::Confirmed {
                job,
                agent: agent.to_string(),
            },
            EngineEvent::ParticipantFailed { job, agent, reason } => JobEvent::Failed {
                job,
                agent: agent.to_string(),
                reason,
            },
            EngineEvent::JobFinished {
                job,
                confirmed,
                failed,
            } => JobEvent::Finished {
                job,
                confirmed,
                failed,
            },
            EngineEvent::PolicyWarning { job, text } => JobEvent::Warning { job, text },
        }
    }
}

/// Why the engine task stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// Persisting the engine's records failed: nothing may be instructed that is not recorded.
    #[error("cannot persist job state, stopping so that no unrecorded instruction is sent: {0}")]
    Persist(#[source] StoreError),
}

/// The task that owns the [`Engine`].
pub struct Core {
    engine: Engine,
    store: SharedStore,
    registry: Arc<Registry>,
    events: broadcast::Sender<JobEvent>,
    origin: Instant,
    /// Answers to commands, sent once what the command caused is persisted.
    replies: Vec<Reply>,
}

/// A command's answer channel and its result.
type Reply = (oneshot::Sender<Result<(), String>>, Result<(), String>);

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

impl Core {
    /// A driver for `engine`; `origin` is the engine's time zero.
    pub fn new(
        engine: Engine,
        store: SharedStore,
        registry: Arc<Registry>,
        events: broadcast::Sender<JobEvent>,
        origin: Instant,
    ) -> Self {
        let mut engine = engine;
        engine.set_wall_clock(origin.elapsed(), unix_now());
        Core {
            engine,
            store,
            registry,
            events,
            origin,
            replies: Vec::new(),
        }
    }

    /// The engine's clock: time since `origin`.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// The engine, for setting up before [`Core::run`] (resuming jobs).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Runs until `shutdown` completes or every input sender is gone.
    pub async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<CoreInput>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CoreError> {
        tokio::pin!(shutdown);
        self.drain()?;
        loop {
            let deadline = self.engine.poll_timeout().map(|t| self.origin + t);
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    // Take what else is ready, then persist and instruct once.
                    for _ in 1..CORE_BATCH {
                        match inputs.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until(deadline) => {
                    let now = self.now();
                    self.engine.set_wall_clock(now, unix_now());
                    self.engine.handle_timeout(now);
                }
            }
            self.drain()?;
        }
        Ok(())
    }

    /// Feeds one input to the engine (and the store where it records agent facts).
    pub fn handle(&mut self, input: CoreInput) {
        let now = self.now();
        self.engine.set_wall_clock(now, unix_now());
        match input {
            CoreInput::Online { id, key, report } => {
                self.record_report(&report);
                self.engine.agent_online(now, id, key, *report);
            }
            CoreInput::Message { id, bytes } => {
                let msg = match Message::decode(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(agent = %id, "undecodable message reached the engine task: {e}");
                        return;
                    }
                };
                if let Message::PeerTrouble {
                    trouble: baton_protocol::message::Trouble::BadChunk { .. },
                    ..
                } = msg
                {
                    crate::http::metrics::count_chunk_verification_failure();
                }
                if let Message::Report(report) = msg {
                    if report.id != id {
                        tracing::warn!(agent = %id, claimed = %report.id, "report for another id ignored");
                        return;
                    }
                    let Some(key) = self.registry.key_of(&id) else {
                        return;
                    };
                    self.record_report(&report);
                    self.engine.agent_online(now, id, key, report);
                } else if let Err(e) = self.engine.handle_message(now, &id, &msg) {
                    tracing::warn!(agent = %id, kind = msg.kind(), "engine refused message: {e}");
                }
            }
            CoreInput::Offline { id } => {
                if let Err(e) = lock(&self.store).mark_seen(&id, unix_now()) {
                    tracing::warn!(agent = %id, "cannot record last-seen time: {e}");
                }
                self.engine.agent_offline(now, &id);
            }
            CoreInput::StartJob { spec, reply } => {
                let job = spec.id;
                let result = self.engine.start_job(now, *spec).map_err(|e| e.to_string());
                if let Err(e) = &result {
                    tracing::warn!(job, "engine refused job: {e}");
                    if let Err(se) =
                        lock(&self.store).set_job_state(job, JobState::Refused, Some(e), unix_now())
                    {
                        tracing::error!(job, "cannot record refused job: {se}");
                    }
                } else {
                    tracing::info!(job, "job started");
                }
                self.replies.push((reply, result));
            }
            CoreInput::CancelJob { job, reply } => {
                let result = match self.engine.cancel_job(now, job) {
                    Ok(()) => lock(&self.store)
                        .set_job_state(job, JobState::Cancelled, None, unix_now())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if result.is_ok() {
                    tracing::info!(job, "job cancelled");
                    let _ = self.events.send(JobEvent::Cancelled { job });
                }
                self.replies.push((reply, result));
            }
        }
    }

    fn record_report(&self, report: &Report) {
        if let Err(e) = lock(&self.store).record_report(report, unix_now()) {
            tracing::warn!(agent = %report.id, "cannot record report: {e}");
        }
    }

    /// Persists every pending record (one transaction), then transmits, answers commands, and
    /// publishes events.
    pub fn drain(&mut self) -> Result<(), CoreError> {
        let mut records = Vec::new();
        while let Some(r) = self.engine.poll_persist() {
            records.push(r);
        }
        if !records.is_empty() {
            lock(&self.store)
                .apply(&records, unix_now())
                .map_err(CoreError::Persist)?;
        }
        while let Some((to, msg)) = self.engine.poll_transmit() {
            if !self.registry.send(&to, msg.to_vec()) {
                tracing::debug!(agent = %to, kind = msg.kind(), "agent not connected; instruction dropped");
            }
        }
        for (reply, result) in self.replies.drain(..) {
            let _ = reply.send(result);
        }
        while let Some(event) = self.engine.poll_event() {
            match &event {
                EngineEvent::JobFinished { job, .. } => {
                    // Its records are persisted and its last instructions sent: free its state.
                    self.engine.forget_job(*job);
                }
                EngineEvent::PolicyWarning { job, text } => {
                    tracing::warn!(job, "policy cannot be met: {text}");
                    if let Err(e) = lock(&self.store).add_job_warning(*job, text, unix_now()) {
                        tracing::error!(job, "cannot record policy warning: {e}");
                    }
                }
                _ => {}
            }
            let _ = self.events.send(JobEvent::from_engine(event));
        }
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What every agent connection shares.
#[derive(Debug)]
pub struct AgentServer {
    /// The manager's session identity.
    pub identity: Identity,
    /// Publisher keys announced in `Welcome`.
    pub publishers: Vec<PublicKey>,
    /// Enrolled keys and live sessions.
    pub registry: Arc<Registry>,
    /// Content served to `ChunkRequest`s.
    pub library: Arc<Library>,
    /// Upload cap and byte counters.
    pub limits: Limits,
    /// The engine task's input.
    pub core: mpsc::UnboundedSender<CoreInput>,
    /// Bounds live connections.
    pub connections: Arc<Semaphore>,
}

/// Accepts agent connections on `listener` until `shutdown` completes.
pub async fn run_agent_server(
    listener: TcpListener,
    server: Arc<AgentServer>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = server.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accepting an agent connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            server.handle(stream, addr).await;
            drop(permit);
        });
    }
    server.registry.close_all();
}

impl AgentServer {
    fn hello(&self) -> Hello {
        Hello::new(
            Role::Manager,
            AgentId::try_from("manager").expect("short id"),
            baton_protocol::caps::RELAY_V1 | baton_protocol::caps::SERVE,
            None,
        )
    }

    /// Serves one agent connection until it ends: a TCP stream, or a serial
    /// line's session (see [`crate::serial`]), which has no address of its own.
    pub async fn handle<S>(self: Arc<Self>, stream: S, addr: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let registry = self.registry.clone();
        let accepted = link::accept(stream, &self.identity, self.hello(), &self.limits, |hs| {
            registry
                .authorize(hs)
                .map_err(|e| LinkError::Refused(e.to_string()))
        })
        .await;
        let (link, auth) = match accepted {
            Ok(x) => x,
            Err(LinkError::Refused(why)) => {
                tracing::warn!(%addr, "agent refused: {why}");
                return;
            }
            Err(e) => {
                tracing::warn!(%addr, "agent handshake failed: {e}");
                return;
            }
        };
        let id = auth.id;
        let (mut reader, mut writer) = link.split();
        reader.set_max_frame(MAX_AGENT_FRAME);

        // The first message must be the agent's report about itself.
        let report = match tokio::time::timeout(FIRST_REPORT_TIMEOUT, reader.recv()).await {
            Err(_) => {
                tracing::warn!(agent = %id, %addr, "no report within {FIRST_REPORT_TIMEOUT:?}; closing");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(agent = %id, %addr, "connection failed before the first report: {e}");
                return;
            }
            Ok(Ok(bytes)) => match Message::decode(bytes) {
                Ok(Message::Report(r)) if r.id == id => r,
                Ok(Message::Report(r)) => {
                    tracing::warn!(agent = %id, %addr, claimed = %r.id, "report id differs from the authenticated id; closing");
                    return;
                }
                Ok(other) => {
                    tracing::warn!(agent = %id, %addr, kind = other.kind(), "first message is not a report; closing");
                    return;
                }
                Err(e) => {
                    tracing::warn!(agent = %id, %addr, "malformed first message: {e}; closing");
                    return;
                }
            },
        };
        self.registry.note_report(&report);
        let mut publishers = heapless::Vec::<PublicKey, MAX_PUBLISHERS>::new();
        for key in self.publishers.iter().take(MAX_PUBLISHERS) {
            let _ = publishers.push(*key);
        }
        let welcome = Message::Welcome {
            cert: AgentCert::issue(&self.identity, id.clone(), auth.key),
            unix_time: unix_now(),
            publishers,
        };
        if let Err(e) = writer.send(&welcome.to_vec()).await {
            tracing::warn!(agent = %id, %addr, "cannot send welcome: {e}");
            return;
        }

        let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (data_tx, mut data_rx) = mpsc::channel::<Vec<u8>>(DATA_QUEUE);
        let close = Arc::new(Notify::new());
        let generation = self.registry.next_generation();
        let took_over = self.registry.register(
            id.clone(),
            Session {
                generation,
                key: auth.key,
                addr,
                control: control_tx,
                close: close.clone(),
            },
        );
        tracing::info!(agent = %id, %addr, took_over, "agent connected");
        if took_over {
            // The previous session is dead (e.g. the device lost power and came back
            // before the old connection timed out) and will not report it: the id now
            // belongs to this session. The engine must see it go, so it instructs again.
            let _ = self.core.send(CoreInput::Offline { id: id.clone() });
        }
        let _ = self.core.send(CoreInput::Online {
            id: id.clone(),
            key: auth.key,
            report: Box::new(report),
        });

        // Writer: engine instructions first, then chunk answers.
        let writer_close = close.clone();
        let writer_id = id.clone();
        let writer_task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    m = control_rx.recv() => m,
                    m = data_rx.recv() => m,
                };
                let Some(bytes) = next else { break };
                if let Err(e) = writer.send(&bytes).await {
                    tracing::info!(agent = %writer_id, "sending failed: {e}");
                    writer_close.notify_one();
                    return;
                }
            }
            let _ = writer.close().await;
        });

        let reason = self.read_loop(&id, &mut reader, &data_tx, &close).await;
        tracing::info!(agent = %id, %addr, "agent disconnected: {reason}");
        // Unregister before the writer can close the stream: whoever sees the
        // connection closed also sees the agent gone from the registry.
        if self.registry.unregister(&id, generation) {
            let _ = self.core.send(CoreInput::Offline { id: id.clone() });
        }
        drop(data_tx);
        if tokio::time::timeout(Duration::from_secs(5), writer_task)
            .await
            .is_err()
        {
            tracing::debug!(agent = %id, "writer did not finish in time");
        }
    }

    /// Reads the agent's messages until the connection ends; returns why it ended.
    async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
        &self,
        id: &AgentId,
        reader: &mut link::LinkReader<R>,
        data_tx: &mpsc::Sender<Vec<u8>>,
        close: &Notify,
    ) -> String {
        loop {
            let frame = tokio::select! {
                _ = close.notified() => return "closed by the manager (reconnected elsewhere or shutting down)".into(),
                r = reader.recv() => r,
            };
            let bytes = match frame {
                Ok(b) => b,
                Err(LinkError::Closed) => return "closed by the agent".into(),
                Err(e) => {
                    tracing::warn!(agent = %id, "closing connection: {e}");
                    return format!("link error: {e}");
                }
            };
            let msg = match Message::decode(bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(agent = %id, "malformed message ({e}); closing its connection");
                    return format!("malformed message: {e}");
                }
            };
            match msg {
                Message::ChunkRequest { root, index } => {
                    let library = self.library.clone();
                    let answer =
                        match tokio::task::spawn_blocking(move || library.answer(&root, index))
                            .await
                        {
                            Ok(a) => a,
                            Err(e) => {
                                tracing::error!("chunk reader task failed: {e}");
                                crate::content::refuse(
                                    root,
                                    index,
                                    baton_protocol::message::Refusal::Busy,
                                )
                            }
                        };
                    if data_tx.send(answer).await.is_err() {
                        return "writer stopped".into();
                    }
                }
                Message::Ping { nonce } => {
                    if data_tx
                        .send(Message::Pong { nonce }.to_vec())
                        .await
                        .is_err()
                    {
                        return "writer stopped".into();
                    }
                }
                Message::Report(ref r) if r.id != *id => {
                    tracing::warn!(agent = %id, claimed = %r.id, "report for another id; closing");
                    return "report for another id".into();
                }
                Message::SegmentReport(page) => match self.registry.segment_report(id, page) {
                    Ok(Some(s)) => {
                        tracing::info!(agent = %id, segment = %s.segment, members = s.members, unknown = s.unknown, leader_changed = s.leader_changed, "segment report stored");
                        // The engine plans with the segment's leader as its first entry node.
                        let input = CoreInput::Message {
                            id: id.clone(),
                            bytes: bytes.to_vec(),
                        };
                        if self.core.send(input).is_err() {
                            return "manager shutting down".into();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(agent = %id, "segment report refused: {e}"),
                },
                Message::Report(ref r) => {
                    self.registry.note_report(r);
                    let input = CoreInput::Message {
                        id: id.clone(),
                        bytes: bytes.to_vec(),
                    };
                    if self.core.send(input).is_err() {
                        return "manager shutting down".into();
                    }
                }
                Message::Progress { .. }
                | Message::Have { .. }
                | Message::Failed { .. }
                | Message::NextPlease { .. }
                | Message::PeerTrouble { .. }
                | Message::Pong { .. } => {
                    let input = CoreInput::Message {
                        id: id.clone(),
                        bytes: bytes.to_vec(),
                    };
                    if self.core.send(input).is_err() {
                        return "manager shutting down".into();
                    }
                }
                other => {
                    tracing::warn!(agent = %id, kind = other.kind(), "agents do not send this message; ignored");
                }
            }
        }
    }
}
