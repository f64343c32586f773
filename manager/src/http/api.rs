//! The JSON API's handlers under `/api/v1`, each annotated for the OpenAPI document.
//!
//! Errors are always `{"error": "..."}` with a fitting status (and `"field"` when
//! one field of the request is at fault).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v1/status` | addresses, keys, epoch, connected agents, bytes sent; role (active or standby) and, on a standby, the active manager's addresses |
//! | `GET /api/v1/agents` | enrolled agents, latest reports, whether connected |
//! | `GET /api/v1/agents/{id}` | one agent |
//! | `POST /api/v1/agents` | enrol `{id, key}` (key: 64 hex digits, Ed25519) |
//! | `POST /api/v1/agents/{id}/revoke` | revoke (un-enrol) an agent: its session ends, it is refused, peers get the signed revocation list |
//! | `POST /api/v1/enrolment-tokens` | a new one-time enrolment token `{expires_in_secs?, id?, labels?}` (default: 24 h, any id, no labels) |
//! | `GET /api/v1/enrolment-tokens` | every enrolment token's id, expiry, binding and state (never the token) |
//! | `DELETE /api/v1/enrolment-tokens/{id}` | revoke an unused token |
//! | `GET /api/v1/jobs` | jobs, newest first, with counts, group, policy and the number of warnings |
//! | `POST /api/v1/jobs` | publish `{path, name?, version?, chunk_size?}` and distribute it to `targets: {all: true}` or `{agents: [..]}`, or to `group: NAME`; `policy`: a policy's name or its fields |
//! | `GET /api/v1/jobs/{id}` | a job: participants, verified/total, confirmations, bytes per source |
//! | `POST /api/v1/jobs/{id}/cancel` | cancel a job |
//! | `POST /api/v1/jobs/{id}/pause` | pause a job's rollout: nobody new is instructed, no wave opens (transfers under way finish) |
//! | `POST /api/v1/jobs/{id}/resume` | resume a paused rollout (the failures so far are accepted) |
//! | `POST /api/v1/jobs/{id}/approve` | open the next wave of a rollout that waits for approval |
//! | `POST /api/v1/jobs/{id}/abort` | abort a rollout: the job ends, participants not reached are left `aborted` |
//! | `GET /api/v1/jobs/{id}/events` | server-sent events: a `snapshot` (the job as above), then `event`s ([`JobEvent`]) until the job ends |
//! | `POST /api/v1/uploads?name=N` | stores the request body as a file the manager holds; answers its `path` for `POST /api/v1/jobs` |
//! | `GET /api/v1/trust` | the signed trust documents held, oldest first |
//! | `PUT /api/v1/trust` | a new signed trust document `{document: hex}`: stored if it chains from the newest held, sent to every agent |
//! | `GET /api/v1/audit?limit=N&before=ID` | the audit log, newest first ([`crate::http::audit`]) |

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use baton_protocol::identity::x25519_of;
use baton_protocol::types::{AgentId, PublicKey};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::broadcast;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::engine_task::{JobEvent, RolloutAction};
use crate::http::audit::AuditTarget;
use crate::http::content_dirs::ContentDirs;
use crate::registry::{lock, unix_now};
use crate::service::{ApiError, JobRequest, Manager, PolicyChoice, PublishRequest};
use crate::store::{
    AgentRecord, Confirmation, DEFAULT_TOKEN_LIFETIME, Enrolled, JobRecord, NewToken, PartState,
    ParticipantRecord, SourceBytes, TargetSpec, secret_digest, token_id,
};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) | ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("API error: {self}");
        }
        let mut body = json!({ "error": self.to_string() });
        if let ApiError::Invalid { field, .. } = &self {
            body["field"] = json!(field);
        }
        (status, Json(body)).into_response()
    }
}

/// Every error answer: a message for people and, when one request field is at fault, its name.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// The request field at fault, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

fn bad_json(e: JsonRejection) -> ApiError {
    ApiError::BadRequest(format!("bad request body: {}", e.body_text()))
}

/// The API routes with their OpenAPI operations: the one list both are built from.
pub fn routes() -> OpenApiRouter<Arc<Manager>> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(me))
        .routes(routes!(agents, enrol))
        .routes(routes!(agent, place))
        .routes(routes!(revoke_agent))
        .routes(routes!(new_token, tokens))
        .routes(routes!(revoke_token))
        .routes(routes!(jobs, create_job))
        .routes(routes!(job))
        .routes(routes!(cancel_job))
        .routes(routes!(pause_job))
        .routes(routes!(resume_job))
        .routes(routes!(approve_job))
        .routes(routes!(abort_job))
        .routes(routes!(job_events))
        .routes(routes!(upload))
        .routes(routes!(trust_documents, push_trust))
}

/// `PUT /api/v1/trust` body: a signed trust document (`baton trust push`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TrustUpload {
    /// The document file's bytes (postcard `SignedTrust`), as hex.
    pub document: String,
}

/// One stored trust document, as `GET /api/v1/trust` and `PUT /api/v1/trust` show it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TrustView {
    /// Its version.
    pub version: u64,
    /// When it expires (Unix seconds; 0: never).
    pub expires: u64,
    /// How many roots must sign the next one.
    pub threshold: u8,
    /// Root keys (hex).
    pub roots: Vec<String>,
    /// Publisher keys (hex) and the name patterns each may sign.
    pub publishers: Vec<PublisherView>,
    /// Key ids (hex) of the roots that signed it.
    pub signed_by: Vec<String>,
    /// On `PUT`: whether it was new (`false`: the manager held it already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<bool>,
}

/// A publisher key and its names in a [`TrustView`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublisherView {
    /// The key (hex).
    pub key: String,
    /// Name patterns: exact names, `prefix*`, or `*`.
    pub names: Vec<String>,
}

/// What people read of a signed trust document.
pub fn trust_view(signed: &baton_protocol::trust::SignedTrust) -> TrustView {
    let doc = &signed.document;
    TrustView {
        version: doc.version,
        expires: doc.expires,
        threshold: doc.threshold,
        roots: doc.roots.iter().map(crate::trust::key_hex).collect(),
        publishers: doc
            .publishers
            .iter()
            .map(|p| PublisherView {
                key: crate::trust::key_hex(&p.key),
                names: p.names.iter().map(|n| n.to_string()).collect(),
            })
            .collect(),
        signed_by: signed
            .signatures
            .iter()
            .map(|s| crate::trust::key_id_hex(&s.signer))
            .collect(),
        stored: None,
    }
}

