//! The event queue: a radix heap over monotone times.
//!
//! A discrete-event simulation never schedules into the past, so the queue can
//! be a radix heap: an item lives in the bucket numbered by the highest bit in
//! which its key differs from the last key popped; popping empties the lowest
//! non-empty bucket, redistributing it around its minimum. Each item moves
//! down at most 64 times, so push and pop are O(1) amortized and touch few
//! cache lines, which matters with hundreds of thousands of pending events.
//! Items with equal keys pop in a fixed order (last pushed first), so runs stay
//! deterministic.

use std::time::Duration;

/// A min-queue of `T` keyed by times at or after the last popped one.
#[derive(Debug)]
pub struct EventQueue<T> {
    last: u64,
    len: usize,
    buckets: Vec<Vec<(u64, T)>>,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket(x: u64) -> usize {
    (64 - x.leading_zeros()) as usize
}

fn nanos(t: Duration) -> u64 {
    u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)
}

impl<T> EventQueue<T> {
    /// An empty queue at time zero.
    pub fn new() -> Self {
        EventQueue {
            last: 0,
            len: 0,
            buckets: (0..65).map(|_| Vec::new()).collect(),
        }
    }

    /// Pending items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `item` at `at` (clamped to the last popped time: the past is now).
    pub fn push(&mut self, at: Duration, item: T) {
        let key = nanos(at).max(self.last);
        self.buckets[bucket(key ^ self.last)].push((key, item));
        self.len += 1;
    }

    /// The earliest item and its time.
    pub fn pop(&mut self) -> Option<(Duration, T)> {
        if self.buckets[0].is_empty() {
            let i = self.buckets.iter().position(|b| !b.is_empty())?;
            let items = std::mem::take(&mut self.buckets[i]);
            let min = items.iter().map(|e| e.0).min().expect("non-empty");
            self.last = min;
            for (key, item) in items {
                self.buckets[bucket(key ^ min)].push((key, item));
            }
        }
        let (key, item) = self.buckets[0].pop()?;
        self.len -= 1;
        Some((Duration::from_nanos(key), item))
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn pops_in_time_order() {
        let mut q = EventQueue::new();
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut now = 0u64;
        let mut popped = Vec::new();
        for round in 0..200 {
            for _ in 0..r.gen_range(0..20) {
                let at = now + r.gen_range(0..1_000_000u64);
                q.push(Duration::from_nanos(at), round);
            }
            for _ in 0..r.gen_range(0..15) {
                if let Some((t, _)) = q.pop() {
                    let t = t.as_nanos() as u64;
                    assert!(t >= now, "{t} < {now}");
                    now = t;
                    popped.push(t);
                }
            }
        }
        while let Some((t, _)) = q.pop() {
            assert!(t.as_nanos() as u64 >= now);
            now = t.as_nanos() as u64;
        }
        assert!(q.is_empty());
        assert!(popped.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn the_past_is_now() {
        let mut q = EventQueue::new();
        q.push(Duration::from_secs(5), 'a');
        assert_eq!(q.pop(), Some((Duration::from_secs(5), 'a')));
        q.push(Duration::from_secs(1), 'b');
        assert_eq!(q.pop(), Some((Duration::from_secs(5), 'b')));
        assert_eq!(q.pop(), None);
    }
}
