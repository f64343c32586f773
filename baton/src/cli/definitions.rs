//! `baton groups …` and `baton policies …`: what administrators define —
//! content groups and named distribution policies — over the HTTP API.
//!
//! Policy flags build the JSON of `planner::Policy` field by field; the
//! manager checks it and names a field it does not know or cannot accept.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use baton_manager_core::planner::TimeWindow;
use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use super::show::{table, text};
use super::{Client, ClientOpts, NamedArgs, path_part};

/// Splits `key=value`.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

// ---- content groups ----

/// Flags of `baton groups`.
#[derive(Args, Debug, Clone)]
pub struct GroupsArgs {
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: GroupsCommand,
}

/// `baton groups` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum GroupsCommand {
    /// List content groups and how many enrolled agents each resolves to.
    List(ListArgs),
    /// Show one group and its members.
    Show(NamedArgs),
    /// Add a group: `NAME --agent ID ... --label k=v ...`.
    Add(GroupArgs),
    /// Change a group: the agents and/or the selector given replace the old ones.
    Set(GroupArgs),
    /// Remove a group (jobs created for it keep their targets).
    Rm(NamedArgs),
}

/// Flags of a list command.
#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Flags of `baton groups add|set`.
#[derive(Args, Debug, Clone)]
pub struct GroupArgs {
    /// The group's name (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// An agent in the group, by id (repeat, or comma-separated).
    #[arg(long = "agent", value_name = "ID", value_delimiter = ',')]
    pub agents: Vec<String>,
    /// Agents carrying this label are in the group; with several, every one (repeat).
    #[arg(long = "label", value_name = "K=V", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// (set) Remove every listed agent.
    #[arg(long, conflicts_with = "agents")]
    pub no_agents: bool,
    /// (set) Remove the label selector.
    #[arg(long, conflicts_with = "labels")]
    pub no_labels: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Runs `baton groups …`.
pub fn groups(args: GroupsArgs) -> anyhow::Result<()> {
    match args.command {
        GroupsCommand::List(list) => {
            let client = Client::new(&list.client)?;
            let all: Vec<Value> = client.get("/api/v1/groups")?;
            if list.json {
                println!("{}", Value::Array(all));
            } else if all.is_empty() {
                println!("no content groups (add one with `baton groups add NAME --agent ID`)");
            } else {
                let rows: Vec<Vec<String>> = all.iter().map(group_row).collect();
                table(&["GROUP", "AGENTS", "SELECTOR", "MEMBERS"], &rows);
            }
        }
        GroupsCommand::Show(show) => {
            let client = Client::new(&show.client)?;
            let g: Value = client.get(&format!("/api/v1/groups/{}", path_part(&show.name)?))?;
            print_group(&g, show.json);
        }
        GroupsCommand::Rm(rm) => {
            let client = Client::new(&rm.client)?;
            let answer: Value =
                client.delete(&format!("/api/v1/groups/{}", path_part(&rm.name)?))?;
            if rm.json {
                println!("{answer}");
            } else {
                println!("group {} removed", rm.name);
            }
        }
        GroupsCommand::Add(add) => {
            if add.agents.is_empty() && add.labels.is_empty() {
                bail!("say who is in the group: --agent ID and/or --label k=v");
            }
            let client = Client::new(&add.client)?;
            let body = json!({
                "name": add.name,
                "agents": clean_ids(&add.agents),
                "selector": add.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            });
            let g: Value = client.post("/api/v1/groups", &body)?;
            print_group(&g, add.json);
        }
        GroupsCommand::Set(set) => {
            if set.agents.is_empty() && set.labels.is_empty() && !set.no_agents && !set.no_labels {
                bail!("say what to change: --agent ID, --label k=v, --no-agents or --no-labels");
            }
            let client = Client::new(&set.client)?;
            let path = format!("/api/v1/groups/{}", path_part(&set.name)?);
            let old: Value = client.get(&path)?;
            let mut body = json!({
                "name": set.name,
                "agents": old["agents"],
                "selector": old["selector"],
            });
            if set.no_agents {
                body["agents"] = json!([]);
            } else if !set.agents.is_empty() {
                body["agents"] = json!(clean_ids(&set.agents));
            }
            if set.no_labels {
                body["selector"] = json!({});
            } else if !set.labels.is_empty() {
                body["selector"] = json!(set.labels.iter().cloned().collect::<BTreeMap<_, _>>());
            }
            let g: Value = client.put(&path, &body)?;
            print_group(&g, set.json);
        }
    }
    Ok(())
}

fn clean_ids(ids: &[String]) -> Vec<&str> {
    ids.iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
        .collect()
}

fn selector_text(g: &Value) -> String {
    let labels: Vec<String> = g["selector"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
        .collect();
    if labels.is_empty() {
        "-".into()
    } else {
        labels.join(",")
    }
}

fn list_text(v: &Value) -> String {
    let items: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn group_row(g: &Value) -> Vec<String> {
    vec![
        text(&g["name"]),
        list_text(&g["agents"]),
        selector_text(g),
        g["members"].as_array().map_or(0, Vec::len).to_string(),
    ]
}

fn print_group(g: &Value, json: bool) {
    if json {
        println!("{g}");
        return;
    }
    println!("group {}", text(&g["name"]));
    println!("  agents:   {}", list_text(&g["agents"]));
    println!("  selector: {}", selector_text(g));
    println!("  members:  {}", list_text(&g["members"]));
}

// ---- policies ----

/// Flags of `baton policies`.
#[derive(Args, Debug, Clone)]
pub struct PoliciesArgs {
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: PoliciesCommand,
}

/// `baton policies` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum PoliciesCommand {
    /// List named policies.
    List(ListArgs),
    /// Show one policy, every field.
    Show(NamedArgs),
    /// Add a policy from flags and/or `--from-file policy.json` (unset fields take defaults).
    Add(PolicyArgs),
    /// Change a policy: the flags given change those fields (`--from-file` replaces it whole).
    Set(PolicyArgs),
    /// Remove a policy (jobs created with it keep their copy).
    Rm(NamedArgs),
}

/// Flags of `baton policies add|set`.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// The policy's name (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// Start from this JSON file of policy fields (the flags given override it).
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Most peers one agent serves in a job.
    #[arg(long, value_name = "N")]
    pub max_peers_per_source: Option<u16>,
    /// Most bytes per second any one agent sends for the job, e.g. `2MiB/s` (0 = none).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub agent_rate_cap: Option<u64>,
    /// Most bytes per second into each segment across its WAN link, e.g. `10MiB/s` (0 = none).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub segment_rate_cap: Option<u64>,
    /// Most concurrent transfers across each segment's WAN link (0 = no limit).
    #[arg(long, value_name = "N")]
    pub max_wan_transfers: Option<u16>,
    /// Transfers only while one of these windows is open (repeat for several; replaces the
    /// policy's windows): `[DAYS ]HH:MM-HH:MM[ ZONE]`, e.g. `22:00-06:00` (daily, UTC),
    /// `"mon-fri 09:00-17:00 Europe/Berlin"`, `"sat,sun 00:00-00:00"` (whole days). A job
    /// waits for an opening, stops its transfers at a close and resumes at the next opening.
    #[arg(long, value_name = "WINDOW", value_parser = parse_window, conflicts_with = "no_window")]
    pub window: Vec<Value>,
    /// (set) Remove the time windows: any time.
    #[arg(long)]
    pub no_window: bool,
    /// Times a failed participant is retried before it stays failed (0 = never).
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// Wait this long after a failure before the retry, e.g. `30s`, `5m`.
    #[arg(long, value_name = "DURATION", value_parser = super::enroll::parse_duration_secs)]
    pub retry_after: Option<u64>,
    /// This agent only receives, never serves (repeat, or comma-separated).
    #[arg(long, value_name = "ID", value_delimiter = ',')]
    pub leaf_only: Vec<String>,
    /// Agents with this label only receive (repeat).
    #[arg(long, value_name = "K=V", value_parser = key_value)]
    pub leaf_only_label: Vec<(String, String)>,
    /// Agents whose upload is below this only receive, e.g. `256KiB/s` (0 = off).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub leaf_below_up: Option<u64>,
    /// Most stripes the content is cut into.
    #[arg(long, value_name = "N")]
    pub max_stripes: Option<u16>,
    /// Most copies the manager sends by plan (at least 1).
    #[arg(long, value_name = "COPIES")]
    pub manager_max_copies: Option<f64>,
    /// Whether agents relay to each other (`false`: everyone fetches from the manager).
    #[arg(long, value_name = "BOOL")]
    pub relay: Option<bool>,
    /// Whether sources on the fetcher's own segment are preferred.
    #[arg(long, value_name = "BOOL")]
    pub segment_local: Option<bool>,
    /// An ordering weight, `name=value` (up, down, loss, uptime, performance, delay, serve; repeat).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_weight)]
    pub weight: Vec<(String, f64)>,
    /// Roll jobs out in waves: cumulative percentages (`10,50,100`) or content groups
    /// (`group:canary,group:edge`; participants in none go in the last wave).
    #[arg(long, value_name = "WAVE,...", value_delimiter = ',', value_parser = parse_wave, conflicts_with = "no_rollout")]
    pub waves: Vec<Value>,
    /// The next wave opens once this percentage of the current wave's participants that
    /// have not failed runs the content (default 100).
    #[arg(long, value_name = "PERCENT", conflicts_with = "no_rollout")]
    pub success_percent: Option<u8>,
    /// Wait this long after a wave succeeded before the next opens, e.g. `10m` (default 0).
    #[arg(long, value_name = "DURATION", value_parser = super::enroll::parse_duration_secs, conflicts_with = "no_rollout")]
    pub soak: Option<u64>,
    /// Whether each next wave waits for `baton job ID approve`.
    #[arg(long, value_name = "BOOL", conflicts_with = "no_rollout")]
    pub approve_waves: Option<bool>,
    /// Pause the rollout when more than N participants of a wave fail.
    #[arg(long, value_name = "N", conflicts_with = "no_rollout")]
    pub pause_after_failures: Option<u32>,
    /// Abort the rollout when more than N participants of a wave fail.
    #[arg(long, value_name = "N", conflicts_with = "no_rollout")]
    pub abort_after_failures: Option<u32>,
    /// (set) Remove the staged rollout: everyone at once.
    #[arg(long)]
    pub no_rollout: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Reads a rate: `65536`, `64KiB/s`, `10MiB/s`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    super::parse_size(t)
}

/// Reads `[DAYS ]HH:MM-HH:MM[ ZONE]` as one of the policy's windows (checked: days, minutes
/// and the time zone).
pub fn parse_window(s: &str) -> Result<Value, String> {
    let w: TimeWindow = s.parse()?;
    if w.start_minute == w.end_minute && w.days.len() == 7 {
        return Err(format!(
            "{s:?} starts where it ends every day, which is any time: leave --window out"
        ));
    }
    serde_json::to_value(&w).map_err(|e| e.to_string())
}

/// Reads one wave of `--waves`: a percentage (`10`) or a content group (`group:NAME`).
pub fn parse_wave(s: &str) -> Result<Value, String> {
    let t = s.trim();
    if let Some(group) = t.strip_prefix("group:") {
        return Ok(json!({ "group": group.trim() }));
    }
    t.trim_end_matches('%')
        .parse::<u8>()
        .map(|p| json!({ "percent": p }))
        .map_err(|_| format!("{s:?} is neither a percentage (10) nor group:NAME"))
}

fn parse_weight(s: &str) -> Result<(String, f64), String> {
    let (k, v) = key_value(s)?;
    let v: f64 = v
        .parse()
        .map_err(|_| format!("weight {k:?}: {v:?} is not a number"))?;
    Ok((k, v))
}

impl PolicyArgs {
    /// Applies the flags given to `fields` (a JSON object of policy fields).
    pub fn apply(&self, fields: &mut Map<String, Value>) {
        if !self.window.is_empty() || self.no_window {
            // Replaced whole, also as `window` (how policies stored before several windows
            // name theirs).
            fields.remove("window");
        }
        let mut set = |key: &str, v: Value| {
            fields.insert(key.to_string(), v);
        };
        if let Some(n) = self.max_peers_per_source {
            set("max_peers_per_source", json!(n));
        }
        if let Some(r) = self.agent_rate_cap {
            set("agent_rate_cap_bps", json!(r));
        }
        if let Some(r) = self.segment_rate_cap {
            set("segment_rate_cap_bps", json!(r));
        }
        if let Some(n) = self.max_wan_transfers {
            set("max_wan_transfers_per_segment", json!(n));
        }
        if !self.window.is_empty() || self.no_window {
            // `window` is how policies stored before several windows name them.
            set("windows", Value::Array(self.window.clone()));
        }
        if let Some(n) = self.max_retries {
            set("max_retries", json!(n));
        }
        if let Some(s) = self.retry_after {
            set("retry_after_secs", json!(s));
        }
        if !self.leaf_only.is_empty() {
            set("leaf_only", json!(clean_ids(&self.leaf_only)));
        }
        if !self.leaf_only_label.is_empty() {
            let labels: BTreeMap<_, _> = self.leaf_only_label.iter().cloned().collect();
            set("leaf_only_labels", json!(labels));
        }
        if let Some(r) = self.leaf_below_up {
            set("leaf_below_up_bps", json!(r));
        }
        if self.no_rollout {
            set("rollout", Value::Null);
        }
        if let Some(n) = self.max_stripes {
            set("max_stripes", json!(n));
        }
        if let Some(c) = self.manager_max_copies {
            set("manager_max_copies", json!(c));
        }
        if let Some(b) = self.relay {
            set("relay", json!(b));
        }
        if let Some(b) = self.segment_local {
            set("segment_local", json!(b));
        }
        if !self.weight.is_empty() {
            let weights = fields
                .entry("weights")
                .or_insert_with(|| Value::Object(Map::new()));
            if !weights.is_object() {
                *weights = Value::Object(Map::new());
            }
            if let Value::Object(w) = weights {
                for (k, v) in &self.weight {
                    w.insert(k.clone(), json!(v));
                }
            }
        }
        let rollout_fields = [
            ("waves", (!self.waves.is_empty()).then(|| json!(self.waves))),
            ("success_percent", self.success_percent.map(|p| json!(p))),
            ("soak_secs", self.soak.map(|s| json!(s))),
            ("approval", self.approve_waves.map(|a| json!(a))),
            (
                "pause_after_failures",
                self.pause_after_failures.map(|n| json!(n)),
            ),
            (
                "abort_after_failures",
                self.abort_after_failures.map(|n| json!(n)),
            ),
        ];
        if rollout_fields.iter().any(|(_, v)| v.is_some()) {
            // The flags given change those fields of the rollout; the rest stay.
            let mut rollout = match fields.get("rollout") {
                Some(Value::Object(r)) => r.clone(),
                _ => Map::new(),
            };
            for (key, value) in rollout_fields {
                if let Some(v) = value {
                    rollout.insert(key.to_string(), v);
                }
            }
            fields.insert("rollout".to_string(), Value::Object(rollout));
        }
    }

