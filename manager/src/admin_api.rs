//! The administrator's part of the HTTP API: segments, content groups and
//! named distribution policies (claims 8–10), merged into [`crate::http`]'s
//! router (same bearer token, same JSON errors).
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

use baton_manager_core::planner::Policy;
use crate::registry::{lock, unix_now};
use crate::server::{ApiError, Manager};
use baton_manager_core::groups::resolve_group;
use crate::store::{GroupRecord, LeaderChange, PolicyRecord, SegmentRecord};

/// Longest group or policy name.
pub const MAX_NAME: usize = 64;

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

/// Checks a group or policy name: 1..=64 of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ApiError::invalid(
            "name",
            format!("must be 1 to {MAX_NAME} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} has {c:?}; use letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
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

/// The members of the group `name` now (404 if there is no such group).
pub fn group_members(m: &Manager, name: &str) -> Result<Vec<String>, ApiError> {
    let store = lock(&m.store);
    let group = store.group(name)?.ok_or_else(|| no_group(name))?;
    Ok(resolve_group(&group, &store.agents()?))
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
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let body = body_of(body)?;
    let group = parse_group(&m, &body, None)?;
    lock(&m.store).add_group(&group, unix_now())?;
    tracing::info!(group = %group.name, "content group added");
    Ok((StatusCode::CREATED, Json(group_view(&m, group)?)))
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

/// The field names a JSON object of `planner::Policy` may have, with the nested ones of
/// object-valued fields (`weights`).
fn known_fields() -> Map<String, Value> {
    match serde_json::to_value(Policy::default()) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// Checks the fields of a policy given as JSON and reads it; the error names the first field
/// that is unknown or wrong.
pub fn policy_from_json(value: &Value) -> Result<Policy, ApiError> {
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid(
            "policy",
            "must be a JSON object of policy fields",
        ));
    };
    let known = known_fields();
    for (key, v) in fields {
        let Some(default) = known.get(key) else {
            let names: Vec<&str> = known.keys().map(String::as_str).collect();
            return Err(ApiError::invalid(
                key.clone(),
                format!("unknown policy field {key:?} (known: {})", names.join(", ")),
            ));
        };
        // A nested struct (`weights`) has its fields in the default; a map
        // (`leaf_only_labels`) defaults to empty and takes any key.
        if let (Value::Object(inner), Value::Object(given)) = (default, v)
            && !inner.is_empty()
        {
            for sub in given.keys() {
                if !inner.contains_key(sub) {
                    let names: Vec<&str> = inner.keys().map(String::as_str).collect();
                    return Err(ApiError::invalid(
                        format!("{key}.{sub}"),
                        format!(
                            "unknown field {sub:?} of {key} (known: {})",
                            names.join(", ")
                        ),
                    ));
                }
            }
        }
        let mut alone = Map::new();
        alone.insert(key.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<Policy>(Value::Object(alone)) {
            return Err(ApiError::invalid(key.clone(), e.to_string()));
        }
        check_field(key, v)?;
    }
    serde_json::from_value(value.clone()).map_err(|e| ApiError::invalid("policy", e.to_string()))
}

/// Range checks of fields whose type alone does not say enough.
fn check_field(key: &str, v: &Value) -> Result<(), ApiError> {
    match key {
        "max_stripes" if v.as_u64() == Some(0) => Err(ApiError::invalid(key, "must be at least 1")),
        "manager_max_copies" if !v.as_f64().is_some_and(|c| c.is_finite() && c >= 1.0) => {
            Err(ApiError::invalid(key, "must be a number of at least 1"))
        }
        "weights" => {
            for (name, w) in v.as_object().into_iter().flatten() {
                if !w.as_f64().is_some_and(|w| w.is_finite() && w >= 0.0) {
                    return Err(ApiError::invalid(
                        format!("weights.{name}"),
                        "must be a number of at least 0",
                    ));
                }
            }
            Ok(())
        }
        "window" if v.is_object() => {
            for end in ["start_minute", "end_minute"] {
                if v[end].as_u64().is_none_or(|m| m >= 24 * 60) {
                    return Err(ApiError::invalid(
                        format!("window.{end}"),
                        "must be a UTC minute of the day, 0 to 1439",
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
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
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body_of(body)?;
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

#[cfg(test)]
mod test {
    use super::*;

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Invalid { field, .. } => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn policy_errors_name_the_field() {
        let ok = policy_from_json(&json!({
            "max_peers_per_source": 3,
            "weights": { "up": 2.0 },
            "leaf_only_labels": { "class": "mcu" },
        }))
        .unwrap();
        assert_eq!(ok.leaf_only_labels["class"], "mcu");
        assert_eq!(ok.max_peers_per_source, 3);
        assert_eq!(ok.weights.up, 2.0);
        assert_eq!(ok.weights.down, Policy::default().weights.down);
        let cases = [
            (json!({ "max_peers_per_sauce": 3 }), "max_peers_per_sauce"),
            (
                json!({ "max_peers_per_source": "x" }),
                "max_peers_per_source",
            ),
            (
                json!({ "max_peers_per_source": -1 }),
                "max_peers_per_source",
            ),
            (json!({ "weights": { "upp": 1.0 } }), "weights.upp"),
            (json!({ "weights": { "up": -1.0 } }), "weights.up"),
            (json!({ "max_stripes": 0 }), "max_stripes"),
            (json!({ "manager_max_copies": 0.5 }), "manager_max_copies"),
            (json!({ "leaf_only": ["x".repeat(40)] }), "leaf_only"),
        ];
        for (body, field) in cases {
            assert_eq!(
                field_of(policy_from_json(&body).unwrap_err()),
                field,
                "{body}"
            );
        }
        assert_eq!(
            field_of(policy_from_json(&json!([1])).unwrap_err()),
            "policy"
        );
    }

    #[test]
    fn names_are_checked() {
        check_name("fw-canary_2.1").unwrap();
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert_eq!(field_of(check_name(bad).unwrap_err()), "name");
        }
    }
}
