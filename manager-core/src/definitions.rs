//! What administrators define: content groups and named policies, checked and resolved.
//!
//! Group and policy names are short (1..=64 of `A-Z a-z 0-9 . _ -`). An agent
//! is in a group if the group lists it by id, or if it carries every label of
//! the group's selector (an empty selector matches no one); labels are read
//! from the agent's latest report as the store keeps it. A policy given as
//! JSON is checked field by field, so that an error names the first field that
//! is unknown or out of range ([`FieldError`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::planner::Policy;
use crate::records::{AgentRecord, GroupRecord};

/// One field of a group or policy definition is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field, as the definition names it (`name`, `agents`, `weights.up`, ...).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error naming `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Longest group or policy name.
pub const MAX_NAME: usize = 64;

/// Checks a group or policy name: 1..=64 of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(FieldError::new(
            "name",
            format!("must be 1 to {MAX_NAME} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(FieldError::new(
            "name",
            format!("{name:?} has {c:?}; use letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

/// The labels of an agent, from its latest report.
pub fn agent_labels(agent: &AgentRecord) -> BTreeMap<String, String> {
    agent
        .report
        .as_ref()
        .and_then(|r| r.get("labels"))
        .and_then(Value::as_array)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|l| {
                    Some((
                        l.get("key")?.as_str()?.to_string(),
                        l.get("value")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The enrolled agents in `group`: listed, or carrying every selector label; by id.
pub fn resolve_group(group: &GroupRecord, agents: &[AgentRecord]) -> Vec<String> {
    let listed: BTreeSet<&str> = group.agents.iter().map(String::as_str).collect();
    agents
        .iter()
        .filter(|a| {
            listed.contains(a.id.as_str())
                || (!group.selector.is_empty() && {
                    let labels = agent_labels(a);
                    group.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
        })
        .map(|a| a.id.clone())
        .collect()
}

/// The field names a JSON object of `planner::Policy` may have, with the nested ones of
/// object-valued fields (`weights`).
fn known_fields() -> Map<String, Value> {
    match serde_json::to_value(Policy::default()) {
        Ok(Value::Object(mut map)) => {
            // The single window of policies stored before a policy held several.
            map.insert("window".into(), Value::Null);
            map
        }
        _ => Map::new(),
    }
}

/// Checks the fields of a policy given as JSON and reads it; the error names the first field
/// that is unknown or wrong.
pub fn policy_from_json(value: &Value) -> Result<Policy, FieldError> {
    let Value::Object(fields) = value else {
        return Err(FieldError::new(
            "policy",
            "must be a JSON object of policy fields",
        ));
    };
    let known = known_fields();
    for (key, v) in fields {
        let Some(default) = known.get(key) else {
            let names: Vec<&str> = known.keys().map(String::as_str).collect();
            return Err(FieldError::new(
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
                    return Err(FieldError::new(
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
            return Err(FieldError::new(key.clone(), e.to_string()));
        }
        check_field(key, v)?;
    }
    serde_json::from_value(value.clone()).map_err(|e| FieldError::new("policy", e.to_string()))
}

/// Range checks of fields whose type alone does not say enough.
fn check_field(key: &str, v: &Value) -> Result<(), FieldError> {
    match key {
        "max_stripes" if v.as_u64() == Some(0) => Err(FieldError::new(key, "must be at least 1")),
        "manager_max_copies" if !v.as_f64().is_some_and(|c| c.is_finite() && c >= 1.0) => {
            Err(FieldError::new(key, "must be a number of at least 1"))
        }
        "weights" => {
            for (name, w) in v.as_object().into_iter().flatten() {
                if !w.as_f64().is_some_and(|w| w.is_finite() && w >= 0.0) {
                    return Err(FieldError::new(
                        format!("weights.{name}"),
                        "must be a number of at least 0",
                    ));
                }
            }
            Ok(())
        }
        "window" | "windows" => {
            let mut alone = Map::new();
            alone.insert("windows".into(), v.clone());
            let policy: Policy = serde_json::from_value(Value::Object(alone))
                .map_err(|e| FieldError::new("windows", e.to_string()))?;
            if policy.windows.len() > crate::planner::MAX_WINDOWS {
                return Err(FieldError::new(
                    "windows",
                    format!("at most {} windows", crate::planner::MAX_WINDOWS),
                ));
            }
            for w in &policy.windows {
                w.validate()
                    .map_err(|(field, reason)| FieldError::new(field, reason))?;
            }
            Ok(())
        }
        "max_retries"
            if v.as_u64()
                .is_none_or(|n| n > u64::from(crate::planner::MAX_RETRIES)) =>
        {
            Err(FieldError::new(
                key,
                format!("must be a number of 0 to {}", crate::planner::MAX_RETRIES),
            ))
        }
        "retry_after_secs"
            if v.as_u64()
                .is_none_or(|n| n > crate::planner::MAX_RETRY_AFTER_SECS) =>
        {
            Err(FieldError::new(
                key,
                format!(
                    "must be a number of seconds, 0 to {} (a day)",
                    crate::planner::MAX_RETRY_AFTER_SECS
                ),
            ))
        }
        "rollout" if !v.is_null() => {
            let rollout: crate::planner::Rollout = serde_json::from_value(v.clone())
                .map_err(|e| FieldError::new("rollout", e.to_string()))?;
            rollout
                .validate()
                .map_err(|(field, reason)| FieldError::new(field, reason))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::types::PublicKey;
    use serde_json::json;

    fn agent(id: &str, labels: &[(&str, &str)]) -> AgentRecord {
        let labels: Vec<Value> = labels
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        AgentRecord {
            id: id.into(),
            key: PublicKey([1; 32]),
            enrolled_at: 0,
            last_seen: None,
            report: Some(json!({ "labels": labels })),
            site: None,
            segment: None,
            placed_segment: None,
            election_score: None,
            listen: None,
            performance: None,
            up_bps: None,
            down_bps: None,
            free_storage: None,
        }
    }

    #[test]
    fn groups_resolve_by_id_or_by_every_selector_label() {
        let agents = [
            agent("a", &[("role", "edge"), ("site", "fra")]),
            agent("b", &[("role", "edge")]),
            agent("c", &[]),
        ];
        let g = |ids: &[&str], sel: &[(&str, &str)]| GroupRecord {
            name: "g".into(),
            agents: ids.iter().map(|s| s.to_string()).collect(),
            selector: sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(resolve_group(&g(&["c"], &[]), &agents), ["c"]);
        assert_eq!(
            resolve_group(&g(&[], &[("role", "edge")]), &agents),
            ["a", "b"]
        );
        assert_eq!(
            resolve_group(&g(&["c"], &[("role", "edge"), ("site", "fra")]), &agents),
            ["a", "c"]
        );
        // An empty selector matches no one.
        assert!(resolve_group(&g(&[], &[]), &agents).is_empty());
    }

    fn field_of(e: FieldError) -> String {
        e.field
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
        // A staged rollout, with a wave naming a content group (resolved at job creation).
        let staged = policy_from_json(&json!({
            "rollout": { "waves": [{ "group": "canaries" }, { "agents": ["a1"] }], "pause_after_failures": 1 },
        }))
        .unwrap();
        let rollout = staged.rollout.unwrap();
        assert_eq!(
            rollout.waves[0],
            crate::planner::Wave::Group("canaries".into())
        );
        assert_eq!(rollout.pause_after_failures, Some(1));
        assert_eq!(rollout.success_percent, 100);
        // A policy stored before several windows still reads.
        let old = policy_from_json(&json!({ "window": { "start_minute": 60, "end_minute": 120 } }))
            .unwrap();
        assert_eq!(
            old.windows,
            [crate::planner::TimeWindow::daily_utc(60, 120)]
        );
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
            (json!({ "rollout": { "waves": [] } }), "rollout.waves"),
            (
                json!({ "rollout": { "waves": [{ "percent": 50 }, { "percent": 20 }] } }),
                "rollout.waves",
            ),
            (
                json!({ "rollout": { "waves": [{ "percent": 100 }], "success_percent": 0 } }),
                "rollout.success_percent",
            ),
            (json!({ "rollout": { "wavez": [] } }), "rollout"),
            (
                json!({ "windows": [{ "start_minute": 1, "end_minute": 2, "days": [] }] }),
                "windows.days",
            ),
            (
                json!({ "windows": [{ "start_minute": 1, "end_minute": 2, "zone": "Mars/Base" }] }),
                "windows.zone",
            ),
            (
                json!({ "window": { "start_minute": 1440, "end_minute": 2 } }),
                "windows.start_minute",
            ),
            (json!({ "max_retries": 1000 }), "max_retries"),
            (json!({ "retry_after_secs": -1 }), "retry_after_secs"),
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
