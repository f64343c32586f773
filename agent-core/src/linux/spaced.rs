//! Warnings about hostile or broken peers, written at most once per period.
//!
//! A flood makes the same warning thousands of times a second; writing each
//! one would turn the flood into a disk and CPU cost of its own. A
//! [`SpacedLog`] says when the next line is due and how many events were held
//! back since the last one, so the line can say so. It is cheap (one mutex)
//! and can live in a `static`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default spacing of warnings caused by remote input.
pub const WARN_EVERY: Duration = Duration::from_secs(5);

/// One kind of warning, written at most once per `every`.
#[derive(Debug)]
pub struct SpacedLog {
    every: Duration,
    /// When the last line was written, and the events held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl SpacedLog {
    /// A warning written at most once per `every`.
    pub const fn new(every: Duration) -> Self {
        SpacedLog {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(held_back)` if its line is due now, with the events
    /// not written since the last line.
    pub fn due(&self) -> Option<u64> {
        self.due_at(Instant::now())
    }

    /// Counts `n` events; `Some(count)` if a line is due now, with every event since the
    /// last line, these included.
    pub fn note(&self, n: u64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = s.1.saturating_add(n);
        let now = Instant::now();
        if s.0
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return None;
        }
        let count = s.1;
        *s = (Some(now), 0);
        Some(count)
    }

    /// [`SpacedLog::due`] at `now`.
    pub fn due_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            s.1 = s.1.saturating_add(1);
            return None;
        }
        let held_back = s.1;
        *s = (Some(now), 0);
        Some(held_back)
    }
}

impl Default for SpacedLog {
    fn default() -> Self {
        SpacedLog::new(WARN_EVERY)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn one_line_per_period_counting_the_rest() {
        let log = SpacedLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(log.due_at(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(log.due_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.due_at(t0 + Duration::from_secs(5)), Some(999));
        assert_eq!(log.due_at(t0 + Duration::from_secs(6)), None);
        assert_eq!(log.due_at(t0 + Duration::from_secs(10)), Some(1));
        let counted = SpacedLog::new(Duration::from_secs(3600));
        assert_eq!(counted.note(7), Some(7));
        assert_eq!(counted.note(5), None);
        assert_eq!(counted.note(1), None);
    }
}
