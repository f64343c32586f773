//! A policy's time windows: when its jobs may transfer (claim 9).
//!
//! A [`TimeWindow`] is a range of minutes of the day (`start_minute..end_minute`,
//! wrapping midnight when the end comes first, the whole day when they are equal) on
//! some days of the week, in a time zone (an IANA name; the tz database is compiled
//! in, so the answer is the same on every machine and the core reads no file). The
//! days are the days the window *opens*: `fri 22:00-06:00` runs into Saturday morning.
//! A policy holds several; the job may transfer while any of them is open, and
//! windows that touch or overlap count as one ([`window_state`]).
//!
//! Local times that a daylight-saving change skips are taken as the moment after the
//! gap, and those it repeats as their first occurrence (jiff's "compatible" rule, as in
//! RFC 5545).

use core::fmt;
use core::str::FromStr;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Deserializer, Serialize};

/// Minutes in a day.
pub(crate) const DAY_MINUTES: u16 = 24 * 60;

/// Most windows one policy holds.
pub const MAX_WINDOWS: usize = 32;

/// A day of the week.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Day {
    /// Every day, Monday first.
    pub const ALL: [Day; 7] = [
        Day::Mon,
        Day::Tue,
        Day::Wed,
        Day::Thu,
        Day::Fri,
        Day::Sat,
        Day::Sun,
    ];

    /// `mon`, `tue`, ...
    pub fn name(self) -> &'static str {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][self as usize]
    }

    fn all() -> Vec<Day> {
        Day::ALL.to_vec()
    }

    fn parse(s: &str) -> Option<Day> {
        let s = s.trim().to_ascii_lowercase();
        Day::ALL
            .into_iter()
            .find(|d| s.len() >= 3 && d.name() == &s[..3] && full_name(*d).starts_with(&s))
    }
}

/// `monday`, `tuesday`, ... (a day may be written whole or by its first three letters).
fn full_name(d: Day) -> &'static str {
    [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ][d as usize]
}

fn utc() -> String {
    "UTC".to_string()
}

/// A weekly time window: minutes of the day on some days of the week, in a time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeWindow {
    /// First minute of the day inside the window (`0..1440`).
    pub start_minute: u16,
    /// First minute of the day after the window (`0..1440`); before `start_minute` it wraps
    /// midnight (22:00–06:00 is `1320..360`), equal to it the window lasts a whole day.
    pub end_minute: u16,
    /// The days it opens; every day when left out of the JSON (policies stored before
    /// windows had days).
    #[serde(default = "Day::all")]
    pub days: Vec<Day>,
    /// The time zone of its minutes, an IANA name (`Europe/Berlin`); `UTC` when left out.
    #[serde(default = "utc")]
    pub zone: String,
}

impl TimeWindow {
    /// Every day from `start_minute` to `end_minute`, UTC.
    pub fn daily_utc(start_minute: u16, end_minute: u16) -> Self {
        TimeWindow {
            start_minute,
            end_minute,
            days: Day::all(),
            zone: utc(),
        }
    }

    /// Checks the window: minutes within a day, at least one day, a known time zone.
    /// `Err((field, reason))` names the JSON field at fault.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.start_minute >= DAY_MINUTES {
            return Err((
                "windows.start_minute",
                format!("{} is not a minute of the day (0..1440)", self.start_minute),
            ));
        }
        if self.end_minute >= DAY_MINUTES {
            return Err((
                "windows.end_minute",
                format!("{} is not a minute of the day (0..1440)", self.end_minute),
            ));
        }
        if self.days.is_empty() {
            return Err((
                "windows.days",
                "names no day: give at least one of mon, tue, wed, thu, fri, sat, sun".into(),
            ));
        }
        // At most the seven days, each once: a list is cloned and scanned with every job.
        if self
            .days
            .iter()
            .enumerate()
            .any(|(i, d)| self.days[..i].contains(d))
        {
            return Err((
                "windows.days",
                "names a day twice: give each of mon, tue, wed, thu, fri, sat, sun at most once"
                    .into(),
            ));
        }
        if let Err(reason) = zone(&self.zone) {
            return Err(("windows.zone", reason));
        }
        Ok(())
    }

    /// The instants (UTC seconds) it opens and closes, for openings on local days
    /// `from_day..from_day + days` around `unix` (day `0` is `unix`'s local day).
    fn intervals(&self, tz: &TimeZone, unix: i64, out: &mut Vec<(i64, i64)>) {
        let Ok(now) = Timestamp::from_second(unix) else {
            return;
        };
        let today = now.to_zoned(tz.clone()).date();
        let (start, end) = (
            self.start_minute % DAY_MINUTES,
            self.end_minute % DAY_MINUTES,
        );
        // Yesterday's opening may still be open; a week and a day ahead covers every next one.
        for offset in -1i64..=8 {
            let Ok(date) = today.checked_add(offset.days()) else {
                continue;
            };
            let day = Day::ALL[date.weekday().to_monday_zero_offset() as usize];
            if !self.days.contains(&day) {
                continue;
            }
            let at = |d: jiff::civil::Date, minute: u16| {
                d.at((minute / 60) as i8, (minute % 60) as i8, 0, 0)
                    .to_zoned(tz.clone())
                    .ok()
                    .map(|z| z.timestamp().as_second())
            };
            let end_date = if end <= start {
                date.checked_add(1.day()).ok()
            } else {
                Some(date)
            };
            if let (Some(open), Some(close)) = (at(date, start), end_date.and_then(|d| at(d, end)))
                && close > open
            {
                out.push((open, close));
            }
        }
    }
}

