//! Integer apportionment: splitting chunks among stripes and fetchers among members.
//!
//! The plan works in whole chunks and whole fetchers, so every proportional
//! share is rounded somewhere. These helpers do the rounding the same way
//! wherever it happens: proportional parts with the largest remainders
//! ([`apportion`]), least-maximum parts ([`apportion_min_max`]), longest
//! processing time first onto the lightest group ([`fill_lightest`]) and one
//! fetcher at a time to the least loaded member ([`top_up`]). They are pure
//! functions of their arguments, kept apart from the plan they serve.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Splits `total` into parts proportional to `weights`, each at least 1 (`total >= weights.len()`).
pub(super) fn apportion(total: u32, weights: &[u128]) -> Vec<u32> {
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
pub(super) fn fill_lightest<T: Copy + Ord>(
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
pub(super) fn top_up(
    quota: &mut [u128],
    ts: &[usize],
    mut left: u128,
    room: impl Fn(usize) -> (u128, u128),
) {
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

/// Splits `total` chunks into `k = costs.len()` parts (each at least 1, `total >= k`) so
/// that the largest `cost · part` is least.
pub(super) fn apportion_min_max(total: u32, costs: &[u128]) -> Vec<u32> {
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

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn apportion_is_proportional_and_exact() {
        assert_eq!(apportion(10, &[1, 1]), vec![5, 5]);
        assert_eq!(apportion(11, &[3, 1]), vec![8, 3]);
        assert_eq!(apportion(3, &[100, 1, 1]), vec![1, 1, 1]);
        let sizes = apportion(1000, &[7, 3, 5, 1, 1]);
        assert_eq!(sizes.iter().sum::<u32>(), 1000);
        assert!(sizes[0] > sizes[2] && sizes[2] > sizes[1]);
    }
}
