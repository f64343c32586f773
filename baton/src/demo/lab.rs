//! `baton lab`: N real agents and a manager in network namespaces, shaped and delayed
//! links, measured against the Kumar–Ross lower bound.
//!
//! Every agent's rates come from `--profile` (see [`RateProfile`]; by default
//! symmetric links drawn from `--seed`, 512 KiB/s to 2.5 MiB/s), shaped with
//! htb on its access link, and a one-way delay from `--delay-ms MIN..MAX` is
//! added in each direction by the lab's userspace TAP forwarder (this kernel
//! has no `netem`). The manager's uplink is shaped to a tenth of the agents'
//! upload sum. Agents are blind by default: they measure their links; with
//! `--declared-rates` they are told the shaped rates (`--up-bps`/`--down-bps`).
//! One job of `--size` bytes runs to every agent; the report gives the
//! makespan (the last confirmation), T* = max(S/u_s, S/d_min, N·S/(u_s + Σu_i))
//! from the configured rates, their ratio, p50 and p99 completion (also as
//! ratios to T*), every host against its own bound max(S/d_i, S/u_s), the
//! bytes the manager sent (origin egress), and the CPU the manager and agents
//! used per byte delivered. `--drop-upload HOST@FRACTION` halves one agent's
//! upload once FRACTION of T* has passed and reports the bound that follows.
//!
//! `--fault` and `--late` measure what faults cost: a manager SIGKILLed and
//! started again (at once, or after a downtime), agents SIGKILLed and started
//! again, or agents that start after the push. The lab first runs the same job
//! without the fault (same rates, delays and content, a fresh lab), then with
//! it, and reports both makespans and the penalty.
//!
//! `--baseline bt` then runs a BitTorrent swarm on the same lab, file and links
//! ([`super::bt`]) and reports its figures beside Baton's.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use baton::lab::{Lab, LinkShape, Topology};
use serde::Serialize;

use super::segments::{AGENT_PORT, MANAGER_PORT};
use super::{DemoProcesses, LinkProfile, Setup, parse_size_arg};

/// The agents' link rates `baton lab --profile` draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RateProfile {
    /// [`LinkProfile::heterogeneous`]: four classes, uploads 0.5–2 MiB/s, downloads 4× that.
    #[value(name = "hetero")]
    Heterogeneous,
    /// [`LinkProfile::symmetric`]: up = down, 512..2560 KiB/s from the seed (S/d_min binds).
    #[value(name = "sym")]
    Symmetric,
    /// [`LinkProfile::asymmetric`]: uploads 256..1280 KiB/s from the seed, downloads 5× that
    /// (the aggregate upload term binds).
    #[value(name = "asym")]
    Asymmetric,
}

impl RateProfile {
    /// The name `--profile` takes and the report carries.
    pub fn name(self) -> &'static str {
        match self {
            RateProfile::Heterogeneous => "hetero",
            RateProfile::Symmetric => "sym",
            RateProfile::Asymmetric => "asym",
        }
    }

    /// The rates of `agents` agents (`seed` draws them; the heterogeneous classes ignore it).
    pub fn link_profile(self, agents: usize, seed: u64) -> LinkProfile {
        match self {
            RateProfile::Heterogeneous => LinkProfile::heterogeneous(agents),
            RateProfile::Symmetric => LinkProfile::symmetric(agents, seed),
            RateProfile::Asymmetric => LinkProfile::asymmetric(agents, seed),
        }
    }
}

/// `--drop-upload HOST@FRACTION`: agent HOST's upload halves once FRACTION of T* has passed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UploadDrop {
    /// The agent's index (0 = `agent-00`).
    pub agent: usize,
    /// When, as a share of T* after the push.
    pub fraction: f64,
}

/// `--fault`: what goes wrong during the job, and when (seconds after the push).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LabFault {
    /// `manager-restart@T`: the manager is SIGKILLed and started again at once.
    ManagerRestart {
        /// Seconds after the push.
        at: f64,
    },
    /// `manager-down=D@T`: the manager is SIGKILLed and started again D seconds later.
    ManagerDown {
        /// Seconds it stays down.
        down: f64,
        /// Seconds after the push.
        at: f64,
    },
    /// `kill-agents=K@T`: K agents (spread over the list) are SIGKILLed and started again at
    /// once, over the chunks they had stored.
    KillAgents {
        /// How many.
        count: usize,
        /// Seconds after the push.
        at: f64,
    },
}

impl LabFault {
    /// When it strikes, seconds after the push.
    fn at(self) -> f64 {
        match self {
            LabFault::ManagerRestart { at }
            | LabFault::ManagerDown { at, .. }
            | LabFault::KillAgents { at, .. } => at,
        }
    }
}

/// `--late K@T`: the last K agents start T seconds after the push.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LateStart {
    /// How many agents start late.
    pub count: usize,
    /// Seconds after the push.
    pub at: f64,
}

/// Reads a number of seconds, 0 or more.
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: seconds must be 0 or more"));
    }
    Ok(v)
}