/// The time zone named `name` (`UTC` and IANA names), or why not.
fn zone(name: &str) -> Result<TimeZone, String> {
    if name.eq_ignore_ascii_case("utc") {
        return Ok(TimeZone::UTC);
    }
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} is not a time zone name"));
    }
    TimeZone::get(name).map_err(|_| {
        format!("unknown time zone {name:?} (an IANA name such as Europe/Berlin, or UTC)")
    })
}

/// Where a policy's windows stand at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowState {
    /// Transfers may run; they must stop in this many seconds (`None`: not within a week,
    /// e.g. no windows, or windows that cover every minute).
    Open {
        /// Seconds until the close.
        closes_in: Option<u64>,
    },
    /// Transfers wait; they may start in this many seconds (`None`: never, no window has a day).
    Closed {
        /// Seconds until the next opening.
        opens_in: Option<u64>,
    },
}

/// Where `windows` stand at `unix_secs` (UTC): open (any window open; windows that touch
/// or overlap are one) or closed, and for how long. A window whose zone is unknown counts
/// in UTC ([`TimeWindow::validate`] refuses it before it gets here).
pub fn window_state(windows: &[TimeWindow], unix_secs: u64) -> WindowState {
    if windows.is_empty() {
        return WindowState::Open { closes_in: None };
    }
    let now = unix_secs.min(i64::MAX as u64 / 2) as i64;
    let mut intervals = Vec::new();
    for w in windows.iter().take(MAX_WINDOWS) {
        let tz = zone(&w.zone).unwrap_or(TimeZone::UTC);
        w.intervals(&tz, now, &mut intervals);
    }
    intervals.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(intervals.len());
    for (open, close) in intervals {
        match merged.last_mut() {
            Some(last) if open <= last.1 => last.1 = last.1.max(close),
            _ => merged.push((open, close)),
        }
    }
    for &(open, close) in &merged {
        if open <= now && now < close {
            // Open for a week or more from now: the windows cover every minute.
            let closes_in = (close - now < 7 * 86_400).then_some((close - now) as u64);
            return WindowState::Open { closes_in };
        }
        if open > now {
            return WindowState::Closed {
                opens_in: Some((open - now) as u64),
            };
        }
    }
    WindowState::Closed { opens_in: None }
}

impl fmt::Display for TimeWindow {
    /// `mon-fri 22:00-06:00 Europe/Berlin`; every day is left out: `22:00-06:00 UTC`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut days: Vec<Day> = self.days.clone();
        days.sort_unstable();
        days.dedup();
        if days.len() < 7 {
            // Runs of consecutive days as `mon-fri`, others listed.
            let mut parts = Vec::new();
            let mut i = 0;
            while i < days.len() {
                let mut j = i;
                while j + 1 < days.len() && days[j + 1] as u8 == days[j] as u8 + 1 {
                    j += 1;
                }
                parts.push(match j - i {
                    0 => days[i].name().to_string(),
                    1 => format!("{},{}", days[i].name(), days[j].name()),
                    _ => format!("{}-{}", days[i].name(), days[j].name()),
                });
                i = j + 1;
            }
            write!(f, "{} ", parts.join(","))?;
        }
        let (s, e) = (
            self.start_minute % DAY_MINUTES,
            self.end_minute % DAY_MINUTES,
        );
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02} {}",
            s / 60,
            s % 60,
            e / 60,
            e % 60,
            self.zone
        )
    }
}

