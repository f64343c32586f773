//! Segment-aware relay: content crosses each segment's WAN link once and fans out inside it.
//!
//! When participants report named LAN segments (and the policy keeps content
//! local), [`RelayPlan::build`] plans every stripe on two levels:
//!
//! 1. **Across the WAN.** Each segment gets its entry nodes: its elected
//!    leader first (if it may serve), then its other serving participants in
//!    the order of the prioritized list (score: capabilities, policy weights,
//!    measured delay to the manager), at most
//!    [`Policy::max_wan_transfers_per_segment`](crate::planner::Policy) of
//!    them. Segments are ranked by their best entry. Per stripe, before any
//!    fan-out, one entry of each segment fetches the stripe from outside (the
//!    first stripe through the leader, else through the entry that would
//!    finish its uploads first, i.e. the fastest; the other stripes through
//!    the entry that would finish first, so stripes enter through different
//!    entries and all their uploads are used): from the manager while the
//!    manager's copies last (`Policy::manager_max_copies`), else from the
//!    entry of a segment ranked earlier that would finish its uploads first
//!    (cut-through; an entry keeps room for its own segment). So each stripe
//!    crosses into each segment once.
//! 2. **Inside the segment.** The stripe fans out from the entry (or from a
//!    participant of the segment that already holds the whole content):
//!    servers first, fastest first, then leaves, each from the holder that
//!    would finish its uploads first (what every node serves is counted over
//!    all stripes and across the WAN, so uploads even out: the least-load
//!    rule), within capacities and a bounded tree depth. A fetcher goes
//!    outside its segment only when nobody inside has room left.
//!
//! A segment without any agent allowed to serve has no entry: each of its
//! participants fetches across the WAN (the engine reports it as a warning).
//! Repairs and late joiners look for a source on their own segment first
//! ([`RelayPlan::pick_on_segment`]) and cross the WAN only when none is left;
//! the limit on entry nodes is not enforced for such repairs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::{MANAGER, RelayPlan, SCAN_LIMIT, UNSET, is_peer};

/// Where content enters one segment, as planned when the job started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentEntry {
    /// The segment's number (see [`NodeInfo::segment`](super::NodeInfo)).
    pub segment: u32,
    /// Entry nodes (plan indices), best first: the participants that fetch stripes from
    /// outside (the first stripe's first, then in the order of first use), then the other
    /// candidates allowed to.
    pub entries: Vec<u32>,
    /// Participants of the segment that were fetching when the plan was built.
    pub fetchers: u32,
    /// Of them, those allowed to serve peers.
    pub servers: u32,
}

/// The serving nodes of one segment, scanned round-robin by repairs.
#[derive(Clone, Debug, Default)]
pub(super) struct SegmentServers {
    nodes: Vec<u32>,
    cursor: usize,
}

/// One segment while the plan is built.
#[derive(Debug, Default)]
struct View {
    segment: u32,
    /// Fetching participants, in priority order.
    fetchers: Vec<u32>,
    /// Online participants holding the whole content that may serve.
    confirmed: Vec<u32>,
    /// Entry nodes, best first.
    entries: Vec<u32>,
    /// Fetchers allowed to serve.
    servers: u32,
}

/// Per stripe: the manager's copies left and the holders other segments may fetch from.
#[derive(Debug)]
struct Wan {
    manager_left: u32,
    holders: Holders,
}

/// The holders of one stripe, the one that finishes its uploads first first.
#[derive(Debug)]
struct Holders {
    /// `(key, node)`: about the time to finish what it serves plus one more copy.
    heap: BinaryHeap<Reverse<(u128, u32)>>,
    /// Holders this many hops or more below `base_depth` are not offered.
    max_depth: u16,
    /// The depth where the stripe entered (the segment, or `0` across the WAN).
    base_depth: u16,
    /// Fetchers each holder keeps room for beyond those it takes from here (across the WAN:
    /// one, so an entry that serves other segments can still start the fan-out in its own).
    reserve: usize,
}

