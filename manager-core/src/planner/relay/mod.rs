//! The relay plan: for every participant and every stripe of the content, who it fetches from.
//!
//! The chunk index space is cut into `K` contiguous **stripes**, one per
//! **group** of serving agents; a stripe's size is proportional to its
//! group's total upload capacity, so every group needs about the same time to
//! push its stripe to everyone. Inside a stripe the sources form a tree: the
//! group's first member (its root) fetches the stripe from the manager, the
//! other members and then every other participant fetch it from a member
//! (or from the manager, which takes a share proportional to its own upload
//! capacity, and whatever no member has room for). A member takes children
//! in proportion to its upload, never more than its capacity (`max_peers`,
//! capped by the policy). Members relay cut-through, from their first
//! verified chunk, so the stripes flow in parallel and every agent uploads
//! about as long as every other: the Kumar–Ross construction.
//!
//! The number of stripes is bounded by the policy and by the servers'
//! capacities: every stripe costs every fetcher a source, so when agents serve
//! few peers the plan uses fewer, bigger stripes (down to one tree).
//!
//! A participant that can track fewer sources than it has gets fewer, bigger
//! ones: its extra stripes move to one of the sources it keeps, or to the
//! manager. The plan never holds a cycle (a fetcher is never made, directly
//! or through others, the source of its own source for the same stripe).
//!
//! After the initial [`RelayPlan::build`], the plan is repaired in place:
//! late or returning participants are [placed](RelayPlan::place), sources
//! that leave, fail or misbehave are routed around (their fetchers get a
//! confirmed holder first, else the lost source's own source, else another
//! member of the stripe's group, else the manager). Every repair returns the
//! fetchers whose sources changed, so the engine can tell them.
//!
//! The code follows those steps: [`apportion`] holds the integer
//! apportionment helpers (proportional and least-maximum splits, longest
//! processing time first), [`balance`] the balanced groups, stripe lengths and
//! quotas of a flat fleet, [`build`] the initial plan, [`segments`] the plan
//! and the source search on LAN segments, and [`repair`] the changes made while
//! the job runs. This module holds the plan's data, its queries, its
//! invariants ([`RelayPlan::check`]) and the parent-table bookkeeping all of
//! them share.

use std::collections::{HashMap, VecDeque};

use super::Policy;

mod apportion;
mod balance;
mod build;
mod repair;
mod segments;
#[cfg(test)]
mod test_util;

pub use segments::SegmentEntry;
use segments::SegmentServers;

/// Parent value: the manager.
const MANAGER: u32 = u32::MAX;

/// What the manager brings to one stripe: its share of its upload (in proportion to the
/// stripe's group upload) and how many fetchers it may serve directly beyond seeding the
/// stripe ([`Policy::manager_max_copies`]).
#[derive(Clone, Copy, Debug)]
struct ManagerBudget {
    share: u128,
    extra: u128,
}
/// Parent value: nothing assigned (the node is offline, confirmed or failed).
const UNSET: u32 = u32::MAX - 1;
/// Group value: not a member of any group.
const NO_GROUP: u32 = u32::MAX;
/// Entries looked at in a queue for one fetcher before falling back.
const SCAN_LIMIT: usize = 32;

fn is_peer(h: u32) -> bool {
    h < UNSET
}

/// Where a participant fetches a chunk range from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// The manager.
    Manager,
    /// Another participant, by its index in the plan.
    Peer(u32),
}

impl Holder {
    fn from_raw(h: u32) -> Self {
        if h == MANAGER {
            Holder::Manager
        } else {
            Holder::Peer(h)
        }
    }
}

/// One contiguous chunk range `first..end` of a participant's sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// First chunk index.
    pub first: u32,
    /// One past the last chunk index.
    pub end: u32,
    /// Who serves it.
    pub holder: Holder,
}

/// What the plan needs to know of one participant (see [`Policy::node_info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Upload capacity in bytes/s; `0` = unknown (counted as an average agent).
    pub up_bps: u64,
    /// Whether it may serve peers (willing, has a listen address, not leaf-only).
    pub server: bool,
    /// Most peers it serves for this job (0 for non-servers).
    pub capacity: u16,
    /// Most distinct sources it can track (at least 1).
    pub max_sources: u16,
    /// Its LAN segment, as a number (`0` = unknown: no locality); sources on the same
    /// segment are preferred.
    pub segment: u32,
    /// It is its segment's elected leader (a hint: content enters the segment through it
    /// first, if it may serve).
    pub leader: bool,
}

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            up_bps: 0,
            server: false,
            capacity: 0,
            max_sources: 1,
            segment: 0,
            leader: false,
        }
    }
}

