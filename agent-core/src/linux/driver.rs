//! The tokio driver of the Linux agent: sockets, timers and files around [`Agent`].
//!
//! One central task owns the [`Agent`] and its [`DirStore`]; every connection
//! (the manager session and each peer) is a task pair using the link layer
//! that hands decrypted frames to the central task and writes what it is
//! given. After every input the central task drains `poll_transmit` (to the
//! connections' queues) and `poll_event` (connect to peers, close, export…),
//! and sleeps until `poll_timeout`. The manager session is re-established with
//! backoff; peers connect to the listener and must show a certificate signed
//! by the manager; outgoing peer connections pin the key the manager named.
//! Rate limits (`--up-bps`, `--down-bps`) are process-wide.
//!
//! A peer costs a bounded amount of memory however it behaves: its frames
//! waiting for the central task plus the answers (chunks, refusals, pongs)
//! queued for it are its *backlog*, and its connection is not read while that
//! backlog holds [`PEER_WINDOW`] frames (TCP then slows the peer down); a peer
//! whose backlog still grows past [`PEER_QUEUE_MAX`] frames (answers to
//! requests parked earlier), or that takes no byte of a frame for
//! [`PEER_STALL_TIMEOUT`] (`--peer-stall-timeout-secs`), is disconnected. A
//! peer that asks for chunks and never reads the answers thus holds at most
//! its window of chunk buffers, and is dropped after the stall timeout. Our
//! own chunk requests to a peer are not counted (the fetch window bounds
//! them): two honest agents fetching from each other over one connection owe
//! each other at most their fetch windows, below [`PEER_WINDOW`], so neither
//! stops reading the other.
//!
//! Segment discovery (`--discovery-port`, 0 = off) runs beside the agent: a
//! [`Segment`] fed from the discovery sockets (see [`super::discovery`]),
//! started once the manager's `Welcome` gave the agent its certificate. Its
//! report pages go out on the manager session; the agent's report carries
//! the peer delays it measures.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use baton_protocol::identity::{AgentCert, Identity};

use baton_protocol::message::CHUNK_OVERHEAD;
use baton_protocol::revocation::RevocationList;
use baton_protocol::session::{Hello, MAX_TOKEN_LEN, Role};
use baton_protocol::{
    AgentId, JobRef, Label, LinkInfo, MAX_DELAYS, MAX_FRAME, Message, PeerAddr, PublicKey, caps,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::meter::LinkMeter;

use super::admission::{self, Admission, AdmissionLimits};
use super::args::AgentArgs;
use super::datadir::{
    DataDir, DataDirError, Existing, ensure_private_dir, open_private, read_secret,
};
use super::discovery::DiscoverySockets;
use super::install::{self, InstallSettings, InstallTarget, InstallUpdate, run_hook};
use super::link::{self, Limits, Link, LinkError};
use super::rate::RateLimiter;
use super::size::parse_size;
use super::spaced::SpacedLog;
use super::store::{DirStore, DirStoreError, export};
use crate::agent::{Agent, AgentClock, AgentConfig, ConnId, Direction, Event, JobState, PeerInfo};
use crate::revocation::peer_cert_acceptable;
use crate::segment::{Destination, Segment, SegmentConfig, SegmentEvent};
use crate::store::ContentStore;
use baton_protocol::message::FailReason;

/// The Linux agent: a directory store, up to 4 concurrent jobs and 64 peer connections.
pub type LinuxAgent = Agent<DirStore, 4, LINUX_PEERS, LINUX_PARKED>;

/// Peer connection slots of the Linux agent (incoming and outgoing).
const LINUX_PEERS: usize = 64;
/// Peer requests parked until their chunk is verified (about peers served × window).
const LINUX_PARKED: usize = 512;
/// Peers a Linux agent serves at once unless `--max-peers` says otherwise.
const DEFAULT_MAX_PEERS: u16 = 48;
/// Peer handshakes in progress at once unless `--max-handshakes` says otherwise.
const DEFAULT_MAX_HANDSHAKES: usize = 128;
/// Peer handshakes in progress from one address unless `--max-handshakes-per-address` says otherwise.
const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 16;
/// Frames a peer connection may have waiting (read but not handled, or answers queued for
/// it) before it is no longer read: twice the largest fetch window
/// ([`crate::agent::MAX_WINDOW`]), so an honest fetcher (two jobs at the largest window, four
/// at the default) is answered without waiting.
pub const PEER_WINDOW: usize = 2 * crate::agent::MAX_WINDOW;
/// Answers queued for one peer beyond which it is disconnected: requests parked before it
/// stopped reading can still be answered at once (an honest fetcher has at most
/// `MAX_WINDOW` requests in flight per job, four jobs at most).
pub const PEER_QUEUE_MAX: usize = 4 * PEER_WINDOW;
/// A peer that takes no byte of a frame for this long is disconnected (it does not read),
/// unless `--peer-stall-timeout-secs` says otherwise.
pub const PEER_STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the Linux agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentRunError {
    /// A setting is missing or malformed.
    #[error("configuration: {0}")]
    Config(String),
    /// The identity file could not be read or created.
    #[error("identity {path}: {source}")]
    Identity {
        /// The key file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The content store could not be opened.
    #[error(transparent)]
    Store(#[from] DirStoreError),
    /// The data directory is in use, or it or a key file in it is open to others.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The peer listener could not be bound.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
}

fn config_err(s: impl Into<String>) -> AgentRunError {
    AgentRunError::Config(s.into())
}

/// Name of the agent's identity key file in its data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Loads `<data-dir>/identity.key` (hex seed), creating it (mode 0600) on first run; a key
/// file group or others may read or write is refused. Only the holder of the data
/// directory's lock may call it (two creators would race).
pub fn load_or_create_identity(data_dir: &Path) -> Result<Identity, AgentRunError> {
    load_identity(data_dir, true).map(|id| id.expect("created when absent"))
}

/// Loads `<data-dir>/identity.key`, creating it when absent if `create`; `None` if it is
/// absent and not created.
fn load_identity(data_dir: &Path, create: bool) -> Result<Option<Identity>, AgentRunError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| AgentRunError::Identity {
        path: path.clone(),
        source,
    };
    match read_secret(&path)? {
        Some(text) => {
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| {
                    io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a 64-digit hex seed",
                    ))
                })?;
            Ok(Some(Identity::from_seed(seed)))
        }
        None if !create => Ok(None),
        None => {
            ensure_private_dir(data_dir)?;
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write as _;
                let mut f = open_private(
                    std::fs::OpenOptions::new().write(true).create(true),
                    &tmp,
                    Existing::Empty,
                )
                .map_err(io)?;
                writeln!(f, "{}", hex::encode(seed)).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(Some(Identity::from_seed(seed)))
        }
    }
}

