//! `baton demo --segments K`: the demo across K LAN segments in network namespaces.
//!
//! The lab ([`baton::lab`]) puts the manager behind a router and the
//! agents, spread evenly, into K segment bridges, each behind its own WAN
//! link shaped with htb. Agents run discovery on their segment's broadcast
//! address; the demo waits until the manager has a segment report with a
//! leader from every segment, runs one job, and reads from the router's
//! counters how many bytes crossed each WAN link into its segment during
//! the job. The demo's own thread moves into the manager's namespace to
//! reach the API on the manager's loopback; everything is removed at the
//! end, also on failure (children first, then the namespaces).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use baton::lab::{Lab, LinkShape, Topology};
use serde_json::Value;

use super::{DemoArgs, DemoProcesses, DemoReport, LinkProfile, START_TIMEOUT, Setup};

/// The manager's agent port inside the lab.
pub const MANAGER_PORT: u16 = 7700;
/// Every agent's peer port inside its namespace.
pub const AGENT_PORT: u16 = 7701;
/// The UDP port of segment discovery.
pub const DISCOVERY_PORT: u16 = 7790;

/// The name the demo gives segment `s` (the agents' `--segment`).
pub fn segment_name(s: usize) -> String {
    format!("seg-{s}")
}

/// Runs `baton demo --segments K`.
pub fn run(args: DemoArgs) -> anyhow::Result<DemoReport> {
    baton::lab::require_root().map_err(|_| {
        anyhow!(
            "`baton demo --segments` builds network namespaces, links and tc rules, so it needs root; run it as root (e.g. with sudo)"
        )
    })?;
    if args.segments > args.agents {
        bail!(
            "--segments {} needs at least as many agents (--agents {})",
            args.segments,
            args.agents
        );
    }
    let setup = Setup::prepare("baton-demo-segments", args.agents, args.size, args.keep)?;
    let dir = setup.scratch.path.clone();

    // The network: agents' access links shaped to their profile, WAN links to --wan-bps.
    let shapes: Vec<LinkShape> = (0..args.agents)
        .map(|i| {
            if args.no_caps {
                LinkShape::default()
            } else {
                LinkShape {
                    up_bps: setup.profile.agent_up_bps[i],
                    down_bps: setup.profile.agent_down_bps[i],
                    delay: Duration::ZERO,
                }
            }
        })
        .collect();
    let wan = LinkShape {
        up_bps: args.wan_bps,
        down_bps: args.wan_bps,
        delay: Duration::ZERO,
    };
    let mut topology = Topology::spread(&shapes, args.segments, wan);
    if !args.no_caps {
        topology.manager.up_bps = setup.profile.manager_up_bps;
    }
    let manager_up_bps = (!args.no_caps).then_some(setup.profile.manager_up_bps);
    // The lab is dropped after the fleet (children die before their namespaces).
    let (lab, mut fleet) =
        DemoProcesses::start_in_lab(&topology, &setup.exe, MANAGER_PORT, manager_up_bps, &dir)?;
    fleet.start_agents(&setup.exe, args.agents, |i| {
        let node = &lab.agents[i];
        tracing::debug!(agent = i, segment = node.segment, ip = %node.ip, "starting agent");
        agent_command(&lab, i, &setup.exe, &setup.profile, args.no_caps)
    })?;
    let mut sizes = vec![0usize; lab.segments.len()];
    for node in &lab.agents {
        sizes[node.segment.expect("agents sit in segments")] += 1;
    }
    wait_until_segments_reported(&mut fleet, &sizes)?;
    // Leaders of a fleet still starting up (a lone first agent leads itself) do not count.
    let settled_ms = unix_ms();

    let before = lab.wan_tx_bytes_all()?;
    let run = fleet.run_job(&setup.content, args.chunk_size, args.timeout, args.json)?;
    let after = lab.wan_tx_bytes_all()?;
    let wan_bytes_max_per_segment = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .max()
        .unwrap_or(0);
    let leaders = distinct_leaders(&fleet, settled_ms)?;
    let checked = fleet.check_copies(&run, &setup.source_sha, args.json)?;
    drop(fleet);
    drop(lab);
    Ok(DemoReport {
        segments: Some(args.segments),
        leaders: Some(leaders),
        wan_bytes_max_per_segment: Some(wan_bytes_max_per_segment),
        ..DemoReport::measured(&args, setup.profile, &run, &checked)
    })
}

/// `baton agent` for lab agent `i`: its address, segment, discovery on the segment's
/// broadcast address, and (unless `no_caps`) its caps.
pub fn agent_command(
    lab: &Lab,
    i: usize,
    exe: &std::path::Path,
    profile: &LinkProfile,
    no_caps: bool,
) -> Command {
    let node = &lab.agents[i];
    let s = node.segment.expect("agents sit in segments");
    let mut cmd = Lab::command(&node.ns, exe);
    cmd.args([
        "agent",
        "--listen",
        &format!("{}:{AGENT_PORT}", node.ip),
        "--segment",
        &segment_name(s),
        "--discovery-port",
        &DISCOVERY_PORT.to_string(),
        "--discovery-broadcast",
        &lab.segments[s].broadcast.to_string(),
    ]);
    if !no_caps {
        profile.cap_agent(&mut cmd, i);
    }
    cmd
}

/// The manager's segments (`GET /api/v1/segments`), as a list.
fn segments(fleet: &DemoProcesses) -> anyhow::Result<Vec<Value>> {
    let v = fleet.api.get("/api/v1/segments").context(
        "the manager did not answer GET /api/v1/segments (does this build have segment reports?)",
    )?;
    v.as_array()
        .cloned()
        .with_context(|| format!("GET /api/v1/segments answered {v}, not a list"))
}

/// Milliseconds since the Unix epoch, the clock of the manager's leader history.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits until the manager has, from every segment `s`, a report naming a leader and
/// listing all `sizes[s]` agents of that segment (the whole fleet has found each other).
fn wait_until_segments_reported(fleet: &mut DemoProcesses, sizes: &[usize]) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        fleet.check_alive()?;
        seen = segments(fleet)?;
        let complete = sizes
            .iter()
            .enumerate()
            .filter(|&(s, &size)| {
                seen.iter().any(|seg| {
                    seg["name"] == segment_name(s).as_str()
                        && seg["leader"].is_string()
                        && seg["members"].as_array().map_or(0, Vec::len) == size
                })
            })
            .count();
        if complete == sizes.len() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "the manager did not receive, from each of the {} segments, a report with a leader and all its agents within {START_TIMEOUT:?}; it has: {}",
        sizes.len(),
        Value::Array(seen)
    )
}

/// Distinct leaders named in the segment reports the manager received since `since_ms`
/// (once every agent was up): each segment's current leader and the later leader history.
fn distinct_leaders(fleet: &DemoProcesses, since_ms: u64) -> anyhow::Result<usize> {
    let mut leaders = BTreeSet::new();
    for seg in segments(fleet)? {
        if let Some(l) = seg["leader"].as_str() {
            leaders.insert(l.to_string());
        }
        let Some(name) = seg["name"].as_str() else {
            continue;
        };
        // The history is part of the one-segment answer; without it, the current leaders count.
        if let Ok(detail) = fleet.api.get(&format!("/api/v1/segments/{name}")) {
            for entry in detail["leader_history"].as_array().into_iter().flatten() {
                if entry["since_ms"].as_u64().is_some_and(|t| t < since_ms) {
                    continue;
                }
                if let Some(l) = entry["leader"].as_str() {
                    leaders.insert(l.to_string());
                }
            }
        }
    }
    Ok(leaders.len())
}
