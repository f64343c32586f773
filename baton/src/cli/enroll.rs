//! `baton enroll`: enrol an agent's key, or create, list and revoke one-time enrolment
//! tokens (each expires, 24 h by default, and may be bound to one agent id and to labels
//! the agent must report).

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use super::{Client, ClientOpts};

/// Flags of `baton enroll`.
#[derive(Args, Debug, Clone)]
pub struct EnrollArgs {
    /// The agent's id: with --key, enrol that key; with --token, the one id the token enrols.
    #[arg(long)]
    pub id: Option<String>,
    /// The agent's Ed25519 public key, 64 hex digits (with --id).
    #[arg(long, requires = "id", conflicts_with_all = ["token", "list", "revoke"])]
    pub key: Option<String>,
    /// Create a one-time enrolment token instead; an agent that presents it is enrolled.
    #[arg(long, conflicts_with_all = ["list", "revoke"])]
    pub token: bool,
    /// How long the token is valid (with --token), e.g. 90s, 30m, 24h, 7d; default 24h,
    /// at most 30d.
    #[arg(long, value_name = "DURATION", requires = "token")]
    pub expires: Option<String>,
    /// A label K=V the agent enrolled with the token must report from then on (with
    /// --token; repeat): a session whose report lacks it is refused.
    #[arg(long = "label", value_name = "K=V", requires = "token")]
    pub labels: Vec<String>,
    /// List the enrolment tokens (their ids, expiry, binding and state; never the tokens).
    #[arg(long, conflicts_with_all = ["revoke", "id"])]
    pub list: bool,
    /// Revoke the unused enrolment token with this id (from --list).
    #[arg(long, value_name = "TOKEN_ID", conflicts_with = "id")]
    pub revoke: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Reads a duration such as `90s`, `30m`, `24h`, `7d` or `3600` (seconds) as seconds.
pub fn parse_duration_secs(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{text:?} is not a duration such as 90s, 30m, 24h or 7d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?}: the unit must be s, m, h or d"),
    };
    n.checked_mul(scale)
        .with_context(|| format!("{text:?} is too long"))
}

/// Runs `baton enroll`.
pub fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let expires_in_secs = args
        .expires
        .as_deref()
        .map(parse_duration_secs)
        .transpose()
        .context("--expires")?;
    let client = Client::new(&args.client)?;
    if args.list {
        return list(&client, args.json);
    }
    if let Some(id) = &args.revoke {
        let answer: Value = client.delete(&format!("/api/v1/enrolment-tokens/{id}"))?;
        if args.json {
            println!("{answer}");
        } else {
            println!("{id}: revoked");
        }
        return Ok(());
    }
    let answer: Value = match (&args.id, &args.key, args.token) {
        (Some(id), Some(key), false) => {
            client.post("/api/v1/agents", &json!({ "id": id, "key": key }))?
        }
        (id, None, true) => {
            let mut body = json!({});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(secs) = expires_in_secs {
                body["expires_in_secs"] = json!(secs);
            }
            let mut labels = serde_json::Map::new();
            for label in &args.labels {
                let Some((k, v)) = label.split_once('=') else {
                    bail!("--label {label:?}: give it as KEY=VALUE");
                };
                labels.insert(k.to_string(), json!(v));
            }
            if !labels.is_empty() {
                body["labels"] = Value::Object(labels);
            }
            client.post("/api/v1/enrolment-tokens", &body)?
        }
        _ => bail!(
            "say what to do: `--id ID --key HEX` to enrol a key, `--token [--id ID] [--expires 24h] \
             [--label K=V]` for a one-time token, `--list` or `--revoke TOKEN_ID`"
        ),
    };
    if args.json {
        println!("{answer}");
    } else if let Some(token) = answer.get("token").and_then(Value::as_str) {
        println!("{token}");
        let mut bound = match answer["bound_id"].as_str() {
            Some(id) => format!(", for agent {id:?} only"),
            None => String::new(),
        };
        if let Some(labels) = answer["labels"].as_object().filter(|l| !l.is_empty()) {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                .collect();
            bound.push_str(&format!(", bound to the labels {}", labels.join(" ")));
        }
        eprintln!(
            "one-time enrolment token {} (valid until {} Unix seconds{bound}): give it to the \
             agent in a file (`--token-file FILE`) or in BATON_TOKEN to enrol its key",
            answer["id"].as_str().unwrap_or("?"),
            answer["expires_at"]
        );
    } else {
        println!(
            "{}: {}",
            answer["id"].as_str().unwrap_or("?"),
            answer["result"].as_str().unwrap_or("enrolled")
        );
    }
    Ok(())
}

/// Prints the enrolment tokens, one a line.
fn list(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let answer: Value = client.get("/api/v1/enrolment-tokens")?;
    if as_json {
        println!("{answer}");
        return Ok(());
    }
    let tokens = answer.as_array().map(Vec::as_slice).unwrap_or_default();
    println!(
        "{:<12}  {:<8}  {:>11}  {:>11}  {:<16}  {:<16}  labels",
        "id", "state", "created", "expires", "bound to", "used by"
    );
    for t in tokens {
        let labels: Vec<String> = t["labels"]
            .as_object()
            .map(|l| {
                l.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<12}  {:<8}  {:>11}  {:>11}  {:<16}  {:<16}  {}",
            t["id"].as_str().unwrap_or("?"),
            t["state"].as_str().unwrap_or("?"),
            t["created_at"],
            t["expires_at"],
            t["bound_id"].as_str().unwrap_or("(any id)"),
            t["used_by"].as_str().unwrap_or("-"),
            if labels.is_empty() {
                "-".to_string()
            } else {
                labels.join(" ")
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn durations_read_with_their_unit() {
        assert_eq!(parse_duration_secs("2s").unwrap(), 2);
        assert_eq!(parse_duration_secs("90").unwrap(), 90);
        assert_eq!(parse_duration_secs("30m").unwrap(), 1800);
        assert_eq!(parse_duration_secs("24h").unwrap(), 86_400);
        assert_eq!(parse_duration_secs("7d").unwrap(), 604_800);
        for bad in ["", "h", "2w", "-1s", "1.5h"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }
}
