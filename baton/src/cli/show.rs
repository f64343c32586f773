//! `baton agents`, `baton jobs`, `baton job` and `baton cancel`: small clients of the API
//! that list and show what the manager holds, and the table helpers they share.
//! `baton agents segment|score` place an agent (`PATCH /api/v1/agents/{id}`); `baton agents
//! revoke ID` revokes one (`POST /api/v1/agents/{id}/revoke`).

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Client, ClientOpts, format_size, format_time};

/// Flags of `baton agents`.
#[derive(Args, Debug, Clone)]
pub struct AgentsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
    /// Place an agent instead of listing them.
    #[command(subcommand)]
    pub command: Option<AgentsCommand>,
}

/// `baton agents` subcommands: where the administrator places an agent, and revocation.
#[derive(Subcommand, Debug, Clone)]
pub enum AgentsCommand {
    /// Place agent ID in segment SEGMENT: its certificate names it, its peers ignore its
    /// discovery datagrams for other segments and the manager refuses its segment reports
    /// for them (a connected agent reconnects to get its new certificate).
    Segment {
        /// The agent's id.
        id: String,
        /// The segment (empty string: none).
        segment: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientOpts,
    },
    /// Set the highest segment election score agent ID may claim (capped by
    /// `baton serve --max-election-score`).
    Score {
        /// The agent's id.
        id: String,
        /// The score.
        score: u32,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientOpts,
    },
    /// Revoke (un-enrol) agent ID: its live session ends at once, the manager refuses it
    /// from then on, it leaves the fleet views (job records and the audit log keep it), and
    /// every agent gets a signed revocation list within seconds: peers close their sessions
    /// with it, refuse its handshakes and ignore its discovery datagrams. Enrolling the id
    /// again (`baton enroll`) starts it afresh.
    Revoke {
        /// The agent's id.
        id: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientOpts,
    },
}

/// A JSON value as a table cell (`-` for null).
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => printable(s),
        other => other.to_string(),
    }
}

/// `s` with every control character (escape sequences included) replaced by `?`: what
/// agents and publishers name or print never drives the terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Bytes per second as a table cell (`-` for none or 0).
pub fn rate(v: &Value) -> String {
    match v.as_u64() {
        Some(0) | None => "-".into(),
        Some(b) => format!("{}/s", format_size(b)),
    }
}

/// Prints rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Runs `baton agents revoke ID`.
fn revoke(id: &str, client: &ClientOpts, json_out: bool) -> anyhow::Result<()> {
    let client = Client::new(client)?;
    let path = format!("/api/v1/agents/{}/revoke", super::path_part(id)?);
    let done: Value = client.post(&path, &json!({}))?;
    if json_out {
        println!("{done}");
    } else {
        println!(
            "agent {} revoked (certificates up to serial {}, the last expiring at {}); revocation list version {} sent to {} live sessions",
            text(&done["id"]),
            text(&done["up_to_serial"]),
            done["certificates_expire"]
                .as_u64()
                .filter(|t| *t > 0)
                .map_or("-".into(), format_time),
            text(&done["list_version"]),
            text(&done["sent_to"]),
        );
    }
    Ok(())
}