/// Reads `--fault`: `manager-restart@T`, `manager-down=D@T` or `kill-agents=K@T`.
fn parse_fault(s: &str) -> Result<LabFault, String> {
    let usage = || {
        format!("{s:?}: expected manager-restart@T, manager-down=D@T or kill-agents=K@T (seconds)")
    };
    let (what, at) = s.split_once('@').ok_or_else(usage)?;
    let at = parse_seconds(at)?;
    let (kind, value) = match what.split_once('=') {
        Some((k, v)) => (k.trim(), Some(v)),
        None => (what.trim(), None),
    };
    match (kind, value) {
        ("manager-restart", None) => Ok(LabFault::ManagerRestart { at }),
        ("manager-down", Some(d)) => Ok(LabFault::ManagerDown {
            down: parse_seconds(d)?,
            at,
        }),
        ("kill-agents", Some(k)) => {
            let count: usize = k.trim().parse().map_err(|_| usage())?;
            if count == 0 {
                return Err(format!("{s:?}: kill at least one agent"));
            }
            Ok(LabFault::KillAgents { count, at })
        }
        _ => Err(usage()),
    }
}

/// Reads `--late K@T`.
fn parse_late(s: &str) -> Result<LateStart, String> {
    let usage = || format!("{s:?}: expected COUNT@SECONDS, e.g. 4@10");
    let (count, at) = s.split_once('@').ok_or_else(usage)?;
    let count: usize = count.trim().parse().map_err(|_| usage())?;
    if count == 0 {
        return Err(format!("{s:?}: at least one agent"));
    }
    Ok(LateStart {
        count,
        at: parse_seconds(at)?,
    })
}

/// Options of `baton lab`.
#[derive(Clone, Debug, clap::Args)]
pub struct LabArgs {
    /// Number of agents (real `baton agent` processes, one namespace each).
    #[arg(long, default_value_t = 16)]
    pub agents: usize,
    /// One-way delay added to each agent's link, in each direction, spread over MIN..MAX ms.
    #[arg(long, default_value = "1..40", value_parser = parse_delay_range, value_name = "MIN..MAX")]
    pub delay_ms: (u64, u64),
    /// Content size, e.g. 16MiB.
    #[arg(long, default_value = "16MiB", value_parser = parse_size_arg)]
    pub size: u64,
    /// Chunk size, e.g. 32KiB.
    #[arg(long, default_value = "32KiB", value_parser = parse_size_arg)]
    pub chunk_size: u64,
    /// The agents' link rates: `sym` (up = down, 512 KiB/s..2.5 MiB/s log-uniform),
    /// `asym` (up 256..1280 KiB/s, down 5× up) or `hetero` (the demo's four classes).
    #[arg(long, value_enum, default_value = "sym")]
    pub profile: RateProfile,
    /// Seed of the `sym` and `asym` rate draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Tell every agent its shaped rates (`--up-bps`/`--down-bps`); by default agents are
    /// blind and measure their links.
    #[arg(long)]
    pub declared_rates: bool,
    /// Halve agent HOST's upload (its htb rate) once FRACTION of T* has passed after the
    /// push, e.g. `0@0.33`; the report adds the lower bound with the halved rate.
    #[arg(long, value_parser = parse_upload_drop, value_name = "HOST@FRACTION")]
    pub drop_upload: Option<UploadDrop>,
    /// Print one JSON object with the results on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep the temporary directory (manager database, agents' data, logs).
    #[arg(long)]
    pub keep: bool,
    /// Give up if the job has not finished after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Most copies of the content the manager sends by plan (policy `manager_max_copies`):
    /// the lower bound counts the manager's upload (a tenth of the agents' here), so by
    /// default it sends two copies, not only the one that seeds the stripes (its fair share,
    /// about three, would leave it no slack to seed the stripes quickly).
    #[arg(long, default_value_t = 2.0)]
    pub manager_copies: f64,
    /// More policy fields for the job, as a JSON object (e.g. `{"max_stripes": 4}`).
    #[arg(long, value_parser = parse_policy_arg)]
    pub policy: Option<serde_json::Map<String, serde_json::Value>>,
    /// Chunk requests in flight per source, passed to every agent as `--window`
    /// (default: the agent's own default).
    #[arg(long)]
    pub agent_window: Option<u16>,
    /// A fault T seconds after the push: `manager-restart@T` (SIGKILL the manager, start it
    /// again at once), `manager-down=D@T` (start it again D seconds later) or
    /// `kill-agents=K@T` (SIGKILL K agents, start them again at once). The same job runs
    /// first without it, and the report gives both makespans.
    #[arg(long, value_parser = parse_fault, value_name = "FAULT@T")]
    pub fault: Option<LabFault>,
    /// The last K agents start T seconds after the push (enrolled and targeted from the
    /// start); the same job runs first without late starts.
    #[arg(long, value_parser = parse_late, value_name = "K@T")]
    pub late: Option<LateStart>,
    /// With `--fault` or `--late`: skip the fault-free run (the report has no penalty).
    #[arg(long)]
    pub no_baseline: bool,
    /// After Baton's job, run another system on the same lab, file and links, and report
    /// it beside Baton's: `bt` is a BitTorrent swarm (aria2c with opentracker; install them
    /// with scripts/bench-setup-bt.sh).
    #[arg(long, value_enum, value_name = "SYSTEM")]
    pub baseline: Option<Baseline>,
}

