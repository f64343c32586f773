//! The administrator's part of the HTTP API: segments, content groups and
//! named distribution policies (claims 8–10), merged into the API router of
//! [`crate::http`] (same bearer token, same JSON errors).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v1/segments` | every segment as its leader last reported it: leader, term, members, delays |
//! | `GET /api/v1/segments/{name}` | one segment, with `leader_history` |
//! | `GET /api/v1/groups`, `POST /api/v1/groups` | content groups; add `{name, agents: [ids], selector: {label: value}}` |
//! | `GET/PUT/DELETE /api/v1/groups/{name}` | one group (`members`: the enrolled agents it resolves to) |
//! | `GET /api/v1/policies`, `POST /api/v1/policies` | named policies; add `{name, ...fields of planner::Policy}` |
//! | `GET/PUT/DELETE /api/v1/policies/{name}` | one policy |
//!
//! A request that is wrong in one field is answered `400` with
//! `{"error": "...", "field": "<field>"}`; an unknown name `404`; adding a name
//! that exists `409`. An agent is in a group if the group lists it or if it
//! carries every label of the group's selector (an empty selector matches no
//! one); listed agents must be enrolled.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use baton_protocol::types::{AgentId, MAX_LABEL_KEY, MAX_LABEL_VALUE};
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::audit::AuditTarget;
use crate::registry::{lock, unix_now};
use crate::service::{ApiError, Manager};
use crate::store::{GroupRecord, LeaderChange, PolicyRecord, SegmentRecord};
use baton_manager_core::definitions::{check_name, policy_from_json, resolve_group};

/// The routes of this module with their OpenAPI operations, merged into the API router.
pub fn routes() -> OpenApiRouter<Arc<Manager>> {
    OpenApiRouter::new()
        .routes(routes!(segments))
        .routes(routes!(segment))
        .routes(routes!(groups, add_group))
        .routes(routes!(group, set_group, remove_group))
        .routes(routes!(policies, add_policy))
        .routes(routes!(policy, set_policy, remove_policy))
}

fn body_of(body: Result<Json<Value>, JsonRejection>) -> Result<Map<String, Value>, ApiError> {
    let Json(value) =
        body.map_err(|e| ApiError::BadRequest(format!("bad request body: {}", e.body_text())))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::BadRequest(
            "the request body must be a JSON object".into(),
        )),
    }
}

/// The name in a body: required for POST; for PUT it may be left out but must match the path.
fn name_in(body: &Map<String, Value>, path: Option<&str>) -> Result<String, ApiError> {
    let name = match body.get("name") {
        None => path.map(str::to_string),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid("name", "must be a string")),
    };
    let Some(name) = name else {
        return Err(ApiError::invalid("name", "missing"));
    };
    if let Some(p) = path
        && p != name
    {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} differs from {p:?} in the path (names cannot be changed)"),
        ));
    }
    check_name(&name)?;
    Ok(name)
}

// ---- segments ----

/// `GET /api/v1/segments/{name}`: a segment with its leaders over time.
#[derive(Debug, Serialize)]
pub struct SegmentDetail {
    /// The segment as last reported.
    #[serde(flatten)]
    pub segment: SegmentRecord,
    /// Its leaders, oldest first.
    pub leader_history: Vec<LeaderChange>,
}

#[utoipa::path(get, path = "/api/v1/segments", tag = "segments",
    responses((status = 200, description = "Every segment as its leader last reported it: `[{name, leader, term, reported_at_ms, members: [{id, score, performance, free_storage, can_serve, link, delays, last_heard_ms}]}]`", body = [Object])))]
async fn segments(State(m): State<Arc<Manager>>) -> Result<Json<Vec<SegmentRecord>>, ApiError> {
    Ok(Json(lock(&m.store).segments()?))
}

#[utoipa::path(get, path = "/api/v1/segments/{name}", tag = "segments", params(("name" = String, Path, description = "Its name")),
    responses((status = 200, description = "The segment with `leader_history: [{leader, term, since_ms}]`", body = Object), (status = 404, body = crate::http::api::ErrorBody)))]
async fn segment(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<SegmentDetail>, ApiError> {
    let store = lock(&m.store);
    let segment = store.segment(&name)?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "no segment {name:?} has been reported (see `baton segments`)"
        ))
    })?;
    let leader_history = store.leader_history(&name)?;
    Ok(Json(SegmentDetail {
        segment,
        leader_history,
    }))
}

// ---- content groups ----

/// A content group as the API shows it.
#[derive(Debug, Serialize)]
pub struct GroupView {
    /// The stored group.
    #[serde(flatten)]
    pub group: GroupRecord,
    /// The enrolled agents it resolves to now, by id.
    pub members: Vec<String>,
}

fn no_group(name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no content group {name:?} (see `baton groups list`)"
    ))
}

fn group_view(m: &Manager, group: GroupRecord) -> Result<GroupView, ApiError> {
    let agents = lock(&m.store).agents()?;
    let members = resolve_group(&group, &agents);
    Ok(GroupView { group, members })
}