    fn read_file(&self) -> anyhow::Result<Option<Map<String, Value>>> {
        let Some(path) = &self.from_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        match serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?
        {
            Value::Object(map) => Ok(Some(map)),
            _ => bail!(
                "{}: a policy file is a JSON object of policy fields",
                path.display()
            ),
        }
    }
}

/// Runs `baton policies …`.
pub fn policies(args: PoliciesArgs) -> anyhow::Result<()> {
    match args.command {
        PoliciesCommand::List(list) => {
            let client = Client::new(&list.client)?;
            let all: Vec<Value> = client.get("/api/v1/policies")?;
            if list.json {
                println!("{}", Value::Array(all));
            } else if all.is_empty() {
                println!(
                    "no policies (add one with `baton policies add NAME --max-peers-per-source N`)"
                );
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|p| vec![text(&p["name"]), differences(p)])
                    .collect();
                table(&["POLICY", "FIELDS OTHER THAN THE DEFAULTS"], &rows);
            }
        }
        PoliciesCommand::Show(show) => {
            let client = Client::new(&show.client)?;
            let p: Value = client.get(&format!("/api/v1/policies/{}", path_part(&show.name)?))?;
            print_policy(&p, show.json);
        }
        PoliciesCommand::Rm(rm) => {
            let client = Client::new(&rm.client)?;
            let answer: Value =
                client.delete(&format!("/api/v1/policies/{}", path_part(&rm.name)?))?;
            if rm.json {
                println!("{answer}");
            } else {
                println!("policy {} removed", rm.name);
            }
        }
        PoliciesCommand::Add(add) => {
            let client = Client::new(&add.client)?;
            let mut fields = add.read_file()?.unwrap_or_default();
            add.apply(&mut fields);
            fields.insert("name".into(), json!(add.name));
            let p: Value = client.post("/api/v1/policies", &Value::Object(fields))?;
            print_policy(&p, add.json);
        }
        PoliciesCommand::Set(set) => {
            let client = Client::new(&set.client)?;
            let path = format!("/api/v1/policies/{}", path_part(&set.name)?);
            let mut fields = match set.read_file()? {
                Some(file) => file,
                None => match client.get::<Value>(&path)? {
                    Value::Object(map) => map,
                    _ => bail!("unexpected answer to GET {path}"),
                },
            };
            set.apply(&mut fields);
            fields.insert("name".into(), json!(set.name));
            let p: Value = client.put(&path, &Value::Object(fields))?;
            print_policy(&p, set.json);
        }
    }
    Ok(())
}