/// A participant's situation when the plan is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Seed {
    /// `Some` if it is online now (with what it reported), `None` if not (yet).
    pub info: Option<NodeInfo>,
    /// It already holds the whole content (serves, never fetches).
    pub confirmed: bool,
    /// It gave up or was given up (neither fetches nor serves).
    pub failed: bool,
}

/// Why a node does not serve (beyond being offline or failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retired {
    /// It serves.
    No,
    /// Reported unreachable: not a source until it comes back online.
    UntilReturn,
    /// Served a bad chunk: never a source again in this job.
    Forever,
}

/// One participant in the plan.
#[derive(Clone, Debug)]
struct Node {
    info: NodeInfo,
    online: bool,
    confirmed: bool,
    failed: bool,
    retired: Retired,
    /// Group index, or [`NO_GROUP`].
    group: u32,
    /// Distinct fetchers that use this node for at least one stripe.
    children: Vec<u32>,
    /// Chunks it is set to serve, over all its fetchers and stripes.
    served: u64,
    /// Sources this node reported as troublesome: never offered to it again.
    banned: Vec<u32>,
    queued_group: bool,
    queued_confirmed: bool,
    /// Being emptied of fetchers: not offered to anyone meanwhile.
    draining: bool,
    /// Listed in its segment's [`SegmentServers`].
    listed_on_segment: bool,
}

impl Node {
    fn new(seed: &Seed) -> Self {
        Node {
            info: seed.info.unwrap_or_default(),
            online: seed.info.is_some(),
            confirmed: seed.confirmed,
            failed: seed.failed,
            retired: Retired::No,
            group: NO_GROUP,
            children: Vec::new(),
            served: 0,
            banned: Vec::new(),
            queued_group: false,
            queued_confirmed: false,
            draining: false,
            listed_on_segment: false,
        }
    }
}

/// The agents relaying one stripe.
#[derive(Clone, Debug)]
struct Group {
    /// Sum of the members' (effective) upload, bytes/s.
    up: u128,
    /// Members that may have room for another fetcher, oldest first (lazily cleaned).
    queue: VecDeque<u32>,
}

/// The live relay plan of one job: per participant and stripe, its source.
///
/// Participants are numbered `0..len()` in the order of the prioritized list
/// (the engine's participant index). Methods that change the plan return
/// the indices of the fetchers whose sources changed.
#[derive(Clone, Debug)]
pub struct RelayPlan {
    chunks: u32,
    /// `(first, end)` per stripe; stripe `g` is relayed by group `g`.
    stripes: Vec<(u32, u32)>,
    nodes: Vec<Node>,
    /// `parents[node * K + stripe]`: a peer index, [`MANAGER`] or [`UNSET`].
    parents: Vec<u32>,
    groups: Vec<Group>,
    /// Confirmed servers that may have room, oldest first (lazily cleaned).
    confirmed: VecDeque<u32>,
    /// Upload assumed for agents that report none.
    default_up: u64,
    relay: bool,
    /// Participants report named segments and the policy keeps content inside them: the
    /// plan was built by [`segments`] and repairs look for sources on the fetcher's segment.
    segmented: bool,
    /// Per segment number: the nodes that serve there (for repairs inside the segment).
    segment_servers: HashMap<u32, SegmentServers>,
    /// Per segment, where content enters it, best segment first (see [`SegmentEntry`]).
    entries: Vec<SegmentEntry>,
    /// Fetchers take a holder of the whole content with room before a member of the
    /// stripe's group (a staged rollout's later waves fetch from the earlier ones).
    holders_first: bool,
}

impl RelayPlan {
    /// Number of participants (indices `0..len()`).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the plan has no participants.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Number of chunks of the content.
    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    /// The stripes, as `(first, end)` chunk ranges; stripe `g` is relayed by group `g`.
    pub fn stripes(&self) -> &[(u32, u32)] {
        &self.stripes
    }

    /// The group (stripe) `node` relays, if it is a member of one.
    pub fn group(&self, node: u32) -> Option<usize> {
        let g = self.nodes[node as usize].group;
        (g != NO_GROUP).then_some(g as usize)
    }

