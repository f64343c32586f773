//! `baton demo`: a whole distribution on this machine, with real processes.
//!
//! The demo starts a manager (`baton serve`) and N agents (`baton agent`) as
//! child processes of the running executable, on loopback with real TCP and a
//! temporary SQLite database. Each agent gets a link profile from
//! [`LinkProfile::heterogeneous`]; every process enforces its own caps. It
//! then publishes S random bytes, pushes them to every agent, shows
//! progress, checks every agent's exported copy against the source's SHA-256,
//! and prints the time against the lower bound
//! T* = max(S/u_manager, S/d_min, N·S/(u_manager + Σ u_i)).
//!
//! Children are tied to the demo: each is started with `--die-with-parent` and
//! a pipe on stdin, so it exits when the demo exits for any reason (even
//! SIGKILL); the demo also kills them on its way out and on Ctrl-C, and
//! removes its temporary directory.

pub mod bt;
pub mod lab;
pub mod loadgen;
pub mod segments;

use std::io::{BufRead as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use baton::lab::{Lab, Topology, netns};
use serde::Serialize;
use serde_json::Value;
use sha2_std::{Digest as _, Sha256};

/// How long to wait for children to start and connect.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Set when the user interrupts the demo (Ctrl-C, SIGTERM).
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turns Ctrl-C and SIGTERM into [`INTERRUPTED`], so the demo unwinds and cleans up.
pub(crate) fn catch_interrupts() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            INTERRUPTED.store(true, Ordering::SeqCst);
        });
    });
}

/// The link caps of the manager and each agent, in bytes per second.
#[derive(Clone, Debug, Serialize)]
pub struct LinkProfile {
    /// Manager upload cap.
    pub manager_up_bps: u64,
    /// Per agent: upload cap.
    pub agent_up_bps: Vec<u64>,
    /// Per agent: download cap.
    pub agent_down_bps: Vec<u64>,
}

impl LinkProfile {
    /// Adds agent `i`'s caps (`--up-bps`, `--down-bps`) to its `baton agent` command.
    pub(crate) fn cap_agent(&self, cmd: &mut Command, i: usize) {
        cmd.args(["--up-bps", &self.agent_up_bps[i].to_string()]);
        cmd.args(["--down-bps", &self.agent_down_bps[i].to_string()]);
    }

    /// The documented heterogeneous default for `agents` agents (see README):
    /// agent `i` in class `k = i mod 4` uploads (k+1)·512 KiB/s and downloads
    /// (k+1)·2 MiB/s; the manager uploads a tenth of the agents' sum.
    pub fn heterogeneous(agents: usize) -> Self {
        let class = |i: usize| (i % 4) as u64 + 1;
        let agent_up_bps: Vec<u64> = (0..agents).map(|i| class(i) * 512 * 1024).collect();
        let agent_down_bps = (0..agents).map(|i| class(i) * 2 * 1024 * 1024).collect();
        Self::with_manager_share(agent_up_bps, agent_down_bps)
    }

    /// Symmetric links drawn from `seed`: agent `i` uploads and downloads the same rate
    /// `r_i`, log-uniform in 512..=2560 KiB/s (5:1), the slowest agent exactly at 512 KiB/s
    /// and the fastest at 2560 KiB/s (see [`spread_log_uniform`]); the manager uploads a
    /// tenth of the agents' sum. T* is then S/d_min (the slowest download) once there are
    /// more than a handful of agents; with fewer, the manager's upload binds.
    pub fn symmetric(agents: usize, seed: u64) -> Self {
        let rates = spread_log_uniform(agents, 512 * 1024, 2560 * 1024, seed);
        Self::with_manager_share(rates.clone(), rates)
    }

    /// Asymmetric links drawn from `seed`: agent `i` uploads `u_i`, log-uniform in
    /// 256..=1280 KiB/s (5:1, both ends taken, see [`spread_log_uniform`]), and downloads
    /// 5·u_i; the manager uploads a tenth of the agents' sum. T* is then the aggregate
    /// upload term N·S/(u_s + Σu_i) from 12 agents on; with fewer, S/u_s binds.
    pub fn asymmetric(agents: usize, seed: u64) -> Self {
        let up = spread_log_uniform(agents, 256 * 1024, 1280 * 1024, seed);
        let down = up.iter().map(|u| 5 * u).collect();
        Self::with_manager_share(up, down)
    }

    /// The agents' rates with the manager uploading a tenth of their upload sum (at least
    /// 64 KiB/s).
    fn with_manager_share(agent_up_bps: Vec<u64>, agent_down_bps: Vec<u64>) -> Self {
        let sum: u64 = agent_up_bps.iter().sum();
        LinkProfile {
            manager_up_bps: (sum / 10).max(64 * 1024),
            agent_up_bps,
            agent_down_bps,
        }
    }

    /// The lower bound on every agent's own completion, in seconds: agent `i` cannot finish
    /// before it downloaded `bytes` (S/d_i), nor before the manager uploaded them once
    /// (S/u_s). One entry per agent.
    pub fn own_lower_bounds_seconds(&self, bytes: u64) -> Vec<f64> {
        let s = bytes as f64;
        self.agent_down_bps
            .iter()
            .map(|&d| (s / d as f64).max(s / self.manager_up_bps as f64))
            .collect()
    }

