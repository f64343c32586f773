//! Process-wide rate limits: a token bucket per direction.
//!
//! Every connection of a process shares one [`RateLimiter`] per direction, so
//! `--up-bps` caps the sum of all uploads. The bucket holds at most about
//! 20 ms worth of bytes; a request larger than what is in the bucket is let
//! through at once and leaves the bucket in debt, and the caller sleeps until
//! the debt is repaid. So a frame of any size passes, bursts stay short, and
//! sleeping too long never loses capacity (the refill uses the real elapsed
//! time, up to the burst), which keeps the achieved rate within a few percent
//! of the cap.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How much the bucket holds at most, as time at the configured rate.
const BURST: Duration = Duration::from_millis(20);

/// Token bucket shared by all connections of a process, one per direction.
#[derive(Debug)]
pub struct RateLimiter {
    /// The rate in bytes per second (`0` = no limit); [`RateLimiter::set_rate`] changes it.
    bytes_per_sec: AtomicU64,
    state: Mutex<Bucket>,
    /// Wakes the callers waiting in [`RateLimiter::acquire`] when the rate changes.
    rate_changed: tokio::sync::Notify,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may pass now; negative while in debt.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl RateLimiter {
    /// A limiter letting `bytes_per_sec` bytes pass per second (`0` = no limit).
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: AtomicU64::new(bytes_per_sec),
            state: Mutex::new(Bucket {
                tokens: burst(bytes_per_sec),
                at: Instant::now(),
            }),
            rate_changed: tokio::sync::Notify::new(),
        }
    }

    /// The configured rate in bytes per second (`0` = no limit).
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }

    /// Changes the rate (`0` = no limit): the time until now is counted at the old rate,
    /// a debt owed now is repaid at the new one, and the callers waiting in
    /// [`RateLimiter::acquire`] go on at once (their bytes stay counted as debt).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.set_rate_at(bytes_per_sec, Instant::now());
        self.rate_changed.notify_waiters();
    }

    /// [`RateLimiter::set_rate`] at `now`, without waking anyone.
    fn set_rate_at(&self, bytes_per_sec: u64, now: Instant) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.bytes_per_sec();
        if old > 0 {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens = (b.tokens + elapsed * old as f64).min(burst(old));
        }
        b.at = now.max(b.at);
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
        b.tokens = b.tokens.min(burst(bytes_per_sec));
    }

    /// Waits until `bytes` may pass (or the rate changes).
    pub async fn acquire(&self, bytes: usize) {
        let changed = self.rate_changed.notified();
        let mut changed = std::pin::pin!(changed);
        // Registered before the reservation, so a change in between is not missed.
        changed.as_mut().enable();
        if let Some(wait) = self.reserve(bytes, Instant::now()) {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed => {}
            }
        }
    }

    /// Takes `bytes` from the bucket now and returns how long the caller must wait before
    /// sending them (`None`: at once); unlike [`RateLimiter::acquire`] the caller decides
    /// what it does meanwhile.
    pub fn reserve_now(&self, bytes: usize) -> Option<Duration> {
        self.reserve(bytes, Instant::now())
    }

    /// Takes `bytes` from the bucket at `now`; returns how long the caller must wait.
    fn reserve(&self, bytes: usize, now: Instant) -> Option<Duration> {
        if self.bytes_per_sec() == 0 || bytes == 0 {
            return None;
        }
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: `set_rate` changes the rate and the bucket together.
        let bytes_per_sec = self.bytes_per_sec();
        if bytes_per_sec == 0 {
            return None;
        }
        let rate = bytes_per_sec as f64;
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst(bytes_per_sec));
        b.at = now.max(b.at);
        b.tokens -= bytes as f64;
        if b.tokens >= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(-b.tokens / rate))
        }
    }
}

/// The most the bucket holds at `bytes_per_sec`: [`BURST`] worth, at least one byte.
fn burst(bytes_per_sec: u64) -> f64 {
    (bytes_per_sec as f64 * BURST.as_secs_f64()).max(1.0)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let r = RateLimiter::new(0);
        assert_eq!(r.reserve(1 << 30, Instant::now()), None);
    }

    #[test]
    fn debt_is_repaid_at_the_rate() {
        let r = RateLimiter::new(1_000_000);
        let t0 = Instant::now();
        // The bucket starts with 20 ms worth: 20 000 bytes.
        assert_eq!(r.reserve(20_000, t0), None);
        // 100 000 more bytes at 1 MB/s: 100 ms of debt.
        let wait = r.reserve(100_000, t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // A second caller queues behind the first.
        let wait = r.reserve(50_000, t0).unwrap();
        assert!((wait.as_secs_f64() - 0.15).abs() < 1e-6, "{wait:?}");
        // After a long idle time the bucket refills only up to the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(r.reserve(20_000, later), None);
        assert!(r.reserve(1_000, later).is_some());
    }

    #[test]
    fn a_new_rate_applies_to_the_next_bytes() {
        let t0 = Instant::now();
        let r = RateLimiter::new(0);
        assert_eq!(r.reserve(1 << 20, t0), None, "no limit yet");
        r.set_rate_at(1_000_000, t0);
        assert_eq!(r.bytes_per_sec(), 1_000_000);
        // The bucket held what the unlimited rate left (one byte): 120 000 bytes owe 120 ms.
        let wait = r.reserve(120_000, t0).unwrap().as_secs_f64();
        assert!((wait - 0.12).abs() < 0.001, "{wait}");
        // Ten times faster: the whole debt, 220 000 bytes with the next ones, is repaid
        // at the new rate, in 22 ms.
        r.set_rate_at(10_000_000, t0);
        let wait = r.reserve(100_000, t0).unwrap().as_secs_f64();
        assert!((wait - 0.022).abs() < 0.001, "{wait}");
        // 100 ms later at 10 MB/s the debt is repaid; slowed to 1 MB/s then, the
        // time before counts at the old rate: the bucket is full (20 ms at 1 MB/s).
        let later = t0 + Duration::from_millis(100);
        r.set_rate_at(1_000_000, later);
        assert_eq!(r.reserve(20_000, later), None);
        assert!(r.reserve(1_000, later).is_some());
        r.set_rate_at(0, later);
        assert_eq!(r.reserve(1 << 30, later), None, "limit lifted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_change_wakes_the_waiting_callers() {
        let r = std::sync::Arc::new(RateLimiter::new(1_000));
        // 100 000 bytes at 1 kB/s: a wait of about 100 s.
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.acquire(100_000).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        r.set_rate(0);
        tokio::time::timeout(Duration::from_millis(10), waiting)
            .await
            .expect("still waiting at the old rate after the limit was lifted")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_paces_a_stream() {
        let r = RateLimiter::new(100_000);
        let start = Instant::now();
        for _ in 0..100 {
            r.acquire(10_000).await;
        }
        // 1 000 000 bytes, 2 000 of them from the initial burst.
        let took = start.elapsed().as_secs_f64();
        assert!((took - 9.98).abs() < 0.01, "{took}");
    }
}