    /// The upload rate (bytes/s, `0` = unknown) `node` was planned with, if it is online.
    pub fn planned_up_bps(&self, node: u32) -> Option<u64> {
        let n = self.nodes.get(node as usize)?;
        n.online.then_some(n.info.up_bps)
    }

    /// Number of distinct fetchers currently using `node` as a source.
    pub fn load(&self, node: u32) -> usize {
        self.nodes[node as usize].children.len()
    }

    /// From now on, repairs and placements give a fetcher a holder of the whole content that
    /// has room before a member of the stripe's group (see [`RelayPlan::place`]): the later
    /// waves of a staged rollout fetch from the participants of the earlier ones, which hold
    /// verified content, rather than from each other.
    pub fn set_holders_first(&mut self, on: bool) {
        self.holders_first = on;
    }

    /// Adds a participant that is not online yet (a late joiner); returns its index.
    pub fn add_node(&mut self) -> u32 {
        let i = self.nodes.len() as u32;
        self.nodes.push(Node::new(&Seed::default()));
        self.parents
            .extend(std::iter::repeat_n(UNSET, self.stripes.len()));
        i
    }

    /// The sources of `node`, coalesced into contiguous ranges (empty if it fetches nothing).
    pub fn sources(&self, node: u32) -> Vec<Assignment> {
        let mut out: Vec<Assignment> = Vec::new();
        for (s, &(first, end)) in self.stripes.iter().enumerate() {
            let h = self.parent(node, s);
            if h == UNSET {
                continue;
            }
            let holder = Holder::from_raw(h);
            match out.last_mut() {
                Some(last) if last.holder == holder && last.end == first => last.end = end,
                _ => out.push(Assignment { first, end, holder }),
            }
        }
        out
    }

    /// Chunks `holder` is currently set to serve, summed over all its fetchers (for estimates).
    pub fn served_chunks(&self, holder: Holder) -> u64 {
        let raw = match holder {
            Holder::Manager => MANAGER,
            Holder::Peer(p) => p,
        };
        let count = |c: u32| -> u64 {
            (0..self.stripes.len())
                .filter(|&s| self.parent(c, s) == raw)
                .map(|s| self.stripe_len(s) as u64)
                .sum()
        };
        match holder {
            Holder::Manager => (0..self.nodes.len() as u32).map(count).sum(),
            Holder::Peer(p) => self.nodes[p as usize]
                .children
                .iter()
                .map(|&c| count(c))
                .sum(),
        }
    }

    /// Checks the plan's invariants; `Err` names the first one broken (for tests and the simulator).
    ///
    /// Children lists match the parent table; no source serves more fetchers than its
    /// capacity; every online fetching participant has a source for every stripe, from the
    /// manager or from a serving, online, non-banned peer; no fetcher tracks more sources than
    /// it can; there is no cycle.
    pub fn check(&self) -> Result<(), String> {
        let k = self.stripes.len();
        for (i, n) in self.nodes.iter().enumerate() {
            let i = i as u32;
            for &c in &n.children {
                if !self.uses(c, i) {
                    return Err(format!("{c} listed as child of {i} but does not use it"));
                }
            }
            let served = self.served_chunks(Holder::Peer(i));
            if n.served != served {
                return Err(format!(
                    "{i} counts {} chunks served, serves {served}",
                    n.served
                ));
            }
            if n.children.len() > self.cap(i) {
                return Err(format!(
                    "{i} serves {} > capacity {}",
                    n.children.len(),
                    self.cap(i)
                ));
            }
            let fetching = n.online && !n.confirmed && !n.failed;
            let mut distinct: Vec<u32> = Vec::new();
            for s in 0..k {
                let h = self.parent(i, s);
                if !fetching {
                    if h != UNSET {
                        return Err(format!(
                            "{i} is not fetching but has a source for stripe {s}"
                        ));
                    }
                    continue;
                }
                if h == UNSET {
                    return Err(format!("{i} has no source for stripe {s}"));
                }
                if !distinct.contains(&h) {
                    distinct.push(h);
                }
                if h == MANAGER {
                    continue;
                }
                if !self.nodes[h as usize].children.contains(&i) {
                    return Err(format!("{i} uses {h} but is not in its children"));
                }
                if !self.serving(h) {
                    return Err(format!("{i} uses {h}, which cannot serve"));
                }
                if n.banned.contains(&h) {
                    return Err(format!("{i} uses {h}, which it reported"));
                }
                if !self.nodes[h as usize].confirmed && self.reaches(h, i, s) {
                    return Err(format!("cycle through {i} in stripe {s}"));
                }
            }
            if distinct.len() > n.info.max_sources.max(1) as usize {
                return Err(format!(
                    "{i} has {} sources > max {}",
                    distinct.len(),
                    n.info.max_sources
                ));
            }
        }
        Ok(())
    }