/// Most hops a stripe's tree grows inside one segment, and across segments. Holders that
/// finish first are preferred, which would otherwise make long chains (slow to start, and
/// every repair and cycle check walks them).
const MAX_LOCAL_DEPTH: u16 = 6;
/// See [`MAX_LOCAL_DEPTH`]: how deep a holder may sit and still serve another segment.
const MAX_WAN_DEPTH: u16 = 12;

/// What each node serves in the plan being built, and its depth in the current stripe's tree.
#[derive(Debug)]
struct Load {
    /// Chunks each node is set to serve so far (all stripes).
    served: Vec<u64>,
    /// Hops from the manager in the stripe being planned (`1` = fetches from the manager).
    depth: Vec<u16>,
}

impl Holders {
    fn new(max_depth: u16) -> Self {
        Holders {
            heap: BinaryHeap::new(),
            max_depth,
            base_depth: 0,
            reserve: 0,
        }
    }

    /// When `node` would finish serving what it serves now plus `len` more chunks (scaled).
    fn key(&self, plan: &RelayPlan, node: u32, len: u64, load: &Load) -> u128 {
        let up = plan.eff_up(node).max(1) as u128;
        let served = load.served[node as usize] as u128;
        ((served + len as u128) << 24) / up
    }

    /// Offers `node` as a holder if it may take another fetcher (beyond its reserve) and is
    /// less than `max_depth` hops below where the stripe entered.
    fn push(&mut self, plan: &RelayPlan, node: u32, len: u64, load: &Load) {
        if plan.spare(node) <= self.reserve
            || load.depth[node as usize].saturating_sub(self.base_depth) >= self.max_depth
        {
            return;
        }
        let key = self.key(plan, node, len, load);
        self.heap.push(Reverse((key, node)));
    }

    /// The holder that would finish first and may serve stripe `g` to `fetcher` (charged with
    /// the stripe); `None` if none has room.
    fn take(&mut self, plan: &RelayPlan, fetcher: u32, g: usize, load: &mut Load) -> Option<u32> {
        let len = plan.stripe_len(g) as u64;
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some(Reverse((key, h))) = self.heap.pop() {
            if plan.spare(h) <= self.reserve && !plan.uses(fetcher, h) {
                continue; // full for good
            }
            let now = self.key(plan, h, len, load);
            if now > key {
                // It took on more since it was queued: queue it again at its real place.
                self.heap.push(Reverse((now, h)));
                if skipped.len() + 1 >= SCAN_LIMIT {
                    break;
                }
                continue;
            }
            if plan.may_take(fetcher, h, g) {
                found = Some(h);
                break;
            }
            skipped.push(h);
            if skipped.len() >= SCAN_LIMIT {
                break;
            }
        }
        for h in skipped {
            self.push(plan, h, len, load);
        }
        let h = found?;
        load.served[h as usize] += len;
        self.push(plan, h, len, load);
        Some(h)
    }
}

