//! Measured upload rates, and re-planning a running job when they differ from the plan's.
//!
//! Nobody has to declare a link rate: in every `Progress` an agent reports the
//! verified bytes it received from each source since its previous one, so the
//! manager sees what every source delivers to every fetcher. Summed per source
//! over a window of [`RATE_WINDOW`], that is the source's delivered upload
//! rate. A source whose fetchers keep more requests in flight than its link
//! carries delivers its usable upload; one that waits for its own stripe
//! delivers less (a lower bound), and a fetcher that verifies a backlog at
//! once reports a burst. The estimate is the mean of the last
//! [`WINDOWS_KEPT`] windows in which the source delivered anything, once it
//! has [`MIN_WINDOWS`] whole ones (the first, in which it started serving, is
//! dropped): it follows a link that slows down within that many windows, and
//! windows in which the source had nothing to do do not pull it down. A
//! measurement within [`BELIEVED_BAND`] of the rate the plan already has
//! (declared, or measured before) does not replace it: only a real
//! difference moves the plan.
//!
//! The plan is made from what was known when the job started (declared rates,
//! or nothing). Once a window closes, the engine compares the estimates with
//! the rates the plan was made with; when they differ by more than
//! [`REPLAN_DRIFT`] of the total upload, the plan is adapted to the measured
//! rates (see [`RelayPlan::adapt_to_rates`](crate::planner::RelayPlan::adapt_to_rates)):
//! fetchers move inside each stripe's group towards members with more upload
//! per fetcher, and the stripes are resized so that their most loaded holders
//! finish together. Every fetcher whose sources changed is sent its new ones.
//! Chunks already verified stay verified: a fetcher skips them, and a relay
//! parks requests for chunks it is still fetching. Resizing keeps who fetches
//! from whom, so it opens no connection (a whole new plan did, thirty-two at
//! once in the lab, whose handshakes then queued behind bulk data on saturated
//! links). The first adaptation may follow the first estimates; later ones are
//! at least [`REPLAN_GAP`] apart and stop once [`REPLAN_UNTIL`] of the job's
//! chunks are verified (so late, moving ranges costs more than it saves). A
//! plan with LAN segments is kept: content enters each segment once, through
//! its entries.

use core::time::Duration;

use tracing::info;

use super::{Ctx, Job, JobOutcome, ParticipantState, Persist};

/// Length of one measurement window.
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Active windows a source's estimate is the mean of.
const WINDOWS_KEPT: usize = 4;
/// Whole active windows (after the first, partial one) before a source has an estimate.
pub(super) const MIN_WINDOWS: usize = 2;
/// Relative difference (of the summed upload) between estimates and the plan's rates
/// that makes a new plan worth its disruption.
const REPLAN_DRIFT: f64 = 0.2;
/// A measured upload within this factor range of the known one does not replace it.
const BELIEVED_BAND: (f64, f64) = (0.6, 1.6);
/// Least time between two plans of one job.
pub(super) const REPLAN_GAP: Duration = Duration::from_secs(6);
/// Fraction of all participants' chunks verified after which the plan is kept.
const REPLAN_UNTIL: f64 = 0.8;

/// Per participant of one job: bytes it delivered to fetchers, in windows.
#[derive(Clone, Debug, Default)]
pub(super) struct UploadMeter {
    /// When the open window started (`None` before the first report of bytes).
    window_start: Option<Duration>,
    /// Bytes each participant delivered in the open window.
    open: Vec<u64>,
    /// Per participant: the rates (bytes/s) of its last active windows, newest last.
    kept: Vec<RecentRates>,
    /// When the job was last planned again (not counting its first plan).
    replanned_at: Option<Duration>,
    /// Re-plans made so far.
    pub(super) replans: u32,
}

/// The rates (bytes/s) of one source's last [`WINDOWS_KEPT`] active windows, oldest
/// overwritten first.
#[derive(Clone, Copy, Debug, Default)]
struct RecentRates {
    rates: [u64; WINDOWS_KEPT],
    next: u8,
    /// Active windows seen (saturating).
    seen: u8,
}

