//! `baton lab`: N real agents and a manager in network namespaces, heterogeneous shaped and
//! delayed links, measured against the Kumar–Ross lower bound.
//!
//! Every agent gets the rates of [`LinkProfile::heterogeneous`] (uploads and
//! downloads differing 4×), shaped with htb on its access link, and a one-way
//! delay from `--delay-ms MIN..MAX` added in each direction by the lab's
//! userspace TAP forwarder (this kernel has no `netem`). The manager's uplink
//! is shaped to the profile's manager rate. Agents also know their rates
//! (`--up-bps`/`--down-bps`, equal to the shaped rates) unless `--tc-only`.
//! One job of `--size` bytes runs to every agent; the report gives the
//! makespan (the last confirmation), T* = max(S/u_s, S/d_min, N·S/(u_s + Σu_i))
//! from the configured rates, their ratio, p50 and p99 completion (also as
//! ratios to T*), and the bytes the manager sent (origin egress).

use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail};
use baton::lab::{Lab, LinkShape, Topology};
use serde::Serialize;

use super::segments::{AGENT_PORT, MANAGER_PORT};
use super::{DemoProcesses, LinkProfile, Setup, parse_size_arg};

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
    /// Shape links with tc only: agents are not told their rates and measure them.
    #[arg(long)]
    pub tc_only: bool,
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
    /// Bytes the manager sent to agents (frames, headers included).
    pub origin_bytes: u64,
    /// Sum over agents of verified content bytes received.
    pub agent_bytes_received: u64,
    /// Smallest and largest one-way delay added to an agent's link, ms.
    pub delay_ms: (u64, u64),
    /// Frames the delay forwarders dropped on a full queue.
    pub forwarder_drops: u64,
    /// Whether the agents were told their rates (`false` with `--tc-only`).
    pub agents_know_rates: bool,
    /// The configured rates.
    pub caps: LinkProfile,
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

/// Runs `baton lab`.
pub fn run(args: LabArgs) -> anyhow::Result<LabReport> {
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
    let setup = Setup::prepare("baton-lab", args.agents, args.size, args.keep)?;
    let dir = setup.scratch.path.clone();

    let shapes: Vec<LinkShape> = (0..args.agents)
        .map(|i| LinkShape {
            up_bps: setup.profile.agent_up_bps[i],
            down_bps: setup.profile.agent_down_bps[i],
            delay: Duration::from_millis(agent_delay_ms(i, args.agents, args.delay_ms)),
        })
        .collect();
    let mut topology = Topology::spread(&shapes, 1, LinkShape::default());
    topology.manager.up_bps = setup.profile.manager_up_bps;
    // The lab is dropped after the fleet (children die before their namespaces).
    let (lab, mut fleet) = DemoProcesses::start_in_lab(
        &topology,
        &setup.exe,
        MANAGER_PORT,
        Some(setup.profile.manager_up_bps),
        &dir,
    )?;
    fleet.start_agents(&setup.exe, args.agents, |i| {
        let node = &lab.agents[i];
        let mut cmd: Command = Lab::command(&node.ns, &setup.exe);
        cmd.args(["agent", "--listen", &format!("{}:{AGENT_PORT}", node.ip)]);
        if !args.tc_only {
            setup.profile.cap_agent(&mut cmd, i);
        }
        if let Some(window) = args.agent_window {
            cmd.args(["--window", &window.to_string()]);
        }
        cmd
    })?;
    let mut policy = args.policy.clone().unwrap_or_default();
    policy.insert("manager_max_copies".into(), args.manager_copies.into());
    fleet.job_policy = Some(serde_json::Value::Object(policy));
    let run = fleet.run_job(&setup.content, args.chunk_size, args.timeout, args.json)?;
    let checked = fleet.check_copies(&run, &setup.source_sha, args.json)?;
    let forwarder_drops = lab.forwarder_drops();
    drop(fleet);
    drop(lab);

    let done: Vec<f64> = run.completion.iter().flatten().copied().collect();
    let t = setup.profile.lower_bound_seconds(args.size);
    let makespan = done.iter().copied().fold(0.0, f64::max);
    let (p50, p99) = (quantile(&done, 0.5), quantile(&done, 0.99));
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
        origin_bytes: checked.manager_bytes_sent,
        agent_bytes_received: checked.agent_bytes_received,
        delay_ms: args.delay_ms,
        forwarder_drops,
        agents_know_rates: !args.tc_only,
        caps: setup.profile,
    })
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
        "p50 {:.2} s ({:.3} T*), p99 {:.2} s ({:.3} T*); origin sent {:.1} MiB ({:.2}× the content); delays {}..{} ms each way",
        report.p50_seconds,
        report.p50_ratio,
        report.p99_seconds,
        report.p99_ratio,
        mib(report.origin_bytes),
        report.origin_bytes as f64 / report.bytes.max(1) as f64,
        report.delay_ms.0,
        report.delay_ms.1
    );
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
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
    }
}
