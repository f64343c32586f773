//! `baton serve`: runs the manager until Ctrl-C or SIGTERM.
//!
//! `SIGHUP` re-reads the command line's `--config` file: the serial ports
//! (`serial`), the log filter (`log`), the agent port's caps (`max-connections`,
//! `max-handshakes`, `max-handshakes-per-address`, `handshake-timeout`) and the HTTP
//! port's (`max-http-connections`, `max-http-connections-per-address`,
//! `http-header-timeout`) — caps judge the next connections — and the manager's upload
//! cap (`up-bps`: every transfer at once, the planner at its next adaptation) change at
//! once, without dropping any session; every other setting changes at the next restart,
//! and the reload says which ones were changed. A file that no longer parses is refused
//! with its error and the running settings stay.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use baton_manager::serve::{ServeOptions, serve_reloading};
use clap::Args;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The longest `--install-deadline` taken (7 days): the engine adds it to its clock.
pub const MAX_INSTALL_DEADLINE_SECS: u64 = 7 * 24 * 3600;

/// Flags of `baton serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Read settings from this TOML file: each key is a flag's long name (`listen =
    /// "0.0.0.0:7700"`, `serial = ["/dev/ttyUSB0"]`); flags and the environment win, unknown
    /// keys are refused.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for keys, the admin token, the database and `serve.json`.
    #[arg(long, env = "BATON_DATA_DIR", default_value = "baton-data")]
    pub data_dir: PathBuf,
    /// The database: a SQLite file (default `<data-dir>/baton.db`), or a PostgreSQL
    /// database as a URL, `postgres://USER@HOST:PORT/DBNAME` (also `postgresql://`; a unix
    /// socket: `postgresql:///DBNAME?host=/run/postgresql`) or `host=... dbname=...`. Its
    /// password never goes here: see --db-password-file.
    #[arg(long, value_name = "FILE|URL")]
    pub db: Option<PathBuf>,
    /// File whose first line is the PostgreSQL password. Without it the password comes
    /// from the environment, `BATON_DB_PASSWORD` or else `PGPASSWORD`; with neither, none
    /// is sent (a trusted or peer-authenticated unix socket).
    #[arg(long, value_name = "FILE")]
    pub db_password_file: Option<PathBuf>,
    /// On PostgreSQL, where several managers share the database (one active, the others
    /// standing by): seconds the active manager's lease lasts unless renewed (every third of
    /// it). A standby takes over within about this long after the active one stops. 1 to 10.
    #[arg(long, default_value_t = baton_manager::lease::DEFAULT_LEASE_TTL.as_secs(), value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=baton_manager::lease::MAX_LEASE_TTL.as_secs()))]
    pub lease_ttl: u64,
    /// Address of the agent port (port 0 picks a free one).
    #[arg(long, default_value = "0.0.0.0:7700")]
    pub listen: SocketAddr,
    /// Address of the HTTP API (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7780")]
    pub http: SocketAddr,
    /// Cap on the manager's upload to agents, e.g. `10MiB` (per second; default: none).
    #[arg(long, value_parser = super::parse_size)]
    pub up_bps: Option<u64>,
    /// Give up on a participant that makes no progress and is not connected for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub give_up: u64,
    /// Seconds a confirmed participant whose agent installs content (`baton agent --install`)
    /// has to report running, failed or rolled back (restarts included); then it is failed.
    /// At most 604800 (7 days).
    #[arg(long, default_value_t = 1800, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=MAX_INSTALL_DEADLINE_SECS))]
    pub install_deadline: u64,
    /// Write `{agent_addr, http_addr, manager_key, publisher_key?, admin_token, epoch}` as JSON
    /// here (atomically) once listening.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Most agent connections at once; fewer if the descriptor limit (raised to the hard
    /// limit at start) less a reserve of 256 + --max-http-connections + 1 per serial port says so.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub max_connections: usize,
    /// Most agent handshakes in progress at once; connections beyond it are closed at once.
    #[arg(long, default_value_t = baton_manager::agent_port::DEFAULT_MAX_HANDSHAKES, value_name = "N")]
    pub max_handshakes: usize,
    /// Most agent handshakes in progress at once from one address (IPv6: one /64).
    #[arg(long, default_value_t = baton_manager::agent_port::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS, value_name = "N")]
    pub max_handshakes_per_address: usize,
    /// Seconds an agent connection (or a serial session, from its first bytes) has to finish
    /// its handshake.
    #[arg(long, default_value_t = baton_agent_core::linux::admission::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(), value_name = "SECS")]
    pub handshake_timeout: u64,
    /// A serial port with a device on it, e.g. /dev/ttyUSB0 or a pty (repeat for more).
    #[arg(long = "serial", value_name = "PATH")]
    pub serial: Vec<PathBuf>,
    /// Serve the HTTP API and web UI over HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Largest content upload over HTTP (`POST /api/v1/uploads`), e.g. `512MiB`; larger ones get 413.
    #[arg(long, value_parser = super::parse_size, default_value = "4GiB")]
    pub max_upload: u64,
    /// Seconds an HTTP client has to send a request's headers (also ends idle keep-alive
    /// connections after this long).
    #[arg(long, default_value_t = baton_manager::http::DEFAULT_HEADER_READ_TIMEOUT.as_secs(), value_name = "SECS")]
    pub http_header_timeout: u64,
    /// Most HTTP connections open at once; more wait until one closes.
    #[arg(long, default_value_t = baton_manager::http::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_http_connections: usize,
    /// Most HTTP connections open at once from one address (an IPv6 client: its /64);
    /// more from there are closed at once.
    #[arg(long, default_value_t = baton_manager::http::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, value_name = "N")]
    pub max_http_connections_per_address: usize,
    /// Highest segment election score an agent's certificate allows, whatever the score
    /// recorded for it (at its first report, or with `baton agents score`); peers use
    /// min(declared, certified). Default: the highest capability score (no extra cap).
    #[arg(long, default_value_t = baton_protocol::discovery::MAX_CAPABILITY_SCORE, value_name = "N")]
    pub max_election_score: u32,
    /// A directory the API may publish files from by path (`baton push FILE`, `POST
    /// /api/v1/jobs`), beside the upload directory; repeat for more. Symlinks are resolved
    /// first; the data directory, the database and the TLS key are never published.
    /// Default: none (uploads only).
    #[arg(long = "content-dir", value_name = "DIR")]
    pub content_dirs: Vec<PathBuf>,
    /// A publisher key file (`baton keys new`) to sign content online with (`baton push
    /// FILE` without `--manifest`), only for the names the newest trust document lists it
    /// for. Default: none — the manager publishes offline-signed manifests only (`baton
    /// sign`), and holds no key that can make content acceptable.
    #[arg(long, value_name = "FILE")]
    pub publisher_key: Option<PathBuf>,
    /// A signed trust document (`baton trust init|sign`) to take at start, as `baton trust
    /// push` would: stored if it chains from the newest held (or is the first), ignored
    /// if older.
    #[arg(long, value_name = "FILE")]
    pub trust: Option<PathBuf>,
    /// What to log, in `RUST_LOG`'s syntax: a level (`info`, `debug`) or per-module levels
    /// (`info,baton_manager=debug`). Default: the environment's RUST_LOG, else `info`.
    /// Changes on SIGHUP.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// How long agent certificates are valid, e.g. `24h`, `30m`, `7d` (5 minutes to 30
    /// days). Each is renewed over the agent's live session at half its lifetime; an agent
    /// kept offline longer is refused by its peers until it reconnects, and a revocation
    /// stays in the signed revocation list this long.
    #[arg(long, default_value = "24h", value_parser = parse_cert_lifetime, value_name = "DURATION")]
    pub cert_lifetime: Duration,
    /// Tests only: a certificate lifetime in seconds below --cert-lifetime's bounds (at
    /// least 2).
    #[arg(long, hide = true, value_name = "SECS")]
    pub cert_lifetime_secs: Option<u64>,
}