/// Runs `baton agents`.
pub fn agents(args: AgentsArgs) -> anyhow::Result<()> {
    if let Some(command) = &args.command {
        let (id, body, client) = match command {
            AgentsCommand::Segment {
                id,
                segment,
                client,
            } => (id, json!({ "segment": segment }), client),
            AgentsCommand::Score { id, score, client } => {
                (id, json!({ "election_score": score }), client)
            }
            AgentsCommand::Revoke { id, client } => return revoke(id, client, args.json),
        };
        let client = Client::new(client)?;
        let path = format!("/api/v1/agents/{}", super::path_part(id)?);
        let agent: Value = client.patch(&path, &body)?;
        if args.json {
            println!("{agent}");
        } else {
            println!(
                "agent {} placed in segment {} with election score {}",
                text(&agent["id"]),
                text(&agent["placed_segment"]),
                text(&agent["election_score"])
            );
        }
        return Ok(());
    }
    let client = Client::new(&args.client)?;
    let agents: Vec<Value> = client.get("/api/v1/agents")?;
    if args.json {
        println!("{}", Value::Array(agents));
        return Ok(());
    }
    if agents.is_empty() {
        println!("no agents enrolled (enrol with `baton enroll --id ID --key HEX`)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                text(&a["id"]),
                if a["connected"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                text(&a["site"]),
                text(&a["segment"]),
                text(&a["placed_segment"]),
                text(&a["listen"]),
                rate(&a["up_bps"]),
                rate(&a["down_bps"]),
                a["last_seen"].as_u64().map_or("-".into(), format_time),
                running_text(&a["running"]),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CONNECTED",
            "SITE",
            "SEGMENT",
            "PLACED IN",
            "LISTEN",
            "UP",
            "DOWN",
            "LAST SEEN (UTC)",
            "RUNNING",
        ],
        &rows,
    );
    Ok(())
}

/// Flags of `baton jobs`.
#[derive(Args, Debug, Clone)]
pub struct JobsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Runs `baton jobs`.
pub fn jobs(args: JobsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let jobs: Vec<Value> = client.get("/api/v1/jobs")?;
    if args.json {
        println!("{}", Value::Array(jobs));
        return Ok(());
    }
    if jobs.is_empty() {
        println!("no jobs yet (start one with `baton push FILE --all`)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            // A rollout that waits says so: `running (rollout paused)`.
            let state = match j["rollout"].as_str() {
                Some(r) if j["state"] == "running" && !matches!(r, "running" | "complete") => {
                    format!("running (rollout {})", r.replace('_', " "))
                }
                _ => text(&j["state"]),
            };
            vec![
                text(&j["id"]),
                state,
                text(&j["name"]),
                text(&j["version"]),
                format_size(j["length"].as_u64().unwrap_or(0)),
                format!(
                    "{}/{}",
                    j["confirmed"].as_u64().unwrap_or(0),
                    j["participants"].as_u64().unwrap_or(0)
                ),
                text(&j["failed"]),
                j["created_at"].as_u64().map_or("-".into(), format_time),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "NAME",
            "VERSION",
            "SIZE",
            "CONFIRMED",
            "FAILED",
            "CREATED (UTC)",
        ],
        &rows,
    );
    Ok(())
}

/// Flags of `baton status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// The lines `baton status` prints for a status answer.
pub fn status_text(s: &Value) -> String {
    let mut out = String::new();
    if s["role"] == "standby" {
        out.push_str(&format!(
            "standby manager (read-only; takes over when the active one stops)\nactive manager: agent port {}, API {}\n",
            text(&s["active_agent_addr"]),
            text(&s["active_http_addr"])
        ));
    } else {
        out.push_str(&format!("active manager, epoch {}\n", text(&s["epoch"])));
    }
    out.push_str(&format!(
        "agent port {}, API {}, {} agent(s) connected\n",
        text(&s["agent_addr"]),
        text(&s["http_addr"]),
        s["connected_agents"].as_u64().unwrap_or(0)
    ));
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    out.push_str(&format!(
        "bytes: agent port {} sent, {} received; serial lines {} sent, {} received\n",
        n("bytes_sent"),
        n("bytes_received"),
        n("serial_bytes_sent"),
        n("serial_bytes_received")
    ));
    out
}

/// Runs `baton status`: which manager this is (active or standby, and then which one is
/// active), its addresses and connected agents.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let status: Value = client.get("/api/v1/status")?;
    if args.json {
        println!("{status}");
    } else {
        print!("{}", status_text(&status));
    }
    Ok(())
}

/// What `baton job ID ACTION` does to a job's rollout.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// Nobody new is instructed and no wave opens; participants already instructed finish
    /// their transfer and install.
    Pause,
    /// Resume a paused job (the failures counted so far are accepted).
    Resume,
    /// Open the next wave of a rollout that waits for approval.
    Approve,
    /// End the job: instructed participants get Cancel, those not reached are left aborted.
    Abort,
}

impl JobAction {
    fn name(self) -> &'static str {
        match self {
            JobAction::Pause => "pause",
            JobAction::Resume => "resume",
            JobAction::Approve => "approve",
            JobAction::Abort => "abort",
        }
    }
}

