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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use super::Policy;

mod segments;

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

/// Which queue of serving candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    Confirmed,
    Group(usize),
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
}

/// The mean of the known (non-zero) values, if any.
fn mean_known(values: impl Iterator<Item = u64>) -> Option<u64> {
    let (n, sum) = values
        .filter(|&u| u > 0)
        .fold((0u128, 0u128), |(n, s), u| (n + 1, s + u as u128));
    (n > 0).then(|| (sum / n) as u64)
}

/// Splits `total` into parts proportional to `weights`, each at least 1 (`total >= weights.len()`).
fn apportion(total: u32, weights: &[u128]) -> Vec<u32> {
    let k = weights.len();
    let rest = (total as usize - k) as u128;
    let sum: u128 = weights.iter().sum::<u128>().max(1);
    let mut sizes: Vec<u32> = weights
        .iter()
        .map(|w| 1 + (rest * w / sum) as u32)
        .collect();
    let given: u32 = sizes.iter().sum();
    let mut by_remainder: Vec<usize> = (0..k).collect();
    by_remainder.sort_by_key(|&i| (Reverse(rest * weights[i] % sum), i));
    for &i in by_remainder.iter().take((total - given) as usize) {
        sizes[i] += 1;
    }
    sizes
}

/// Longest processing time first: `items`, largest `up` first (ties by item), each to the
/// group whose upload `sums` is least so far (ties to the lower group).
fn fill_lightest<T: Copy + Ord>(
    groups: &mut [Vec<T>],
    sums: &mut [u128],
    mut items: Vec<T>,
    up: impl Fn(T) -> u128,
) {
    items.sort_by_key(|&i| (Reverse(up(i)), i));
    let mut lightest: BinaryHeap<Reverse<(u128, usize)>> = sums
        .iter()
        .enumerate()
        .map(|(g, &s)| Reverse((s, g)))
        .collect();
    for i in items {
        let Reverse((sum, g)) = lightest.pop().expect("at least one group");
        groups[g].push(i);
        sums[g] = sum + up(i);
        lightest.push(Reverse((sums[g], g)));
    }
}

/// Gives `left` more fetchers, one at a time, to the members `ts` (member `t` has quota
/// `quota[t + 1]`) whose load `(quota + 1) / upload` stays least, within their capacities;
/// `room(t)` is member `t`'s `(capacity, upload)`.
fn top_up(quota: &mut [u128], ts: &[usize], mut left: u128, room: impl Fn(usize) -> (u128, u128)) {
    // Load key of one more fetcher: (quota + 1) / upload, in fixed point.
    let key = |q: u128, up: u128| ((q + 1) << 64) / up.max(1);
    let mut heap: BinaryHeap<Reverse<(u128, usize)>> = ts
        .iter()
        .filter(|&&t| quota[t + 1] < room(t).0)
        .map(|&t| Reverse((key(quota[t + 1], room(t).1), t)))
        .collect();
    while left > 0 {
        let Some(Reverse((_, t))) = heap.pop() else {
            break;
        };
        quota[t + 1] += 1;
        left -= 1;
        let (cap, up) = room(t);
        if quota[t + 1] < cap {
            heap.push(Reverse((key(quota[t + 1], up), t)));
        }
    }
}

/// Groups, stripe lengths and whole-number quotas that give every server about the same
/// upload time (a flat fleet).
///
/// A server's fair share of a stripe's fetchers, `y`, is rarely a whole number;
/// rounding it alone leaves a slow server (y ≈ 2.4) up to 25 % over or under its
/// share, and the most loaded server of a stripe paces everything below it. So the
/// servers are sorted by how far their rounded quota is above their share
/// (`q / y`) and cut into `k` groups of about one stripe's fetchers each; inside a
/// group the quotas are the least-maximum apportionment of the stripe's fetchers;
/// and every stripe is made shorter the more its most loaded member is over (its
/// length is the least-maximum apportionment of the chunks by that load). A
/// server's load, `q · stripe length`, then matches its upload closely whatever its
/// rounding. A few passes re-sort and re-cut by the new quotas, and one groups the servers
/// by upload alone (exact when the shares are whole numbers); the best is kept.
struct Balanced {
    /// Per group, its members in priority order.
    members: Vec<Vec<u32>>,
    /// Per group, its stripe's length in chunks.
    sizes: Vec<u32>,
    /// Per node, its quota of fetchers in its group's stripe (0 if it is no member).
    quotas: Vec<u32>,
    /// Fetchers of every stripe the manager serves directly beyond the stripe's root.
    manager: u32,
}

/// One pass of [`balance`]: groups (indices into its `servers`), stripe lengths, quotas, and
/// the largest `worst ratio · stripe length` it leads to.
struct Candidate {
    load: u128,
    groups: Vec<Vec<usize>>,
    sizes: Vec<u32>,
    quota: Vec<u32>,
}

/// Passes of [`balance`] that cut the servers by over-share ratio (after one by upload).
const BALANCE_PASSES: usize = 3;

