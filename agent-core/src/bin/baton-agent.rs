//! `baton-agent`: the Linux agent (same as `baton agent`).

use clap::Parser;

/// Baton agent: fetches, verifies, stores and relays content for a Baton manager.
#[derive(Parser)]
#[command(name = "baton-agent", version)]
struct Cli {
    #[command(flatten)]
    args: baton_agent_core::linux::AgentArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    baton_agent_core::linux::run(cli.args).await?;
    Ok(())
}
