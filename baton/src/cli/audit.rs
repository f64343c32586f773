//! `baton audit`: the manager's audit log (who changed what, from where, when, with
//! what result), newest first, over the HTTP API (`GET /api/v1/audit`).

use clap::Args;
use serde_json::Value;

use super::show::{table, text};
use super::{Client, ClientOpts, format_time};

/// Flags of `baton audit`.
#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Entries at most (the manager answers at most 1000 at once).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Only entries older than this id (the id the previous page says to continue from).
    #[arg(long, value_name = "ID")]
    pub before: Option<u64>,
    /// Print the entries as a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Who made a change, for a table cell: `via` and the name.
fn who(entry: &Value) -> String {
    let via = entry["via"].as_str().unwrap_or("-");
    match entry["who"].as_str() {
        Some(name) if !name.is_empty() => format!("{via} {name}"),
        _ => via.to_string(),
    }
}

/// The result for a table cell: `ok`, or `refused` with the status and the error.
fn result(entry: &Value) -> String {
    let mut out = text(&entry["result"]);
    if let Some(status) = entry["status"].as_u64()
        && entry["result"] != "ok"
    {
        out.push_str(&format!(" {status}"));
    }
    if let Some(error) = entry["error"].as_str() {
        out.push_str(&format!(": {error}"));
    }
    out
}

/// Runs `baton audit`.
pub fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let mut path = format!("/api/v1/audit?limit={}", args.limit.max(1));
    if let Some(before) = args.before {
        path.push_str(&format!("&before={before}"));
    }
    let page: Value = client.get(&path)?;
    let entries = page["entries"].as_array().cloned().unwrap_or_default();
    if args.json {
        println!("{}", Value::Array(entries));
        return Ok(());
    }
    if entries.is_empty() {
        println!("no audit entries");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                text(&e["id"]),
                e["at"].as_u64().map_or("-".into(), format_time),
                who(e),
                text(&e["address"]),
                text(&e["action"]),
                match e["target"].as_str() {
                    Some("") | None => "-".into(),
                    Some(t) => t.to_string(),
                },
                result(e),
            ]
        })
        .collect();
    table(
        &[
            "ID", "AT (UTC)", "WHO", "ADDRESS", "ACTION", "TARGET", "RESULT",
        ],
        &rows,
    );
    if let Some(next) = page["next"].as_u64() {
        eprintln!("older entries: baton audit --before {next}");
    }
    Ok(())
}
