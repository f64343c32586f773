//! Segments in network namespaces (needs root; fails, never skips, without it).
//!
//! - `lab_plumbing`: the lab library itself: addresses and routes across the
//!   router, broadcast confined to its segment, the htb rate of a WAN link
//!   measured by a real transfer and seen in the router's counter, the
//!   userspace delay on a TAP link, and removal of everything afterwards
//!   (and of a crashed run's leftovers).
//! - `killed_leader_is_replaced_and_the_job_completes`: real `baton serve` and
//!   `baton agent` processes in three segments; the leader of one segment is
//!   killed mid-job; a new leader must be reported within the configured bound
//!   and every live agent must still confirm.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton::lab::{Lab, LinkShape, SegmentSpec, Topology, netns};
use baton_test_support::{Output, Proc, read_text, run, wait_for};
use serde_json::Value;

/// The `baton` executable under test.
const BATON: &str = env!("CARGO_BIN_EXE_baton");

fn require_root() {
    assert!(
        baton::lab::require_root().is_ok(),
        "these tests build network namespaces and must run as root"
    );
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        netns::enter(&ns).expect("enter namespace");
        f()
    })
}

/// The median round trip of a UDP echo from namespace `from` to `to_ns` (address `to`), in ms.
fn udp_rtt_ms(from: &str, to_ns: &str, to: Ipv4Addr) -> f64 {
    let echo = in_ns(to_ns, || {
        let s = UdpSocket::bind("0.0.0.0:7798").expect("bind the echo port");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            let Ok((n, peer)) = s.recv_from(&mut buf) else {
                return;
            };
            s.send_to(&buf[..n], peer).unwrap();
        }
    });
    let rtts = in_ns(from, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..20u8 {
            let start = Instant::now();
            s.send_to(&[i], (to, 7798)).unwrap();
            // The echo may not be bound yet: a lost probe is retried.
            if let Ok((1, _)) = s.recv_from(&mut buf)
                && buf[0] == i
            {
                rtts.push(start.elapsed().as_secs_f64() * 1000.0);
                if rtts.len() == 5 {
                    break;
                }
            }
        }
        rtts
    })
    .join()
    .unwrap();
    echo.join().unwrap();
    assert!(rtts.len() >= 3, "no UDP echo from {to} to {from}");
    let mut rtts = rtts;
    rtts.sort_by(f64::total_cmp);
    rtts[rtts.len() / 2]
}

