//! Balanced groups for a flat fleet: groups, stripe lengths and quotas that even out uploads.
//!
//! Rounding each server's fair share of a stripe's fetchers on its own leaves
//! a slow server far over or under its share, and the most loaded member of a
//! stripe paces everything below it. [`balance`] tries a few groupings (one by
//! upload alone, the others by how far each server's rounded quota is above its
//! share) and keeps the one whose worst member finishes first. It only
//! computes numbers; [`RelayPlan::build`](super::RelayPlan::build) turns them
//! into a plan.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::ManagerBudget;
use super::apportion::{apportion_min_max, fill_lightest};

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
pub(super) struct Balanced {
    /// Per group, its members in priority order.
    pub(super) members: Vec<Vec<u32>>,
    /// Per group, its stripe's length in chunks.
    pub(super) sizes: Vec<u32>,
    /// Per node, its quota of fetchers in its group's stripe (0 if it is no member).
    pub(super) quotas: Vec<u32>,
    /// Fetchers of every stripe the manager serves directly beyond the stripe's root.
    pub(super) manager: u32,
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

/// Loads within one part in this many of the best candidate's are a tie (the earlier
/// candidate is kept).
const TIE_MARGIN: u128 = 200;

/// Computes [`Balanced`] for `servers` given as `(node, upload, capacity)` in priority
/// order, `consumers` fetchers per stripe, and the manager's budget (its whole upload and the
/// most fetchers per stripe it may serve beyond the root); `None` if the fleet is too small
/// to gain from it.
pub(super) fn balance(
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
        // A later candidate must be better by more than rounding: loads a hair apart are a tie
        // by this measure, and the earlier candidate (equal stripes where the upload groups
        // are exact) runs better in practice than uneven stripes whose longest one hangs on a
        // slow member.
        if best
            .as_ref()
            .is_none_or(|b| load + load / TIE_MARGIN < b.load)
        {
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

#[cfg(test)]
mod test {
    use crate::planner::Policy;
    use crate::planner::relay::test_util::{assert_covers, plan_time, server};
    use crate::planner::relay::{RelayPlan, Seed};

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

    #[test]
    fn near_ties_keep_equal_stripes() {
        // The demo's fleet (32 agents in four upload classes) in any priority order: the
        // upload groups are exact, so every stripe is equally long. Other candidates that
        // plan a hair better only through rounding had uneven stripes (184 to 416 chunks)
        // that ran 20 % slower in the demo.
        let n = 32usize;
        let base: Vec<u64> = (0..n).map(|i| (i as u64 % 4 + 1) * 512 * 1024).collect();
        let manager_up = base.iter().sum::<u64>() / 10;
        let mut state = 12345u64;
        for order in 0..8 {
            let mut ups = base.clone();
            for i in (1..n).rev().filter(|_| order > 0) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ups.swap(i, (state >> 33) as usize % (i + 1));
            }
            let seeds: Vec<Seed> = ups.iter().map(|&u| server(u, 48)).collect();
            let plan = RelayPlan::build(2048, manager_up, &Policy::default(), &seeds);
            plan.check().unwrap();
            assert_covers(&plan);
            let lengths: Vec<u32> = plan
                .stripes()
                .iter()
                .map(|&(first, end)| end - first)
                .collect();
            assert!(
                lengths.iter().all(|&l| l == 256),
                "order {order}: stripes {lengths:?}"
            );
        }
    }
}