    /// The fluid lower bound when agent `agent`'s upload falls to `new_up_bps` at
    /// `at_seconds` after the push, in seconds: S/u_s and S/d_min do not involve the agents'
    /// uploads and stay; the aggregate term becomes the T at which the upload capacity
    /// delivered, (u_s + Σu)·t_d + (u_s + Σu')·(T − t_d), reaches N·S (unchanged if the
    /// original aggregate term ends before the drop).
    pub fn lower_bound_after_upload_drop_seconds(
        &self,
        bytes: u64,
        agent: usize,
        new_up_bps: u64,
        at_seconds: f64,
    ) -> f64 {
        let (single, total, before) = self.bound_terms(bytes);
        let after = before - self.agent_up_bps[agent] as f64 + new_up_bps as f64;
        let mut aggregate = total / before;
        if aggregate > at_seconds {
            aggregate = at_seconds + (total - before * at_seconds) / after;
        }
        single.max(aggregate)
    }

    /// The Kumar–Ross lower bound for `bytes` of content, in seconds.
    pub fn lower_bound_seconds(&self, bytes: u64) -> f64 {
        let (single, total, upload) = self.bound_terms(bytes);
        single.max(total / upload)
    }

    /// The parts of the bound for `bytes`: the larger of S/u_s and S/d_min (seconds), the
    /// bytes to deliver N·S, and the aggregate upload u_s + Σu (bytes/s).
    fn bound_terms(&self, bytes: u64) -> (f64, f64, f64) {
        let s = bytes as f64;
        let n = self.agent_up_bps.len() as f64;
        let d_min = self
            .agent_down_bps
            .iter()
            .copied()
            .min()
            .unwrap_or(u64::MAX) as f64;
        let upload = self.manager_up_bps as f64 + self.agent_up_bps.iter().sum::<u64>() as f64;
        (
            (s / self.manager_up_bps as f64).max(s / d_min),
            n * s,
            upload,
        )
    }
}

/// `n` rates log-uniform in `min..=max`, drawn from `seed` with [`SplitMix64`] and then
/// stretched (an affine map of their logarithms) so that the lowest is exactly `min` and the
/// highest exactly `max` whenever `n >= 2`: the spread is always `max:min`. One agent gets
/// `min`.
pub fn spread_log_uniform(n: usize, min: u64, max: u64, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64(seed);
    let draws: Vec<f64> = (0..n).map(|_| rng.next_unit()).collect();
    let lo = draws.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = draws.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ratio = max as f64 / min as f64;
    draws
        .iter()
        .map(|&x| {
            let position = if hi > lo { (x - lo) / (hi - lo) } else { 0.0 };
            ((min as f64 * ratio.powf(position)).round() as u64).clamp(min, max)
        })
        .collect()
}