fn parse_key(hex_key: &str, what: &str) -> Result<PublicKey, AgentRunError> {
    hex::decode(hex_key.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .map(PublicKey)
        .ok_or_else(|| config_err(format!("{what} must be 64 hex digits")))
}

fn bounded<const N: usize>(s: &str, what: &str) -> Result<heapless::String<N>, AgentRunError> {
    heapless::String::try_from(s)
        .map_err(|_| config_err(format!("{what} is longer than {N} bytes")))
}

/// Segment discovery settings.
#[derive(Clone, Debug)]
struct DiscoverySettings {
    port: u16,
    broadcast: Ipv4Addr,
    beacon_interval: Duration,
    leader_timeout: Duration,
}

/// Everything the driver needs, checked.
struct Settings {
    discovery: Option<DiscoverySettings>,
    manager: String,
    manager_key: PublicKey,
    data_dir: PathBuf,
    listen: String,
    advertise: Option<SocketAddr>,
    config: AgentConfig,
    up: Option<u64>,
    down: Option<u64>,
    token: Option<heapless::String<MAX_TOKEN_LEN>>,
    export: Option<PathBuf>,
    on_complete: Option<String>,
    /// How content is installed (`--install`); `None`: content only.
    install: Option<InstallSettings>,
    /// The time limit of every command the agent runs.
    command_timeout: Duration,
    status_file: Option<PathBuf>,
    max_storage: Option<u64>,
    exit_when_done: bool,
    /// The peer listener's caps, its connection cap still to be set from the descriptor limit.
    admission: AdmissionLimits,
    peer_stall: Duration,
}

impl Settings {
    fn from_args(a: &AgentArgs) -> Result<Settings, AgentRunError> {
        let need = |v: &Option<String>, flag: &str| {
            v.clone()
                .ok_or_else(|| config_err(format!("--{flag} is required")))
        };
        let id: AgentId = bounded(&need(&a.id, "id")?, "--id")?;
        let mut config = AgentConfig::new(id);
        if let Some(s) = &a.site {
            config.site = bounded::<32>(s, "--site")?;
        }
        if let Some(s) = &a.segment {
            config.segment = bounded::<32>(s, "--segment")?;
        }
        for l in &a.label {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| config_err(format!("--label {l:?} is not key=value")))?;
            let label = Label {
                key: bounded(k, "label key")?,
                value: bounded(v, "label value")?,
            };
            config
                .labels
                .push(label)
                .map_err(|_| config_err("at most 8 labels"))?;
        }
        if !a.publisher_key.is_empty() {
            return Err(config_err(
                "--publisher-key (publisher-key) is no longer accepted: pin the root key(s) that sign the trust document with --root-key HEX (root-key in the config file); the trust document names the publishers",
            ));
        }
        for k in &a.root_key {
            let key = parse_key(k, "--root-key")?;
            if config.roots.contains(&key) {
                return Err(config_err(format!("--root-key {k} is given twice")));
            }
            config.roots.push(key).map_err(|_| {
                config_err(format!(
                    "at most {} root keys",
                    baton_protocol::trust::MAX_ROOT_KEYS
                ))
            })?;
        }
        config.root_threshold = a.root_threshold.unwrap_or(1);
        if config.root_threshold == 0
            || (!config.roots.is_empty() && usize::from(config.root_threshold) > config.roots.len())
        {
            return Err(config_err(format!(
                "--root-threshold must be 1..={} (the number of --root-key keys)",
                config.roots.len().max(1)
            )));
        }
        // A Linux host has a clock of its own (kept by NTP): expiry is judged by it.
        config.clock = AgentClock::System;
        if let Some(p) = a.performance {
            if !(1..=1000).contains(&p) {
                return Err(config_err("--performance must be 1..=1000"));
            }
            config.performance = p;
        }
        config.max_peers = a.max_peers.unwrap_or(DEFAULT_MAX_PEERS);
        if usize::from(config.max_peers) >= LINUX_PEERS {
            return Err(config_err(format!(
                "--max-peers must be below {LINUX_PEERS} (connection slots, outgoing ones included)"
            )));
        }
        if let Some(n) = a.window {
            if n == 0 {
                return Err(config_err("--window must be at least 1"));
            }
            config.window = n;
        }
        let size = |v: &Option<String>, flag: &str| -> Result<Option<u64>, AgentRunError> {
            v.as_deref()
                .map(|s| parse_size(s).map_err(|e| config_err(format!("--{flag}: {e}"))))
                .transpose()
        };
        let up = size(&a.up_bps, "up-bps")?.filter(|&v| v > 0);
        let down = size(&a.down_bps, "down-bps")?.filter(|&v| v > 0);
        config.link = LinkInfo {
            up_bps: up.unwrap_or(0),
            down_bps: down.unwrap_or(0),
            loss_ppm: 0,
            uptime_s: 0,
        };
        let advertise = a
            .advertise
            .as_deref()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .map_err(|e| config_err(format!("--advertise {s:?}: {e}")))
            })
            .transpose()?;
        let port = a
            .discovery_port
            .unwrap_or(baton_protocol::discovery::DEFAULT_DISCOVERY_PORT);
        let discovery = if port == 0 {
            None
        } else {
            let broadcast = a
                .discovery_broadcast
                .as_deref()
                .unwrap_or("255.255.255.255");
            let broadcast = broadcast
                .parse::<Ipv4Addr>()
                .map_err(|e| config_err(format!("--discovery-broadcast {broadcast:?}: {e}")))?;
            let beacon_interval = Duration::from_millis(a.beacon_interval_ms.unwrap_or(1000));
            let leader_timeout = Duration::from_millis(a.leader_timeout_ms.unwrap_or(3000));
            if beacon_interval.is_zero() {
                return Err(config_err("--beacon-interval-ms must be at least 1"));
            }
            if leader_timeout <= beacon_interval {
                return Err(config_err(
                    "--leader-timeout-ms must be longer than --beacon-interval-ms",
                ));
            }
            Some(DiscoverySettings {
                port,
                broadcast,
                beacon_interval,
                leader_timeout,
            })
        };
        let manager_key = parse_key(&need(&a.manager_key, "manager-key")?, "--manager-key")?;
        config.manager_key = Some(manager_key);
        let manager = need(&a.manager, "manager")?;
        let addresses = manager_addresses(&manager);
        if addresses.is_empty() {
            return Err(config_err("--manager names no address"));
        }
        if addresses.len() > MAX_MANAGER_ADDRESSES {
            return Err(config_err(format!(
                "--manager names {} different addresses; at most {MAX_MANAGER_ADDRESSES} (an active manager and its standbys)",
                addresses.len()
            )));
        }
        Ok(Settings {
            discovery,
            manager,
            manager_key,
            data_dir: a
                .data_dir
                .clone()
                .ok_or_else(|| config_err("--data-dir is required"))?,
            listen: a.listen.clone().unwrap_or_else(|| "0.0.0.0:0".into()),
            advertise,
            config,
            up,
            down,
            token: a
                .enrolment_token()
                .map_err(config_err)?
                .as_deref()
                .map(|t| bounded(t, "the enrolment token"))
                .transpose()?,
            export: a.export.clone(),
            on_complete: a.on_complete.clone(),
            install: a.install.clone().map(|install| InstallSettings {
                install,
                health: a.health.clone(),
                rollback: a.rollback.clone(),
                health_deadline: a
                    .health_deadline
                    .map_or(install::DEFAULT_HEALTH_DEADLINE, Duration::from_secs),
                health_interval: a
                    .health_interval
                    .map_or(install::DEFAULT_HEALTH_INTERVAL, |s| {
                        Duration::from_secs(s.max(1))
                    }),
                command_timeout: a
                    .command_timeout
                    .map_or(install::DEFAULT_COMMAND_TIMEOUT, |s| {
                        Duration::from_secs(s.max(1))
                    }),
                restart_exit_code: a
                    .restart_exit_code
                    .unwrap_or(install::DEFAULT_RESTART_EXIT_CODE),
                reexec: a.reexec_on_restart,
            }),
            command_timeout: a
                .command_timeout
                .map_or(install::DEFAULT_COMMAND_TIMEOUT, |s| {
                    Duration::from_secs(s.max(1))
                }),
            status_file: a.status_file.clone(),
            max_storage: size(&a.max_storage, "max-storage")?,
            exit_when_done: a.exit_when_done,
            admission: AdmissionLimits {
                max_connections: usize::MAX,
                max_handshakes: a.max_handshakes.unwrap_or(DEFAULT_MAX_HANDSHAKES),
                max_handshakes_per_address: a
                    .max_handshakes_per_address
                    .unwrap_or(DEFAULT_MAX_HANDSHAKES_PER_ADDRESS),
                handshake_timeout: a
                    .handshake_timeout
                    .map_or(admission::DEFAULT_HANDSHAKE_TIMEOUT, |s| {
                        Duration::from_secs(s.max(1))
                    }),
            },
            peer_stall: match a.peer_stall_timeout_secs {
                None => PEER_STALL_TIMEOUT,
                Some(0) => return Err(config_err("--peer-stall-timeout-secs must be at least 1")),
                Some(n) => Duration::from_secs(n),
            },
        })
    }
}

/// Frames of one connection read but not handled yet, plus frames queued for it; its
/// reader waits while there are too many (see [`PEER_WINDOW`]).
#[derive(Debug, Default)]
struct Backlog {
    frames: AtomicUsize,
    drained: Notify,
}

impl Backlog {
    /// One more frame waiting.
    fn add(&self) {
        self.frames.fetch_add(1, Ordering::AcqRel);
    }

    /// One frame handled or written.
    fn done(&self) {
        let _ = self
            .frames
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.drained.notify_one();
    }

    /// Frames waiting now.
    fn len(&self) -> usize {
        self.frames.load(Ordering::Acquire)
    }

    /// Returns once fewer than `limit` frames wait (the one reader calls it).
    async fn below(&self, limit: usize) {
        // Bounded by the connection's life: the caller selects this against its writer.
        loop {
            if self.len() < limit {
                return;
            }
            self.drained.notified().await;
        }
    }
}

/// A frame for a connection's writer; `counted` when it is in the peer's [`Backlog`].
type Outbound = (Vec<u8>, bool);

/// Where the central task puts frames for one connection.
struct Outgoing {
    tx: mpsc::UnboundedSender<Outbound>,
    /// For peers only: the manager session is trusted and never held back.
    backlog: Option<Arc<Backlog>>,
}

/// The warning about frames refused from peers or the manager, spaced.
static REFUSED_FRAMES: SpacedLog = SpacedLog::new(super::spaced::WARN_EVERY);
/// The error that the manager refused this agent (with its reason), spaced.
static NOT_ACCEPTED: SpacedLog = SpacedLog::new(super::spaced::WARN_EVERY);
/// The warning about trust documents refused (with the reason), spaced.
static TRUST_REFUSED: SpacedLog = SpacedLog::new(super::spaced::WARN_EVERY);
/// The error about records (trust anchor, versions) not read or written, spaced.
static RECORD_FAILED: SpacedLog = SpacedLog::new(super::spaced::WARN_EVERY);
/// Peers refused for a revoked or expired certificate.
static PEER_CERT_REFUSED: SpacedLog = SpacedLog::new(super::spaced::WARN_EVERY);
/// The warning about peers dropped for their backlog, spaced.
static BACKLOG_DROPS: SpacedLog = SpacedLog::new(super::spaced::WARN_EVERY);

