//! Content groups: which enrolled agents a group names.
//!
//! An agent is in a group if the group lists it by id, or if it carries every
//! label of the group's selector (an empty selector matches no one). Labels are
//! read from the agent's latest report as the store keeps it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::records::{AgentRecord, GroupRecord};

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
}