/// Sebastiano Vigna's splitmix64: a tiny deterministic generator, enough to draw lab rates
/// from a seed the same way on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in `[0, 1)` (53 bits).
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Options of `baton demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of agents.
    #[arg(long, default_value_t = 16)]
    pub agents: usize,
    /// Content size, e.g. 16MiB.
    #[arg(long, default_value = "16MiB", value_parser = parse_size_arg)]
    pub size: u64,
    /// Chunk size, e.g. 32KiB.
    #[arg(long, default_value = "32KiB", value_parser = parse_size_arg)]
    pub chunk_size: u64,
    /// Print one JSON object with the results on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Run without any link caps (measures raw relay throughput; no lower bound).
    #[arg(long)]
    pub no_caps: bool,
    /// Keep the temporary directory (manager database, agents' data) for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Give up if the job has not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Build K LAN segments in network namespaces (needs root) and spread the agents over
    /// them: each segment is a bridge behind its own rate-limited WAN link to a router, the
    /// manager sits behind the router; agents find their segment's leader by UDP broadcast.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub segments: usize,
    /// With --segments: the rate of each segment's WAN link, each way (e.g. 8MiB, per second).
    #[arg(long, default_value = "8MiB", value_parser = parse_size_arg, value_name = "SIZE")]
    pub wan_bps: u64,
}

pub(crate) fn parse_size_arg(s: &str) -> Result<u64, String> {
    baton_agent_core::linux::size::parse_size(s).map_err(|e| e.to_string())
}

/// The results `baton demo --json` prints.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// Agents started.
    pub agents: usize,
    /// Agents that confirmed and whose copy matched the source's SHA-256.
    pub confirmed: usize,
    /// Content size in bytes.
    pub bytes: u64,
    /// Seconds from the job's submission to the last confirmation (the demo's clock, 50 ms polls).
    pub seconds: f64,
    /// T* from the caps (0 without caps).
    pub lower_bound_seconds: f64,
    /// `seconds / lower_bound_seconds` (0 without caps).
    pub ratio: f64,
    /// Bytes the manager wrote to agent connections (frames, headers included).
    pub manager_bytes_sent: u64,
    /// Sum over agents of verified content bytes received over sockets.
    pub agent_bytes_received: u64,
    /// Largest resident set (VmHWM) of any agent process, in bytes.
    pub agent_max_rss_bytes: u64,
    /// The link profile (absent without caps).
    pub caps: Option<LinkProfile>,
    /// With --segments: the number of segments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<usize>,
    /// With --segments: distinct leaders named in the segment reports the manager received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaders: Option<usize>,
    /// With --segments: the most bytes (frames, headers included) the router forwarded into
    /// one segment during the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wan_bytes_max_per_segment: Option<u64>,
}

/// A child process that is killed when dropped.
pub(crate) struct Kid {
    /// Its name in messages and its log file's name.
    pub name: String,
    /// The process.
    pub child: Child,
    /// The program and arguments it was started with (to start it again after a fault).
    pub command: (std::ffi::OsString, Vec<std::ffi::OsString>),
    /// Stopped on purpose (a fault): its exit is not an error.
    pub stopped: bool,
    /// Times it was started (its log file's suffix after the first).
    pub starts: u32,
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo's temporary directory, removed when dropped unless kept.
pub(crate) struct Scratch {
    /// The directory.
    pub path: PathBuf,
    keep: bool,
}

impl Scratch {
    /// A fresh directory under the system's temporary directory.
    pub(crate) fn new(prefix: &str, keep: bool) -> anyhow::Result<Scratch> {
        let scratch = Scratch {
            path: std::env::temp_dir().join(format!(
                "{prefix}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            )),
            keep,
        };
        std::fs::create_dir_all(&scratch.path)
            .with_context(|| format!("cannot create {}", scratch.path.display()))?;
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Runs `baton demo`: on loopback, or with `--segments K` in network namespaces.
pub fn run(args: DemoArgs) -> anyhow::Result<DemoReport> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if args.segments > 0 {
        return segments::run(args);
    }
    let setup = Setup::prepare("baton-demo", args.agents, args.size, args.keep)?;
    let dir = setup.scratch.path.clone();

    // Manager.
    let mut manager_cmd = Command::new(&setup.exe);
    manager_cmd.args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    if !args.no_caps {
        manager_cmd.args(["--up-bps", &setup.profile.manager_up_bps.to_string()]);
    }
    let mut fleet = DemoProcesses::start_manager(manager_cmd, &dir)?;

    // Agents.
    fleet.start_agents(&setup.exe, args.agents, |i| {
        let mut cmd = Command::new(&setup.exe);
        cmd.args(["agent", "--listen", "127.0.0.1:0"]);
        if !args.no_caps {
            setup.profile.cap_agent(&mut cmd, i);
        }
        cmd
    })?;

    let run = fleet.run_job(&setup.content, args.chunk_size, args.timeout, args.json)?;
    let checked = fleet.check_copies(&run, &setup.source_sha, args.json)?;
    drop(fleet);
    Ok(DemoReport::measured(&args, setup.profile, &run, &checked))
}

/// What every demo run starts from: the running executable, its scratch directory, the
/// link profile, and the random content with its SHA-256.
pub(crate) struct Setup {
    /// The running `baton`, started again as manager and agents.
    pub exe: PathBuf,
    /// The temporary directory (content, logs, data directories).
    pub scratch: Scratch,
    /// The agents' and the manager's caps.
    pub profile: LinkProfile,
    /// The content file.
    pub content: PathBuf,
    /// The content's SHA-256, to check the agents' copies against.
    pub source_sha: [u8; 32],
}

impl Setup {
    /// Turns interrupts into [`INTERRUPTED`], makes a scratch directory named after `prefix`
    /// (kept if `keep`) and writes `size` random bytes of content into it.
    pub fn prepare(prefix: &str, agents: usize, size: u64, keep: bool) -> anyhow::Result<Setup> {
        catch_interrupts();
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let scratch = Scratch::new(prefix, keep)?;
        let content = scratch.path.join("content.bin");
        let source_sha = write_random(&content, size)?;
        Ok(Setup {
            exe,
            scratch,
            profile: LinkProfile::heterogeneous(agents),
            content,
            source_sha,
        })
    }
}

impl DemoReport {
    /// The report of a demo run with `args` on `profile`: the job's time against the lower
    /// bound (none without caps) and what checking the copies found; no segment figures.
    pub(crate) fn measured(
        args: &DemoArgs,
        profile: LinkProfile,
        run: &JobRun,
        checked: &Checked,
    ) -> DemoReport {
        let (lower_bound_seconds, ratio) = if args.no_caps {
            (0.0, 0.0)
        } else {
            let t = profile.lower_bound_seconds(args.size);
            (t, run.seconds / t)
        };
        DemoReport {
            agents: args.agents,
            confirmed: checked.confirmed,
            bytes: args.size,
            seconds: run.seconds,
            lower_bound_seconds,
            ratio,
            manager_bytes_sent: checked.manager_bytes_sent,
            agent_bytes_received: checked.agent_bytes_received,
            agent_max_rss_bytes: checked.agent_max_rss_bytes,
            caps: (!args.no_caps).then_some(profile),
            segments: None,
            leaders: None,
            wan_bytes_max_per_segment: None,
        }
    }
}

/// The demo's agent ids: `agent-00`, `agent-01`, …
pub(crate) fn agent_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("agent-{i:02}")).collect()
}

/// A manager and its agents as child processes, and the manager's API.
pub(crate) struct DemoProcesses {
    /// The manager first, then the agents in the order they were started.
    pub kids: Vec<Kid>,
    /// The manager's HTTP API.
    pub api: Api,
    /// The agents' ids, in the order they were started.
    pub ids: Vec<String>,
    /// The demo directory (logs, data directories).
    pub dir: PathBuf,
    /// The policy jobs are submitted with, inline (default: the planner's defaults).
    pub job_policy: Option<Value>,
    /// Each agent's command line from its subcommand on (`baton agent --listen …`), in
    /// [`DemoProcesses::ids`] order, as a shell would read it.
    pub agent_commands: Vec<String>,
    /// Enrolled agents not started yet that jobs are for too (they join late, in this
    /// order, and are appended to [`DemoProcesses::ids`] when started).
    pub late_ids: Vec<String>,
    /// Where agents connect to the manager.
    pub agent_addr: String,
    /// The manager's key (hex), which its agents pin.
    pub manager_key: String,
    /// The demo's root key (hex), which its agents pin.
    pub root_key: String,
}

/// The demo's own content trust, made in `dir/keys`: a root key, a publisher key, and a
/// trust document the root signed listing the publisher for every name (`*`) — what
/// `baton keys new`, `baton trust init|add-publisher|sign` make. Returns the root's public
/// key (hex), the document file and the publisher key file.
pub(crate) fn make_demo_trust(dir: &Path) -> anyhow::Result<(String, PathBuf, PathBuf)> {
    use baton_manager::trust::{write_key_file, write_trust_file};
    use baton_protocol::identity::Identity;
    use baton_protocol::trust::{NamePattern, PublisherGrant, SignedTrust, TrustDocument};
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).with_context(|| format!("cannot create {}", keys.display()))?;
    let new_key = |name: &str| -> anyhow::Result<(Identity, PathBuf)> {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let key = Identity::from_seed(seed);
        let path = keys.join(name);
        write_key_file(&path, &key).with_context(|| format!("cannot write {}", path.display()))?;
        Ok((key, path))
    };
    let (root, _) = new_key("root.key")?;
    let (publisher, publisher_file) = new_key("publisher.key")?;
    let mut signed = SignedTrust::new(TrustDocument {
        version: 1,
        expires: 0,
        threshold: 1,
        roots: heapless::Vec::from_slice(&[root.public()]).expect("one root"),
        publishers: heapless::Vec::from_slice(&[PublisherGrant {
            key: publisher.public(),
            names: heapless::Vec::from_slice(&[NamePattern::try_from("*").expect("short")])
                .expect("one pattern"),
        }])
        .expect("one publisher"),
    });
    signed
        .sign(&root)
        .map_err(|e| anyhow::anyhow!("cannot sign the demo's trust document: {e}"))?;
    let trust_file = keys.join("trust.bin");
    write_trust_file(&trust_file, &signed)
        .with_context(|| format!("cannot write {}", trust_file.display()))?;
    Ok((hex::encode(root.public().0), trust_file, publisher_file))
}

/// What one job run measured.
pub(crate) struct JobRun {
    /// Seconds from submission to the last participant finishing.
    pub seconds: f64,
    /// Per agent (in [`DemoProcesses::ids`] order): seconds from submission until it was seen confirmed.
    pub completion: Vec<Option<f64>>,
    /// The job's last JSON status.
    pub last_status: Value,
    /// The job's id.
    pub job_id: u64,
    /// When the job was submitted (before the manager published the content), Unix ms.
    pub pushed_unix_ms: u64,
}

/// What checking the agents' copies found.
pub(crate) struct Checked {
    /// Agents confirmed with a copy matching the source.
    pub confirmed: usize,
    /// Bytes the manager wrote to agent connections.
    pub manager_bytes_sent: u64,
    /// Sum over agents of verified bytes received.
    pub agent_bytes_received: u64,
    /// Largest agent VmHWM.
    pub agent_max_rss_bytes: u64,
    /// Per agent that reported it: seconds from the submission of the job to the first
    /// chunk it verified from the network.
    pub push_to_first_chunk_seconds: Vec<f64>,
    /// Per agent that reported it: seconds from its process's start to the manager's
    /// first `Welcome`.
    pub start_to_welcomed_seconds: Vec<f64>,
}

impl DemoProcesses {
    /// Builds the network lab of `topology`, moves this process into the manager's
    /// namespace (where the manager's HTTP API is on loopback) and starts the manager there,
    /// listening for agents on `port`, its uplink capped at `up_bps` if given. The lab is
    /// returned to be dropped after the fleet (children die before their namespaces).
    pub fn start_in_lab(
        topology: &Topology,
        exe: &Path,
        port: u16,
        up_bps: Option<u64>,
        dir: &Path,
    ) -> anyhow::Result<(Lab, DemoProcesses)> {
        let lab = Lab::build(topology).context("cannot build the network lab")?;
        netns::enter(&lab.manager.ns).context("cannot enter the manager's namespace")?;
        let mut manager_cmd = Lab::command(&lab.manager.ns, exe);
        manager_cmd.args([
            "serve",
            "--listen",
            &format!("{}:{port}", lab.manager.ip),
            "--http",
            "127.0.0.1:0",
        ]);
        if let Some(up_bps) = up_bps {
            manager_cmd.args(["--up-bps", &up_bps.to_string()]);
        }
        let fleet = DemoProcesses::start_manager(manager_cmd, dir)?;
        Ok((lab, fleet))
    }

    /// Starts the manager from `cmd` (`baton serve` with its addresses; the data directory,
    /// ready file and give-up are added here, and `dir`, where the content is, as its
    /// `--content-dir`: the data directory inside stays refused; the demo's own root and
    /// publisher keys and trust document ([`make_demo_trust`]) as `--trust` and
    /// `--publisher-key`) and waits until it is ready. The API must be reachable from the
    /// calling thread.
    pub fn start_manager(mut cmd: Command, dir: &Path) -> anyhow::Result<DemoProcesses> {
        let (root_key, trust_file, publisher_file) = make_demo_trust(dir)?;
        cmd.arg("--trust").arg(&trust_file);
        cmd.arg("--publisher-key").arg(&publisher_file);
        let ready = dir.join("manager-ready.json");
        cmd.arg("--die-with-parent");
        cmd.arg("--data-dir").arg(dir.join("manager"));
        cmd.arg("--content-dir").arg(dir);
        cmd.arg("--ready-file").arg(&ready);
        cmd.args(["--give-up", "60"]);
        let mut kids = vec![spawn(&mut cmd, "manager", dir)?];
        let ready = wait_until_json(&ready, &mut kids)?;
        Ok(DemoProcesses {
            api: Api::from_ready(&ready)?,
            agent_addr: str_field(&ready, "agent_addr")?,
            manager_key: str_field(&ready, "manager_key")?,
            root_key,
            kids,
            ids: Vec::new(),
            dir: dir.to_path_buf(),
            job_policy: None,
            agent_commands: Vec::new(),
            late_ids: Vec::new(),
        })
    }

    /// Creates agent `id`'s identity, enrols it, and starts it from `cmd` (`baton agent` with
    /// its listen address and caps; manager, key, id, data directory, export and status
    /// file are added here).
    pub fn start_agent(&mut self, exe: &Path, id: &str, cmd: Command) -> anyhow::Result<()> {
        let cmd = self.enrol_agent(exe, id, cmd)?;
        self.spawn_agent(id, cmd)
    }

    /// Creates agent `id`'s identity and enrols it, and returns `cmd` completed as in
    /// [`DemoProcesses::start_agent`], to be started with [`DemoProcesses::spawn_agent`]
    /// (now, or later for an agent that joins late).
    pub fn enrol_agent(
        &mut self,
        exe: &Path,
        id: &str,
        mut cmd: Command,
    ) -> anyhow::Result<Command> {
        let data = self.dir.join(id);
        let out = Command::new(exe)
            .args(["agent", "--print-key", "--data-dir"])
            .arg(&data)
            .output()
            .context("cannot run `baton agent --print-key`")?;
        if !out.status.success() {
            bail!(
                "`baton agent --print-key` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.api
            .post(
                "/api/v1/agents",
                &serde_json::json!({ "id": id, "key": key }),
            )
            .with_context(|| format!("cannot enrol {id}"))?;
        cmd.args([
            "--die-with-parent",
            "--manager",
            &self.agent_addr,
            "--manager-key",
            &self.manager_key,
            "--root-key",
            &self.root_key,
            "--id",
            id,
        ]);
        cmd.arg("--data-dir").arg(&data);
        cmd.arg("--export").arg(data.join("export.bin"));
        cmd.arg("--status-file").arg(data.join("status.json"));
        Ok(cmd)
    }

    /// Starts enrolled agent `id` from `cmd` (see [`DemoProcesses::enrol_agent`]).
    pub fn spawn_agent(&mut self, id: &str, mut cmd: Command) -> anyhow::Result<()> {
        self.kids.push(spawn(&mut cmd, id, &self.dir)?);
        self.ids.push(id.to_string());
        self.agent_commands.push(baton_command_line(&cmd));
        Ok(())
    }

    /// SIGKILLs child `k` (0 = the manager, `i + 1` = agent `ids[i]`), on purpose: it is not
    /// an error that it is gone, until it is started again.
    pub fn kill_kid(&mut self, k: usize) -> anyhow::Result<()> {
        let kid = &mut self.kids[k];
        kid.stopped = true;
        kid.child
            .kill()
            .with_context(|| format!("cannot kill {}", kid.name))?;
        kid.child.wait()?;
        Ok(())
    }

    /// Starts child `k` again with the command it was started with (its log in
    /// `NAME.N.log` for its N-th start); the manager, once its API answers again.
    pub fn restart_kid(&mut self, k: usize) -> anyhow::Result<()> {
        let ready = self.dir.join("manager-ready.json");
        if k == 0 {
            let _ = std::fs::remove_file(&ready);
        }
        let kid = &mut self.kids[k];
        if !kid.stopped {
            bail!("{} is running", kid.name);
        }
        let starts = kid.starts + 1;
        let mut cmd = Command::new(&kid.command.0);
        cmd.args(&kid.command.1);
        let mut new = spawn(&mut cmd, &format!("{}.{starts}", kid.name), &self.dir)?;
        new.name = kid.name.clone();
        new.starts = starts;
        *kid = new;
        if k == 0 {
            let ready = wait_until_json(&ready, &mut self.kids)?;
            self.api = Api::from_ready(&ready)?;
        }
        Ok(())
    }

    /// Whether the manager is stopped on purpose (its API does not answer).
    pub fn manager_stopped(&self) -> bool {
        self.kids.first().is_some_and(|k| k.stopped)
    }

    /// Starts agents `agent-00`, `agent-01`, … (`n` of them), agent `i` from `command(i)` as
    /// in [`DemoProcesses::start_agent`], and waits until all are connected.
    pub fn start_agents(
        &mut self,
        exe: &Path,
        n: usize,
        mut command: impl FnMut(usize) -> Command,
    ) -> anyhow::Result<()> {
        for (i, id) in agent_ids(n).iter().enumerate() {
            self.start_agent(exe, id, command(i))?;
        }
        self.wait_connected()
    }

    /// Waits until every agent is connected.
    pub fn wait_connected(&mut self) -> anyhow::Result<()> {
        wait_connected(&self.api, self.ids.len(), &mut self.kids)
    }

    /// Fails if a child exited or the user interrupted.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        check_alive(&mut self.kids)
    }

    /// Publishes `content` to every agent and follows the job until every participant
    /// confirmed or failed (`on_poll` runs on every poll, e.g. to sample counters).
    pub fn run_job_with(
        &mut self,
        content: &Path,
        chunk_size: u64,
        timeout: u64,
        quiet: bool,
        mut on_poll: impl FnMut(&mut DemoProcesses, f64) -> anyhow::Result<()>,
    ) -> anyhow::Result<JobRun> {
        let targets: Vec<String> = self.ids.iter().chain(&self.late_ids).cloned().collect();
        let mut request = serde_json::json!({
            "path": content,
            "name": "demo",
            "chunk_size": chunk_size,
            "targets": { "agents": targets },
        });
        if let Some(policy) = &self.job_policy {
            request["policy"] = policy.clone();
        }
        let pushed_unix_ms = unix_ms();
        let job: Value = self.api.post("/api/v1/jobs", &request)?;
        let job_id = job["id"]
            .as_u64()
            .context("the manager's job answer has no id")?;
        let started = Instant::now();
        let bar = progress_bar(targets.len() as u64, quiet);
        let deadline = started + Duration::from_secs(timeout);
        let mut completion = vec![None; targets.len()];
        let mut last_status = Value::Null;
        while Instant::now() < deadline {
            check_alive(&mut self.kids)?;
            on_poll(self, started.elapsed().as_secs_f64())?;
            if self.manager_stopped() {
                // A fault keeps the manager down: nothing to ask until it is back.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let status: Value = self.api.get(&format!("/api/v1/jobs/{job_id}"))?;
            let elapsed = started.elapsed().as_secs_f64();
            let parts = status["participants"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let (mut confirmed, mut failed, mut verified, mut total) = (0, 0, 0u64, 0u64);
            for p in &parts {
                match p["state"].as_str().unwrap_or("") {
                    "confirmed" => {
                        confirmed += 1;
                        if let Some(i) = targets.iter().position(|id| p["agent"] == id.as_str()) {
                            completion[i].get_or_insert(elapsed);
                        }
                    }
                    "failed" => failed += 1,
                    _ => {}
                }
                verified += p["verified"].as_u64().unwrap_or(0);
                total += p["total"].as_u64().unwrap_or(0);
            }
            bar.set_position(confirmed);
            bar.set_message(format!(
                "{:.0}% of chunks verified, {failed} failed",
                100.0 * verified as f64 / total.max(1) as f64
            ));
            last_status = status;
            if !parts.is_empty() && confirmed + failed == parts.len() as u64 {
                bar.finish_and_clear();
                return Ok(JobRun {
                    seconds: elapsed,
                    completion,
                    last_status,
                    job_id,
                    pushed_unix_ms,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bar.finish_and_clear();
        bail!("the job did not finish within {timeout} s; last status: {last_status}")
    }

    /// [`DemoProcesses::run_job_with`] without a per-poll hook.
    pub fn run_job(
        &mut self,
        content: &Path,
        chunk_size: u64,
        timeout: u64,
        quiet: bool,
    ) -> anyhow::Result<JobRun> {
        self.run_job_with(content, chunk_size, timeout, quiet, |_, _| Ok(()))
    }

    /// Checks every agent's exported copy against the source's SHA-256 and gathers figures.
    pub fn check_copies(
        &self,
        run: &JobRun,
        source_sha: &[u8; 32],
        quiet: bool,
    ) -> anyhow::Result<Checked> {
        let mut confirmed = 0;
        let mut agent_bytes_received = 0;
        let mut agent_max_rss_bytes = 0;
        let mut push_to_first_chunk_seconds = Vec::new();
        let mut start_to_welcomed_seconds = Vec::new();
        for (id, kid) in self.ids.iter().zip(self.kids.iter().skip(1)) {
            let data = self.dir.join(id);
            let state = run.last_status["participants"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["agent"] == id.as_str()))
                .and_then(|p| p["state"].as_str())
                .unwrap_or("");
            let copy = data.join("export.bin");
            // The agent exports after it confirms (a temporary file, then a rename).
            let export_deadline = Instant::now() + Duration::from_secs(30);
            while state == "confirmed" && !copy.exists() && Instant::now() < export_deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if state == "confirmed" && copy.exists() && sha256_file(&copy)? == *source_sha {
                confirmed += 1;
            } else if !quiet {
                eprintln!(
                    "{id}: not confirmed (state {state:?}, copy present: {})",
                    copy.exists()
                );
            }
            agent_bytes_received += status_bytes_received(&data.join("status.json"));
            let (first_chunk, welcomed) =
                startup_seconds(&data.join("status.json"), run.job_id, run.pushed_unix_ms);
            push_to_first_chunk_seconds.extend(first_chunk);
            start_to_welcomed_seconds.extend(welcomed);
            agent_max_rss_bytes = agent_max_rss_bytes.max(peak_rss(kid.child.id()));
        }
        let status: Value = self.api.get("/api/v1/status")?;
        Ok(Checked {
            confirmed,
            manager_bytes_sent: status["bytes_sent"].as_u64().unwrap_or(0),
            agent_bytes_received,
            agent_max_rss_bytes,
            push_to_first_chunk_seconds,
            start_to_welcomed_seconds,
        })
    }
}

/// Prints the report: a summary for people, and with `--json` one JSON line last.
pub fn print(report: &DemoReport, json: bool) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{} of {} agents confirmed {:.1} MiB in {:.2} s",
        report.confirmed,
        report.agents,
        mib(report.bytes),
        report.seconds
    );
    if let (Some(k), Some(leaders), Some(wan)) = (
        report.segments,
        report.leaders,
        report.wan_bytes_max_per_segment,
    ) {
        println!(
            "{k} segments, {leaders} leaders reported; at most {:.1} MiB ({:.3}× the content) crossed one WAN link",
            mib(wan),
            wan as f64 / report.bytes.max(1) as f64
        );
    }
    if report.lower_bound_seconds > 0.0 {
        println!(
            "lower bound T* = {:.2} s, seconds/T* = {:.3}",
            report.lower_bound_seconds, report.ratio
        );
    }
    println!(
        "manager sent {:.1} MiB ({:.2}× the content); agents received {:.1} MiB; largest agent RSS {:.1} MiB",
        mib(report.manager_bytes_sent),
        report.manager_bytes_sent as f64 / report.bytes.max(1) as f64,
        mib(report.agent_bytes_received),
        mib(report.agent_max_rss_bytes)
    );
    if json {
        println!(
            "{}",
            serde_json::to_string(report).expect("the report serialises")
        );
    }
}

pub(crate) fn spawn(cmd: &mut Command, name: &str, dir: &Path) -> anyhow::Result<Kid> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .with_context(|| format!("cannot create the log of {name}"))?;
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Kid {
        name: name.to_string(),
        child,
        command: (
            cmd.get_program().to_os_string(),
            cmd.get_args().map(|a| a.to_os_string()).collect(),
        ),
        stopped: false,
        starts: 1,
    })
}

/// `cmd` from its `agent` subcommand on, as `baton agent …` (the program and any `ip netns
/// exec` before it left out), arguments quoted for a shell where they need it.
fn baton_command_line(cmd: &Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let from = args.iter().position(|a| a == "agent").unwrap_or(0);
    std::iter::once("baton".to_string())
        .chain(args[from..].iter().map(|a| shell_quoted(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `arg` as a shell reads it back: unchanged if it holds only safe characters, else in
/// single quotes.
fn shell_quoted(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Fails if any child has exited, or the user interrupted the demo.
pub(crate) fn check_alive(kids: &mut [Kid]) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; stopped the manager and agents and removed the demo directory");
    }
    for kid in kids.iter_mut().filter(|k| !k.stopped) {
        if let Some(status) = kid.child.try_wait()? {
            bail!(
                "{} exited early ({status}); see its log in the demo directory (--keep)",
                kid.name
            );
        }
    }
    Ok(())
}

pub(crate) fn wait_until_json(path: &Path, kids: &mut [Kid]) -> anyhow::Result<Value> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        check_alive(kids)?;
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the manager did not become ready within {START_TIMEOUT:?}")
}

fn wait_connected(api: &Api, agents: usize, kids: &mut [Kid]) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        check_alive(kids)?;
        let list: Value = api.get("/api/v1/agents")?;
        let connected = list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["connected"].as_bool() == Some(true))
                    .count()
            })
            .unwrap_or(0);
        if connected == agents {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not every agent connected within {START_TIMEOUT:?}")
}