/// Another system `baton lab --baseline` runs on the same lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// A BitTorrent swarm: aria2c peers, an opentracker tracker (see [`super::bt`]).
    Bt,
}

/// Reads `--drop-upload HOST@FRACTION` (the agent's index, a share of T*).
fn parse_upload_drop(s: &str) -> Result<UploadDrop, String> {
    let (host, fraction) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?} is not HOST@FRACTION (e.g. 0@0.33)"))?;
    let agent = host
        .trim()
        .parse()
        .map_err(|_| format!("{host:?} is not an agent index"))?;
    let fraction: f64 = fraction
        .trim()
        .parse()
        .map_err(|_| format!("{fraction:?} is not a fraction of T*"))?;
    if !fraction.is_finite() || fraction < 0.0 {
        return Err(format!("{fraction} is not a share of T* (0 or more)"));
    }
    Ok(UploadDrop { agent, fraction })
}

/// Reads `--policy`: a JSON object of policy fields.
fn parse_policy_arg(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(format!("{s:?} is not a JSON object of policy fields")),
        Err(e) => Err(format!("{s:?} is not JSON: {e}")),
    }
}

/// Reads `MIN..MAX` (milliseconds).
fn parse_delay_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not MIN..MAX (e.g. 1..40)"))?;
    let parse = |x: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|_| format!("{x:?} is not a number of milliseconds"))
    };
    let (min, max) = (parse(a)?, parse(b)?);
    if min > max || max > 10_000 {
        return Err(format!("{s:?}: need MIN <= MAX <= 10000"));
    }
    Ok((min, max))
}

/// The one-way delay of agent `i` of `n`: spread evenly over `min..=max`, in an order
/// unrelated to the rate classes (which cycle with `i mod 4`).
pub fn agent_delay_ms(i: usize, n: usize, (min, max): (u64, u64)) -> u64 {
    if n <= 1 {
        return min;
    }
    // 7919 is prime: i ↦ 7919·i mod n is a permutation unless n is a multiple of it.
    let rank = if n.is_multiple_of(7919) {
        i
    } else {
        i * 7919 % n
    };
    min + (max - min) * rank as u64 / (n as u64 - 1)
}

/// The results `baton lab --json` prints.
#[derive(Debug, Serialize)]
pub struct LabReport {
    /// Agents started.
    pub agents: usize,
    /// Agents that confirmed with a copy matching the source's SHA-256.
    pub confirmed: usize,
    /// Content size in bytes.
    pub bytes: u64,
    /// Seconds from submission to the last confirmation (50 ms polls).
    pub makespan_seconds: f64,
    /// T* from the configured rates.
    pub lower_bound_seconds: f64,
    /// `makespan_seconds / lower_bound_seconds`.
    pub ratio: f64,
    /// Median completion, seconds after submission.
    pub p50_seconds: f64,
    /// 99th percentile completion, seconds after submission.
    pub p99_seconds: f64,
    /// `p50_seconds / lower_bound_seconds`.
    pub p50_ratio: f64,
    /// `p99_seconds / lower_bound_seconds`.
    pub p99_ratio: f64,
    /// Median over confirmed agents of completion ÷ the agent's own bound max(S/d_i, S/u_s).
    pub host_ratio_p50: f64,
    /// Largest completion ÷ own bound of any confirmed agent.
    pub host_ratio_max: f64,
    /// `p50_seconds / makespan_seconds`: how early the typical host is done.
    pub p50_over_makespan: f64,
    /// Bytes the manager sent to agents (frames, headers included).
    pub origin_bytes: u64,
    /// Sum over agents of verified content bytes received.
    pub agent_bytes_received: u64,
    /// Smallest and largest one-way delay added to an agent's link, ms.
    pub delay_ms: (u64, u64),
    /// Frames the delay forwarders dropped on a full queue.
    pub forwarder_drops: u64,
    /// The rate profile (`sym`, `asym` or `hetero`).
    pub profile: &'static str,
    /// The seed the rates were drawn from (`hetero` ignores it).
    pub seed: u64,
    /// Whether the agents were told their shaped rates (`--declared-rates`).
    pub declared_rates: bool,
    /// CPU seconds (user + system) the manager and all agents used from the push until
    /// every copy was checked.
    pub cpu_seconds_product: f64,
    /// The manager's part of `cpu_seconds_product`.
    pub cpu_seconds_manager: f64,
    /// `cpu_seconds_product` per content byte delivered (agents × size), in nanoseconds.
    pub cpu_ns_per_byte: f64,
    /// CPU seconds this lab process used during the job: the delay forwarders' threads
    /// (and the lab's status polls).
    pub cpu_seconds_lab: f64,
    /// The machine's busy share over all cores during the job (0..1, from `/proc/stat`).
    pub machine_cpu_share: f64,
    /// Median and largest time from the push (the job's submission, before the manager
    /// publishes the content) to an agent's first chunk verified from the network, seconds.
    pub push_to_first_chunk_seconds: (f64, f64),
    /// Median and largest time from an agent process's start to the manager's first
    /// `Welcome`, seconds.
    pub start_to_welcomed_seconds: (f64, f64),
    /// With `--drop-upload`: the drop and the bound that follows it.
    #[serde(flatten)]
    pub upload_drop: Option<UploadDropReport>,
    /// With `--fault` or `--late`: what happened and what it cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultReport>,
    /// With `--baseline bt`: the BitTorrent swarm's run on the same lab.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bt: Option<SwarmReport>,
    /// Each agent's command line, `baton agent …`, in agent order.
    pub agent_commands: Vec<String>,
    /// The configured rates.
    pub caps: LinkProfile,
}