#[utoipa::path(get, path = "/api/v1/trust", tag = "manager",
    responses((status = 200, description = "The signed trust documents the manager holds and sends to agents, oldest first", body = [TrustView])))]
async fn trust_documents(State(m): State<Arc<Manager>>) -> Json<Vec<TrustView>> {
    let chain = m.registry.trust();
    Json(
        chain
            .encoded()
            .filter_map(|b| baton_protocol::trust::SignedTrust::decode(b).ok())
            .map(|s| trust_view(&s))
            .collect(),
    )
}

#[utoipa::path(put, path = "/api/v1/trust", tag = "manager", request_body = TrustUpload,
    responses((status = 200, description = "Stored and sent to every connected agent (or held already)", body = TrustView),
        (status = 400, description = "Not a trust document", body = ErrorBody),
        (status = 409, description = "It does not chain from the newest one held (signatures, version, expiry)", body = ErrorBody)))]
async fn push_trust(
    State(m): State<Arc<Manager>>,
    body: Result<Json<TrustUpload>, JsonRejection>,
) -> Response {
    let result = async {
        let Json(req) = body.map_err(bad_json)?;
        let bytes = hex::decode(req.document.trim())
            .map_err(|_| ApiError::invalid("document", "not hex"))?;
        let signed = baton_protocol::trust::SignedTrust::decode(&bytes).map_err(|_| {
            ApiError::invalid(
                "document",
                "not a trust document (make one with `baton trust init`)",
            )
        })?;
        let version = signed.document.version;
        let registry = m.registry.clone();
        let check = {
            let signed = signed.clone();
            tokio::task::spawn_blocking(move || {
                registry.add_trust(signed, crate::registry::unix_now())
            })
            .await
            .map_err(|e| ApiError::Internal(format!("trust task failed: {e}")))?
        };
        let check = check.map_err(|e| match e {
            crate::trust::TrustRefused::Store(s) => ApiError::from(s),
            other => ApiError::Conflict(other.to_string()),
        })?;
        let mut view = trust_view(&signed);
        view.stored = Some(matches!(check, crate::trust::TrustCheck::Newer(_)));
        Ok::<_, ApiError>((version, view))
    }
    .await;
    match result {
        Ok((version, view)) => AuditTarget(format!("trust document v{version}")).on(Json(view)),
        Err(e) => e.into_response(),
    }
}

/// `GET /api/v1/me`: who the request's credential is and its role.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MeView {
    /// How it authenticated: `admin-token`, `api-token` or `session`.
    pub via: String,
    /// The API token's or administrator's name (empty for the admin token).
    pub name: String,
    /// Its role: `read`, `operate` or `admin` (see `crate::roles`).
    pub role: String,
}

#[utoipa::path(get, path = "/api/v1/me", tag = "manager",
    responses((status = 200, description = "The caller's name and role, to know which actions it may take", body = MeView)))]
async fn me(
    caller: Option<Extension<crate::http::Caller>>,
    role: Option<Extension<crate::http::CallerRole>>,
) -> Json<MeView> {
    let (via, name) = crate::http::audit::caller_fields(caller.as_ref().map(|c| &c.0));
    Json(MeView {
        via: via.to_string(),
        name,
        role: role.map_or(crate::roles::Role::Read, |r| r.0.0).to_string(),
    })
}

/// `GET /api/v1/status`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    /// Agent port.
    pub agent_addr: String,
    /// HTTP API.
    pub http_addr: String,
    /// Manager public key (hex).
    pub manager_key: String,
    /// The publisher key this manager signs online with (hex; `--publisher-key`), if any.
    pub publisher_key: Option<String>,
    /// Version of the newest trust document the manager holds, if any.
    pub trust_version: Option<u64>,
    /// This run's epoch.
    pub epoch: u32,
    /// How many agents are connected.
    pub connected_agents: usize,
    /// Their ids.
    pub connected: Vec<String>,
    /// Wire bytes the agent port sent.
    pub bytes_sent: u64,
    /// Wire bytes the agent port received.
    pub bytes_received: u64,
    /// The manager's upload cap (bytes/s, 0 = none).
    pub up_bps: u64,
    /// Bytes written to serial lines (`--serial`), COBS framing included.
    pub serial_bytes_sent: u64,
    /// Bytes read from serial lines, COBS framing included.
    pub serial_bytes_received: u64,
    /// `active`, or `standby`: a manager sharing a PostgreSQL database with the active one,
    /// serving reads only and taking no agent until it takes over.
    #[serde(default)]
    pub role: String,
    /// On a standby: the agent port of the active manager, as it registered it.
    #[serde(default)]
    pub active_agent_addr: Option<String>,
    /// On a standby: the HTTP API of the active manager.
    #[serde(default)]
    pub active_http_addr: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/status", tag = "manager",
    responses((status = 200, description = "The manager's addresses, keys and counters", body = StatusView)))]
async fn status(State(m): State<Arc<Manager>>) -> Json<StatusView> {
    let active = m.activity.active_manager();
    let connected: Vec<String> = m
        .registry
        .connected()
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    Json(StatusView {
        agent_addr: m.agent_addr.to_string(),
        http_addr: m.http_addr.to_string(),
        manager_key: hex::encode(m.keys.manager.public().0),
        publisher_key: m.publisher.as_ref().map(|p| hex::encode(p.public().0)),
        trust_version: m.registry.trust().latest().map(|s| s.document.version),
        epoch: m.epoch,
        connected_agents: connected.len(),
        connected,
        bytes_sent: m.bytes_sent(),
        bytes_received: m.bytes_received(),
        up_bps: m.limits.up.as_ref().map_or(0, |l| l.bytes_per_sec()),
        serial_bytes_sent: crate::serial::LINE_BYTES.sent.load(Ordering::Relaxed),
        serial_bytes_received: crate::serial::LINE_BYTES.received.load(Ordering::Relaxed),
        role: m.activity.role().to_string(),
        active_agent_addr: active.as_ref().and_then(|v| v.agent_addr.clone()),
        active_http_addr: active.and_then(|v| v.http_addr),
    })
}