/// Splits `total` chunks into `k = costs.len()` parts (each at least 1, `total >= k`) so
/// that the largest `cost · part` is least.
fn apportion_min_max(total: u32, costs: &[u128]) -> Vec<u32> {
    let weights: Vec<u128> = costs.iter().map(|&c| (1u128 << 96) / c.max(1)).collect();
    let sum: u128 = weights.iter().sum::<u128>().max(1);
    let rest = (total as usize - costs.len()) as u128;
    let mut parts: Vec<u32> = weights
        .iter()
        .map(|&w| 1 + (rest * w / sum) as u32)
        .collect();
    let given: u32 = parts.iter().sum();
    let mut heap: BinaryHeap<Reverse<(u128, usize)>> = (0..costs.len())
        .map(|g| Reverse((costs[g] * (parts[g] as u128 + 1), g)))
        .collect();
    for _ in given..total {
        let Reverse((_, g)) = heap.pop().expect("k >= 1 parts");
        parts[g] += 1;
        heap.push(Reverse((costs[g] * (parts[g] as u128 + 1), g)));
    }
    parts
}

/// Computes [`Balanced`] for `servers` given as `(node, upload, capacity)` in priority
/// order, `consumers` fetchers per stripe, and the manager's budget (its whole upload and the
/// most fetchers per stripe it may serve beyond the root); `None` if the fleet is too small
/// to gain from it.
fn balance(
    k: usize,
    chunks: u32,
    consumers: u32,
    servers: &[(u32, u128, u32)],
    manager: ManagerBudget,
    node_count: usize,
) -> Option<Balanced> {
    if k < 2 || servers.len() < 2 * k || consumers == 0 || chunks < 2 * k as u32 {
        return None;
    }
    let total_up: u128 = servers.iter().map(|s| s.1).sum::<u128>().max(1);
    // The manager's upload-proportional part of every stripe's fetchers (the root included),
    // rounded, within its budget; the servers share the rest.
    let all_up = total_up + manager.share;
    let fair = ((consumers as u128 + 1) * manager.share + all_up / 2) / all_up;
    let manager_quota = fair
        .saturating_sub(1)
        .min(manager.extra)
        .min(consumers as u128) as u32;
    let consumers = consumers - manager_quota;
    if consumers == 0 {
        return None;
    }
    let demand = k as u128 * consumers as u128;
    // Shares in fixed point (1 << 32 = one fetcher of one stripe).
    let share: Vec<u128> = servers
        .iter()
        .map(|&(_, up, _)| ((demand * up) << 32) / total_up)
        .collect();
    let cap = |i: usize| servers[i].2;
    // First quotas: floors, then the largest remainders.
    let mut quota: Vec<u32> = (0..servers.len())
        .map(|i| ((share[i] >> 32) as u32).min(cap(i)))
        .collect();
    let given: u128 = quota.iter().map(|&q| q as u128).sum();
    let mut by_remainder: Vec<usize> = (0..servers.len()).filter(|&i| quota[i] < cap(i)).collect();
    by_remainder.sort_by_key(|&i| (Reverse(share[i] & 0xffff_ffff), i));
    let extra = demand.saturating_sub(given).min(by_remainder.len() as u128) as usize;
    for &i in &by_remainder[..extra] {
        quota[i] += 1;
    }
    // Over-share ratio q / y in fixed point (1 << 32 = exactly the share).
    let ratio = |quota: &[u32], i: usize| ((quota[i] as u128) << 64) / share[i].max(1);
    let key = |q: u32, i: usize| ((q as u128 + 1) << 64) / share[i].max(1);

    // The first candidate groups the servers by upload alone (fastest first, each to the
    // group with the least upload so far): where shares are whole numbers (a few rate classes)
    // that is already exact. The others cut the servers sorted by over-share ratio.
    let mut upload_groups: Vec<Vec<usize>> = vec![Vec::new(); k];
    fill_lightest(
        &mut upload_groups,
        &mut vec![0; k],
        (0..servers.len()).collect(),
        |i| servers[i].1,
    );
    let mut initial = quota.clone();
    let mut best: Option<Candidate> = None;
    for pass in 0..=BALANCE_PASSES {
        let groups = if pass == 0 {
            upload_groups.clone()
        } else {
            if pass == 1 {
                quota = std::mem::take(&mut initial);
            }
            let mut order: Vec<usize> = (0..servers.len()).filter(|&i| quota[i] > 0).collect();
            order.sort_by_key(|&i| (Reverse(ratio(&quota, i)), i));
            let placed: u128 = order.iter().map(|&i| quota[i] as u128).sum();
            if placed == 0 {
                break;
            }
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); k];
            let mut before: u128 = 0;
            for &i in &order {
                let q = quota[i] as u128;
                // The group whose stretch of the cumulative quota holds this server's middle.
                let g = (((2 * before + q) * k as u128) / (2 * placed)).min(k as u128 - 1) as usize;
                before += q;
                groups[g].push(i);
            }
            groups
        };
        if groups.iter().any(Vec::is_empty) {
            continue;
        }
        // Inside a group, the least-maximum apportionment of the stripe's fetchers: floors of
        // the proportional shares, then one at a time to whoever stays least loaded.
        for list in &groups {
            let y: u128 = list.iter().map(|&i| share[i]).sum::<u128>().max(1);
            for &i in list {
                quota[i] = ((consumers as u128 * share[i] / y) as u32).min(cap(i));
            }
            let sum: u32 = list.iter().map(|&i| quota[i]).sum();
            let mut heap: BinaryHeap<Reverse<(u128, usize)>> = list
                .iter()
                .filter(|&&i| quota[i] < cap(i))
                .map(|&i| Reverse((key(quota[i], i), i)))
                .collect();
            for _ in sum..consumers {
                let Some(Reverse((_, i))) = heap.pop() else {
                    break;
                };
                quota[i] += 1;
                if quota[i] < cap(i) {
                    heap.push(Reverse((key(quota[i], i), i)));
                }
            }
        }
        let worst: Vec<u128> = groups
            .iter()
            .map(|list| {
                list.iter()
                    .map(|&i| ratio(&quota, i))
                    .max()
                    .unwrap_or(1 << 32)
            })
            .collect();
        let sizes = apportion_min_max(chunks, &worst);
        let load = (0..k)
            .map(|g| worst[g] * sizes[g] as u128)
            .max()
            .unwrap_or(0);
        if best.as_ref().is_none_or(|b| load < b.load) {
            best = Some(Candidate {
                load,
                groups,
                sizes,
                quota: quota.clone(),
            });
        }
    }
    let Candidate {
        groups,
        sizes,
        quota,
        ..
    } = best?;
    let members: Vec<Vec<u32>> = groups
        .iter()
        .map(|list| {
            let mut m: Vec<u32> = list.iter().map(|&i| servers[i].0).collect();
            m.sort_unstable();
            m
        })
        .collect();
    let mut quotas = vec![0; node_count];
    for (i, &(node, _, _)) in servers.iter().enumerate() {
        quotas[node as usize] = quota[i];
    }
    Some(Balanced {
        members,
        sizes,
        quotas,
        manager: manager_quota,
    })
}

