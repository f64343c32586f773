//! The audit log over HTTP: the layer that records every change made through the API,
//! and `GET /api/v1/audit`, which reads the log (it has no route that writes it).
//!
//! Every request with credentials and a method that changes something (anything but
//! `GET`, `HEAD`, `OPTIONS`) is recorded once answered: the caller ([`Caller`]), the
//! client's IP address, the action (named from the route, e.g. `group.create`), its
//! target (the route's path parameters, or what the handler names in an
//! [`AuditTarget`] on its answer, e.g. the group a `POST` created), and the result:
//! `ok` for a 2xx answer, else `refused` with the status and the answer's `error`.
//! Requests without valid credentials are not recorded (they change nothing, and
//! anyone could send them to push real entries out of the bounded log).

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, MatchedPath, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Caller;
use super::client::ClientAddr;
use crate::registry::lock;
use crate::service::{ApiError, Manager};
use crate::store::{AUDIT_MAX_TEXT, AuditEntry, truncate_text};

/// What a change was done to, when the path does not say (a name in the body, a job
/// just created): a handler puts it in its answer's extensions for the audit layer.
#[derive(Clone, Debug)]
pub struct AuditTarget(pub String);

impl AuditTarget {
    /// Adds this target to `response`.
    pub fn on(self, response: impl IntoResponse) -> Response {
        let mut response = response.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// Largest error answer the layer reads to find its `error` text.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// The action's name for a route (method and path pattern); unnamed routes are
/// recorded as `METHOD pattern`.
fn action_name(method: &str, pattern: &str) -> String {
    let named = match (method, pattern) {
        ("POST", "/api/v1/agents") => "agent.enrol",
        ("PATCH", "/api/v1/agents/{id}") => "agent.place",
        ("POST", "/api/v1/agents/{id}/revoke") => "agent.revoke",
        ("POST", "/api/v1/enrolment-tokens") => "enrolment-token.create",
        ("POST", "/api/v1/jobs") => "job.start",
        ("POST", "/api/v1/jobs/{id}/cancel") => "job.cancel",
        ("POST", "/api/v1/jobs/{id}/pause") => "job.pause",
        ("POST", "/api/v1/jobs/{id}/resume") => "job.resume",
        ("POST", "/api/v1/jobs/{id}/approve") => "job.approve",
        ("POST", "/api/v1/jobs/{id}/abort") => "job.abort",
        ("POST", "/api/v1/uploads") => "content.upload",
        ("PUT", "/api/v1/trust") => "trust.push",
        ("POST", "/api/v1/groups") => "group.create",
        ("PUT", "/api/v1/groups/{name}") => "group.edit",
        ("DELETE", "/api/v1/groups/{name}") => "group.delete",
        ("POST", "/api/v1/policies") => "policy.create",
        ("PUT", "/api/v1/policies/{name}") => "policy.edit",
        ("DELETE", "/api/v1/policies/{name}") => "policy.delete",
        _ => return format!("{method} {pattern}"),
    };
    named.to_string()
}

/// The path's values of the pattern's `{parameters}`, joined by `/`.
fn path_parameters(pattern: &str, path: &str) -> String {
    pattern
        .split('/')
        .zip(path.split('/'))
        .filter(|(p, _)| p.starts_with('{'))
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// `via` and `who` of an entry for `caller`.
pub fn caller_fields(caller: Option<&Caller>) -> (&'static str, String) {
    match caller {
        Some(Caller::AdminToken) => ("admin-token", String::new()),
        Some(Caller::ApiToken(name)) => ("api-token", name.clone()),
        Some(Caller::Session(name)) => ("session", name.clone()),
        None => ("unknown", String::new()),
    }
}

/// The audit layer (a route layer inside the credentials check, so the [`Caller`] and
/// the matched route are known): records each changing request once answered.
pub async fn record_changes(State(m): State<Arc<Manager>>, req: Request, next: Next) -> Response {
    if !super::changes_something(req.method()) {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let pattern = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let (via, who) = caller_fields(req.extensions().get::<Caller>());
    let address = req
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map(|c| c.0.0.ip().to_string())
        .unwrap_or_default();
    let response = next.run(req).await;
    let status = response.status();
    let target = match response.extensions().get::<AuditTarget>() {
        Some(t) => t.0.clone(),
        None => path_parameters(&pattern, &path),
    };
    let (response, error) = if status.is_success() {
        (response, None)
    } else {
        let (response, error) = error_of(response).await;
        (response, Some(error))
    };
    let entry = AuditEntry {
        id: 0,
        at: 0,
        via: via.into(),
        who,
        address,
        action: action_name(&method, &pattern),
        target: truncate_text(&target, AUDIT_MAX_TEXT),
        result: if status.is_success() { "ok" } else { "refused" }.into(),
        status: Some(status.as_u16()),
        error: error.map(|e| truncate_text(&e, AUDIT_MAX_TEXT)),
    };
    crate::audit::record(&mut **lock(&m.store), entry);
    response
}

/// The `error` text of an error answer (the answer is passed on whole): read when the
/// body is small, as the API's `{"error": ...}` answers are; a larger one is passed on
/// unread, with no text.
async fn error_of(response: Response) -> (Response, String) {
    let (parts, body) = response.into_parts();
    let small = axum::body::HttpBody::size_hint(&body)
        .upper()
        .is_some_and(|n| n <= MAX_ERROR_BODY as u64);
    if !small {
        return (Response::from_parts(parts, body), String::new());
    }
    match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(bytes) => {
            let error = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            (
                Response::from_parts(parts, axum::body::Body::from(bytes)),
                error,
            )
        }
        Err(e) => (
            Response::from_parts(parts, axum::body::Body::empty()),
            format!("(the answer could not be read: {e})"),
        ),
    }
}

/// The audit log's route with its OpenAPI operation (read only).
pub fn routes() -> OpenApiRouter<Arc<Manager>> {
    OpenApiRouter::new().routes(routes!(audit))
}

/// Entries a page has unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// Most entries one page has.
pub const MAX_PAGE: usize = 1000;

/// `GET /api/v1/audit` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// Entries at most (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Only entries with an id below this one (the `next` of the previous page).
    pub before: Option<u64>,
}

/// `GET /api/v1/audit` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// The entries, newest first.
    pub entries: Vec<AuditEntry>,
    /// The `before` of the next (older) page; absent on the last page.
    pub next: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage, description = "Changes made through the manager and logins, newest first")))]
async fn audit(
    State(m): State<Arc<Manager>>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let entries = lock(&m.store).audit(query.before, limit)?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage { entries, next }))
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn actions_and_targets_come_from_the_route() {
        assert_eq!(action_name("POST", "/api/v1/groups"), "group.create");
        assert_eq!(action_name("PATCH", "/api/v1/agents/{id}"), "agent.place");
        assert_eq!(action_name("POST", "/api/v1/other"), "POST /api/v1/other");
        assert_eq!(
            path_parameters("/api/v1/groups/{name}", "/api/v1/groups/fw%20a"),
            "fw a"
        );
        assert_eq!(
            path_parameters("/api/v1/jobs/{id}/cancel", "/api/v1/jobs/7/cancel"),
            "7"
        );
        assert_eq!(path_parameters("/api/v1/groups", "/api/v1/groups"), "");
    }
}
