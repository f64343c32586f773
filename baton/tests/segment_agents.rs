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
//!
//! A second test adds a rogue: an enrolled agent (this test speaking the
//! protocol itself) placed in another segment, which broadcasts beacons and
//! member datagrams claiming the segment with the highest score and sends the
//! manager segment reports naming itself leader. Neither the real agents'
//! election nor the manager's view of the segment may change; once the
//! administrator places it in the segment (`baton agents segment`/`score`),
//! the same claims make it the leader (the positive control).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_agent_core::linux::link::{self, Limits};
use baton_protocol::discovery::{self, Announcement};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{Message, Report, SegmentMember, SegmentReport};
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::{Delay, DelayTo, LinkInfo};
use baton_test_support::fake::{id, report};
use baton_test_support::manager::BOUND;
use baton_test_support::{AgentProc, Manager, free_udp_port, run, wait_for};
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

/// Starts one agent per `(name, performance)` in `segment`, discovering each other on UDP
/// `port` (broadcast to `127.255.255.255`) with this test's beacon interval and leader
/// timeout, each writing its status to `root/NAME/status.json`.
fn spawn_segment(
    m: &Manager,
    root: &Path,
    segment: &str,
    port: u16,
    agents: &[(&str, &str)],
) -> Vec<AgentProc> {
    let port = port.to_string();
    let beacon = BEACON_MS.to_string();
    let timeout = LEADER_TIMEOUT_MS.to_string();
    agents
        .iter()
        .map(|(name, performance)| {
            let status = root.join(name).join("status.json");
            AgentProc::spawn(
                m,
                root,
                name,
                &[
                    "--segment",
                    segment,
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
        .collect()
}

/// What a failed wait shows: the manager's log, then each agent's log and segment status.
fn context(m: &Manager, agents: &[AgentProc]) -> String {
    let mut text = m.log();
    for a in agents {
        text += &format!("\n--- {}:\n{}\n{:?}", a.name, a.log(), segment_of(a));
    }
    text
}

#[test]
fn agents_elect_the_strongest_and_replace_a_killed_leader_within_the_bound() {
    let m = Manager::start_args(BATON, &["--give-up", "5"]);
    let root = tempfile::tempdir().unwrap();
    // A port of our own: other tests' agents use the default.
    let port = free_udp_port();
    // Scores differ by performance only: a2 (400) > a3 (300) > a4 (200) > a1 (100).
    let mut agents = spawn_segment(
        &m,
        root.path(),
        "lab/rack-1",
        port,
        &[("a1", "100"), ("a2", "400"), ("a3", "300"), ("a4", "200")],
    );

    // Every agent sees all four and names a2 leader; a2 knows it leads and has reported.
    wait_for(
        "all four agents elect a2",
        BOUND,
        || context(&m, &agents),
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
        || context(&m, &agents),
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
        || context(&m, &agents),
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
            context(&m, &agents)
        );
    }
    // The new leader (never leader before, so at term 0 until now) reports in its turn.
    wait_for(
        "a3 sends a segment report",
        BOUND,
        || context(&m, &agents),
        || (segment_of(&agents[2])?["term"].as_u64()? >= 1).then_some(()),
    );
    m.wait_connected(&["a1", "a3", "a4"]);
}

/// What the rogue's current session gave it: its certificate and the manager's clock.
#[derive(Clone)]
struct Certified {
    cert: AgentCert,
    manager_ms: u64,
    at: Instant,
}

impl Certified {
    fn manager_now_ms(&self) -> u64 {
        self.manager_ms + self.at.elapsed().as_millis() as u64
    }
}

/// The rogue's claims about itself: everything at its maximum.
fn rogue_member(name: &str, peers: &[&str]) -> SegmentMember {
    SegmentMember {
        id: id(name),
        score: u32::MAX,
        listen: None,
        performance: 1000,
        free_storage: u64::MAX,
        can_serve: true,
        link: LinkInfo {
            up_bps: u64::MAX,
            down_bps: u64::MAX,
            loss_ppm: 0,
            uptime_s: 0,
        },
        delays: peers
            .iter()
            .map(|p| Delay {
                to: DelayTo::Peer(id(p)),
                rtt_us: 1,
            })
            .collect(),
        last_heard_ms: 0,
    }
}

/// The rogue's manager sessions, one after another, until `stop`: each reports segment
/// `declared`, keeps the `Welcome`'s certificate in `current`, and sends a segment report
/// naming itself leader of `claimed` (with the honest agents as fabricated members) every
/// 300 ms. A session the manager closes (the administrator placed the rogue) is reopened.
async fn rogue_sessions(
    m_addr: SocketAddr,
    manager_key: baton_protocol::PublicKey,
    me: Identity,
    claimed: &'static str,
    current: Arc<Mutex<Option<Certified>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let name = "rogue";
    let mut term = 0u32;
    for _ in 0..20 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = tokio::net::TcpStream::connect(m_addr).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let hello = Hello::new(Role::Agent, id(name), baton_protocol::caps::RELAY_V1, None);
        let Ok(l) = link::connect(stream, &me, &manager_key, hello, &Limits::default()).await
        else {
            continue;
        };
        let (mut r, mut w) = l.split();
        let report = Report {
            site: "lab".try_into().unwrap(),
            segment: "rack-2".try_into().unwrap(),
            performance: 1000,
            free_storage: u64::MAX,
            ..report(name)
        };
        if w.send(&Message::Report(report).to_vec()).await.is_err() {
            continue;
        }
        let Ok(Ok(bytes)) = tokio::time::timeout(BOUND, r.recv()).await else {
            continue;
        };
        match Message::decode(bytes) {
            Ok(Message::Welcome {
                cert, unix_time, ..
            }) => {
                *current.lock().unwrap() = Some(Certified {
                    cert,
                    manager_ms: unix_time * 1000,
                    at: Instant::now(),
                })
            }
            other => panic!("the rogue expected Welcome, got {other:?}"),
        }
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                got = r.recv() => if got.is_err() { break },
                _ = tick.tick() => {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    term += 1;
                    let page = SegmentReport {
                        segment: claimed.try_into().unwrap(),
                        leader: id(name),
                        term,
                        page: 0,
                        pages: 1,
                        members: [
                            rogue_member(name, &["h1", "h2"]),
                            rogue_member("h1", &[name]),
                            rogue_member("h2", &[name]),
                        ]
                        .into_iter()
                        .collect(),
                    };
                    if w.send(&Message::SegmentReport(page).to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// Broadcasts the rogue's beacon and member datagram (segment `claimed`, score `u32::MAX`,
/// naming itself leader) every 200 ms until `stop`.
fn rogue_datagrams(
    me: Identity,
    port: u16,
    claimed: &'static str,
    current: Arc<Mutex<Option<Certified>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    socket.set_broadcast(true).unwrap();
    let to = SocketAddr::from((Ipv4Addr::new(127, 255, 255, 255), port));
    let mut seq = 1u64;
    let mut buf = [0u8; discovery::MAX_DATAGRAM];
    for _ in 0..1000 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(c) = current.lock().unwrap().clone() {
            for body in [
                Announcement::Beacon {
                    segment: claimed.try_into().unwrap(),
                    score: u32::MAX,
                    listen: None,
                    leader: Some(id("rogue")),
                },
                Announcement::Member(rogue_member("rogue", &[])),
            ] {
                let n = discovery::seal(&me, &c.cert, seq, c.manager_now_ms(), &body, &mut buf)
                    .unwrap();
                seq += 1;
                let _ = socket.send_to(&buf[..n], to);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The manager's view of segment `name`: its leader and sorted member ids.
fn segment_view(m: &Manager, name: &str) -> Option<(String, Vec<String>)> {
    let (status, view) = m.api("GET", &format!("/api/v1/segments/{name}"), None);
    if status != 200 {
        return None;
    }
    let leader = view["leader"].as_str()?.to_string();
    let mut members: Vec<String> = view["members"]
        .as_array()?
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect();
    members.sort();
    Some((leader, members))
}

/// `baton agents ARGS…` against manager `m`.
fn agents_cli(m: &Manager, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(BATON);
    cmd.arg("agents")
        .args(args)
        .env("BATON_DATA_DIR", m.data_dir());
    let out = run(cmd, BOUND);
    assert!(out.success, "baton agents {args:?}: {out:?}");
    out.stdout
}

#[test]
fn an_agent_placed_in_another_segment_neither_leads_it_nor_enters_its_report() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let agents = spawn_segment(
        &m,
        root.path(),
        "rack-1",
        port,
        &[("h1", "100"), ("h2", "300")],
    );
    let honest = || {
        (
            Some("h2".to_string()),
            vec!["h1".to_string(), "h2".to_string()],
        )
    };
    let elected = |agents: &[AgentProc], leader: &str, members: u64| {
        agents.iter().all(|a| {
            segment_of(a).is_some_and(|s| s["leader"] == leader && s["members"] == members)
        })
    };
    // Without the rogue: h2 leads both, and the manager holds h2's report of h1 and h2.
    wait_for(
        "h1 and h2 elect h2 and the manager stores its report",
        BOUND,
        || context(&m, &agents),
        || {
            (elected(&agents, "h2", 2)
                && segment_view(&m, "rack-1").map(|(l, ms)| (Some(l), ms)) == Some(honest()))
            .then_some(())
        },
    );

    // The rogue: enrolled, placed in rack-2 by its first report, claiming rack-1.
    let me = Identity::from_seed([66; 32]);
    m.enrol("rogue", &me.public());
    let current: Arc<Mutex<Option<Certified>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(rogue_sessions(
        m.agent_addr(),
        m.key(),
        me.clone(),
        "rack-1",
        current.clone(),
        stop.clone(),
    ));
    let sender = {
        let (me, current, stop) = (me.clone(), current.clone(), stop.clone());
        std::thread::spawn(move || rogue_datagrams(me, port, "rack-1", current, stop))
    };
    let cert_segment = || {
        current
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.cert.segment.to_string())
    };
    wait_for(
        "the rogue is welcomed",
        BOUND,
        || m.log(),
        || cert_segment().filter(|s| s == "rack-2"),
    );
    // For 10 beacon intervals of claims, nothing changes, at any sample.
    let watched = Instant::now();
    let mut samples = 0;
    while watched.elapsed() < Duration::from_millis(10 * BEACON_MS) {
        assert!(
            elected(&agents, "h2", 2),
            "the rogue changed the election\n{}",
            context(&m, &agents)
        );
        assert_eq!(
            segment_view(&m, "rack-1").map(|(l, ms)| (Some(l), ms)),
            Some(honest()),
            "the rogue changed the manager's view\n{}",
            context(&m, &agents)
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(samples >= 10);
    let (_, metrics) = m.api("GET", "/metrics", None);
    let refused = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("baton_segment_report_refusals_total{what=\"pages\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        refused >= 5,
        "the rogue's reports were not refused: {refused}\n{metrics}"
    );
    let log = m.log();
    let warnings = log.matches("segment report refused").count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings for {refused} refused reports (spaced to one per 10 s)"
    );

    // Positive control: placed in rack-1 with the highest score, the same claims lead.
    agents_cli(&m, &["score", "rogue", &u32::MAX.to_string()]);
    let out = agents_cli(&m, &["segment", "rogue", "rack-1"]);
    assert!(out.contains("rack-1"), "{out}");
    wait_for(
        "the rogue is re-welcomed in rack-1",
        BOUND,
        || m.log(),
        || cert_segment().filter(|s| s == "rack-1"),
    );
    wait_for(
        "with its placement, the rogue leads and the manager takes its report",
        BOUND,
        || context(&m, &agents),
        || {
            (elected(&agents, "rogue", 3)
                && segment_view(&m, "rack-1").is_some_and(|(l, _)| l == "rogue"))
            .then_some(())
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    rt.shutdown_timeout(Duration::from_secs(2));
}