impl RelayPlan {
    /// Builds the plan for content of `chunks` chunks among `seeds` (in priority order).
    ///
    /// `manager_up_bps` is the manager's upload capacity (`0` = unknown). The
    /// number of stripes is the number of serving participants (online ones,
    /// plus those not online yet, which may serve when they come), at most
    /// `policy.max_stripes`, at most `chunks`, and small enough that every
    /// server's upload-proportional share of fetchers fits its capacity (each
    /// stripe costs each fetcher one more source).
    pub fn build(chunks: u32, manager_up_bps: u64, policy: &Policy, seeds: &[Seed]) -> Self {
        let chunks = chunks.max(1);
        let relay = policy.relay;
        let nodes: Vec<Node> = seeds.iter().map(Node::new).collect();
        let fetchers: Vec<u32> = (0..nodes.len() as u32)
            .filter(|&i| {
                let n = &nodes[i as usize];
                n.online && !n.confirmed && !n.failed
            })
            .collect();
        let servers: Vec<u32> = fetchers
            .iter()
            .copied()
            .filter(|&i| relay && nodes[i as usize].info.server)
            .collect();
        let absent = nodes
            .iter()
            .filter(|n| !n.online && !n.confirmed && !n.failed)
            .count();
        let default_up = mean_known(servers.iter().map(|&i| nodes[i as usize].info.up_bps))
            .or_else(|| mean_known(fetchers.iter().map(|&i| nodes[i as usize].info.up_bps)))
            .unwrap_or(manager_up_bps)
            .max(1);
        let eff = |i: u32| -> u128 {
            match nodes[i as usize].info.up_bps {
                0 => default_up as u128,
                u => u as u128,
            }
        };

        // Stripes: one per serving participant, at most `max_stripes`, and few enough that
        // each server's upload-proportional share of fetchers fits its capacity (every
        // stripe costs every fetcher one more source).
        let max_k = (policy.max_stripes.max(1) as usize).min(chunks as usize);
        let k = if !relay {
            1
        } else if servers.is_empty() {
            absent.clamp(1, max_k)
        } else {
            let total: u128 =
                manager_up_bps as u128 + servers.iter().map(|&i| eff(i)).sum::<u128>();
            let others = (fetchers.len() as u128).saturating_sub(1).max(1);
            let by_capacity = servers
                .iter()
                .map(|&i| nodes[i as usize].info.capacity as u128 * total / (others * eff(i)))
                .min()
                .unwrap_or(u128::MAX)
                .min(usize::MAX as u128) as usize;
            (servers.len() + absent).min(by_capacity).clamp(1, max_k)
        };

        let flat = !nodes
            .iter()
            .any(|n| n.info.segment != 0 && (n.online || n.confirmed));
        // Balanced groups when the manager only seeds the stripes (its own share of the
        // fetchers is planned by the proportional quotas below).
        // Fetchers per stripe the manager may serve directly beyond seeding the stripe.
        let extra = (policy.manager_max_copies - 1.0).max(0.0).floor() as u128;
        let balanced = if relay && flat {
            let list: Vec<(u32, u128, u32)> = servers
                .iter()
                .map(|&i| {
                    let cap = nodes[i as usize].info.capacity as u32;
                    (i, eff(i), cap)
                })
                .collect();
            let consumers = fetchers.len().saturating_sub(1) as u32;
            let manager = ManagerBudget {
                share: manager_up_bps as u128,
                extra,
            };
            balance(k, chunks, consumers, &list, manager, nodes.len())
        } else {
            None
        };
        let (members, group_up, sizes) = match &balanced {
            Some(b) => {
                let group_up: Vec<u128> = b
                    .members
                    .iter()
                    .map(|m| m.iter().map(|&i| eff(i)).sum())
                    .collect();
                (b.members.clone(), group_up, b.sizes.clone())
            }
            None => {
                // Groups. First, on each named segment, the fastest servers (up to one per group) go
                // to distinct groups, so every stripe can enter the segment once and fan out inside
                // it. Then the rest, fastest first, each to the group with the least upload so far
                // (longest processing time first: it balances the groups' upload).
                let mut members: Vec<Vec<u32>> = vec![Vec::new(); k];
                let mut sums: Vec<u128> = vec![0; k];
                let mut on_segment: HashMap<u32, Vec<u32>> = HashMap::new();
                for &i in &servers {
                    let seg = nodes[i as usize].info.segment;
                    if seg != 0 {
                        on_segment.entry(seg).or_default().push(i);
                    }
                }
                let mut segments: Vec<(u32, Vec<u32>)> = on_segment.into_iter().collect();
                segments.sort_by_key(|(seg, list)| (Reverse(list.len()), *seg));
                let mut placed = vec![false; nodes.len()];
                for (_, mut list) in segments {
                    list.sort_by_key(|&i| (Reverse(eff(i)), i));
                    let mut used = vec![false; k];
                    for &i in list.iter().take(k) {
                        let g = (0..k)
                            .filter(|&g| !used[g])
                            .min_by_key(|&g| (sums[g], g))
                            .expect("at most k servers per segment here");
                        used[g] = true;
                        members[g].push(i);
                        sums[g] += eff(i);
                        placed[i as usize] = true;
                    }
                }
                let rest: Vec<u32> = servers
                    .iter()
                    .copied()
                    .filter(|&i| !placed[i as usize])
                    .collect();
                fill_lightest(&mut members, &mut sums, rest, eff);
                for m in &mut members {
                    m.sort_unstable();
                }
                let group_up: Vec<u128> = members
                    .iter()
                    .map(|m| m.iter().map(|&i| eff(i)).sum())
                    .collect();
                let weights: Vec<u128> = group_up
                    .iter()
                    .map(|&u| if u == 0 { default_up as u128 } else { u })
                    .collect();
                let sizes = apportion(chunks, &weights);
                (members, group_up, sizes)
            }
        };
        let mut stripes = Vec::with_capacity(k);
        let mut first = 0;
        for s in sizes {
            stripes.push((first, first + s));
            first += s;
        }

        let mut plan = RelayPlan {
            chunks,
            stripes,
            parents: vec![UNSET; nodes.len() * k],
            nodes,
            groups: group_up
                .iter()
                .map(|&up| Group {
                    up,
                    queue: VecDeque::new(),
                })
                .collect(),
            confirmed: VecDeque::new(),
            default_up,
            relay,
            segmented: false,
            segment_servers: HashMap::new(),
            entries: Vec::new(),
        };
        for (g, ms) in members.iter().enumerate() {
            for &m in ms {
                plan.nodes[m as usize].group = g as u32;
            }
        }

        let total_up: u128 = group_up.iter().sum();
        let manager_up = manager_up_bps as u128;
        plan.segmented = relay
            && plan
                .nodes
                .iter()
                .any(|n| n.info.segment != 0 && (n.online || n.confirmed));
        for i in 0..plan.nodes.len() as u32 {
            plan.list_on_segment(i);
        }
        if plan.segmented {
            let slots = (1 + extra).min(u32::MAX as u128) as u32;
            plan.build_segmented(&fetchers, slots, policy.max_wan_transfers_per_segment);
        } else {
            for (g, ms) in members.iter().enumerate() {
                let manager = ManagerBudget {
                    share: (manager_up * group_up[g])
                        .checked_div(total_up)
                        .unwrap_or(manager_up),
                    extra,
                };
                plan.build_stripe(g, ms, &fetchers, manager, group_up[g], balanced.as_ref());
            }
        }
        for &f in &fetchers {
            plan.normalize(f);
        }
        for ms in &members {
            for &m in ms {
                plan.requeue(m);
            }
        }
        for i in 0..plan.nodes.len() as u32 {
            if plan.nodes[i as usize].confirmed {
                plan.requeue(i);
            }
        }
        plan
    }

