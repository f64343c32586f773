//! `baton segments` and `baton segments show NAME`: the LAN segments as their
//! leaders report them (members, capabilities, delays, leaders over time), over
//! the HTTP API.

use clap::{Args, Subcommand};
use serde_json::Value;

use super::show::{rate, table, text};
use super::{Client, ClientOpts, NamedArgs, format_time, path_part};

/// Flags of `baton segments`.
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SegmentsArgs {
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: Option<SegmentsCommand>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// `baton segments` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum SegmentsCommand {
    /// One segment: its members, their capabilities and delays, and its leaders over time.
    Show(NamedArgs),
}

/// Round-trip time in microseconds as milliseconds for people.
fn ms(rtt_us: u64) -> String {
    format!("{:.1} ms", rtt_us as f64 / 1000.0)
}

/// The RTTs members measured to the manager: `min / median / max`.
fn manager_rtts(segment: &Value) -> String {
    let mut rtts: Vec<u64> = segment["members"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["delays"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["to"].is_null())
        .filter_map(|d| d["rtt_us"].as_u64())
        .collect();
    if rtts.is_empty() {
        return "-".into();
    }
    rtts.sort_unstable();
    format!(
        "{} / {} / {}",
        ms(rtts[0]),
        ms(rtts[rtts.len() / 2]),
        ms(rtts[rtts.len() - 1])
    )
}

/// Runs `baton segments` and `baton segments show NAME`.
pub fn segments(args: SegmentsArgs) -> anyhow::Result<()> {
    if let Some(SegmentsCommand::Show(show)) = args.command {
        return segment(show);
    }
    let client = Client::new(&args.client)?;
    let all: Vec<Value> = client.get("/api/v1/segments")?;
    if args.json {
        println!("{}", Value::Array(all));
        return Ok(());
    }
    if all.is_empty() {
        println!("no segment reports yet (agents elect a leader per LAN segment, which reports)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let members = s["members"].as_array().cloned().unwrap_or_default();
            let unknown = members
                .iter()
                .filter(|m| m["known"].as_bool() == Some(false))
                .count();
            vec![
                text(&s["name"]),
                text(&s["leader"]),
                text(&s["term"]),
                if unknown > 0 {
                    format!("{} ({unknown} unknown)", members.len())
                } else {
                    members.len().to_string()
                },
                manager_rtts(s),
                s["reported_at_ms"]
                    .as_u64()
                    .map_or("-".into(), |t| format_time(t / 1000)),
            ]
        })
        .collect();
    table(
        &[
            "SEGMENT",
            "LEADER",
            "TERM",
            "MEMBERS",
            "RTT TO MANAGER (MIN / MEDIAN / MAX)",
            "REPORTED (UTC)",
        ],
        &rows,
    );
    Ok(())
}

fn segment(args: NamedArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let s: Value = client.get(&format!("/api/v1/segments/{}", path_part(&args.name)?))?;
    if args.json {
        println!("{s}");
        return Ok(());
    }
    println!(
        "segment {}: leader {} (term {}), reported {} UTC",
        text(&s["name"]),
        text(&s["leader"]),
        text(&s["term"]),
        s["reported_at_ms"]
            .as_u64()
            .map_or("-".into(), |t| format_time(t / 1000)),
    );
    let rows: Vec<Vec<String>> = s["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let delays = m["delays"].as_array().cloned().unwrap_or_default();
            let to_manager = delays
                .iter()
                .find(|d| d["to"].is_null())
                .and_then(|d| d["rtt_us"].as_u64())
                .map_or("-".into(), ms);
            let to_peers: Vec<String> = delays
                .iter()
                .filter_map(|d| {
                    Some(format!(
                        "{} {}",
                        d["to"].as_str()?,
                        ms(d["rtt_us"].as_u64()?)
                    ))
                })
                .collect();
            vec![
                text(&m["id"]),
                if m["id"] == s["leader"] {
                    "leader".into()
                } else {
                    String::new()
                },
                text(&m["score"]),
                text(&m["performance"]),
                rate(&m["link"]["up_bps"]),
                rate(&m["link"]["down_bps"]),
                text(&m["link"]["loss_ppm"]),
                yes_no(&m["can_serve"]),
                yes_no(&m["known"]),
                format!("{} ms", text(&m["last_heard_ms"])),
                to_manager,
                if to_peers.is_empty() {
                    "-".into()
                } else {
                    to_peers.join(", ")
                },
            ]
        })
        .collect();
    table(
        &[
            "MEMBER",
            "",
            "SCORE",
            "PERF",
            "UP",
            "DOWN",
            "LOSS PPM",
            "SERVES",
            "KNOWN",
            "HEARD",
            "RTT MANAGER",
            "RTT PEERS",
        ],
        &rows,
    );
    let history = s["leader_history"].as_array().cloned().unwrap_or_default();
    if !history.is_empty() {
        println!("leaders:");
        for h in history {
            println!(
                "  {} UTC  {} (term {})",
                h["since_ms"]
                    .as_u64()
                    .map_or("-".into(), |t| format_time(t / 1000)),
                text(&h["leader"]),
                text(&h["term"]),
            );
        }
    }
    Ok(())
}

fn yes_no(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}
