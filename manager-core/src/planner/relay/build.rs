//! Building the plan when a job starts: stripes, groups, quotas and every fetcher's sources.
//!
//! [`RelayPlan::build`] counts the stripes, forms the groups (balanced ones for
//! a flat fleet, see [`balance`](super::balance); on segments, the fastest
//! servers of each segment in distinct groups) and sizes the stripes; then each
//! stripe is assigned by [`RelayPlan::build_stripe`], or by the segment-aware
//! planner when participants report segments. After this, only the repairs in
//! [`repair`](super::repair) change the plan.

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};

use super::apportion::{apportion, fill_lightest, top_up};
use super::balance::{Balanced, balance};
use super::{Group, MANAGER, ManagerBudget, Node, Policy, RelayPlan, Seed, UNSET};

/// The mean of the known (non-zero) values, if any.
fn mean_known(values: impl Iterator<Item = u64>) -> Option<u64> {
    let (n, sum) = values
        .filter(|&u| u > 0)
        .fold((0u128, 0u128), |(n, s), u| (n + 1, s + u as u128));
    (n > 0).then(|| (sum / n) as u64)
}

impl RelayPlan {
    /// Builds the plan for content of `chunks` chunks among `seeds` (in priority order).
    ///
    /// `manager_up_bps` is the manager's upload capacity (`0` = unknown). The
    /// number of stripes is the number of online serving participants (of those
    /// not online yet when nobody is), at most `policy.max_stripes`, at most
    /// `chunks`, and small enough that every server's upload-proportional share of
    /// fetchers fits its capacity (each stripe costs each fetcher one more source).
    pub fn build(chunks: u32, manager_up_bps: u64, policy: &Policy, seeds: &[Seed]) -> Self {
        let chunks = chunks.max(1);
        let relay = policy.relay;
        let nodes: Vec<Node> = seeds.iter().map(Node::new).collect();
        let flat = !nodes
            .iter()
            .any(|n| n.info.segment != 0 && (n.online || n.confirmed));
        // On a flat network the plan is laid out over every online participant, those that
        // already hold the content included: they keep their place in the groups and serve
        // their share, but fetch nothing. A plan built again over holdings (after a manager
        // restart) so has the groups, stripes and sources of the one before, and a stripe
        // whose group holds a confirmed member needs no seeding from the manager.
        let planned: Vec<u32> = (0..nodes.len() as u32)
            .filter(|&i| {
                let n = &nodes[i as usize];
                n.online && !n.failed && (!n.confirmed || flat)
            })
            .collect();
        let fetchers: Vec<u32> = planned
            .iter()
            .copied()
            .filter(|&i| !nodes[i as usize].confirmed)
            .collect();
        let servers: Vec<u32> = planned
            .iter()
            .copied()
            .filter(|&i| relay && nodes[i as usize].info.server)
            .collect();
        let absent = nodes
            .iter()
            .filter(|n| !n.online && !n.confirmed && !n.failed)
            .count();
        let default_up = mean_known(servers.iter().map(|&i| nodes[i as usize].info.up_bps))
            .or_else(|| mean_known(planned.iter().map(|&i| nodes[i as usize].info.up_bps)))
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
            let others = (planned.len() as u128).saturating_sub(1).max(1);
            let by_capacity = servers
                .iter()
                .map(|&i| nodes[i as usize].info.capacity as u128 * total / (others * eff(i)))
                .min()
                .unwrap_or(u128::MAX)
                .min(usize::MAX as u128) as usize;
            // Participants not online yet get no stripe of their own: one that never comes
            // would leave its stripe to the manager alone. They join a group when they come.
            servers.len().min(by_capacity).clamp(1, max_k)
        };

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
            let consumers = planned.len().saturating_sub(1) as u32;
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
            holders_first: false,
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
                plan.build_stripe(g, ms, &planned, manager, group_up[g], balanced.as_ref());
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
    ///
    /// `planned` may hold confirmed participants: they take their turn (so the others' sources
    /// are those of a plan where they still fetch) but get no source.
    fn build_stripe(
        &mut self,
        g: usize,
        ms: &[u32],
        planned: &[u32],
        manager: ManagerBudget,
        group_up: u128,
        balanced: Option<&Balanced>,
    ) {
        let ManagerBudget {
            share: manager_share,
            extra: manager_extra,
        } = manager;
        let fetching = |plan: &Self, c: u32| !plan.nodes[c as usize].confirmed;
        let Some(&root) = ms.first() else {
            for &c in planned {
                if fetching(self, c) {
                    self.set_parent(c, g, MANAGER);
                }
            }
            return;
        };
        if fetching(self, root) {
            self.set_parent(root, g, MANAGER);
        }
        let consumers: Vec<u32> = ms[1..]
            .iter()
            .copied()
            .chain(
                planned
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
                    if fetching(self, c) {
                        self.set_parent(c, g, holder(t));
                    }
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
            if fetching(self, c) {
                self.set_parent(c, g, h);
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::planner::relay::test_util::{
        assert_covers, leaf, plan_time, segmented_fleet, server,
    };
    use crate::planner::relay::{Assignment, Holder};

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
    fn a_plan_built_over_holdings_keeps_the_sources_of_the_first_one() {
        // 40 agents of four upload classes and 10 leaves; the plan is built again with a
        // fifth of them already holding the content (as after a manager restart).
        let mut seeds: Vec<Seed> = (0..50)
            .map(|i| {
                if i >= 40 {
                    leaf(4)
                } else {
                    server(500_000 << (i % 4), 16)
                }
            })
            .collect();
        let first = RelayPlan::build(1024, 2_000_000, &Policy::default(), &seeds);
        for i in (0..50).step_by(5) {
            seeds[i].confirmed = true;
        }
        let again = RelayPlan::build(1024, 2_000_000, &Policy::default(), &seeds);
        again.check().unwrap();
        assert_covers(&again);
        assert_eq!(again.stripes(), first.stripes());
        for i in 0..50u32 {
            assert_eq!(again.group(i), first.group(i), "node {i}'s group");
            if seeds[i as usize].confirmed {
                assert!(again.sources(i).is_empty(), "{i} holds the content");
                continue;
            }
            assert_eq!(again.sources(i), first.sources(i), "node {i}'s sources");
        }
        // The confirmed members serve their share: nobody else takes their fetchers.
        for i in (0..40u32).step_by(5) {
            assert_eq!(
                again.served_chunks(Holder::Peer(i)) > 0,
                first.served_chunks(Holder::Peer(i)) > 0,
                "{i}"
            );
        }
        // Stripes whose root holds the content are not seeded by the manager again.
        assert!(
            again.served_chunks(Holder::Manager) < first.served_chunks(Holder::Manager),
            "manager: {} vs {}",
            again.served_chunks(Holder::Manager),
            first.served_chunks(Holder::Manager)
        );
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
}
