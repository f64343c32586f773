//! Repairs while the job runs: participants come, go, confirm, fail or report trouble.
//!
//! Every change here is local: only the fetchers of the node concerned get new
//! sources, chosen by [`RelayPlan::choose`] (a source already kept, one on the
//! fetcher's segment, a confirmed holder, the lost source's own source, a member
//! of the stripe's group, else the manager) and then grouped onto at most
//! `max_sources` holders by [`RelayPlan::normalize`]. Each public method returns
//! the fetchers whose sources changed, so the engine can tell them. One change
//! is global: [`RelayPlan::adapt_to_rates`] moves fetchers between the members
//! of a stripe's group and the stripe boundaries to measured upload rates.

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};

use super::apportion::apportion_min_max;
use super::{MANAGER, NO_GROUP, NodeInfo, RelayPlan, Retired, SCAN_LIMIT, UNSET, is_peer};

/// Fixed-point scale of a holder's load (fetchers over upload) when loads are compared.
const LOAD_SCALE: u128 = 1 << 40;

/// Which queue of serving candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    Confirmed,
    Group(usize),
}

impl RelayPlan {
    /// `node` came online (for the first time or again) with `info`: it gets sources for every
    /// stripe it lacks one for, and, if it serves, joins the group with the least upload per chunk.
    ///
    /// Returns the fetchers whose sources changed: `node` itself if it is fetching (it needs
    /// instructions), and, if it was already online and now serves fewer, its former fetchers.
    pub fn place(&mut self, node: u32, info: NodeInfo) -> Vec<u32> {
        let n = &mut self.nodes[node as usize];
        let was_online = n.online;
        n.info = NodeInfo {
            max_sources: info.max_sources.max(1),
            ..info
        };
        n.online = true;
        self.segmented |= self.relay && info.segment != 0;
        if !was_online && n.retired == Retired::UntilReturn {
            n.retired = Retired::No;
        }
        // Already online and now serving less (a changed report): move its fetchers away.
        let mut changed = Vec::new();
        if was_online
            && self.load(node) > 0
            && (!self.serving(node) || self.load(node) > self.cap(node))
        {
            self.nodes[node as usize].draining = true;
            changed = self.evict(node);
            self.nodes[node as usize].draining = false;
        }
        let n = &self.nodes[node as usize];
        if n.failed {
            return changed;
        }
        if n.confirmed {
            self.requeue(node);
            self.list_on_segment(node);
            let all: Vec<usize> = (0..self.stripes.len()).collect();
            changed.extend(self.relieve_manager(node, &all));
            return changed;
        }
        let n = &mut self.nodes[node as usize];
        if self.relay && info.server && n.group == NO_GROUP {
            let g = (0..self.groups.len())
                .min_by(|&a, &b| {
                    let (ga, gb) = (&self.groups[a], &self.groups[b]);
                    let (la, lb) = (self.stripe_len(a) as u128, self.stripe_len(b) as u128);
                    (ga.up * lb).cmp(&(gb.up * la)).then(a.cmp(&b))
                })
                .expect("at least one stripe");
            self.groups[g].up += self.eff_up(node) as u128;
            self.nodes[node as usize].group = g as u32;
        }
        self.requeue(node);
        self.list_on_segment(node);
        let mut prefer = None;
        for s in 0..self.stripes.len() {
            let cur = self.parent(node, s);
            if cur == MANAGER || (is_peer(cur) && self.valid(node, cur, s)) {
                continue;
            }
            let h = self.choose(node, s, prefer, None);
            self.set_parent(node, s, h);
            if is_peer(h) {
                prefer = Some(h);
            }
        }
        self.normalize(node);
        changed.push(node);
        if let Some(g) = self.group(node) {
            changed.extend(self.relieve_manager(node, &[g]));
        }
        changed
    }

    /// What `node` would carry per upload with `extra` more chunks to serve (fixed point,
    /// [`LOAD_SCALE`] = one chunk per byte/s): the measure holders are compared by.
    fn load_with(&self, node: u32, extra: u64) -> u128 {
        (self.nodes[node as usize].served as u128 + extra as u128) * LOAD_SCALE
            / self.eff_up(node).max(1) as u128
    }

