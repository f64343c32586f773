//! HTTPS for the HTTP server: a rustls configuration from PEM files and the
//! handshakes of accepted connections ([`Handshakes`]).
//!
//! Each handshake runs in its connection's own task (bounded in time, at most
//! [`MAX_HANDSHAKES`] at once, and under the server's connection cap), so a slow
//! or silent client never holds up the others; failed handshakes are logged and
//! dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at most; further accepted connections wait for a slot.
pub const MAX_HANDSHAKES: usize = 256;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the certificate or key.
    #[error("TLS certificate and key: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

/// A server configuration from a PEM certificate chain and a PEM private key (HTTP/1.1).
pub fn load_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let pem = |path: &Path, why: String| TlsError::Pem {
        path: path.to_path_buf(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS handshakes of accepted connections: at most [`MAX_HANDSHAKES`] at once, each
/// within [`HANDSHAKE_TIMEOUT`]. The server runs one in each connection's task, under
/// that connection's permit of the connection cap.
#[derive(Clone)]
pub struct Handshakes {
    acceptor: TlsAcceptor,
    running: Arc<Semaphore>,
}

impl Handshakes {
    /// Handshakes with this configuration.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Handshakes {
            acceptor: TlsAcceptor::from(config),
            running: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        }
    }

    /// Completes the handshake on `stream` (waiting for a free slot counts against its
    /// time); `None` when it failed or took too long (logged).
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let _slot = self.running.acquire().await.ok()?;
            Some(self.acceptor.accept(stream).await)
        })
        .await;
        match handshake {
            Ok(Some(Ok(tls))) => Some(tls),
            Ok(Some(Err(e))) => {
                tracing::debug!(%peer, "TLS handshake failed: {e}");
                None
            }
            Ok(None) => None,
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }
}