/// Logs `conn` dropped with `backlog` answers queued (spaced, see [`BACKLOG_DROPS`]).
fn dropped_for_backlog(conn: ConnId, backlog: usize) {
    if let Some(also_dropped) = BACKLOG_DROPS.due() {
        tracing::warn!(
            ?conn,
            backlog,
            max = PEER_QUEUE_MAX,
            also_dropped,
            "peer dropped: it does not read what it asked for"
        );
    }
}

/// Queues `frame` for `conn`; an answer to a peer whose backlog is over [`PEER_QUEUE_MAX`]
/// disconnects it instead (its entry removed, so its writer ends).
fn queue_frame(conns: &mut HashMap<ConnId, Outgoing>, conn: ConnId, frame: Vec<u8>) {
    let Some(out) = conns.get(&conn) else { return };
    let mut counted = false;
    if let Some(b) = &out.backlog
        && !matches!(Message::decode(&frame), Ok(Message::ChunkRequest { .. }))
    {
        if b.len() >= PEER_QUEUE_MAX {
            dropped_for_backlog(conn, b.len());
            conns.remove(&conn);
            return;
        }
        b.add();
        counted = true;
    }
    let _ = out.tx.send((frame, counted));
}

/// What connection tasks tell the central task.
enum Input {
    ManagerUp {
        tx: mpsc::UnboundedSender<Outbound>,
        local: SocketAddr,
    },
    PeerUp {
        conn: ConnId,
        info: PeerInfo,
        tx: mpsc::UnboundedSender<Outbound>,
        backlog: Arc<Backlog>,
    },
    ConnectFailed(AgentId),
    Frame(ConnId, Vec<u8>),
    Closed(ConnId),
    Datagram(SocketAddr, Vec<u8>),
}

/// Shared by the connection tasks.
#[derive(Clone)]
struct Shared {
    identity: Identity,
    id: AgentId,
    manager_key: PublicKey,
    cert: Arc<RwLock<Option<AgentCert>>>,
    /// The manager's newest revocation list (peer handshakes are checked against it).
    revocations: Arc<RwLock<Option<RevocationList>>>,
    /// Peer handshakes refused for a revoked or expired certificate (both directions).
    peer_certs_refused: Arc<AtomicU64>,
    limits: Limits,
    inputs: mpsc::Sender<Input>,
    next_conn: Arc<AtomicU32>,
    /// How long a peer may take no byte before it is disconnected.
    peer_stall: Duration,
}

impl Shared {
    fn peer_hello(&self) -> Hello {
        let cert = self.cert.read().unwrap_or_else(|e| e.into_inner()).clone();
        Hello::new(Role::Agent, self.id.clone(), caps::ALL, cert)
    }

    fn conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Whether a peer's certificate, already verified as the manager's, may be used now
    /// (not revoked by the list held, not expired by this host's clock); a refusal is
    /// counted and logged (spaced).
    fn check_peer_cert(&self, cert: &AgentCert) -> Result<(), LinkError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        let list = self.revocations.read().unwrap_or_else(|e| e.into_inner());
        peer_cert_acceptable(cert, list.as_ref(), now).map_err(|why| {
            self.peer_certs_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(held_back) = PEER_CERT_REFUSED.due() {
                tracing::warn!(peer = %cert.id, serial = cert.serial, held_back, "peer refused: {why}");
            }
            LinkError::Refused(format!("{}: {why}", cert.id))
        })
    }
}

/// Moves frames between a link and the central task until either side stops.
///
/// With a `backlog` and a stall timeout (peers), the link is not read while
/// [`PEER_WINDOW`] frames wait, and a frame the other side takes no byte of for the stall
/// timeout ends the connection.
async fn pump<S>(
    link: Link<S>,
    conn: ConnId,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    inputs: mpsc::Sender<Input>,
    backlog: Option<(Arc<Backlog>, Duration)>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = link.split();
    let backlog = backlog.map(|(backlog, stall)| {
        writer.set_stall_timeout(stall);
        backlog
    });
    let written = backlog.clone();
    let mut writing = tokio::spawn(async move {
        while let Some((frame, counted)) = rx.recv().await {
            let sent = writer.send(&frame).await;
            if let (Some(b), true) = (&written, counted) {
                b.done();
            }
            match sent {
                Ok(()) => {}
                Err(e @ LinkError::Stalled(_)) => {
                    tracing::warn!(?conn, "peer dropped: {e}");
                    break;
                }
                Err(e) => {
                    tracing::debug!(?conn, "send failed: {e}");
                    break;
                }
            }
        }
        let _ = writer.close().await;
    });
    loop {
        tokio::select! {
            r = next_frame(&mut reader, backlog.as_deref()) => match r {
                Ok(frame) => {
                    if let Some(b) = &backlog {
                        b.add();
                    }
                    if inputs.send(Input::Frame(conn, frame.to_vec())).await.is_err() {
                        break;
                    }
                }
                Err(LinkError::Closed) => break,
                Err(e) => {
                    tracing::warn!(?conn, "connection dropped: {e}");
                    break;
                }
            },
            _ = &mut writing => break,
        }
    }
    writing.abort();
    let _ = inputs.send(Input::Closed(conn)).await;
}

/// The next frame of `reader`, once fewer than [`PEER_WINDOW`] frames wait in `backlog`.
async fn next_frame<'a, R: tokio::io::AsyncRead + Unpin>(
    reader: &'a mut link::LinkReader<R>,
    backlog: Option<&Backlog>,
) -> Result<&'a mut [u8], LinkError> {
    if let Some(b) = backlog {
        b.below(PEER_WINDOW).await;
    }
    reader.recv().await
}

async fn manager_session(
    shared: &Shared,
    addr: &str,
    token: &Option<heapless::String<MAX_TOKEN_LEN>>,
) -> Result<(Link<TcpStream>, SocketAddr), LinkError> {
    let stream = tokio::time::timeout(link::HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Timeout)??;
    stream.set_nodelay(true)?;
    keep_alive(&stream);
    let local = stream.local_addr()?;
    let mut hello = Hello::new(Role::Agent, shared.id.clone(), caps::ALL, None);
    if let Some(t) = token {
        // Enrolling: a self-signed certificate tells the manager our Ed25519 key (SPEC §2).
        let own = AgentCert::issue(
            &shared.identity,
            shared.id.clone(),
            shared.identity.public(),
        );
        hello =
            Hello::new(Role::Agent, shared.id.clone(), caps::ALL, Some(own)).with_token(t.clone());
    }
    let link = link::connect(
        stream,
        &shared.identity,
        &shared.manager_key,
        hello,
        &shared.limits,
    )
    .await?;
    Ok((link, local))
}

/// Idle time before the manager connection's first TCP keepalive probe.
const MANAGER_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Time between unanswered keepalive probes (the kernel's count, 9 on Linux, ends it).
const MANAGER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// TCP keepalives on the manager connection: a manager host that died without closing it
/// (power lost, network cut) is noticed within about 5 + 9 × 2 = 23 s of silence, and the
/// next manager address is tried. (A manager process that is frozen on a live host is not:
/// its kernel answers; it finds its lease lost when it runs again and closes the session.)
fn keep_alive(stream: &TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(MANAGER_KEEPALIVE_IDLE)
        .with_interval(MANAGER_KEEPALIVE_INTERVAL);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::debug!("cannot set TCP keepalives on the manager connection: {e}");
    }
}

/// First wait before reconnecting to the manager (doubling up to [`MANAGER_BACKOFF_MAX`]).
const MANAGER_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait before reconnecting: a manager back from a restart sees its agents again within
/// this long (its resumed jobs wait for them), and a fleet of 100 000 retries about 12 500 times
/// a second while it is down, spread by the jitter.
const MANAGER_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Longest wait between two rounds of several manager addresses (an active manager and its
/// standbys): a standby that took over is found within this long of opening its agent port.
/// A refused connection costs a manager host nothing but its kernel's reset.
const MANAGER_LIST_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Most addresses `--manager` may name (an active manager and its standbys); more is a
/// configuration error rather than a long round of connection attempts.
pub const MAX_MANAGER_ADDRESSES: usize = 16;

/// The manager addresses of `--manager`: a comma-separated list (one address: one manager),
/// blanks and repeats ignored, in the order given.
fn manager_addresses(list: &str) -> Vec<String> {
    let mut addrs: Vec<String> = Vec::new();
    for addr in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        if !addrs.iter().any(|seen| seen == addr) {
            addrs.push(addr.to_string());
        }
    }
    addrs
}

/// Whether a failed attempt found no manager there at all (nothing listening, no answer in
/// time: a standby, or a dead or frozen host), so the next address is tried at once; other
/// outcomes (a session that ended, a manager that refused us) wait the backoff first.
fn nobody_there(e: &LinkError) -> bool {
    use std::io::ErrorKind;
    match e {
        LinkError::Timeout => true,
        LinkError::Io(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::TimedOut
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::AddrNotAvailable
        ),
        _ => false,
    }
}

