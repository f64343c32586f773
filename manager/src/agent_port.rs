//! The agent port: the TCP accept loop and one handler per agent connection.
//!
//! [`run_agent_port`] is the accept loop (`run(listener, shutdown)`, a
//! semaphore bounding live connections). Each connection runs the handshake
//! through the link layer with [`Registry::authorize`], expects a `Report`
//! from the authenticated agent first, answers `Welcome`, and then:
//! - answers `ChunkRequest` (from the [`Library`]) and `Ping` itself;
//! - forwards what the engine handles (`Report`, `Progress`, `Have`, `Failed`,
//!   `NextPlease`, `PeerTrouble`, `Pong`) to the [`EngineTask`];
//! - carries the engine's instructions back out.
//!
//! Serial lines ([`crate::serial`]) hand their sessions to the same handler.
//! A malformed, oversized or undecryptable frame closes that one connection
//! with a logged reason; nothing else is disturbed.
//!
//! [`EngineTask`]: crate::engine_task::EngineTask

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{MAX_PUBLISHERS, Message};
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::{AgentId, PublicKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::content::Library;
use crate::engine_task::EngineInput;
use crate::registry::{Registry, Session, unix_now};

/// How long a new connection has to send its first `Report` after the handshake.
pub const FIRST_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame the manager accepts from an agent (agents send small control messages).
pub const MAX_AGENT_FRAME: usize = 16 * 1024;
/// Chunk answers queued per connection before its reader waits (backpressure).
const DATA_QUEUE: usize = 8;

/// What every agent connection shares.
#[derive(Debug)]
pub struct AgentPort {
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
    pub engine: mpsc::UnboundedSender<EngineInput>,
    /// Bounds live connections.
    pub connections: Arc<Semaphore>,
}

/// Accepts agent connections on `listener` until `shutdown` completes.
pub async fn run_agent_port(
    listener: TcpListener,
    server: Arc<AgentPort>,
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

impl AgentPort {
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
            let _ = self.engine.send(EngineInput::Offline { id: id.clone() });
        }
        let _ = self.engine.send(EngineInput::Online {
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
            let _ = self.engine.send(EngineInput::Offline { id: id.clone() });
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
                        let input = EngineInput::Message {
                            id: id.clone(),
                            bytes: bytes.to_vec(),
                        };
                        if self.engine.send(input).is_err() {
                            return "manager shutting down".into();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(agent = %id, "segment report refused: {e}"),
                },
                Message::Report(ref r) => {
                    self.registry.note_report(r);
                    let input = EngineInput::Message {
                        id: id.clone(),
                        bytes: bytes.to_vec(),
                    };
                    if self.engine.send(input).is_err() {
                        return "manager shutting down".into();
                    }
                }
                Message::Progress { .. }
                | Message::Have { .. }
                | Message::Failed { .. }
                | Message::NextPlease { .. }
                | Message::PeerTrouble { .. }
                | Message::Pong { .. } => {
                    let input = EngineInput::Message {
                        id: id.clone(),
                        bytes: bytes.to_vec(),
                    };
                    if self.engine.send(input).is_err() {
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