impl RecentRates {
    /// Keeps `rate`, dropping the oldest; the first active window is dropped itself (the
    /// source started serving somewhere inside it).
    fn push(&mut self, rate: u64) {
        self.seen = self.seen.saturating_add(1);
        if self.seen == 1 {
            return;
        }
        self.rates[self.next as usize] = rate;
        self.next = ((self.next as usize + 1) % WINDOWS_KEPT) as u8;
    }

    /// The mean of the kept rates, once [`MIN_WINDOWS`] whole windows are kept.
    fn estimate(&self) -> Option<u64> {
        let kept = usize::from(self.seen).saturating_sub(1).min(WINDOWS_KEPT);
        (kept >= MIN_WINDOWS)
            .then(|| self.rates.iter().fold(0u64, |a, &r| a.saturating_add(r)) / kept as u64)
            .filter(|&r| r > 0)
    }
}

impl UploadMeter {
    /// Counts `bytes` delivered by participant `source` (reported by one of its fetchers).
    pub(super) fn record(&mut self, now: Duration, source: u32, bytes: u64) {
        let s = source as usize;
        if self.open.len() <= s {
            self.open.resize(s + 1, 0);
        }
        self.open[s] = self.open[s].saturating_add(bytes);
        self.window_start.get_or_insert(now);
    }

    /// Bytes counted for `source` in the open window.
    #[cfg(test)]
    pub(super) fn open_bytes(&self, source: u32) -> u64 {
        self.open.get(source as usize).copied().unwrap_or(0)
    }

    /// When the open window closes, if one is open.
    pub(super) fn window_end(&self) -> Option<Duration> {
        self.window_start.map(|t| t + RATE_WINDOW)
    }

    /// Closes the open window if it is due at `now`; returns whether it closed.
    pub(super) fn roll(&mut self, now: Duration) -> bool {
        let Some(start) = self.window_start else {
            return false;
        };
        let elapsed = now.saturating_sub(start);
        if elapsed < RATE_WINDOW {
            return false;
        }
        if self.kept.len() < self.open.len() {
            self.kept.resize(self.open.len(), Default::default());
        }
        let secs = elapsed.as_secs_f64();
        for (bytes, ring) in self.open.iter_mut().zip(self.kept.iter_mut()) {
            if *bytes > 0 {
                ring.push((*bytes as f64 / secs) as u64);
                *bytes = 0;
            }
        }
        // The next window opens with the next bytes reported.
        self.window_start = None;
        true
    }

    /// The measured upload of participant `idx` in bytes/s, if it has delivered anything.
    pub(super) fn upload(&self, idx: u32) -> Option<u64> {
        self.kept.get(idx as usize).and_then(RecentRates::estimate)
    }

    /// What the plan should take as participant `idx`'s upload, given the rate it has
    /// (`known`: declared, or measured earlier; `0` = unknown): the measurement when there
    /// is one and it lies outside [`BELIEVED_BAND`] of `known` (a measurement that close
    /// is noise: a source waiting for its stripe delivers less, and a fetcher that verifies
    /// a backlog at once reports a burst), else `known`. `None` without a measurement.
    pub(super) fn believed(&self, idx: u32, known: u64) -> Option<u64> {
        let measured = self.upload(idx)?;
        let (low, high) = BELIEVED_BAND;
        let inside = known > 0
            && measured as f64 >= low * known as f64
            && measured as f64 <= high * known as f64;
        Some(if inside { known } else { measured })
    }

    /// Notes that the job was planned again at `now`.
    pub(super) fn replanned(&mut self, now: Duration) {
        self.replanned_at = Some(now);
        self.replans += 1;
    }

