//! The link model: per-node upload and download, WAN links in front of segments, latency.
//!
//! Every node (index 0 is the manager, `1..` the agents) has an upload and a
//! download port; every LAN segment has a WAN link with an upload and a
//! download port. A port is a FIFO server: a frame occupies it for
//! `size / rate` (its serialization time) after whatever is queued before it,
//! so concurrent flows through a port share its rate (each agent keeps a
//! bounded window of requests per source, so the FIFO interleaves flows about
//! evenly: a per-port fair share). A bulk frame's path is
//!
//! ```text
//! sender upload → [sender segment's WAN upload] → [receiver segment's WAN download] → receiver download
//! ```
//!
//! (the WAN ports only when the two ends are not on the same segment; the
//! manager sits outside every segment), with each end's access latency (and
//! the WAN latencies) between the ports. Ports are store-and-forward at frame
//! granularity: a frame leaves a port whole, then queues at the next.
//!
//! Frames smaller than [`BULK_THRESHOLD`] virtual bytes — requests, progress,
//! refusals — skip the queues and only take the propagation latency: on a
//! real link they interleave with bulk data at packet granularity, so waiting
//! behind whole chunks would overstate their delay.
//!
//! Partitions cut a set of agents off from everyone else; the driver asks
//! [`Net::cut`] when it delivers, connects or decides a connection's fate.
//!
//! A node's upload rate can change mid-run ([`Net::set_up_rate`]): a frame is
//! timed when it is handed to the port, so the new rate applies to frames
//! handed to it from then on, and frames already queued leave at the rate they
//! were queued at (a port's backlog is a few requests' worth of chunks).

use std::time::Duration;

/// Node index of the manager.
pub const MANAGER: usize = 0;

/// Frames of at least this many virtual bytes queue at the ports; smaller ones only take latency.
pub const BULK_THRESHOLD: u64 = 1024;

/// One node's link as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Upload rate, bytes/s.
    pub up: u64,
    /// Download rate, bytes/s.
    pub down: u64,
    /// One-way access latency.
    pub latency: Duration,
    /// LAN segment (behind a WAN link), if any.
    pub segment: Option<u32>,
}

/// A segment's WAN link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Wan {
    /// Upload rate (out of the segment), bytes/s.
    pub up: u64,
    /// Download rate (into the segment), bytes/s.
    pub down: u64,
    /// One-way latency across it.
    pub latency: Duration,
}

/// A FIFO server: its rate and when it is next free.
#[derive(Clone, Copy, Debug)]
struct Port {
    rate: u64,
    free: Duration,
    /// Virtual bytes that passed.
    bytes: u64,
    /// Time spent serializing them.
    busy: Duration,
}

impl Port {
    fn new(rate: u64) -> Self {
        Port {
            rate: rate.max(1),
            free: Duration::ZERO,
            bytes: 0,
            busy: Duration::ZERO,
        }
    }

    /// Queues `size` bytes arriving at `now`; returns when the last byte has left.
    fn take(&mut self, now: Duration, size: u64) -> Duration {
        let ser = Duration::from_nanos((size as u128 * 1_000_000_000 / self.rate as u128) as u64);
        self.free = self.free.max(now) + ser;
        self.bytes += size;
        self.busy += ser;
        self.free
    }
}

/// A port on a frame's path after the sender's upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hop {
    WanUp(u32),
    WanDown(u32),
    Down(u32),
}

/// Where a frame is on its path; kept by the driver with the frame.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    hops: [(Hop, Duration); 3],
    len: u8,
    next: u8,
    left: Duration,
}

impl Route {
    /// When the frame's last byte left the sender (for a frame too small to queue, when it
    /// was sent): from then on it is on the wire, and a connection reset arrives behind it.
    pub fn left_sender(&self) -> Duration {
        self.left
    }
}

/// What happens to a frame next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// It reaches its next port at this time: call [`Net::advance`] then.
    Hop(Duration),
    /// It is delivered at this time.
    Deliver(Duration),
}

/// The network: every port's state, and the active partitions.
#[derive(Debug)]
pub struct Net {
    links: Vec<Link>,
    up: Vec<Port>,
    down: Vec<Port>,
    wans: Vec<Wan>,
    wan_up: Vec<Port>,
    wan_down: Vec<Port>,
    /// Active partitions: `(id, membership per node, when it heals)`.
    partitions: Vec<(u64, Vec<bool>, Duration)>,
}

