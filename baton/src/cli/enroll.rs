//! `baton enroll`: enrol an agent's key, or create a one-time enrolment token.

use anyhow::bail;
use clap::Args;
use serde_json::{Value, json};

use super::{Client, ClientOpts};

/// Flags of `baton enroll`.
#[derive(Args, Debug, Clone)]
pub struct EnrollArgs {
    /// The agent's id (with --key).
    #[arg(long, requires = "key", conflicts_with = "token")]
    pub id: Option<String>,
    /// The agent's Ed25519 public key, 64 hex digits (with --id).
    #[arg(long, requires = "id")]
    pub key: Option<String>,
    /// Create a one-time enrolment token instead; an agent that presents it is enrolled.
    #[arg(long)]
    pub token: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Runs `baton enroll`.
pub fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let answer: Value = match (&args.id, &args.key, args.token) {
        (Some(id), Some(key), false) => {
            client.post("/api/v1/agents", &json!({ "id": id, "key": key }))?
        }
        (None, None, true) => client.post("/api/v1/enrolment-tokens", &json!({}))?,
        _ => bail!("say what to enrol: `--id ID --key HEX`, or `--token` for a one-time token"),
    };
    if args.json {
        println!("{answer}");
    } else if let Some(token) = answer.get("token").and_then(Value::as_str) {
        println!("{token}");
        eprintln!("one-time enrolment token: start the agent with it to enrol its key");
    } else {
        println!(
            "{}: {}",
            answer["id"].as_str().unwrap_or("?"),
            answer["result"].as_str().unwrap_or("enrolled")
        );
    }
    Ok(())
}
