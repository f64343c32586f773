//! The Linux agent's settings: command-line flags, optionally from a TOML file.
//!
//! Every flag can also be given in `--config FILE.toml` under the same name
//! (`manager = "host:7000"`, `up-bps = "10MiB"`, `label = ["role=edge"]`);
//! a flag on the command line wins over the file.

use std::path::PathBuf;

use serde::Deserialize;

/// Flags of the Linux agent (`baton-agent`, `baton agent`).
#[derive(clap::Args, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct AgentArgs {
    /// Read settings from this TOML file (flags win).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The manager's agent port, HOST:PORT; several managers (an active one and standbys on
    /// one PostgreSQL database) as a comma-separated list, tried in turn (at most 16,
    /// repeats ignored).
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    pub manager: Option<String>,
    /// The manager's Ed25519 public key (hex), pinned in the handshake.
    #[arg(long, value_name = "HEX")]
    pub manager_key: Option<String>,
    /// This agent's id as enrolled at the manager.
    #[arg(long)]
    pub id: Option<String>,
    /// Where the identity key, content and state live.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the peer listener binds (default 0.0.0.0:0).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address reported to the manager for peers (default: the bound address).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Site, e.g. fra-2.
    #[arg(long)]
    pub site: Option<String>,
    /// LAN segment, e.g. fra-2/rack-4.
    #[arg(long)]
    pub segment: Option<String>,
    /// A key=value label (repeat).
    #[arg(long = "label", value_name = "K=V")]
    pub label: Vec<String>,
    /// Upload cap, e.g. 10MiB (per second); omitted = unlimited, and the agent reports the peak rate it measures.
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_string")]
    pub up_bps: Option<String>,
    /// Download cap, e.g. 10MiB (per second); omitted = unlimited, and the agent reports the peak rate it measures.
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_string")]
    pub down_bps: Option<String>,
    /// Most peers served at once (default 48, below 64).
    #[arg(long, value_name = "N")]
    pub max_peers: Option<u16>,
    /// Chunk requests in flight per source.
    #[arg(long, value_name = "N")]
    pub window: Option<u16>,
    /// One-time enrolment token (also from the environment, BATON_TOKEN); prefer
    /// --token-file, since `ps` shows flags.
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the one-time enrolment token from this file (surrounding whitespace ignored).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// A pinned root key (hex, repeat; at most 4): trust documents must be signed by
    /// --root-threshold of them, and only publishers such a document lists for a content
    /// name can sign it. Without one the agent refuses every manifest.
    #[arg(long = "root-key", value_name = "HEX")]
    pub root_key: Vec<String>,
    /// How many of the --root-key keys must sign a trust document (default 1).
    #[arg(long, value_name = "N")]
    pub root_threshold: Option<u8>,
    /// No longer accepted: agents pin root keys (--root-key), not publisher keys.
    #[arg(long = "publisher-key", value_name = "HEX", hide = true)]
    pub publisher_key: Vec<String>,
    /// Write completed content to this path.
    #[arg(long, value_name = "PATH")]
    pub export: Option<PathBuf>,
    /// Run this shell command when content is complete (env BATON_CONTENT, BATON_NAME, BATON_VERSION).
    #[arg(long, value_name = "CMD")]
    pub on_complete: Option<String>,
    /// Install completed, verified content with this shell command (env BATON_CONTENT_PATH,
    /// BATON_CONTENT_NAME, BATON_CONTENT_VERSION, BATON_JOB; the content is exported first,
    /// to --export or under the data directory). Its result is reported to the manager:
    /// exit 0 installed, --restart-exit-code installed with a restart pending, else failed.
    #[arg(long, value_name = "CMD")]
    pub install: Option<String>,
    /// After an install: this shell command must exit 0 (retried every --health-interval
    /// until --health-deadline) for the content to count as running (same environment).
    #[arg(long, value_name = "CMD", requires = "install")]
    pub health: Option<String>,
    /// When an install or its health check fails: this shell command restores the previous
    /// version (same environment); its exit 0 makes the participant "rolled back".
    #[arg(long, value_name = "CMD", requires = "install")]
    pub rollback: Option<String>,
    /// Seconds the health check may keep failing after an install before it counts as failed
    /// (default 60).
    #[arg(long, value_name = "SECS")]
    pub health_deadline: Option<u64>,
    /// Seconds between health check attempts (default 2).
    #[arg(long, value_name = "SECS")]
    pub health_interval: Option<u64>,
    /// Seconds any install, health, rollback or on-complete command may run before it is
    /// killed (with its process group; default 600).
    #[arg(long, value_name = "SECS")]
    pub command_timeout: Option<u64>,
    /// The install command's exit code that means "installed, restart pending" (default
    /// 75): the agent records the pending version in its data directory and reports it
    /// running after its restart, once the health check passes.
    #[arg(long, value_name = "CODE")]
    pub restart_exit_code: Option<i32>,
    /// On a restart-pending install, re-execute this agent's own executable (the path it
    /// was started as, which the install may have replaced) with the same arguments,
    /// instead of waiting for the host to restart it.
    #[arg(long)]
    pub reexec_on_restart: bool,
    /// The executable --reexec-on-restart runs (default: the path this agent was started
    /// as, e.g. where a self-update's install command puts the new agent).
    #[arg(long, value_name = "PATH")]
    pub agent_exe: Option<PathBuf>,
    /// Keep a JSON status file here, rewritten on change.
    #[arg(long, value_name = "PATH")]
    pub status_file: Option<PathBuf>,
    /// Most bytes of content kept under the data directory, e.g. 10GiB.
    #[arg(long, value_name = "SIZE")]
    #[serde(deserialize_with = "size_string")]
    pub max_storage: Option<String>,
    /// Print this agent's public key (hex) and exit.
    #[arg(long)]
    pub print_key: bool,
    /// Exit with status 0 after the first Done.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Relative performance score 1..=1000 (default 100), reported and used in the segment election.
    #[arg(long, value_name = "N")]
    pub performance: Option<u32>,
    /// UDP port for segment discovery (default 7790; 0 turns discovery off).
    #[arg(long, value_name = "PORT")]
    pub discovery_port: Option<u16>,
    /// Broadcast address beacons go to (default 255.255.255.255; 127.255.255.255 on one host).
    #[arg(long, value_name = "ADDR")]
    pub discovery_broadcast: Option<String>,
    /// Milliseconds between two segment beacons (default 1000).
    #[arg(long, value_name = "MS")]
    pub beacon_interval_ms: Option<u64>,
    /// Milliseconds after which a silent segment member, the leader included, is dropped
    /// (default 3000); a silent leader is replaced within this plus one beacon interval.
    #[arg(long, value_name = "MS")]
    pub leader_timeout_ms: Option<u64>,
    /// Most peer handshakes in progress on the listener at once (default 128); more
    /// connections are closed at once.
    #[arg(long, value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// Most peer handshakes in progress at once from one address, IPv6: one /64 (default 16).
    #[arg(long, value_name = "N")]
    pub max_handshakes_per_address: Option<usize>,
    /// Seconds a peer connection has to finish its handshake (default 5).
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<u64>,
    /// Seconds a peer may take no byte of what it asked for before it is disconnected
    /// (default 20); meanwhile it is not read once 32 frames wait for or from it.
    #[arg(long, value_name = "SECS")]
    pub peer_stall_timeout_secs: Option<u64>,
}