    /// Whether a new plan may be made at `now`, given the share of chunks verified.
    pub(super) fn may_replan(&self, now: Duration, verified_share: f64) -> bool {
        verified_share < REPLAN_UNTIL
            && self
                .replanned_at
                .is_none_or(|at| now.saturating_sub(at) >= REPLAN_GAP)
    }
}

/// Whether the upload rates a plan was made with (`planned`, `0` = unknown) are far enough
/// from the current (believed, see [`UploadMeter::believed`]) ones to plan again: a known
/// rate that is no longer believed (its measurement left the band around it: the link
/// changed), or a summed absolute difference over [`REPLAN_DRIFT`] of the summed current
/// rates, unknown planned rates counting as the mean of the current ones (what the
/// planner assumed for them).
pub(super) fn drifted(planned_and_current: &[(u64, u64)]) -> bool {
    if planned_and_current
        .iter()
        .any(|&(planned, current)| planned > 0 && current > 0 && current != planned)
    {
        return true;
    }
    let known: Vec<u64> = planned_and_current
        .iter()
        .map(|&(_, c)| c)
        .filter(|&c| c > 0)
        .collect();
    if known.is_empty() {
        return false;
    }
    let mean = known.iter().map(|&c| c as f64).sum::<f64>() / known.len() as f64;
    let (mut diff, mut total) = (0.0, 0.0);
    for &(planned, current) in planned_and_current {
        let current = if current > 0 { current as f64 } else { mean };
        let planned = if planned > 0 { planned as f64 } else { mean };
        diff += (current - planned).abs();
        total += current;
    }
    total > 0.0 && diff > REPLAN_DRIFT * total
}

impl Job {
    /// The open measurement window is due: closes it and, if the measured rates drifted from
    /// the plan's and a new plan is allowed now, plans the job again.
    pub(super) fn rate_window_closed(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        if !self.rates.roll(cx.now)
            || self.outcome != JobOutcome::Running
            || self.opens_at.is_some()
            || self.regroup_until.is_some()
            || self.parts.is_empty()
        {
            return;
        }
        let verified: u64 = self
            .parts
            .iter()
            .map(|p| match p.state {
                ParticipantState::Confirmed => u64::from(self.chunks),
                _ => u64::from(p.verified.min(self.chunks)),
            })
            .sum();
        let share = verified as f64 / (self.parts.len() as f64 * f64::from(self.chunks.max(1)));
        if !self.rates.may_replan(cx.now, share) {
            return;
        }
        let Some(plan) = &self.plan else { return };
        if !plan.segment_entries().is_empty() {
            // Content enters each segment once, through its entries; a new plan would pick
            // other entries and send it across the WAN again.
            return;
        }
        let rates: Vec<(u64, u64)> = (0..self.parts.len() as u32)
            .filter_map(|idx| {
                let planned = plan.planned_up_bps(idx)?;
                Some((planned, self.rates.believed(idx, planned)?))
            })
            .collect();
        if drifted(&rates) {
            self.replan(cx, job_id);
        }
    }

