//! `baton serve`: the manager's parts wired together.
//!
//! [`serve`] opens the data directory (owner-only and locked for the
//! process's life, see [`baton_agent_core::linux::datadir`]; keys, admin
//! token, database), starts a new epoch, resumes unfinished jobs, binds the
//! agent port and the HTTP API, writes the ready file, and runs until its
//! shutdown future completes or the engine task fails. The HTTP API works on
//! the [`Manager`] service it builds.
//!
//! On PostgreSQL several managers share the database: the epoch is the managers'
//! lease's ([`crate::lease`]). A manager that cannot take the lease stands by
//! (the read-only API, the agent port bound but not listening) until
//! it can; an active manager that loses it stops at once and exits
//! ([`ServeError::LeaseLost`]). On SQLite the database file is locked: one manager.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_agent_core::linux::admission::{self, Admission, AdmissionLimits};
use baton_agent_core::linux::datadir::{DataDir, DataDirError};
use baton_agent_core::linux::link::Limits;
use baton_agent_core::linux::rate::RateLimiter;
use baton_manager_core::engine::{Engine, EngineConfig, JobSpec};
use baton_manager_core::planner::Policy;
use baton_manager_core::session::SessionConfig;
use baton_protocol::types::AgentId;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::agent_port::AgentPort;
use crate::content::{self, Content, ContentError, Keys, Library};
use crate::engine_task::{EngineInput, EngineTask};
use crate::lease::Lease;
use crate::registry::{Registry, SharedStore, lock, unix_now};
use crate::service::{Manager, decode_manifest, engine_targets};
use crate::store::fence::LeaseFence;
use crate::store::postgres::read_password;
use crate::store::{
    JobRecord, JobState, PostgresStore, SqliteStore, Store, StoreError, is_postgres_url,
};

/// How `baton serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Keys, admin token, database and status file live here.
    pub data_dir: PathBuf,
    /// The database: a SQLite file (default `<data_dir>/baton.db`) or a PostgreSQL URL
    /// ([`crate::store::is_postgres_url`]).
    pub db: Option<PathBuf>,
    /// The file holding the PostgreSQL password (else `BATON_DB_PASSWORD`, `PGPASSWORD`).
    pub db_password_file: Option<PathBuf>,
    /// Agent port address.
    pub listen: SocketAddr,
    /// HTTP API address.
    pub http: SocketAddr,
    /// The manager's upload cap in bytes per second (`0` = none).
    pub up_bps: u64,
    /// A participant silent this long is given up and routed around.
    pub give_up: Duration,
    /// A confirmed participant whose agent installs content has this long to report a final
    /// install state (running, failed, rolled back), restarts included, or it is failed.
    pub install_deadline: Duration,
    /// Where to write the ready file once listening.
    pub ready_file: Option<PathBuf>,
    /// Most agent connections at once; the descriptor limit less a reserve
    /// caps it too (see [`agent_port_limits`]).
    pub max_connections: usize,
    /// Agent handshakes in progress at once, from all addresses.
    pub max_handshakes: usize,
    /// Agent handshakes in progress at once from one address (IPv6: one /64).
    pub max_handshakes_per_address: usize,
    /// Time an agent connection (or a serial session) has to finish its handshake.
    pub handshake_timeout: Duration,
    /// Serial ports with a device on each (`/dev/ttyUSB0`, a pty), served like agent connections.
    pub serial: Vec<PathBuf>,
    /// HTTPS: PEM certificate chain and private key for the HTTP server (`None` = plain HTTP).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Largest content upload over HTTP, in bytes.
    pub max_upload: u64,
    /// HTTP connection and request bounds.
    pub http_limits: crate::http::HttpLimits,
    /// Highest election score an agent's certificate carries, whatever its placement says.
    pub max_election_score: u32,
    /// How long agent certificates are valid (renewed over the live session at half that;
    /// a revocation is carried in the revocation list at most this long).
    pub cert_lifetime: Duration,
    /// Directories `POST /api/v1/jobs` may publish files from, beside the upload directory
    /// (`--content-dir`; default none: uploads only).
    pub content_dirs: Vec<PathBuf>,
    /// A publisher key file (`--publisher-key`): the manager signs content online with it,
    /// only for the names the newest trust document lists it for. `None`: offline-signed
    /// manifests only.
    pub publisher_key: Option<PathBuf>,
    /// A signed trust document to take at start (`--trust`), as `PUT /api/v1/trust` would.
    pub trust: Option<PathBuf>,
    /// On PostgreSQL, the time-to-live of the managers' lease (`--lease-ttl`, at most
    /// [`crate::lease::MAX_LEASE_TTL`]): a standby takes over within about this long after
    /// the active manager stops renewing it.
    pub lease_ttl: Duration,
}

