//! Token buckets: how many messages of one kind an agent session may send.
//!
//! A [`TokenBucket`] holds up to `burst` tokens and gains `per_second` tokens a
//! second; each message takes one, and a message that finds the bucket empty
//! is over the limit. Time comes in as `now` (the driver's monotonic clock), so
//! the simulator and the tests drive it like the server.

use std::time::Duration;

/// A message rate: a burst and a sustained rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Messages that may come at once after a quiet time.
    pub burst: u32,
    /// Messages a second, sustained.
    pub per_second: u32,
}

impl Rate {
    /// `burst` at once, then `per_second`.
    pub const fn new(burst: u32, per_second: u32) -> Self {
        Rate { burst, per_second }
    }
}

/// A token bucket over the driver's clock.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket for `rate`, at `now`.
    pub fn new(rate: Rate, now: Duration) -> Self {
        TokenBucket {
            rate,
            tokens: f64::from(rate.burst),
            last: now,
        }
    }

    /// Takes one token at `now`; false when the bucket is empty (the message is over the limit).
    pub fn take(&mut self, now: Duration) -> bool {
        // A clock that went back refills nothing.
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(self.rate.per_second))
            .min(f64::from(self.rate.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_passes_then_the_sustained_rate() {
        let mut b = TokenBucket::new(Rate::new(5, 2), ms(0));
        assert_eq!((0..10).filter(|_| b.take(ms(0))).count(), 5);
        // Half a second: one more token.
        assert!(b.take(ms(500)));
        assert!(!b.take(ms(500)));
        // Ten seconds of quiet refill the burst, never more.
        assert_eq!((0..10).filter(|_| b.take(ms(10_500))).count(), 5);
    }

    #[test]
    fn a_flood_gets_the_sustained_rate_and_no_more() {
        let mut b = TokenBucket::new(Rate::new(10, 4), ms(0));
        // 100 000 messages over 10 s: 10 + 4 × 10 pass.
        let passed = (0..100_000u64)
            .filter(|i| b.take(Duration::from_micros(i * 100)))
            .count();
        assert!((49..=50).contains(&passed), "{passed}");
    }

    #[test]
    fn an_honest_sender_below_the_rate_is_never_limited() {
        let mut b = TokenBucket::new(Rate::new(4, 1), ms(0));
        // One message every 2 s for an hour, and a burst of 4 every minute.
        for t in 0..1800u64 {
            assert!(b.take(ms(t * 2000)), "at {t}");
            if t % 30 == 0 {
                for _ in 0..2 {
                    assert!(b.take(ms(t * 2000)));
                }
            }
        }
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut b = TokenBucket::new(Rate::new(1, 1), ms(5000));
        assert!(b.take(ms(5000)));
        assert!(!b.take(ms(0)));
        assert!(!b.take(ms(4999)));
        assert!(b.take(ms(6000)));
    }
}