    /// Adapts the plan to the measured upload rates and sends new sources to every fetcher
    /// whose sources or ranges moved.
    fn replan(&mut self, cx: &mut Ctx<'_>, job_id: u64) {
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        let rates: Vec<(u32, u64)> = (0..self.parts.len() as u32)
            .filter_map(|idx| {
                let planned = plan.planned_up_bps(idx)?;
                Some((idx, self.rates.believed(idx, planned)?))
            })
            .collect();
        let old: Vec<_> = (0..self.parts.len() as u32)
            .map(|i| plan.sources(i))
            .collect();
        let resized = plan.adapt_to_rates(&rates, cx.config.manager_up_bps);
        // Resized or not, the plan now holds the measured rates: the next drift counts from
        // them, and a plan made after a restart starts from them.
        self.rates.replanned(cx.now);
        cx.out.persist.push_back(Persist::MeasuredUpload {
            job: job_id,
            rates: rates
                .iter()
                .map(|&(idx, up)| (self.parts[idx as usize].id.clone(), up))
                .collect(),
        });
        if !resized {
            return;
        }
        let changed: Vec<u32> = (0..self.parts.len() as u32)
            .filter(|&i| plan.sources(i) != old[i as usize])
            .collect();
        let mut measured: Vec<u64> = rates.iter().map(|r| r.1).collect();
        measured.sort_unstable();
        let at = |q: usize| {
            measured
                .get((measured.len().saturating_sub(1)) * q / 100)
                .copied()
        };
        info!(
            job = job_id,
            replans = self.rates.replans,
            upload_min = at(0),
            upload_median = at(50),
            upload_max = at(100),
            stripes = ?plan.stripes(),
            changed = changed.len(),
            "plan adapted to measured upload rates"
        );
        self.resend_sources(cx, job_id, &changed);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn estimate_is_the_mean_of_the_last_active_windows() {
        let mut m = UploadMeter::default();
        let t = Duration::from_secs(10);
        assert_eq!(m.window_end(), None);
        // The first window (partial) and one whole window: no estimate yet.
        for w in 0..=MIN_WINDOWS as u32 {
            let at = t + RATE_WINDOW * w;
            if w == MIN_WINDOWS as u32 {
                assert_eq!(m.upload(1), None);
            }
            m.record(at, 1, 2_000_000);
            m.record(at, 3, 1_000_000);
            assert!(!m.roll(at + Duration::from_secs(1)));
            assert!(m.roll(at + RATE_WINDOW));
        }
        let t = t + RATE_WINDOW * MIN_WINDOWS as u32;
        assert_eq!(m.upload(1), Some(1_000_000));
        assert_eq!(m.upload(3), Some(500_000));
        assert_eq!(m.upload(0), None);
        // Slower windows pull the mean down; after WINDOWS_KEPT of them it is theirs.
        let expect = [733_333, 600_000, 400_000, 200_000];
        for (k, want) in (1..=WINDOWS_KEPT as u32).zip(expect) {
            let at = t + RATE_WINDOW * k;
            m.record(at, 1, 400_000);
            assert!(m.roll(at + RATE_WINDOW));
            assert_eq!(m.upload(1), Some(want), "after {k} slow windows");
        }
        // A measurement close to the known rate is noise; a far one replaces it.
        assert_eq!(m.believed(1, 250_000), Some(250_000));
        assert_eq!(m.believed(1, 500_000), Some(200_000));
        assert_eq!(m.believed(1, 0), Some(200_000));
        assert_eq!(m.believed(0, 500_000), None);
        // Windows in which it delivered nothing do not count.
        assert_eq!(m.upload(3), Some(500_000));
    }

    #[test]
    fn drift_counts_unknown_rates_as_the_mean() {
        // Blind plan (all unknown), measured 1:5 apart: far from "all equal".
        assert!(drifted(&[(0, 100), (0, 500), (0, 100), (0, 500)]));
        // Blind plan, measured all equal: nothing to gain.
        assert!(!drifted(&[(0, 300), (0, 300), (0, 300)]));
        // Known rates still believed: kept.
        assert!(!drifted(&[(100, 100), (500, 500), (300, 300)]));
        // One known rate no longer believed (the link changed): planned again.
        assert!(drifted(&[(500, 250), (500, 500), (300, 300), (300, 300)]));
        // Nothing measured yet: no decision.
        assert!(!drifted(&[(0, 0), (100, 0)]));
    }

    #[test]
    fn replans_are_spaced_and_stop_near_the_end() {
        let mut m = UploadMeter::default();
        let t = Duration::from_secs(5);
        assert!(m.may_replan(t, 0.1));
        m.replanned(t);
        assert!(!m.may_replan(t + Duration::from_secs(1), 0.1));
        assert!(m.may_replan(t + REPLAN_GAP, 0.1));
        assert!(!m.may_replan(t + REPLAN_GAP, 0.9));
    }
}