/// Accepts a size as a TOML string ("10MiB") or integer (65536).
fn size_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    Ok(Some(match Size::deserialize(d)? {
        Size::Int(n) => n.to_string(),
        Size::Text(s) => s,
    }))
}

impl AgentArgs {
    /// Fills every setting not given on the command line from `file`.
    pub fn merge(mut self, file: AgentArgs) -> AgentArgs {
        fn or<T>(a: &mut Option<T>, b: Option<T>) {
            if a.is_none() {
                *a = b;
            }
        }
        or(&mut self.manager, file.manager);
        or(&mut self.manager_key, file.manager_key);
        or(&mut self.id, file.id);
        or(&mut self.data_dir, file.data_dir);
        or(&mut self.listen, file.listen);
        or(&mut self.advertise, file.advertise);
        or(&mut self.site, file.site);
        or(&mut self.segment, file.segment);
        or(&mut self.up_bps, file.up_bps);
        or(&mut self.down_bps, file.down_bps);
        or(&mut self.max_peers, file.max_peers);
        or(&mut self.window, file.window);
        if self.token.is_none() && self.token_file.is_none() {
            self.token = file.token;
            self.token_file = file.token_file;
        }
        or(&mut self.export, file.export);
        or(&mut self.on_complete, file.on_complete);
        or(&mut self.install, file.install);
        or(&mut self.health, file.health);
        or(&mut self.rollback, file.rollback);
        or(&mut self.health_deadline, file.health_deadline);
        or(&mut self.health_interval, file.health_interval);
        or(&mut self.command_timeout, file.command_timeout);
        or(&mut self.restart_exit_code, file.restart_exit_code);
        self.reexec_on_restart |= file.reexec_on_restart;
        or(&mut self.agent_exe, file.agent_exe);
        or(&mut self.status_file, file.status_file);
        or(&mut self.max_storage, file.max_storage);
        or(&mut self.performance, file.performance);
        or(&mut self.discovery_port, file.discovery_port);
        or(&mut self.discovery_broadcast, file.discovery_broadcast);
        or(&mut self.beacon_interval_ms, file.beacon_interval_ms);
        or(&mut self.leader_timeout_ms, file.leader_timeout_ms);
        or(&mut self.max_handshakes, file.max_handshakes);
        or(
            &mut self.max_handshakes_per_address,
            file.max_handshakes_per_address,
        );
        or(&mut self.handshake_timeout, file.handshake_timeout);
        or(
            &mut self.peer_stall_timeout_secs,
            file.peer_stall_timeout_secs,
        );
        if self.label.is_empty() {
            self.label = file.label;
        }
        if self.root_key.is_empty() {
            self.root_key = file.root_key;
        }
        or(&mut self.root_threshold, file.root_threshold);
        if self.publisher_key.is_empty() {
            self.publisher_key = file.publisher_key;
        }
        self.print_key |= file.print_key;
        self.exit_when_done |= file.exit_when_done;
        self
    }