    /// Moves fetchers of `stripes` that fetch them from the manager (a repair's last resort,
    /// e.g. while `node` was away) to `node`, which now relays them (a member of its group back
    /// online, or a holder of the whole content), until it carries as much per upload as the
    /// average serving peer. Returns the fetchers moved.
    fn relieve_manager(&mut self, node: u32, stripes: &[usize]) -> Vec<u32> {
        if self.segmented || !self.serving(node) {
            return Vec::new();
        }
        let (mut sum, mut count) = (0u128, 0u128);
        for i in 0..self.nodes.len() as u32 {
            if self.serving(i) && i != node {
                sum += self.load_with(i, 0);
                count += 1;
            }
        }
        let average = sum.checked_div(count).unwrap_or(u128::MAX);
        let mut moved = Vec::new();
        for &s in stripes {
            let len = self.stripe_len(s) as u64;
            for f in 0..self.nodes.len() as u32 {
                if self.load_with(node, len) > average {
                    break;
                }
                if f == node
                    || self.parent(f, s) != MANAGER
                    || self.nodes[f as usize].group == s as u32
                {
                    // Members of the stripe's group that fetch it from the manager are its roots.
                    continue;
                }
                if self.valid(f, node, s) {
                    self.set_parent(f, s, node);
                    self.normalize(f);
                    moved.push(f);
                }
            }
        }
        moved.sort_unstable();
        moved.dedup();
        moved
    }

    /// `node` went offline: its fetchers are routed around it and its own sources are released.
    pub fn depart(&mut self, node: u32) -> Vec<u32> {
        if !self.nodes[node as usize].online {
            return Vec::new();
        }
        self.nodes[node as usize].online = false;
        let changed = self.evict(node);
        self.release(node);
        changed
    }

    /// `node` holds the whole content: it fetches nothing more and serves every stripe.
    pub fn confirm(&mut self, node: u32) {
        self.nodes[node as usize].confirmed = true;
        self.nodes[node as usize].failed = false;
        self.release(node);
        self.requeue(node);
        self.list_on_segment(node);
    }

    /// `node` gave up or was given up: it neither fetches nor serves; its fetchers are rerouted.
    pub fn fail(&mut self, node: u32) -> Vec<u32> {
        self.nodes[node as usize].failed = true;
        let changed = self.evict(node);
        self.release(node);
        changed
    }

    /// Undoes [`fail`](Self::fail) (a given-up participant came back); call [`place`](Self::place) next.
    pub fn revive(&mut self, node: u32) {
        self.nodes[node as usize].failed = false;
    }

    /// `fetcher` reported trouble with `source`: it is never offered `source` again, and its
    /// stripes from `source` get another holder. Returns whether its sources changed.
    pub fn ban(&mut self, fetcher: u32, source: u32) -> bool {
        if fetcher == source || source as usize >= self.nodes.len() {
            return false;
        }
        let n = &mut self.nodes[fetcher as usize];
        if !n.banned.contains(&source) {
            n.banned.push(source);
        }
        if !self.uses(fetcher, source) {
            return false;
        }
        let mut prefer = None;
        for s in 0..self.stripes.len() {
            if self.parent(fetcher, s) != source {
                continue;
            }
            let gp = self.parent(source, s);
            let h = self.choose(fetcher, s, prefer, is_peer(gp).then_some(gp));
            self.set_parent(fetcher, s, h);
            if is_peer(h) {
                prefer = Some(h);
            }
        }
        self.normalize(fetcher);
        true
    }

