//! The service layer: what the HTTP API (and through it the CLI and the web UI)
//! asks of the manager.
//!
//! [`Manager`] publishes content, checks and resolves job requests (content
//! groups to their members, named policies to their fields), starts and
//! cancels jobs through the engine task, and reads the database. Handlers in
//! [`crate::http`] call it; it calls the store, the registry, the content
//! library and the engine task, never the HTTP layer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use baton_agent_core::linux::link::Limits;
use baton_manager_core::definitions::{FieldError, policy_from_json, resolve_group};
use baton_manager_core::engine::{JobSpec, Targets};
use baton_manager_core::planner::Policy;
use baton_protocol::Manifest;
use baton_protocol::types::{AgentId, Digest};
use serde::Deserialize;
use tokio::sync::{broadcast, oneshot};

use crate::content::{self, Content, ContentError, Keys, Library};
use crate::engine_task::{EngineInput, EngineSender, EngineStats, JobEvent};
use crate::registry::{Registry, SharedStore, lock, unix_now};
use crate::store::{ContentRecord, JobOrigin, StoreError, TargetSpec};

/// The running manager, as the HTTP API sees it.
#[derive(Debug)]
pub struct Manager {
    /// The database.
    pub store: SharedStore,
    /// Enrolled and connected agents.
    pub registry: Arc<Registry>,
    /// Published content.
    pub library: Arc<Library>,
    /// Manager and publisher keys.
    pub keys: Keys,
    /// The engine task's input (bounded: an API call waits while it is full).
    pub engine: EngineSender,
    /// Job progress for subscribers.
    pub events: broadcast::Sender<JobEvent>,
    /// What the engine task counts.
    pub stats: Arc<EngineStats>,
    /// Upload cap and byte counters of the agent port.
    pub limits: Limits,
    /// This run's epoch.
    pub epoch: u32,
    /// The bound agent port.
    pub agent_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The bearer token the API requires.
    pub admin_token: String,
}

/// What to publish.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PublishRequest {
    /// A file the manager can read.
    pub path: PathBuf,
    /// Content name (default: the file name).
    pub name: Option<String>,
    /// Version (default: the latest of this name plus one; the same content keeps its version).
    pub version: Option<u64>,
    /// Chunk size in bytes (default 32 KiB).
    pub chunk_size: Option<u64>,
}