    /// Reads `--config` if given and merges it under the flags.
    pub fn resolve(self) -> Result<AgentArgs, String> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let file: AgentArgs =
            toml::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        Ok(self.merge(file))
    }

    /// The enrolment token: `--token` (or BATON_TOKEN), or the contents of `--token-file`.
    pub fn enrolment_token(&self) -> Result<Option<String>, String> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => Err(
                "give the enrolment token once: --token (or BATON_TOKEN) or --token-file".into(),
            ),
            (Some(t), None) => Ok(Some(t.clone())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
                let token = text.trim();
                if token.is_empty() || token.contains(char::is_whitespace) {
                    return Err(format!(
                        "--token-file {}: the file must hold one token (it holds {})",
                        path.display(),
                        if token.is_empty() {
                            "nothing"
                        } else {
                            "several words"
                        }
                    ));
                }
                Ok(Some(token.to_string()))
            }
            (None, None) => Ok(None),
        }
    }
}

#[cfg(test)]
mod test {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "manager = \"10.0.0.1:7000\"\nid = \"file-id\"\nup-bps = 65536\ndown-bps = \"1MiB\"\nlabel = [\"role=edge\"]\nexit-when-done = true\ndiscovery-port = 7000\nleader-timeout-ms = 1500\nmax-handshakes = 8\nhandshake-timeout = 3\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--id",
            "flag-id",
            "--label",
            "tier=1",
            "--discovery-port",
            "7999",
            "--max-handshakes-per-address",
            "4",
            "--handshake-timeout",
            "2",
        ]);
        let args = cli.args.resolve().unwrap();
        assert_eq!(args.manager.as_deref(), Some("10.0.0.1:7000"));
        assert_eq!(args.id.as_deref(), Some("flag-id"));
        assert_eq!(args.up_bps.as_deref(), Some("65536"));
        assert_eq!(args.down_bps.as_deref(), Some("1MiB"));
        assert_eq!(args.label, ["tier=1"]);
        assert!(args.exit_when_done);
        assert_eq!(args.discovery_port, Some(7999));
        assert_eq!(args.leader_timeout_ms, Some(1500));
        assert_eq!(args.max_handshakes, Some(8));
        assert_eq!(args.max_handshakes_per_address, Some(4));
        assert_eq!(args.handshake_timeout, Some(2));
    }

    #[test]
    fn the_token_comes_from_the_flag_a_file_or_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let token_path = dir.path().join("token");
        std::fs::write(&token_path, "  abc123\n").unwrap();
        let from_file = Cli::parse_from(["x", "--token-file", token_path.to_str().unwrap()]);
        assert_eq!(
            from_file.args.enrolment_token().unwrap().as_deref(),
            Some("abc123")
        );
        let from_flag = Cli::parse_from(["x", "--token", "t1"]);
        assert_eq!(
            from_flag.args.enrolment_token().unwrap().as_deref(),
            Some("t1")
        );
        assert!(Cli::try_parse_from(["x", "--token", "t", "--token-file", "f"]).is_err());

        // The config file may name the token file; a flag's token wins over it.
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!("token-file = {:?}\n", token_path.to_str().unwrap()),
        )
        .unwrap();
        let via_config = Cli::parse_from(["x", "--config", config.to_str().unwrap()]);
        let args = via_config.args.resolve().unwrap();
        assert_eq!(args.enrolment_token().unwrap().as_deref(), Some("abc123"));
        let flag_wins =
            Cli::parse_from(["x", "--config", config.to_str().unwrap(), "--token", "t2"]);
        let args = flag_wins.args.resolve().unwrap();
        assert_eq!(args.enrolment_token().unwrap().as_deref(), Some("t2"));

        // Missing and empty files are named errors.
        let missing = Cli::parse_from(["x", "--token-file", "/nonexistent/token"]);
        assert!(
            missing
                .args
                .enrolment_token()
                .unwrap_err()
                .contains("/nonexistent/token")
        );
        std::fs::write(&token_path, "\n").unwrap();
        let empty = Cli::parse_from(["x", "--token-file", token_path.to_str().unwrap()]);
        assert!(
            empty
                .args
                .enrolment_token()
                .unwrap_err()
                .contains("nothing")
        );
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "managr = \"x\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        assert!(cli.args.resolve().unwrap_err().contains("managr"));
    }
}