fn str_field(v: &Value, key: &str) -> anyhow::Result<String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("the manager's ready file has no {key}"))
}

pub(crate) fn write_random(path: &Path, size: u64) -> anyhow::Result<[u8; 32]> {
    use rand::RngCore as _;
    use std::io::Write as _;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut rng = rand::thread_rng();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(hasher.finalize().into())
}

pub(crate) fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Verified content bytes an agent says it received over sockets (its status file).
/// Now, in Unix milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// From an agent's status file: seconds from `pushed_unix_ms` to its first chunk of job
/// `job` from the network, and from its process's start to its first `Welcome`.
fn startup_seconds(path: &Path, job: u64, pushed_unix_ms: u64) -> (Option<f64>, Option<f64>) {
    let Ok(v) = std::fs::read_to_string(path)
        .map_err(|_| ())
        .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|_| ()))
    else {
        return (None, None);
    };
    let since = |to: Option<u64>, from: u64| to.map(|t| t.saturating_sub(from) as f64 / 1000.0);
    let first_chunk = v["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job"] == job))
        .and_then(|j| j["first_chunk_unix_ms"].as_u64());
    let started = v["started_unix_ms"].as_u64().unwrap_or(0);
    (
        since(first_chunk, pushed_unix_ms),
        since(v["welcomed_unix_ms"].as_u64(), started).filter(|_| started > 0),
    )
}

