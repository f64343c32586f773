//! `baton`: the Baton command.
//!
//! `baton serve` runs the manager; `baton demo` and `baton lab` run whole
//! distributions on this machine; `baton loadgen` measures what agent sessions cost one
//! manager; `baton admin` manages web UI administrators
//! and API tokens; `keys`, `trust` and `sign` make keys, the root-signed trust
//! document and signed manifests offline (`trust push` uploads the document); `enroll`, `push`, `status`, `jobs`, `job`, `cancel`,
//! `agents`, `segments`, `groups`, `policies` and `audit` talk to a running manager over
//! its HTTP API; `baton agent` runs
//! a Linux agent. Logging goes to
//! stderr and follows `RUST_LOG` (default `info` for `serve`, `warn` for the
//! client commands).

mod cli;
mod demo;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    /// The manager's role (active, or a standby and which one is active), addresses, keys,
    /// epoch, connected agents and byte counters.
    Status(cli::show::StatusArgs),
    /// List jobs.
    Jobs(cli::show::JobsArgs),
    /// Show one job: participants, waves, progress, confirmations, bytes per source; or
    /// `job ID pause|resume|approve|abort` its staged rollout.
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
    /// The manager's database: `db copy --from sqlite:PATH --to postgres://…` moves an installation to PostgreSQL.
    #[command(subcommand)]
    Db(cli::db::DbCommand),
    /// Run a Linux agent (the same as `baton-agent`).
    Agent(Box<baton_agent_core::linux::AgentArgs>),
    /// Run a whole distribution on this machine: a manager and N agents as processes, real TCP, link caps.
    Demo(demo::DemoArgs),
    /// Measure against the lower bound: N agents and a manager in network namespaces, shaped and delayed links (root).
    Lab(demo::lab::LabArgs),
    /// Measure what sessions cost a manager: N real agent sessions from this one process against a `baton serve` it starts (RSS, handshakes/s, push to all instructed, reports/s, CPU).
    Loadgen(demo::loadgen::LoadgenArgs),
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