    /// Takes measured upload rates (`(node, bytes/s)`) and adapts the plan to them: inside
    /// each stripe's group, fetchers move from members with more than their upload's share
    /// to members with less ([`RelayPlan::rebalance_fetchers`]), and then every stripe gets
    /// the length that makes its most loaded holder finish with the others
    /// ([`RelayPlan::resize_stripes`]). Returns whether anything changed.
    pub fn adapt_to_rates(&mut self, rates: &[(u32, u64)], manager_up_bps: u64) -> bool {
        for &(node, up) in rates {
            if let Some(n) = self.nodes.get_mut(node as usize)
                && up > 0
            {
                n.info.up_bps = up;
            }
        }
        let moved = !self.rebalance_fetchers().is_empty();
        let resized = self.resize_stripes(manager_up_bps);
        moved || resized
    }

    /// Moves fetchers inside each stripe's group so that every member's fetchers in the
    /// stripe are about in proportion to its upload (the least-maximum split of the
    /// movable ones; a member's own group members stay where they are, so no relay chain
    /// changes and no cycle can form). A fetcher that already uses the new member for another
    /// stripe is moved first (no new connection). Returns the fetchers that moved.
    pub fn rebalance_fetchers(&mut self) -> Vec<u32> {
        let k = self.stripes.len();
        // Serving members per group, and each member's position in its group's list.
        let mut groups: Vec<Vec<u32>> = vec![Vec::new(); k];
        let mut position = vec![usize::MAX; self.nodes.len()];
        for i in 0..self.nodes.len() as u32 {
            let g = self.nodes[i as usize].group as usize;
            if g < k && self.serving(i) {
                position[i as usize] = groups[g].len();
                groups[g].push(i);
            }
        }
        let mut moved: Vec<u32> = Vec::new();
        for (s, members) in groups.iter().enumerate() {
            if members.len() < 2 {
                continue;
            }
            // Per member: fetchers of stripe `s` that are members too (fixed), and the others.
            let mut fixed = vec![0u128; members.len()];
            let mut movable: Vec<Vec<u32>> = vec![Vec::new(); members.len()];
            for f in 0..self.nodes.len() as u32 {
                let h = self.parent(f, s);
                if !is_peer(h) || self.nodes[h as usize].group != s as u32 {
                    continue;
                }
                let m = position[h as usize];
                if m == usize::MAX {
                    continue;
                }
                if self.nodes[f as usize].group == s as u32 {
                    fixed[m] += 1;
                } else {
                    movable[m].push(f);
                }
            }
            let total: usize = movable.iter().map(Vec::len).sum();
            let up: Vec<u128> = members
                .iter()
                .map(|&m| self.eff_up(m).max(1) as u128)
                .collect();
            let mut target = vec![0u128; members.len()];
            for _ in 0..total {
                let m = (0..members.len())
                    .min_by_key(|&m| ((fixed[m] + target[m] + 1) * LOAD_SCALE / up[m], m))
                    .expect("two members or more");
                target[m] += 1;
            }
            let mut surplus: Vec<u32> = Vec::new();
            for m in 0..members.len() {
                let keep = target[m] as usize;
                if movable[m].len() > keep {
                    surplus.extend(movable[m].drain(keep..));
                }
            }
            for m in 0..members.len() {
                let dest = members[m];
                let mut want = (target[m] as usize).saturating_sub(movable[m].len());
                // Those already connected to `dest` first, then any it may serve.
                for pass in 0..2 {
                    let mut i = 0;
                    while want > 0 && i < surplus.len() {
                        let f = surplus[i];
                        let connected = self.uses(f, dest);
                        if (pass == 0 && !connected) || !self.valid(f, dest, s) {
                            i += 1;
                            continue;
                        }
                        self.set_parent(f, s, dest);
                        surplus.swap_remove(i);
                        moved.push(f);
                        want -= 1;
                    }
                }
            }
        }
        moved.sort_unstable();
        moved.dedup();
        for &f in &moved {
            self.normalize(f);
        }
        moved
    }