/// Flags of `baton job`.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// The job's id.
    pub id: u64,
    /// Change the job's staged rollout instead of showing the job: `pause`, `resume`,
    /// `approve` (the next wave) or `abort`.
    #[arg(value_enum)]
    pub action: Option<JobAction>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// `name version, …` of an agent's running versions (`-`: none known).
fn running_text(running: &Value) -> String {
    let list: Vec<String> = running
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{} v{}", text(&r["name"]), text(&r["version"])))
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

/// A participant's install state for people (`rolled back`), `-` before it confirmed.
fn install_text(install: &Value) -> String {
    match install["state"].as_str() {
        None => "-".into(),
        Some(state) => {
            let state = state.replace('_', " ");
            match install["exit_code"].as_i64() {
                Some(code) => format!("{state} (exit {code})"),
                None => state,
            }
        }
    }
}

/// The last line of a participant's install output, at most 60 characters.
fn install_note(install: &Value) -> String {
    let last = install["output"]
        .as_str()
        .and_then(|o| o.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim();
    let last = printable(last);
    match last.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &last[..cut]),
        None => last,
    }
}

/// Where a rollout stands, for people: `paused (wave 2: 2 participants failed), wave 2 of 3 open`.
fn rollout_text(rollout: &Value) -> String {
    let waves = rollout["ends"].as_array().map_or(0, Vec::len);
    let opened = rollout["opened"].as_u64().unwrap_or(0);
    let state = if let Some(why) = rollout["aborted"].as_str() {
        format!("aborted ({})", printable(why))
    } else if let Some(why) = rollout["paused"].as_str() {
        format!("paused ({})", printable(why))
    } else if rollout["awaiting_approval"].as_bool() == Some(true) {
        format!("waits for approval of wave {}", opened + 1)
    } else if rollout["soak_until"].is_u64() {
        "soaking".to_string()
    } else {
        "running".to_string()
    };
    format!("{state}, wave {opened} of {waves} open")
}