impl RelayPlan {
    /// Builds every stripe's sources segment by segment (see the module documentation).
    ///
    /// `manager_slots` is how many fetchers the manager serves per stripe by plan;
    /// `max_wan` the most entry nodes per segment (`0` = every serving participant).
    pub(super) fn build_segmented(&mut self, fetchers: &[u32], manager_slots: u32, max_wan: u16) {
        let k = self.stripes.len();
        let mut by_segment: HashMap<u32, View> = HashMap::new();
        for &f in fetchers {
            let seg = self.nodes[f as usize].info.segment;
            let view = by_segment.entry(seg).or_default();
            view.segment = seg;
            view.fetchers.push(f);
        }
        let mut confirmed_anywhere = Vec::new();
        for i in 0..self.nodes.len() as u32 {
            let n = &self.nodes[i as usize];
            if n.confirmed && self.serving(i) {
                confirmed_anywhere.push(i);
                if let Some(view) = by_segment.get_mut(&n.info.segment) {
                    view.confirmed.push(i);
                }
            }
        }
        let mut views: Vec<View> = by_segment.into_values().collect();
        for view in &mut views {
            let mut servers: Vec<u32> = view
                .fetchers
                .iter()
                .copied()
                .filter(|&f| self.cap(f) > 0)
                .collect();
            view.servers = servers.len() as u32;
            if let Some(pos) = servers
                .iter()
                .position(|&s| self.nodes[s as usize].info.leader)
            {
                let leader = servers.remove(pos);
                servers.insert(0, leader);
            }
            // Segment 0 (not reported) has no WAN link of its own to protect.
            if max_wan > 0 && view.segment != 0 {
                servers.truncate(max_wan as usize);
            }
            view.entries = servers;
        }
        // The best entry (earliest on the prioritized list) ranks its segment.
        views.sort_by_key(|v| (v.entries.first().copied().unwrap_or(UNSET), v.segment));

        let mut load = Load {
            served: vec![0; self.nodes.len()],
            depth: vec![0; self.nodes.len()],
        };
        let mut wan: Vec<Wan> = (0..k)
            .map(|g| {
                let mut holders = Holders::new(MAX_WAN_DEPTH);
                holders.reserve = 1;
                for &c in &confirmed_anywhere {
                    holders.push(self, c, self.stripe_len(g) as u64, &load);
                }
                Wan {
                    manager_left: manager_slots.max(1),
                    holders,
                }
            })
            .collect();
        // Per segment, the entries that stripes entered through, in the order of first use.
        let mut used: Vec<Vec<u32>> = vec![Vec::new(); views.len()];
        for (g, wan) in wan.iter_mut().enumerate() {
            // Across the WAN first: every segment's entry for this stripe, best segment first,
            // so entries of later segments fetch from entries of earlier ones (cut-through) and
            // each segment's fan-out knows what its entry already serves across the WAN.
            let entries: Vec<Option<u32>> = views
                .iter()
                .map(|view| self.enter(g, view, wan, &mut load))
                .collect();
            for (used, &entry) in used.iter_mut().zip(&entries) {
                if let Some(e) = entry
                    && !used.contains(&e)
                {
                    used.push(e);
                }
            }
            for (view, &entry) in views.iter().zip(&entries) {
                if entry.is_some() || !view.confirmed.is_empty() {
                    self.fan_out(g, view, entry, wan, &mut load);
                }
            }
            // Segments where nobody may serve: every participant fetches across the WAN, from
            // holders near where the stripe entered other segments.
            for (view, &entry) in views.iter().zip(&entries) {
                if entry.is_none() && view.confirmed.is_empty() {
                    for &f in &view.fetchers {
                        let h = self.wan_source(f, g, wan, &mut load);
                        self.assign(f, g, h, &mut load);
                    }
                }
            }
        }
        self.entries = views
            .into_iter()
            .zip(used)
            .filter(|(v, _)| v.segment != 0)
            .map(|(v, mut entries)| {
                // The entries used first (the first stripe's first), then the other candidates.
                for e in v.entries {
                    if !entries.contains(&e) {
                        entries.push(e);
                    }
                }
                SegmentEntry {
                    segment: v.segment,
                    entries,
                    fetchers: v.fetchers.len() as u32,
                    servers: v.servers,
                }
            })
            .collect();
    }