/// An agent as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    /// The stored record: id, key, enrolled_at, last_seen, report, site, segment, listen, performance, up_bps, down_bps, free_storage, placed_segment, election_score.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub record: AgentRecord,
    /// Whether it is connected now.
    pub connected: bool,
    /// The version running per content name: `[{name, version, updated_at}]` (from its
    /// install reports, or its confirmations when it installs nothing).
    #[schema(value_type = Vec<Object>)]
    pub running: Vec<RunningView>,
}

/// A content name and the version of it running on an agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunningView {
    /// The content name.
    pub name: String,
    /// The version running.
    pub version: u64,
    /// When the manager learnt it (Unix seconds).
    pub updated_at: u64,
}

fn agent_view(m: &Manager, record: AgentRecord, running: Vec<RunningView>) -> AgentView {
    let connected = AgentId::try_from(record.id.as_str())
        .map(|id| m.registry.is_connected(&id))
        .unwrap_or(false);
    AgentView {
        record,
        connected,
        running,
    }
}

/// The running versions of every agent (or of `agent` only), by agent.
fn running_by_agent(
    store: &dyn crate::store::Store,
    agent: Option<&str>,
) -> Result<std::collections::HashMap<String, Vec<RunningView>>, ApiError> {
    let mut by_agent: std::collections::HashMap<String, Vec<RunningView>> = Default::default();
    for r in store.running_versions(agent)? {
        by_agent.entry(r.agent).or_default().push(RunningView {
            name: r.name,
            version: r.version,
            updated_at: r.updated_at,
        });
    }
    Ok(by_agent)
}

#[utoipa::path(get, path = "/api/v1/agents", tag = "agents",
    responses((status = 200, description = "Enrolled agents with their latest reports", body = [AgentView])))]