impl FromStr for TimeWindow {
    type Err = String;

    /// `[DAYS ]HH:MM-HH:MM[ ZONE]`: `22:00-06:00`, `mon-fri 09:00-17:00 Europe/Berlin`,
    /// `sat,sun 00:00-00:00` (whole days). Days are ranges or lists of `mon`..`sun`; the
    /// zone is UTC when left out. The result is validated.
    fn from_str(s: &str) -> Result<Self, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let pos = words
            .iter()
            .position(|w| w.contains(':'))
            .ok_or_else(|| format!("{s:?} has no HH:MM-HH:MM"))?;
        if pos > 1 || words.len() > pos + 2 {
            return Err(format!("{s:?} is not [DAYS ]HH:MM-HH:MM[ ZONE]"));
        }
        let days = match pos {
            1 => parse_days(words[0])?,
            _ => Day::all(),
        };
        let (a, b) = words[pos]
            .split_once('-')
            .ok_or_else(|| format!("{:?} is not HH:MM-HH:MM", words[pos]))?;
        let w = TimeWindow {
            start_minute: parse_minute(a)?,
            end_minute: parse_minute(b)?,
            days,
            zone: words.get(pos + 1).map_or_else(utc, |z| z.to_string()),
        };
        w.validate().map_err(|(_, reason)| reason)?;
        Ok(w)
    }
}