/// Keeps a session with the manager, reconnecting with backoff (each wait drawn between half
/// and all of the current backoff, so a fleet that lost its manager together does not come
/// back in lockstep). With several addresses (an active manager and its standbys) each is
/// tried in turn: the next one at once when nobody answered at this one ([`nobody_there`]:
/// refused, timed out), after the backoff when a session ended or a manager refused us; the
/// backoff is also waited after a whole round, at most [`MANAGER_LIST_BACKOFF_MAX`].
async fn manager_loop(
    shared: Shared,
    list: String,
    token: Option<heapless::String<MAX_TOKEN_LEN>>,
) {
    let addrs = manager_addresses(&list);
    let Some(first) = addrs.first().cloned() else {
        tracing::error!(manager = %list, "--manager names no address");
        return;
    };
    let most = if addrs.len() > 1 {
        MANAGER_LIST_BACKOFF_MAX
    } else {
        MANAGER_BACKOFF_MAX
    };
    let mut backoff = MANAGER_BACKOFF_MIN;
    let mut next = 0;
    loop {
        let addr = addrs.get(next).unwrap_or(&first);
        let started = Instant::now();
        let mut at_once = false;
        match manager_session(&shared, addr, &token).await {
            Ok((link, local)) => {
                tracing::info!(%addr, "connected to the manager");
                let (tx, rx) = mpsc::unbounded_channel();
                if shared
                    .inputs
                    .send(Input::ManagerUp { tx, local })
                    .await
                    .is_err()
                {
                    return;
                }
                pump(link, ConnId::MANAGER, rx, shared.inputs.clone(), None).await;
                tracing::warn!(%addr, "manager session ended");
            }
            Err(e) => {
                at_once = nobody_there(&e);
                tracing::warn!(%addr, "manager unreachable: {e}");
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = MANAGER_BACKOFF_MIN;
        }
        next = (next + 1) % addrs.len();
        if next == 0 || !at_once {
            let jitter: f64 = rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(most);
        }
    }
}

/// Accepts peers that show a certificate from the manager, within the listener's caps
/// ([`Admission`]: connections beyond one are closed at once).
async fn accept_loop(shared: Shared, listener: TcpListener, admission: Arc<Admission>) {
    loop {
        let (stream, from, mut admitted) = admission.accept(&listener).await;
        let shared = shared.clone();
        let timeout = admission.limits().handshake_timeout;
        let admission = admission.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let manager = shared.manager_key;
            let handshake = link::accept(
                stream,
                &shared.identity,
                shared.peer_hello(),
                &shared.limits,
                |hs| {
                    hs.verify_peer_cert(&manager)?;
                    if let Some(cert) = hs.remote_hello().and_then(|h| h.cert.as_ref()) {
                        shared.check_peer_cert(cert)?;
                    }
                    Ok(hs.remote_hello().map(|h| h.id.clone()))
                },
            );
            let res = tokio::time::timeout(timeout, handshake)
                .await
                .unwrap_or(Err(LinkError::Timeout));
            if res.is_ok() {
                admitted.authenticated();
            }
            match res {
                Ok((link, Some(id))) => {
                    let conn = shared.conn_id();
                    let info = PeerInfo {
                        id,
                        direction: Direction::Incoming,
                    };
                    peer_up(&shared, link, conn, info).await;
                }
                Ok((_, None)) => {}
                // Anyone can fail a handshake: one warning per few seconds, the rest at debug.
                Err(e) => match admission.handshake_failed() {
                    Some(unlogged) => tracing::warn!(
                        %from,
                        "peer refused: {e} ({unlogged} more refused since the last such line)"
                    ),
                    None => tracing::debug!(%from, "peer refused: {e}"),
                },
            }
            drop(admitted);
        });
    }
}

/// Tells the central task of an authenticated peer, then moves its frames until it ends.
async fn peer_up(shared: &Shared, link: Link<TcpStream>, conn: ConnId, info: PeerInfo) {
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let up = Input::PeerUp {
        conn,
        info,
        tx,
        backlog: backlog.clone(),
    };
    if shared.inputs.send(up).await.is_ok() {
        let backlog = Some((backlog, shared.peer_stall));
        pump(link, conn, rx, shared.inputs.clone(), backlog).await;
    }
}

/// Connects to a peer source named by the manager.
async fn connect_peer(shared: Shared, peer: AgentId, addr: PeerAddr, key: PublicKey) {
    let addr = SocketAddr::from(addr);
    let attempt = async {
        let stream = tokio::time::timeout(link::HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| LinkError::Timeout)??;
        stream.set_nodelay(true)?;
        let link = link::connect(
            stream,
            &shared.identity,
            &key,
            shared.peer_hello(),
            &shared.limits,
        )
        .await?;
        if link.remote.id != peer {
            return Err(LinkError::Refused(format!(
                "peer at {addr} says it is {}",
                link.remote.id
            )));
        }
        // The manager named its key; its certificate must still be good too.
        match &link.remote.cert {
            Some(cert) if cert.id == peer && cert.key == key => {
                if cert.verify(&shared.manager_key).is_err() {
                    return Err(LinkError::Refused(format!(
                        "peer {peer}'s certificate is not the manager's"
                    )));
                }
                shared.check_peer_cert(cert)?;
            }
            _ => {
                return Err(LinkError::Refused(format!(
                    "peer {peer} shows no certificate of its own"
                )));
            }
        }
        Ok(link)
    };
    match attempt.await {
        Ok(link) => {
            let conn = shared.conn_id();
            let info = PeerInfo {
                id: peer,
                direction: Direction::Outgoing,
            };
            peer_up(&shared, link, conn, info).await;
        }
        Err(e) => {
            tracing::warn!(%peer, %addr, "cannot reach peer: {e}");
            let _ = shared.inputs.send(Input::ConnectFailed(peer)).await;
        }
    }
}

/// The status file's view of one job.
#[derive(Clone, Debug, serde::Serialize, PartialEq)]
struct JobJson {
    job: u64,
    epoch: u32,
    name: String,
    version: u64,
    root: String,
    state: String,
    chunks: u32,
    verified: u32,
    resumed: u32,
    fetched: u32,
    bad_chunks: u32,
    bytes_received: u64,
    bytes_served: u64,
    /// When the first chunk of the job fetched from the network was verified, Unix ms
    /// (`null`: none yet); with the push's time it gives the job's start-up latency.
    first_chunk_unix_ms: Option<u64>,
}

impl JobJson {
    /// An entry for `job` with nothing known yet.
    fn new(job: JobRef) -> Self {
        JobJson {
            job: job.id,
            epoch: job.epoch,
            name: String::new(),
            version: 0,
            root: String::new(),
            state: String::new(),
            chunks: 0,
            verified: 0,
            resumed: 0,
            fetched: 0,
            bad_chunks: 0,
            bytes_received: 0,
            bytes_served: 0,
            first_chunk_unix_ms: None,
        }
    }
}

#[derive(Debug, serde::Serialize, PartialEq)]
struct StatusJson<'a> {
    id: &'a str,
    manager_connected: bool,
    listen: Option<String>,
    wire_bytes_sent: u64,
    wire_bytes_received: u64,
    jobs: Vec<&'a JobJson>,
    /// `null` when discovery is off.
    segment: Option<SegmentJson>,
    /// This agent's certificate from the manager (`null` before the first `Welcome`).
    certificate: Option<CertJson>,
    /// The version of the manager's revocation list held (`null`: none yet).
    revocation_list: Option<u64>,
    /// Peer handshakes refused for a revoked or expired certificate since start.
    peer_certs_refused: u64,
    /// When this process started, Unix ms.
    started_unix_ms: u64,
    /// When the manager first welcomed this process, Unix ms (`null`: not yet).
    welcomed_unix_ms: Option<u64>,
}

/// The status file's view of this agent's certificate.
#[derive(Debug, serde::Serialize, PartialEq)]
struct CertJson {
    serial: u64,
    /// Unix seconds (0: never).
    not_after: u64,
    segment: String,
    /// The certificate's postcard encoding, hex (what peers are shown).
    encoded: String,
}

impl CertJson {
    fn of(cert: &AgentCert) -> CertJson {
        CertJson {
            serial: cert.serial,
            not_after: cert.not_after,
            segment: cert.segment.to_string(),
            encoded: {
                let mut buf = [0u8; 512];
                postcard::to_slice(cert, &mut buf)
                    .map(hex::encode)
                    .unwrap_or_default()
            },
        }
    }
}

/// The status file's view of the segment (contract C2).
#[derive(Debug, serde::Serialize, PartialEq)]
struct SegmentJson {
    name: String,
    leader: Option<String>,
    is_leader: bool,
    members: usize,
    term: u32,
    score: u32,
}