async fn agents(State(m): State<Arc<Manager>>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let (records, mut running) = {
        let store = lock(&m.store);
        (store.agents()?, running_by_agent(&**store, None)?)
    };
    Ok(Json(
        records
            .into_iter()
            .map(|r| {
                let versions = running.remove(&r.id).unwrap_or_default();
                agent_view(&m, r, versions)
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent id")),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorBody)))]
async fn agent(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let (record, mut running) = {
        let store = lock(&m.store);
        let record = store
            .agent(&id)?
            .ok_or_else(|| ApiError::NotFound(format!("no agent {id:?} is enrolled")))?;
        (record, running_by_agent(&**store, Some(&id))?)
    };
    let versions = running.remove(&id).unwrap_or_default();
    Ok(Json(agent_view(&m, record, versions)))
}

/// `PATCH /api/v1/agents/{id}` body: where the administrator places the agent (fields left
/// out are kept).
#[derive(Debug, Deserialize, ToSchema)]
pub struct PlaceRequest {
    /// The segment the agent is placed in: its certificate names it, its peers ignore its
    /// discovery datagrams for any other, and the manager refuses its segment reports for any
    /// other (at most 32 bytes; empty: none).
    pub segment: Option<String>,
    /// The highest election score it may claim on its segment (certificates cap it at
    /// `baton serve --max-election-score`).
    pub election_score: Option<u32>,
}

#[utoipa::path(patch, path = "/api/v1/agents/{id}", tag = "agents", request_body = PlaceRequest,
    params(("id" = String, Path, description = "Agent id")),
    responses((status = 200, description = "Placed; a connected agent is reconnected so its certificate says so", body = AgentView),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn place(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    body: Result<Json<PlaceRequest>, JsonRejection>,
) -> Result<Json<AgentView>, ApiError> {
    let Json(req) = body.map_err(bad_json)?;
    let agent = parse_agent_id(&id)?;
    if let Some(s) = &req.segment
        && baton_protocol::types::Name::try_from(s.as_str()).is_err()
    {
        return Err(ApiError::BadRequest(format!(
            "segment {s:?} is longer than 32 bytes"
        )));
    }
    if req.segment.is_none() && req.election_score.is_none() {
        return Err(ApiError::BadRequest(
            "give a segment, an election_score, or both".into(),
        ));
    }
    if !m.registry.is_enrolled(&agent) {
        return Err(ApiError::NotFound(format!("no agent {id:?} is enrolled")));
    }
    m.registry
        .place(&agent, req.segment.as_deref(), req.election_score)?;
    let (record, mut running) = {
        let store = lock(&m.store);
        let record = store
            .agent(&id)?
            .ok_or_else(|| ApiError::NotFound(format!("no agent {id:?} is enrolled")))?;
        (record, running_by_agent(&**store, Some(&id))?)
    };
    let versions = running.remove(&id).unwrap_or_default();
    Ok(Json(agent_view(&m, record, versions)))
}

/// `POST /api/v1/agents/{id}/revoke` answer: what the revocation did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokeView {
    /// The agent revoked.
    pub id: String,
    /// Every certificate issued to it up to this serial is revoked (0: it never had one).
    pub up_to_serial: u64,
    /// When the last of those certificates expires (Unix seconds; 0: none was issued):
    /// the revocation list carries the entry until then.
    pub certificates_expire: u64,
    /// When it was revoked (Unix seconds; an earlier time if it was revoked already).
    pub revoked_at: u64,
    /// Whether its live session was ended.
    pub was_connected: bool,
    /// The version of the signed revocation list now in force.
    pub list_version: Option<u64>,
    /// Live sessions the new list was sent to.
    pub sent_to: usize,
}

#[utoipa::path(post, path = "/api/v1/agents/{id}/revoke", tag = "agents",
    params(("id" = String, Path, description = "Agent id")),
    responses((status = 200, description = "Revoked: its session is ended, its handshakes are refused, it leaves the fleet views (job records and the audit log keep it), and every live session gets the new signed revocation list; enrolling the id again starts it afresh", body = RevokeView),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_agent(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<RevokeView>, ApiError> {
    let agent = parse_agent_id(&id)?;
    let done = m.registry.revoke(&agent).map_err(|e| match e {
        crate::store::StoreError::NotFound(_) => {
            ApiError::NotFound(format!("no agent {id:?} is enrolled"))
        }
        other => other.into(),
    })?;
    Ok(Json(RevokeView {
        id,
        up_to_serial: done.record.up_to_serial,
        certificates_expire: done.record.expires_at,
        revoked_at: done.record.revoked_at,
        was_connected: done.was_connected,
        list_version: done.list_version,
        sent_to: done.sent_to,
    }))
}

/// `POST /api/v1/agents` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EnrolRequest {
    /// The agent's id (1..=32 bytes, no spaces).
    pub id: String,
    /// Its Ed25519 public key, 64 hex digits.
    pub key: String,
}

/// Checks an agent id from the API.
pub fn parse_agent_id(id: &str) -> Result<AgentId, ApiError> {
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::BadRequest(format!(
            "agent id {id:?} must be non-empty without spaces"
        )));
    }
    AgentId::try_from(id)
        .map_err(|_| ApiError::BadRequest(format!("agent id {id:?} is longer than 32 bytes")))
}

/// Checks an Ed25519 public key given as hex.
pub fn parse_key(hex_key: &str) -> Result<PublicKey, ApiError> {
    let bytes = hex::decode(hex_key.trim())
        .map_err(|_| ApiError::BadRequest("key must be 64 hex digits".into()))?;
    let key = PublicKey(
        bytes
            .try_into()
            .map_err(|_| ApiError::BadRequest("key must be 64 hex digits (32 bytes)".into()))?,
    );
    x25519_of(&key)
        .map_err(|_| ApiError::BadRequest("key is not a valid Ed25519 public key".into()))?;
    Ok(key)
}

#[utoipa::path(post, path = "/api/v1/agents", tag = "agents", request_body = EnrolRequest,
    responses((status = 201, description = "Enrolled"), (status = 200, description = "Already enrolled with this key"),
        (status = 400, body = ErrorBody), (status = 409, description = "Enrolled with another key", body = ErrorBody)))]
async fn enrol(
    State(m): State<Arc<Manager>>,
    body: Result<Json<EnrolRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return bad_json(e).into_response(),
    };
    AuditTarget(req.id.clone()).on(enrol_agent(&m, req))
}

/// Enrols the agent `req` names.
fn enrol_agent(
    m: &Manager,
    req: EnrolRequest,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let id = parse_agent_id(&req.id)?;
    let key = parse_key(&req.key)?;
    let done = m.registry.enrol(&id, &key)?;
    let (status, what) = match done {
        Enrolled::New => (StatusCode::CREATED, "enrolled"),
        Enrolled::Unchanged => (StatusCode::OK, "already enrolled with this key"),
    };
    tracing::info!(agent = %id, "{what}");
    Ok((
        status,
        Json(json!({ "id": id.as_str(), "key": hex::encode(key.0), "result": what })),
    ))
}

/// Longest lifetime an enrolment token may be given: 30 days, in seconds.
pub const MAX_TOKEN_LIFETIME: u64 = 30 * 24 * 3600;

/// `POST /api/v1/enrolment-tokens` body (optional: no body is a token for any id, valid 24 h).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Seconds the token is valid, 1..=2592000 (30 days); default 86400 (24 h).
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// The one agent id the token may enrol; default: any id.
    #[serde(default)]
    pub id: Option<String>,
    /// Labels (`{"role": "edge"}`) the agent it enrols must report, in every report from
    /// then on (a session whose report lacks one is refused); default: none.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Checks the labels an enrolment token binds against what a report can carry.
fn check_token_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), ApiError> {
    use baton_protocol::types::{MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS};
    let invalid = |message: String| ApiError::Invalid {
        field: "labels".into(),
        message,
    };
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "at most {MAX_LABELS} labels (an agent reports no more)"
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE {
            return Err(invalid(format!(
                "label {k:?}={v:?}: keys are 1..={MAX_LABEL_KEY} bytes, values at most {MAX_LABEL_VALUE}"
            )));
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/enrolment-tokens", tag = "agents", request_body = TokenRequest,
    responses((status = 201, description = "`{\"token\": \"...\", \"id\": \"...\", \"expires_at\": N, \"bound_id\": ...}`: a one-time enrolment token and its public id"),
        (status = 400, body = ErrorBody)))]
async fn new_token(
    State(m): State<Arc<Manager>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let req: TokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("bad request body: {e}")))?
    };
    let lifetime = req.expires_in_secs.unwrap_or(DEFAULT_TOKEN_LIFETIME);
    if !(1..=MAX_TOKEN_LIFETIME).contains(&lifetime) {
        return Err(ApiError::Invalid {
            field: "expires_in_secs".into(),
            message: format!(
                "a token lives 1..={MAX_TOKEN_LIFETIME} seconds (30 days), not {lifetime}"
            ),
        });
    }
    let bound_id = req
        .id
        .as_deref()
        .map(|id| parse_agent_id(id).map(|id| id.to_string()))
        .transpose()?;
    check_token_labels(&req.labels)?;
    let mut raw = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let token = hex::encode(raw);
    let hash = secret_digest(&token);
    let now = unix_now();
    let spec = NewToken {
        expires_at: now + lifetime,
        bound_id,
        labels: req.labels,
    };
    lock(&m.store).add_token(&hash, &spec, now)?;
    let id = token_id(&hash);
    tracing::info!(token = %id, expires_at = spec.expires_at, bound_id = ?spec.bound_id, labels = ?spec.labels, "one-time enrolment token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "id": id,
            "expires_at": spec.expires_at,
            "bound_id": spec.bound_id,
            "labels": spec.labels,
        })),
    ))
}

#[utoipa::path(get, path = "/api/v1/enrolment-tokens", tag = "agents",
    responses((status = 200, description = "Every enrolment token, newest first: `id`, `created_at`, `expires_at`, `bound_id`, `labels`, `state` (unused, used, expired, revoked), `used_by`, `used_at`, `revoked_at`; never the token itself")))]