impl Net {
    /// A network of `links` (index 0 is the manager) and one WAN link per segment.
    pub fn new(links: Vec<Link>, wans: Vec<Wan>) -> Self {
        Net {
            up: links.iter().map(|l| Port::new(l.up)).collect(),
            down: links.iter().map(|l| Port::new(l.down)).collect(),
            wan_up: wans.iter().map(|w| Port::new(w.up)).collect(),
            wan_down: wans.iter().map(|w| Port::new(w.down)).collect(),
            links,
            wans,
            partitions: Vec::new(),
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Node `n`'s link as built (its upload before any [`Net::set_up_rate`]).
    pub fn link(&self, n: usize) -> &Link {
        &self.links[n]
    }

    /// Virtual bytes node `n` has uploaded (bulk frames only).
    pub fn uploaded(&self, n: usize) -> u64 {
        self.up[n].bytes
    }

    /// How long node `n`'s upload has been busy sending bulk frames (their bytes over the rate
    /// each was sent at).
    pub fn upload_busy(&self, n: usize) -> Duration {
        self.up[n].busy
    }

    /// Node `n`'s upload rate now, bytes/s.
    pub fn up_rate(&self, n: usize) -> u64 {
        self.up[n].rate
    }

    /// Changes node `n`'s upload rate to `rate` bytes/s (at least 1): frames handed to its
    /// upload from now on are serialized at the new rate; those already queued keep theirs.
    pub fn set_up_rate(&mut self, n: usize, rate: u64) {
        self.up[n].rate = rate.max(1);
    }

    /// One-way propagation latency from `a` to `b`.
    pub fn latency(&self, a: usize, b: usize) -> Duration {
        let (la, lb) = (&self.links[a], &self.links[b]);
        let mut t = la.latency + lb.latency;
        if la.segment != lb.segment {
            for s in [la.segment, lb.segment].into_iter().flatten() {
                t += self.wans[s as usize].latency;
            }
        }
        t
    }

    /// Round-trip time between `a` and `b`.
    pub fn rtt(&self, a: usize, b: usize) -> Duration {
        self.latency(a, b) * 2
    }

    /// Sends `size` virtual bytes from `from` to `to` at `now`: the sender's upload is taken
    /// now (frames are handed to it in time order, so its FIFO is exact).
    pub fn send(&mut self, now: Duration, from: usize, to: usize, size: u64) -> (Route, Step) {
        let (lf, lt) = (self.links[from], self.links[to]);
        let mut route = Route {
            hops: [(Hop::Down(to as u32), Duration::ZERO); 3],
            len: 0,
            next: 0,
            left: now,
        };
        let mut prop = lf.latency;
        if lf.segment != lt.segment {
            if let Some(s) = lf.segment {
                route.hops[route.len as usize] = (Hop::WanUp(s), prop);
                route.len += 1;
                prop = self.wans[s as usize].latency;
            }
            if let Some(s) = lt.segment {
                prop += self.wans[s as usize].latency;
                route.hops[route.len as usize] = (Hop::WanDown(s), prop);
                route.len += 1;
                prop = Duration::ZERO;
            }
        }
        prop += lt.latency;
        route.hops[route.len as usize] = (Hop::Down(to as u32), prop);
        route.len += 1;
        if size < BULK_THRESHOLD {
            let total: Duration = route.hops[..route.len as usize].iter().map(|h| h.1).sum();
            route.next = route.len;
            return (route, Step::Deliver(now + total));
        }
        let left = self.up[from].take(now, size);
        route.left = left;
        (route, Step::Hop(left + route.hops[0].1))
    }

    /// The frame of `size` bytes on `route` reached its next port at `now`.
    pub fn advance(&mut self, now: Duration, route: &mut Route, size: u64) -> Step {
        let (hop, _) = route.hops[route.next as usize];
        let left = match hop {
            Hop::WanUp(s) => self.wan_up[s as usize].take(now, size),
            Hop::WanDown(s) => self.wan_down[s as usize].take(now, size),
            Hop::Down(n) => self.down[n as usize].take(now, size),
        };
        route.next += 1;
        if route.next >= route.len {
            Step::Deliver(left)
        } else {
            Step::Hop(left + route.hops[route.next as usize].1)
        }
    }

    /// Cuts `members` (agent node indices) off from everyone else, as partition `id`,
    /// until it heals at `until` (the driver calls [`Net::heal`] then).
    pub fn partition(&mut self, id: u64, members: &[usize], until: Duration) {
        let mut side = vec![false; self.links.len()];
        for &m in members {
            if m != MANAGER && m < side.len() {
                side[m] = true;
            }
        }
        self.partitions.push((id, side, until));
    }

    /// Whether partition `id` is active.
    pub fn active(&self, id: u64) -> bool {
        self.partitions.iter().any(|p| p.0 == id)
    }

    /// If active partitions separate `a` and `b`, when the last of them heals.
    pub fn cut_until(&self, a: usize, b: usize) -> Option<Duration> {
        self.partitions
            .iter()
            .filter(|(_, side, _)| side[a] != side[b])
            .map(|p| p.2)
            .max()
    }

    /// Heals partition `id`.
    pub fn heal(&mut self, id: u64) {
        self.partitions.retain(|p| p.0 != id);
    }

    /// Whether an active partition separates `a` and `b`.
    pub fn cut(&self, a: usize, b: usize) -> bool {
        self.partitions
            .iter()
            .any(|(_, side, _)| side[a] != side[b])
    }

    /// Whether any partition is active.
    pub fn partitioned(&self) -> bool {
        !self.partitions.is_empty()
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn link(up: u64, down: u64, lat_ms: u64, segment: Option<u32>) -> Link {
        Link {
            up,
            down,
            latency: MS * lat_ms as u32,
            segment,
        }
    }

    fn run(net: &mut Net, now: Duration, from: usize, to: usize, size: u64) -> Duration {
        let (mut route, mut step) = net.send(now, from, to, size);
        loop {
            match step {
                Step::Hop(t) => step = net.advance(t, &mut route, size),
                Step::Deliver(t) => return t,
            }
        }
    }

    #[test]
    fn serialization_queueing_and_latency() {
        // 1 MB/s up, 2 MB/s down, 10 ms + 5 ms latency.
        let mut net = Net::new(
            vec![
                link(1_000_000, 2_000_000, 10, None),
                link(1_000_000, 2_000_000, 5, None),
            ],
            vec![],
        );
        // 100 kB: 100 ms up, 15 ms, 50 ms down.
        assert_eq!(run(&mut net, Duration::ZERO, 0, 1, 100_000), 165 * MS);
        // A second frame at once queues behind the first at the upload.
        assert_eq!(run(&mut net, Duration::ZERO, 0, 1, 100_000), 265 * MS);
        // Small frames skip the queues.
        assert_eq!(run(&mut net, Duration::ZERO, 0, 1, 100), 15 * MS);
        assert_eq!(net.uploaded(0), 200_000);
    }

    #[test]
    fn an_upload_rate_change_applies_to_later_frames() {
        let mut net = Net::new(
            vec![
                link(1_000_000, 10_000_000, 0, None),
                link(1_000_000, 10_000_000, 0, None),
            ],
            vec![],
        );
        // 100 kB at 1 MB/s leaves at 100 ms (then 10 ms down).
        assert_eq!(run(&mut net, Duration::ZERO, 0, 1, 100_000), 110 * MS);
        // Queued before the change: still 1 MB/s, so it leaves at 200 ms.
        let (_, queued) = net.send(Duration::ZERO, 0, 1, 100_000);
        assert_eq!(queued, Step::Hop(200 * MS));
        net.set_up_rate(0, 500_000);
        assert_eq!(net.up_rate(0), 500_000);
        // Handed over after it: 200 ms at half the rate, behind the queued frame.
        let (_, later) = net.send(Duration::ZERO, 0, 1, 100_000);
        assert_eq!(later, Step::Hop(400 * MS));
        assert_eq!(net.upload_busy(0), 400 * MS);
        assert_eq!(net.link(0).up, 1_000_000, "the link as built");
    }

    #[test]
    fn wan_links_between_segments() {
        let mut net = Net::new(
            vec![
                link(10_000_000, 10_000_000, 1, None),
                link(10_000_000, 10_000_000, 1, Some(0)),
                link(10_000_000, 10_000_000, 1, Some(1)),
                link(10_000_000, 10_000_000, 1, Some(0)),
            ],
            vec![
                Wan {
                    up: 1_000_000,
                    down: 1_000_000,
                    latency: 20 * MS,
                };
                2
            ],
        );
        assert_eq!(net.latency(1, 3), 2 * MS);
        assert_eq!(net.latency(1, 2), 42 * MS);
        assert_eq!(net.latency(0, 2), 22 * MS);
        // 10 kB across: 1 ms up, 10 ms WAN up, 10 ms WAN down, 1 ms down + 42 ms.
        assert_eq!(run(&mut net, Duration::ZERO, 1, 2, 10_000), 64 * MS);
        // Same segment: no WAN.
        assert_eq!(
            run(&mut net, Duration::from_secs(1), 1, 3, 10_000),
            1000 * MS + 4 * MS
        );
        net.partition(7, &[1, 3], Duration::from_secs(9));
        assert_eq!(net.cut_until(1, 2), Some(Duration::from_secs(9)));
        assert!(net.cut(1, 2) && net.cut(0, 3) && !net.cut(1, 3) && !net.cut(0, 2));
        net.heal(7);
        assert!(!net.cut(1, 2));
    }
}