    /// Assigns stripe `g` for every online fetcher: members first (each from an earlier member),
    /// then everyone else; quotas proportional to upload, then spare capacity, then the manager.
    fn build_stripe(
        &mut self,
        g: usize,
        ms: &[u32],
        fetchers: &[u32],
        manager: ManagerBudget,
        group_up: u128,
        balanced: Option<&Balanced>,
    ) {
        let ManagerBudget {
            share: manager_share,
            extra: manager_extra,
        } = manager;
        let Some(&root) = ms.first() else {
            for &c in fetchers {
                self.set_parent(c, g, MANAGER);
            }
            return;
        };
        self.set_parent(root, g, MANAGER);
        let consumers: Vec<u32> = ms[1..]
            .iter()
            .copied()
            .chain(
                fetchers
                    .iter()
                    .copied()
                    .filter(|&c| self.nodes[c as usize].group != g as u32),
            )
            .collect();
        // Quotas. The manager serves the root and, beyond it, at most `manager_extra`
        // fetchers (its upload-proportional share). The members share the rest in proportion
        // to their upload, by water-filling: a member whose share exceeds its capacity takes
        // its capacity and the others share what is left. Integer quotas: the floors of the
        // shares, then one fetcher at a time to the member whose load (quota + 1) / upload
        // stays least, so rounding never gives a slow member a whole extra copy to send.
        // holders[0] is the manager, holders[t + 1] is member ms[t].
        let mut quota: Vec<u128> = vec![0; ms.len() + 1];
        let manager_fair = ((consumers.len() as u128 + 1) * manager_share)
            .checked_div(manager_share + group_up)
            .unwrap_or(0);
        quota[0] = match balanced {
            Some(b) => (b.manager as u128).min(manager_extra),
            None => manager_fair.saturating_sub(1).min(manager_extra),
        };
        let mut remaining = consumers.len() as u128 - quota[0].min(consumers.len() as u128);
        let mut by_room: Vec<usize> = (0..ms.len()).collect();
        let room = |t: usize| (self.cap(ms[t]) as u128, self.eff_up(ms[t]) as u128);
        by_room.sort_by(|&a, &b| {
            let ((ca, ua), (cb, ub)) = (room(a), room(b));
            (ca * ub).cmp(&(cb * ua)).then(a.cmp(&b))
        });
        if let Some(given) = balanced.map(|b| b.quotas.as_slice()) {
            // Balanced quotas (see [`balance`]); any shortfall goes one fetcher at a time to
            // the member whose load stays least.
            let mut placed = 0;
            for (t, &m) in ms.iter().enumerate() {
                quota[t + 1] = (given[m as usize] as u128).min(room(t).0);
                placed += quota[t + 1];
            }
            let all: Vec<usize> = (0..ms.len()).collect();
            top_up(&mut quota, &all, remaining.saturating_sub(placed), room);
        } else {
            let mut weight = group_up;
            let mut uncapped = by_room.len();
            for (n, &t) in by_room.iter().enumerate() {
                let (cap, up) = room(t);
                if weight == 0 || cap * weight > remaining * up {
                    uncapped = n;
                    break;
                }
                quota[t + 1] = cap;
                remaining -= cap;
                weight -= up;
            }
            // On segments, quotas round up instead: the slack lets more fetchers find a member of
            // their own segment (a WAN crossing costs more than a slightly uneven load).
            let segmented = ms.iter().any(|&m| self.nodes[m as usize].info.segment != 0);
            if weight > 0 {
                let mut given = 0;
                for &t in &by_room[uncapped..] {
                    let (cap, up) = room(t);
                    let share = if segmented {
                        (remaining * up).div_ceil(weight)
                    } else {
                        remaining * up / weight
                    };
                    quota[t + 1] = share.min(cap);
                    given += quota[t + 1];
                }
                top_up(
                    &mut quota,
                    &by_room[uncapped..],
                    remaining.saturating_sub(given),
                    room,
                );
            }
        }
        let holder = |t: usize| if t == 0 { MANAGER } else { ms[t - 1] };

        // First, inside segments: a consumer takes a member of its own segment (an earlier
        // one, for a member) while their quotas last; so a stripe enters a segment once.
        let mut local: HashMap<u32, (Vec<usize>, usize)> = HashMap::new();
        for (t, &m) in ms.iter().enumerate() {
            let seg = self.nodes[m as usize].info.segment;
            if seg != 0 {
                local.entry(seg).or_default().0.push(t + 1);
            }
        }
        let mut rest: Vec<(usize, u32)> = Vec::with_capacity(consumers.len());
        for (pos, &c) in consumers.iter().enumerate() {
            // Member ms[pos + 1] may only fetch from the manager or an earlier member.
            let limit = if pos + 1 < ms.len() {
                pos + 1
            } else {
                ms.len()
            };
            let seg = self.nodes[c as usize].info.segment;
            let found = local.get_mut(&seg).and_then(|(list, cursor)| {
                while *cursor < list.len() && quota[list[*cursor]] == 0 {
                    *cursor += 1;
                }
                list.get(*cursor).copied().filter(|&t| t <= limit)
            });
            match found {
                Some(t) if seg != 0 => {
                    quota[t] -= 1;
                    self.set_parent(c, g, holder(t));
                }
                _ => rest.push((limit, c)),
            }
        }

        // Then everyone else, across segments: each holder in turn up to its quota, then up
        // to its spare capacity, then the manager.
        let mut cursor = 0;
        let mut second = false;
        for (limit, c) in rest {
            let h = loop {
                if cursor > ms.len() {
                    if second {
                        break MANAGER;
                    }
                    second = true;
                    cursor = 0;
                    quota[0] = 0;
                    for (t, &m) in ms.iter().enumerate() {
                        quota[t + 1] = self
                            .cap(m)
                            .saturating_sub(self.nodes[m as usize].children.len())
                            as u128;
                    }
                    continue;
                }
                if cursor > limit {
                    break MANAGER;
                }
                if quota[cursor] > 0 {
                    quota[cursor] -= 1;
                    break holder(cursor);
                }
                cursor += 1;
            };
            self.set_parent(c, g, h);
        }
    }

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

