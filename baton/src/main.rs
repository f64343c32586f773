//! `baton`: the Baton command.
//!
//! `baton serve` runs the manager; `baton demo` and `baton lab` run whole
//! distributions on this machine; `baton admin` manages web UI administrators
//! and API tokens; `keys`, `trust` and `sign` make keys, the root-signed trust
//! document and signed manifests offline (`trust push` uploads the document); `enroll`, `push`, `jobs`, `job`, `cancel`,
//! `agents`, `segments`, `groups`, `policies` and `audit` talk to a running manager over
//! its HTTP API; `baton agent` runs
//! a Linux agent. Logging goes to
//! stderr and follows `RUST_LOG` (default `info` for `serve`, `warn` for the
//! client commands).

mod cli;
mod demo;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Distributes content from a manager to a fleet of agents by relay.
#[derive(Parser, Debug)]
#[command(name = "baton", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Exit when standard input closes: a parent that pipes our stdin takes us down with it.
    #[arg(long, global = true, hide = true)]
    die_with_parent: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the manager: agent port, HTTP API, database.
    Serve(cli::serve::ServeArgs),
    /// Enrol an agent's key (`--id ID --key HEX`), or create (`--token [--id ID] [--expires 24h]`), list (`--list`) and revoke (`--revoke ID`) one-time enrolment tokens.
    Enroll(cli::enroll::EnrollArgs),
    /// Publish a file and distribute it to agents (with `--manifest`: as `baton sign` signed it).
    Push(cli::push::PushArgs),
    /// Make keys: `keys new --out FILE` (a root or publisher key; prints its public key).
    #[command(subcommand)]
    Keys(cli::keys::KeysCommand),
    /// The root-signed trust document, offline: `init`, `add-publisher`, `remove-publisher`, `set-roots`, `sign`, `show`; `push` uploads it.
    #[command(subcommand)]
    Trust(cli::trust::TrustCommand),
    /// Sign a file's manifest with a publisher key, offline (then `baton push FILE --manifest FILE.manifest`).
    Sign(cli::trust::SignArgs),
    /// List jobs.
    Jobs(cli::show::JobsArgs),
    /// Show one job: participants, progress, confirmations, bytes per source.
    Job(cli::show::JobArgs),
    /// Cancel a job (participants keep the chunks they verified).
    Cancel(cli::show::JobArgs),
    /// List enrolled agents and whether they are connected.
    Agents(cli::show::AgentsArgs),
    /// List network segments as their leaders report them; `segments show NAME` for one.
    Segments(cli::segments::SegmentsArgs),
    /// Content groups: named sets of agents, by id or label (`list|show|add|set|rm`).
    Groups(cli::definitions::GroupsArgs),
    /// Named distribution policies (`list|show|add|set|rm`).
    Policies(cli::definitions::PoliciesArgs),
    /// Show the audit log: who changed what, from where, when, with what result.
    Audit(cli::audit::AuditArgs),
    /// Administrators of the web UI and API tokens: `add NAME`, `token NAME`, `revoke-token NAME`, `list`.
    #[command(subcommand)]
    Admin(cli::admin::AdminCommand),
    /// Run a Linux agent (the same as `baton-agent`).
    Agent(Box<baton_agent_core::linux::AgentArgs>),
    /// Run a whole distribution on this machine: a manager and N agents as processes, real TCP, link caps.
    Demo(demo::DemoArgs),
    /// Measure against the lower bound: N agents and a manager in network namespaces, shaped and delayed links (root).
    Lab(demo::lab::LabArgs),
}

/// Exits the process once standard input reaches end of file (the parent is gone).
fn die_with_parent() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin().lock();
        while std::io::Read::read(&mut stdin, &mut sink).is_ok_and(|n| n > 0) {}
        std::process::exit(3);
    });
}

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.die_with_parent {
        die_with_parent();
    }
    match cli.command {
        Command::Serve(args) => {
            init_logging("info");
            cli::serve::run(args)?;
        }
        Command::Enroll(args) => {
            init_logging("warn");
            cli::enroll::enroll(args)?;
        }
        Command::Push(args) => {
            init_logging("warn");
            return cli::push::run(args);
        }
        Command::Keys(cmd) => {
            init_logging("warn");
            cli::keys::run(cmd)?;
        }
        Command::Trust(cmd) => {
            init_logging("warn");
            cli::trust::run(cmd)?;
        }
        Command::Sign(args) => {
            init_logging("warn");
            cli::trust::sign(args)?;
        }
        Command::Jobs(args) => {
            init_logging("warn");
            cli::show::jobs(args)?;
        }
        Command::Job(args) => {
            init_logging("warn");
            cli::show::job(args)?;
        }
        Command::Cancel(args) => {
            init_logging("warn");
            cli::show::cancel(args)?;
        }
        Command::Agents(args) => {
            init_logging("warn");
            cli::show::agents(args)?;
        }
        Command::Segments(args) => {
            init_logging("warn");
            cli::segments::segments(args)?;
        }
        Command::Groups(args) => {
            init_logging("warn");
            cli::definitions::groups(args)?;
        }
        Command::Policies(args) => {
            init_logging("warn");
            cli::definitions::policies(args)?;
        }
        Command::Audit(args) => {
            init_logging("warn");
            cli::audit::audit(args)?;
        }
        Command::Admin(cmd) => {
            init_logging("warn");
            cli::admin::run(cmd)?;
        }
        Command::Agent(args) => {
            init_logging("info");
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(baton_agent_core::linux::run(*args))?;
        }
        Command::Demo(args) => {
            init_logging("warn");
            let json = args.json;
            let report = demo::run(args)?;
            demo::print(&report, json);
            if report.confirmed < report.agents {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Lab(args) => {
            init_logging("warn");
            let json = args.json;
            let report = demo::lab::run(args)?;
            demo::lab::print(&report, json);
            if report.confirmed < report.agents {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod test {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