impl ServeOptions {
    /// Defaults for a data directory: agent port 7700 on all addresses, API on loopback 7780.
    pub fn new(data_dir: PathBuf) -> Self {
        ServeOptions {
            data_dir,
            db: None,
            db_password_file: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 7700)),
            http: SocketAddr::from(([127, 0, 0, 1], 7780)),
            up_bps: 0,
            give_up: Duration::from_secs(60),
            install_deadline: baton_manager_core::engine::DEFAULT_INSTALL_DEADLINE,
            ready_file: None,
            max_connections: 100_000,
            max_handshakes: crate::agent_port::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_address: crate::agent_port::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            handshake_timeout: admission::DEFAULT_HANDSHAKE_TIMEOUT,
            serial: Vec::new(),
            tls: None,
            max_upload: crate::http::api::DEFAULT_MAX_UPLOAD,
            http_limits: crate::http::HttpLimits::default(),
            max_election_score: baton_protocol::discovery::MAX_CAPABILITY_SCORE,
            cert_lifetime: baton_manager_core::session::DEFAULT_CERT_LIFETIME,
            content_dirs: Vec::new(),
            publisher_key: None,
            trust: None,
            lease_ttl: crate::lease::DEFAULT_LEASE_TTL,
        }
    }
}

/// What a running manager tells its clients: the ready file and `<data-dir>/serve.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Agent port, `ip:port`.
    pub agent_addr: String,
    /// HTTP API, `ip:port`.
    pub http_addr: String,
    /// The manager's Ed25519 public key (hex), which agents pin.
    pub manager_key: String,
    /// The public key (hex) of the publisher key the manager signs online with
    /// (`--publisher-key`), if any; agents trust it only if the trust document lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_key: Option<String>,
    /// The bearer token for the HTTP API.
    pub admin_token: String,
    /// The manager's epoch for this run (0 while it stands by).
    pub epoch: u32,
    /// `active`, or `standby` (on PostgreSQL, while another manager holds the lease; the
    /// file is written again when it takes over).
    #[serde(default = "active_role")]
    pub role: String,
    /// The certificate (PEM) the HTTP API serves, if it speaks HTTPS: a CLI on this host
    /// trusts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
}

fn active_role() -> String {
    "active".into()
}

/// Name of the status file a running manager keeps in its data directory.
pub const STATUS_FILE: &str = "serve.json";
/// How often revocations whose certificates all expired are dropped from the list.
const REVOCATION_REFRESH: Duration = Duration::from_secs(60);
/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Why the manager could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A file in the data directory.
    #[error(transparent)]
    Files(#[from] ContentError),
    /// The data directory is in use by another process, or cannot be made owner-only.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The database.
    #[error("{path}: {source}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// The database, while running.
    #[error(transparent)]
    Database(#[from] StoreError),
    /// A port could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which port.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Some other file operation.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The engine task stopped with an error.
    #[error(transparent)]
    Engine(#[from] crate::engine_task::EngineTaskError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    /// The HTTPS certificate or key.
    #[error(transparent)]
    Tls(#[from] crate::http::tls::TlsError),
    /// A `--content-dir` is missing, not a directory, or inside the data directory.
    #[error("{0}")]
    ContentDir(std::io::Error),
    /// On PostgreSQL, this manager's key is not the one the database's managers use: agents
    /// pin one key, so every manager of a database must present it.
    #[error(
        "manager.key in {data_dir} is not the key this database's managers use ({recorded}): copy manager.key from the data directory of the first manager"
    )]
    ManagerKeyDiffers {
        /// This manager's data directory.
        data_dir: PathBuf,
        /// The key recorded in the database (hex).
        recorded: String,
    },
    /// Another `baton serve` holds this SQLite database file.
    #[error(
        "database {path} is in use by another baton serve: one manager per SQLite database (several managers share a PostgreSQL database, one active, the others standing by)"
    )]
    DatabaseInUse {
        /// The database file.
        path: PathBuf,
    },
    /// The active manager lost its lease: it stopped acting (agent sessions closed, engine
    /// stopped) and exits; restarted, it stands by.
    #[error("lost the managers' lease, stepped down: {0}")]
    LeaseLost(String),
    /// The `--trust` document does not chain from the one the manager holds.
    #[error("--trust {path}: {source}")]
    Trust {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        source: crate::trust::TrustRefused,
    },
}

/// Reads the admin token from `<data_dir>/admin.token`, creating it (mode 0600) on first run.
pub fn load_or_create_admin_token(data_dir: &Path) -> Result<String, ContentError> {
    let (secret, created) = content::load_or_create_secret(&data_dir.join(ADMIN_TOKEN_FILE))?;
    if created {
        tracing::info!(
            "created admin token in {}",
            data_dir.join(ADMIN_TOKEN_FILE).display()
        );
    }
    Ok(hex::encode(secret))
}

/// Writes `info` as JSON to `path` atomically (a temporary file renamed into place), mode 0600.
pub fn write_ready_file(path: &Path, info: &ReadyInfo) -> Result<(), ServeError> {
    let json = serde_json::to_vec_pretty(info).expect("ready info encodes");
    crate::trust::replace_file(path, &json)?;
    Ok(())
}

/// Loads each unfinished job's content and hands the job to the engine (after a restart).
async fn resume_jobs(
    store: &SharedStore,
    library: &Library,
    task: &mut EngineTask,
) -> Result<(), ServeError> {
    let jobs = lock(store).unfinished_jobs()?;
    for job in jobs {
        if let Err(why) = resume_job(store, library, task, &job).await {
            tracing::error!(job = job.id, "cannot resume job: {why}");
            lock(store).set_job_state(job.id, JobState::Refused, Some(&why), unix_now())?;
        }
    }
    Ok(())
}

