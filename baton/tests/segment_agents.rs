//! Segment discovery end to end: a real `baton serve` and four real `baton agent`
//! processes on one host.
//!
//! The agents share a discovery port chosen for this test and broadcast to
//! `127.255.255.255`: on Linux every socket bound to that port on any address
//! receives such a broadcast, so agents on loopback find each other without
//! root (each sends from its own ephemeral port, so unicast probes and member
//! reports reach one agent only). The test watches each agent's status file:
//! every agent elects the one with the highest capability score; after that
//! leader is killed with SIGKILL, every survivor names the next one within
//! the configured bound (leader timeout + beacon interval).

use std::time::{Duration, Instant};

use baton_test_support::manager::BOUND;
use baton_test_support::{AgentProc, Manager, free_udp_port, wait_for};
use serde_json::Value;

/// The `baton` executable under test.
const BATON: &str = env!("CARGO_BIN_EXE_baton");

const BEACON_MS: u64 = 400;
const LEADER_TIMEOUT_MS: u64 = 1600;
/// Time from an agent's election to its status file showing it, and the 20 ms
/// polling of this test: the status file is rewritten in the same loop turn as the
/// leader-change event, so this covers process scheduling on a loaded machine.
const OBSERVATION_SLACK: Duration = Duration::from_millis(400);

fn segment_of(agent: &AgentProc) -> Option<Value> {
    agent
        .status("status.json")
        .map(|s| s["segment"].clone())
        .filter(|s| !s.is_null())
}

#[test]
fn agents_elect_the_strongest_and_replace_a_killed_leader_within_the_bound() {
    let m = Manager::start_args(BATON, &["--give-up", "5"]);
    let root = tempfile::tempdir().unwrap();
    // A port of our own: other tests' agents use the default.
    let port = free_udp_port().to_string();
    let beacon = BEACON_MS.to_string();
    let timeout = LEADER_TIMEOUT_MS.to_string();
    // Scores differ by performance only: a2 (400) > a3 (300) > a4 (200) > a1 (100).
    let mut agents: Vec<AgentProc> = [("a1", "100"), ("a2", "400"), ("a3", "300"), ("a4", "200")]
        .iter()
        .map(|(name, performance)| {
            let status = root.path().join(name).join("status.json");
            AgentProc::spawn(
                &m,
                root.path(),
                name,
                &[
                    "--segment",
                    "lab/rack-1",
                    "--performance",
                    performance,
                    "--up-bps",
                    "100MiB",
                    "--down-bps",
                    "100MiB",
                    "--discovery-port",
                    &port,
                    "--discovery-broadcast",
                    "127.255.255.255",
                    "--beacon-interval-ms",
                    &beacon,
                    "--leader-timeout-ms",
                    &timeout,
                    "--status-file",
                    status.to_str().unwrap(),
                ],
            )
        })
        .collect();
    let context = |agents: &[AgentProc]| {
        let mut text = m.log();
        for a in agents {
            text += &format!("\n--- {}:\n{}\n{:?}", a.name, a.log(), segment_of(a));
        }
        text
    };

    // Every agent sees all four and names a2 leader; a2 knows it leads and has reported.
    wait_for(
        "all four agents elect a2",
        BOUND,
        || context(&agents),
        || {
            agents
                .iter()
                .all(|a| {
                    segment_of(a).is_some_and(|s| {
                        s["leader"] == "a2"
                            && s["members"] == 4
                            && s["name"] == "lab/rack-1"
                            && s["is_leader"] == (a.name == "a2")
                    })
                })
                .then_some(())
        },
    );
    let leader = segment_of(&agents[1]).unwrap();
    wait_for(
        "a2 sends a segment report",
        BOUND,
        || context(&agents),
        || (segment_of(&agents[1])?["term"].as_u64()? >= 1).then_some(()),
    );
    assert!(leader["score"].as_u64() > segment_of(&agents[2]).unwrap()["score"].as_u64());
    // The manager keeps every session while the leader sends reports.
    m.wait_connected(&["a1", "a2", "a3", "a4"]);

    // Kill the leader; every survivor must name a3 within the bound.
    agents[1].kill();
    let killed = Instant::now();
    let bound = Duration::from_millis(LEADER_TIMEOUT_MS + BEACON_MS);
    let survivors = [0, 2, 3];
    let mut elected_after: [Option<Duration>; 3] = [None; 3];
    wait_for(
        "survivors elect a3",
        bound + OBSERVATION_SLACK + Duration::from_secs(5),
        || context(&agents),
        || {
            for (k, &i) in survivors.iter().enumerate() {
                if elected_after[k].is_none()
                    && segment_of(&agents[i]).is_some_and(|s| {
                        s["leader"] == "a3" && s["members"] == 3 && s["is_leader"] == (i == 2)
                    })
                {
                    elected_after[k] = Some(killed.elapsed());
                }
            }
            elected_after.iter().all(Option::is_some).then_some(())
        },
    );
    for (k, &i) in survivors.iter().enumerate() {
        let after = elected_after[k].unwrap();
        eprintln!(
            "{} named a3 {after:?} after the kill (bound {bound:?})",
            agents[i].name
        );
        assert!(
            after <= bound + OBSERVATION_SLACK,
            "{} named the new leader {after:?} after the kill; bound {bound:?} (+{OBSERVATION_SLACK:?} to observe)\n{}",
            agents[i].name,
            context(&agents)
        );
    }
    // The new leader (never leader before, so at term 0 until now) reports in its turn.
    wait_for(
        "a3 sends a segment report",
        BOUND,
        || context(&agents),
        || (segment_of(&agents[2])?["term"].as_u64()? >= 1).then_some(()),
    );
    m.wait_connected(&["a1", "a3", "a4"]);
}