/// Prints a job's detail (as `GET /api/v1/jobs/{id}` returns it).
pub fn print_job(job: &Value) {
    let content = &job["content"];
    println!(
        "job {}: {} — {} v{} ({}, {} chunks of {})",
        text(&job["id"]),
        text(&job["state"]),
        text(&content["name"]),
        text(&content["version"]),
        format_size(content["length"].as_u64().unwrap_or(0)),
        text(&content["chunks"]),
        format_size(content["chunk_size"].as_u64().unwrap_or(0)),
    );
    println!("root {}", text(&content["root"]));
    if let Some(err) = job["error"].as_str() {
        println!("error: {err}");
    }
    if let Some(group) = job["group"].as_str() {
        println!("group {group}");
    }
    if let Some(policy) = job["policy"].as_str() {
        println!("policy {policy}");
    }
    for warning in job["warnings"].as_array().into_iter().flatten() {
        println!("warning: {}", warning.as_str().unwrap_or("?"));
    }
    if job["rollout"].is_object() {
        println!("rollout {}", rollout_text(&job["rollout"]));
        for w in job["waves"].as_array().into_iter().flatten() {
            println!(
                "  wave {}: {}, {} participants, {} running, {} failed",
                text(&w["wave"]),
                if w["open"].as_bool() == Some(true) {
                    "open"
                } else {
                    "not open"
                },
                text(&w["participants"]),
                text(&w["running"]),
                text(&w["failed"]),
            );
        }
    }
    let parts = job["participants"].as_array().cloned().unwrap_or_default();
    println!(
        "{} of {} participants confirmed, {} failed; bytes from the manager {}, from peers {}",
        text(&job["confirmed_count"]),
        parts.len(),
        text(&job["failed_count"]),
        format_size(job["bytes_from_manager"].as_u64().unwrap_or(0)),
        format_size(job["bytes_from_peers"].as_u64().unwrap_or(0)),
    );
    if let Some(counts) = job["install_counts"].as_object()
        && !counts.is_empty()
    {
        let list: Vec<String> = counts
            .iter()
            .map(|(state, n)| format!("{} {}", text(n), state.replace('_', " ")))
            .collect();
        println!("installs: {}", list.join(", "));
    }
    if parts.is_empty() {
        return;
    }
    let sources = job["source_bytes"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = parts
        .iter()
        .map(|p| {
            let agent = text(&p["agent"]);
            let from: Vec<String> = sources
                .iter()
                .filter(|s| s["agent"].as_str() == Some(agent.as_str()))
                .map(|s| {
                    format!(
                        "{} {}",
                        s["from"].as_str().unwrap_or("manager"),
                        format_size(s["bytes"].as_u64().unwrap_or(0))
                    )
                })
                .collect();
            let state = match p["rollout"].as_str() {
                Some(r) => format!("{} ({r})", text(&p["state"])),
                None => text(&p["state"]),
            };
            vec![
                agent.clone(),
                p["wave"].as_u64().map_or("-".into(), |w| w.to_string()),
                state,
                format!("{}/{}", text(&p["verified"]), text(&p["total"])),
                if p["connected"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                if from.is_empty() {
                    "-".into()
                } else {
                    from.join(", ")
                },
                p["reason"].as_str().unwrap_or("").to_string(),
                install_text(&p["install"]),
                install_note(&p["install"]),
            ]
        })
        .collect();
    table(
        &[
            "AGENT",
            "WAVE",
            "STATE",
            "VERIFIED",
            "CONNECTED",
            "RECEIVED FROM",
            "REASON",
            "INSTALL",
            "INSTALL OUTPUT",
        ],
        &rows,
    );
}

/// Runs `baton job ID [ACTION]`.
pub fn job(args: JobArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    if let Some(action) = args.action {
        let answer: Value = client.post(
            &format!("/api/v1/jobs/{}/{}", args.id, action.name()),
            &json!({}),
        )?;
        if args.json {
            println!("{answer}");
        } else {
            let rollout = &answer["rollout"];
            println!(
                "job {}: {} — rollout {}",
                args.id,
                text(&answer["state"]),
                rollout_text(rollout)
            );
        }
        return Ok(());
    }
    let job: Value = client.get(&format!("/api/v1/jobs/{}", args.id))?;
    if args.json {
        println!("{job}");
    } else {
        print_job(&job);
    }
    Ok(())
}

/// Runs `baton cancel ID`.
pub fn cancel(args: JobArgs) -> anyhow::Result<()> {
    if let Some(action) = args.action {
        anyhow::bail!(
            "`baton cancel` takes only a job id; for the rollout: `baton job {} {}`",
            args.id,
            action.name()
        );
    }
    let client = Client::new(&args.client)?;
    let answer: Value = client.post(&format!("/api/v1/jobs/{}/cancel", args.id), &json!({}))?;
    if args.json {
        println!("{answer}");
    } else {
        println!("job {} cancelled", args.id);
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_says_which_manager_is_active() {
        let standby = status_text(&json!({
            "role": "standby", "epoch": 0, "agent_addr": "10.0.0.2:7700",
            "http_addr": "10.0.0.2:7780", "connected_agents": 0,
            "active_agent_addr": "10.0.0.1:7700", "active_http_addr": "10.0.0.1:7780",
        }));
        assert!(standby.starts_with("standby manager"), "{standby}");
        assert!(
            standby.contains("active manager: agent port 10.0.0.1:7700, API 10.0.0.1:7780"),
            "{standby}"
        );
        let active = status_text(&json!({
            "role": "active", "epoch": 7, "agent_addr": "10.0.0.1:7700",
            "http_addr": "10.0.0.1:7780", "connected_agents": 3,
        }));
        assert!(active.starts_with("active manager, epoch 7\n"), "{active}");
        assert!(active.contains("3 agent(s) connected"), "{active}");
    }

    #[test]
    fn names_and_install_output_cannot_drive_the_terminal() {
        let running = json!([{"name": "app\u{1b}]0;owned\u{7}", "version": 3}]);
        assert_eq!(running_text(&running), "app?]0;owned? v3");
        let install = json!({"output": "ok\nlast \u{1b}[2J\r line\n"});
        assert_eq!(install_note(&install), "last ?[2J? line");
        assert_eq!(text(&json!("a\tb")), "a?b");
    }
}
