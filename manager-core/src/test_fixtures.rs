//! Values the unit tests of several modules build alike (compiled for tests only).

use baton_protocol::message::SegmentMember;
use baton_protocol::types::{AgentId, Delay, DelayTo, LinkInfo};

/// A strong segment member (score, performance and free storage at their maximum) that
/// measured the manager at 900 µs and each of `peers` at 1 µs, last heard 5 ms ago.
pub(crate) fn member(name: &str, peers: &[&str]) -> SegmentMember {
    let mut delays = heapless::Vec::new();
    delays
        .push(Delay {
            to: DelayTo::Manager,
            rtt_us: 900,
        })
        .unwrap();
    for p in peers {
        delays
            .push(Delay {
                to: DelayTo::Peer(AgentId::try_from(*p).unwrap()),
                rtt_us: 1,
            })
            .unwrap();
    }
    SegmentMember {
        id: AgentId::try_from(name).unwrap(),
        score: u32::MAX,
        listen: None,
        performance: 1000,
        free_storage: u64::MAX,
        can_serve: true,
        link: LinkInfo::default(),
        delays,
        last_heard_ms: 5,
    }
}
