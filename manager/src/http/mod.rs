//! The manager's HTTP server: the JSON API under `/api/v1`, its OpenAPI
//! document, Prometheus `/metrics` and the administrators' web UI, over
//! plain HTTP or HTTPS (`--tls-cert/--tls-key`, rustls).
//!
//! Access:
//! - public: `/` (the login form, or the UI once logged in), `/login`,
//!   `/static/*` and `/api/v1/openapi.json`;
//! - everything else needs `Authorization: Bearer <token>` (the admin token
//!   in `<data-dir>/admin.token`, or a named API token from `baton admin token`)
//!   or an administrator's session cookie; a request with a session cookie
//!   that changes something must also carry the session's CSRF token in
//!   `X-CSRF-Token`. Without credentials the answer is `401` and nothing else,
//!   whatever the path.
//! - each credential has a role ([`crate::roles`]): the admin token is `admin`, an API
//!   token or administrator has the role `baton admin` gave it. A request beyond it is
//!   answered `403` with `{"error", "needed", "role"}`; [`crate::roles::ROUTE_ROLES`] is
//!   the one table of which route needs which role.
//!
//! Submodules: [`api`] (jobs, agents, content, uploads), [`content_dirs`] (where files
//! may be published from), [`admin`] (segments,
//! content groups, policies), [`audit`] (recording changes, reading the log), [`metrics`], [`client`] (the client's address,
//! secret comparison), [`conn`] (time bounds of one connection), [`tls`], and [`web`] (the administrators' UI, logins and
//! sessions). Handlers call the service layer ([`crate::service::Manager`]).

pub mod admin;
pub mod api;
pub mod audit;
pub mod client;
pub mod conn;
pub mod content_dirs;
pub mod metrics;
pub mod tls;
pub mod web;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use baton_agent_core::linux::admission::{Admission, AdmissionLimits};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::registry::lock;
use crate::roles::{Role, required_role};
use crate::service::{ApiError, Manager};
use client::{ClientAddr, same_secret};
use web::{SESSION_COOKIE, Web};

pub use api::{job_detail, parse_agent_id, parse_key};

/// The OpenAPI document's fixed parts; the paths come from [`api::routes`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Baton manager API",
        description = "Agents, segments, content groups, policies and jobs of a Baton manager. \
            Authenticate with `Authorization: Bearer <token>` (the admin token or a named API token), \
            or with an administrator's session cookie plus `X-CSRF-Token` on changes."
    ),
    components(schemas(api::ErrorBody)),
    modifiers(&SecuritySchemes),
    security(("bearer" = []), ("session" = []))
)]
pub struct ApiDoc;

/// Adds the two ways to authenticate to the document.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(SESSION_COOKIE))),
        );
    }
}

/// Every authenticated API route with its documentation: the single list the router and
/// the OpenAPI document are both built from.
pub fn api_routes() -> OpenApiRouter<Arc<Manager>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api::routes())
        .merge(crate::http::admin::routes())
        .merge(audit::routes())
}

/// The OpenAPI document served at `/api/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().into_openapi()
}

/// What the HTTP server needs beside the manager.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Administrators, API tokens and sessions.
    pub web: Arc<Web>,
    /// Where uploaded content is stored.
    pub upload_dir: PathBuf,
    /// Where `POST /api/v1/jobs` may publish files from.
    pub content_dirs: content_dirs::ContentDirs,
    /// Largest upload accepted, in bytes (`413` beyond).
    pub max_upload_bytes: u64,
    /// HTTPS: the rustls configuration (`None` = plain HTTP).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Connection and request bounds; a new value (a reload) applies to the connections
    /// accepted after it (`max_body_bytes` only at start).
    pub limits: watch::Receiver<HttpLimits>,
}

