//! The service layer: what the HTTP API (and through it the CLI and the web UI)
//! asks of the manager.
//!
//! [`Manager`] publishes content, checks and resolves job requests (content
//! groups to their members, named policies to their fields, a rollout's group
//! waves to their members), starts and cancels jobs and pauses, resumes, approves
//! and aborts their rollouts through the engine task, and reads the database. Handlers in
//! [`crate::http`] call it; it calls the store, the registry, the content
//! library and the engine task, never the HTTP layer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use baton_agent_core::linux::link::Limits;
use baton_manager_core::definitions::{FieldError, policy_from_json, resolve_group};
use baton_manager_core::engine::{JobSpec, Targets};
use baton_manager_core::planner::{Policy, Rollout, Wave};
use baton_protocol::Manifest;
use baton_protocol::identity::Identity;
use baton_protocol::manifest::ManifestError;
use baton_protocol::types::{AgentId, Digest};
use serde::Deserialize;
use tokio::sync::{broadcast, oneshot};

use crate::content::{self, Content, ContentError, Keys, Library};
use crate::engine_task::{EngineInput, EngineSender, EngineStats, JobEvent, RolloutAction};
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
    /// The manager's key (transport only).
    pub keys: Keys,
    /// The publisher key for online signing (`baton serve --publisher-key`), if given: it
    /// signs only names the newest trust document lists it for.
    pub publisher: Option<Identity>,
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
    /// Active or standby (a standby serves reads only and says which manager is active).
    pub activity: Arc<crate::lease::Activity>,
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
    /// A manifest signed offline (`baton sign`), postcard-encoded: published as it is,
    /// once the file matches it and the newest trust document lists its signer for its
    /// name. Without one the manager signs with its `--publisher-key`, if it may.
    pub manifest: Option<Vec<u8>>,
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
    /// A staged rollout for this job (JSON of `planner::Rollout`; a wave may be a bare
    /// percentage), replacing the policy's.
    pub rollout: Option<serde_json::Value>,
}

/// Reads a job's staged rollout as a request gives it: the fields of `planner::Rollout`,
/// where a wave may also be a bare percentage (`"waves": [10, 50, 100]`).
pub fn rollout_from_json(mut value: serde_json::Value) -> Result<Rollout, ApiError> {
    if let Some(waves) = value.get_mut("waves").and_then(|w| w.as_array_mut()) {
        for wave in waves {
            if wave.is_number() {
                *wave = serde_json::json!({ "percent": wave.clone() });
            }
        }
    }
    let rollout: Rollout =
        serde_json::from_value(value).map_err(|e| ApiError::invalid("rollout", e.to_string()))?;
    rollout
        .validate()
        .map_err(|(field, reason)| ApiError::invalid(field, reason))?;
    Ok(rollout)
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
        TargetSpec::Agents(ids) => Targets::Agents(agent_ids(ids)?),
        TargetSpec::Group { agents, selector } => Targets::Selected {
            agents: agent_ids(agents)?,
            labels: selector.clone(),
        },
    })
}

/// Ids as the engine takes them (unknown-length ids are refused).
fn agent_ids(ids: &[String]) -> Result<Vec<AgentId>, String> {
    ids.iter()
        .map(|s| AgentId::try_from(s.as_str()).map_err(|_| format!("bad agent id {s:?}")))
        .collect()
}