impl SegmentJson {
    fn of(seg: &Segment) -> SegmentJson {
        SegmentJson {
            name: seg.config().segment.to_string(),
            leader: seg.leader().map(|l| l.to_string()),
            is_leader: seg.is_leader(),
            members: seg.member_count(),
            term: seg.term(),
            score: seg.score(),
        }
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn state_name(s: JobState) -> std::borrow::Cow<'static, str> {
    match s {
        JobState::Fetching => "fetching".into(),
        JobState::Complete => "complete".into(),
        JobState::Failed(r) => format!("failed: {r:?}").into(),
    }
}

/// Replaces `path` with `text` (a temporary file renamed into place), mode 0600.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    open_private(
        std::fs::OpenOptions::new().write(true).create(true),
        &tmp,
        Existing::Empty,
    )?
    .write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path)
}

/// The file name content `name` at `version` is exported under in the data directory:
/// only `[A-Za-z0-9._-]` of the name kept (anything else, and a leading `.`, becomes `_`),
/// so no name can lead out of the export directory.
fn export_file_name(name: &str, version: u64) -> String {
    let safe: String = name
        .chars()
        .enumerate()
        .map(|(i, c)| match c {
            '.' if i == 0 => '_',
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect();
    format!("{safe}-{version}")
}

/// What to do with completed content: export it, run the completion command, install it.
struct Completion {
    slot: PathBuf,
    export_to: PathBuf,
    on_complete: Option<String>,
    job: JobRef,
    name: String,
    version: u64,
    /// The install settings and the data directory, with `--install`.
    install: Option<(InstallSettings, PathBuf)>,
    command_timeout: Duration,
}

/// Exports completed content, runs the completion command, then installs it (each command
/// through the one runner, [`run_hook`]).
async fn complete(c: Completion, updates: mpsc::Sender<InstallUpdate>) {
    let out = c.export_to.clone();
    let slot = c.slot.clone();
    let res = tokio::task::spawn_blocking(move || export(&slot, &out)).await;
    let failed = match res {
        Ok(Ok(bytes)) => {
            tracing::info!(path = %c.export_to.display(), bytes, "content exported");
            None
        }
        Ok(Err(e)) => Some(format!("export failed: {e}")),
        Err(e) => Some(format!("export task failed: {e}")),
    };
    let target = InstallTarget {
        job: c.job.id,
        epoch: c.job.epoch,
        name: c.name.clone(),
        version: c.version,
        path: c.export_to.clone(),
        rolling_back: false,
    };
    if let Some(why) = failed {
        tracing::error!("{why}");
        if c.install.is_some() {
            let _ = updates
                .send(InstallUpdate {
                    job: c.job,
                    name: c.name,
                    version: c.version,
                    state: baton_protocol::message::InstallState::Failed,
                    exit_code: None,
                    output: why,
                    reexec: false,
                })
                .await;
        }
        return;
    }
    if let Some(cmd) = &c.on_complete {
        let env = [
            ("BATON_CONTENT", c.export_to.display().to_string()),
            ("BATON_NAME", c.name.clone()),
            ("BATON_VERSION", c.version.to_string()),
        ];
        let r = run_hook(cmd, &env, c.command_timeout).await;
        match r.exit_code {
            Some(0) => tracing::info!(%cmd, "on-complete command succeeded"),
            code => tracing::warn!(%cmd, ?code, output = %r.tail, "on-complete command failed"),
        }
    }
    if let Some((settings, data_dir)) = &c.install {
        install::install(settings, data_dir, target, &updates).await;
    }
}

/// The install updates of recent jobs, kept to be sent on the manager session (again after
/// a reconnection if they were made while it was down).
#[derive(Debug, Default)]
struct InstallReports {
    /// The latest update per job, and whether it was handed to a live session.
    latest: BTreeMap<u64, (InstallUpdate, bool)>,
}

/// Jobs whose latest install update is kept (the oldest are dropped beyond).
const KEPT_INSTALL_REPORTS: usize = 16;

impl InstallReports {
    /// Keeps `u` as its job's latest; returns whether it was sent (the session is up).
    fn note(&mut self, u: InstallUpdate, conns: &HashMap<ConnId, Outgoing>, up: bool) -> bool {
        let sent = up && send_install(conns, &u);
        self.latest.insert(u.job.id, (u, sent));
        while self.latest.len() > KEPT_INSTALL_REPORTS {
            self.latest.pop_first();
        }
        sent
    }

    /// After a `Welcome`: sends every kept latest update again (at most
    /// [`KEPT_INSTALL_REPORTS`]): one handed to a session that then dropped may never have
    /// reached the manager, which ignores a state it already has.
    fn resend(&mut self, conns: &HashMap<ConnId, Outgoing>) {
        for (u, sent) in self.latest.values_mut() {
            *sent = send_install(conns, u);
        }
    }
}

/// Sends an install update on the manager session; whether it was handed to it.
fn send_install(conns: &HashMap<ConnId, Outgoing>, u: &InstallUpdate) -> bool {
    let Some(out) = conns.get(&ConnId::MANAGER) else {
        return false;
    };
    let Ok(name) = heapless::String::try_from(u.name.as_str()) else {
        return false;
    };
    let msg = Message::InstallStatus {
        job: u.job,
        name,
        version: u.version,
        state: u.state,
        exit_code: u.exit_code,
        output: install::last_bytes(&u.output, baton_protocol::message::MAX_INSTALL_OUTPUT),
    };
    out.tx.send((msg.to_vec(), false)).is_ok()
}

/// The `Running` message: whether this agent installs, and what runs on it (the versions
/// installed, and its own binary's version if `BATON_AGENT_VERSION` is set). Sent in every
/// session, also without `--install`, so the manager never keeps an older session's word.
fn running_message(s: &Settings) -> Message<'static> {
    let own = std::env::var(AGENT_VERSION_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut versions: heapless::Vec<_, { baton_protocol::message::MAX_RUNNING }> =
        heapless::Vec::new();
    if let Some(v) = own
        && let Ok(name) = heapless::String::try_from(AGENT_CONTENT_NAME)
    {
        let _ = versions.push(baton_protocol::message::RunningVersion { name, version: v });
    }
    for (name, version) in install::running_versions(&s.data_dir) {
        if name == AGENT_CONTENT_NAME && own.is_some() {
            continue;
        }
        if let Ok(name) = heapless::String::try_from(name.as_str()) {
            let _ = versions.push(baton_protocol::message::RunningVersion { name, version });
        }
    }
    Message::Running {
        install_step: s.install.is_some(),
        versions,
    }
}

/// The environment variable that names this agent binary's own version (a number), reported
/// as running under [`AGENT_CONTENT_NAME`]: a self-update's launcher sets it.
pub const AGENT_VERSION_ENV: &str = "BATON_AGENT_VERSION";
/// The content name the agent's own version is reported under.
pub const AGENT_CONTENT_NAME: &str = "baton-agent";

/// Replaces this process with `exe` and the same arguments (a restart-pending self-update;
/// no supervisor needed). Returns only if that failed.
fn reexec(exe: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    tracing::info!(exe = %exe.display(), "re-executing the agent for a pending install");
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec()
}

/// Runs the Linux agent until `--exit-when-done` is satisfied or the process is interrupted.
pub async fn run(args: AgentArgs) -> Result<(), AgentRunError> {
    let started_unix_ms = unix_micros() / 1000;
    let args = args.resolve().map_err(AgentRunError::Config)?;
    let data_dir = args
        .data_dir
        .clone()
        .ok_or_else(|| config_err("--data-dir is required"))?;
    // Held until `run` returns: a second agent on this directory stops here.
    let _data_dir = match DataDir::open(&data_dir) {
        Ok(held) => Some(held),
        // `--print-key` beside the agent running on this directory only reads its key.
        Err(DataDirError::InUse { .. }) if args.print_key => None,
        Err(e) => return Err(e.into()),
    };
    let identity = if _data_dir.is_some() {
        load_or_create_identity(&data_dir)?
    } else {
        // The running agent creates the key; reading only, never racing it.
        load_identity(&data_dir, false)?.ok_or_else(|| {
            config_err(format!(
                "the agent running on {} has not written its key yet; try again in a moment",
                data_dir.display()
            ))
        })?
    };
    if args.print_key {
        println!("{}", hex::encode(identity.public().0));
        return Ok(());
    }
    let s = Settings::from_args(&args)?;
    let descriptors = admission::raise_descriptor_limit();
    let peer_caps = AdmissionLimits {
        max_connections: admission::connection_cap(descriptors.soft, admission::DESCRIPTOR_RESERVE),
        ..s.admission
    }
    .checked();
    admission::log_caps(
        "peer listener",
        &peer_caps,
        descriptors.soft,
        admission::DESCRIPTOR_RESERVE,
        "",
    );
    let store = DirStore::open(
        &s.data_dir.join("content"),
        &s.data_dir.join("records"),
        s.max_storage,
    )?;
    let listener = TcpListener::bind(&s.listen)
        .await
        .map_err(|source| AgentRunError::Listen {
            addr: s.listen.clone(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AgentRunError::Listen {
            addr: s.listen.clone(),
            source,
        })?;
    tracing::info!(id = %s.config.id, %bound, key = %hex::encode(identity.public().0), "agent starting");
    if s.config.roots.is_empty() {
        tracing::warn!(
            "no root key pinned: this agent refuses every manifest (NoTrust) until started with --root-key HEX (root-key in the config file), the key that signs the trust document (`baton trust show`)"
        );
    } else {
        tracing::info!(
            roots = s.config.roots.len(),
            threshold = s.config.root_threshold,
            "root keys pinned"
        );
    }

    let limits = Limits {
        up: s.up.map(|b| Arc::new(RateLimiter::new(b))),
        down: s.down.map(|b| Arc::new(RateLimiter::new(b))),
        ..Limits::default()
    };
    let (inputs, mut in_rx) = mpsc::channel::<Input>(1024);
    let sockets = match &s.discovery {
        Some(d) => Some(
            DiscoverySockets::bind(d.port, d.broadcast).map_err(|source| {
                AgentRunError::Listen {
                    addr: format!("udp 0.0.0.0:{}", d.port),
                    source,
                }
            })?,
        ),
        None => None,
    };
    let mut segment: Option<Segment> = s.discovery.as_ref().map(|d| {
        let mut config = SegmentConfig::new(s.config.id.clone(), s.config.segment.clone());
        config.beacon_interval = d.beacon_interval;
        config.leader_timeout = d.leader_timeout;
        Segment::new(config, identity.clone(), s.manager_key)
    });
    let shared = Shared {
        identity,
        id: s.config.id.clone(),
        manager_key: s.manager_key,
        cert: Arc::new(RwLock::new(None)),
        revocations: Arc::new(RwLock::new(None)),
        peer_certs_refused: Arc::new(AtomicU64::new(0)),
        limits: limits.clone(),
        inputs,
        next_conn: Arc::new(AtomicU32::new(1)),
        peer_stall: s.peer_stall,
    };
    let mut agent: LinuxAgent = Agent::new(s.config.clone(), store);
    if let Some(a) = s.advertise {
        agent.set_listen(Some(a.into()));
    } else if !bound.ip().is_unspecified() {
        agent.set_listen(Some(bound.into()));
    }
    let mut tasks = JoinSet::new();
    if let Some(sockets) = &sockets {
        sockets.spawn_readers(shared.inputs.clone(), Input::Datagram, &mut tasks);
        tracing::info!(port = %sockets.broadcast.port(), broadcast = %sockets.broadcast, "segment discovery on");
    }
    let mut datagram = vec![0u8; baton_protocol::discovery::MAX_DATAGRAM];
    tasks.spawn(accept_loop(
        shared.clone(),
        listener,
        Admission::new("peer listener", peer_caps),
    ));
    tasks.spawn(manager_loop(
        shared.clone(),
        s.manager.clone(),
        s.token.clone(),
    ));

    // The path this agent was started as: a restart-pending self-update re-executes it.
    let own_exe = args.agent_exe.clone().or_else(|| {
        std::env::args_os()
            .next()
            .map(PathBuf::from)
            .filter(|p| p.components().count() > 1)
            .map(|p| std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p))
            .or_else(|| std::env::current_exe().ok())
    });
    let (install_tx, mut install_rx) = mpsc::channel::<InstallUpdate>(64);
    let mut reports = InstallReports::default();
    // Welcomed on the current manager session: install reports may go out.
    let mut welcomed = false;
    // A new manager session's first report is yet to go out (`Running` follows it).
    let mut running_due = false;
    let origin = Instant::now();
    let mut conns: HashMap<ConnId, Outgoing> = HashMap::new();
    let mut buf = vec![0u8; (s.config.max_chunk as usize + CHUNK_OVERHEAD + 64).min(MAX_FRAME)];
    let mut pending = JoinSet::new();
    if let Some(settings) = s.install.clone() {
        // An install that waited for this restart is checked and reported first.
        let (data_dir, updates) = (s.data_dir.clone(), install_tx.clone());
        pending.spawn(async move {
            install::resume_pending(&settings, &data_dir, &updates).await;
        });
    }
    let mut exiting = false;
    let mut jobs_json: BTreeMap<u64, JobJson> = BTreeMap::new();
    let mut welcomed_unix_ms: Option<u64> = None;
    let mut last_status = String::new();
    // The status file is refreshed on the tick (and at exit), not on every event:
    // serialising it per frame would cost more CPU than the transfer itself.
    let mut status_due = true;
    let mut status_tick = tokio::time::interval(Duration::from_millis(200));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Without configured caps the agent reports what it measures (see `meter`).
    let mut meter = LinkMeter::new(
        Instant::now().into_std(),
        limits.sent.load(Ordering::Relaxed),
        limits.received.load(Ordering::Relaxed),
    );
    let mut meter_tick = tokio::time::interval(Duration::from_secs(2));
    meter_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let deadline = agent.poll_timeout().map(|d| origin + d);
        let segment_deadline = segment
            .as_ref()
            .and_then(|seg| seg.poll_timeout())
            .map(|d| origin + d);
        tokio::select! {
            input = in_rx.recv() => {
                let Some(input) = input else { break };
                let now = origin.elapsed();
                agent.set_system_time(now, unix_micros() / 1_000_000);
                match input {
                    Input::ManagerUp { tx, local } => {
                        conns.insert(ConnId::MANAGER, Outgoing { tx, backlog: None });
                        welcomed = false;
                        running_due = true;
                        if s.advertise.is_none() && bound.ip().is_unspecified() {
                            agent.set_listen(Some(SocketAddr::new(local.ip(), bound.port()).into()));
                        }
                        agent.handle_manager_connected(now);
                    }
                    Input::PeerUp { conn, info, tx, backlog } => {
                        conns.insert(conn, Outgoing { tx, backlog: Some(backlog) });
                        if let Err(e) = agent.handle_connected(now, conn, info) {
                            tracing::warn!(?conn, "peer connection refused: {e}");
                            conns.remove(&conn);
                        }
                    }
                    Input::ConnectFailed(peer) => agent.handle_connect_failed(now, &peer),
                    Input::Frame(conn, frame) => {
                        if let Some(b) = conns.get(&conn).and_then(|o| o.backlog.as_ref()) {
                            b.done();
                        }
                        if conn == ConnId::MANAGER
                            && let Ok(Message::NotAccepted { reason }) = Message::decode(&frame)
                        {
                            // The manager refused this agent: say why; its loop tries again.
                            match NOT_ACCEPTED.due() {
                                Some(held_back) => tracing::error!(
                                    held_back,
                                    "the manager refused this agent: {reason}"
                                ),
                                None => tracing::debug!("the manager refused this agent: {reason}"),
                            }
                            conns.remove(&conn);
                        } else if let Err(e) = agent.handle_frame(now, conn, &frame) {
                            if let Some(held_back) = REFUSED_FRAMES.due() {
                                tracing::warn!(?conn, held_back, "refused frame: {e}");
                            }
                            if e.must_close() {
                                // Dropping the sender ends the connection; the manager
                                // session is then re-established by its loop.
                                conns.remove(&conn);
                            }
                        }
                    }
                    Input::Datagram(from, bytes) => {
                        if let Some(seg) = segment.as_mut()
                            && let Err(e) = seg.handle_datagram(now, from, &bytes)
                        {
                            tracing::debug!(%from, "discovery datagram dropped: {e}");
                        }
                    }
                    Input::Closed(conn) => {
                        if conn == ConnId::MANAGER {
                            welcomed = false;
                        }
                        conns.remove(&conn);
                        agent.handle_disconnected(now, conn);
                    }
                }
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => {
                let now = origin.elapsed();
                agent.set_system_time(now, unix_micros() / 1_000_000);
                agent.handle_timeout(now);
            }
            _ = async { tokio::time::sleep_until(segment_deadline.unwrap_or_else(Instant::now)).await }, if segment_deadline.is_some() => {
                if let Some(seg) = segment.as_mut() {
                    seg.handle_timeout(origin.elapsed());
                }
            }
            _ = status_tick.tick() => status_due = true,
            _ = meter_tick.tick(), if s.up.is_none() || s.down.is_none() => {
                let measured = meter.sample(
                    Instant::now().into_std(),
                    limits.sent.load(Ordering::Relaxed),
                    limits.received.load(Ordering::Relaxed),
                );
                if let Some((up, down)) = measured {
                    let mut link = agent.config().link;
                    if s.up.is_none() {
                        link.up_bps = up;
                    }
                    if s.down.is_none() {
                        link.down_bps = down;
                    }
                    tracing::debug!(up, down, "measured link");
                    agent.set_link(link);
                }
            }
            Some(_) = pending.join_next(), if !pending.is_empty() => {}
            Some(update) = install_rx.recv() => {
                let restart = update.reexec;
                let sent = reports.note(update, &conns, welcomed);
                if restart {
                    if let Some(exe) = &own_exe {
                        if sent {
                            // Let the writer hand the report to the manager first.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let e = reexec(exe);
                        tracing::error!(exe = %exe.display(), "cannot re-execute the agent: {e}; restart it to finish the install");
                    } else {
                        tracing::error!("cannot tell this agent's executable; restart it to finish the install");
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted");
                break;
            }
        }
        let now = origin.elapsed();
        while let Some(t) = agent.poll_transmit(now, &mut buf) {
            // The session's first report (variant 0) is followed at once by `Running`, before
            // any `Have` the agent repeats: the manager must know first that it installs.
            let first_report =
                running_due && t.conn == ConnId::MANAGER && buf[..t.len].first() == Some(&0);
            queue_frame(&mut conns, t.conn, buf[..t.len].to_vec());
            if first_report {
                running_due = false;
                if let Some(out) = conns.get(&ConnId::MANAGER) {
                    let _ = out.tx.send((running_message(&s).to_vec(), false));
                }
            }
        }
        while let Some(ev) = agent.poll_event() {
            // Job events are rare: take the jobs' snapshot at each, so a short job is not missed.
            status_due = true;
            match ev {
                Event::Connect { peer, addr, key } => {
                    tokio::spawn(connect_peer(shared.clone(), peer, addr, key));
                }
                Event::Close { conn } => {
                    conns.remove(&conn);
                }
                Event::Welcomed => {
                    *shared.cert.write().unwrap_or_else(|e| e.into_inner()) = agent.cert().cloned();
                    tracing::info!("welcomed by the manager");
                    welcomed_unix_ms.get_or_insert(unix_micros() / 1000);
                    welcomed = true;
                    // The install reports the manager may have missed (`Running` went out
                    // right after the session's first report).
                    while let Some(t) = agent.poll_transmit(now, &mut buf) {
                        queue_frame(&mut conns, t.conn, buf[..t.len].to_vec());
                    }
                    reports.resend(&conns);
                    if let (Some(seg), Some(cert), Some(manager_ms)) =
                        (segment.as_mut(), agent.cert(), agent.manager_unix_ms(now))
                    {
                        if cert.segment != s.config.segment {
                            tracing::warn!(configured = %s.config.segment, certified = %cert.segment, "the manager places this agent in another segment: peers ignore its discovery datagrams until the configuration or the administrator's placement changes");
                        }
                        seg.set_capabilities(now, agent.capabilities());
                        seg.start(now, cert.clone(), unix_micros(), manager_ms);
                        // A new manager session: the leader tells the manager again.
                        seg.request_report();
                    }
                }
                Event::JobStarted {
                    job,
                    root,
                    chunks,
                    resumed,
                } => {
                    tracing::info!(job = job.id, epoch = job.epoch, root = %hex::encode(root), chunks, resumed, "job started");
                }
                Event::JobComplete { job, root } => {
                    tracing::info!(job = job.id, root = %hex::encode(root), "content complete");
                    let manifest = agent.store().manifest(&root).cloned();
                    if let Some(m) = manifest
                        && (s.export.is_some() || s.on_complete.is_some() || s.install.is_some())
                    {
                        let slot = agent.store().slot_path(&root);
                        let out = s.export.clone().unwrap_or_else(|| {
                            // Under the data directory: made owner-only like the rest of it.
                            let dir = s.data_dir.join("export");
                            if let Err(e) = ensure_private_dir(&dir) {
                                tracing::warn!("{e}");
                            }
                            dir.join(export_file_name(&m.name, m.version))
                        });
                        let completion = Completion {
                            slot,
                            export_to: out,
                            on_complete: s.on_complete.clone(),
                            job,
                            name: m.name.to_string(),
                            version: m.version,
                            install: s.install.clone().map(|i| (i, s.data_dir.clone())),
                            command_timeout: s.command_timeout,
                        };
                        pending.spawn(complete(completion, install_tx.clone()));
                    }
                }
                Event::JobDone { job, .. } => {
                    tracing::info!(job = job.id, "job done");
                    if let Some(j) = jobs_json.get_mut(&job.id) {
                        j.state = "done".into();
                    }
                    exiting |= s.exit_when_done;
                }
                Event::JobCancelled { job } => {
                    tracing::info!(job = job.id, "job cancelled");
                    if let Some(j) = jobs_json.get_mut(&job.id) {
                        j.state = "cancelled".into();
                    }
                }
                Event::JobFailed { job, reason } => {
                    if reason == FailReason::NoTrust && s.config.roots.is_empty() {
                        tracing::error!(
                            job = job.id,
                            ?reason,
                            "job failed: no root key pinned; start the agent with --root-key HEX (root-key in the config file) to accept content"
                        );
                    } else {
                        tracing::error!(job = job.id, ?reason, "job failed");
                    }
                    // A job that failed before its content slot opened (e.g. a full disk)
                    // is not among the agent's jobs: record it here so the status says so.
                    let entry = jobs_json.entry(job.id).or_insert_with(|| JobJson::new(job));
                    entry.state = state_name(JobState::Failed(reason)).into_owned();
                }
                Event::PeerTrouble { job, peer, trouble } => {
                    tracing::warn!(job = job.id, %peer, ?trouble, "peer trouble");
                }
                Event::Ignored { what } => tracing::debug!("ignored: {what}"),
                Event::TrustAccepted { version, newer } => {
                    tracing::info!(version, newer, "trust document accepted");
                }
                Event::TrustRefused { version, reason } => match TRUST_REFUSED.due() {
                    Some(held_back) => {
                        tracing::warn!(version, held_back, "trust document refused: {reason}")
                    }
                    None => tracing::debug!(version, "trust document refused: {reason}"),
                },
                Event::RecordFailed { what, error } => match RECORD_FAILED.due() {
                    Some(held_back) => tracing::error!(held_back, "{what} failed: {error}"),
                    None => tracing::debug!("{what} failed: {error}"),
                },
                Event::CertRenewed { serial, not_after } => {
                    tracing::info!(serial, not_after, "certificate renewed by the manager");
                    *shared.cert.write().unwrap_or_else(|e| e.into_inner()) = agent.cert().cloned();
                    if let (Some(seg), Some(cert)) = (segment.as_mut(), agent.cert()) {
                        seg.set_cert(now, cert.clone());
                    }
                }
                Event::Revocations { version, entries } => {
                    tracing::info!(version, entries, "revocation list from the manager");
                    let list = agent.revocations().cloned();
                    if let (Some(seg), Some(list)) = (segment.as_mut(), list.clone()) {
                        seg.set_revocations(now, list);
                    }
                    *shared
                        .revocations
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = list;
                }
            }
        }
        if let (Some(seg), Some(sockets)) = (segment.as_mut(), &sockets) {
            if status_due {
                // Capabilities and delays move slowly: exchange them on the status tick.
                seg.set_capabilities(now, agent.capabilities());
                let delays: heapless::Vec<_, MAX_DELAYS> = seg.peer_delays();
                agent.set_peer_delays(&delays);
                while let Some(t) = agent.poll_transmit(now, &mut buf) {
                    queue_frame(&mut conns, t.conn, buf[..t.len].to_vec());
                }
            }
            while let Some(out) = seg.poll_transmit(now, &mut datagram) {
                let to = match out.to {
                    Destination::Broadcast => sockets.broadcast,
                    Destination::Unicast(addr) => addr,
                };
                sockets.send(to, &datagram[..out.len]);
            }
            while let Some(page) = seg.poll_report(now) {
                match conns.get(&ConnId::MANAGER) {
                    Some(Outgoing { tx, .. }) if agent.manager_connected() => {
                        tracing::debug!(
                            term = page.term,
                            page = page.page,
                            pages = page.pages,
                            "segment report"
                        );
                        let _ = tx.send((Message::SegmentReport(page).to_vec(), false));
                    }
                    _ => tracing::debug!("segment report dropped: manager session down"),
                }
            }
            while let Some(ev) = seg.poll_event() {
                status_due = true;
                match ev {
                    SegmentEvent::LeaderChanged { leader, is_self } => {
                        tracing::info!(%leader, is_self, "segment leader changed");
                    }
                    SegmentEvent::MemberJoined { id } => {
                        tracing::info!(%id, "segment member joined")
                    }
                    SegmentEvent::MemberLeft { id } => tracing::info!(%id, "segment member left"),
                }
            }
        }
        // Keep the jobs' figures current (cheap: no allocation once a job is known), but
        // serialise and write the status file only on the tick, after events, and at exit.
        for j in agent.jobs() {
            let entry = jobs_json.entry(j.job.id).or_insert_with(|| JobJson {
                name: j.manifest.name.to_string(),
                version: j.manifest.version,
                root: hex::encode(j.manifest.root),
                ..JobJson::new(j.job)
            });
            entry.epoch = j.job.epoch;
            if entry.state != "done" && entry.state != "cancelled" {
                let state = state_name(j.state);
                if entry.state != *state {
                    entry.state = state.into_owned();
                }
            }
            entry.chunks = j.stats.chunks;
            entry.verified = j.stats.verified;
            entry.resumed = j.stats.resumed;
            if entry.fetched == 0 && j.stats.fetched > 0 {
                entry.first_chunk_unix_ms = Some(unix_micros() / 1000);
            }
            entry.fetched = j.stats.fetched;
            entry.bad_chunks = j.stats.bad_chunks;
            entry.bytes_received = j.stats.bytes_received;
            entry.bytes_served = j.stats.bytes_served;
        }
        let done = exiting && pending.is_empty();
        if !(status_due || done) {
            continue;
        }
        status_due = false;
        if let Some(path) = &s.status_file {
            let status = StatusJson {
                id: &s.config.id,
                manager_connected: agent.manager_connected(),
                listen: agent.config().listen.map(|a| a.to_string()),
                wire_bytes_sent: limits.sent.load(Ordering::Relaxed),
                wire_bytes_received: limits.received.load(Ordering::Relaxed),
                jobs: jobs_json.values().collect(),
                segment: segment.as_ref().map(SegmentJson::of),
                certificate: agent.cert().map(CertJson::of),
                revocation_list: agent.revocations().map(|l| l.version),
                peer_certs_refused: shared.peer_certs_refused.load(Ordering::Relaxed),
                started_unix_ms,
                welcomed_unix_ms,
            };
            let text = serde_json::to_string_pretty(&status).unwrap_or_default();
            if text != last_status {
                if let Err(e) = write_atomic(path, &text) {
                    tracing::warn!(path = %path.display(), "cannot write status: {e}");
                }
                last_status = text;
            }
        }
        if done {
            tracing::info!("done; exiting");
            break;
        }
    }
    // Let queued frames go out before the connections are dropped.
    drop(conns);
    tokio::time::sleep(Duration::from_millis(50)).await;
    tasks.abort_all();
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn manager_takes_one_address_or_a_list() {
        assert_eq!(manager_addresses("10.0.0.1:7700"), ["10.0.0.1:7700"]);
        assert_eq!(
            manager_addresses("a:7700, b:7700,,"),
            ["a:7700", "b:7700"],
            "a list, blanks ignored"
        );
        assert!(manager_addresses(" , ").is_empty());
        assert_eq!(
            manager_addresses("a:7700,b:7700, a:7700,b:7700"),
            ["a:7700", "b:7700"],
            "repeats are dropped"
        );
        let refused = LinkError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(nobody_there(&refused) && nobody_there(&LinkError::Timeout));
        assert!(!nobody_there(&LinkError::Refused("revoked".into())));
        assert!(!nobody_there(&LinkError::Closed));
    }

    #[test]
    fn every_kept_install_report_is_sent_again_after_a_welcome() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let conns = HashMap::from([(ConnId::MANAGER, Outgoing { tx, backlog: None })]);
        let update = |job: u64| InstallUpdate {
            job: JobRef { id: job, epoch: 1 },
            name: "app".into(),
            version: 2,
            state: baton_protocol::message::InstallState::Running,
            exit_code: Some(0),
            output: String::new(),
            reexec: false,
        };
        let mut reports = InstallReports::default();
        // Handed to a session that then dropped before the manager read them.
        for job in 0..KEPT_INSTALL_REPORTS as u64 + 4 {
            assert!(reports.note(update(job), &conns, true));
        }
        while rx.try_recv().is_ok() {}
        reports.resend(&conns);
        let mut jobs = Vec::new();
        while let Ok((bytes, _)) = rx.try_recv() {
            match Message::decode(&bytes).unwrap() {
                Message::InstallStatus { job, .. } => jobs.push(job.id),
                other => panic!("unexpected {other:?}"),
            }
        }
        let expected: Vec<u64> = (4..KEPT_INSTALL_REPORTS as u64 + 4).collect();
        assert_eq!(jobs, expected, "the newest kept reports, each once");
    }

    #[test]
    fn the_export_file_name_keeps_only_safe_characters() {
        assert_eq!(export_file_name("fw-router.v2_a", 7), "fw-router.v2_a-7");
        let name = export_file_name("app-/../../../../etc/cron.d/x", 3);
        assert_eq!(name, "app-_.._.._.._.._etc_cron.d_x-3");
        assert!(!name.contains('/'));
        let dir = Path::new("/data/export");
        assert_eq!(dir.join(&name).parent(), Some(dir));
        assert_eq!(export_file_name("..", 1), "_.-1");
        assert_eq!(export_file_name(".hidden", 1), "_hidden-1");
        assert_eq!(export_file_name("a\\b\u{1b}[2J", 1), "a_b__2J-1");
    }

    #[test]
    fn answers_count_in_a_peers_backlog_and_past_the_cap_the_peer_is_dropped() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let conn = ConnId(7);
        let mut conns = HashMap::from([(
            conn,
            Outgoing {
                tx,
                backlog: Some(backlog.clone()),
            },
        )]);
        let request = Message::ChunkRequest {
            root: [1; 32],
            index: 3,
        }
        .to_vec();
        let answer = Message::Pong { nonce: 9 }.to_vec();
        // Our own requests are not counted; answers are.
        for _ in 0..PEER_QUEUE_MAX * 2 {
            queue_frame(&mut conns, conn, request.clone());
        }
        assert_eq!(backlog.len(), 0);
        for _ in 0..PEER_QUEUE_MAX {
            queue_frame(&mut conns, conn, answer.clone());
        }
        assert_eq!(backlog.len(), PEER_QUEUE_MAX);
        assert!(conns.contains_key(&conn));
        // One more answer: the peer is dropped, the answer is not queued.
        queue_frame(&mut conns, conn, answer.clone());
        assert!(!conns.contains_key(&conn));
        let queued: Vec<Outbound> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(queued.len(), PEER_QUEUE_MAX * 3);
        assert_eq!(
            queued.iter().filter(|(_, counted)| *counted).count(),
            PEER_QUEUE_MAX
        );
    }

    #[tokio::test]
    async fn a_peers_reader_waits_while_its_window_is_full() {
        let backlog = Arc::new(Backlog::default());
        for _ in 0..PEER_WINDOW {
            backlog.add();
        }
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.below(PEER_WINDOW).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a full window holds the reader");
        backlog.done();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("one frame written frees the reader")
            .unwrap();
        // Done more often than added (a frame of a connection removed meanwhile): no wrap.
        for _ in 0..PEER_WINDOW + 5 {
            backlog.done();
        }
        assert_eq!(backlog.len(), 0);
    }

    /// Settings from `flags` (with the required ones) and an optional config file's text.
    fn settings(flags: &[&str], file: Option<&str>) -> Result<Settings, String> {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: AgentArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let mut argv = vec![
            "x".to_string(),
            "--manager=127.0.0.1:1".into(),
            format!("--manager-key={}", "11".repeat(32)),
            "--id=a1".into(),
            "--data-dir=/nonexistent".into(),
        ];
        if let Some(text) = file {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, text).unwrap();
            argv.push(format!("--config={}", path.display()));
        }
        argv.extend(flags.iter().map(|f| f.to_string()));
        let args = Cli::parse_from(argv).args.resolve()?;
        Settings::from_args(&args).map_err(|e| e.to_string())
    }

    #[test]
    fn root_keys_come_from_flags_or_the_config_file_and_publisher_keys_are_refused() {
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        let s = settings(&[], None).unwrap();
        assert!(s.config.roots.is_empty());
        assert_eq!(s.config.clock, AgentClock::System);
        let s = settings(
            &[
                &format!("--root-key={a}"),
                &format!("--root-key={b}"),
                "--root-threshold=2",
            ],
            None,
        )
        .unwrap();
        assert_eq!(s.config.roots.len(), 2);
        assert_eq!(s.config.root_threshold, 2);
        let file = format!("root-key = [\"{a}\", \"{b}\"]\nroot-threshold = 2\n");
        let s = settings(&[], Some(&file)).unwrap();
        assert_eq!(s.config.roots[1].0, [0xbb; 32]);
        assert_eq!(s.config.root_threshold, 2);
        // A flag wins over the file.
        let s = settings(
            &[&format!("--root-key={b}"), "--root-threshold=1"],
            Some(&file),
        )
        .unwrap();
        assert_eq!(s.config.roots.len(), 1);
        for (flags, want) in [
            (
                vec![format!("--root-key={a}"), "--root-threshold=2".into()],
                "--root-threshold",
            ),
            (vec!["--root-threshold=0".into()], "--root-threshold"),
            (
                vec![format!("--root-key={a}"), format!("--root-key={a}")],
                "twice",
            ),
            (vec!["--root-key=abc".into()], "64 hex digits"),
            (vec![format!("--publisher-key={a}")], "--root-key"),
        ] {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let e = settings(&flags, None).err().expect("refused");
            assert!(e.contains(want), "{flags:?}: {e}");
        }
        let e = settings(&[], Some(&format!("publisher-key = [\"{a}\"]\n")))
            .err()
            .expect("refused");
        assert!(e.contains("--root-key"), "{e}");
    }

    #[test]
    fn the_identity_is_created_private_and_refused_once_open_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = load_or_create_identity(&dir).unwrap();
        let path = dir.join(IDENTITY_FILE);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            load_or_create_identity(&dir).unwrap().public(),
            first.public()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_identity(&dir).unwrap_err();
        assert!(
            matches!(e, AgentRunError::DataDir(DataDirError::Exposed { .. })),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(&format!("chmod 600 {}", path.display())),
            "{e}"
        );
    }
}
