//! Seeds, fleets and plan measures shared by the relay plan's unit tests.

use super::{Holder, NodeInfo, RelayPlan, Seed};

pub(super) fn server(up: u64, cap: u16) -> Seed {
    Seed {
        info: Some(NodeInfo {
            up_bps: up,
            server: true,
            capacity: cap,
            max_sources: 16,
            segment: 0,
            leader: false,
        }),
        ..Seed::default()
    }
}

pub(super) fn leaf(max_sources: u16) -> Seed {
    Seed {
        info: Some(NodeInfo {
            up_bps: 0,
            server: false,
            capacity: 0,
            max_sources,
            segment: 0,
            leader: false,
        }),
        ..Seed::default()
    }
}

/// Every online fetcher's sources cover `0..chunks` exactly once.
pub(super) fn assert_covers(plan: &RelayPlan) {
    for i in 0..plan.len() as u32 {
        let n = &plan.nodes[i as usize];
        if !(n.online && !n.confirmed && !n.failed) {
            continue;
        }
        let src = plan.sources(i);
        let mut next = 0;
        for a in &src {
            assert_eq!(a.first, next, "node {i}: {src:?}");
            assert!(a.end > a.first);
            next = a.end;
        }
        assert_eq!(next, plan.chunks(), "node {i}: {src:?}");
    }
}

/// The time the plan needs if every holder uploads at its capacity: the largest of
/// (chunks served × chunk bytes / upload) over the manager and every peer.
pub(super) fn plan_time(plan: &RelayPlan, chunk_bytes: f64, manager_up: u64, ups: &[u64]) -> f64 {
    let mut t = plan.served_chunks(Holder::Manager) as f64 * chunk_bytes / manager_up as f64;
    for (i, &u) in ups.iter().enumerate() {
        let served = plan.served_chunks(Holder::Peer(i as u32)) as f64;
        if served > 0.0 {
            t = t.max(served * chunk_bytes / u as f64);
        }
    }
    t
}

/// `segments` × `per` agents with mixed links: per segment two leaves, the rest servers
/// with uploads of 1–8 MB/s and capacities 3–16.
pub(super) fn segmented_fleet(segments: u32, per: u32) -> Vec<Seed> {
    (0..segments * per)
        .map(|i| {
            let mut seed = if i % per >= per - 2 {
                leaf(2 + (i % 3) as u16)
            } else {
                server(1_000_000 << (i % 4), 3 + (i * 7 % 14) as u16)
            };
            if let Some(info) = &mut seed.info {
                info.segment = 1 + i / per;
            }
            seed
        })
        .collect()
}
