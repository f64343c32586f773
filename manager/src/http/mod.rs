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
//!
//! Submodules: [`api`] (jobs, agents, content, uploads), [`admin`] (segments,
//! content groups, policies), [`metrics`], [`client`] (the client's address,
//! secret comparison), [`tls`], and [`web`] (the administrators' UI, logins and
//! sessions). Handlers call the service layer ([`crate::service::Manager`]).

pub mod admin;
pub mod api;
pub mod client;
pub mod metrics;
pub mod tls;
pub mod web;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::registry::lock;
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
    /// Largest upload accepted, in bytes (`413` beyond).
    pub max_upload_bytes: u64,
    /// HTTPS: the rustls configuration (`None` = plain HTTP).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

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
    let (api, doc) = api_routes().split_for_parts();
    let doc = Arc::new(doc);
    let auth = Arc::new(AuthState {
        manager: manager.clone(),
        web: config.web.clone(),
    });
    let protected = api
        .route("/metrics", get(metrics::metrics))
        .fallback(not_found)
        .layer(Extension(api::Uploads {
            dir: config.upload_dir.clone(),
            max_bytes: config.max_upload_bytes,
        }))
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
        .layer(middleware::from_fn(security_headers))
}

/// Serves on `listener` (HTTPS when `config.tls` is set) until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    manager: Arc<Manager>,
    config: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(manager, &config);
    match config.tls {
        None => {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<ClientAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
        Some(tls) => {
            axum::serve(
                tls::TlsListener::new(listener, tls),
                app.into_make_service_with_connect_info::<ClientAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
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
            Some(Caller::AdminToken)
        } else {
            let store = auth.web.store.clone();
            tokio::task::spawn_blocking(move || {
                crate::http::web::users::api_token_name(&**lock(&store), &token)
            })
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten()
            .map(Caller::ApiToken)
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
        Some(Caller::Session(session.admin))
    } else {
        None
    };
    match caller {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None => unauthorized(),
    }
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
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["paths"]["/api/v1/jobs"]["post"]["tags"][0], "jobs");
        assert!(json["components"]["securitySchemes"]["bearer"].is_object());
        assert!(json["components"]["schemas"]["JobDetail"].is_object());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