async fn resume_job(
    store: &SharedStore,
    library: &Library,
    task: &mut EngineTask,
    job: &JobRecord,
) -> Result<(), String> {
    let (record, participants) = {
        let s = lock(store);
        let record = s
            .content(&job.root)
            .map_err(|e| e.to_string())?
            .ok_or("its content is not in the database")?;
        (record, s.participants(job.id).map_err(|e| e.to_string())?)
    };
    let manifest = decode_manifest(&record).map_err(|e| e.to_string())?;
    if library.get(&record.root).is_none() {
        let path = PathBuf::from(&record.path);
        let m = manifest.clone();
        let content = tokio::task::spawn_blocking(move || Content::reopen(&path, m))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("content {}: {e}", record.name))?;
        library.insert(content);
    }
    // The job keeps the policy it was created with (jobs from before policies were stored
    // ran under the defaults).
    let policy = match &job.policy_spec {
        Some(spec) => serde_json::from_value::<Policy>(spec.clone())
            .map_err(|e| format!("its stored policy does not read back: {e}"))?,
        None => Policy::default(),
    };
    let spec = JobSpec {
        id: job.id,
        manifest,
        targets: engine_targets(&job.targets)?,
        policy,
    };
    let now = task.now();
    if job.state == JobState::Pending {
        tracing::info!(
            job = job.id,
            "starting job that was created before the restart"
        );
        task.engine_mut()
            .start_job(now, spec)
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let mut states = Vec::with_capacity(participants.len());
    let mut measured = Vec::new();
    let mut installs = Vec::new();
    for p in &participants {
        let Ok(id) = AgentId::try_from(p.agent.as_str()) else {
            continue;
        };
        if let Some(up) = p.measured_up_bps {
            measured.push((id.clone(), up));
        }
        if let Some(install) = crate::store::resume_install(p) {
            installs.push((id.clone(), install));
        }
        states.push((id, crate::store::resume_state(p)));
    }
    tracing::info!(
        job = job.id,
        participants = states.len(),
        measured = measured.len(),
        "resuming job"
    );
    // A staged rollout goes on where it stood: waves opened, a pause, a wait for approval.
    let rollout = job
        .rollout
        .clone()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("its stored rollout does not read back: {e}"))?;
    task.engine_mut()
        .resume_staged_job(now, spec, states, &measured, &installs, rollout);
    Ok(())
}