#[test]
fn lab_plumbing() {
    require_root();
    // A leftover of a "crashed run": a pid that cannot exist (above pid_max).
    let stale = format!("{}99999999-0-r", netns::PREFIX);
    netns::add(&stale).expect("create a stale namespace");

    let rate = 2 * 1024 * 1024;
    let topology = Topology {
        manager: LinkShape::default(),
        segments: vec![
            SegmentSpec {
                agents: vec![
                    LinkShape::default(),
                    LinkShape {
                        delay: Duration::from_millis(20),
                        ..LinkShape::default()
                    },
                    LinkShape::default(),
                ],
                wan: LinkShape::default(),
            },
            SegmentSpec {
                agents: vec![LinkShape::default()],
                wan: LinkShape {
                    down_bps: rate,
                    ..LinkShape::default()
                },
            },
        ],
    };
    let lab = Lab::build(&topology).expect("build the lab");
    assert!(
        !netns::lab_namespaces().contains(&stale),
        "the stale namespace was not removed"
    );
    let names: Vec<String> = lab.namespaces().to_vec();
    assert_eq!(names.len(), 1 + 1 + 2 + 4);

    // Across the router: agent → manager, agent → agent in another segment.
    let a0 = lab.agents[0].clone();
    let delayed = lab.agents[1].clone();
    let far = lab.agents[3].clone();
    assert!(udp_rtt_ms(&a0.ns, &lab.manager.ns, lab.manager.ip) < 15.0);
    assert!(udp_rtt_ms(&a0.ns, &far.ns, far.ip) < 15.0);
    // The TAP link adds 20 ms each way.
    let rtt = udp_rtt_ms(&delayed.ns, &lab.manager.ns, lab.manager.ip);
    eprintln!("round trip over the 20 ms TAP link: {rtt:.1} ms");
    assert!((40.0..80.0).contains(&rtt), "delayed rtt {rtt} ms");

    // Broadcast reaches the segment and nothing beyond it.
    let listen = |node: &baton::lab::Node| {
        in_ns(&node.ns, || {
            let s = UdpSocket::bind("0.0.0.0:7790").expect("bind 7790");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 64];
            s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
        })
    };
    let near = listen(&lab.agents[2]);
    let beyond = listen(&far);
    std::thread::sleep(Duration::from_millis(300)); // listeners bind; there is no event to await across namespaces
    let broadcast = lab.segments[0].broadcast;
    in_ns(&a0.ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_broadcast(true).unwrap();
        for _ in 0..3 {
            s.send_to(b"hello segment", (broadcast, 7790)).unwrap();
        }
    })
    .join()
    .unwrap();
    assert_eq!(near.join().unwrap().as_deref(), Some(&b"hello segment"[..]));
    assert_eq!(beyond.join().unwrap(), None, "broadcast crossed the router");

    // The WAN link into segment 1 is shaped: a bulk transfer from the manager runs at its rate.
    let before = lab.wan_tx_bytes(1).unwrap();
    let bytes: usize = 6 * 1024 * 1024;
    let server = in_ns(&far.ns, || {
        let l = TcpListener::bind("0.0.0.0:7799").unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        let start = Instant::now();
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        (total, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let to = SocketAddr::from((far.ip, 7799));
    in_ns(&lab.manager.ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        let chunk = vec![7u8; 1 << 16];
        for _ in 0..bytes / chunk.len() {
            s.write_all(&chunk).unwrap();
        }
    })
    .join()
    .unwrap();
    let (received, elapsed) = server.join().unwrap();
    assert_eq!(received, bytes);
    let measured = received as f64 / elapsed.as_secs_f64();
    assert!(
        (0.8 * rate as f64..1.1 * rate as f64).contains(&measured),
        "measured {measured:.0} B/s through a {rate} B/s link"
    );
    let forwarded = lab.wan_tx_bytes(1).unwrap() - before;
    eprintln!(
        "WAN link of {rate} B/s: measured {measured:.0} B/s, router counted {forwarded} B for {bytes} B"
    );
    assert!(
        forwarded >= bytes as u64 && forwarded < bytes as u64 * 11 / 10,
        "the router counted {forwarded} bytes into the segment for {bytes} bytes of payload"
    );

    drop(lab);
    let left = netns::lab_namespaces();
    for name in &names {
        assert!(!left.contains(name), "{name} survived the lab");
    }
    let out = Command::new("ip").args(["link", "show"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(" a1:"),
        "a lab link leaked into the host namespace"
    );
}

/// The manager's HTTP API with the admin token.
struct Api {
    base: String,
    token: String,
}

impl Api {
    fn call(&self, path: &str, body: Option<Value>) -> Value {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let mut resp = match &body {
            None => agent.get(&url).header("Authorization", &auth).call(),
            Some(b) => agent.post(&url).header("Authorization", &auth).send_json(b),
        }
        .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        assert!(
            (200..300).contains(&status),
            "{path} answered {status}: {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }

    fn get(&self, path: &str) -> Value {
        self.call(path, None)
    }

    /// The leader the manager has for segment `name`.
    fn leader_of(&self, name: &str) -> Option<String> {
        self.get("/api/v1/segments")
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)?["leader"]
            .as_str()
            .map(str::to_string)
    }
}

/// A manager and agents running in a lab's namespaces; the test thread lives in the
/// manager's namespace.
struct LabFleet {
    dir: tempfile::TempDir,
    api: Api,
    agent_addr: String,
    manager_key: String,
    /// The root key (hex) agents pin.
    root_key: String,
    /// The manager first.
    procs: Vec<Proc>,
}

/// How long any single wait in these tests may take.
const BOUND: Duration = Duration::from_secs(60);

impl LabFleet {
    /// Starts `baton serve` in the manager's namespace (the calling thread must be in it too).
    fn start(lab: &Lab, give_up_s: u64) -> LabFleet {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready.json");
        // The fleet's root and publisher keys and trust document; agents pin the root.
        let kit = baton_test_support::TrustKit::in_dir(&dir.path().join("trust"));
        let mut cmd = Lab::command(&lab.manager.ns, BATON);
        cmd.args(["serve", "--trust"])
            .arg(kit.trust_file())
            .arg("--publisher-key")
            .arg(kit.publisher_key_file())
            .arg("--data-dir")
            .arg(dir.path().join("manager"))
            .args(["--listen", &format!("{}:7700", lab.manager.ip)])
            .args(["--http", "127.0.0.1:0", "--give-up", &give_up_s.to_string()])
            .arg("--content-dir")
            .arg(dir.path())
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info");
        let manager = Proc::spawn("manager", cmd, &dir.path().join("manager.log"));
        let mut fleet = LabFleet {
            dir,
            api: Api {
                base: String::new(),
                token: String::new(),
            },
            agent_addr: String::new(),
            manager_key: String::new(),
            root_key: kit.root_hex(),
            procs: vec![manager],
        };
        let info: Value = fleet.wait("the manager's ready file", |_, _| {
            std::fs::read(&ready)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        });
        let field = |k: &str| info[k].as_str().expect("ready field").to_string();
        fleet.api = Api {
            base: format!("http://{}", field("http_addr")),
            token: field("admin_token"),
        };
        fleet.agent_addr = field("agent_addr");
        fleet.manager_key = field("manager_key");
        fleet
    }

    /// Polls `f(api, dir)` until it gives a value; panics with the manager's log after
    /// [`BOUND`], or with a process's log when that process exits.
    fn wait<T>(&mut self, what: &str, mut f: impl FnMut(&Api, &Path) -> Option<T>) -> T {
        let (api, dir, procs) = (&self.api, self.dir.path(), &mut self.procs);
        let waiting = format!("waiting for {what}");
        wait_for(
            what,
            BOUND,
            || format!("manager log:\n{}", read_text(&dir.join("manager.log"))),
            || {
                for p in procs.iter_mut() {
                    p.assert_running(&waiting);
                }
                f(api, dir)
            },
        )
    }

    /// Enrols and starts agent `id` in lab node `node` with discovery on its segment.
    fn start_agent(&mut self, lab: &Lab, node: usize, id: &str, extra: &[&str]) {
        let data = self.dir.path().join(id);
        let out = Command::new(BATON)
            .args(["agent", "--print-key", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "--print-key failed");
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.api.call(
            "/api/v1/agents",
            Some(serde_json::json!({ "id": id, "key": key })),
        );
        let n = &lab.agents[node];
        let s = n.segment.unwrap();
        let mut cmd = Lab::command(&n.ns, BATON);
        cmd.args(["agent", "--listen", &format!("{}:7701", n.ip)])
            .args([
                "--manager",
                &self.agent_addr,
                "--manager-key",
                &self.manager_key,
                "--root-key",
                &self.root_key,
            ])
            .args(["--id", id, "--segment", &format!("seg-{s}")])
            .args(["--discovery-port", "7790", "--discovery-broadcast"])
            .arg(lab.segments[s].broadcast.to_string())
            .args(extra)
            .arg("--data-dir")
            .arg(&data)
            .arg("--export")
            .arg(data.join("export.bin"))
            .arg("--status-file")
            .arg(data.join("status.json"))
            .env("RUST_LOG", "info");
        let log = self.dir.path().join(format!("{id}.log"));
        self.procs.push(Proc::spawn(id, cmd, &log));
    }

    fn kill(&mut self, id: &str) {
        let index = self
            .procs
            .iter()
            .position(|p| p.label == id)
            .expect("known process");
        // Dropping kills and reaps it; later liveness checks no longer see it.
        drop(self.procs.remove(index));
    }
}

/// The agent's status file, if it parses.
fn status_of(dir: &Path, id: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(id).join("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

#[test]
fn killed_leader_is_replaced_and_the_job_completes() {
    require_root();
    const BEACON_MS: u64 = 300;
    const LEADER_TIMEOUT_MS: u64 = 1500;
    // From the election to the manager's answer: the new leader's first report (sent when
    // it takes over, or on its next report tick) and our 20 ms polls.
    const REPORT_ALLOWANCE_MS: u64 = 1500;
    const SIZE: usize = 12 * 1024 * 1024;
    let per_segment = 4;
    let rate = 1024 * 1024;
    let agent = LinkShape {
        up_bps: rate,
        down_bps: rate,
        delay: Duration::ZERO,
    };
    let topology = Topology {
        manager: LinkShape {
            up_bps: rate,
            ..LinkShape::default()
        },
        segments: vec![
            SegmentSpec {
                agents: vec![agent; per_segment],
                wan: LinkShape::default(),
            };
            2
        ],
    };
    let lab = Lab::build(&topology).expect("build the lab");
    netns::enter(&lab.manager.ns).unwrap();
    let mut fleet = LabFleet::start(&lab, 8);
    let ids: Vec<String> = (0..lab.agents.len())
        .map(|i| format!("agent-{i}"))
        .collect();
    let (beacon, timeout) = (BEACON_MS.to_string(), LEADER_TIMEOUT_MS.to_string());
    let extra = [
        "--beacon-interval-ms",
        &beacon,
        "--leader-timeout-ms",
        &timeout,
        "--up-bps",
        "1MiB",
        "--down-bps",
        "1MiB",
    ];
    for (i, id) in ids.iter().enumerate() {
        fleet.start_agent(&lab, i, id, &extra);
    }
    let all = ids.clone();
    fleet.wait("every agent connected", |api, _| {
        let agents = api.get("/api/v1/agents");
        let list = agents.as_array()?;
        all.iter()
            .all(|id| {
                list.iter()
                    .any(|a| a["id"] == id.as_str() && a["connected"] == true)
            })
            .then_some(())
    });
    let leader = fleet.wait("a leader reported for both segments", |api, _| {
        let first = api.leader_of("seg-0")?;
        api.leader_of("seg-1")?;
        Some(first)
    });
    assert!(
        ids[..per_segment].contains(&leader),
        "segment 0's leader {leader} is not one of its agents"
    );
    let led = leader.clone();
    fleet.wait("the leader's own status naming it leader", |_, dir| {
        (status_of(dir, &led)?["segment"]["is_leader"] == true).then_some(())
    });

    // The job: 12 MiB at 1 MiB/s per agent takes well over ten seconds.
    let content = fleet.dir.path().join("content.bin");
    let bytes: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&content, &bytes).unwrap();
    let job = fleet.api.call(
        "/api/v1/jobs",
        Some(serde_json::json!({
            "path": content, "name": "leader-kill", "chunk_size": 32 * 1024,
            "targets": { "agents": ids },
        })),
    );
    let job_id = job["id"].as_u64().expect("job id");
    // Mid-job: the leader holds some chunks, not all.
    let led = leader.clone();
    fleet.wait("the leader to be part-way through the job", |api, _| {
        let job = api.get(&format!("/api/v1/jobs/{job_id}"));
        let p = job["participants"]
            .as_array()?
            .iter()
            .find(|p| p["agent"] == led.as_str())?
            .clone();
        let (v, t) = (p["verified"].as_u64()?, p["total"].as_u64()?);
        (v > 0 && v < t / 2).then_some(())
    });
    fleet.kill(&leader);
    let killed_at = Instant::now();
    let gone = leader.clone();
    let new_leader = fleet.wait("a new leader for segment 0", |api, _| {
        api.leader_of("seg-0").filter(|l| *l != gone)
    });
    let took = killed_at.elapsed();
    let bound = Duration::from_millis(LEADER_TIMEOUT_MS + BEACON_MS + REPORT_ALLOWANCE_MS);
    eprintln!("leader {leader} killed; {new_leader} reported after {took:?} (bound {bound:?})");
    assert!(
        took <= bound,
        "the new leader was reported after {took:?}, beyond {bound:?}"
    );
    assert!(ids[..per_segment].contains(&new_leader));
    let nl = new_leader.clone();
    fleet.wait("the new leader's own status naming it leader", |_, dir| {
        (status_of(dir, &nl)?["segment"]["is_leader"] == true).then_some(())
    });

    // Every live agent confirms and holds the content; the killed one is given up.
    let job = fleet.wait("the job to finish", |api, _| {
        let job = api.get(&format!("/api/v1/jobs/{job_id}"));
        let parts = job["participants"].as_array()?;
        parts
            .iter()
            .all(|p| matches!(p["state"].as_str(), Some("confirmed" | "failed")))
            .then(|| job.clone())
    });
    for id in &ids {
        let p = job["participants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["agent"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is not in the job: {job}"));
        if *id == leader {
            continue;
        }
        assert_eq!(p["state"], "confirmed", "{id}: {p}");
        let export = fleet.dir.path().join(id).join("export.bin");
        let copy = fleet.wait("an exported copy", |_, _| std::fs::read(&export).ok());
        assert!(copy == bytes, "{id}'s copy differs from the content");
    }
    drop(fleet);
    drop(lab);
}

/// Runs `baton args…` (within 240 s), which must succeed; returns the run and the JSON
/// object on the last line of its stdout.
fn run_json(args: &[&str]) -> (Output, Value) {
    let mut cmd = Command::new(BATON);
    cmd.args(args);
    let run = run(cmd, Duration::from_secs(240));
    assert!(
        run.success,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    let line = run.stdout.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {}", run.stdout));
    eprintln!("{report}");
    (run, report)
}

#[test]
fn demo_across_segments_reports_leaders_and_wan_bytes() {
    require_root();
    let (run, report) = run_json(&[
        "demo",
        "--segments",
        "2",
        "--agents",
        "6",
        "--size",
        "4MiB",
        "--json",
    ]);
    let bytes = report["bytes"].as_u64().unwrap();
    assert_eq!(report["confirmed"], 6);
    assert_eq!(report["segments"], 2);
    assert_eq!(report["leaders"], 2);
    let wan = report["wan_bytes_max_per_segment"].as_u64().unwrap();
    assert!(
        wan >= bytes && wan as f64 <= 1.15 * bytes as f64,
        "{wan} bytes crossed one WAN link for {bytes} bytes of content"
    );
    // The plain demo's keys are all there too.
    for key in [
        "agents",
        "seconds",
        "lower_bound_seconds",
        "ratio",
        "manager_bytes_sent",
        "agent_bytes_received",
        "agent_max_rss_bytes",
    ] {
        assert!(report.get(key).is_some(), "no {key} in {report}");
    }
    // The demo removed its namespaces (they carry its pid).
    assert!(
        netns::lab_namespaces()
            .iter()
            .all(|n| netns::owner_pid(n) != Some(run.pid)),
        "the demo left namespaces behind"
    );
}

#[test]
fn lab_command_measures_against_the_lower_bound() {
    require_root();
    let (_, r) = run_json(&[
        "lab",
        "--agents",
        "4",
        "--size",
        "2MiB",
        "--delay-ms",
        "1..20",
        "--json",
    ]);
    assert_eq!(r["confirmed"], 4);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r}"));
    // The default: symmetric rates from seed 1 spanning 512..2560 KiB/s, agents blind.
    assert_eq!(r["profile"], "sym");
    assert_eq!(r["seed"], 1);
    assert_eq!(r["declared_rates"], false);
    let rates = |k: &str| -> Vec<f64> {
        r["caps"][k]
            .as_array()
            .unwrap_or_else(|| panic!("no caps.{k} in {r}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (up, down) = (rates("agent_up_bps"), rates("agent_down_bps"));
    assert_eq!(up, down);
    assert_eq!(
        up.iter().copied().fold(f64::INFINITY, f64::min),
        512.0 * 1024.0
    );
    assert_eq!(up.iter().copied().fold(0.0, f64::max), 2560.0 * 1024.0);
    // T* from the reported rates.
    let s = 2.0 * 1024.0 * 1024.0;
    let manager = r["caps"]["manager_up_bps"].as_f64().unwrap();
    let d_min = down.iter().copied().fold(f64::INFINITY, f64::min);
    let expected = (s / manager)
        .max(s / d_min)
        .max(4.0 * s / (manager + up.iter().sum::<f64>()));
    assert!((f("lower_bound_seconds") - expected).abs() < 1e-9);
    // Nothing beats the bound (poll granularity aside), and the figures are consistent.
    assert!(f("ratio") >= 0.95, "{r}");
    assert!(f("p50_seconds") <= f("p99_seconds") && f("p99_seconds") <= f("makespan_seconds"));
    assert!((f("ratio") - f("makespan_seconds") / f("lower_bound_seconds")).abs() < 1e-9);
    assert!(f("host_ratio_p50") <= f("host_ratio_max") && f("host_ratio_p50") >= 0.95);
    assert!(f("p50_over_makespan") > 0.0 && f("p50_over_makespan") <= 1.0);
    assert!(r["origin_bytes"].as_u64().unwrap() >= 2 * 1024 * 1024);
    assert_eq!(r["forwarder_drops"], 0);
    // CPU: the product did work; the machine's share is a share.
    assert!(
        f("cpu_seconds_product") > 0.0 && f("cpu_ns_per_byte") > 0.0,
        "{r}"
    );
    assert!(f("cpu_seconds_lab") >= 0.0);
    assert!((0.0..=1.0).contains(&f("machine_cpu_share")));
    // Blind agents: their command lines carry no rates.
    let commands = r["agent_commands"].as_array().expect("agent_commands");
    assert_eq!(commands.len(), 4);
    for c in commands {
        let c = c.as_str().unwrap();
        assert!(
            c.starts_with("baton agent ") && !c.contains("--up-bps"),
            "{c}"
        );
    }
    assert!(r.get("lower_bound_after_drop_seconds").is_none());
}

#[test]
fn lab_commands_refuse_to_run_without_root() {
    require_root();
    for args in [
        &["demo", "--segments", "2", "--agents", "2"][..],
        &["lab", "--agents", "2"][..],
    ] {
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(BATON)
            .args(args)
            .output()
            .expect("run setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("needs root"), "{args:?}: {stderr}");
    }
}
