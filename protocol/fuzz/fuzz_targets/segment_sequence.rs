//! Sequences of inputs to the agent's segment state machine
//! (`baton_agent_core::segment::Segment`): beacons, probes, echoes and member
//! reports from certified agents (genuine, replayed, of other segments, with a
//! flipped byte), arbitrary bytes, and ticks at arbitrary times.
//!
//! After every step: every datagram it sends opens under the manager's key,
//! names this agent and carries a strictly growing sequence number; report
//! pages are well formed and only the leader sends them; the leader is this
//! agent or a member that announced itself; and after a tick at its own
//! deadline the machine never asks to be woken at or before that instant
//! (no busy loop).

#![no_main]

use core::net::SocketAddr;
use core::time::Duration;

use baton_agent_core::segment::{Segment, SegmentConfig};
use baton_protocol::discovery::{self, Announcement, MAX_DATAGRAM};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{MAX_MEMBERS_PER_PAGE, SegmentMember};
use baton_protocol::{AgentId, LinkInfo, Name};
use libfuzzer_sys::fuzz_target;

const PEERS: usize = 5;

fn id(s: &str) -> AgentId {
    AgentId::try_from(s).unwrap()
}

/// The manager's Unix time (ms) at the fuzzed machine's time 0.
const T0_MS: u64 = 1_800_000_000_000;

struct Peer {
    identity: Identity,
    cert: AgentCert,
    addr: SocketAddr,
    seq: u64,
}

fuzz_target!(|data: &[u8]| {
    let manager = Identity::from_seed([1; 32]);
    let me = Identity::from_seed([2; 32]);
    let s = Name::try_from("s").unwrap();
    let my_cert = AgentCert::issue_certified(&manager, id("me"), me.public(), s.clone(), u32::MAX);
    let mut config = SegmentConfig::new(id("me"), Name::try_from("s").unwrap());
    config.beacon_interval = Duration::from_millis(100);
    config.leader_timeout = Duration::from_millis(300);
    config.probe_interval = Duration::from_millis(250);
    config.member_interval = Duration::from_millis(200);
    config.report_interval = Duration::from_millis(1000);
    // Room for three others only, so the table fills.
    let mut seg: Segment<3> = Segment::new(config, me, manager.public());
    let mut peers: Vec<Peer> = (0..PEERS)
        .map(|i| {
            let identity = Identity::from_seed([10 + i as u8; 32]);
            let name = ["p0", "p1", "p2", "p3", "p4"][i];
            Peer {
                cert: AgentCert::issue_certified(
                    &manager,
                    id(name),
                    identity.public(),
                    s.clone(),
                    u32::MAX,
                ),
                identity,
                addr: SocketAddr::from(([10, 0, 0, 10 + i as u8], 5000)),
                seq: 0,
            }
        })
        .collect();
    let mut now = Duration::ZERO;
    let mut last_seq = 0u64;
    let mut started = false;
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut input = data.iter().copied();
    let mut next = move || input.next();

    for _ in 0..200 {
        let Some(op) = next() else { break };
        match op % 8 {
            0 => {
                now += Duration::from_millis(u64::from(next().unwrap_or(0)) * 5);
                if !started {
                    seg.start(now, my_cert.clone(), 1000, T0_MS + now.as_millis() as u64);
                    started = true;
                }
            }
            1 => {
                // Tick at the machine's own deadline.
                if let Some(t) = seg.poll_timeout() {
                    now = now.max(t);
                    seg.handle_timeout(now);
                    drain(&mut seg, now, &manager, &mut last_seq, &mut buf);
                    let after = seg.poll_timeout().expect("started");
                    assert!(
                        after > now,
                        "woken again at {after:?} after a tick at {now:?}"
                    );
                }
            }
            2..=5 => {
                let p = usize::from(next().unwrap_or(0)) % PEERS;
                let arg = next().unwrap_or(0);
                let body = match op % 8 {
                    2 => Announcement::Beacon {
                        segment: Name::try_from(if arg & 0x80 != 0 { "other" } else { "s" })
                            .unwrap(),
                        score: u32::from(arg & 0x7f) << 18,
                        listen: None,
                        leader: None,
                    },
                    3 => Announcement::Probe {
                        nonce: u64::from(arg),
                    },
                    4 => Announcement::Echo {
                        nonce: u64::from(arg) * 5000,
                    },
                    _ => Announcement::Member(SegmentMember {
                        id: if arg & 1 == 0 {
                            peers[p].cert.id.clone()
                        } else {
                            id("someone")
                        },
                        score: u32::from(arg) << 17,
                        listen: None,
                        performance: 1,
                        free_storage: 0,
                        can_serve: true,
                        link: LinkInfo::default(),
                        delays: heapless::Vec::new(),
                        last_heard_ms: 0,
                    }),
                };
                let peer = &mut peers[p];
                // Mostly growing, sometimes replayed.
                let seq = if arg & 0x40 != 0 {
                    peer.seq
                } else {
                    peer.seq + 1
                };
                peer.seq = peer.seq.max(seq);
                let time = T0_MS + now.as_millis() as u64;
                let n = discovery::seal(&peer.identity, &peer.cert, seq, time, &body, &mut buf)
                    .unwrap();
                let mut dg = buf[..n].to_vec();
                if arg & 0x20 != 0 {
                    let at = usize::from(next().unwrap_or(0)) % n;
                    dg[at] ^= 0x01;
                }
                let result = seg.handle_datagram(now, peer.addr, &dg);
                if arg & 0x20 != 0 {
                    assert!(result.is_err(), "an altered datagram was accepted");
                }
                drain(&mut seg, now, &manager, &mut last_seq, &mut buf);
            }
            _ => {
                let len = usize::from(next().unwrap_or(0));
                let bytes: Vec<u8> = (0..len).map_while(|_| next()).collect();
                assert!(
                    seg.handle_datagram(now, SocketAddr::from(([10, 0, 0, 99], 1)), &bytes)
                        .is_err()
                );
                drain(&mut seg, now, &manager, &mut last_seq, &mut buf);
            }
        }
        if started {
            let leader = seg
                .leader()
                .expect("a started machine has a leader")
                .clone();
            assert_eq!(seg.is_leader(), leader == id("me"));
            assert!(leader == id("me") || peers.iter().any(|p| p.cert.id == leader));
            assert!(seg.member_count() <= 4);
        }
    }
});

/// Drains every output and checks it.
fn drain(
    seg: &mut Segment<3>,
    now: Duration,
    manager: &Identity,
    last_seq: &mut u64,
    buf: &mut [u8; MAX_DATAGRAM],
) {
    for _ in 0..1000 {
        let Some(out) = seg.poll_transmit(now, buf) else {
            break;
        };
        let dg = discovery::open(&buf[..out.len], &manager.public()).expect("own datagram opens");
        assert_eq!(dg.sender.id, id("me"));
        assert!(dg.seq > *last_seq, "sequence did not grow");
        *last_seq = dg.seq;
    }
    assert!(
        seg.poll_transmit(now, buf).is_none(),
        "transmit does not run dry"
    );
    let mut pages = 0;
    while let Some(page) = seg.poll_report(now) {
        assert!(seg.is_leader());
        assert_eq!(page.leader, id("me"));
        assert!(page.page < page.pages);
        assert!(page.members.len() <= MAX_MEMBERS_PER_PAGE);
        pages += 1;
        assert!(pages <= 10);
    }
    while seg.poll_event().is_some() {}
}