    /// Number of distinct fetchers currently using `node` as a source.
    pub fn load(&self, node: u32) -> usize {
        self.nodes[node as usize].children.len()
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
        changed
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

    /// The first entry of `which` that may serve stripe `s` to `fetcher`.
    fn pick(&mut self, which: Queue, fetcher: u32, s: usize) -> Option<u32> {
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

    /// A holder for stripe `s` of `fetcher`: `prefer` (a source it already got in this round),
    /// a confirmed holder, `extra` (the lost source's own source), a member of the stripe's
    /// group, else the manager.
    fn choose(&mut self, fetcher: u32, s: usize, prefer: Option<u32>, extra: Option<u32>) -> u32 {
        if let Some(p) = prefer
            && self.valid(fetcher, p, s)
        {
            return p;
        }
        if !self.relay {
            return MANAGER;
        }
        if self.segmented
            && let Some(h) = self.pick_on_segment(fetcher, s)
        {
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
    fn normalize(&mut self, fetcher: u32) {
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

    fn server(up: u64, cap: u16) -> Seed {
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

    fn leaf(max_sources: u16) -> Seed {
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
    fn assert_covers(plan: &RelayPlan) {
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
    fn plan_time(plan: &RelayPlan, chunk_bytes: f64, manager_up: u64, ups: &[u64]) -> f64 {
        let mut t = plan.served_chunks(Holder::Manager) as f64 * chunk_bytes / manager_up as f64;
        for (i, &u) in ups.iter().enumerate() {
            let served = plan.served_chunks(Holder::Peer(i as u32)) as f64;
            if served > 0.0 {
                t = t.max(served * chunk_bytes / u as f64);
            }
        }
        t
    }

    #[test]
    fn apportion_is_proportional_and_exact() {
        assert_eq!(apportion(10, &[1, 1]), vec![5, 5]);
        assert_eq!(apportion(11, &[3, 1]), vec![8, 3]);
        assert_eq!(apportion(3, &[100, 1, 1]), vec![1, 1, 1]);
        let sizes = apportion(1000, &[7, 3, 5, 1, 1]);
        assert_eq!(sizes.iter().sum::<u32>(), 1000);
        assert!(sizes[0] > sizes[2] && sizes[2] > sizes[1]);
    }

    #[test]
    fn equal_fleet_meets_the_kumar_ross_bound() {
        let n = 20;
        let seeds = vec![server(1_000_000, 32); n];
        let plan = RelayPlan::build(800, 1_000_000, &Policy::default(), &seeds);
        plan.check().unwrap();
        assert_covers(&plan);
        assert_eq!(plan.stripes().len(), 8);
        let ups = vec![1_000_000; n];
        let t = plan_time(&plan, 1000.0, 1_000_000, &ups);
        let bound = crate::planner::lower_bound_secs(
            800_000,
            1_000_000,
            &vec![(1_000_000, 100_000_000); n],
        )
        .unwrap();
        assert!(t / bound < 1.15, "plan {t} s vs bound {bound} s");
        // Every server relays something; the manager sends about one copy plus its share.
        for i in 0..n as u32 {
            assert!(plan.served_chunks(Holder::Peer(i)) > 0, "{i} idle");
        }
    }

    #[test]
    fn heterogeneous_fleet_stripes_follow_upload() {
        // 60 servers: 20 fast (10 MB/s), 40 slow (1 MB/s), and 40 leaves; manager 5 MB/s.
        let mut seeds = Vec::new();
        let mut ups = Vec::new();
        for i in 0..100 {
            let up = if i < 20 {
                10_000_000
            } else if i < 60 {
                1_000_000
            } else {
                0
            };
            seeds.push(if up > 0 { server(up, 32) } else { leaf(16) });
            ups.push(up.max(1));
        }
        let policy = Policy {
            max_stripes: 16,
            ..Policy::default()
        };
        let plan = RelayPlan::build(4000, 5_000_000, &policy, &seeds);
        plan.check().unwrap();
        assert_covers(&plan);
        for i in 60..100 {
            assert_eq!(plan.served_chunks(Holder::Peer(i)), 0, "leaf {i} serves");
        }
        let t = plan_time(&plan, 4096.0, 5_000_000, &ups);
        // Leaves upload nothing: N·S / (u_m + Σ u_servers), and S / u_m.
        let bytes: f64 = 4000.0 * 4096.0;
        let bound = (bytes / 5e6).max(100.0 * bytes / (5e6 + 20.0 * 10e6 + 40.0 * 1e6));
        assert!(t / bound < 1.3, "plan {t} s vs bound {bound} s");
    }

    #[test]
    fn a_fast_manager_serves_a_share_directly() {
        // Manager 100 MB/s, 50 servers of 1 MB/s: the manager should carry most of the load.
        let seeds = vec![server(1_000_000, 32); 50];
        let policy = Policy {
            manager_max_copies: 100.0,
            ..Policy::default()
        };
        let plan = RelayPlan::build(1000, 100_000_000, &policy, &seeds);
        plan.check().unwrap();
        let ups = vec![1_000_000; 50];
        let t = plan_time(&plan, 1000.0, 100_000_000, &ups);
        let bound =
            crate::planner::lower_bound_secs(1_000_000, 100_000_000, &vec![(1_000_000, 0); 50])
                .unwrap();
        assert!(t / bound < 1.3, "plan {t} s vs bound {bound} s");
        assert!(plan.served_chunks(Holder::Manager) > 20 * 1000);
    }

    /// Servers with log-uniform uploads of 1–8 MB/s (the simulator's default fleet).
    fn log_uniform_fleet(n: usize) -> (Vec<Seed>, Vec<u64>) {
        let mut x: u64 = 12345;
        let ups: Vec<u64> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let f = (x >> 11) as f64 / (1u64 << 53) as f64;
                (1e6 * 8f64.powf(f)) as u64
            })
            .collect();
        let seeds = ups.iter().map(|&u| server(u, 32)).collect();
        (seeds, ups)
    }

    #[test]
    fn whole_number_quotas_still_give_every_server_its_share() {
        // Fair shares of 2.4–19 fetchers per stripe: rounding each alone left the busiest
        // server 8 % over T* (2000 servers, 300 chunks); balanced groups and stripe lengths
        // keep it within 5 %.
        for (n, chunks, within) in [(2000, 300, 1.06), (1000, 1024, 1.05), (200, 1024, 1.08)] {
            let (seeds, ups) = log_uniform_fleet(n);
            let plan = RelayPlan::build(chunks, 20_000_000, &Policy::default(), &seeds);
            plan.check().unwrap();
            assert_covers(&plan);
            let chunk = 32768.0;
            let t = plan_time(&plan, chunk, 20_000_000, &ups);
            let bound = crate::planner::lower_bound_secs(
                chunks as u64 * chunk as u64,
                20_000_000,
                &ups.iter().map(|&u| (u, 64_000_000)).collect::<Vec<_>>(),
            )
            .unwrap();
            eprintln!(
                "{n} servers, {chunks} chunks: busiest server {:.3} T*",
                t / bound
            );
            assert!(
                t / bound < within,
                "{n}/{chunks}: plan {t} s vs bound {bound} s"
            );
        }
    }

    #[test]
    fn rate_classes_that_divide_evenly_plan_exactly() {
        // The lab's fleet: agent i uploads (i mod 4 + 1) · 512 KiB/s; one copy from the
        // manager, so the agents upload n - 1 copies between them. With 16 agents every
        // share is a whole number of fetchers and the plan is exact; with 32 a share is
        // 3.1 · the agent's class and the busiest agent sends one fetcher more than its share.
        for (n, within) in [(16usize, 1.001), (32, 1.05)] {
            let ups: Vec<u64> = (0..n).map(|i| (i as u64 % 4 + 1) * 512 * 1024).collect();
            let seeds: Vec<Seed> = ups.iter().map(|&u| server(u, 48)).collect();
            let manager_up = ups.iter().sum::<u64>() / 10;
            let plan = RelayPlan::build(512, manager_up, &Policy::default(), &seeds);
            plan.check().unwrap();
            assert_covers(&plan);
            let chunk = 32768.0;
            let t = plan_time(&plan, chunk, manager_up, &ups);
            let best = (n - 1) as f64 * 512.0 * chunk / ups.iter().sum::<u64>() as f64;
            eprintln!("{n} agents: plan {t:.3} s, best {best:.3} s");
            assert!(t <= best * within, "{n} agents: plan {t} s vs {best} s");
        }
    }

    /// Planning time for 100 000 participants (run with `--release --ignored`).
    #[test]
    #[ignore]
    fn plans_100k_agents_fast() {
        let mut seeds = Vec::new();
        for i in 0..100_000u64 {
            seeds.push(if i % 4 == 3 {
                leaf(4)
            } else {
                server(1_000_000 + (i % 7) * 500_000, 16)
            });
        }
        let start = std::time::Instant::now();
        let plan = RelayPlan::build(32_768, 50_000_000, &Policy::default(), &seeds);
        let took = start.elapsed();
        eprintln!(
            "planned 100k agents in {took:?}, {} stripes",
            plan.stripes().len()
        );
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
        plan.check().unwrap();
    }

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

    /// `segments` × `per` agents with mixed links: per segment two leaves, the rest servers
    /// with uploads of 1–8 MB/s and capacities 3–16.
    fn segmented_fleet(segments: u32, per: u32) -> Vec<Seed> {
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

    #[test]
    fn no_source_serves_more_fetchers_than_the_policy_allows() {
        let mut seeds = segmented_fleet(3, 8);
        seeds.extend((0..40).map(|_| leaf(2)));
        for cap in [1u16, 2, 4] {
            let policy = Policy {
                max_peers_per_source: cap,
                ..Policy::default()
            };
            let infos: Vec<Seed> = seeds
                .iter()
                .map(|s| {
                    let mut s = *s;
                    if let Some(i) = &mut s.info
                        && i.server
                    {
                        i.capacity = i.capacity.min(cap);
                    }
                    s
                })
                .collect();
            let plan = RelayPlan::build(300, 1_000_000, &policy, &infos);
            plan.check().unwrap();
            assert_covers(&plan);
            for i in 0..plan.len() as u32 {
                assert!(plan.load(i) <= cap as usize, "{i} serves {}", plan.load(i));
            }
        }
    }

    #[test]
    fn without_servers_everyone_fetches_everything_from_the_manager() {
        let seeds = vec![leaf(4); 5];
        let plan = RelayPlan::build(100, 0, &Policy::default(), &seeds);
        plan.check().unwrap();
        for i in 0..5 {
            assert_eq!(
                plan.sources(i),
                vec![Assignment {
                    first: 0,
                    end: 100,
                    holder: Holder::Manager
                }]
            );
        }
        let no_relay = Policy {
            relay: false,
            ..Policy::default()
        };
        let plan = RelayPlan::build(100, 0, &no_relay, &[server(1, 8); 5]);
        assert_eq!(plan.sources(3).len(), 1);
        assert_eq!(plan.served_chunks(Holder::Manager), 500);
    }

    #[test]
    fn unknown_speeds_get_equal_shares() {
        let plan = RelayPlan::build(100, 0, &Policy::default(), &[server(0, 32); 4]);
        plan.check().unwrap();
        let sizes: Vec<u32> = plan.stripes().iter().map(|(a, b)| b - a).collect();
        assert_eq!(sizes, vec![25, 25, 25, 25]);
    }

    #[test]
    fn capacities_and_max_sources_hold_in_a_large_fleet() {
        // 300 servers that serve at most 3 peers, 700 leaves, some tracking a single source.
        let mut seeds = vec![server(2_000_000, 3); 300];
        for i in 0..700 {
            seeds.push(leaf(if i % 3 == 0 { 1 } else { 4 }));
        }
        let plan = RelayPlan::build(10_000, 0, &Policy::default(), &seeds);
        plan.check().unwrap();
        assert_covers(&plan);
        let single = plan.sources(300);
        assert!(single.iter().all(|a| a.holder == single[0].holder));
        // With peers capped at 3, the manager carries the overflow only.
        let total: u64 = 1000 * 10_000;
        assert!(plan.served_chunks(Holder::Manager) < total / 5);
    }

    #[test]
    fn a_departed_source_is_routed_around_preferring_confirmed_holders() {
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
            // The confirmed holder took over.
            assert!(plan.sources(c).iter().any(|a| a.holder == Holder::Peer(9)));
        }
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
            assert_eq!(plan.place(i, server(1_000_000, 4).info.unwrap()), vec![i]);
            plan.check().unwrap();
        }
        assert_covers(&plan);
        // Every group has a member.
        for g in 0..8 {
            assert!((5..30).any(|i| plan.group(i) == Some(g)), "group {g} empty");
        }
        // Confirmed holders come online: newcomers use them first.
        plan.place(3, server(1_000_000, 4).info.unwrap());
        let newcomer = plan.add_node();
        plan.place(newcomer, leaf(2).info.unwrap());
        plan.check().unwrap();
        assert!(
            plan.sources(newcomer)
                .iter()
                .all(|a| a.holder == Holder::Peer(3))
        );
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