/// Checks a group body (`{name, agents, selector}`) against the enrolled agents.
fn parse_group(
    m: &Manager,
    body: &Map<String, Value>,
    path: Option<&str>,
) -> Result<GroupRecord, ApiError> {
    if let Some(key) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "name" | "agents" | "selector" | "members"))
    {
        return Err(ApiError::invalid(
            key.clone(),
            "unknown field (a group has name, agents and selector)",
        ));
    }
    let name = name_in(body, path)?;
    let mut agents: Vec<String> = Vec::new();
    match body.get("agents") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let Some(id) = item.as_str() else {
                    return Err(ApiError::invalid("agents", "must be a list of agent ids"));
                };
                let id = id.trim();
                if id.is_empty() || AgentId::try_from(id).is_err() {
                    return Err(ApiError::invalid(
                        "agents",
                        format!("{id:?} is not an agent id (1 to 32 bytes)"),
                    ));
                }
                if !agents.iter().any(|a| a == id) {
                    agents.push(id.to_string());
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("agents", "must be a list of agent ids")),
    }
    let unknown: Vec<&str> = agents
        .iter()
        .filter(|a| {
            AgentId::try_from(a.as_str())
                .map(|id| !m.registry.is_enrolled(&id))
                .unwrap_or(true)
        })
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::invalid(
            "agents",
            format!(
                "not enrolled: {} (enrol first with `baton enroll`)",
                unknown.join(", ")
            ),
        ));
    }
    let mut selector = BTreeMap::new();
    match body.get("selector") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            for (k, v) in labels {
                let Some(v) = v.as_str() else {
                    return Err(ApiError::invalid(
                        "selector",
                        format!("label {k:?}: the value must be a string"),
                    ));
                };
                if k.is_empty() || k.len() > MAX_LABEL_KEY || k.contains('=') {
                    return Err(ApiError::invalid(
                        "selector",
                        format!("label key {k:?} must be 1 to {MAX_LABEL_KEY} bytes without '='"),
                    ));
                }
                if v.len() > MAX_LABEL_VALUE {
                    return Err(ApiError::invalid(
                        "selector",
                        format!("label {k:?}: the value is longer than {MAX_LABEL_VALUE} bytes"),
                    ));
                }
                selector.insert(k.clone(), v.to_string());
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "selector",
                "must be an object of label: value",
            ));
        }
    }
    if agents.is_empty() && selector.is_empty() {
        return Err(ApiError::invalid(
            "agents",
            "a group needs agents or a label selector",
        ));
    }
    Ok(GroupRecord {
        name,
        agents,
        selector,
    })
}

#[utoipa::path(get, path = "/api/v1/groups", tag = "groups",
    responses((status = 200, description = "Content groups: `[{name, agents, selector, members}]`", body = [Object])))]
async fn groups(State(m): State<Arc<Manager>>) -> Result<Json<Vec<GroupView>>, ApiError> {
    let (groups, agents) = {
        let store = lock(&m.store);
        (store.groups()?, store.agents()?)
    };
    Ok(Json(
        groups
            .into_iter()
            .map(|group| GroupView {
                members: resolve_group(&group, &agents),
                group,
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/groups/{name}", tag = "groups", params(("name" = String, Path, description = "Its name")),
    responses((status = 200, description = "The group with `members`: the enrolled agents it resolves to", body = Object), (status = 404, body = crate::http::api::ErrorBody)))]
async fn group(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    let group = lock(&m.store)
        .group(&name)?
        .ok_or_else(|| no_group(&name))?;
    Ok(Json(group_view(&m, group)?))
}

#[utoipa::path(post, path = "/api/v1/groups", tag = "groups",
    request_body(content = Object, description = "`{name, agents: [ids], selector: {label: value}}`"),
    responses((status = 201, body = Object), (status = 400, description = "One field is wrong: `{error, field}`", body = crate::http::api::ErrorBody), (status = 409, description = "The name exists", body = crate::http::api::ErrorBody)))]
async fn add_group(
    State(m): State<Arc<Manager>>,
    body: Result<Json<Value>, JsonRejection>,
) -> axum::response::Response {
    let body = body_of(body);
    named_in(&body).on(create_group(&m, body))
}

/// The name a creating request's body gives, as the audit log's target.
fn named_in(body: &Result<Map<String, Value>, ApiError>) -> AuditTarget {
    let name = body
        .as_ref()
        .ok()
        .and_then(|b| b.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    AuditTarget(name.to_string())
}

fn create_group(
    m: &Manager,
    body: Result<Map<String, Value>, ApiError>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let body = body?;
    let group = parse_group(m, &body, None)?;
    lock(&m.store).add_group(&group, unix_now())?;
    tracing::info!(group = %group.name, "content group added");
    Ok((StatusCode::CREATED, Json(group_view(m, group)?)))
}

#[utoipa::path(put, path = "/api/v1/groups/{name}", tag = "groups", params(("name" = String, Path, description = "Its name")),
    request_body(content = Object, description = "`{agents: [ids], selector: {label: value}}`"),
    responses((status = 200, body = Object), (status = 400, description = "One field is wrong: `{error, field}`", body = crate::http::api::ErrorBody), (status = 404, body = crate::http::api::ErrorBody)))]