/// What `--drop-upload` did and the lower bound with the halved rate.
#[derive(Debug, Serialize)]
pub struct UploadDropReport {
    /// The agent whose upload was halved (0 = `agent-00`).
    pub drop_agent: usize,
    /// Its upload before and after the drop, bytes per second.
    pub drop_upload_bps: (u64, u64),
    /// Seconds after the push the rate changed (`None`: the job ended first).
    pub drop_at_seconds: Option<f64>,
    /// The fluid lower bound with the halved rate from the drop on (T* if it never came).
    pub lower_bound_after_drop_seconds: f64,
    /// `makespan_seconds / lower_bound_after_drop_seconds`.
    pub ratio_after_drop: f64,
}

/// The BitTorrent swarm's run (`--baseline bt`), measured as Baton's is.
#[derive(Debug, Serialize)]
pub struct SwarmReport {
    /// Leechers whose copy matched the source's SHA-256.
    pub confirmed: usize,
    /// Seconds from the leechers' start to the last one's completion.
    pub makespan_seconds: f64,
    /// `makespan_seconds` over the same T* as Baton's.
    pub ratio: f64,
    /// Median completion, seconds after the start.
    pub p50_seconds: f64,
    /// `p50_seconds / makespan_seconds`.
    pub p50_over_makespan: f64,
    /// Median over agents of completion ÷ the agent's own bound.
    pub host_ratio_p50: f64,
    /// CPU seconds of the seed, the tracker and every leecher (from their start).
    pub cpu_seconds: f64,
    /// `cpu_seconds` per content byte delivered, in nanoseconds.
    pub cpu_ns_per_byte: f64,
}

/// What `--fault` or `--late` did and what it cost against the same run without it.
#[derive(Debug, Default, Serialize)]
pub struct FaultReport {
    /// The fault as given (`manager-restart@10`, `late 4@10`, ...).
    pub fault: String,
    /// Seconds after the push it struck.
    pub at_seconds: f64,
    /// For a manager fault: seconds from the SIGKILL until the new manager answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manager_gap_seconds: Option<f64>,
    /// For late starts: seconds after the push the last late agent confirmed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late_last_done_seconds: Option<f64>,
    /// The makespan of the same job without the fault (`None` with `--no-baseline`).
    pub makespan_without_seconds: Option<f64>,
    /// `makespan - makespan_without`.
    pub penalty_seconds: Option<f64>,
    /// `makespan / makespan_without - 1`.
    pub penalty_fraction: Option<f64>,
}

/// The `q`-quantile (0..=1) of `values` (nearest rank).
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Clock ticks per second of `/proc/<pid>/stat`'s CPU times (USER_HZ). `sysconf(_SC_CLK_TCK)`
/// would say, but this crate does not depend on `libc` (nor enable rustix's `param`); Linux
/// fixes USER_HZ at 100 on every architecture Baton runs on, so 100 is assumed.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system, fields 14 and 15 of `/proc/<pid>/stat`) a process has used:
/// `pid` a number or `self`. `None` if it cannot be read (the process is gone).
fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11); // field 3 is the first here
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / CLOCK_TICKS_PER_SECOND)
}

/// The machine's CPU time so far over all cores, in clock ticks (first line of `/proc/stat`).
#[derive(Clone, Copy, Debug, Default)]
struct MachineTicks {
    /// Ticks not idle and not waiting for IO.
    busy: u64,
    /// All ticks (user, nice, system, idle, iowait, irq, softirq, steal).
    total: u64,
}

impl MachineTicks {
    /// Reads `/proc/stat` now (zeros if it cannot).
    fn now() -> MachineTicks {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| MachineTicks::parse(text.lines().next()?))
            .unwrap_or_default()
    }

    /// Reads the `cpu …` line of `/proc/stat`.
    fn parse(line: &str) -> Option<MachineTicks> {
        let mut words = line.split_whitespace();
        if words.next()? != "cpu" {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let ticks: Vec<u64> = words.take(8).map_while(|w| w.parse().ok()).collect();
        if ticks.len() < 5 {
            return None;
        }
        let total: u64 = ticks.iter().sum();
        Some(MachineTicks {
            busy: total - ticks[3] - ticks[4],
            total,
        })
    }

    /// The busy share of all cores between `self` and the later `end` (0..1).
    fn busy_share_until(self, end: MachineTicks) -> f64 {
        let total = end.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        end.busy.saturating_sub(self.busy) as f64 / total as f64
    }
}

/// CPU counters taken at one moment: the manager's and every agent's, this process's, the
/// machine's.
#[derive(Clone, Debug, Default)]
struct CpuSample {
    /// Per child, manager first then the agents: CPU seconds so far (0 if unreadable).
    children: Vec<f64>,
    /// This process's CPU seconds so far.
    lab: f64,
    /// The machine's ticks so far.
    machine: MachineTicks,
}