/// Checks an offline-signed manifest before its file is read: its limits, its expiry, and
/// that the newest trust document lists its signer for its name (errors name what is wrong).
fn check_offline_manifest(
    trust: &crate::trust::TrustChain,
    m: &Manifest,
    now: u64,
) -> Result<(), ApiError> {
    m.check_limits(Some(now))
        .map_err(|e| ApiError::invalid("manifest", format!("{e} (expires at {})", m.expires)))?;
    trust.verify_manifest(m, now).map_err(|e| {
        let signer = crate::trust::key_id_hex(&m.signer);
        let held = trust
            .latest()
            .map(|s| format!("trust document version {}", s.document.version))
            .unwrap_or_else(|| "no trust document".into());
        let why = match e {
            ManifestError::NoTrust => {
                "the manager holds no trust document (`baton trust push FILE`)".to_string()
            }
            ManifestError::UntrustedSigner => {
                format!("its signer (key id {signer}) is not a publisher in {held}")
            }
            ManifestError::NotListed => format!(
                "its signer (key id {signer}) is not listed for {:?} in {held}",
                m.name.as_str()
            ),
            ManifestError::BadSignature => "its signature does not verify".to_string(),
            ManifestError::Expired => format!("{held} has expired"),
            other => other.to_string(),
        };
        ApiError::invalid("manifest", format!("refused: {why}"))
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

    /// Publishes a file: hashes it, takes its offline-signed manifest (checked against the
    /// file and the newest trust document) or signs one with the online publisher key (or
    /// reuses the stored one for unchanged content), stores and serves it.
    pub async fn publish(&self, req: PublishRequest) -> Result<ContentRecord, ApiError> {
        let signed = match &req.manifest {
            Some(bytes) => Some(crate::trust::decode_manifest_bytes(bytes).map_err(|e| {
                ApiError::invalid(
                    "manifest",
                    format!("not a manifest ({e}); make one with `baton sign`"),
                )
            })?),
            None => None,
        };
        let chunk_size = match &signed {
            Some(m) => {
                if req.chunk_size.is_some_and(|c| c != u64::from(m.chunk_size)) {
                    return Err(ApiError::invalid(
                        "chunk_size",
                        format!(
                            "the manifest says {} bytes; leave chunk_size out",
                            m.chunk_size
                        ),
                    ));
                }
                content::check_chunk_size(u64::from(m.chunk_size))?
            }
            None => content::check_chunk_size(
                req.chunk_size.unwrap_or(content::DEFAULT_CHUNK_SIZE as u64),
            )?,
        };
        let name = match (&req.name, &signed) {
            (Some(n), Some(m)) if n.as_str() != m.name.as_str() => {
                return Err(ApiError::invalid(
                    "name",
                    format!("the manifest is for {:?}, not {n:?}", m.name.as_str()),
                ));
            }
            (_, Some(m)) => m.name.to_string(),
            (Some(n), None) => n.clone(),
            (None, None) => req
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
        if let (Some(v), Some(m)) = (req.version, &signed)
            && v != m.version
        {
            return Err(ApiError::invalid(
                "version",
                format!("the manifest says version {}; leave version out", m.version),
            ));
        }
        if !req.path.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "{}: give an absolute path (the manager may run in another directory)",
                req.path.display()
            )));
        }
        let now = unix_now();
        // Refused before the file is read: what the newest trust document does not allow.
        let trust = self.registry.trust();
        match &signed {
            Some(m) => check_offline_manifest(&trust, m, now)?,
            None => self.check_online_signing(&trust, &name, now)?,
        }
        let path = req.path.clone();
        let hashed = tokio::task::spawn_blocking(move || content::hash_file(&path, chunk_size))
            .await
            .map_err(|e| ApiError::Internal(format!("hashing task failed: {e}")))??;
        let root = hashed.tree.root();
        if let Some(m) = &signed {
            if m.root != root {
                return Err(ApiError::invalid(
                    "manifest",
                    format!(
                        "the file's Merkle root {} is not the manifest's {} (another file, or it changed after `baton sign`)",
                        hex::encode(&root[..8]),
                        hex::encode(&m.root[..8])
                    ),
                ));
            }
            if m.length != hashed.length {
                return Err(ApiError::invalid(
                    "manifest",
                    format!(
                        "the file is {} bytes, the manifest says {}",
                        hashed.length, m.length
                    ),
                ));
            }
        }
        let (record, manifest) = {
            let mut store = lock(&self.store);
            let existing = store.content(&root)?;
            let record_of = |manifest: &Manifest| -> Result<ContentRecord, ApiError> {
                Ok(ContentRecord {
                    root,
                    name: name.clone(),
                    version: manifest.version,
                    length: hashed.length,
                    chunk_size: hashed.chunk_size,
                    path: hashed.path.to_string_lossy().into_owned(),
                    manifest: postcard::to_allocvec(manifest)
                        .map_err(|e| ApiError::Internal(e.to_string()))?,
                    created_at: now,
                })
            };
            match (signed, existing) {
                (Some(manifest), _) => {
                    let rec = record_of(&manifest)?;
                    store.put_content(&rec)?;
                    (rec, manifest)
                }
                (None, Some(rec))
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
                (None, _) => {
                    let publisher = self
                        .publisher
                        .as_ref()
                        .expect("checked by check_online_signing");
                    let highest = store.latest_version(&name)?;
                    let version = match (req.version, highest) {
                        (Some(v), Some(h)) if v < h => {
                            return Err(ApiError::invalid(
                                "version",
                                format!(
                                    "{name:?} version {h} is published already; a version below it would be refused by the agents that hold it (a deliberate rollback is the old content under a higher version)"
                                ),
                            ));
                        }
                        (Some(v), _) => v,
                        (None, h) => h.map_or(1, |v| v + 1),
                    };
                    let manifest = Manifest::sign(
                        publisher,
                        name_checked,
                        version,
                        0,
                        hashed.length,
                        hashed.chunk_size,
                        root,
                    );
                    let rec = record_of(&manifest)?;
                    store.put_content(&rec)?;
                    (rec, manifest)
                }
            }
        };
        self.library.insert(Content::new(hashed, manifest)?);
        tracing::info!(name = %record.name, version = record.version, root = %hex::encode(record.root), length = record.length, "content published");
        Ok(record)
    }

    /// Whether this manager may sign content `name` itself: it was given a publisher key
    /// (`--publisher-key`) and the newest trust document lists that key for the name.
    fn check_online_signing(
        &self,
        trust: &crate::trust::TrustChain,
        name: &str,
        now: u64,
    ) -> Result<(), ApiError> {
        let Some(publisher) = &self.publisher else {
            return Err(ApiError::Forbidden(format!(
                "this manager has no publisher key, so it cannot sign {name:?}: sign it offline (`baton sign FILE --key publisher.key --name {name}`, then `baton push FILE --manifest FILE.manifest`), or start the manager with `--publisher-key FILE` for a key the trust document lists"
            )));
        };
        trust.may_sign(&publisher.public(), name, now).map_err(|e| {
            let why = match e {
                ManifestError::NoTrust => "the manager holds no trust document (`baton trust push FILE`, or `baton serve --trust FILE`)".to_string(),
                ManifestError::UntrustedSigner => format!(
                    "the trust document does not list the manager's publisher key {}",
                    crate::trust::key_hex(&publisher.public())
                ),
                ManifestError::NotListed => format!(
                    "the trust document lists the manager's publisher key {} for other names",
                    crate::trust::key_hex(&publisher.public())
                ),
                other => other.to_string(),
            };
            ApiError::Forbidden(format!(
                "cannot sign {name:?} online: {why}; sign it offline (`baton sign`, then `baton push FILE --manifest FILE.manifest`) or list the key for it (`baton trust add-publisher`)"
            ))
        })
    }

    /// Checks a job request: resolves a content group to its enrolled members and a named
    /// policy to its fields. A group with a label selector also takes in the agents that
    /// connect carrying its labels while the job runs; otherwise later changes to the group
    /// do not change the job.
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
                let selector = lock(&self.store)
                    .group(&group)?
                    .map(|g| g.selector)
                    .unwrap_or_default();
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
                if selector.is_empty() {
                    TargetSpec::Agents(members)
                } else {
                    // Agents that come to carry the selector's labels join while it runs.
                    TargetSpec::Group {
                        agents: members,
                        selector,
                    }
                }
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
        let mut policy = policy;
        if let Some(value) = req.rollout {
            policy.rollout = Some(rollout_from_json(value)?);
        }
        if let Some(rollout) = &mut policy.rollout {
            // Groups become their members now, like a job's target group.
            for wave in &mut rollout.waves {
                if let Wave::Group(name) = wave {
                    let members = self
                        .group_members(name)?
                        .iter()
                        .filter_map(|m| AgentId::try_from(m.as_str()).ok())
                        .collect();
                    *wave = Wave::Agents(members);
                }
            }
        }
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
        if let Targets::Agents(ids) | Targets::Selected { agents: ids, .. } = &engine_targets {
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

    /// Pauses, resumes, approves the next wave of, or aborts a running job's rollout.
    pub async fn rollout_command(&self, job: u64, action: RolloutAction) -> Result<(), ApiError> {
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
            .send(EngineInput::Rollout { job, action, reply })
            .await
            .map_err(|_| ApiError::Internal("the manager is shutting down".into()))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::Conflict(format!(
                "cannot {} job {job}: {e}",
                action.as_str()
            ))),
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