/// Why an API operation failed, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// Not found (404).
    #[error("{0}")]
    NotFound(String),
    /// Not allowed (403): the manager refuses this whoever asks.
    #[error("{0}")]
    Forbidden(String),
    /// Conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// One field of the request is wrong (400, the answer names the field).
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as the request names it (`name`, `agents`, `weights.up`, ...).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The manager failed (500).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::KeyConflict(_) => ApiError::Conflict(e.to_string()),
            StoreError::NotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::Duplicate(_) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ContentError> for ApiError {
    fn from(e: ContentError) -> Self {
        match e {
            ContentError::Io { .. } | ContentError::BadSecretFile { .. } => {
                ApiError::BadRequest(e.to_string())
            }
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl ApiError {
    /// A validation error naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A job's policy as a request gives it: a stored policy's name, or the policy's fields.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PolicyChoice {
    /// A named policy (`baton policies`).
    Named(String),
    /// The fields of a `planner::Policy`, given inline.
    Inline(serde_json::Value),
}

/// What a new job is for, before it is checked: explicit targets or a content group, and a
/// policy.
#[derive(Clone, Debug, Default)]
pub struct JobRequest {
    /// Explicit targets (`{"all": true}` or agent ids).
    pub targets: Option<TargetSpec>,
    /// A content group, resolved to its members when the job is created.
    pub group: Option<String>,
    /// The policy (default: the planner's defaults).
    pub policy: Option<PolicyChoice>,
}

/// A checked job request: resolved targets and the policy it runs under.
#[derive(Clone, Debug)]
pub struct ResolvedJob {
    /// Who gets the content.
    pub targets: TargetSpec,
    /// The policy.
    pub policy: Policy,
    /// Where targets and policy came from (stored with the job).
    pub origin: JobOrigin,
}

/// The engine's targets for a stored target spec (unknown-length ids are refused).
pub fn engine_targets(spec: &TargetSpec) -> Result<Targets, String> {
    Ok(match spec {
        TargetSpec::All => Targets::All,
        TargetSpec::Agents(ids) => Targets::Agents(
            ids.iter()
                .map(|s| AgentId::try_from(s.as_str()).map_err(|_| format!("bad agent id {s:?}")))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// The manifest a content record carries.
pub fn decode_manifest(record: &ContentRecord) -> Result<Manifest, StoreError> {
    postcard::from_bytes(&record.manifest)
        .map_err(|e| StoreError::Corrupt(format!("manifest of {}: {e}", record.name)))
}

impl Manager {
    /// The members of the content group `name` now (404 if there is no such group).
    pub fn group_members(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let store = lock(&self.store);
        let group = store.group(name)?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "no content group {name:?} (see `baton groups list`)"
            ))
        })?;
        Ok(resolve_group(&group, &store.agents()?))
    }

    /// Publishes a file: hashes it, signs (or reuses) its manifest, stores and serves it.
    pub async fn publish(&self, req: PublishRequest) -> Result<ContentRecord, ApiError> {
        let chunk_size = content::check_chunk_size(
            req.chunk_size.unwrap_or(content::DEFAULT_CHUNK_SIZE as u64),
        )?;
        let name = match &req.name {
            Some(n) => n.clone(),
            None => req
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("{}: not a file", req.path.display()))
                })?,
        };
        let name_checked = content::check_name(&name)?;
        if req.version.is_some_and(|v| v > i64::MAX as u64) {
            return Err(ApiError::BadRequest(format!(
                "version must be at most {}",
                i64::MAX
            )));
        }
        if !req.path.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "{}: give an absolute path (the manager may run in another directory)",
                req.path.display()
            )));
        }
        let path = req.path.clone();
        let hashed = tokio::task::spawn_blocking(move || content::hash_file(&path, chunk_size))
            .await
            .map_err(|e| ApiError::Internal(format!("hashing task failed: {e}")))??;
        let root = hashed.tree.root();
        let now = unix_now();
        let (record, manifest) = {
            let mut store = lock(&self.store);
            let existing = store.content(&root)?;
            match existing {
                Some(rec)
                    if rec.name == name
                        && req.version.is_none_or(|v| v == rec.version)
                        && rec.chunk_size == chunk_size =>
                {
                    let manifest = decode_manifest(&rec)?;
                    let rec = ContentRecord {
                        path: hashed.path.to_string_lossy().into_owned(),
                        ..rec
                    };
                    store.put_content(&rec)?;
                    (rec, manifest)
                }
                _ => {
                    let version = match req.version {
                        Some(v) => v,
                        None => store.latest_version(&name)?.map_or(1, |v| v + 1),
                    };
                    let manifest = Manifest::sign(
                        &self.keys.publisher,
                        name_checked,
                        version,
                        0,
                        hashed.length,
                        hashed.chunk_size,
                        root,
                    );
                    let rec = ContentRecord {
                        root,
                        name: name.clone(),
                        version,
                        length: hashed.length,
                        chunk_size: hashed.chunk_size,
                        path: hashed.path.to_string_lossy().into_owned(),
                        manifest: postcard::to_allocvec(&manifest)
                            .map_err(|e| ApiError::Internal(e.to_string()))?,
                        created_at: now,
                    };
                    store.put_content(&rec)?;
                    (rec, manifest)
                }
            }
        };
        self.library.insert(Content::new(hashed, manifest)?);
        tracing::info!(name = %record.name, version = record.version, root = %hex::encode(record.root), length = record.length, "content published");
        Ok(record)
    }

    /// Checks a job request: resolves a content group to its enrolled members (a snapshot:
    /// later changes to the group do not change the job) and a named policy to its fields.
    pub fn resolve_job(&self, req: JobRequest) -> Result<ResolvedJob, ApiError> {
        let mut origin = JobOrigin::default();
        let targets = match (req.targets, req.group) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "group",
                    "give either targets or a group, not both",
                ));
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "targets",
                    "say which agents: targets {\"all\": true}, {\"agents\": [..]}, or a group",
                ));
            }
            (Some(targets), None) => targets,
            (None, Some(group)) => {
                let members = self.group_members(&group)?;
                if members.is_empty() {
                    return Err(ApiError::invalid(
                        "group",
                        format!(
                            "group {group:?} has no members: none of its agents is enrolled and no enrolled agent carries all of its selector labels"
                        ),
                    ));
                }
                origin.group = Some(group);
                TargetSpec::Agents(members)
            }
        };
        let policy = match req.policy {
            None => Policy::default(),
            Some(PolicyChoice::Named(name)) => {
                let record = lock(&self.store).policy(&name)?.ok_or_else(|| {
                    ApiError::NotFound(format!("no policy {name:?} (see `baton policies list`)"))
                })?;
                let policy = policy_from_json(&record.policy)?;
                origin.policy_name = Some(name);
                policy
            }
            Some(PolicyChoice::Inline(value)) => policy_from_json(&value)?,
        };
        origin.policy =
            Some(serde_json::to_value(&policy).map_err(|e| ApiError::Internal(e.to_string()))?);
        Ok(ResolvedJob {
            targets,
            policy,
            origin,
        })
    }

    /// Creates a job for published content and starts it in the engine.
    pub async fn create_job(
        &self,
        root: Digest,
        targets: TargetSpec,
        policy: Option<Policy>,
    ) -> Result<u64, ApiError> {
        let policy = policy.unwrap_or_default();
        let origin = JobOrigin {
            policy: Some(
                serde_json::to_value(&policy).map_err(|e| ApiError::Internal(e.to_string()))?,
            ),
            ..JobOrigin::default()
        };
        self.start_job(
            root,
            ResolvedJob {
                targets,
                policy,
                origin,
            },
        )
        .await
    }

    /// Creates a job from a checked request for published content and starts it in the engine.
    pub async fn start_job(&self, root: Digest, job: ResolvedJob) -> Result<u64, ApiError> {
        let ResolvedJob {
            targets,
            policy,
            origin,
        } = job;
        let engine_targets = engine_targets(&targets).map_err(ApiError::BadRequest)?;
        if let Targets::Agents(ids) = &engine_targets {
            if ids.is_empty() {
                return Err(ApiError::BadRequest(
                    "no target agents: name some, or use all".into(),
                ));
            }
            let unknown: Vec<&str> = ids
                .iter()
                .filter(|id| !self.registry.is_enrolled(id))
                .map(|id| id.as_str())
                .collect();
            if !unknown.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "not enrolled: {} (enrol first with `baton enroll`)",
                    unknown.join(", ")
                )));
            }
        }
        let (job, manifest) = {
            let mut store = lock(&self.store);
            let record = store
                .content(&root)?
                .ok_or_else(|| ApiError::NotFound("content not published".into()))?;
            let manifest = decode_manifest(&record)?;
            (
                store.create_job_from(&root, &targets, &origin, unix_now())?,
                manifest,
            )
        };
        let spec = JobSpec {
            id: job,
            manifest,
            targets: engine_targets,
            policy,
        };
        let (reply, answer) = oneshot::channel();
        self.engine
            .send(EngineInput::StartJob {
                spec: Box::new(spec),
                reply,
            })
            .await
            .map_err(|_| ApiError::Internal("the manager is shutting down".into()))?;
        match answer.await {
            Ok(Ok(())) => Ok(job),
            Ok(Err(e)) => Err(ApiError::Conflict(format!("job {job} refused: {e}"))),
            Err(_) => Err(ApiError::Internal("the manager is shutting down".into())),
        }
    }

    /// Cancels a job.
    pub async fn cancel_job(&self, job: u64) -> Result<(), ApiError> {
        let record = lock(&self.store)
            .job(job)?
            .ok_or_else(|| ApiError::NotFound(format!("no job {job}")))?;
        if record.state.is_over() {
            return Err(ApiError::Conflict(format!(
                "job {job} is already {}",
                record.state.as_str()
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.engine
            .send(EngineInput::CancelJob { job, reply })
            .await
            .map_err(|_| ApiError::Internal("the manager is shutting down".into()))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::Conflict(format!("job {job}: {e}"))),
            Err(_) => Err(ApiError::Internal("the manager is shutting down".into())),
        }
    }

    /// Wire bytes the agent port has sent since start.
    pub fn bytes_sent(&self) -> u64 {
        self.limits.sent.load(Ordering::Relaxed)
    }

    /// Wire bytes the agent port has received since start.
    pub fn bytes_received(&self) -> u64 {
        self.limits.received.load(Ordering::Relaxed)
    }
}
