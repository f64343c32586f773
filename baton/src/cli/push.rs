//! `baton push FILE`: publish a file and distribute it (to agents, all, or a content group,
//! under a named policy); with `--wait`, follow it to the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::{Client, ClientOpts, format_size};

/// Flags of `baton push`.
#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    /// The file to distribute (the manager must be able to read it at this path).
    pub file: PathBuf,
    /// Target these agents (comma-separated ids).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with_all = ["all", "group"],
        required_unless_present_any = ["all", "group"]
    )]
    pub agents: Vec<String>,
    /// Target every agent connected now, and every agent that connects while the job runs.
    #[arg(long, conflicts_with = "group")]
    pub all: bool,
    /// Target the members of this content group (resolved when the job is created; a group
    /// with a label selector also takes in agents that connect carrying its labels).
    #[arg(long)]
    pub group: Option<String>,
    /// Distribute under this named policy (`baton policies`; default: the planner's defaults).
    #[arg(long)]
    pub policy: Option<String>,
    /// The manifest `baton sign` wrote for FILE: the manager publishes FILE with it once the
    /// file matches it and the trust document lists its signer for its name. Without it the
    /// manager signs online, which it does only with a `--publisher-key` the trust document
    /// lists for the name.
    #[arg(long, value_name = "FILE.manifest", conflicts_with_all = ["name", "version", "chunk_size"])]
    pub manifest: Option<PathBuf>,
    /// Content name (default: the file name; with --manifest: the manifest's).
    #[arg(long)]
    pub name: Option<String>,
    /// Version when the manager signs online (default: the latest of this name plus one;
    /// unchanged content keeps its version; never below a version published already).
    #[arg(long)]
    pub version: Option<u64>,
    /// Chunk size, e.g. `32KiB` (256 B ..= 32 KiB; default 32 KiB).
    #[arg(long, value_parser = super::parse_size)]
    pub chunk_size: Option<u64>,
    /// Roll out in waves: cumulative percentages of the participants in the order of the
    /// prioritized list, e.g. `10,50,100` (the next wave opens once the current one runs
    /// the content); replaces the policy's rollout. Default: everyone at once.
    #[arg(long, value_delimiter = ',', value_name = "PERCENT,...")]
    pub waves: Vec<u8>,
    /// With --waves: open the next wave once this percentage of the current wave's
    /// participants that have not failed runs the content (default 100).
    #[arg(long, requires = "waves", value_name = "PERCENT")]
    pub success_percent: Option<u8>,
    /// With --waves: wait this long after a wave succeeded before the next opens, e.g.
    /// `10m` (default 0; at most 7 days).
    #[arg(long, requires = "waves", value_parser = super::enroll::parse_duration_secs, value_name = "DURATION")]
    pub soak: Option<u64>,
    /// With --waves: each next wave waits for `baton job ID approve`.
    #[arg(long, requires = "waves")]
    pub approve_waves: bool,
    /// With --waves: pause the rollout when more than N participants of a wave fail
    /// (delivery, install or rolled back); `baton job ID resume` goes on.
    #[arg(long, requires = "waves", value_name = "N")]
    pub pause_after_failures: Option<u32>,
    /// With --waves: abort the rollout when more than N participants of a wave fail.
    #[arg(long, requires = "waves", value_name = "N")]
    pub abort_after_failures: Option<u32>,
    /// Follow the job until every participant confirmed or was given up; exit non-zero unless
    /// all confirmed.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON (the created job; with --wait, the final job).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// One participant's bar and last known state.
struct Row {
    bar: ProgressBar,
    state: String,
}

/// The progress display of one job.
struct Progress {
    multi: MultiProgress,
    style: ProgressStyle,
    rows: BTreeMap<String, Row>,
    total: u64,
}