/// Default cap on open HTTP connections ([`HttpLimits::max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default time a client has to send a request's headers ([`HttpLimits::header_read_timeout`]).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Default largest request body outside uploads ([`HttpLimits::max_body_bytes`]).
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;
/// Default cap on open HTTP connections from one address ([`HttpLimits::max_connections_per_address`]).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Default slowest average pace of a request body, bytes per second ([`HttpLimits::min_body_rate`]).
pub const DEFAULT_MIN_BODY_RATE: u64 = 4 * 1024;
/// Default time a response may wait for its client to read ([`HttpLimits::write_timeout`]).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What one HTTP client can hold: connections, time, body bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Open connections at most; beyond it new connections wait in the listen backlog
    /// until one closes (default [`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Open connections at most from one address (an IPv6 client by its /64); beyond it
    /// new connections from there are closed at once (default
    /// [`DEFAULT_MAX_CONNECTIONS_PER_ADDRESS`]), so one client cannot take every place.
    pub max_connections_per_address: usize,
    /// Time from the connection's start, or from the end of its previous response
    /// (an idle keep-alive connection), to the end of the next request's headers;
    /// then the connection is closed (default [`DEFAULT_HEADER_READ_TIMEOUT`]).
    pub header_read_timeout: Duration,
    /// Largest JSON or form body any route reads (default [`DEFAULT_MAX_BODY_BYTES`]);
    /// uploads are streamed to disk and capped by [`HttpConfig::max_upload_bytes`].
    pub max_body_bytes: usize,
    /// Slowest average pace of a request body, in bytes per second, after a head start
    /// of `header_read_timeout`; a body that also stays silent for `header_read_timeout`
    /// fails (default [`DEFAULT_MIN_BODY_RATE`]).
    pub min_body_rate: u64,
    /// Time a response's write may wait for the client to read before the connection
    /// is closed (default [`DEFAULT_WRITE_TIMEOUT`]).
    pub write_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            min_body_rate: DEFAULT_MIN_BODY_RATE,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// The role of a request's caller (inserted by the auth layer beside [`Caller`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerRole(pub Role);

/// Who a request is from, for the handlers that care (inserted by the auth layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin token from `<data-dir>/admin.token`.
    AdminToken,
    /// A named API token.
    ApiToken(String),
    /// An administrator's browser session.
    Session(String),
}

#[derive(Debug)]
struct AuthState {
    manager: Arc<Manager>,
    web: Arc<Web>,
}