    /// Resizes the stripes to the plan's upload rates: every stripe gets the length that
    /// makes its most loaded holder (its fetchers in the stripe over its upload; the
    /// manager's upload counted as shared evenly by the stripes) finish with the others.
    /// Who fetches from whom stays as it is, so no new connection is needed; only the chunk
    /// ranges move. Returns whether any stripe changed.
    pub fn resize_stripes(&mut self, manager_up_bps: u64) -> bool {
        let k = self.stripes.len();
        if k < 2 || self.chunks < k as u32 {
            return false;
        }
        // Fetchers per holder and stripe (the manager as holder `nodes.len()`).
        let manager = self.nodes.len();
        let mut load: HashMap<(usize, usize), u128> = HashMap::new();
        for node in 0..self.nodes.len() {
            for s in 0..k {
                let h = self.parent(node as u32, s);
                if h == MANAGER {
                    *load.entry((manager, s)).or_default() += 1;
                } else if is_peer(h) {
                    *load.entry((h as usize, s)).or_default() += 1;
                }
            }
        }
        let manager_up = (manager_up_bps.max(1) as u128).div_ceil(k as u128);
        let mut costs = vec![1u128; k];
        for (&(h, s), &fetchers) in &load {
            let up = if h == manager {
                manager_up
            } else {
                self.eff_up(h as u32) as u128
            };
            costs[s] = costs[s].max(fetchers * LOAD_SCALE / up.max(1));
        }
        let sizes = apportion_min_max(self.chunks, &costs);
        let mut first = 0;
        let stripes: Vec<(u32, u32)> = sizes
            .iter()
            .map(|&len| {
                first += len;
                (first - len, first)
            })
            .collect();
        if stripes == self.stripes {
            return false;
        }
        self.stripes = stripes;
        for i in 0..self.nodes.len() as u32 {
            self.nodes[i as usize].served = self.served_chunks(super::Holder::Peer(i));
        }
        for g in 0..self.groups.len() {
            self.groups[g].up = (0..self.nodes.len() as u32)
                .filter(|&i| self.nodes[i as usize].group == g as u32)
                .map(|i| self.eff_up(i) as u128)
                .sum();
        }
        true
    }

    /// `source` stops serving in this job (until it comes back online, or `forever`, e.g. after
    /// a bad chunk): every fetcher using it is routed around it.
    pub fn retire(&mut self, source: u32, forever: bool) -> Vec<u32> {
        let n = &mut self.nodes[source as usize];
        n.retired = if forever || n.retired == Retired::Forever {
            Retired::Forever
        } else {
            Retired::UntilReturn
        };
        self.evict(source)
    }

    /// Re-checks `fetcher`'s sources (e.g. when it asks for more): any that can no longer serve
    /// it is replaced. Returns whether anything changed.
    pub fn refresh(&mut self, fetcher: u32) -> bool {
        let n = &self.nodes[fetcher as usize];
        if !n.online || n.confirmed || n.failed {
            return false;
        }
        let mut changed = false;
        let mut prefer = None;
        for s in 0..self.stripes.len() {
            let cur = self.parent(fetcher, s);
            if cur == MANAGER || (is_peer(cur) && self.valid(fetcher, cur, s)) {
                continue;
            }
            let extra = if is_peer(cur) {
                Some(self.parent(cur, s)).filter(|&p| is_peer(p))
            } else {
                None
            };
            let h = self.choose(fetcher, s, prefer, extra);
            self.set_parent(fetcher, s, h);
            if is_peer(h) {
                prefer = Some(h);
            }
            changed = true;
        }
        if changed {
            self.normalize(fetcher);
        }
        changed
    }

    /// Sends `fetcher` to the manager for the whole content (the last resort).
    pub fn all_from_manager(&mut self, fetcher: u32) {
        for s in 0..self.stripes.len() {
            self.set_parent(fetcher, s, MANAGER);
        }
    }

    fn queue(&self, which: Queue) -> &VecDeque<u32> {
        match which {
            Queue::Confirmed => &self.confirmed,
            Queue::Group(g) => &self.groups[g].queue,
        }
    }

    /// Whether `node` belongs at the front of `which` at all (for anyone).
    fn queue_usable(&self, node: u32, which: Queue) -> bool {
        let n = &self.nodes[node as usize];
        self.serving(node)
            && n.children.len() < self.cap(node)
            && match which {
                Queue::Confirmed => n.confirmed,
                Queue::Group(g) => !n.confirmed && n.group == g as u32,
            }
    }