    /// The entry node through which stripe `g` enters the segment of `view` (assigned its source
    /// outside and offered as a holder to segments ranked later); `None` if a participant of
    /// the segment holds the whole content already, or nobody there may serve.
    ///
    /// The first stripe enters through the elected leader, if it may serve; every other
    /// stripe through the entry that would finish its uploads first (the fastest, at first),
    /// so the stripes enter through different entries and all their uploads are used.
    fn enter(&mut self, g: usize, view: &View, wan: &mut Wan, load: &mut Load) -> Option<u32> {
        if !view.confirmed.is_empty() {
            return None;
        }
        let len = self.stripe_len(g) as u64;
        let leader = view
            .entries
            .first()
            .copied()
            .filter(|&e| g == 0 && self.nodes[e as usize].info.leader);
        let e = leader.or_else(|| {
            view.entries.iter().copied().min_by_key(|&e| {
                (
                    (((load.served[e as usize] + len) as u128) << 24)
                        / self.eff_up(e).max(1) as u128,
                    e,
                )
            })
        })?;
        let h = self.wan_source(e, g, wan, load);
        self.assign(e, g, h, load);
        wan.holders.push(self, e, len, load);
        Some(e)
    }

    /// Plans stripe `g` for the other fetchers of one segment, from its `entry` (or from its
    /// participants that hold the whole content): each from the holder inside that would
    /// finish its uploads first, the fastest servers first (so they hold the stripe early and
    /// carry most of the copies), across the WAN only when nobody inside has room.
    fn fan_out(
        &mut self,
        g: usize,
        view: &View,
        entry: Option<u32>,
        wan: &mut Wan,
        load: &mut Load,
    ) {
        let len = self.stripe_len(g) as u64;
        let mut holders = Holders::new(MAX_LOCAL_DEPTH);
        match entry {
            Some(e) => {
                holders.base_depth = load.depth[e as usize];
                holders.push(self, e, len, load);
            }
            None => {
                for &c in &view.confirmed {
                    holders.push(self, c, len, load);
                }
            }
        }
        // Servers first, fastest first (equal ones rotated per stripe, so each stripe's tree
        // starts elsewhere), then leaves.
        let (mut servers, leaves): (Vec<u32>, Vec<u32>) = view
            .fetchers
            .iter()
            .copied()
            .filter(|&f| Some(f) != entry)
            .partition(|&f| self.cap(f) > 0);
        if !servers.is_empty() {
            let at = g % servers.len();
            servers.rotate_left(at);
            servers.sort_by_key(|&f| Reverse(self.eff_up(f)));
        }
        for f in servers.into_iter().chain(leaves) {
            let h = match self.local_source(f, g, &mut holders, load) {
                Some(h) => h,
                None => self.wan_source(f, g, wan, load),
            };
            self.assign(f, g, h, load);
            holders.push(self, f, len, load);
        }
        // This segment's holders of the stripe near where it entered may now serve segments
        // without servers (deeper ones would only make longer chains).
        let near = holders.base_depth.saturating_add(1);
        for &f in &view.fetchers {
            if Some(f) != entry && self.cap(f) > 0 && load.depth[f as usize] <= near {
                wan.holders.push(self, f, len, load);
            }
        }
    }

    /// A source for stripe `g` of `fetcher` inside its segment: the holder that would finish
    /// its uploads first; `None` if nobody inside has room.
    fn local_source(
        &self,
        fetcher: u32,
        g: usize,
        holders: &mut Holders,
        load: &mut Load,
    ) -> Option<u32> {
        let seg = self.nodes[fetcher as usize].info.segment;
        let len = self.stripe_len(g) as u64;
        // Tracking all the sources it can: reuse one of them if it holds the stripe.
        let max_sources = self.nodes[fetcher as usize].info.max_sources as usize;
        if max_sources < self.stripes.len() && self.distinct_sources(fetcher) >= max_sources {
            for s in 0..self.stripes.len() {
                let p = self.parent(fetcher, s);
                if is_peer(p)
                    && self.nodes[p as usize].info.segment == seg
                    && self.valid(fetcher, p, g)
                {
                    load.served[p as usize] += len;
                    return Some(p);
                }
            }
        }
        holders.take(self, fetcher, g, load)
    }