async fn tokens(State(m): State<Arc<Manager>>) -> Result<Json<serde_json::Value>, ApiError> {
    let list = lock(&m.store).tokens(unix_now())?;
    Ok(Json(json!(list)))
}

#[utoipa::path(delete, path = "/api/v1/enrolment-tokens/{id}", tag = "agents",
    params(("id" = String, Path, description = "The token's public id (12 hex digits, from the list)")),
    responses((status = 200, description = "Revoked"), (status = 404, description = "No unused token has this id", body = ErrorBody)))]
async fn revoke_token(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !lock(&m.store).revoke_token(&id, unix_now())? {
        return Err(ApiError::NotFound(format!(
            "no unused enrolment token has the id {id:?} (see `baton enroll --list`)"
        )));
    }
    tracing::info!(token = %id, "enrolment token revoked");
    Ok(Json(json!({ "id": id, "revoked": true })))
}

/// A job in the job list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    /// Job id.
    pub id: u64,
    /// `pending`, `running`, `finished`, `cancelled` or `refused`.
    pub state: String,
    /// Content name.
    pub name: String,
    /// Content version.
    pub version: u64,
    /// Content root (hex).
    pub root: String,
    /// Content length in bytes.
    pub length: u64,
    /// Created (Unix seconds).
    pub created_at: u64,
    /// Finished (Unix seconds).
    pub finished_at: Option<u64>,
    /// Participants so far.
    pub participants: usize,
    /// Of which confirmed.
    pub confirmed: usize,
    /// Of which failed.
    pub failed: usize,
    /// The content group it was created for, if any.
    pub group: Option<String>,
    /// The named policy it runs under, if any.
    pub policy: Option<String>,
    /// How many warnings the job has: policy rules it cannot meet, participants demoted as
    /// trouble reporters (the texts are in `GET /api/v1/jobs/{id}`).
    pub warnings: usize,
    /// Where its staged rollout stands (`running`, `soaking`, `awaiting_approval`,
    /// `paused`, `complete`, `aborted`), if it has one.
    pub rollout: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    responses((status = 200, description = "Jobs, newest first", body = [JobSummary])))]
async fn jobs(State(m): State<Arc<Manager>>) -> Result<Json<Vec<JobSummary>>, ApiError> {
    let store = lock(&m.store);
    let mut out = Vec::new();
    for job in store.jobs()? {
        let content = store.content(&job.root)?;
        let parts = store.participants(job.id)?;
        out.push(JobSummary {
            id: job.id,
            state: job.state.as_str().into(),
            name: content.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            version: content.as_ref().map_or(0, |c| c.version),
            root: hex::encode(job.root),
            length: content.as_ref().map_or(0, |c| c.length),
            created_at: job.created_at,
            finished_at: job.finished_at,
            participants: parts.len(),
            confirmed: parts
                .iter()
                .filter(|p| p.state == PartState::Confirmed)
                .count(),
            failed: parts
                .iter()
                .filter(|p| p.state == PartState::Failed)
                .count(),
            group: job.group.clone(),
            policy: job.policy.clone(),
            warnings: job.warnings.len(),
            rollout: job
                .rollout
                .clone()
                .and_then(|v| {
                    serde_json::from_value::<baton_manager_core::engine::RolloutState>(v).ok()
                })
                .map(|r| r.name().to_string()),
        });
    }
    Ok(Json(out))
}

/// Content as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ContentView {
    /// Merkle root (hex).
    pub root: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Length in bytes.
    pub length: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Number of chunks.
    pub chunks: u32,
    /// The file it is served from.
    pub path: String,
}

/// A participant as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ParticipantView {
    /// The stored record: agent, state, verified, updated_at, reason, source, position.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub record: ParticipantRecord,
    /// Chunks in the content.
    pub total: u32,
    /// Whether the agent is connected now.
    pub connected: bool,
    /// The network segment the agent last reported, if any.
    pub segment: Option<String>,
    /// Whether it is its segment's leader (as the leader last reported).
    pub leader: bool,
    /// Its wave (from 1) in a staged rollout.
    pub wave: Option<u32>,
    /// In a staged rollout: `held` while its wave has not opened or the rollout is paused
    /// and it was not reached, `aborted` if the rollout was aborted before it settled.
    pub rollout: Option<&'static str>,
}

/// One wave of a staged rollout in a [`JobDetail`].
#[derive(Debug, Serialize, ToSchema)]
pub struct WaveView {
    /// Its number, from 1.
    pub wave: u32,
    /// Whether it has opened.
    pub open: bool,
    /// Its participants.
    pub participants: usize,
    /// Of them, running the content.
    pub running: usize,
    /// Of them, failed (delivery, install) or rolled back.
    pub failed: usize,
}

/// `GET /api/v1/jobs/{id}` and the `snapshot` event.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobDetail {
    /// The stored job: id, root, epoch, state, created_at, finished_at, targets, confirmed, failed, error.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub job: JobRecord,
    /// What it distributes.
    pub content: Option<ContentView>,
    /// Participants in plan order.
    pub participants: Vec<ParticipantView>,
    /// Chunks in the content.
    pub total_chunks: u32,
    /// Participants that confirmed.
    pub confirmed_count: usize,
    /// Participants that failed.
    pub failed_count: usize,
    /// Confirmed participants per install state (`pending`, `installing`, `installed`,
    /// `running`, `failed`, `rolled_back`); the job is complete when every participant is
    /// running, failed or rolled back.
    pub install_counts: std::collections::BTreeMap<String, usize>,
    /// Confirmations with times: `[{agent, confirmed_at}]`.
    #[schema(value_type = Vec<Object>)]
    pub confirmations: Vec<Confirmation>,
    /// Verified bytes per receiver and source: `[{agent, from, bytes}]` (`from` null = the manager).
    #[schema(value_type = Vec<Object>)]
    pub source_bytes: Vec<SourceBytes>,
    /// Sum of bytes received from the manager.
    pub bytes_from_manager: u64,
    /// Sum of bytes received from peers.
    pub bytes_from_peers: u64,
    /// The waves of a staged rollout (empty without one); where the rollout stands is in
    /// `rollout`.
    pub waves: Vec<WaveView>,
}

