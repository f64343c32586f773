//! Delay in userspace: two TAP devices joined by a forwarder that holds every frame.
//!
//! This kernel has no `netem`, so a delayed link is built from two TAP
//! devices, one in each namespace, and a [`Forwarder`] in this process. In
//! each direction a reader thread takes frames from one tap (blocking reads)
//! and stamps them with their due time (arrival + delay) into a bounded
//! queue; a writer thread sleeps until each frame is due and writes it to the
//! other tap. A full queue drops the frame, as a full router queue would.
//! Rate shaping stays in the kernel (htb on each tap's transmit side), so a
//! frame is first paced, then delayed. Teardown deletes the taps, which wakes
//! the blocked readers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tun_tap::{Iface, Mode};

use super::{LabError, netns};

/// Frames held at most per direction (about 36 MiB of jumbo frames: never the limit at lab rates).
pub const QUEUE_FRAMES: usize = 4096;

/// How often an idle writer looks at its stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// How long teardown waits for a reader to notice its device is gone.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// A TAP device this process holds open, and where it lives.
pub struct Tap {
    /// The device (frames in and out, no packet-info header).
    pub iface: Iface,
    /// Its namespace.
    pub ns: String,
    /// Its name there.
    pub dev: String,
}

/// Opens a new TAP device `dev` inside namespace `ns`. It lives as long as the returned value
/// (or until deleted with `ip link del`).
pub fn open_tap(ns: &str, dev: &str) -> Result<Tap, LabError> {
    let name = dev.to_string();
    let iface = netns::within(ns, move || {
        Iface::without_packet_info(&name, Mode::Tap)
            .map_err(|e| LabError::Io(format!("cannot create tap {name}"), e))
    })?;
    Ok(Tap {
        iface,
        ns: ns.to_string(),
        dev: dev.to_string(),
    })
}

/// What a forwarder counted in one direction.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    /// Frames written on.
    pub forwarded: AtomicU64,
    /// Frames dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// Two taps joined with a fixed one-way delay in each direction; stops when dropped.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    readers: Vec<JoinHandle<()>>,
    writers: Vec<JoinHandle<()>>,
    /// Where the two taps live, for deleting them at the end.
    places: [(String, String); 2],
    /// Counters of the direction a → b.
    pub a_to_b: Arc<ForwarderStats>,
    /// Counters of the direction b → a.
    pub b_to_a: Arc<ForwarderStats>,
}

impl Forwarder {
    /// Starts forwarding between `a` and `b`, holding each frame for `delay`.
    pub fn start(a: Tap, b: Tap, delay: Duration, label: &str) -> Result<Forwarder, LabError> {
        let places = [(a.ns.clone(), a.dev.clone()), (b.ns.clone(), b.dev.clone())];
        let (a, b) = (Arc::new(a.iface), Arc::new(b.iface));
        let stop = Arc::new(AtomicBool::new(false));
        let a_to_b = Arc::new(ForwarderStats::default());
        let b_to_a = Arc::new(ForwarderStats::default());
        let mut forwarder = Forwarder {
            stop: stop.clone(),
            readers: Vec::new(),
            writers: Vec::new(),
            places,
            a_to_b: a_to_b.clone(),
            b_to_a: b_to_a.clone(),
        };
        for (from, to, stats, dir) in [(a.clone(), b.clone(), a_to_b, "ab"), (b, a, b_to_a, "ba")] {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUE_FRAMES);
            let reader_stats = stats.clone();
            let reader_stop = stop.clone();
            forwarder.readers.push(
                std::thread::Builder::new()
                    .name(format!("tap-{label}-{dir}-rx"))
                    .spawn(move || {
                        let mut buf = vec![0u8; 65_536];
                        while !reader_stop.load(Ordering::Relaxed) {
                            // An error means the device is gone (teardown).
                            let Ok(n) = from.recv(&mut buf) else { return };
                            let due = Instant::now() + delay;
                            match tx.try_send((due, buf[..n].to_vec())) {
                                Ok(()) => {}
                                Err(TrySendError::Full(_)) => {
                                    reader_stats.dropped.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(TrySendError::Disconnected(_)) => return,
                            }
                        }
                    })
                    .map_err(|e| LabError::Io("forwarder thread".into(), e))?,
            );
            let writer_stop = stop.clone();
            forwarder.writers.push(
                std::thread::Builder::new()
                    .name(format!("tap-{label}-{dir}-tx"))
                    .spawn(move || {
                        loop {
                            match rx.recv_timeout(IDLE_POLL) {
                                Ok((due, frame)) => {
                                    let wait = due.saturating_duration_since(Instant::now());
                                    if !wait.is_zero() {
                                        std::thread::sleep(wait);
                                    }
                                    // A write error (device going away) drops the frame.
                                    if to.send(&frame).is_ok() {
                                        stats.forwarded.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Err(RecvTimeoutError::Timeout) => {
                                    if writer_stop.load(Ordering::Relaxed) {
                                        return;
                                    }
                                }
                                Err(RecvTimeoutError::Disconnected) => return,
                            }
                        }
                    })
                    .map_err(|e| LabError::Io("forwarder thread".into(), e))?,
            );
        }
        Ok(forwarder)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Deleting a device wakes its blocked reader with an error.
        for (ns, dev) in &self.places {
            let _ = netns::ip(ns, &["link", "del", dev]);
        }
        let deadline = Instant::now() + STOP_WAIT;
        for t in self.readers.drain(..).chain(self.writers.drain(..)) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("a delay forwarder thread did not stop; leaving it behind");
            }
        }
    }
}
