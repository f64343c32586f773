//! The HTTP API: JSON under `/api/v1`, for the CLI, scripts and the web UI.
//!
//! Every route needs `Authorization: Bearer <admin token>` (the token is in
//! `<data-dir>/admin.token`); without it the answer is `401` with a JSON
//! error. Errors are always `{"error": "..."}` with a fitting status.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v1/status` | addresses, keys, epoch, connected agents, bytes sent |
//! | `GET /api/v1/agents` | enrolled agents, latest reports, whether connected |
//! | `GET /api/v1/agents/{id}` | one agent |
//! | `POST /api/v1/agents` | enrol `{id, key}` (key: 64 hex digits, Ed25519) |
//! | `POST /api/v1/enrolment-tokens` | a new one-time enrolment token |
//! | `GET /api/v1/jobs` | jobs, newest first, with counts |
//! | `POST /api/v1/jobs` | publish `{path, name?, version?, chunk_size?}` and distribute it to `targets: {all: true}` or `{agents: [..]}`, or to `group: NAME`; `policy`: a policy's name or its fields |
//! | `GET /api/v1/jobs/{id}` | a job: participants, verified/total, confirmations, bytes per source |
//! | `POST /api/v1/jobs/{id}/cancel` | cancel a job |
//! | `GET /api/v1/jobs/{id}/events` | server-sent events: a `snapshot` (the job as above), then `event`s ([`JobEvent`]) until the job ends |

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use baton_protocol::identity::x25519_of;
use baton_protocol::types::{AgentId, PublicKey};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::net::JobEvent;
use crate::registry::{lock, token_hash, unix_now};
use crate::server::{ApiError, JobRequest, Manager, PolicyChoice, PublishRequest};
use crate::store::{
    AgentRecord, Confirmation, Enrolled, JobRecord, PartState, ParticipantRecord, SourceBytes,
    TargetSpec,
};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) | ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
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

fn bad_json(e: JsonRejection) -> ApiError {
    ApiError::BadRequest(format!("bad request body: {}", e.body_text()))
}

/// The API's router over a running manager.
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/agents", get(agents).post(enrol))
        .route("/api/v1/agents/{id}", get(agent))
        .route("/api/v1/enrolment-tokens", post(new_token))
        .route("/api/v1/jobs", get(jobs).post(create_job))
        .route("/api/v1/jobs/{id}", get(job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/jobs/{id}/events", get(job_events))
        .merge(crate::admin_api::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            manager.clone(),
            require_token,
        ))
        .with_state(manager)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    manager: Arc<Manager>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(manager))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(m): State<Arc<Manager>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if same_secret(token.as_bytes(), m.admin_token.as_bytes()) => {
            next.run(req).await
        }
        _ => {
            let mut resp = (
                StatusCode::UNAUTHORIZED,
                Json(json!({
                    "error": "missing or wrong bearer token: send `Authorization: Bearer <token>` with the token from <data-dir>/admin.token"
                })),
            )
                .into_response();
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such API route (see /api/v1/status)".into())
}

/// `GET /api/v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusView {
    /// Agent port.
    pub agent_addr: String,
    /// HTTP API.
    pub http_addr: String,
    /// Manager public key (hex).
    pub manager_key: String,
    /// Publisher public key (hex).
    pub publisher_key: String,
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
}

async fn status(State(m): State<Arc<Manager>>) -> Json<StatusView> {
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
        publisher_key: hex::encode(m.keys.publisher.public().0),
        epoch: m.epoch,
        connected_agents: connected.len(),
        connected,
        bytes_sent: m.bytes_sent(),
        bytes_received: m.bytes_received(),
        up_bps: m.limits.up.as_ref().map_or(0, |l| l.bytes_per_sec()),
    })
}

/// An agent as the API shows it.
#[derive(Debug, Serialize)]
pub struct AgentView {
    /// The stored record.
    #[serde(flatten)]
    pub record: AgentRecord,
    /// Whether it is connected now.
    pub connected: bool,
}

fn agent_view(m: &Manager, record: AgentRecord) -> AgentView {
    let connected = AgentId::try_from(record.id.as_str())
        .map(|id| m.registry.is_connected(&id))
        .unwrap_or(false);
    AgentView { record, connected }
}

async fn agents(State(m): State<Arc<Manager>>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let records = lock(&m.store).agents()?;
    Ok(Json(
        records.into_iter().map(|r| agent_view(&m, r)).collect(),
    ))
}

async fn agent(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let record = lock(&m.store)
        .agent(&id)?
        .ok_or_else(|| ApiError::NotFound(format!("no agent {id:?} is enrolled")))?;
    Ok(Json(agent_view(&m, record)))
}