/// Takes the `--trust` document at start: stored if it chains from the newest held one,
/// nothing if it is that one; an older one is ignored with a warning (the manager holds a
/// newer one), anything else stops the manager.
fn take_initial_trust(
    registry: &Registry,
    path: &Path,
    signed: baton_protocol::trust::SignedTrust,
) -> Result<(), ServeError> {
    let version = signed.document.version;
    let held = registry.trust().latest().map(|s| s.document.version);
    if held.is_some_and(|h| version < h) {
        tracing::warn!(
            "--trust {}: version {version} is older than the version {} the manager holds; ignored",
            path.display(),
            held.unwrap_or(0)
        );
        return Ok(());
    }
    match registry.add_trust(signed, unix_now()) {
        Ok(crate::trust::TrustCheck::Newer(_)) => {
            tracing::info!(version, "trust document from --trust stored");
            Ok(())
        }
        Ok(crate::trust::TrustCheck::Held) => Ok(()),
        Err(source) => Err(ServeError::Trust {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Says at start which names the online publisher key may sign (or that it may sign none).
fn log_online_signing(registry: &Registry, publisher: &baton_protocol::identity::Identity) {
    let key = publisher.public();
    let chain = registry.trust();
    let names = chain
        .latest()
        .and_then(|s| s.document.publishers.iter().find(|g| g.key == key))
        .map(|g| {
            g.names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        });
    match names {
        Some(names) => {
            tracing::info!(key = %hex::encode(key.0), %names, "online signing enabled for these names")
        }
        None => {
            tracing::warn!(key = %hex::encode(key.0), "the trust document held does not list --publisher-key: nothing can be signed online until one does")
        }
    }
}

/// Descriptors the manager keeps out of the agent port's connection cap:
/// [`admission::DESCRIPTOR_RESERVE`] plus one per HTTP connection
/// (`--max-http-connections`) and per serial port.
pub fn descriptor_reserve(opts: &ServeOptions) -> u64 {
    admission::DESCRIPTOR_RESERVE
        + opts.http_limits.max_connections as u64
        + opts.serial.len() as u64
}

/// The agent port's caps for a process allowed `descriptors` descriptors: at
/// most `opts.max_connections` connections, and fewer if the descriptor limit
/// less [`descriptor_reserve`] says so.
pub fn agent_port_limits(opts: &ServeOptions, descriptors: u64) -> AdmissionLimits {
    let reserve = descriptor_reserve(opts);
    AdmissionLimits {
        max_connections: opts
            .max_connections
            .min(admission::connection_cap(descriptors, reserve)),
        max_handshakes: opts.max_handshakes,
        max_handshakes_per_address: opts.max_handshakes_per_address,
        handshake_timeout: opts.handshake_timeout,
    }
    .checked()
}

/// Says that the active manager of `epoch` lost its lease and stops acting.
fn step_down(epoch: u32, why: &str) {
    tracing::error!(
        epoch,
        "lost the managers' lease: {why}; stepping down now (agent sessions closed, engine stopped, no more writes; restarted, this manager stands by)"
    );
}

/// Connections the agent port's listen queue holds.
const AGENT_BACKLOG: u32 = 1024;
/// How long a standby's HTTP server has to finish its requests when it takes over.
const STANDBY_HTTP_GRACE: Duration = Duration::from_secs(2);

/// Binds the agent port without listening (connections are refused until
/// [`tokio::net::TcpSocket::listen`]): a standby holds its address but takes no agent.
fn bind_agent_port(addr: SocketAddr) -> Result<(tokio::net::TcpSocket, SocketAddr), ServeError> {
    let bind_error = |source| ServeError::Bind {
        addr,
        what: "agent port, --listen",
        source,
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    let bound = socket.local_addr().map_err(bind_error)?;
    Ok((socket, bound))
}

/// Binds and listens on the HTTP port, once for the process: a standby's read-only server
/// and then the active one's accept on it in turn.
fn bind_http_port(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), ServeError> {
    let bind_error = |source| ServeError::Bind {
        addr,
        what: "HTTP API, --http",
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

/// A tokio listener on (a duplicate of) the HTTP port's socket.
fn http_listener(
    socket: &std::net::TcpListener,
    addr: SocketAddr,
) -> Result<TcpListener, ServeError> {
    socket
        .try_clone()
        .and_then(TcpListener::from_std)
        .map_err(|source| ServeError::Bind {
            addr,
            what: "HTTP API, --http",
            source,
        })
}

/// The lease this manager took: dropped, it stops the keeper's renewals; dropped armed
/// (while it gets ready to run) (an error on the
/// way out of `serve`), it stops the keeper's renewals and releases the lease, so that a
/// standby takes over at once rather than at its expiry (or never, if the keeper outlived
/// `serve`).
struct HeldLease {
    lease: Lease,
    epoch: u32,
    keeper: Option<tokio::task::AbortHandle>,
    armed: bool,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        if let Some(keeper) = &self.keeper {
            keeper.abort();
        }
        if self.armed {
            self.lease.release_blocking(self.epoch);
        }
    }
}

/// Takes an exclusive `flock` on a SQLite database file for the process's life: a second
/// `baton serve` on the same file (from another data directory) is refused. `baton admin`
/// does not take it (it writes beside a running manager, through SQLite's own locks).
fn lock_database_file(path: &Path) -> Result<std::fs::File, ServeError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Created (owner-only, empty: SQLite takes an empty file as a new database) when
    // missing, so that it is locked before SQLite opens and migrates it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| ServeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServeError::DatabaseInUse {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(ServeError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A manager waiting for the lease on a shared PostgreSQL database: it serves the read-only
/// API (saying which manager is active) and takes no agent.
struct Standby<'a> {
    lease: &'a Lease,
    store: &'a SharedStore,
    keys: &'a Keys,
    publisher: Option<&'a baton_protocol::identity::Identity>,
    admin_token: &'a str,
    http_config: &'a crate::http::HttpConfig,
    http_socket: &'a std::net::TcpListener,
    agent_addr: SocketAddr,
    http_addr: SocketAddr,
    tls_cert: Option<PathBuf>,
    status_path: &'a Path,
}

impl Standby<'_> {
    /// Takes the lease at once if it is free; else stands by until it is taken (the epoch
    /// and until when it is valid) or `shutdown` completes (`None`). Options reloaded
    /// meanwhile replace `opts` (the ports stay bound as they are).
    async fn run(
        self,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
        reloads: &mut tokio::sync::mpsc::Receiver<ServeOptions>,
        opts: &mut ServeOptions,
    ) -> Result<Option<(u32, tokio::time::Instant)>, ServeError> {
        let activity = crate::lease::Activity::standby();
        let (agent, http) = (self.agent_addr.to_string(), self.http_addr.to_string());
        let mut failures = 0;
        if let Some(taken) = self
            .lease
            .try_take(&agent, &http, &activity, &mut failures)
            .await
        {
            return Ok(Some(taken));
        }
        // The agent port is bound, not listening: agents are refused and try the next
        // address. No engine, no job is resumed; the API reads the shared database.
        let (events, _) = broadcast::channel(16);
        let (engine, _no_engine) = crate::engine_task::channel();
        drop(_no_engine);
        let manager = Arc::new(Manager {
            store: self.store.clone(),
            registry: Arc::new(Registry::load(self.store.clone())?),
            library: Arc::new(Library::new()),
            keys: self.keys.clone(),
            publisher: self.publisher.cloned(),
            engine,
            events,
            stats: Default::default(),
            limits: Limits::default(),
            epoch: 0,
            agent_addr: self.agent_addr,
            http_addr: self.http_addr,
            admin_token: self.admin_token.to_string(),
            activity: activity.clone(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut http_task = tokio::spawn(crate::http::run(
            http_listener(self.http_socket, self.http_addr)?,
            manager,
            self.http_config.clone(),
            async move {
                let mut rx = stop_rx;
                let _ = rx.wait_for(|stop| *stop).await;
            },
        ));
        let info = ReadyInfo {
            agent_addr: agent.clone(),
            http_addr: http.clone(),
            manager_key: hex::encode(self.keys.manager.public().0),
            publisher_key: self.publisher.map(|p| hex::encode(p.public().0)),
            admin_token: self.admin_token.to_string(),
            epoch: 0,
            role: "standby".into(),
            tls_cert: self.tls_cert.clone(),
        };
        write_ready_file(self.status_path, &info)?;
        if let Some(ready) = &opts.ready_file {
            write_ready_file(ready, &info)?;
        }
        tracing::info!(agent_addr = %agent, http_addr = %http, ttl_ms = self.lease.ttl().as_millis() as u64,
            "standby: read-only API on; the agent port opens when this manager takes the lease");
        let take = self.lease.take(&agent, &http, &activity);
        tokio::pin!(take);
        let taken = loop {
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => {
                    tracing::info!("shutting down (standby)");
                    break None;
                }
                taken = &mut take => break Some(taken),
                Some(reloaded) = reloads.recv() => {
                    tracing::info!("options reloaded: a standby applies them when it takes over");
                    *opts = reloaded;
                }
            }
        };
        let _ = stop_tx.send(true);
        if tokio::time::timeout(STANDBY_HTTP_GRACE, &mut http_task)
            .await
            .is_err()
        {
            http_task.abort();
        }
        Ok(taken)
    }
}

/// Runs the manager until `shutdown` completes (or the engine task fails).
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    serve_reloading(opts, shutdown, reloads).await
}

/// [`serve`], also taking reloaded options while it runs: the serial ports (ports added
/// are opened, ports removed closed), the agent port's caps (connections, handshakes in
/// all and per address, handshake deadline) and the HTTP port's (connections in all and
/// per address, header timeout) — they judge the next connections, those open stay — and
/// the manager's upload cap (every transfer at once, the planner at its next adaptation)
/// change at once; every other session goes on, and the other options wait for a restart.
pub async fn serve_reloading(
    mut opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
    mut reloads: tokio::sync::mpsc::Receiver<ServeOptions>,
) -> Result<(), ServeError> {
    let descriptors = admission::raise_descriptor_limit();
    // Held until `serve` returns: a second manager on this directory stops here.
    let _data_dir = DataDir::open(&opts.data_dir)?;
    let keys = Keys::load_or_create(&opts.data_dir)?;
    let publisher = match &opts.publisher_key {
        Some(path) => Some(crate::trust::read_key_file(path)?),
        None => None,
    };
    let initial_trust = match &opts.trust {
        Some(path) => Some((path.clone(), crate::trust::read_trust_file(path)?)),
        None => None,
    };
    let admin_token = load_or_create_admin_token(&opts.data_dir)?;
    let db_path = opts
        .db
        .clone()
        .unwrap_or_else(|| opts.data_dir.join("baton.db"));
    let postgres_url = db_path.to_str().filter(|d| is_postgres_url(d));
    // SQLite: one manager per database file, whatever its data directory (flock on the
    // file, held for the process's life; SQLite's own locks are separate fcntl locks).
    let mut _sqlite_lock = None;
    // PostgreSQL: the managers' lease, on a connection pool of its own.
    let mut lease = None;
    let mut database: Box<dyn Store> = match postgres_url {
        Some(url) => {
            let pg_error = |source| ServeError::Store {
                path: PathBuf::from("PostgreSQL database"),
                source,
            };
            let password = read_password(opts.db_password_file.as_deref()).map_err(pg_error)?;
            let mut store = PostgresStore::connect(url, password.as_deref()).map_err(pg_error)?;
            let lease_store = PostgresStore::connect(url, password.as_deref()).map_err(pg_error)?;
            let fence = Arc::new(LeaseFence::new(crate::lease::holder_id()));
            store.fence_writes(fence.clone());
            tracing::info!(database = ?store, holder = fence.holder(), "database: PostgreSQL");
            lease = Some(Lease::new(lease_store, fence, opts.lease_ttl));
            Box::new(store)
        }
        None => {
            // Locked before it is opened: a second manager must not migrate it under the
            // first.
            _sqlite_lock = Some(lock_database_file(&db_path)?);
            let store = SqliteStore::open(&db_path).map_err(|source| ServeError::Store {
                path: db_path.clone(),
                source,
            })?;
            Box::new(store)
        }
    };
    let manager_key = keys.manager.public();
    match database.meta("manager_key")? {
        Some(k) if k != manager_key.0 && lease.is_some() => {
            return Err(ServeError::ManagerKeyDiffers {
                data_dir: opts.data_dir.clone(),
                recorded: hex::encode(&k),
            });
        }
        Some(k) if k != manager_key.0 => tracing::warn!(
            "manager.key differs from the key this database was created with; agents that pinned the old key will refuse this manager"
        ),
        Some(_) => {}
        None => database.set_meta("manager_key", &manager_key.0)?,
    }
    let tls = match &opts.tls {
        Some((cert, key)) => Some(Arc::new(crate::http::tls::load_config(cert, key)?)),
        None => None,
    };
    let store: SharedStore = Arc::new(Mutex::new(database));
    let upload_dir = opts.data_dir.join("uploads");
    // Never published, wherever they are: the database (and its WAL files), the TLS key,
    // and the ready file (it holds the admin token).
    let mut secrets: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut p = db_path.clone().into_os_string();
            p.push(suffix);
            PathBuf::from(p)
        })
        .collect();
    secrets.extend(opts.tls.as_ref().map(|(_, key)| key.clone()));
    secrets.extend(opts.ready_file.clone());
    let content_dirs = crate::http::content_dirs::ContentDirs::new(
        &opts.data_dir,
        &upload_dir,
        &opts.content_dirs,
        &secrets,
    )
    .map_err(ServeError::ContentDir)?;
    let (http_limits_tx, http_limits_rx) = watch::channel(opts.http_limits);
    let http_config = crate::http::HttpConfig {
        web: Arc::new(crate::http::web::Web::new(store.clone(), tls.is_some())),
        content_dirs,
        upload_dir,
        max_upload_bytes: opts.max_upload,
        tls,
        limits: http_limits_rx,
    };
    // Both ports are bound now (a standby names them in the lease); the agent port listens
    // only once this manager is active: until then agents are refused and try the next.
    let (agent_socket, agent_addr) = bind_agent_port(opts.listen)?;
    let (http_socket, http_addr) = bind_http_port(opts.http)?;
    let tls_cert = opts
        .tls
        .as_ref()
        .map(|(cert, _)| std::path::absolute(cert).unwrap_or_else(|_| cert.clone()));
    let status_path = opts.data_dir.join(STATUS_FILE);
    tokio::pin!(shutdown);
    let mut lease_valid_until = None;
    let epoch = match &lease {
        None => lock(&store).next_epoch()?,
        Some(lease) => {
            let waiting = Standby {
                lease,
                store: &store,
                keys: &keys,
                publisher: publisher.as_ref(),
                admin_token: &admin_token,
                http_config: &http_config,
                http_socket: &http_socket,
                agent_addr,
                http_addr,
                tls_cert: tls_cert.clone(),
                status_path: &status_path,
            };
            match waiting
                .run(shutdown.as_mut(), &mut reloads, &mut opts)
                .await?
            {
                Some((epoch, valid_until)) => {
                    http_limits_tx.send_replace(opts.http_limits);
                    lease_valid_until = Some(valid_until);
                    tracing::info!(
                        epoch,
                        ttl_ms = lease.ttl().as_millis() as u64,
                        "took the managers' lease: this manager is active"
                    );
                    epoch
                }
                None => {
                    let _ = std::fs::remove_file(&status_path);
                    return Ok(());
                }
            }
        }
    };
    // The lease kept in a task of its own (resuming jobs must not hold up its renewals).
    let lease_keeper = match (&lease, lease_valid_until) {
        (Some(lease), Some(until)) => {
            let lease = lease.clone();
            Some(tokio::spawn(async move { lease.keep(epoch, until).await }))
        }
        _ => None,
    };
    // Until the manager runs, an error (loading the registry, the trust document, resuming
    // jobs, listening) releases the lease and stops its keeper.
    let mut held_lease = lease.as_ref().map(|lease| HeldLease {
        lease: lease.clone(),
        epoch,
        keeper: lease_keeper.as_ref().map(|task| task.abort_handle()),
        armed: true,
    });
    let lease_lost = async {
        match lease_keeper {
            Some(task) => task
                .await
                .unwrap_or_else(|e| format!("the lease task ended: {e}")),
            None => std::future::pending().await,
        }
    };
    let registry =
        Arc::new(Registry::load(store.clone())?.with_revocation_signer(keys.manager.clone())?);
    if let Some((path, signed)) = initial_trust {
        take_initial_trust(&registry, &path, signed)?;
    }
    if let Some(p) = &publisher {
        log_online_signing(&registry, p);
    }
    let library = Arc::new(Library::new());
    // Always present, unlimited at 0, so a reload can set or lift `--up-bps`.
    let up_limit = Arc::new(RateLimiter::new(opts.up_bps));
    let limits = Limits {
        up: Some(up_limit.clone()),
        ..Limits::default()
    };
    let (events, _) = broadcast::channel(4096);
    let engine = Engine::new(
        epoch,
        EngineConfig {
            give_up_after: opts.give_up,
            install_deadline: opts.install_deadline,
            progress_flush: Duration::from_millis(500),
            manager_up_bps: opts.up_bps,
            ..EngineConfig::default()
        },
    );
    let mut engine_task = EngineTask::new(
        engine,
        store.clone(),
        registry.clone(),
        events.clone(),
        tokio::time::Instant::now(),
    );
    if let Some(lease) = &lease {
        engine_task = engine_task.with_lease(lease.fence());
    }
    resume_jobs(&store, &library, &mut engine_task).await?;

    let agent_listener = agent_socket
        .listen(AGENT_BACKLOG)
        .map_err(|source| ServeError::Bind {
            addr: opts.listen,
            what: "agent port, --listen",
            source,
        })?;
    let http_listener = http_listener(&http_socket, opts.http)?;

    let agent_port_caps = agent_port_limits(&opts, descriptors.soft);
    admission::log_caps(
        "agent port",
        &agent_port_caps,
        descriptors.soft,
        descriptor_reserve(&opts),
        ", at most --max-connections",
    );
    let (engine_tx, engine_rx) = crate::engine_task::channel();
    let manager = Arc::new(Manager {
        store: store.clone(),
        registry: registry.clone(),
        library: library.clone(),
        keys: keys.clone(),
        publisher: publisher.clone(),
        engine: engine_tx.clone(),
        events: events.clone(),
        stats: engine_task.stats(),
        limits: limits.clone(),
        epoch,
        agent_addr,
        http_addr,
        admin_token: admin_token.clone(),
        activity: match &lease {
            Some(lease) => crate::lease::Activity::active_fenced(lease.fence()),
            None => crate::lease::Activity::active(),
        },
    });
    let agent_port = Arc::new(AgentPort {
        session: Arc::new(
            // Agents trust publishers through the root-signed trust document only.
            SessionConfig::new(keys.manager.clone(), [])
                .with_max_election_score(opts.max_election_score)
                .with_cert_lifetime(opts.cert_lifetime)
                .with_serials(Arc::new(crate::revocation::StoreSerials::new(
                    store.clone(),
                ))),
        ),
        registry: registry.clone(),
        library: library.clone(),
        limits: limits.clone(),
        engine: engine_tx,
        admission: Admission::new("agent port", agent_port_caps),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let engine_run = tokio::spawn(engine_task.run(engine_rx, stopped(stop_rx.clone())));
    let agent_task = tokio::spawn(crate::agent_port::run_agent_port(
        agent_listener,
        agent_port.clone(),
        stopped(stop_rx.clone()),
    ));
    let http_task = tokio::spawn(crate::http::run(
        http_listener,
        manager.clone(),
        http_config,
        stopped(stop_rx.clone()),
    ));
    // Revocations whose certificates all expired leave the list (room for any left out).
    let revocation_task = tokio::spawn({
        let registry = registry.clone();
        let stopped = stopped(stop_rx.clone());
        async move {
            tokio::pin!(stopped);
            let mut tick = tokio::time::interval(REVOCATION_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {
                        if let Err(e) = registry.publish_revocations(crate::registry::unix_now()) {
                            tracing::error!("cannot refresh the revocation list: {e}");
                        }
                    }
                }
            }
        }
    });
    let mut serial_ports = crate::serial::SerialPorts::new(agent_port.clone(), stop_rx.clone());
    serial_ports.set(&opts.serial);

    let info = ReadyInfo {
        agent_addr: agent_addr.to_string(),
        http_addr: http_addr.to_string(),
        manager_key: hex::encode(manager_key.0),
        publisher_key: publisher.as_ref().map(|p| hex::encode(p.public().0)),
        admin_token,
        epoch,
        role: active_role(),
        tls_cert,
    };
    write_ready_file(&status_path, &info)?;
    if let Some(ready) = &opts.ready_file {
        write_ready_file(ready, &info)?;
    }
    tracing::info!(%agent_addr, %http_addr, epoch, manager_key = %info.manager_key, "manager ready");
    // Running: from here the loop below keeps, loses or releases the lease.
    if let Some(held) = &mut held_lease {
        held.armed = false;
    }

    tokio::pin!(engine_run);
    tokio::pin!(lease_lost);
    let mut lost = false;
    let result = loop {
        tokio::select! {
            biased;
            why = &mut lease_lost => {
                step_down(epoch, &why);
                lost = true;
                break Err(ServeError::LeaseLost(why));
            }

            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break Ok(());
            }
            r = &mut engine_run => break match r {
                Ok(Ok(())) => Ok(()),
                // The engine found the lease run out first (this process woke after it
                // expired, before the lease task ran).
                Ok(Err(crate::engine_task::EngineTaskError::LeaseRanOut)) => {
                    let why = "it ran out by this manager's clock before the engine instructed".to_string();
                    step_down(epoch, &why);
                    lost = true;
                    Err(ServeError::LeaseLost(why))
                }
                Ok(Err(e)) => Err(ServeError::Engine(e)),
                Err(e) => Err(ServeError::Http(std::io::Error::other(format!("engine task panicked: {e}")))),
            },
            Some(reloaded) = reloads.recv() => {
                let (added, removed) = serial_ports.set(&reloaded.serial);
                tracing::info!(?added, ?removed, "serial ports reloaded");
                let caps = agent_port
                    .admission
                    .set_limits(agent_port_limits(&reloaded, descriptors.soft));
                tracing::info!(
                    max_connections = caps.max_connections,
                    max_handshakes = caps.max_handshakes,
                    max_handshakes_per_address = caps.max_handshakes_per_address,
                    handshake_timeout = ?caps.handshake_timeout,
                    "agent port caps reloaded"
                );
                http_limits_tx.send_if_modified(|limits| {
                    let changed = *limits != reloaded.http_limits;
                    *limits = reloaded.http_limits;
                    changed
                });
                if up_limit.bytes_per_sec() != reloaded.up_bps {
                    up_limit.set_rate(reloaded.up_bps);
                    // Not awaited: a full engine queue must not hold up the signals.
                    if let Err(tokio::sync::mpsc::error::TrySendError::Full(input)) =
                        manager.engine.try_send(EngineInput::SetManagerUpBps(reloaded.up_bps))
                    {
                        let engine = manager.engine.clone();
                        tokio::spawn(async move {
                            let _ = engine.send(input).await;
                        });
                    }
                    tracing::info!(up_bps = reloaded.up_bps, "manager upload cap reloaded (0 = none)");
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    registry.close_all();
    let grace = Duration::from_secs(5);
    if !engine_run.is_finished() {
        let _ = tokio::time::timeout(grace, &mut engine_run).await;
    }
    // Stopped with the lease still held: a standby takes over at once, not at its expiry
    // (the engine has stopped writing; the sessions are closing).
    if let (Some(lease), false) = (&lease, lost) {
        lease.release(epoch).await;
    }
    let _ = tokio::time::timeout(grace, agent_task).await;
    revocation_task.abort();
    serial_ports.join(grace).await;
    let http_result = tokio::time::timeout(grace, http_task).await;
    let _ = std::fs::remove_file(&status_path);
    result?;
    if let Ok(Ok(Err(e))) = http_result {
        return Err(ServeError::Http(e));
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn options(data_dir: &Path) -> ServeOptions {
        ServeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServeOptions::new(data_dir.to_path_buf())
        }
    }

    /// The agent port leaves descriptors for the HTTP connections, the serial
    /// ports and the rest, and at least half its places to authenticated agents.
    #[test]
    fn the_agent_port_keeps_descriptors_in_reserve() {
        let mut opts = options(Path::new("unused"));
        opts.serial = vec![PathBuf::from("/dev/ttyUSB0")];
        assert_eq!(descriptor_reserve(&opts), 256 + 512 + 1);
        let roomy = agent_port_limits(&opts, 50_000);
        assert_eq!(roomy.max_connections, 50_000 - 769);
        assert_eq!(
            roomy.max_handshakes,
            crate::agent_port::DEFAULT_MAX_HANDSHAKES
        );
        // The common default of 1024 descriptors: a quarter of them, half of that for handshakes.
        let tight = agent_port_limits(&opts, 1024);
        assert_eq!(tight.max_connections, 256);
        assert_eq!(tight.max_handshakes, 128);
        assert_eq!(tight.max_handshakes_per_address, 64);
        opts.max_connections = 50;
        assert_eq!(
            agent_port_limits(&opts, 1 << 20).max_connections,
            50,
            "--max-connections"
        );
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_manager_per_data_directory_and_its_files_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn(serve(options(&data), async {
            let _ = stopped.await;
        }));
        let status = data.join(STATUS_FILE);
        tokio::time::timeout(Duration::from_secs(20), async {
            while !status.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the first manager is ready within 20 s");

        assert_eq!(mode(&data), 0o700);
        for file in [
            "manager.key",
            ADMIN_TOKEN_FILE,
            "baton.db",
            "baton.db-wal",
            "baton.db-shm",
            STATUS_FILE,
            baton_agent_core::linux::datadir::LOCK_FILE,
        ] {
            assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        }

        let second = tokio::time::timeout(
            Duration::from_secs(5),
            serve(options(&data), std::future::pending()),
        )
        .await
        .expect("the second manager stops within 5 s");
        match second {
            Err(ServeError::DataDir(e @ DataDirError::InUse { .. })) => {
                assert!(e.to_string().contains(&data.display().to_string()), "{e}");
            }
            other => panic!("expected the data directory in use, got {other:?}"),
        }
        assert!(
            status.exists(),
            "the second manager left the first's files alone"
        );

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), first)
            .await
            .expect("the first manager stops")
            .unwrap()
            .unwrap();
        // Stopped: the directory is free again (and a loose one is tightened on start).
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stop.send(()).unwrap();
        serve(options(&data), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        assert_eq!(mode(&data), 0o700);
    }

    /// SQLite has one manager: a second `serve` on the same database file from another
    /// data directory is refused, naming the file (several managers need PostgreSQL).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_manager_per_sqlite_database() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("shared.db");
        let mut first_opts = options(&tmp.path().join("first"));
        first_opts.db = Some(db.clone());
        let status = first_opts.data_dir.join(STATUS_FILE);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn(serve(first_opts, async {
            let _ = stopped.await;
        }));
        tokio::time::timeout(Duration::from_secs(20), async {
            while !status.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the first manager is ready within 20 s");
        let mut second_opts = options(&tmp.path().join("second"));
        second_opts.db = Some(db.clone());
        let second = tokio::time::timeout(
            Duration::from_secs(5),
            serve(second_opts, std::future::pending()),
        )
        .await
        .expect("the second manager stops within 5 s");
        match second {
            Err(e @ ServeError::DatabaseInUse { .. }) => {
                assert!(e.to_string().contains(&db.display().to_string()), "{e}");
            }
            other => panic!("expected the database in use, got {other:?}"),
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), first)
            .await
            .expect("the first manager stops")
            .unwrap()
            .unwrap();
    }

    /// A SQLite database locked by another manager is refused before it is opened: the
    /// second manager does not migrate it under the first (its schema version stays).
    #[tokio::test]
    async fn a_locked_sqlite_database_is_not_migrated() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("held.db");
        drop(crate::store::SqliteStore::open(&db).unwrap());
        let older = crate::store::SCHEMA_VERSION - 1;
        rusqlite::Connection::open(&db)
            .unwrap()
            .pragma_update(None, "user_version", older)
            .unwrap();
        let holder = std::fs::File::open(&db).unwrap();
        holder.try_lock().unwrap();
        let mut opts = options(&tmp.path().join("data"));
        opts.db = Some(db.clone());
        let refused =
            tokio::time::timeout(Duration::from_secs(5), serve(opts, std::future::pending()))
                .await
                .expect("refused within 5 s");
        assert!(
            matches!(refused, Err(ServeError::DatabaseInUse { .. })),
            "{refused:?}"
        );
        let version: u32 = rusqlite::Connection::open(&db)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, older, "a locked database is left as it was");
    }

    #[tokio::test]
    async fn a_key_file_open_to_others_stops_the_manager() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        drop(DataDir::open(&data).unwrap());
        load_or_create_admin_token(&data).unwrap();
        let token = data.join(ADMIN_TOKEN_FILE);
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = serve(options(&data), std::future::pending())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("chmod 600 {}", token.display())),
            "{e}"
        );
    }
}