/// Runs the command; `argv` and `from_file` are what `baton serve` reads again on SIGHUP.
fn run(cli: Cli, argv: Vec<OsString>, from_file: Vec<OsString>) -> anyhow::Result<ExitCode> {
    if cli.die_with_parent {
        die_with_parent();
    }
    match cli.command {
        Command::Serve(args) => {
            cli::serve::run(args, from_file, reread_serve(argv))?;
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
        Command::Status(args) => {
            init_logging("warn");
            cli::show::status(args)?;
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
        Command::Db(cmd) => {
            init_logging("warn");
            cli::db::run(cmd)?;
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
        Command::Loadgen(args) => {
            init_logging("warn");
            return demo::loadgen::main(args);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses the command line; for `baton serve --config FILE`, with the file's settings the
/// command line does not give added to it.
/// Also returns the file's settings as `--KEY=VALUE` arguments (none without `--config`).
fn parse_command_line(argv: &[OsString]) -> Result<(Cli, Vec<OsString>), clap::Error> {
    let mut matches = Cli::command().try_get_matches_from(argv)?;
    let mut from_file = Vec::new();
    if let Some(("serve", serve)) = matches.subcommand() {
        if let Some(path) = serve.get_one::<std::path::PathBuf>(cli::config_file::CONFIG_KEY) {
            let flags =
                <cli::serve::ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
            from_file =
                cli::config_file::arguments_from_file(&flags, serve, path).map_err(|e| {
                    Cli::command().error(clap::error::ErrorKind::InvalidValue, format!("{e:#}"))
                })?;
        }
        if !from_file.is_empty() {
            matches = Cli::command().try_get_matches_from(argv.iter().chain(&from_file))?;
        }
    }
    Ok((Cli::from_arg_matches(&matches)?, from_file))
}

/// Reads `baton serve`'s settings again from the same command line (for SIGHUP).
fn reread_serve(argv: Vec<OsString>) -> cli::serve::Reread {
    Box::new(move || match parse_command_line(&argv) {
        Ok((
            Cli {
                command: Command::Serve(args),
                ..
            },
            from_file,
        )) => Ok((args, from_file)),
        Ok(_) => anyhow::bail!("the command line is no longer `baton serve`"),
        Err(e) => Err(anyhow::anyhow!("{}", e.render().to_string().trim_end())),
    })
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let (cli, from_file) = parse_command_line(&argv).unwrap_or_else(|e| e.exit());
    match run(cli, argv, from_file) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod test {
    use std::ffi::OsString;

    use clap::CommandFactory;

    use super::{Command, cli, parse_command_line};

    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// A manager configuration file giving every flag of `baton serve` a value other than its default.
    const EVERY_SETTING: &str = r#"
data-dir = "/var/lib/baton-test"
db = "/var/lib/baton-test/other.db"
db-password-file = "/etc/baton/db.password"
listen = "127.0.0.1:7000"
http = "127.0.0.1:7001"
up-bps = "10MiB"
give-up = 90
install-deadline = 120
ready-file = "/run/baton/ready.json"
max-connections = 5000
max-handshakes = 99
max-handshakes-per-address = 7
handshake-timeout = 9
serial = ["/dev/ttyUSB0", "/dev/ttyUSB1"]
tls-cert = "/etc/baton/cert.pem"
tls-key = "/etc/baton/key.pem"
max-upload = "512MiB"
http-header-timeout = 11
max-http-connections = 300
max-http-connections-per-address = 12
max-election-score = 40
content-dir = ["/srv/firmware", "/srv/bundles"]
log = "warn,baton_manager=debug"
publisher-key = "/etc/baton/publisher.key"
trust = "/etc/baton/trust.bin"
cert-lifetime = "12h"
lease-ttl = 5
"#;

    fn serve(args: &[&str]) -> Result<cli::serve::ServeArgs, clap::Error> {
        let argv: Vec<OsString> = ["baton", "serve"]
            .iter()
            .chain(args)
            .map(OsString::from)
            .collect();
        match parse_command_line(&argv)?.0.command {
            Command::Serve(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn serve_takes_every_flag_from_its_config_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manager.toml");
        std::fs::write(&path, EVERY_SETTING).unwrap();
        let table: toml::Table = toml::from_str(EVERY_SETTING).unwrap();
        let flags =
            <cli::serve::ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        for key in cli::config_file::keys(&flags) {
            assert!(
                table.contains_key(&key),
                "EVERY_SETTING must set `{key}` (a flag of `baton serve`, so a key of its --config file)"
            );
        }

        let from_file = serve(&["--config", path.to_str().unwrap()]).unwrap();
        let defaults = serve(&[]).unwrap();
        let opts = from_file.options();
        assert_eq!(opts.data_dir, std::path::Path::new("/var/lib/baton-test"));
        assert_eq!(
            opts.db.as_deref(),
            Some(std::path::Path::new("/var/lib/baton-test/other.db"))
        );
        assert_eq!(
            opts.db_password_file.as_deref(),
            Some(std::path::Path::new("/etc/baton/db.password"))
        );
        assert_eq!(opts.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(opts.http.to_string(), "127.0.0.1:7001");
        assert_eq!(opts.up_bps, 10 << 20);
        assert_eq!(opts.give_up.as_secs(), 90);
        assert_eq!(opts.install_deadline.as_secs(), 120);
        assert_eq!(opts.lease_ttl.as_secs(), 5);
        assert!(opts.ready_file.is_some());
        assert_eq!(opts.max_connections, 5000);
        assert_eq!(opts.max_handshakes, 99);
        assert_eq!(opts.max_handshakes_per_address, 7);
        assert_eq!(opts.handshake_timeout.as_secs(), 9);
        assert_eq!(opts.serial.len(), 2);
        assert!(opts.tls.is_some());
        assert_eq!(opts.max_upload, 512 << 20);
        assert_eq!(opts.http_limits.header_read_timeout.as_secs(), 11);
        assert_eq!(opts.http_limits.max_connections, 300);
        assert_eq!(opts.http_limits.max_connections_per_address, 12);
        assert_eq!(opts.max_election_score, 40);
        assert_eq!(opts.content_dirs.len(), 2);
        assert_eq!(
            opts.publisher_key.as_deref(),
            Some(std::path::Path::new("/etc/baton/publisher.key"))
        );
        assert_eq!(
            opts.trust.as_deref(),
            Some(std::path::Path::new("/etc/baton/trust.bin"))
        );
        assert_eq!(opts.cert_lifetime.as_secs(), 12 * 3600);
        assert_eq!(from_file.log_filter(), "warn,baton_manager=debug");
        // Every setting differs from the default, so none of the above passed by accident.
        assert_ne!(format!("{:?}", defaults.options()), format!("{opts:?}"));
        assert_eq!(defaults.log, None);

        // Flags win over the file, lists included; the rest still comes from the file.
        let mixed = serve(&[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:7100",
            "--serial",
            "/dev/pts/3",
        ])
        .unwrap()
        .options();
        assert_eq!(mixed.listen.to_string(), "127.0.0.1:7100");
        assert_eq!(mixed.serial, [std::path::PathBuf::from("/dev/pts/3")]);
        assert_eq!(mixed.http.to_string(), "127.0.0.1:7001");
        assert_eq!(mixed.max_handshakes, 99);
    }

    #[test]
    fn serve_refuses_unknown_keys_and_wrong_values_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manager.toml");
        let refusal = |text: &str| {
            std::fs::write(&path, text).unwrap();
            serve(&["--config", path.to_str().unwrap()])
                .unwrap_err()
                .to_string()
        };
        let unknown = refusal("listen = \"127.0.0.1:7000\"\nlistn = \"x\"\n");
        assert!(unknown.contains("unknown key `listn`"), "{unknown}");
        assert!(unknown.contains("manager.toml"), "{unknown}");
        let wrong = refusal("listen = \"not an address\"\n");
        assert!(wrong.contains("key `listen`"), "{wrong}");
        let list = refusal("listen = [\"127.0.0.1:1\"]\n");
        assert!(list.contains("not a list"), "{list}");
        let itself = refusal("config = \"/etc/other.toml\"\n");
        assert!(itself.contains("unknown key `config`"), "{itself}");
        let missing = serve(&["--config", "/nonexistent/manager.toml"])
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/manager.toml"), "{missing}");
    }
}
