//! The `baton` command's subcommands, and the HTTP client the client commands share.
//!
//! `baton serve` runs the manager in this process; every other manager
//! command (`enroll`, `push`, `jobs`, `job`, `agents`, `segments`, `groups`,
//! `policies`, `audit`) is a client of its
//! HTTP API. The client finds the manager through `--manager-url` and
//! `--admin-token`, or else through the manager's data directory: `admin.token`
//! and the `serve.json` a running manager keeps there.

pub mod admin;
pub mod audit;
pub mod config_file;
pub mod db;
pub mod definitions;
pub mod enroll;
pub mod keys;
pub mod push;
pub mod segments;
pub mod serve;
pub mod show;
pub mod trust;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use baton_manager::serve::{ADMIN_TOKEN_FILE, ReadyInfo, STATUS_FILE};
use clap::Args;
use serde::de::DeserializeOwned;

/// Where the client commands find the manager.
#[derive(Args, Debug, Clone)]
pub struct ClientOpts {
    /// The manager's data directory, read for `admin.token` and `serve.json`.
    #[arg(long, env = "BATON_DATA_DIR", default_value = "baton-data")]
    pub data_dir: PathBuf,
    /// The manager's HTTP API, e.g. http://127.0.0.1:7780 (default: from the data directory).
    #[arg(long, env = "BATON_MANAGER_URL")]
    pub manager_url: Option<String>,
    /// The admin bearer token (default: `<data-dir>/admin.token`).
    #[arg(long, env = "BATON_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Certificates (PEM) to trust for an https manager URL (default: the certificate the
    /// manager in --data-dir serves, else the system's bundle).
    #[arg(long, env = "BATON_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
}

/// The system's CA bundle (Debian and derivatives).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS settings that trust the certificates in `pem` (a file of one or more PEM certificates).
fn tls_trusting(pem: &Path) -> anyhow::Result<ureq::tls::TlsConfig> {
    let bytes = std::fs::read(pem).with_context(|| {
        format!(
            "cannot read the certificates to trust for https, {} — pass --ca-cert",
            pem.display()
        )
    })?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => bail!("{}: not PEM certificates: {e}", pem.display()),
        }
    }
    if certs.is_empty() {
        bail!("{}: no PEM certificate in it", pem.display());
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .unversioned_rustls_crypto_provider(provider)
        .build())
}

/// An HTTP client of one manager.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
    streaming: ureq::Agent,
}

/// The URL for an `ip:port` the manager bound (an unspecified address means this host).
fn url_for(addr: &str, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    match addr.parse::<std::net::SocketAddr>() {
        Ok(mut a) => {
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("{scheme}://{a}")
        }
        Err(_) => format!("{scheme}://{addr}"),
    }
}

impl Client {
    /// A client for the manager `opts` point at.
    pub fn new(opts: &ClientOpts) -> anyhow::Result<Self> {
        let status: Option<ReadyInfo> = std::fs::read(opts.data_dir.join(STATUS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let base = match (&opts.manager_url, &status) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(info)) => url_for(&info.http_addr, info.tls_cert.is_some()),
            (None, None) => "http://127.0.0.1:7780".to_string(),
        };
        let token = match &opts.admin_token {
            Some(t) => t.trim().to_string(),
            None => {
                let path = opts.data_dir.join(ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .with_context(|| {
                        format!(
                            "no admin token: cannot read {} — pass --admin-token, or --data-dir pointing at the manager's data directory",
                            path.display()
                        )
                    })?
            }
        };
        let tls = if base.starts_with("https://") {
            let served = status.as_ref().and_then(|i| i.tls_cert.clone());
            let pem = opts
                .ca_cert
                .clone()
                .or(served)
                .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
            tls_trusting(&pem)?
        } else {
            ureq::tls::TlsConfig::default()
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(600)))
            .tls_config(tls.clone())
            .build()
            .into();
        let streaming = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .tls_config(tls)
            .build()
            .into();
        Ok(Client {
            base,
            token,
            agent,
            streaming,
        })
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach manager at {}: {e} — is `baton serve` running? (--manager-url)",
            self.base
        )
    }

    fn check(&self, mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<ureq::Body> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(text);
        if status.as_u16() == 401 {
            bail!(
                "the manager at {} refused the admin token ({msg}); check --admin-token or --data-dir",
                self.base
            );
        }
        bail!("the manager answered {status}: {msg}")
    }

    /// Adds the admin token to a request.
    fn authorised<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        request.header("Authorization", format!("Bearer {}", self.token))
    }

    /// The JSON answer to a request sent as `method path`, or why there is none.
    fn answer<T: DeserializeOwned>(
        &self,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        method: &str,
        path: &str,
    ) -> anyhow::Result<T> {
        self.check(sent.map_err(|e| self.unreachable(e))?)?
            .read_json()
            .with_context(|| format!("unexpected answer to {method} {path}"))
    }

    /// `GET path` as JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let request = self.agent.get(format!("{}{path}", self.base));
        self.answer(self.authorised(request).call(), "GET", path)
    }

    /// `POST path` with a JSON body, answer as JSON.
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let request = self.agent.post(format!("{}{path}", self.base));
        self.answer(self.authorised(request).send_json(body), "POST", path)
    }

    /// `PUT path` with a JSON body, answer as JSON.
    pub fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let request = self.agent.put(format!("{}{path}", self.base));
        self.answer(self.authorised(request).send_json(body), "PUT", path)
    }

    /// `PATCH path` with a JSON body, answer as JSON.
    pub fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let request = self.agent.patch(format!("{}{path}", self.base));
        self.answer(self.authorised(request).send_json(body), "PATCH", path)
    }

    /// `DELETE path`, answer as JSON.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let request = self.agent.delete(format!("{}{path}", self.base));
        self.answer(self.authorised(request).call(), "DELETE", path)
    }

    /// Follows a server-sent events stream, calling `on_event(name, data)` until it ends or
    /// `on_event` returns `false`.
    pub fn follow(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &str) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let resp = self
            .authorised(self.streaming.get(format!("{}{path}", self.base)))
            .header("Accept", "text/event-stream")
            .call()
            .map_err(|e| self.unreachable(e))?;
        let body = self.check(resp)?;
        let reader = std::io::BufReader::new(body.into_reader());
        let (mut name, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let line = line.context("the manager's event stream broke off")?;
            if line.is_empty() {
                if !data.is_empty() {
                    let event = if name.is_empty() { "message" } else { &name };
                    if !on_event(event, &data)? {
                        return Ok(());
                    }
                }
                name.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        Ok(())
    }
}

/// Reads a size argument: `65536`, `64KiB`, `64MiB`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    baton_agent_core::linux::size::parse_size(s).map_err(|e| e.to_string())
}

/// Formats bytes for people.
pub fn format_size(bytes: u64) -> String {
    baton_agent_core::linux::size::format_size(bytes)
}

/// Formats a Unix time as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_time(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Flags of a command on one named thing.
#[derive(Args, Debug, Clone)]
pub struct NamedArgs {
    /// The name.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// A name as one URL path segment: every byte but `A-Z a-z 0-9 - . _ ~` percent-encoded
/// (segment names may hold `/`).
pub fn path_part(name: &str) -> anyhow::Result<String> {
    if name.is_empty() {
        bail!("give a name");
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn times_and_urls() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(url_for("0.0.0.0:7780", false), "http://127.0.0.1:7780");
        assert_eq!(url_for("10.0.0.1:80", false), "http://10.0.0.1:80");
        assert_eq!(url_for("0.0.0.0:7443", true), "https://127.0.0.1:7443");
    }
}