async fn set_group(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let body = body_of(body)?;
    if lock(&m.store).group(&name)?.is_none() {
        return Err(no_group(&name));
    }
    let group = parse_group(&m, &body, Some(&name))?;
    lock(&m.store).set_group(&group, unix_now())?;
    tracing::info!(group = %group.name, "content group changed");
    Ok(Json(group_view(&m, group)?))
}

#[utoipa::path(delete, path = "/api/v1/groups/{name}", tag = "groups", params(("name" = String, Path, description = "Its name")),
    responses((status = 200, description = "Removed"), (status = 404, body = crate::http::api::ErrorBody)))]
async fn remove_group(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    lock(&m.store).remove_group(&name).map_err(|e| match e {
        crate::store::StoreError::NotFound(_) => no_group(&name),
        other => other.into(),
    })?;
    tracing::info!(group = %name, "content group removed");
    Ok(Json(json!({ "name": name, "removed": true })))
}

// ---- policies ----

fn no_policy(name: &str) -> ApiError {
    ApiError::NotFound(format!("no policy {name:?} (see `baton policies list`)"))
}

/// Checks a policy body (`{name, ...fields}`) and returns the stored form (defaults filled in).
fn parse_policy(body: &Map<String, Value>, path: Option<&str>) -> Result<PolicyRecord, ApiError> {
    let name = name_in(body, path)?;
    let mut fields = body.clone();
    fields.remove("name");
    let policy = policy_from_json(&Value::Object(fields))?;
    let policy = serde_json::to_value(&policy).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(PolicyRecord { name, policy })
}

/// A named policy as the API shows it: `{"name", ...fields}`.
fn policy_view(record: PolicyRecord) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), Value::String(record.name));
    if let Value::Object(fields) = record.policy {
        out.extend(fields);
    }
    Value::Object(out)
}

#[utoipa::path(get, path = "/api/v1/policies", tag = "policies",
    responses((status = 200, description = "Named policies: `[{name, ...fields of the planner's Policy}]`", body = [Object])))]
async fn policies(State(m): State<Arc<Manager>>) -> Result<Json<Vec<Value>>, ApiError> {
    let all = lock(&m.store).policies()?;
    Ok(Json(all.into_iter().map(policy_view).collect()))
}

#[utoipa::path(get, path = "/api/v1/policies/{name}", tag = "policies", params(("name" = String, Path, description = "Its name")),
    responses((status = 200, body = Object), (status = 404, body = crate::http::api::ErrorBody)))]
async fn policy(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = lock(&m.store)
        .policy(&name)?
        .ok_or_else(|| no_policy(&name))?;
    Ok(Json(policy_view(record)))
}

#[utoipa::path(post, path = "/api/v1/policies", tag = "policies",
    request_body(content = Object, description = "`{name, ...fields of the planner's Policy}` (every field defaulted)"),
    responses((status = 201, body = Object), (status = 400, description = "One field is wrong: `{error, field}`", body = crate::http::api::ErrorBody), (status = 409, description = "The name exists", body = crate::http::api::ErrorBody)))]
async fn add_policy(
    State(m): State<Arc<Manager>>,
    body: Result<Json<Value>, JsonRejection>,
) -> axum::response::Response {
    let body = body_of(body);
    named_in(&body).on(create_policy(&m, body))
}

fn create_policy(
    m: &Manager,
    body: Result<Map<String, Value>, ApiError>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body?;
    let record = parse_policy(&body, None)?;
    lock(&m.store).add_policy(&record, unix_now())?;
    tracing::info!(policy = %record.name, "policy added");
    Ok((StatusCode::CREATED, Json(policy_view(record))))
}

#[utoipa::path(put, path = "/api/v1/policies/{name}", tag = "policies", params(("name" = String, Path, description = "Its name")),
    request_body(content = Object, description = "The policy's fields"),
    responses((status = 200, body = Object), (status = 400, description = "One field is wrong: `{error, field}`", body = crate::http::api::ErrorBody), (status = 404, body = crate::http::api::ErrorBody)))]
async fn set_policy(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_of(body)?;
    if lock(&m.store).policy(&name)?.is_none() {
        return Err(no_policy(&name));
    }
    let record = parse_policy(&body, Some(&name))?;
    lock(&m.store).set_policy(&record, unix_now())?;
    tracing::info!(policy = %record.name, "policy changed");
    Ok(Json(policy_view(record)))
}

#[utoipa::path(delete, path = "/api/v1/policies/{name}", tag = "policies", params(("name" = String, Path, description = "Its name")),
    responses((status = 200, description = "Removed"), (status = 404, body = crate::http::api::ErrorBody)))]
async fn remove_policy(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    lock(&m.store).remove_policy(&name).map_err(|e| match e {
        crate::store::StoreError::NotFound(_) => no_policy(&name),
        other => other.into(),
    })?;
    tracing::info!(policy = %name, "policy removed");
    Ok(Json(json!({ "name": name, "removed": true })))
}