    // ---- internals ----

    fn parent(&self, node: u32, s: usize) -> u32 {
        self.parents[node as usize * self.stripes.len() + s]
    }

    fn stripe_len(&self, s: usize) -> u32 {
        let (first, end) = self.stripes[s];
        end - first
    }

    fn eff_up(&self, node: u32) -> u64 {
        match self.nodes[node as usize].info.up_bps {
            0 => self.default_up,
            u => u,
        }
    }

    fn cap(&self, node: u32) -> usize {
        let info = &self.nodes[node as usize].info;
        if info.server {
            info.capacity as usize
        } else {
            0
        }
    }

    /// Whether `fetcher` uses `holder` for any stripe.
    fn uses(&self, fetcher: u32, holder: u32) -> bool {
        let k = self.stripes.len();
        let base = fetcher as usize * k;
        self.parents[base..base + k].contains(&holder)
    }

    /// Whether `node` can serve anyone right now.
    fn serving(&self, node: u32) -> bool {
        let n = &self.nodes[node as usize];
        self.relay
            && n.online
            && n.info.server
            && !n.failed
            && !n.draining
            && n.retired == Retired::No
    }

    /// Whether following sources upward from `from` in stripe `s` reaches `target`.
    fn reaches(&self, mut from: u32, target: u32, s: usize) -> bool {
        for _ in 0..=self.nodes.len() {
            if from == target {
                return true;
            }
            if self.nodes[from as usize].confirmed {
                return false;
            }
            let p = self.parent(from, s);
            if !is_peer(p) {
                return false;
            }
            from = p;
        }
        true
    }

    /// Whether `holder` may serve stripe `s` to `fetcher` now.
    fn valid(&self, fetcher: u32, holder: u32, s: usize) -> bool {
        if !is_peer(holder) || holder == fetcher || holder as usize >= self.nodes.len() {
            return false;
        }
        let h = &self.nodes[holder as usize];
        self.serving(holder)
            && !self.nodes[fetcher as usize].banned.contains(&holder)
            && (h.children.len() < self.cap(holder) || self.uses(fetcher, holder))
            && (h.confirmed
                || (self.parent(holder, s) != UNSET && !self.reaches(holder, fetcher, s)))
    }

    fn set_parent(&mut self, fetcher: u32, s: usize, new: u32) {
        let i = fetcher as usize * self.stripes.len() + s;
        let old = self.parents[i];
        if old == new {
            return;
        }
        let had_new = is_peer(new) && self.uses(fetcher, new);
        self.parents[i] = new;
        let len = self.stripe_len(s) as u64;
        if is_peer(old) {
            self.nodes[old as usize].served -= len;
        }
        if is_peer(new) {
            self.nodes[new as usize].served += len;
        }
        if is_peer(old) && !self.uses(fetcher, old) {
            let children = &mut self.nodes[old as usize].children;
            if let Some(pos) = children.iter().position(|&c| c == fetcher) {
                children.swap_remove(pos);
            }
            self.requeue(old);
        }
        if is_peer(new) && !had_new {
            self.nodes[new as usize].children.push(fetcher);
        }
    }

    fn release(&mut self, node: u32) {
        for s in 0..self.stripes.len() {
            self.set_parent(node, s, UNSET);
        }
    }

    /// Puts `node` back in its queue if it can take another fetcher.
    fn requeue(&mut self, node: u32) {
        if !self.serving(node) || self.load(node) >= self.cap(node) {
            return;
        }
        let n = &mut self.nodes[node as usize];
        if n.confirmed {
            if !n.queued_confirmed {
                n.queued_confirmed = true;
                self.confirmed.push_back(node);
            }
        } else if n.group != NO_GROUP && !n.queued_group {
            n.queued_group = true;
            let g = n.group as usize;
            self.groups[g].queue.push_back(node);
        }
    }
}