/// `POST /api/v1/agents` body.
#[derive(Debug, Deserialize)]
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

async fn enrol(
    State(m): State<Arc<Manager>>,
    body: Result<Json<EnrolRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(req) = body.map_err(bad_json)?;
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

async fn new_token(
    State(m): State<Arc<Manager>>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let mut raw = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let token = hex::encode(raw);
    lock(&m.store).add_token(&token_hash(&token), unix_now())?;
    tracing::info!("one-time enrolment token created");
    Ok((StatusCode::CREATED, Json(json!({ "token": token }))))
}

/// A job in the job list.
#[derive(Debug, Serialize, Deserialize)]
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
}

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
        });
    }
    Ok(Json(out))
}

/// Content as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
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
#[derive(Debug, Serialize)]
pub struct ParticipantView {
    /// The stored record.
    #[serde(flatten)]
    pub record: ParticipantRecord,
    /// Chunks in the content.
    pub total: u32,
    /// Whether the agent is connected now.
    pub connected: bool,
}

/// `GET /api/v1/jobs/{id}` and the `snapshot` event.
#[derive(Debug, Serialize)]
pub struct JobDetail {
    /// The stored job.
    #[serde(flatten)]
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
    /// Confirmations with times.
    pub confirmations: Vec<Confirmation>,
    /// Verified bytes per receiver and source.
    pub source_bytes: Vec<SourceBytes>,
    /// Sum of bytes received from the manager.
    pub bytes_from_manager: u64,
    /// Sum of bytes received from peers.
    pub bytes_from_peers: u64,
}

/// The job's full state from the database.
pub fn job_detail(m: &Manager, id: u64) -> Result<JobDetail, ApiError> {
    let store = lock(&m.store);
    let job = store
        .job(id)?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let content = store.content(&job.root)?;
    let total = content.as_ref().map_or(0, |c| c.chunks());
    let participants: Vec<ParticipantView> = store
        .participants(id)?
        .into_iter()
        .map(|record| {
            let connected = AgentId::try_from(record.agent.as_str())
                .map(|a| m.registry.is_connected(&a))
                .unwrap_or(false);
            ParticipantView {
                record,
                total,
                connected,
            }
        })
        .collect();
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
        job,
    })
}

async fn job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<JobDetail>, ApiError> {
    Ok(Json(job_detail(&m, id)?))
}

/// Which agents a new job is for: `{"all": true}` or `{"agents": ["a", "b"]}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsRequest {
    /// Every agent connected now, and every agent that connects while the job runs.
    #[serde(default)]
    pub all: bool,
    /// These agents.
    pub agents: Option<Vec<String>>,
}

/// `POST /api/v1/jobs` body.
#[derive(Debug, Deserialize)]
pub struct CreateJobRequest {
    /// A file the manager can read (absolute path).
    pub path: PathBuf,
    /// Content name (default: the file name).
    pub name: Option<String>,
    /// Version (default: the latest of the name plus one).
    pub version: Option<u64>,
    /// Chunk size in bytes (default 32 KiB).
    pub chunk_size: Option<u64>,
    /// Which agents (or give `group`).
    pub targets: Option<TargetsRequest>,
    /// A content group: the job goes to its members at creation.
    pub group: Option<String>,
    /// A named policy, or the policy's fields inline (default: the planner's defaults).
    pub policy: Option<PolicyChoice>,
}

/// `POST /api/v1/jobs` answer.
#[derive(Debug, Serialize, Deserialize)]
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

async fn create_job(
    State(m): State<Arc<Manager>>,
    body: Result<Json<CreateJobRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JobCreated>), ApiError> {
    let Json(req) = body.map_err(bad_json)?;
    let targets = req.targets.map(target_spec).transpose()?;
    let job = m.resolve_job(JobRequest {
        targets,
        group: req.group,
        policy: req.policy,
    })?;
    let content = m
        .publish(PublishRequest {
            path: req.path,
            name: req.name,
            version: req.version,
            chunk_size: req.chunk_size,
        })
        .await?;
    let id = m.start_job(content.root, job).await?;
    Ok((
        StatusCode::CREATED,
        Json(JobCreated {
            id,
            root: hex::encode(content.root),
            chunks: content.chunks(),
            name: content.name,
            version: content.version,
            length: content.length,
            chunk_size: content.chunk_size,
        }),
    ))
}

async fn cancel_job(
    State(m): State<Arc<Manager>>,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.cancel_job(id).await?;
    Ok(Json(json!({ "id": id, "state": "cancelled" })))
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