impl CpuSample {
    /// Reads the counters of `fleet`'s children, this process and the machine now.
    fn now(fleet: &DemoProcesses) -> CpuSample {
        CpuSample {
            children: fleet
                .kids
                .iter()
                .map(|kid| process_cpu_seconds(&kid.child.id().to_string()).unwrap_or(0.0))
                .collect(),
            lab: process_cpu_seconds("self").unwrap_or(0.0),
            machine: MachineTicks::now(),
        }
    }
}

/// Runs `baton lab`.
pub fn run(args: LabArgs) -> anyhow::Result<LabReport> {
    if (args.fault.is_none() && args.late.is_none()) || args.no_baseline {
        return run_once(&args);
    }
    let calm = LabArgs {
        fault: None,
        late: None,
        baseline: None,
        ..args.clone()
    };
    if !args.json {
        println!("the same job without the fault first:");
    }
    let without = run_once(&calm)?;
    if !args.json {
        print(&without, false);
        println!("now with it:");
    }
    let mut report = run_once(&args)?;
    if let Some(f) = &mut report.fault {
        let (with, calm) = (report.makespan_seconds, without.makespan_seconds);
        f.makespan_without_seconds = Some(calm);
        f.penalty_seconds = Some(with - calm);
        f.penalty_fraction = Some(with / calm - 1.0);
    }
    Ok(report)
}