    /// Drops the entries at the front of `which` that cannot take another fetcher.
    fn clean_front(&mut self, which: Queue) {
        while let Some(&front) = self.queue(which).front() {
            if self.queue_usable(front, which) {
                break;
            }
            match which {
                Queue::Confirmed => {
                    self.confirmed.pop_front();
                    self.nodes[front as usize].queued_confirmed = false;
                }
                Queue::Group(g) => {
                    self.groups[g].queue.pop_front();
                    self.nodes[front as usize].queued_group = false;
                }
            }
        }
    }

    /// The first entry of `which` that may serve stripe `s` to `fetcher`.
    fn pick(&mut self, which: Queue, fetcher: u32, s: usize) -> Option<u32> {
        self.clean_front(which);
        // The first that may serve, preferring one on the fetcher's own segment.
        let seg = self.nodes[fetcher as usize].info.segment;
        let mut first = None;
        for &h in self.queue(which).iter().take(SCAN_LIMIT) {
            if !self.valid(fetcher, h, s) {
                continue;
            }
            if seg == 0 || self.nodes[h as usize].info.segment == seg {
                return Some(h);
            }
            first.get_or_insert(h);
        }
        first
    }

    /// A holder for stripe `s` of `fetcher`, else the manager.
    ///
    /// On a flat network: of `prefer` (a source it already got in this round, if it holds
    /// everything or relays this stripe), the confirmed holders, `extra` (the lost source's own
    /// source) and the members of the stripe's group with room, the one that would finish its
    /// load first (chunks it serves, this stripe
    /// included, over its upload; ties in that order). So fetchers placed one by one (late
    /// joiners, everyone coming back after a manager restart) spread over the holders in
    /// proportion to their upload instead of all taking the first with room. On segments: the
    /// first of `prefer`, a holder on the fetcher's segment, a confirmed holder, `extra`, a
    /// member of the stripe's group.
    fn choose(&mut self, fetcher: u32, s: usize, prefer: Option<u32>, extra: Option<u32>) -> u32 {
        if !self.segmented {
            return self.least_loaded(fetcher, s, prefer, extra);
        }
        if let Some(p) = prefer
            && self.valid(fetcher, p, s)
        {
            return p;
        }
        if !self.relay {
            return MANAGER;
        }
        if let Some(h) = self.pick_on_segment(fetcher, s) {
            return h;
        }
        if let Some(h) = self.pick(Queue::Confirmed, fetcher, s) {
            return h;
        }
        if let Some(e) = extra
            && self.valid(fetcher, e, s)
        {
            return e;
        }
        self.pick(Queue::Group(s), fetcher, s).unwrap_or(MANAGER)
    }

    /// The holder [`choose`](Self::choose) takes on a flat network.
    fn least_loaded(
        &mut self,
        fetcher: u32,
        s: usize,
        prefer: Option<u32>,
        extra: Option<u32>,
    ) -> u32 {
        if !self.relay {
            return MANAGER;
        }
        let len = self.stripe_len(s) as u64;
        if self.holders_first {
            // The least loaded holder of the whole content with room, if there is one.
            self.clean_front(Queue::Confirmed);
            let mut best: Option<(u128, u32)> = None;
            let candidates = prefer
                .filter(|&p| self.nodes[p as usize].confirmed)
                .into_iter()
                .chain(
                    self.queue(Queue::Confirmed)
                        .iter()
                        .take(SCAN_LIMIT)
                        .copied(),
                );
            for h in candidates {
                if self.valid(fetcher, h, s) {
                    let c = self.load_with(h, len);
                    if best.is_none_or(|(b, _)| c < b) {
                        best = Some((c, h));
                    }
                }
            }
            if let Some((_, h)) = best {
                return h;
            }
        }
        let mut best: Option<(u128, u32)> = None;
        let mut consider = |plan: &Self, h: u32| {
            if plan.valid(fetcher, h, s) {
                let c = plan.load_with(h, len);
                if best.is_none_or(|(b, _)| c < b) {
                    best = Some((c, h));
                }
            }
        };
        // Only a holder of the whole content or a member of the stripe's group relays it: any
        // other fetcher gets the stripe last, and hanging fetchers on it builds chains.
        if let Some(p) = prefer
            && (self.nodes[p as usize].confirmed || self.nodes[p as usize].group == s as u32)
        {
            consider(self, p);
        }
        for which in [Queue::Confirmed, Queue::Group(s)] {
            self.clean_front(which);
            for &h in self.queue(which).iter().take(SCAN_LIMIT) {
                consider(self, h);
            }
            if which == Queue::Confirmed
                && let Some(e) = extra
            {
                consider(self, e);
            }
        }
        best.map_or(MANAGER, |(_, h)| h)
    }