/// Shortest `--cert-lifetime`.
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// Longest `--cert-lifetime`.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// Reads `--cert-lifetime` (a duration such as `24h`) within its bounds.
fn parse_cert_lifetime(text: &str) -> Result<Duration, String> {
    let secs = super::enroll::parse_duration_secs(text).map_err(|e| format!("{e:#}"))?;
    let d = Duration::from_secs(secs);
    if d < MIN_CERT_LIFETIME || d > MAX_CERT_LIFETIME {
        return Err(format!(
            "{text:?} is outside 5m..30d (a certificate renewed every few minutes costs a database write each time; one that lives longer than a month keeps a revocation in every agent's list as long)"
        ));
    }
    Ok(d)
}

impl ServeArgs {
    /// The log filter: `--log`, else the environment's RUST_LOG, else `info`.
    pub fn log_filter(&self) -> String {
        self.log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_string())
    }

    /// The server options these flags describe.
    pub fn options(&self) -> ServeOptions {
        ServeOptions {
            data_dir: self.data_dir.clone(),
            db: self.db.clone(),
            db_password_file: self.db_password_file.clone(),
            listen: self.listen,
            http: self.http,
            up_bps: self.up_bps.unwrap_or(0),
            give_up: Duration::from_secs(self.give_up.max(1)),
            install_deadline: Duration::from_secs(
                self.install_deadline.clamp(1, MAX_INSTALL_DEADLINE_SECS),
            ),
            ready_file: self.ready_file.clone(),
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_address: self.max_handshakes_per_address,
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            serial: self.serial.clone(),
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            max_upload: self.max_upload,
            http_limits: baton_manager::http::HttpLimits {
                header_read_timeout: Duration::from_secs(self.http_header_timeout.max(1)),
                max_connections: self.max_http_connections.max(1),
                max_connections_per_address: self.max_http_connections_per_address.max(1),
                ..baton_manager::http::HttpLimits::default()
            },
            max_election_score: self.max_election_score,
            content_dirs: self.content_dirs.clone(),
            publisher_key: self.publisher_key.clone(),
            trust: self.trust.clone(),
            lease_ttl: Duration::from_secs(self.lease_ttl),
            cert_lifetime: self
                .cert_lifetime_secs
                .map_or(self.cert_lifetime, |s| Duration::from_secs(s.max(2))),
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn terminated() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => ctrl_c.await,
    }
}