/// The job's full state from the database.
pub fn job_detail(m: &Manager, id: u64) -> Result<JobDetail, ApiError> {
    let store = lock(&m.store);
    let job = store
        .job(id)?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let content = store.content(&job.root)?;
    let total = content.as_ref().map_or(0, |c| c.chunks());
    let segment_of: std::collections::HashMap<String, String> = store
        .agents()?
        .into_iter()
        .filter_map(|a| Some((a.id, a.segment?)))
        .collect();
    let leaders: std::collections::HashSet<String> =
        store.segments()?.into_iter().map(|s| s.leader).collect();
    let participants: Vec<ParticipantView> = store
        .participants(id)?
        .into_iter()
        .map(|record| {
            let connected = AgentId::try_from(record.agent.as_str())
                .map(|a| m.registry.is_connected(&a))
                .unwrap_or(false);
            ParticipantView {
                segment: segment_of.get(&record.agent).cloned(),
                leader: leaders.contains(&record.agent),
                wave: None,
                rollout: None,
                record,
                total,
                connected,
            }
        })
        .collect();
    let mut participants = participants;
    let waves = rollout_waves(&job, &mut participants);
    let source_bytes = store.source_bytes(id)?;
    let confirmations = store.confirmations(id)?;
    drop(store);
    let count = |s: PartState| participants.iter().filter(|p| p.record.state == s).count();
    Ok(JobDetail {
        content: content.map(|c| ContentView {
            root: hex::encode(c.root),
            chunks: c.chunks(),
            name: c.name,
            version: c.version,
            length: c.length,
            chunk_size: c.chunk_size,
            path: c.path,
        }),
        install_counts: participants
            .iter()
            .filter_map(|p| p.record.install.as_ref())
            .fold(Default::default(), |mut counts, i| {
                *counts.entry(i.state.as_str().to_string()).or_insert(0) += 1;
                counts
            }),
        confirmed_count: count(PartState::Confirmed),
        failed_count: count(PartState::Failed),
        total_chunks: total,
        bytes_from_manager: source_bytes
            .iter()
            .filter(|s| s.from.is_none())
            .map(|s| s.bytes)
            .sum(),
        bytes_from_peers: source_bytes
            .iter()
            .filter(|s| s.from.is_some())
            .map(|s| s.bytes)
            .sum(),
        participants,
        confirmations,
        source_bytes,
        waves,
        job,
    })
}

/// A participant's outcome in a wave's counts: `Some(true)` running, `Some(false)` failed
/// or rolled back, `None` neither yet.
fn wave_outcome(p: &ParticipantView) -> Option<bool> {
    use crate::store::InstallPhase;
    if p.record.state == PartState::Failed {
        return Some(false);
    }
    match p.record.install.as_ref().map(|i| i.state) {
        Some(InstallPhase::Running) => Some(true),
        Some(InstallPhase::Failed | InstallPhase::RolledBack) => Some(false),
        _ => None,
    }
}

/// Numbers each participant's wave from the job's stored rollout, marks those held or
/// aborted, and counts each wave.
fn rollout_waves(job: &JobRecord, participants: &mut [ParticipantView]) -> Vec<WaveView> {
    let Some(state) = job
        .rollout
        .clone()
        .and_then(|v| serde_json::from_value::<baton_manager_core::engine::RolloutState>(v).ok())
    else {
        return Vec::new();
    };
    let mut waves: Vec<WaveView> = (0..state.ends.len())
        .map(|w| WaveView {
            wave: w as u32 + 1,
            open: w < state.opened as usize,
            participants: 0,
            running: 0,
            failed: 0,
        })
        .collect();
    let running = job.state == crate::store::JobState::Running;
    for (pos, p) in participants.iter_mut().enumerate() {
        let position = p.record.position.unwrap_or(pos as u32);
        let w = state.wave_of(position);
        p.wave = Some(w as u32 + 1);
        let outcome = wave_outcome(p);
        let reached = p.record.state != PartState::Waiting;
        p.rollout = if state.aborted.is_some() && outcome.is_none() {
            Some("aborted")
        } else if running && !reached && (w >= state.opened as usize || state.paused.is_some()) {
            Some("held")
        } else {
            None
        };
        if let Some(view) = waves.get_mut(w) {
            view.participants += 1;
            match outcome {
                Some(true) => view.running += 1,
                Some(false) => view.failed += 1,
                None => {}
            }
        }
    }
    waves
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, body = JobDetail), (status = 404, body = ErrorBody)))]
async fn job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<JobDetail>, ApiError> {
    Ok(Json(job_detail(&m, id)?))
}

/// Which agents a new job is for: `{"all": true}` or `{"agents": ["a", "b"]}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetsRequest {
    /// Every agent connected now, and every agent that connects while the job runs.
    #[serde(default)]
    pub all: bool,
    /// These agents.
    pub agents: Option<Vec<String>>,
}

/// `POST /api/v1/jobs` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateJobRequest {
    /// A file the manager can read (absolute path), e.g. one `POST /api/v1/uploads` stored.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Content name (default: the file name).
    pub name: Option<String>,
    /// Version (default: the latest of the name plus one).
    pub version: Option<u64>,
    /// Chunk size in bytes (default 32 KiB).
    pub chunk_size: Option<u64>,
    /// The manifest `baton sign` wrote for the file (hex of its bytes): published as it is
    /// once the file matches it and the newest trust document lists its signer for its
    /// name. Without it the manager signs with its `--publisher-key`, if it has one the
    /// trust document lists for the name.
    pub manifest: Option<String>,
    /// Which agents (or give `group`).
    pub targets: Option<TargetsRequest>,
    /// A content group: the job goes to its members at creation (and, for a group with a
    /// label selector, to agents that connect carrying its labels while it runs).
    pub group: Option<String>,
    /// A named policy, or the policy's fields inline (default: the planner's defaults).
    #[schema(value_type = Option<Object>)]
    pub policy: Option<PolicyChoice>,
    /// A staged rollout, replacing the policy's: `{"waves": [10, 50, 100],
    /// "pause_after_failures": 1, ...}` (waves: percentages, `{"agents": [..]}` or
    /// `{"group": NAME}`; see `planner::Rollout`).
    #[schema(value_type = Option<Object>)]
    pub rollout: Option<serde_json::Value>,
}