impl Progress {
    fn new(total: u64, quiet: bool) -> Self {
        let multi = MultiProgress::new();
        if quiet {
            multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let style = ProgressStyle::with_template(
            "{prefix:>16} [{bar:32.cyan/blue}] {pos:>6}/{len:6} chunks {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        Progress {
            multi,
            style,
            rows: BTreeMap::new(),
            total,
        }
    }

    fn row(&mut self, agent: &str) -> &mut Row {
        if !self.rows.contains_key(agent) {
            let bar = self.multi.add(ProgressBar::new(self.total));
            bar.set_style(self.style.clone());
            bar.set_prefix(agent.to_string());
            self.rows.insert(
                agent.to_string(),
                Row {
                    bar,
                    state: "waiting".into(),
                },
            );
        }
        self.rows.get_mut(agent).expect("just inserted")
    }

    fn set(&mut self, agent: &str, state: &str, verified: Option<u64>, note: Option<&str>) {
        let total = self.total;
        let row = self.row(agent);
        // Final states stay, except that a given-up participant may still confirm.
        if row.state == "confirmed" || (row.state == "failed" && state != "confirmed") {
            return;
        }
        row.state = state.to_string();
        if let Some(v) = verified {
            row.bar.set_position(v.min(total));
        }
        match state {
            "confirmed" => {
                row.bar.set_position(total);
                row.bar.finish_with_message("confirmed");
            }
            "failed" => row
                .bar
                .abandon_with_message(format!("failed: {}", note.unwrap_or("given up"))),
            other => row.bar.set_message(other.to_string()),
        }
    }

    fn snapshot(&mut self, job: &Value) {
        if let Some(total) = job["total_chunks"].as_u64() {
            self.total = total;
        }
        for p in job["participants"].as_array().into_iter().flatten() {
            let agent = p["agent"].as_str().unwrap_or("?");
            let state = p["state"].as_str().unwrap_or("waiting");
            self.set(agent, state, p["verified"].as_u64(), p["reason"].as_str());
        }
    }

    fn event(&mut self, ev: &Value) {
        let agent = ev["agent"].as_str().unwrap_or("?");
        match ev["kind"].as_str() {
            Some("progress") => {
                if let Some(total) = ev["total"].as_u64() {
                    self.total = total;
                }
                self.set(agent, "fetching", ev["verified"].as_u64(), None)
            }
            Some("confirmed") => self.set(agent, "confirmed", None, None),
            Some("failed") => self.set(agent, "failed", None, ev["reason"].as_str()),
            _ => {}
        }
    }

    fn finish(&self) {
        for row in self.rows.values() {
            if !row.bar.is_finished() {
                row.bar.abandon();
            }
        }
    }
}

/// Runs `baton push`; the exit code says whether every participant confirmed (with `--wait`).
pub fn run(args: PushArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let path = std::fs::canonicalize(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let targets = if args.group.is_some() {
        Value::Null
    } else if args.all {
        json!({ "all": true })
    } else {
        let agents: Vec<&str> = args
            .agents
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .collect();
        if agents.is_empty() {
            bail!("say which agents: --agents ID,ID or --all");
        }
        json!({ "agents": agents })
    };
    let mut body = json!({ "path": path });
    if let Some(g) = &args.group {
        body["group"] = json!(g);
    } else {
        body["targets"] = targets;
    }
    if let Some(p) = &args.policy {
        body["policy"] = json!(p);
    }
    if !args.waves.is_empty() {
        let mut rollout = json!({ "waves": args.waves, "approval": args.approve_waves });
        if let Some(p) = args.success_percent {
            rollout["success_percent"] = json!(p);
        }
        if let Some(s) = args.soak {
            rollout["soak_secs"] = json!(s);
        }
        if let Some(n) = args.pause_after_failures {
            rollout["pause_after_failures"] = json!(n);
        }
        if let Some(n) = args.abort_after_failures {
            rollout["abort_after_failures"] = json!(n);
        }
        body["rollout"] = rollout;
    }
    if let Some(n) = &args.name {
        body["name"] = json!(n);
    }
    if let Some(v) = args.version {
        body["version"] = json!(v);
    }
    if let Some(c) = args.chunk_size {
        body["chunk_size"] = json!(c);
    }
    if let Some(m) = &args.manifest {
        let manifest = baton_manager::trust::read_manifest_file(m)
            .with_context(|| format!("cannot read the manifest {}", m.display()))?;
        body["manifest"] = json!(hex::encode(baton_manager::trust::encode_manifest(
            &manifest
        )));
    }
    let created: Value = client.post("/api/v1/jobs", &body)?;
    let id = created["id"]
        .as_u64()
        .context("the manager's answer has no job id")?;
    if !args.wait {
        if args.json {
            println!("{created}");
        } else {
            println!(
                "job {id}: {} v{} ({}, {} chunks) — follow it with `baton job {id}`",
                created["name"].as_str().unwrap_or("?"),
                created["version"],
                format_size(created["length"].as_u64().unwrap_or(0)),
                created["chunks"],
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !args.json {
        eprintln!(
            "job {id}: {} v{} ({}, {} chunks)",
            created["name"].as_str().unwrap_or("?"),
            created["version"],
            format_size(created["length"].as_u64().unwrap_or(0)),
            created["chunks"],
        );
    }
    let started = Instant::now();
    let mut progress = Progress::new(created["chunks"].as_u64().unwrap_or(0), args.json);
    let mut ended = false;
    client.follow(&format!("/api/v1/jobs/{id}/events"), |name, data| {
        let value: Value = serde_json::from_str(data)
            .with_context(|| format!("bad event from the manager: {data}"))?;
        match name {
            "snapshot" => {
                progress.snapshot(&value);
                let state = value["state"].as_str().unwrap_or("");
                ended = !matches!(state, "pending" | "running");
            }
            _ => {
                progress.event(&value);
                ended = matches!(value["kind"].as_str(), Some("finished" | "cancelled"));
            }
        }
        Ok(!ended)
    })?;
    progress.finish();
    if !ended {
        bail!("the manager closed the event stream before job {id} ended; see `baton job {id}`");
    }
    let job: Value = client.get(&format!("/api/v1/jobs/{id}"))?;
    let parts = job["participants"].as_array().cloned().unwrap_or_default();
    let confirmed = parts
        .iter()
        .filter(|p| p["state"].as_str() == Some("confirmed"))
        .count();
    let all_confirmed = !parts.is_empty() && confirmed == parts.len();
    if args.json {
        println!("{job}");
    } else {
        println!();
        super::show::print_job(&job);
        println!(
            "{} of {} participants confirmed in {:.1} s",
            confirmed,
            parts.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(if all_confirmed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