/// Settings a reload applies while the manager runs (the others wait for a restart).
const RELOADED_AT_ONCE: [&str; 10] = [
    "serial",
    "log",
    "max-connections",
    "max-handshakes",
    "max-handshakes-per-address",
    "handshake-timeout",
    "max-http-connections",
    "max-http-connections-per-address",
    "http-header-timeout",
    "up-bps",
];

/// Reads the settings again (the command line and its `--config` file): the flags, and
/// the file's settings as `--KEY=VALUE` arguments.
pub type Reread = Box<dyn FnMut() -> anyhow::Result<(ServeArgs, Vec<OsString>)> + Send>;

/// The log filter that a reload replaces.
type LogFilter = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Logs to stderr through `filter`; returns the handle that replaces the filter.
fn init_logging(filter: &str) -> anyhow::Result<LogFilter> {
    let filter = EnvFilter::try_new(filter).with_context(|| {
        format!("log filter {filter:?} (from --log, `log` in --config, or RUST_LOG)")
    })?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .init();
    Ok(handle)
}

/// Runs `baton serve`; `from_file` are the settings its `--config` file gave, `reread`
/// reads them again on SIGHUP.
pub fn run(args: ServeArgs, from_file: Vec<OsString>, reread: Reread) -> anyhow::Result<()> {
    let log_filter = init_logging(&args.log_filter())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let opts = args.options();
    let data_dir = opts.data_dir.clone();
    runtime
        .block_on(async move {
            let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
            // Registered before the manager starts, so a SIGHUP never ends the process.
            let hangups = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
            let reloads = tokio::spawn(reload_on_hangup(
                hangups, from_file, reread, log_filter, reload_tx,
            ));
            let served = serve_reloading(opts, terminated(), reload_rx).await;
            reloads.abort();
            Ok::<_, anyhow::Error>(served?)
        })
        .with_context(|| format!("manager (data directory {})", data_dir.display()))?;
    Ok(())
}

/// On each SIGHUP: reads the settings again, replaces the log filter, hands the options to
/// the manager (which applies the serial ports and the agent port's caps), and logs which
/// changed settings wait for a restart.
async fn reload_on_hangup(
    mut hangups: Signal,
    mut current: Vec<OsString>,
    mut reread: Reread,
    log_filter: LogFilter,
    reloaded: tokio::sync::mpsc::Sender<ServeOptions>,
) {
    while hangups.recv().await.is_some() {
        let (args, from_file) = match reread() {
            Ok(settings) => settings,
            Err(e) => {
                tracing::error!(
                    "SIGHUP: configuration not reloaded, the running settings stay: {e:#}"
                );
                continue;
            }
        };
        let wanted = args.log_filter();
        let filter = match EnvFilter::try_new(&wanted) {
            Ok(filter) => filter,
            Err(e) => {
                tracing::error!("SIGHUP: configuration not reloaded: log = {wanted:?}: {e}");
                continue;
            }
        };
        if let Err(e) = log_filter.reload(filter) {
            tracing::error!("SIGHUP: the log filter was not replaced: {e}");
        }
        if reloaded.send(args.options()).await.is_err() {
            return;
        }
        let changed = super::config_file::changed_keys(&current, &from_file);
        let at_restart: Vec<&str> = changed
            .iter()
            .map(String::as_str)
            .filter(|k| !RELOADED_AT_ONCE.contains(k))
            .collect();
        if !at_restart.is_empty() {
            tracing::warn!(
                "SIGHUP: these changed settings take effect at the next restart: {}",
                at_restart.join(", ")
            );
        }
        tracing::info!(changed = %changed.join(", "), "SIGHUP: configuration reloaded");
        current = from_file;
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn the_install_deadline_is_at_most_seven_days() {
        let parse = |secs: &str| Cmd::try_parse_from(["serve", "--install-deadline", secs]);
        let ok = parse("604800").unwrap();
        assert_eq!(
            ok.serve.options().install_deadline,
            Duration::from_secs(604_800)
        );
        assert!(parse("604801").is_err());
        assert!(parse(&u64::MAX.to_string()).is_err());
    }
}