/// `POST /api/v1/jobs` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobCreated {
    /// The new job's id.
    pub id: u64,
    /// Content root (hex).
    pub root: String,
    /// Content name.
    pub name: String,
    /// Content version.
    pub version: u64,
    /// Length in bytes.
    pub length: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks.
    pub chunks: u32,
}

fn target_spec(t: TargetsRequest) -> Result<TargetSpec, ApiError> {
    match (t.all, t.agents) {
        (true, None) => Ok(TargetSpec::All),
        (false, Some(agents)) => {
            for a in &agents {
                parse_agent_id(a)?;
            }
            Ok(TargetSpec::Agents(agents))
        }
        (true, Some(_)) => Err(ApiError::BadRequest(
            "targets: give either all or agents, not both".into(),
        )),
        (false, None) => Err(ApiError::BadRequest(
            "targets: give {\"all\": true} or {\"agents\": [..]}".into(),
        )),
    }
}

#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = CreateJobRequest,
    responses((status = 201, body = JobCreated), (status = 400, body = ErrorBody), (status = 403, description = "The path is outside the upload directory and every `--content-dir`, or in the data directory", body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_job(
    State(m): State<Arc<Manager>>,
    Extension(dirs): Extension<ContentDirs>,
    body: Result<Json<CreateJobRequest>, JsonRejection>,
) -> Response {
    let mut req = match body {
        Ok(Json(req)) => req,
        Err(e) => return bad_json(e).into_response(),
    };
    let asked = req
        .name
        .clone()
        .unwrap_or_else(|| req.path.display().to_string());
    // Published from where it resolves to, once that is allowed; the content name stays
    // the one the request gave (by default its file name, not the link's target's).
    let resolved = tokio::task::spawn_blocking({
        let dirs = dirs.clone();
        let path = req.path.clone();
        move || dirs.check(&path)
    })
    .await
    .unwrap_or_else(|e| Err(ApiError::Internal(format!("path check failed: {e}"))));
    match resolved {
        Ok(path) => {
            if req.name.is_none() && req.manifest.is_none() {
                req.name = req
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
            }
            req.path = path;
        }
        Err(e) => return AuditTarget(asked).on(e),
    }
    match start_job(&m, req).await {
        Ok(created) => AuditTarget(format!(
            "job {}: {} v{}",
            created.id, created.name, created.version
        ))
        .on((StatusCode::CREATED, Json(created))),
        Err(e) => AuditTarget(asked).on(e),
    }
}

/// Publishes and distributes what `req` asks for.
async fn start_job(m: &Manager, req: CreateJobRequest) -> Result<JobCreated, ApiError> {
    let targets = req.targets.map(target_spec).transpose()?;
    let job = m.resolve_job(JobRequest {
        targets,
        group: req.group,
        policy: req.policy,
        rollout: req.rollout,
    })?;
    let manifest = req
        .manifest
        .as_deref()
        .map(|h| {
            hex::decode(h.trim()).map_err(|_| {
                ApiError::invalid(
                    "manifest",
                    "not hex (give the manifest file's bytes as hex)",
                )
            })
        })
        .transpose()?;
    let content = m
        .publish(PublishRequest {
            path: req.path,
            name: req.name,
            version: req.version,
            chunk_size: req.chunk_size,
            manifest,
        })
        .await?;
    let id = m.start_job(content.root, job).await?;
    Ok(JobCreated {
        id,
        root: hex::encode(content.root),
        chunks: content.chunks(),
        name: content.name,
        version: content.version,
        length: content.length,
        chunk_size: content.chunk_size,
    })
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, description = "Cancelled"), (status = 404, body = ErrorBody), (status = 409, description = "Already over", body = ErrorBody)))]
async fn cancel_job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.cancel_job(id).await?;
    Ok(Json(json!({ "id": id, "state": "cancelled" })))
}

/// Sends `action` to job `id`'s rollout; answers the job's rollout state.
async fn rollout_action(
    m: &Manager,
    id: u64,
    action: RolloutAction,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.rollout_command(id, action).await?;
    let job = lock(&m.store)
        .job(id)?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    Ok(Json(
        json!({ "id": id, "state": job.state.as_str(), "rollout": job.rollout }),
    ))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/pause", tag = "jobs", params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, description = "Paused: nobody new is instructed and no wave opens; participants already instructed finish their transfer and install"),
        (status = 404, body = ErrorBody), (status = 409, description = "Over, or paused already", body = ErrorBody)))]
async fn pause_job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    rollout_action(&m, id, RolloutAction::Pause).await
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/resume", tag = "jobs", params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, description = "Resumed: the failures so far are accepted, held participants of the open waves are instructed"),
        (status = 404, body = ErrorBody), (status = 409, description = "Over, or not paused", body = ErrorBody)))]
async fn resume_job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    rollout_action(&m, id, RolloutAction::Resume).await
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/approve", tag = "jobs", params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, description = "The next wave opened"),
        (status = 404, body = ErrorBody), (status = 409, description = "Over, paused, or no wave waits for approval", body = ErrorBody)))]
async fn approve_job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    rollout_action(&m, id, RolloutAction::Approve).await
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/abort", tag = "jobs", params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, description = "Aborted: the job is cancelled, participants not settled are shown `aborted`"),
        (status = 404, body = ErrorBody), (status = 409, description = "Already over", body = ErrorBody)))]
async fn abort_job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    rollout_action(&m, id, RolloutAction::Abort).await
}

/// The events stream's state.
struct Follow {
    manager: Arc<Manager>,
    job: u64,
    rx: broadcast::Receiver<JobEvent>,
    first: Option<Event>,
    done: bool,
}

fn snapshot(m: &Manager, job: u64) -> Result<(Event, bool), ApiError> {
    let detail = job_detail(m, job)?;
    let over = detail.job.state.is_over();
    let event = Event::default()
        .event("snapshot")
        .json_data(&detail)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((event, over))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs", params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, content_type = "text/event-stream",
        description = "Server-sent events: `snapshot` (the job detail), then `event`s (progress, confirmed, failed, finished, cancelled) until the job ends"),
        (status = 404, body = ErrorBody)))]