    /// Moves every fetcher of `node` to other holders; returns them.
    fn evict(&mut self, node: u32) -> Vec<u32> {
        let children = self.nodes[node as usize].children.clone();
        for &c in &children {
            let mut prefer = None;
            for s in 0..self.stripes.len() {
                if self.parent(c, s) != node {
                    continue;
                }
                let gp = self.parent(node, s);
                let h = self.choose(c, s, prefer, is_peer(gp).then_some(gp));
                self.set_parent(c, s, h);
                if is_peer(h) {
                    prefer = Some(h);
                }
            }
            self.normalize(c);
        }
        children
    }

    /// Groups `fetcher`'s stripes onto at most `max_sources` distinct holders: it keeps the
    /// source of its own stripe and its biggest ones; the rest move onto a kept one, else to
    /// the manager.
    pub(super) fn normalize(&mut self, fetcher: u32) {
        let k = self.stripes.len();
        let limit = self.nodes[fetcher as usize].info.max_sources.max(1) as usize;
        let own = self.group(fetcher).map(|g| self.parent(fetcher, g));
        for attempt in 0..2 {
            let mut held: Vec<(u32, u64)> = Vec::new();
            for s in 0..k {
                let h = self.parent(fetcher, s);
                if h == UNSET {
                    continue;
                }
                let len = self.stripe_len(s) as u64;
                match held.iter_mut().find(|e| e.0 == h) {
                    Some(e) => e.1 += len,
                    None => held.push((h, len)),
                }
            }
            if held.len() <= limit {
                return;
            }
            held.sort_by_key(|&(h, len)| (Some(h) != own, Reverse(len), h));
            let mut kept: Vec<u32> = held[..limit].iter().map(|e| e.0).collect();
            if attempt == 1 && !kept.contains(&MANAGER) {
                kept.pop();
                kept.push(MANAGER);
            }
            for s in 0..k {
                let h = self.parent(fetcher, s);
                if h == UNSET || kept.contains(&h) {
                    continue;
                }
                let target = kept
                    .iter()
                    .copied()
                    .find(|&q| q != MANAGER && self.valid(fetcher, q, s))
                    .unwrap_or(MANAGER);
                self.set_parent(fetcher, s, target);
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::planner::Policy;
    use crate::planner::relay::test_util::{assert_covers, leaf, server};
    use crate::planner::relay::{Holder, Seed};

    #[test]
    fn with_holders_first_a_later_wave_fetches_from_holders_not_from_each_other() {
        // Wave 1 (nodes 0-3) was planned alone and holds the content; wave 2 (4-11) is
        // placed afterwards, servers all.
        let mut seeds = vec![server(1_000_000, 8); 4];
        seeds.extend(vec![Seed::default(); 8]);
        let place_wave_2 = |holders_first: bool| {
            let mut plan = RelayPlan::build(64, 0, &Policy::default(), &seeds);
            plan.set_holders_first(holders_first);
            for h in 0..4 {
                plan.confirm(h);
            }
            for n in 4..12 {
                plan.place(n, server(1_000_000, 8).info.unwrap());
                plan.check().unwrap();
            }
            assert_covers(&plan);
            (4..12u32)
                .flat_map(|n| plan.sources(n))
                .filter(|a| !matches!(a.holder, Holder::Peer(h) if h < 4))
                .map(|a| a.end - a.first)
                .sum::<u32>()
        };
        assert_eq!(
            place_wave_2(true),
            0,
            "every chunk of wave 2 comes from a holder"
        );
        assert!(
            place_wave_2(false) > 0,
            "without it, wave 2 also relays among itself"
        );
    }

    #[test]
    fn a_departed_source_is_routed_around_to_less_loaded_holders() {
        let seeds = vec![server(1_000_000, 32); 10];
        let mut plan = RelayPlan::build(100, 0, &Policy::default(), &seeds);
        plan.confirm(9);
        plan.check().unwrap();
        let fetchers = plan.nodes[0].children.clone();
        assert!(!fetchers.is_empty());
        let changed = plan.depart(0);
        plan.check().unwrap();
        assert_eq!(changed.len(), fetchers.len());
        for &c in &changed {
            assert!(plan.sources(c).iter().all(|a| a.holder != Holder::Peer(0)));
        }
        // The confirmed holder, as loaded as any, took a share.
        assert!(changed.iter().any(|&c| plan.uses(c, 9)));
        assert_eq!(plan.load(0), 0);
        // It comes back: it gets sources again and is a source again for newcomers.
        assert_eq!(plan.place(0, seeds[0].info.unwrap()), vec![0]);
        plan.check().unwrap();
        assert_covers(&plan);
    }

    #[test]
    fn banned_and_retired_sources_are_not_offered_again() {
        let seeds = vec![server(1_000_000, 32); 6];
        let mut plan = RelayPlan::build(60, 0, &Policy::default(), &seeds);
        let src = match plan.sources(5).iter().find_map(|a| match a.holder {
            Holder::Peer(p) => Some(p),
            Holder::Manager => None,
        }) {
            Some(p) => p,
            None => panic!("no peer source"),
        };
        assert!(plan.ban(5, src));
        plan.check().unwrap();
        assert!(
            plan.sources(5)
                .iter()
                .all(|a| a.holder != Holder::Peer(src))
        );
        // Even after others change, the banned one is never chosen for 5.
        let other = (0..5).find(|&i| i != src).unwrap();
        plan.depart(other);
        plan.refresh(5);
        assert!(
            plan.sources(5)
                .iter()
                .all(|a| a.holder != Holder::Peer(src))
        );
        // Retiring a source moves everyone off it.
        let changed = plan.retire(src, true);
        plan.check().unwrap();
        assert_eq!(plan.load(src), 0);
        for c in changed {
            assert!(
                plan.sources(c)
                    .iter()
                    .all(|a| a.holder != Holder::Peer(src))
            );
        }
        plan.depart(src);
        plan.place(src, seeds[0].info.unwrap());
        // Forever: it fetches, but serves no one.
        assert_eq!(plan.load(src), 0);
        assert!(!plan.serving(src));
        plan.check().unwrap();
    }

    #[test]
    fn late_joiners_fill_empty_groups_and_take_confirmed_holders() {
        // A resumed job: nobody online yet; two already confirmed.
        let mut seeds = vec![Seed::default(); 30];
        seeds[3].confirmed = true;
        seeds[4].confirmed = true;
        let mut plan = RelayPlan::build(300, 0, &Policy::default(), &seeds);
        assert_eq!(plan.stripes().len(), 8);
        for i in 5..30 {
            let changed = plan.place(i, server(1_000_000, 4).info.unwrap());
            assert_eq!(changed[0], i);
            // Those it relieved the manager of now fetch from it.
            for &c in &changed[1..] {
                assert!(plan.uses(c, i), "{c} moved but does not use {i}");
            }
            plan.check().unwrap();
        }
        assert_covers(&plan);
        // Every group has a member.
        for g in 0..8 {
            assert!((5..30).any(|i| plan.group(i) == Some(g)), "group {g} empty");
        }
        // A confirmed holder comes online: newcomers use it, the least loaded holder, first.
        plan.place(3, server(1_000_000, 4).info.unwrap());
        let newcomer = plan.add_node();
        plan.place(newcomer, leaf(2).info.unwrap());
        plan.check().unwrap();
        assert!(
            plan.sources(newcomer)
                .iter()
                .any(|a| a.holder == Holder::Peer(3))
        );
    }

    #[test]
    fn late_joiners_spread_over_the_holders_in_proportion_to_upload() {
        // 24 agents done, as a job near its end; 6 join late. Without a measure of load they
        // would all take the first holder with room for every stripe.
        let mut seeds: Vec<Seed> = (0..24)
            .map(|i| server(1_000_000 * (1 + i % 3), 32))
            .collect();
        let mut plan = RelayPlan::build(800, 0, &Policy::default(), &seeds);
        for i in 0..24 {
            plan.confirm(i);
        }
        seeds.clear();
        for _ in 0..6 {
            let late = plan.add_node();
            plan.place(late, server(1_000_000, 32).info.unwrap());
            plan.check().unwrap();
        }
        assert_covers(&plan);
        // 6 copies of 800 chunks over 24 holders with 48 MB/s in all: each serves about
        // 100 chunks per MB/s of its upload; none more than twice that.
        for i in 0..24u32 {
            let up = (1 + i % 3) as u64;
            let served = plan.served_chunks(Holder::Peer(i));
            assert!(
                served <= 2 * 100 * up,
                "holder {i} ({up} MB/s) serves {served} chunks"
            );
        }
        assert_eq!(plan.served_chunks(Holder::Manager), 0);
    }

    #[test]
    fn failed_fetchers_release_and_are_routed_around() {
        let seeds = vec![server(1_000_000, 2); 40];
        let mut plan = RelayPlan::build(400, 0, &Policy::default(), &seeds);
        for i in (0..40).step_by(3) {
            plan.fail(i);
            plan.check().unwrap();
        }
        assert_covers(&plan);
        for i in (0..40).step_by(3) {
            assert_eq!(plan.load(i), 0);
            assert!(plan.sources(i).is_empty());
        }
    }

    /// Random operation sequences keep every invariant.
    #[test]
    fn random_operations_keep_invariants() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for round in 0..60 {
            let n = 5 + rand(60) as usize;
            let seeds: Vec<Seed> = (0..n)
                .map(|_| {
                    let mut seed = match rand(4) {
                        0 => Seed::default(),
                        1 => leaf(1 + rand(4) as u16),
                        _ => server(rand(5) * 1_000_000, 1 + rand(6) as u16),
                    };
                    if let Some(info) = &mut seed.info {
                        info.segment = rand(4) as u32;
                    }
                    seed
                })
                .collect();
            let policy = Policy {
                max_stripes: 1 + rand(12) as u16,
                ..Policy::default()
            };
            let mut plan =
                RelayPlan::build(1 + rand(500) as u32, rand(3) * 1_000_000, &policy, &seeds);
            plan.check()
                .unwrap_or_else(|e| panic!("round {round} build: {e}"));
            for step in 0..200 {
                let a = rand(plan.len() as u64) as u32;
                let b = rand(plan.len() as u64) as u32;
                match rand(8) {
                    0 => {
                        plan.depart(a);
                    }
                    1 => {
                        let info = match rand(2) {
                            0 => leaf(1 + rand(3) as u16),
                            _ => server(rand(3) * 1_000_000, 1 + rand(4) as u16),
                        };
                        plan.place(a, info.info.unwrap());
                    }
                    2 => {
                        plan.confirm(a);
                    }
                    3 => {
                        plan.fail(a);
                    }
                    4 => {
                        plan.ban(a, b);
                    }
                    5 => {
                        plan.retire(a, rand(2) == 0);
                    }
                    6 => {
                        plan.refresh(a);
                    }
                    _ => {
                        let i = plan.add_node();
                        plan.place(i, server(1_000_000, 2).info.unwrap());
                    }
                }
                plan.check()
                    .unwrap_or_else(|e| panic!("round {round} step {step}: {e}"));
            }
        }
    }
}