    /// A source outside the fetcher's segment for stripe `g`: the manager while its copies
    /// last, else a holder in a segment ranked earlier, else the manager.
    fn wan_source(&mut self, fetcher: u32, g: usize, wan: &mut Wan, load: &mut Load) -> u32 {
        if wan.manager_left > 0 {
            wan.manager_left -= 1;
            return MANAGER;
        }
        wan.holders.take(self, fetcher, g, load).unwrap_or(MANAGER)
    }

    /// [`valid`](Self::valid) for the plan being built, without the cycle check: holders
    /// are offered only once they have a source for the stripe, and `fetcher` has none yet,
    /// so no holder can be below it.
    fn may_take(&self, fetcher: u32, holder: u32, g: usize) -> bool {
        debug_assert_eq!(self.parent(fetcher, g), UNSET);
        holder != fetcher
            && self.serving(holder)
            && (self.spare(holder) > 0 || self.uses(fetcher, holder))
            && (self.nodes[holder as usize].confirmed || self.parent(holder, g) != UNSET)
            && !self.nodes[fetcher as usize].banned.contains(&holder)
    }

    /// Sets `fetcher`'s source for stripe `g` to `holder` and records its depth in the stripe.
    fn assign(&mut self, fetcher: u32, g: usize, holder: u32, load: &mut Load) {
        self.set_parent(fetcher, g, holder);
        load.depth[fetcher as usize] = if is_peer(holder) {
            load.depth[holder as usize].saturating_add(1)
        } else {
            1
        };
    }

    /// Fetchers `node` may still take on (0 for non-servers).
    fn spare(&self, node: u32) -> usize {
        self.cap(node).saturating_sub(self.load(node))
    }

    /// Distinct holders `fetcher` uses now.
    fn distinct_sources(&self, fetcher: u32) -> usize {
        let mut seen: Vec<u32> = Vec::new();
        for s in 0..self.stripes.len() {
            let h = self.parent(fetcher, s);
            if h != UNSET && !seen.contains(&h) {
                seen.push(h);
            }
        }
        seen.len()
    }

    /// Lists `node` among its segment's servers (once), if it may serve on a named segment.
    pub(super) fn list_on_segment(&mut self, node: u32) {
        let n = &self.nodes[node as usize];
        if n.listed_on_segment || n.info.segment == 0 || !n.info.server || n.failed {
            return;
        }
        let seg = n.info.segment;
        self.nodes[node as usize].listed_on_segment = true;
        self.segment_servers
            .entry(seg)
            .or_default()
            .nodes
            .push(node);
    }

    /// A source for stripe `s` of `fetcher` on its own segment (round-robin over the
    /// segment's servers), if one can take it.
    pub(super) fn pick_on_segment(&mut self, fetcher: u32, s: usize) -> Option<u32> {
        let seg = self.nodes[fetcher as usize].info.segment;
        if seg == 0 {
            return None;
        }
        let list = self.segment_servers.get(&seg)?;
        let n = list.nodes.len();
        if n == 0 {
            return None;
        }
        let start = list.cursor % n;
        let scan = n.min(SCAN_LIMIT);
        let found = (0..scan)
            .map(|step| (step, list.nodes[(start + step) % n]))
            .find(|&(_, h)| self.valid(fetcher, h, s));
        let list = self.segment_servers.get_mut(&seg).expect("looked up above");
        match found {
            Some((step, h)) => {
                list.cursor = start + step + 1;
                Some(h)
            }
            None => {
                list.cursor = start + scan;
                None
            }
        }
    }

    /// Where content enters each segment, best segment first (empty unless the plan was built
    /// segment by segment).
    pub fn segment_entries(&self) -> &[SegmentEntry] {
        &self.entries
    }