/// The fields of a policy that differ from this build's defaults, `key=value`.
fn differences(p: &Value) -> String {
    let defaults =
        serde_json::to_value(baton_manager_core::planner::Policy::default()).unwrap_or(Value::Null);
    let mut out = Vec::new();
    for (k, v) in p.as_object().into_iter().flatten() {
        if k == "name" || defaults.get(k) == Some(v) {
            continue;
        }
        match (v, defaults.get(k)) {
            (Value::Object(inner), Some(Value::Object(def))) => {
                for (ik, iv) in inner {
                    if def.get(ik) != Some(iv) {
                        out.push(format!("{k}.{ik}={iv}"));
                    }
                }
            }
            _ => out.push(format!("{k}={v}")),
        }
    }
    if out.is_empty() {
        "(defaults)".into()
    } else {
        out.join(" ")
    }
}

fn print_policy(p: &Value, json: bool) {
    if json {
        println!("{p}");
        return;
    }
    println!("policy {}", text(&p["name"]));
    for (k, v) in p.as_object().into_iter().flatten() {
        if k == "name" {
            continue;
        }
        match v {
            Value::Object(inner) => {
                for (ik, iv) in inner {
                    println!("  {k}.{ik} = {iv}");
                }
            }
            Value::Array(list) if k == "windows" => {
                let texts: Vec<String> = list
                    .iter()
                    .map(|w| match serde_json::from_value::<TimeWindow>(w.clone()) {
                        Ok(w) => w.to_string(),
                        Err(_) => w.to_string(),
                    })
                    .collect();
                let shown = if texts.is_empty() {
                    "any time".to_string()
                } else {
                    texts.join(", ")
                };
                println!("  windows = {shown}");
            }
            other => println!("  {k} = {other}"),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        policy: PolicyArgs,
    }

    #[test]
    fn rollout_flags_change_only_the_rollout_fields_given() {
        let args = Cmd::try_parse_from([
            "policies-add",
            "p",
            "--waves",
            "10,group:canary,100%",
            "--pause-after-failures",
            "1",
            "--soak",
            "10m",
        ])
        .unwrap()
        .policy;
        let mut fields = Map::new();
        fields.insert(
            "rollout".into(),
            json!({ "approval": true, "soak_secs": 5 }),
        );
        args.apply(&mut fields);
        assert_eq!(
            fields["rollout"],
            json!({
                "waves": [{ "percent": 10 }, { "group": "canary" }, { "percent": 100 }],
                "pause_after_failures": 1,
                "soak_secs": 600,
                "approval": true,
            })
        );
        assert!(parse_wave("most").is_err());
        let off = Cmd::try_parse_from(["policies-set", "p", "--no-rollout"])
            .unwrap()
            .policy;
        off.apply(&mut fields);
        assert_eq!(fields["rollout"], Value::Null);
        assert!(
            Cmd::try_parse_from(["policies-set", "p", "--no-rollout", "--waves", "50"]).is_err()
        );
    }

    #[test]
    fn flags_build_the_policy_json_with_the_planner_field_names() {
        let args = Cmd::try_parse_from([
            "policies-add",
            "p",
            "--max-peers-per-source",
            "3",
            "--agent-rate-cap",
            "2MiB/s",
            "--segment-rate-cap",
            "10MiB",
            "--max-wan-transfers",
            "1",
            "--window",
            "22:30-04:00",
            "--window",
            "sat,sun 10:00-12:00 Europe/Berlin",
            "--max-retries",
            "3",
            "--leaf-only",
            "weak-1",
            "--leaf-only-label",
            "class=mcu",
            "--weight",
            "up=5",
        ])
        .unwrap()
        .policy;
        let mut fields = Map::new();
        fields.insert("weights".into(), json!({ "down": 1.0 }));
        args.apply(&mut fields);
        assert_eq!(
            Value::Object(fields),
            json!({
                "max_peers_per_source": 3,
                "agent_rate_cap_bps": 2 * 1024 * 1024,
                "segment_rate_cap_bps": 10 * 1024 * 1024,
                "max_wan_transfers_per_segment": 1,
                "windows": [
                    {
                        "start_minute": 22 * 60 + 30,
                        "end_minute": 240,
                        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                        "zone": "UTC",
                    },
                    {
                        "start_minute": 600,
                        "end_minute": 720,
                        "days": ["sat", "sun"],
                        "zone": "Europe/Berlin",
                    },
                ],
                "max_retries": 3,
                "leaf_only": ["weak-1"],
                "leaf_only_labels": { "class": "mcu" },
                "weights": { "down": 1.0, "up": 5.0 },
            })
        );
    }

    #[test]
    fn names_are_one_path_segment() {
        assert_eq!(path_part("fra-2/rack 4").unwrap(), "fra-2%2Frack%204");
        assert_eq!(path_part("edge_1.x").unwrap(), "edge_1.x");
        assert!(path_part("").is_err());
    }

    #[test]
    fn windows_and_rates_are_checked() {
        assert!(parse_window("24:00-01:00").is_err());
        assert!(parse_window("10:00-10:00").is_err());
        assert!(parse_window("sun 10:00-10:00").is_ok());
        assert!(parse_window("1000").is_err());
        let e = parse_window("mon 10:00-11:00 Europe/Nowhere").unwrap_err();
        assert!(e.contains("unknown time zone"), "{e}");
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
        assert!(key_value("novalue").is_err());
        assert!(parse_weight("up=x").is_err());
    }
}