fn status_bytes_received(path: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return 0;
    };
    v["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .filter_map(|j| j["bytes_received"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Peak resident set of a process (VmHWM), in bytes; 0 if unknown.
fn peak_rss(pid: u32) -> u64 {
    let Ok(file) = std::fs::File::open(format!("/proc/{pid}/status")) else {
        return 0;
    };
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let rest = line.strip_prefix("VmHWM:")?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn progress_bar(len: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} agents confirmed  {msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar
}

/// A minimal client for the manager's HTTP API with the admin token.
pub(crate) struct Api {
    base: String,
    token: String,
}

impl Api {
    fn from_ready(ready: &Value) -> anyhow::Result<Self> {
        Ok(Api {
            base: format!("http://{}", str_field(ready, "http_addr")?),
            token: str_field(ready, "admin_token")?,
        })
    }

    /// `GET path` as JSON.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let mut resp = ureq::get(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .call()
            .with_context(|| format!("GET {path}"))?;
        Ok(resp.body_mut().read_json()?)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut resp = ureq::post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .send_json(body)
            .with_context(|| format!("POST {path}"))?;
        Ok(resp.body_mut().read_json()?)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn default_profile_meets_the_documented_shape() {
        for n in [8usize, 32] {
            let p = LinkProfile::heterogeneous(n);
            let max_up = *p.agent_up_bps.iter().max().unwrap();
            let min_up = *p.agent_up_bps.iter().min().unwrap();
            assert!(max_up >= 4 * min_up);
            let max_down = *p.agent_down_bps.iter().max().unwrap();
            let min_down = *p.agent_down_bps.iter().min().unwrap();
            assert!(max_down >= 4 * min_down);
            assert!(p.agent_up_bps.iter().sum::<u64>() >= 10 * p.manager_up_bps);
        }
        // The aggregate term binds for the demo's sizes.
        for (n, s) in [(16usize, 16u64 << 20), (32, 64 << 20)] {
            let p = LinkProfile::heterogeneous(n);
            let aggregate = n as f64 * s as f64
                / (p.manager_up_bps + p.agent_up_bps.iter().sum::<u64>()) as f64;
            assert_eq!(p.lower_bound_seconds(s), aggregate);
        }
    }

    /// The three terms of T*: S/u_s, S/d_min, N·S/(u_s + Σu).
    fn terms(p: &LinkProfile, bytes: u64) -> [f64; 3] {
        let s = bytes as f64;
        let d_min = *p.agent_down_bps.iter().min().unwrap() as f64;
        let aggregate = (p.manager_up_bps + p.agent_up_bps.iter().sum::<u64>()) as f64;
        [
            s / p.manager_up_bps as f64,
            s / d_min,
            p.agent_up_bps.len() as f64 * s / aggregate,
        ]
    }

    #[test]
    fn symmetric_rates_span_five_to_one_and_the_slowest_download_binds() {
        let (min, max) = (512 * 1024, 2560 * 1024);
        for n in [2usize, 8, 32] {
            for seed in 1..=5 {
                let p = LinkProfile::symmetric(n, seed);
                assert_eq!(p.agent_up_bps, p.agent_down_bps);
                assert_eq!(*p.agent_up_bps.iter().min().unwrap(), min);
                assert_eq!(*p.agent_up_bps.iter().max().unwrap(), max);
                assert_eq!(p.manager_up_bps, p.agent_up_bps.iter().sum::<u64>() / 10);
            }
        }
        for seed in 1..=5 {
            let p = LinkProfile::symmetric(32, seed);
            let [manager, slowest, aggregate] = terms(&p, 64 << 20);
            assert!(slowest > manager && slowest > aggregate, "seed {seed}");
            assert_eq!(p.lower_bound_seconds(64 << 20), slowest);
        }
    }

    #[test]
    fn asymmetric_rates_download_five_times_upload_and_the_aggregate_binds() {
        let (min, max) = (256 * 1024, 1280 * 1024);
        for seed in 1..=5 {
            let p = LinkProfile::asymmetric(32, seed);
            assert_eq!(*p.agent_up_bps.iter().min().unwrap(), min);
            assert_eq!(*p.agent_up_bps.iter().max().unwrap(), max);
            for (u, d) in p.agent_up_bps.iter().zip(&p.agent_down_bps) {
                assert_eq!(*d, 5 * u);
            }
            let [manager, slowest, aggregate] = terms(&p, 64 << 20);
            assert!(aggregate > manager && aggregate > slowest, "seed {seed}");
            assert_eq!(p.lower_bound_seconds(64 << 20), aggregate);
        }
    }

    #[test]
    fn seeded_rates_repeat_per_seed_and_differ_between_seeds() {
        assert_eq!(
            LinkProfile::symmetric(16, 7).agent_up_bps,
            LinkProfile::symmetric(16, 7).agent_up_bps
        );
        assert_ne!(
            LinkProfile::symmetric(16, 7).agent_up_bps,
            LinkProfile::symmetric(16, 8).agent_up_bps
        );
        // Log-uniform: about half the agents below the geometric middle (√5 × the minimum).
        let rates = spread_log_uniform(1000, 1000, 5000, 3);
        let middle = 1000.0 * 5f64.sqrt();
        let below = rates.iter().filter(|&&r| (r as f64) < middle).count();
        assert!(
            (400..600).contains(&below),
            "{below} of 1000 below the middle"
        );
        assert_eq!(spread_log_uniform(1, 1000, 5000, 3), [1000]);
        assert!(spread_log_uniform(0, 1000, 5000, 3).is_empty());
    }

    #[test]
    fn own_bounds_are_the_slower_of_own_download_and_manager_upload() {
        let p = LinkProfile {
            manager_up_bps: 100,
            agent_up_bps: vec![50, 50],
            agent_down_bps: vec![50, 400],
        };
        assert_eq!(p.own_lower_bounds_seconds(1000), [20.0, 10.0]);
    }

    #[test]
    fn an_upload_drop_stretches_only_the_aggregate_term_after_it() {
        // u_s = 100, Σu = 300: aggregate capacity 400; N·S = 4 × 1000 → T* = 10 s.
        let p = LinkProfile {
            manager_up_bps: 100,
            agent_up_bps: vec![100, 100, 50, 50],
            agent_down_bps: vec![1000; 4],
        };
        assert_eq!(p.lower_bound_seconds(1000), 10.0);
        // Agent 0 falls to 50 at 4 s: 1600 delivered by then, 2400 left at 350/s.
        let t = p.lower_bound_after_upload_drop_seconds(1000, 0, 50, 4.0);
        assert!((t - (4.0 + 2400.0 / 350.0)).abs() < 1e-9, "{t}");
        // A drop after T* changes nothing; nor one on a bound that download limits.
        assert_eq!(
            p.lower_bound_after_upload_drop_seconds(1000, 0, 50, 12.0),
            10.0
        );
        let slow = LinkProfile {
            agent_down_bps: vec![10; 4],
            ..p
        };
        assert_eq!(
            slow.lower_bound_after_upload_drop_seconds(1000, 0, 50, 4.0),
            100.0
        );
    }

    #[test]
    fn command_lines_start_at_the_subcommand_and_quote_what_needs_it() {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", "btl-1-0-a0", "/x/baton", "agent", "--id"])
            .arg("agent-00")
            .arg("--data-dir")
            .arg("/tmp/a b/it's");
        assert_eq!(
            baton_command_line(&cmd),
            r"baton agent --id agent-00 --data-dir '/tmp/a b/it'\''s'"
        );
    }
}