/// The whole HTTP service over a running manager.
pub fn router(manager: Arc<Manager>, config: &HttpConfig) -> Router {
    let activity = manager.activity.clone();
    let (api, doc) = api_routes().split_for_parts();
    let doc = Arc::new(doc);
    let auth = Arc::new(AuthState {
        manager: manager.clone(),
        web: config.web.clone(),
    });
    let protected = api
        .route("/metrics", get(metrics::metrics))
        // Inside the audit layer: a request beyond its role is recorded as refused.
        .route_layer(middleware::from_fn(require_role))
        .route_layer(middleware::from_fn_with_state(
            manager.clone(),
            audit::record_changes,
        ))
        .fallback(not_found)
        .layer(Extension(api::Uploads {
            dir: config.upload_dir.clone(),
            max_bytes: config.max_upload_bytes,
        }))
        .layer(Extension(config.content_dirs.clone()))
        .layer(Extension(config.web.clone()))
        .layer(middleware::from_fn_with_state(auth, require_credentials))
        .with_state(manager);
    protected
        .route(
            "/api/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .merge(crate::http::web::routes(config.web.clone()))
        .layer(DefaultBodyLimit::max(config.limits.borrow().max_body_bytes))
        .layer(middleware::from_fn_with_state(
            activity,
            refuse_changes_on_standby,
        ))
        .layer(middleware::from_fn(security_headers))
}

/// On a standby manager (and on an active one whose lease ran out by its own clock), every
/// request that would change something (sign-ins included) is refused with 503 and the active manager's API address: the database is the active
/// manager's to write. Reads are served.
async fn refuse_changes_on_standby(
    State(activity): State<Arc<crate::lease::Activity>>,
    req: Request,
    next: Next,
) -> Response {
    if activity.refuses_changes() && changes_something(req.method()) {
        let active = activity.active_manager().and_then(|v| v.http_addr);
        let what = if activity.is_standby() {
            "this manager is a standby (read-only)"
        } else {
            "this manager's lease ran out (it is stepping down)"
        };
        let error = format!(
            "{what}: send changes to the active manager{}",
            active
                .as_deref()
                .map(|a| format!(", whose API is at {a}"))
                .unwrap_or_default()
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": error, "active_http_addr": active })),
        )
            .into_response();
    }
    next.run(req).await
}

/// Serves on `listener` (HTTPS when `config.tls` is set) until `shutdown` completes,
/// then lets the open connections finish their requests.
///
/// What one client can hold is bounded ([`HttpLimits`]): at most
/// `max_connections` connections are open at once, TLS handshakes included (a
/// permit is taken before each accept, as mini-redis does), and at most
/// `max_connections_per_address` from one address (further ones from there are
/// closed at once, so they do not wait in front of others); a TLS handshake has
/// [`tls::HANDSHAKE_TIMEOUT`]; the next request's headers must arrive within
/// `header_read_timeout` (which also ends idle keep-alive connections); a request
/// body must keep arriving at `min_body_rate` ([`conn::PacedBody`]); a response
/// nobody reads fails the connection after `write_timeout` ([`conn::WriteDeadline`]).
/// New limits sent on `config.limits` apply from the next accepted connection: a lower
/// `max_connections` closes nothing and waits until enough connections end.
pub async fn run(
    listener: TcpListener,
    manager: Arc<Manager>,
    config: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(manager, &config);
    let tls = config.tls.clone().map(tls::Handshakes::new);
    serve(listener, app, config.limits, tls, shutdown).await
}

/// The per-address caps of the HTTP port for `limits`. The [`ConnectionCap`] bounds every
/// connection; the admission's own caps sit above it (it keeps half its connection places
/// from handshakes, and an HTTP connection never stops counting as one).
fn per_address_limits(limits: &HttpLimits) -> AdmissionLimits {
    let max = limits.max_connections.max(1);
    AdmissionLimits {
        max_connections: max.saturating_mul(2),
        max_handshakes: max,
        max_handshakes_per_address: limits.max_connections_per_address,
        handshake_timeout: tls::HANDSHAKE_TIMEOUT,
    }
}

async fn serve(
    listener: TcpListener,
    app: Router,
    mut limits_updates: watch::Receiver<HttpLimits>,
    tls: Option<tls::Handshakes>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut limits = *limits_updates.borrow_and_update();
    let cap = ConnectionCap::new(limits.max_connections.max(1));
    let per_address = Admission::new("HTTP", per_address_limits(&limits));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut capped_logged = false;
    // `false` once the sender is gone: the limits stay as they are.
    let mut updates_open = true;
    // Takes new limits (`changed()` has marked them seen).
    let reload = |limits_updates: &mut watch::Receiver<HttpLimits>| {
        let limits = *limits_updates.borrow_and_update();
        cap.set_max(limits.max_connections.max(1));
        let caps = per_address.set_limits(per_address_limits(&limits));
        tracing::info!(
            max_connections = limits.max_connections.max(1),
            max_connections_per_address = caps.max_handshakes_per_address,
            header_read_timeout = ?limits.header_read_timeout,
            "HTTP caps reloaded"
        );
        limits
    };
    loop {
        let place = match cap.try_take() {
            Some(p) => {
                capped_logged = false;
                p
            }
            None => {
                if !capped_logged {
                    tracing::warn!(
                        max = limits.max_connections.max(1),
                        "HTTP connection cap reached: new connections wait until one closes"
                    );
                    capped_logged = true;
                }
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    changed = limits_updates.changed(), if updates_open => {
                        updates_open = changed.is_ok();
                        if updates_open {
                            limits = reload(&mut limits_updates);
                        }
                        continue;
                    }
                    p = cap.take() => p,
                }
            }
        };
        let (stream, peer, address_place) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            // New limits judge the very next connection: take them before it is accepted.
            changed = limits_updates.changed(), if updates_open => {
                updates_open = changed.is_ok();
                if updates_open {
                    limits = reload(&mut limits_updates);
                }
                continue;
            }
            accepted = per_address.accept(&listener) => accepted,
        };
        let app = app.clone();
        let closing = closing_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            // The address's place goes back first (fields drop in order): a connection let in
            // by the freed cap place then finds its address's place free too.
            let _places = (address_place, place);
            match tls {
                None => serve_connection(stream, peer, app, limits, closing).await,
                Some(tls) => {
                    if let Some(stream) = tls.accept(stream, peer).await {
                        serve_connection(stream, peer, app, limits, closing).await;
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection gives its place back when it ends.
    cap.drained().await;
    Ok(())
}

/// At most `max` HTTP connections open at once, `max` changing while they are open (a
/// reload): lowering it closes nothing, new connections wait until enough have ended.
#[derive(Debug)]
struct ConnectionCap {
    /// Connections open, and the most allowed.
    counts: std::sync::Mutex<(usize, usize)>,
    /// Woken when a connection ends or the cap changes.
    changed: Notify,
}

/// One open connection's place under a [`ConnectionCap`], given back on drop.
#[derive(Debug)]
struct CapPlace(Arc<ConnectionCap>);

impl ConnectionCap {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionCap {
            counts: std::sync::Mutex::new((0, max)),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place now, if fewer than `max` connections are open.
    fn try_take(self: &Arc<Self>) -> Option<CapPlace> {
        let mut c = self.lock();
        (c.0 < c.1).then(|| {
            c.0 += 1;
            CapPlace(self.clone())
        })
    }

    /// A place, once fewer than `max` connections are open.
    async fn take(self: &Arc<Self>) -> CapPlace {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the check, so a place freed in between is not missed.
            changed.as_mut().enable();
            if let Some(place) = self.try_take() {
                return place;
            }
            changed.await;
        }
    }

    /// Changes the most connections allowed.
    fn set_max(&self, max: usize) {
        self.lock().1 = max;
        self.changed.notify_waiters();
    }

    /// Completes once no connection is open.
    async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.lock().0 == 0 {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for CapPlace {
    fn drop(&mut self) {
        self.0.lock().0 -= 1;
        self.0.changed.notify_waiters();
    }
}

/// Serves HTTP/1.1 requests on one accepted connection, within `limits`, until it
/// ends or the server closes (then the request in progress finishes).
async fn serve_connection<I>(
    io: I,
    peer: std::net::SocketAddr,
    app: Router,
    limits: HttpLimits,
    mut closing: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use axum::extract::ConnectInfo;
    use tower::ServiceExt as _;

    let body_idle = limits.header_read_timeout;
    let min_rate = limits.min_body_rate;
    let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(ClientAddr(peer)));
        req.map(|body| axum::body::Body::new(conn::PacedBody::new(body, body_idle, min_rate)))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let io = conn::WriteDeadline::new(io, limits.write_timeout);
    let conn = builder.serve_connection(
        hyper_util::rt::TokioIo::new(io),
        hyper_util::service::TowerToHyperService::new(svc),
    );
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(%peer, "HTTP connection ended: {e}");
            }
            return;
        }
        _ = closing.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        tracing::trace!(%peer, "HTTP connection ended: {e}");
    }
}

fn unauthorized() -> Response {
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        Json(json!({
            "error": "missing or wrong credentials: send `Authorization: Bearer <token>` (the token from <data-dir>/admin.token or `baton admin token`), or log in at /"
        })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

fn changes_something(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

async fn require_credentials(
    State(auth): State<Arc<AuthState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let caller = if let Some(token) = bearer {
        if same_secret(token.as_bytes(), auth.manager.admin_token.as_bytes()) {
            Some((Caller::AdminToken, Role::Admin))
        } else {
            let store = auth.web.store.clone();
            tokio::task::spawn_blocking(move || {
                crate::http::web::users::api_token(&**lock(&store), &token)
            })
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten()
            .map(|(name, role)| (Caller::ApiToken(name), role))
        }
    } else if let Some(session) = auth.web.session_of(req.headers()) {
        if changes_something(req.method()) {
            let given = req
                .headers()
                .get(crate::http::web::CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same_secret(given.as_bytes(), session.csrf.as_bytes()) {
                return (
                    StatusCode::FORBIDDEN,
                    Json(json!({ "error": "missing or wrong CSRF token (X-CSRF-Token)" })),
                )
                    .into_response();
            }
        }
        Some((Caller::Session(session.admin), session.role))
    } else {
        None
    };
    match caller {
        Some((caller, role)) => {
            req.extensions_mut().insert(caller);
            req.extensions_mut().insert(CallerRole(role));
            next.run(req).await
        }
        None => unauthorized(),
    }
}

/// The role layer (a route layer, so the route's pattern is known): lets a request through
/// when its caller's role is at least the one [`required_role`] gives its route, else
/// answers `403` naming both.
async fn require_role(req: Request, next: Next) -> Response {
    let pattern = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let needed = required_role(req.method(), &pattern);
    // No role (cannot happen behind the credentials layer): the weakest, so refused.
    let held = req
        .extensions()
        .get::<CallerRole>()
        .map_or(Role::Read, |r| r.0);
    if held.allows(needed) {
        return next.run(req).await;
    }
    (
        StatusCode::FORBIDDEN,
        Json(json!({
            "error": format!(
                "{} {pattern} needs the {needed} role; this credential has {held} (see `baton admin token NAME --role {needed}`)",
                req.method()
            ),
            "needed": needed,
            "role": held,
        })),
    )
        .into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    resp
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route (see /api/v1/openapi.json)".into())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_document_has_every_api_route() {
        let doc = openapi();
        let paths: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        for want in [
            "/api/v1/status",
            "/api/v1/agents",
            "/api/v1/agents/{id}",
            "/api/v1/enrolment-tokens",
            "/api/v1/enrolment-tokens/{id}",
            "/api/v1/jobs",
            "/api/v1/jobs/{id}",
            "/api/v1/jobs/{id}/cancel",
            "/api/v1/jobs/{id}/events",
            "/api/v1/uploads",
            "/api/v1/segments",
            "/api/v1/segments/{name}",
            "/api/v1/groups",
            "/api/v1/groups/{name}",
            "/api/v1/policies",
            "/api/v1/policies/{name}",
            "/api/v1/audit",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["paths"]["/api/v1/jobs"]["post"]["tags"][0], "jobs");
        assert!(json["components"]["securitySchemes"]["bearer"].is_object());
        assert!(json["components"]["schemas"]["JobDetail"].is_object());
        assert!(json["components"]["schemas"]["AuditEntry"].is_object());
        // The audit log is read only.
        assert_eq!(
            json["paths"]["/api/v1/audit"]
                .as_object()
                .map(|ops| ops.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["get".to_string()])
        );
    }

    #[test]
    fn every_route_of_the_document_has_a_role() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut checked = 0;
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                if !["get", "post", "put", "patch", "delete", "head"].contains(&method.as_str()) {
                    continue;
                }
                let method: Method = method.to_uppercase().parse().unwrap();
                assert!(
                    crate::roles::listed_role(&method, path).is_some(),
                    "{method} {path} has no role in roles::ROUTE_ROLES"
                );
                checked += 1;
            }
        }
        assert!(checked >= 25, "only {checked} operations in the document");
        // And the table lists nothing the router does not have (but /metrics, outside it).
        for (method, path, _) in crate::roles::ROUTE_ROLES {
            assert!(
                *path == "/metrics" || paths[*path][method.to_lowercase()].is_object(),
                "{method} {path} is listed but not a route"
            );
        }
    }

    /// Serves a one-route app on a loopback port with `limits`; stops when the sender drops.
    async fn serve_test_app(
        limits: HttpLimits,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let (addr, stop, _no_reloads) = serve_reloadable_test_app(limits).await;
        (addr, stop)
    }

    /// [`serve_test_app`], and the sender of new limits.
    async fn serve_reloadable_test_app(
        limits: HttpLimits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        watch::Sender<HttpLimits>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "hello" })).route(
            "/echo",
            axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (reload, updates) = watch::channel(limits);
        tokio::spawn(serve(listener, app, updates, None, async move {
            let _ = stopped.await;
        }));
        (addr, stop, reload)
    }

    /// Reads until the server closes; `Err` when that takes longer than `bound`.
    async fn closed_within(
        stream: &mut tokio::net::TcpStream,
        bound: Duration,
    ) -> Result<Vec<u8>, ()> {
        use tokio::io::AsyncReadExt as _;
        let mut got = Vec::new();
        match tokio::time::timeout(bound, stream.read_to_end(&mut got)).await {
            Ok(_) => Ok(got),
            Err(_) => Err(()),
        }
    }

    #[test]
    fn the_default_limits_close_silent_connections_within_30_s() {
        let d = HttpLimits::default();
        assert!(d.header_read_timeout <= Duration::from_secs(30));
        assert!(d.max_connections >= 64);
        assert!(d.max_body_bytes <= 2 * 1024 * 1024);
    }

    #[tokio::test]
    async fn a_silent_or_slow_connection_is_closed_after_the_header_timeout() {
        use tokio::io::AsyncWriteExt as _;
        let limits = HttpLimits {
            header_read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        let (addr, _stop) = serve_test_app(limits).await;
        let start = std::time::Instant::now();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        closed_within(&mut silent, Duration::from_secs(5))
            .await
            .expect("silent connection still open");
        closed_within(&mut slow, Duration::from_secs(5))
            .await
            .expect("slow connection still open");
        assert!(start.elapsed() < Duration::from_secs(5));

        // An idle keep-alive connection ends the same way after its response.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let got = closed_within(&mut idle, Duration::from_secs(5))
            .await
            .expect("idle connection still open");
        assert!(String::from_utf8_lossy(&got).contains("hello"));
    }

    #[tokio::test]
    async fn a_withheld_or_trickled_body_closes_its_connection() {
        use tokio::io::AsyncWriteExt as _;
        let limits = HttpLimits {
            header_read_timeout: Duration::from_millis(300),
            min_body_rate: 10_000,
            ..HttpLimits::default()
        };
        let (addr, _stop) = serve_test_app(limits).await;
        let start = std::time::Instant::now();
        // Headers promise 100,000 bytes; 10 come, then nothing.
        let mut withheld = tokio::net::TcpStream::connect(addr).await.unwrap();
        withheld
            .write_all(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789",
            )
            .await
            .unwrap();
        // Another sends 10 bytes every 50 ms: never silent, far below the rate.
        let mut trickled = tokio::net::TcpStream::connect(addr).await.unwrap();
        trickled
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            .await
            .unwrap();
        let trickle = tokio::spawn(async move {
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if trickled.write_all(b"0123456789").await.is_err() {
                    break;
                }
            }
            start.elapsed()
        });
        closed_within(&mut withheld, Duration::from_secs(5))
            .await
            .expect("a withheld body kept its connection");
        let cut_after = trickle.await.unwrap();
        assert!(
            cut_after < Duration::from_secs(5),
            "trickle went on {cut_after:?}"
        );
        // A body sent at once is served.
        let mut whole = tokio::net::TcpStream::connect(addr).await.unwrap();
        whole
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nabcde")
            .await
            .unwrap();
        let got = closed_within(&mut whole, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&got).ends_with("\r\n\r\n5"));
    }

    #[tokio::test]
    async fn the_connection_cap_is_whole_for_many_addresses() {
        use tokio::io::AsyncWriteExt as _;
        let limits = HttpLimits {
            max_connections: 8,
            max_connections_per_address: 2,
            ..HttpLimits::default()
        };
        let (addr, _stop) = serve_test_app(limits).await;
        // Seven held from four loopback addresses: all admitted (none over its address's 2).
        let mut held = Vec::new();
        for i in 0..7u8 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(([127, 0, 1, 1 + i / 2], 0).into()).unwrap();
            held.push(socket.connect(addr).await.unwrap());
        }
        // The eighth place serves a request.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 2, 1], 0).into()).unwrap();
        let mut eighth = socket.connect(addr).await.unwrap();
        eighth
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = closed_within(&mut eighth, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&got).contains("hello"));
        drop(held);
    }

    #[tokio::test]
    async fn connections_beyond_the_per_address_cap_are_closed_at_once() {
        use tokio::io::AsyncWriteExt as _;
        let limits = HttpLimits {
            max_connections_per_address: 3,
            ..HttpLimits::default()
        };
        let (addr, _stop) = serve_test_app(limits).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The fourth from the same address is closed without an answer...
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = fourth.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let got = closed_within(&mut fourth, Duration::from_secs(5))
            .await
            .expect("over the per-address cap, yet left open");
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        // ... and once one closes, a new one is served.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = closed_within(&mut next, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&got).contains("hello"));
    }

    #[tokio::test]
    async fn reloaded_caps_apply_to_the_next_connections() {
        use tokio::io::AsyncWriteExt as _;
        const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let limits = HttpLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(30),
            ..HttpLimits::default()
        };
        let (addr, _stop, reload) = serve_reloadable_test_app(limits).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        second.write_all(GET).await.unwrap();
        closed_within(&mut second, Duration::from_millis(500))
            .await
            .expect_err("served beyond a cap of one");
        // A higher cap lets the waiting connection in while the first stays open.
        reload
            .send(HttpLimits {
                max_connections: 2,
                ..limits
            })
            .unwrap();
        let got = closed_within(&mut second, Duration::from_secs(5))
            .await
            .expect("still waiting after the cap was raised");
        assert!(String::from_utf8_lossy(&got).contains("hello"));
        // A shorter header timeout and a per-address cap of one judge the next connection:
        // the first (held since before) stays, the next from its address is closed at once.
        reload
            .send(HttpLimits {
                max_connections: 8,
                max_connections_per_address: 1,
                header_read_timeout: Duration::from_millis(300),
                ..limits
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = third.write_all(GET).await;
        let got = closed_within(&mut third, Duration::from_secs(5))
            .await
            .expect("over the reloaded per-address cap, yet left open");
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        // The first keeps the 30 s header timeout it was accepted with.
        closed_within(&mut first, Duration::from_millis(800))
            .await
            .expect_err("the reloaded 300 ms header timeout closed a connection accepted before");
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 3, 1], 0).into()).unwrap();
        let mut silent = socket.connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        closed_within(&mut silent, Duration::from_secs(3))
            .await
            .expect("a silent connection outlived the reloaded 300 ms header timeout");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_one_to_close() {
        use tokio::io::AsyncWriteExt as _;
        let limits = HttpLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(800),
            ..HttpLimits::default()
        };
        let (addr, _stop) = serve_test_app(limits).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = std::time::Instant::now();
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        second
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = closed_within(&mut second, Duration::from_secs(5))
            .await
            .expect("second never served");
        assert!(String::from_utf8_lossy(&got).contains("hello"));
        // Served only once the first (silent) connection was closed by its timeout.
        assert!(
            start.elapsed() >= Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        closed_within(&mut first, Duration::from_secs(1))
            .await
            .expect("first still open");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