/// One lab run: the lab built, the agents started, one job, the report.
fn run_once(args: &LabArgs) -> anyhow::Result<LabReport> {
    baton::lab::require_root().map_err(|_| {
        anyhow!(
            "`baton lab` builds network namespaces, TAP devices and tc rules, so it needs root; run it as root"
        )
    })?;
    if args.agents == 0 || args.agents > baton::lab::MAX_AGENTS_PER_SEGMENT {
        bail!(
            "--agents must be 1 to {}",
            baton::lab::MAX_AGENTS_PER_SEGMENT
        );
    }
    if let Some(drop) = args.drop_upload
        && drop.agent >= args.agents
    {
        bail!(
            "--drop-upload {}@…: there are only agents 0 to {}",
            drop.agent,
            args.agents - 1
        );
    }
    if args.baseline.is_some() && args.drop_upload.is_some() {
        bail!(
            "--baseline runs on the lab after Baton's job; with --drop-upload one link would stay halved for it: use one or the other"
        );
    }
    if let Some(LabFault::KillAgents { count, .. }) = args.fault
        && count > args.agents
    {
        bail!(
            "--fault kill-agents={count}@…: there are only {} agents",
            args.agents
        );
    }
    if let Some(late) = args.late
        && late.count >= args.agents
    {
        bail!(
            "--late {}@…: at least one agent must start on time",
            late.count
        );
    }
    let mut setup = Setup::prepare("baton-lab", args.agents, args.size, args.keep)?;
    setup.profile = args.profile.link_profile(args.agents, args.seed);
    let profile = &setup.profile;
    let dir = setup.scratch.path.clone();
    let t = profile.lower_bound_seconds(args.size);

    let shapes: Vec<LinkShape> = (0..args.agents)
        .map(|i| LinkShape {
            up_bps: profile.agent_up_bps[i],
            down_bps: profile.agent_down_bps[i],
            delay: Duration::from_millis(agent_delay_ms(i, args.agents, args.delay_ms)),
        })
        .collect();
    let mut topology = Topology::spread(&shapes, 1, LinkShape::default());
    topology.manager.up_bps = profile.manager_up_bps;
    // The lab is dropped after the fleet (children die before their namespaces).
    let (lab, mut fleet) = DemoProcesses::start_in_lab(
        &topology,
        &setup.exe,
        MANAGER_PORT,
        Some(profile.manager_up_bps),
        &dir,
    )?;
    let on_time = args.agents - args.late.map_or(0, |l| l.count);
    let mut pending: Vec<(String, Command)> = Vec::new();
    for (i, id) in super::agent_ids(args.agents).iter().enumerate() {
        let node = &lab.agents[i];
        let mut cmd: Command = Lab::command(&node.ns, &setup.exe);
        cmd.args(["agent", "--listen", &format!("{}:{AGENT_PORT}", node.ip)]);
        if args.declared_rates {
            profile.cap_agent(&mut cmd, i);
        }
        if let Some(window) = args.agent_window {
            cmd.args(["--window", &window.to_string()]);
        }
        let cmd = fleet.enrol_agent(&setup.exe, id, cmd)?;
        if i < on_time {
            fleet.spawn_agent(id, cmd)?;
        } else {
            fleet.late_ids.push(id.clone());
            pending.push((id.clone(), cmd));
        }
    }
    fleet.wait_connected()?;
    for line in &fleet.agent_commands {
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    let mut policy = args.policy.clone().unwrap_or_default();
    policy.insert("manager_max_copies".into(), args.manager_copies.into());
    fleet.job_policy = Some(serde_json::Value::Object(policy));

    // The first poll follows the push: CPU counters start there, and the drop is timed from it.
    let mut start: Option<CpuSample> = None;
    let mut dropped_at: Option<f64> = None;
    let mut fault = FaultReport::default();
    let mut struck: Option<f64> = None;
    let mut late_started = false;
    let run = fleet.run_job_with(
        &setup.content,
        args.chunk_size,
        args.timeout,
        args.json,
        |fleet, elapsed| {
            if start.is_none() {
                start = Some(CpuSample::now(fleet));
            }
            if let Some(late) = args.late
                && !late_started
                && elapsed >= late.at
            {
                late_started = true;
                fleet.late_ids.clear();
                for (id, cmd) in pending.drain(..) {
                    fleet.spawn_agent(&id, cmd)?;
                }
                fault.fault = format!("late {}@{}", late.count, late.at);
                fault.at_seconds = elapsed;
                eprintln!("{} agents started at {elapsed:.2} s", late.count);
            }
            if let Some(f) = args.fault {
                strike(fleet, f, elapsed, &mut struck, &mut fault)?;
            }
            if let Some(drop) = args.drop_upload
                && dropped_at.is_none()
                && elapsed >= drop.fraction * t
            {
                let halved = profile.agent_up_bps[drop.agent] / 2;
                lab.set_agent_upload(drop.agent, halved)
                    .with_context(|| format!("cannot halve agent {}'s upload", drop.agent))?;
                dropped_at = Some(elapsed);
                if !args.json {
                    // The progress bar redraws below.
                    eprintln!(
                        "agent {}'s upload halved to {:.0} KiB/s at {elapsed:.2} s",
                        drop.agent,
                        halved as f64 / 1024.0
                    );
                }
            }
            Ok(())
        },
    )?;
    let job_end = CpuSample::now(&fleet);
    let checked = fleet.check_copies(&run, &setup.source_sha, args.json)?;
    // The children's counters once every copy is exported and checked, while they still run.
    let end = CpuSample {
        children: CpuSample::now(&fleet).children,
        ..job_end
    };
    let forwarder_drops = lab.forwarder_drops();
    let agent_commands = std::mem::take(&mut fleet.agent_commands);
    drop(fleet);
    let own_bounds = profile.own_lower_bounds_seconds(args.size);
    let bt = match args.baseline {
        Some(Baseline::Bt) => {
            if !args.json {
                println!(
                    "Baton done; now a BitTorrent swarm on the same lab (aria2c, opentracker)"
                );
            }
            let swarm = super::bt::run_swarm(
                &lab,
                &setup.content,
                &setup.source_sha,
                &dir,
                Duration::from_secs(args.timeout),
                process_cpu_seconds,
            )?;
            let done: Vec<f64> = swarm.completion.iter().flatten().copied().collect();
            let makespan = done.iter().copied().fold(0.0, f64::max);
            let p50 = quantile(&done, 0.5);
            let host_ratios: Vec<f64> = swarm
                .completion
                .iter()
                .zip(&own_bounds)
                .filter_map(|(done, bound)| Some(done.as_ref()? / bound))
                .collect();
            Some(SwarmReport {
                confirmed: swarm.confirmed,
                makespan_seconds: makespan,
                ratio: makespan / t,
                p50_seconds: p50,
                p50_over_makespan: if makespan > 0.0 { p50 / makespan } else { 0.0 },
                host_ratio_p50: quantile(&host_ratios, 0.5),
                cpu_seconds: swarm.cpu_seconds,
                cpu_ns_per_byte: swarm.cpu_seconds * 1e9 / (args.agents as f64 * args.size as f64),
            })
        }
        None => None,
    };
    drop(lab);

    let start = start.unwrap_or_default();
    let used = |i: usize| end.children[i] - start.children.get(i).copied().unwrap_or(0.0);
    let cpu_seconds_manager = used(0);
    let cpu_seconds_product: f64 = (0..end.children.len()).map(used).sum();
    let delivered = args.agents as f64 * args.size as f64;

    let done: Vec<f64> = run.completion.iter().flatten().copied().collect();
    let host_ratios: Vec<f64> = run
        .completion
        .iter()
        .zip(&own_bounds)
        .filter_map(|(done, bound)| Some(done.as_ref()? / bound))
        .collect();
    let makespan = done.iter().copied().fold(0.0, f64::max);
    if args.late.is_some() {
        fault.late_last_done_seconds = run.completion[on_time..]
            .iter()
            .flatten()
            .copied()
            .reduce(f64::max);
    }
    let (p50, p99) = (quantile(&done, 0.5), quantile(&done, 0.99));
    let upload_drop = args.drop_upload.map(|drop| {
        let before = profile.agent_up_bps[drop.agent];
        let bound = dropped_at.map_or(t, |at| {
            profile.lower_bound_after_upload_drop_seconds(args.size, drop.agent, before / 2, at)
        });
        UploadDropReport {
            drop_agent: drop.agent,
            drop_upload_bps: (before, before / 2),
            drop_at_seconds: dropped_at,
            lower_bound_after_drop_seconds: bound,
            ratio_after_drop: makespan / bound,
        }
    });
    Ok(LabReport {
        agents: args.agents,
        confirmed: checked.confirmed,
        bytes: args.size,
        makespan_seconds: makespan,
        lower_bound_seconds: t,
        ratio: makespan / t,
        p50_seconds: p50,
        p99_seconds: p99,
        p50_ratio: p50 / t,
        p99_ratio: p99 / t,
        host_ratio_p50: quantile(&host_ratios, 0.5),
        host_ratio_max: host_ratios.iter().copied().fold(0.0, f64::max),
        p50_over_makespan: if makespan > 0.0 { p50 / makespan } else { 0.0 },
        origin_bytes: checked.manager_bytes_sent,
        push_to_first_chunk_seconds: (
            quantile(&checked.push_to_first_chunk_seconds, 0.5),
            quantile(&checked.push_to_first_chunk_seconds, 1.0),
        ),
        start_to_welcomed_seconds: (
            quantile(&checked.start_to_welcomed_seconds, 0.5),
            quantile(&checked.start_to_welcomed_seconds, 1.0),
        ),
        agent_bytes_received: checked.agent_bytes_received,
        delay_ms: args.delay_ms,
        forwarder_drops,
        profile: args.profile.name(),
        seed: args.seed,
        declared_rates: args.declared_rates,
        cpu_seconds_product,
        cpu_seconds_manager,
        cpu_ns_per_byte: cpu_seconds_product * 1e9 / delivered,
        cpu_seconds_lab: end.lab - start.lab,
        machine_cpu_share: start.machine.busy_share_until(end.machine),
        upload_drop,
        fault: (args.fault.is_some() || args.late.is_some()).then_some(fault),
        bt,
        agent_commands,
        caps: setup.profile,
    })
}

/// Carries out `--fault` once its time has come: kills, and starts again at once or after
/// the downtime (`struck` holds when it struck, `report` what it did).
fn strike(
    fleet: &mut DemoProcesses,
    f: LabFault,
    elapsed: f64,
    struck: &mut Option<f64>,
    report: &mut FaultReport,
) -> anyhow::Result<()> {
    match (f, *struck) {
        (_, None) if elapsed >= f.at() => {
            *struck = Some(elapsed);
            report.at_seconds = elapsed;
            match f {
                LabFault::ManagerRestart { at } => {
                    report.fault = format!("manager-restart@{at}");
                    let t = std::time::Instant::now();
                    fleet.kill_kid(0)?;
                    fleet.restart_kid(0)?;
                    let gap = t.elapsed().as_secs_f64();
                    report.manager_gap_seconds = Some(gap);
                    eprintln!("manager killed at {elapsed:.2} s and back {gap:.2} s later");
                }
                LabFault::ManagerDown { down, at } => {
                    report.fault = format!("manager-down={down}@{at}");
                    fleet.kill_kid(0)?;
                    eprintln!("manager killed at {elapsed:.2} s, down for {down} s");
                }
                LabFault::KillAgents { count, at } => {
                    report.fault = format!("kill-agents={count}@{at}");
                    let n = fleet.ids.len();
                    let victims: Vec<usize> = (0..count).map(|k| k * n / count).collect();
                    for &i in &victims {
                        fleet.kill_kid(i + 1)?;
                    }
                    for &i in &victims {
                        fleet.restart_kid(i + 1)?;
                    }
                    eprintln!("agents {victims:?} killed and started again at {elapsed:.2} s");
                }
            }
        }
        (LabFault::ManagerDown { down, .. }, Some(at))
            if fleet.manager_stopped() && elapsed >= at + down =>
        {
            fleet.restart_kid(0)?;
            report.manager_gap_seconds = Some(elapsed - at);
            eprintln!("manager started again at {elapsed:.2} s");
        }
        _ => {}
    }
    Ok(())
}

/// Prints the report: a summary for people, and with `--json` one JSON line last.
pub fn print(report: &LabReport, json: bool) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{} of {} agents confirmed {:.1} MiB; makespan {:.2} s, T* = {:.2} s, ratio {:.3}",
        report.confirmed,
        report.agents,
        mib(report.bytes),
        report.makespan_seconds,
        report.lower_bound_seconds,
        report.ratio
    );
    println!(
        "profile {} (seed {}), agents {}; delays {}..{} ms each way",
        report.profile,
        report.seed,
        if report.declared_rates {
            "told their rates"
        } else {
            "blind to their rates"
        },
        report.delay_ms.0,
        report.delay_ms.1
    );
    println!(
        "p50 {:.2} s ({:.3} T*, {:.3} of the makespan), p99 {:.2} s ({:.3} T*); against each host's own bound: p50 {:.3}, max {:.3}",
        report.p50_seconds,
        report.p50_ratio,
        report.p50_over_makespan,
        report.p99_seconds,
        report.p99_ratio,
        report.host_ratio_p50,
        report.host_ratio_max
    );
    println!(
        "start-up: push to first chunk p50 {:.3} s, max {:.3} s; agent start to welcomed p50 {:.3} s, max {:.3} s",
        report.push_to_first_chunk_seconds.0,
        report.push_to_first_chunk_seconds.1,
        report.start_to_welcomed_seconds.0,
        report.start_to_welcomed_seconds.1
    );
    println!(
        "origin sent {:.1} MiB ({:.2}× the content)",
        mib(report.origin_bytes),
        report.origin_bytes as f64 / report.bytes.max(1) as f64
    );
    println!(
        "CPU: manager and agents {:.2} s ({:.2} s the manager), {:.2} ns per byte delivered; lab process (forwarders) {:.2} s; machine {:.0}% busy during the job",
        report.cpu_seconds_product,
        report.cpu_seconds_manager,
        report.cpu_ns_per_byte,
        report.cpu_seconds_lab,
        100.0 * report.machine_cpu_share
    );
    if let Some(f) = &report.fault {
        let mut line = format!("fault {} at {:.2} s", f.fault, f.at_seconds);
        if let Some(gap) = f.manager_gap_seconds {
            line.push_str(&format!(", manager back after {gap:.2} s"));
        }
        if let Some(last) = f.late_last_done_seconds {
            line.push_str(&format!(", last late agent done at {last:.2} s"));
        }
        if let (Some(without), Some(penalty), Some(frac)) = (
            f.makespan_without_seconds,
            f.penalty_seconds,
            f.penalty_fraction,
        ) {
            line.push_str(&format!(
                "; makespan {:.2} s against {without:.2} s without: {penalty:+.2} s ({:+.1} %)",
                report.makespan_seconds,
                100.0 * frac
            ));
        }
        println!("{line}");
    }
    if let Some(bt) = &report.bt {
        println!(
            "BitTorrent swarm (aria2c + opentracker) on the same lab: {} of {} confirmed; makespan {:.2} s, ratio {:.3} (Baton {:.3}); p50 {:.2} s ({:.3} of its makespan), against each host's own bound p50 {:.3}; CPU {:.2} s, {:.2} ns per byte",
            bt.confirmed,
            report.agents,
            bt.makespan_seconds,
            bt.ratio,
            report.ratio,
            bt.p50_seconds,
            bt.p50_over_makespan,
            bt.host_ratio_p50,
            bt.cpu_seconds,
            bt.cpu_ns_per_byte
        );
    }
    if let Some(d) = &report.upload_drop {
        match d.drop_at_seconds {
            Some(at) => println!(
                "agent {}'s upload halved ({:.0} → {:.0} KiB/s) at {at:.2} s: lower bound {:.2} s, ratio {:.3}",
                d.drop_agent,
                d.drop_upload_bps.0 as f64 / 1024.0,
                d.drop_upload_bps.1 as f64 / 1024.0,
                d.lower_bound_after_drop_seconds,
                d.ratio_after_drop
            ),
            None => println!(
                "agent {}'s upload was not halved: the job ended first",
                d.drop_agent
            ),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(report).expect("the report serialises")
        );
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn delays_cover_the_range_once_each() {
        let n = 16;
        let mut d: Vec<u64> = (0..n).map(|i| agent_delay_ms(i, n, (1, 40))).collect();
        assert_eq!(*d.iter().min().unwrap(), 1);
        assert_eq!(*d.iter().max().unwrap(), 40);
        d.sort();
        d.dedup();
        assert!(d.len() >= 15, "delays {d:?}");
        assert_eq!(parse_delay_range("1..40"), Ok((1, 40)));
        assert!(parse_delay_range("40..1").is_err());
        assert!(parse_delay_range("5").is_err());
    }

    #[test]
    fn faults_and_late_starts_read_kind_and_time() {
        assert_eq!(
            parse_fault("manager-restart@12.5"),
            Ok(LabFault::ManagerRestart { at: 12.5 })
        );
        assert_eq!(
            parse_fault("manager-down=30@10s"),
            Ok(LabFault::ManagerDown {
                down: 30.0,
                at: 10.0
            })
        );
        assert_eq!(
            parse_fault("kill-agents=3@12"),
            Ok(LabFault::KillAgents { count: 3, at: 12.0 })
        );
        for bad in [
            "manager-restart",
            "kill-agents=0@1",
            "manager-down@3",
            "reboot@1",
            "kill-agents=2@-1",
        ] {
            assert!(parse_fault(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_late("4@10"), Ok(LateStart { count: 4, at: 10.0 }));
        assert!(parse_late("0@10").is_err());
        assert!(parse_late("4").is_err());
    }

    #[test]
    fn upload_drops_read_host_at_fraction() {
        assert_eq!(
            parse_upload_drop("0@0.33"),
            Ok(UploadDrop {
                agent: 0,
                fraction: 0.33
            })
        );
        assert!(parse_upload_drop("0").is_err());
        assert!(parse_upload_drop("x@0.5").is_err());
        assert!(parse_upload_drop("1@-0.5").is_err());
    }

    #[test]
    fn cpu_counters_read_from_proc() {
        let line = "cpu  100 5 50 800 20 3 2 0 0 0";
        let start = MachineTicks::parse(line).unwrap();
        assert_eq!((start.busy, start.total), (160, 980));
        let end = MachineTicks {
            busy: 260,
            total: 1380,
        };
        assert_eq!(start.busy_share_until(end), 0.25);
        assert!(MachineTicks::parse("intr 1 2 3").is_none());
        // This test's own process has a stat file with CPU times.
        assert!(process_cpu_seconds("self").is_some());
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
    }
}