async fn job_events(
    State(m): State<Arc<Manager>>,
    Path(job): Path<u64>,
) -> Result<Response, ApiError> {
    // Subscribe before reading the snapshot so that no event falls in between.
    let rx = m.events.subscribe();
    let (first, done) = snapshot(&m, job)?;
    let follow = Follow {
        manager: m,
        job,
        rx,
        first: Some(first),
        done: false,
    };
    let stream = futures_util::stream::unfold(follow, move |mut f| async move {
        if let Some(first) = f.first.take() {
            f.done = done;
            return Some((Ok::<_, Infallible>(first), f));
        }
        if f.done {
            return None;
        }
        loop {
            match f.rx.recv().await {
                Ok(ev) if ev.job() == f.job => {
                    f.done = ev.is_final();
                    let event = Event::default().event("event").json_data(&ev).ok()?;
                    return Some((Ok(event), f));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed some: send the whole state again.
                    let (event, over) = snapshot(&f.manager, f.job).ok()?;
                    f.done = over;
                    return Some((Ok(event), f));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Where `POST /api/v1/uploads` stores files and how large one may be (given to the router
/// as an extension).
#[derive(Clone, Debug)]
pub struct Uploads {
    /// The directory uploaded files are kept in.
    pub dir: PathBuf,
    /// Largest upload in bytes; larger ones are refused with `413`.
    pub max_bytes: u64,
}

/// The default cap on one upload: 4 GiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 4 << 30;

/// `POST /api/v1/uploads` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UploadQuery {
    /// The content's name (default `upload`); the stored file is named after it.
    pub name: Option<String>,
}

/// `POST /api/v1/uploads` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Uploaded {
    /// The file the manager now holds: give it as `path` to `POST /api/v1/jobs`.
    pub path: String,
    /// The name given.
    pub name: String,
    /// Bytes stored.
    pub length: u64,
}

/// The file name for an uploaded content name: letters, digits, `.`, `-`, `_` kept, the rest `_`.
fn upload_file_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() {
        "upload".into()
    } else {
        clean.into()
    }
}

/// Why an upload was refused.
#[derive(Debug)]
enum UploadRefused {
    /// Any other error.
    Api(ApiError),
    /// Larger than the cap (which it carries).
    TooLarge(u64),
}

impl From<ApiError> for UploadRefused {
    fn from(e: ApiError) -> Self {
        UploadRefused::Api(e)
    }
}

impl IntoResponse for UploadRefused {
    fn into_response(self) -> Response {
        match self {
            UploadRefused::Api(e) => e.into_response(),
            UploadRefused::TooLarge(max) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(json!({
                    "error": format!(
                        "the upload is larger than this manager accepts ({max} bytes; \
                         `baton serve --max-upload` sets the cap)"
                    ),
                    "max_bytes": max,
                })),
            )
                .into_response(),
        }
    }
}

/// A partly written upload: removed when dropped unless kept, so that an upload that
/// fails midway (error, cap, client gone and the handler dropped) leaves no file.
struct PartFile {
    path: PathBuf,
    kept: bool,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.kept
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), "cannot remove a broken upload: {e}");
        }
    }
}

#[utoipa::path(post, path = "/api/v1/uploads", tag = "jobs", params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The content's bytes"),
    responses((status = 201, body = Uploaded), (status = 400, body = ErrorBody),
        (status = 413, description = "Larger than the manager's cap (`baton serve --max-upload`)", body = ErrorBody)))]
async fn upload(
    Extension(uploads): Extension<Uploads>,
    Query(query): Query<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let target = AuditTarget(query.name.clone().unwrap_or_else(|| "upload".into()));
    target.on(store_upload(uploads, query, headers, body).await)
}

/// Streams an upload's body into a file of the upload directory.
async fn store_upload(
    uploads: Uploads,
    query: UploadQuery,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Uploaded>), UploadRefused> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    let name = query.name.unwrap_or_else(|| "upload".into());
    crate::content::check_name(&name).map_err(|e| ApiError::BadRequest(format!("name: {e}")))?;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > uploads.max_bytes) {
        return Err(UploadRefused::TooLarge(uploads.max_bytes));
    }
    let dir = &uploads.dir;
    // Owner-only, as the data directory it sits in (when it has to be created).
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(baton_agent_core::linux::datadir::PRIVATE_DIR_MODE)
        .create(dir)
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
    let mut stamp = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut stamp);
    let file_name = format!(
        "{}-{}-{}",
        unix_now(),
        hex::encode(stamp),
        upload_file_name(&name)
    );
    let path = dir.join(&file_name);
    // Written under a hidden name and renamed once complete.
    let mut part = PartFile {
        path: dir.join(format!(".{file_name}.part")),
        kept: false,
    };
    let io = |e: std::io::Error| ApiError::Internal(format!("{}: {e}", path.display()));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(baton_agent_core::linux::datadir::PRIVATE_FILE_MODE)
        .open(&part.path)
        .await
        .map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut length = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("upload broke off: {e}")))?;
        length += chunk.len() as u64;
        if length > uploads.max_bytes {
            tracing::warn!(name, max = uploads.max_bytes, "upload refused: too large");
            return Err(UploadRefused::TooLarge(uploads.max_bytes));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    if length == 0 {
        return Err(ApiError::BadRequest("the upload is empty".into()).into());
    }
    file.sync_all().await.map_err(io)?;
    drop(file);
    tokio::fs::rename(&part.path, &path).await.map_err(io)?;
    part.kept = true;
    tracing::info!(path = %path.display(), length, "content uploaded");
    Ok((
        StatusCode::CREATED,
        Json(Uploaded {
            path: path.to_string_lossy().into_owned(),
            name,
            length,
        }),
    ))
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn upload_names_stay_inside_the_directory() {
        assert_eq!(upload_file_name("fw-1.2.bin"), "fw-1.2.bin");
        assert_eq!(upload_file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(upload_file_name("..."), "upload");
        assert_eq!(upload_file_name("a b/c"), "a_b_c");
    }
}