    /// Chunks planned to cross into segment `segment` now: stripes its participants fetch from
    /// the manager or from a participant of another segment (for tests and reports).
    pub fn chunks_into_segment(&self, segment: u32) -> u64 {
        let mut total = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.info.segment != segment {
                continue;
            }
            for s in 0..self.stripes.len() {
                let h = self.parent(i as u32, s);
                if h == MANAGER || (is_peer(h) && self.nodes[h as usize].info.segment != segment) {
                    total += self.stripe_len(s) as u64;
                }
            }
        }
        total
    }

    /// Participants of `segment` that fetch at least one stripe from outside it now.
    pub fn wan_fetchers(&self, segment: u32) -> usize {
        (0..self.nodes.len() as u32)
            .filter(|&i| self.nodes[i as usize].info.segment == segment && self.fetches_across(i))
            .count()
    }

    /// Whether `fetcher` fetches anything from outside its own segment now.
    pub fn fetches_across(&self, fetcher: u32) -> bool {
        let seg = self.nodes[fetcher as usize].info.segment;
        (0..self.stripes.len()).any(|s| {
            let h = self.parent(fetcher, s);
            h == MANAGER || (is_peer(h) && self.nodes[h as usize].info.segment != seg)
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::planner::Policy;
    use crate::planner::relay::test_util::{
        assert_covers, leaf, plan_time, segmented_fleet, server,
    };
    use crate::planner::relay::{Holder, NodeInfo, Seed};

    /// (fetcher, stripe) edges that cross segments (or come from the manager).
    fn cross_segment_edges(plan: &RelayPlan) -> usize {
        let mut n = 0;
        for f in 0..plan.len() as u32 {
            for s in 0..plan.stripes().len() {
                let h = plan.parent(f, s);
                if h == UNSET {
                    continue;
                }
                if h == MANAGER
                    || plan.nodes[h as usize].info.segment != plan.nodes[f as usize].info.segment
                {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn stripes_enter_each_segment_once_and_fan_out_inside() {
        // 4 segments of 12 servers and 4 leaves; uploads vary.
        let fleet = |segments: bool| -> Vec<Seed> {
            (0..64u32)
                .map(|i| {
                    let mut seed = if i % 16 < 12 {
                        server(1_000_000 * (1 + i as u64 % 3), 16)
                    } else {
                        leaf(8)
                    };
                    if let Some(info) = &mut seed.info {
                        info.segment = if segments { 1 + i / 16 } else { 0 };
                    }
                    seed
                })
                .collect()
        };
        let local = RelayPlan::build(800, 2_000_000, &Policy::default(), &fleet(true));
        local.check().unwrap();
        assert_covers(&local);
        let k = local.stripes().len();
        assert_eq!(k, 8);
        let cross = cross_segment_edges(&local);
        let mut blind = RelayPlan::build(800, 2_000_000, &Policy::default(), &fleet(false));
        for (n, seed) in fleet(true).iter().enumerate() {
            blind.nodes[n].info.segment = seed.info.unwrap().segment;
        }
        let blind = cross_segment_edges(&blind);
        eprintln!(
            "cross-segment edges: {cross} with locality, {blind} without, of {}",
            64 * k
        );
        // Each stripe enters each segment about once (k · 4 edges), plus what a segment's
        // members cannot take within their upload share.
        assert!(cross <= 3 * k * 4, "{cross} cross-segment edges");
        assert!(
            cross * 3 < blind,
            "locality did not help: {cross} vs {blind}"
        );
        // And it still uses everyone's upload well.
        let ups: Vec<u64> = (0..64).map(|i| 1_000_000 * (1 + i % 3)).collect();
        let t = plan_time(&local, 1000.0, 2_000_000, &ups);
        let total_up: f64 = 2e6
            + (0..64)
                .filter(|i| i % 16 < 12)
                .map(|i| ups[i] as f64)
                .sum::<f64>();
        let bound = (800_000.0 / 2e6f64).max(64.0 * 800_000.0 / total_up);
        assert!(t / bound < 1.3, "plan {t} s vs bound {bound} s");

        // A late joiner on segment 2 takes sources on segment 2.
        let mut plan = local;
        let newcomer = plan.add_node();
        let info = NodeInfo {
            segment: 2,
            ..leaf(16).info.unwrap()
        };
        plan.place(newcomer, info);
        plan.check().unwrap();
        for a in plan.sources(newcomer) {
            match a.holder {
                Holder::Peer(p) => assert_eq!(plan.nodes[p as usize].info.segment, 2),
                Holder::Manager => {}
            }
        }
    }

    #[test]
    fn content_crosses_into_each_segment_once() {
        let chunks = 512;
        for (segments, per) in [(3, 8), (5, 12), (2, 40)] {
            let seeds = segmented_fleet(segments, per);
            let plan = RelayPlan::build(chunks, 4_000_000, &Policy::default(), &seeds);
            plan.check().unwrap();
            assert_covers(&plan);
            for seg in 1..=segments {
                let crossing = plan.chunks_into_segment(seg);
                eprintln!(
                    "{segments}×{per}: segment {seg}: {crossing} of {chunks} chunks cross, {} agents fetch across",
                    plan.wan_fetchers(seg)
                );
                assert!(
                    crossing <= chunks as u64,
                    "segment {seg} of {segments}×{per}: {crossing} chunks planned to cross"
                );
            }
            assert_eq!(plan.segment_entries().len(), segments as usize);
            // And everyone's upload is still used well (chunks of 1 kB).
            let ups: Vec<u64> = seeds
                .iter()
                .map(|s| s.info.map_or(0, |i| if i.server { i.up_bps } else { 0 }))
                .collect();
            let t = plan_time(&plan, 1000.0, 4_000_000, &ups);
            let bytes = chunks as f64 * 1000.0;
            let total_up = 4e6 + ups.iter().sum::<u64>() as f64;
            let bound = (bytes / 4e6).max(seeds.len() as f64 * bytes / total_up);
            let flat_seeds: Vec<Seed> = seeds
                .iter()
                .map(|s| {
                    let mut s = *s;
                    if let Some(i) = &mut s.info {
                        i.segment = 0;
                    }
                    s
                })
                .collect();
            let flat = RelayPlan::build(chunks, 4_000_000, &Policy::default(), &flat_seeds);
            let tf = plan_time(&flat, 1000.0, 4_000_000, &ups);
            eprintln!(
                "{segments}×{per}: plan {t:.3} s (flat {tf:.3} s), bound {bound:.3} s, {} stripes",
                plan.stripes().len()
            );
            // Keeping content inside segments costs little speed. (Flat plans balance their
            // quotas across groups ([`balance`]); segmented ones keep upload-proportional
            // quotas, which leaves the busiest server up to ~15 % over the flat plan's.)
            assert!(t <= tf * 1.2, "plan {t} s vs {tf} s without segments");
        }
    }

    #[test]
    fn the_segments_demo_fleet_plans_as_fast_as_a_flat_one() {
        // `baton demo --segments 3 --agents 24 --size 16MiB`: 32 KiB chunks, uploads of
        // 0.5–2 MiB/s, manager 3 MiB/s, eight agents per segment, a 2 MiB/s leader in each.
        let mib = 1u64 << 20;
        let chunks = 512;
        let ups: Vec<u64> = (0..24u64).map(|i| (1 + i % 4) * mib / 2).collect();
        let fleet = |segments: bool| -> Vec<Seed> {
            (0..24u32)
                .map(|i| Seed {
                    info: Some(NodeInfo {
                        up_bps: ups[i as usize],
                        server: true,
                        capacity: 32,
                        max_sources: 9,
                        segment: if segments { 1 + i / 8 } else { 0 },
                        leader: segments && i % 8 == 3,
                    }),
                    ..Seed::default()
                })
                .collect()
        };
        let chunk_bytes = (16 * mib / chunks as u64) as f64;
        let plan = RelayPlan::build(chunks, 3 * mib, &Policy::default(), &fleet(true));
        plan.check().unwrap();
        assert_covers(&plan);
        let flat = RelayPlan::build(chunks, 3 * mib, &Policy::default(), &fleet(false));
        let t = plan_time(&plan, chunk_bytes, 3 * mib, &ups);
        let tf = plan_time(&flat, chunk_bytes, 3 * mib, &ups);
        eprintln!("demo fleet: plan {t:.2} s with segments, {tf:.2} s without");
        assert!(t <= tf * 1.1, "plan {t} s vs {tf} s without segments");
        for seg in 1..=3 {
            assert!(plan.chunks_into_segment(seg) <= chunks as u64);
            let entry = &plan.segment_entries()[seg as usize - 1];
            assert!(plan.fetches_across(entry.entries[0]));
        }
    }

    #[test]
    fn at_most_m_agents_of_a_segment_fetch_across_the_wan_leader_first() {
        let mut seeds = segmented_fleet(3, 8);
        // Agent 13 (segment 2) is its segment's elected leader.
        seeds[13].info.as_mut().unwrap().leader = true;
        for m in [1u16, 2, 3] {
            let policy = Policy {
                max_wan_transfers_per_segment: m,
                ..Policy::default()
            };
            let plan = RelayPlan::build(400, 4_000_000, &policy, &seeds);
            plan.check().unwrap();
            assert_covers(&plan);
            for seg in 1..=3 {
                assert!(
                    plan.wan_fetchers(seg) <= m as usize,
                    "m={m}: segment {seg} has {} fetching across",
                    plan.wan_fetchers(seg)
                );
                assert!(plan.chunks_into_segment(seg) <= 400);
            }
            let entry = plan
                .segment_entries()
                .iter()
                .find(|e| e.segment == 2)
                .unwrap();
            assert_eq!(entry.entries[0], 13, "the leader enters first");
            if m == 1 {
                assert!(plan.fetches_across(13));
            }
        }
        // Without a limit the stripes enter through different agents, in parallel.
        for seed in &mut seeds {
            if let Some(info) = &mut seed.info
                && info.server
            {
                info.capacity = 16;
            }
        }
        let plan = RelayPlan::build(400, 4_000_000, &Policy::default(), &seeds);
        plan.check().unwrap();
        assert!(plan.stripes().len() > 1);
        assert!(plan.wan_fetchers(2) > 1);
        assert!(plan.chunks_into_segment(2) <= 400);
    }

    #[test]
    fn a_segment_without_servers_fetches_across_and_repairs_stay_inside() {
        let mut seeds = segmented_fleet(3, 8);
        for seed in seeds.iter_mut().skip(16) {
            *seed = Seed {
                info: Some(NodeInfo {
                    segment: 3,
                    ..leaf(4).info.unwrap()
                }),
                ..Seed::default()
            };
        }
        let mut plan = RelayPlan::build(256, 4_000_000, &Policy::default(), &seeds);
        plan.check().unwrap();
        assert_eq!(plan.wan_fetchers(3), 8);
        let seg3 = plan
            .segment_entries()
            .iter()
            .find(|e| e.segment == 3)
            .unwrap();
        assert_eq!((seg3.servers, seg3.entries.len()), (0, 0));
        // A source in segment 1 leaves: its in-segment fetchers get sources in segment 1.
        let entry = plan.segment_entries()[0].clone();
        let gone = entry.entries[0];
        let seg = entry.segment;
        let before = plan.chunks_into_segment(seg);
        let across_before = plan.wan_fetchers(seg);
        let changed = plan.depart(gone);
        plan.check().unwrap();
        assert!(!changed.is_empty());
        // Only what the departed entry fetched from outside is fetched from outside again
        // (by those of its fetchers for whom no source is left inside the segment).
        assert!(plan.chunks_into_segment(seg) <= before);
        assert!(plan.wan_fetchers(seg) <= across_before + 1);
    }
}