/// `HH:MM` as a minute of the day.
fn parse_minute(hm: &str) -> Result<u16, String> {
    let bad = || format!("{hm:?} is not HH:MM");
    let (h, m) = hm.trim().split_once(':').ok_or_else(bad)?;
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(format!("{hm:?} is not a time of day (00:00 to 23:59)"));
    }
    Ok(h * 60 + m)
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri` as a list of days (a range may wrap: `fri-mon`).
fn parse_days(s: &str) -> Result<Vec<Day>, String> {
    let day = |d: &str| {
        Day::parse(d)
            .ok_or_else(|| format!("{d:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"))
    };
    let mut days = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)? as usize, day(b)? as usize);
                let mut i = a;
                loop {
                    days.push(Day::ALL[i]);
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => days.push(day(part)?),
        }
    }
    days.sort_unstable();
    days.dedup();
    if days.is_empty() {
        return Err(format!("{s:?} names no day"));
    }
    Ok(days)
}

/// Reads a policy's `windows`: a list, one window, or `null` (policies stored before a policy
/// held several windows had `"window": {..}` or `"window": null`).
pub(crate) fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TimeWindow>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<TimeWindow>),
        One(TimeWindow),
        None(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(w) => vec![w],
        OneOrMany::None(()) => Vec::new(),
    })
}

#[cfg(test)]
mod test {
    use super::*;

    /// 2026-12-07 00:00 UTC, a Monday.
    const MONDAY: u64 = 1_796_601_600;

    #[test]
    fn a_monday_is_a_monday() {
        let z = Timestamp::from_second(MONDAY as i64)
            .unwrap()
            .to_zoned(TimeZone::UTC);
        assert_eq!(z.weekday(), jiff::civil::Weekday::Monday);
        assert_eq!((z.hour(), z.minute()), (0, 0));
    }

    #[test]
    fn daily_utc_windows_wrap_midnight() {
        let night = TimeWindow::daily_utc(22 * 60, 6 * 60);
        let at =
            |h: u64, m: u64| window_state(std::slice::from_ref(&night), MONDAY + h * 3600 + m * 60);
        assert_eq!(
            at(23, 0),
            WindowState::Open {
                closes_in: Some(7 * 3600)
            }
        );
        assert_eq!(
            at(1, 0),
            WindowState::Open {
                closes_in: Some(5 * 3600)
            }
        );
        assert_eq!(
            at(6, 0),
            WindowState::Closed {
                opens_in: Some(16 * 3600)
            }
        );
        assert_eq!(at(21, 59), WindowState::Closed { opens_in: Some(60) });
        let always = TimeWindow::daily_utc(300, 300);
        assert_eq!(
            window_state(&[always], MONDAY + 7),
            WindowState::Open { closes_in: None }
        );
        assert_eq!(
            window_state(&[], MONDAY),
            WindowState::Open { closes_in: None }
        );
    }

    #[test]
    fn days_zones_and_several_windows() {
        // Weekdays 09:00-17:00 in Berlin (UTC+1 in December): 08:00-16:00 UTC.
        let office: TimeWindow = "mon-fri 09:00-17:00 Europe/Berlin".parse().unwrap();
        assert_eq!(office.days.len(), 5);
        assert_eq!(office.to_string(), "mon-fri 09:00-17:00 Europe/Berlin");
        let s = |w: &[TimeWindow], secs: u64| window_state(w, MONDAY + secs);
        let one = std::slice::from_ref(&office);
        assert_eq!(
            s(one, 7 * 3600),
            WindowState::Closed {
                opens_in: Some(3600)
            }
        );
        assert_eq!(
            s(one, 15 * 3600),
            WindowState::Open {
                closes_in: Some(3600)
            }
        );
        // Friday 16:00 UTC closes until Monday 08:00 UTC.
        assert_eq!(
            s(one, 4 * 86_400 + 16 * 3600),
            WindowState::Closed {
                opens_in: Some(2 * 86_400 + 16 * 3600)
            }
        );
        // Saturday's window wraps into Sunday; a Sunday evening window adds on.
        let weekend: TimeWindow = "sat 22:00-06:00".parse().unwrap();
        let sunday: TimeWindow = "sun 05:00-07:00".parse().unwrap();
        let both = [office.clone(), weekend, sunday];
        // Sunday 01:00 UTC: Saturday's window runs until 06:00, and Sunday's touches it
        // until 07:00: one stretch.
        assert_eq!(
            s(&both, 6 * 86_400 + 3600),
            WindowState::Open {
                closes_in: Some(6 * 3600)
            }
        );
        // Two windows a minute apart: closed for that minute only.
        let a = TimeWindow::daily_utc(600, 601);
        let b = TimeWindow::daily_utc(602, 610);
        assert_eq!(
            s(&[a.clone(), b.clone()], 600 * 60 + 30),
            WindowState::Open {
                closes_in: Some(30)
            }
        );
        assert_eq!(
            s(&[a, b], 601 * 60 + 10),
            WindowState::Closed { opens_in: Some(50) }
        );
    }

    #[test]
    fn daylight_saving_changes_move_the_utc_instants() {
        // 2026-03-29 Berlin goes from UTC+1 to UTC+2 at 02:00 local; 2026-03-28 is a Saturday.
        let w: TimeWindow = "03:00-04:00 Europe/Berlin".parse().unwrap();
        let sat = 1_774_656_000; // 2026-03-28 00:00 UTC
        assert_eq!(
            window_state(std::slice::from_ref(&w), sat),
            WindowState::Closed {
                opens_in: Some(2 * 3600)
            }
        );
        assert_eq!(
            window_state(std::slice::from_ref(&w), sat + 86_400),
            WindowState::Closed {
                opens_in: Some(3600)
            }
        );
    }

    #[test]
    fn bad_windows_are_refused_with_reasons() {
        for (text, reason) in [
            ("24:00-01:00", "not a time of day"),
            ("10:00", "not HH:MM-HH:MM"),
            ("moon 10:00-11:00", "not a day"),
            ("10:00-11:00 Mars/Olympus", "unknown time zone"),
            ("mon 10:00-11:00 UTC extra", "not [DAYS ]HH:MM-HH:MM[ ZONE]"),
            ("mon", "no HH:MM-HH:MM"),
        ] {
            let e = text.parse::<TimeWindow>().unwrap_err();
            assert!(e.contains(reason), "{text}: {e}");
        }
        let mut w = TimeWindow::daily_utc(0, 1440);
        assert_eq!(w.validate().unwrap_err().0, "windows.end_minute");
        w.end_minute = 10;
        w.days.clear();
        assert_eq!(w.validate().unwrap_err().0, "windows.days");
        w.days = vec![Day::Sun, Day::Mon, Day::Sun];
        assert!(w.validate().unwrap_err().1.contains("twice"));
        w.days = vec![Day::Sun];
        w.zone = String::new();
        assert_eq!(w.validate().unwrap_err().0, "windows.zone");
        assert_eq!(
            parse_days("fri-mon").unwrap(),
            [Day::Mon, Day::Fri, Day::Sat, Day::Sun]
        );
        assert_eq!(parse_days("Monday,wed").unwrap(), [Day::Mon, Day::Wed]);
    }
}
