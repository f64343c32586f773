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
use std::process::Command;
use std::time::{Duration, Instant};

use baton_manager::lab::{Lab, LinkShape, SegmentSpec, Topology, netns};

fn require_root() {
    assert!(
        baton_manager::lab::require_root().is_ok(),
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
    let listen = |node: &baton_manager::lab::Node| {
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
