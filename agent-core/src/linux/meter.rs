//! Passive link measurement: what the agent reports when no caps were configured.
//!
//! The agent's own traffic is the measurement: every few seconds the bytes
//! written and read on all its connections are sampled, and the highest rate
//! seen in each direction is the estimate of the link's capacity. Until traffic
//! has flowed the estimate is 0, which the manager reads as "unknown". A new
//! estimate is worth a fresh report only when it moved by more than a quarter.

use std::time::{Duration, Instant};

/// Shortest sampling window: shorter ones measure bursts, not the link.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// Peak-rate estimator over the process-wide byte counters.
#[derive(Debug)]
pub struct LinkMeter {
    last_at: Instant,
    last_sent: u64,
    last_received: u64,
    peak_up: u64,
    peak_down: u64,
    reported: (u64, u64),
}

impl LinkMeter {
    /// Starts measuring from the counters' current values.
    pub fn new(now: Instant, sent: u64, received: u64) -> Self {
        LinkMeter {
            last_at: now,
            last_sent: sent,
            last_received: received,
            peak_up: 0,
            peak_down: 0,
            reported: (0, 0),
        }
    }

    /// Feeds the counters; returns the new `(up, down)` estimate in bytes per second
    /// when either moved by more than a quarter since the last one returned.
    pub fn sample(&mut self, now: Instant, sent: u64, received: u64) -> Option<(u64, u64)> {
        let window = now.saturating_duration_since(self.last_at);
        if window < MIN_WINDOW {
            return None;
        }
        let rate = |delta: u64| (delta as f64 / window.as_secs_f64()) as u64;
        self.peak_up = self.peak_up.max(rate(sent.saturating_sub(self.last_sent)));
        self.peak_down = self
            .peak_down
            .max(rate(received.saturating_sub(self.last_received)));
        self.last_at = now;
        self.last_sent = sent;
        self.last_received = received;
        let moved = |new: u64, old: u64| new.abs_diff(old) > old / 4 && new > 0;
        if moved(self.peak_up, self.reported.0) || moved(self.peak_down, self.reported.1) {
            self.reported = (self.peak_up, self.peak_down);
            Some(self.reported)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn reports_the_peak_rate_when_it_moves() {
        let t0 = Instant::now();
        let mut m = LinkMeter::new(t0, 0, 0);
        // Too short a window measures nothing.
        assert_eq!(
            m.sample(t0 + Duration::from_millis(500), 1_000_000, 0),
            None
        );
        // 2 MB up and 4 MB down in 2 s.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            m.sample(t1, 2_000_000, 4_000_000),
            Some((1_000_000, 2_000_000))
        );
        // A slower window keeps the peak and says nothing.
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(m.sample(t2, 2_500_000, 4_500_000), None);
        // A small rise (under a quarter) is not worth a report; a large one is.
        let t3 = t2 + Duration::from_secs(1);
        assert_eq!(m.sample(t3, 3_600_000, 4_500_000), None);
        let t4 = t3 + Duration::from_secs(1);
        assert_eq!(
            m.sample(t4, 5_600_000, 4_500_000),
            Some((2_000_000, 2_000_000))
        );
    }
}
