//! Quotas: `limit` requests per calendar `period` (hour, day or month) in UTC. Each key counts
//! its requests in the current window; a new window starts from zero.
//!
//! The calendar math is Howard Hinnant's `days_from_civil` / `civil_from_days` (proleptic
//! Gregorian, exact for every month length and leap year), a few lines rather than a
//! dependency for the one thing we need: where a month starts and ends.

use super::decision::Decision;
use serde::Deserialize;
use std::time::Duration;

/// A quota's calendar period, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Month,
}

/// One calendar window, `[start, end)` in seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start: u64,
    pub end: u64,
}

impl Period {
    /// The window holding `now`.
    pub fn window(self, now: Duration) -> Window {
        let secs = now.as_secs();
        match self {
            Period::Hour => {
                let start = secs - secs % 3600;
                Window {
                    start,
                    end: start + 3600,
                }
            }
            Period::Day => {
                let start = secs - secs % 86_400;
                Window {
                    start,
                    end: start + 86_400,
                }
            }
            Period::Month => {
                // u64 seconds / 86400 always fits an i64.
                let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
                let (y, m, _) = civil_from_days(days);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let to_secs = |d: i64| u64::try_from(d).unwrap_or(0) * 86_400;
                Window {
                    start: to_secs(days_from_civil(y, m, 1)),
                    end: to_secs(days_from_civil(ny, nm, 1)),
                }
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// Decide one request of a key that has used `used` of `limit` in `window`, at `now_us`
/// (µs since the epoch). Returns the decision and the count to store. Only admitted
/// requests count, so `used` never passes `limit`.
pub fn decide(used: u64, limit: u64, window: Window, now_us: u64) -> (Decision, u64) {
    let left = Duration::from_micros(window.end.saturating_mul(1_000_000).saturating_sub(now_us));
    let admitted = used < limit;
    let used = if admitted { used + 1 } else { used };
    let decision = Decision {
        admitted,
        limit,
        remaining: limit.saturating_sub(used),
        reset_after: left,
        retry_after: (!admitted).then_some(left),
    };
    (decision, used)
}

pub use crate::clock::days_from_civil;

/// The date `(year, month, day)` of a day number from [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are within their ranges by construction.
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn at(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Duration {
        ManualClock::at(y, mo, d, h, mi, s).now()
    }

    fn secs(y: i64, mo: u32, d: u32) -> u64 {
        at(y, mo, d, 0, 0, 0).as_secs()
    }

    /// The window of `now`, as calendar dates of its start and end.
    fn dates(p: Period, now: Duration) -> ((i64, u32, u32), (i64, u32, u32)) {
        let w = p.window(now);
        let date = |s: u64| civil_from_days((s / 86_400) as i64);
        (date(w.start), date(w.end))
    }

    #[test]
    fn civil_math_agrees_with_counting_days() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        for n in 0..(500 * 366) {
            assert_eq!(days_from_civil(y, m, d), n, "{y}-{m}-{d}");
            assert_eq!(civil_from_days(n), (y, m, d), "day {n}");
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn hour_windows() {
        let w = Period::Hour.window(at(2024, 3, 10, 13, 59, 59));
        assert_eq!(w.start, at(2024, 3, 10, 13, 0, 0).as_secs());
        assert_eq!(w.end, at(2024, 3, 10, 14, 0, 0).as_secs());
        let next = Period::Hour.window(at(2024, 3, 10, 14, 0, 0));
        assert_eq!(next.start, w.end);
        // The last hour of a year ends at the next year.
        let w = Period::Hour.window(at(2023, 12, 31, 23, 30, 0));
        assert_eq!(w.end, secs(2024, 1, 1));
    }

    #[test]
    fn day_windows_around_february() {
        assert_eq!(
            dates(Period::Day, at(2024, 2, 28, 23, 59, 59)),
            ((2024, 2, 28), (2024, 2, 29)),
            "leap year: Feb 28 is followed by Feb 29"
        );
        assert_eq!(
            dates(Period::Day, at(2024, 2, 29, 12, 0, 0)),
            ((2024, 2, 29), (2024, 3, 1))
        );
        assert_eq!(
            dates(Period::Day, at(2023, 2, 28, 23, 59, 59)),
            ((2023, 2, 28), (2023, 3, 1)),
            "common year: Feb 28 is followed by Mar 1"
        );
        assert_eq!(
            dates(Period::Day, at(2023, 12, 31, 0, 0, 0)),
            ((2023, 12, 31), (2024, 1, 1))
        );
    }

    #[test]
    fn month_windows() {
        let month = |y, m, d| dates(Period::Month, at(y, m, d, 12, 0, 0));
        assert_eq!(month(2024, 2, 29), ((2024, 2, 1), (2024, 3, 1)));
        assert_eq!(month(2024, 2, 15).1, (2024, 3, 1));
        assert_eq!(
            Period::Month.window(at(2024, 2, 1, 0, 0, 0)).end - secs(2024, 2, 1),
            29 * 86_400
        );
        assert_eq!(
            Period::Month.window(at(2023, 2, 1, 0, 0, 0)).end - secs(2023, 2, 1),
            28 * 86_400
        );
        assert_eq!(
            Period::Month.window(at(2100, 2, 1, 0, 0, 0)).end - secs(2100, 2, 1),
            28 * 86_400,
            "2100 is not leap"
        );
        assert_eq!(
            Period::Month.window(at(2000, 2, 1, 0, 0, 0)).end - secs(2000, 2, 1),
            29 * 86_400,
            "2000 is leap"
        );
        // 30- and 31-day months.
        assert_eq!(month(2024, 4, 30), ((2024, 4, 1), (2024, 5, 1)));
        assert_eq!(
            Period::Month.window(at(2024, 4, 1, 0, 0, 0)).end - secs(2024, 4, 1),
            30 * 86_400
        );
        assert_eq!(month(2024, 1, 31), ((2024, 1, 1), (2024, 2, 1)));
        assert_eq!(
            Period::Month.window(at(2024, 1, 1, 0, 0, 0)).end - secs(2024, 1, 1),
            31 * 86_400
        );
        // December to January.
        assert_eq!(month(2023, 12, 31), ((2023, 12, 1), (2024, 1, 1)));
        let last = Period::Month.window(at(2023, 12, 31, 23, 59, 59));
        let first = Period::Month.window(at(2024, 1, 1, 0, 0, 0));
        assert_eq!(last.end, first.start);
        assert_eq!(first.end, secs(2024, 2, 1));
    }

    #[test]
    fn decisions_count_admitted_requests_only() {
        let now = at(2024, 2, 29, 23, 0, 0);
        let w = Period::Day.window(now);
        let now_us = now.as_micros() as u64;
        let (d, used) = decide(0, 2, w, now_us);
        assert!(d.admitted);
        assert_eq!((used, d.remaining, d.limit), (1, 1, 2));
        assert_eq!(d.reset_after, Duration::from_secs(3600));
        assert_eq!(d.retry_after, None);
        let (d, used) = decide(used, 2, w, now_us);
        assert_eq!((d.admitted, used, d.remaining), (true, 2, 0));
        let (d, used) = decide(used, 2, w, now_us);
        assert_eq!((d.admitted, used, d.remaining), (false, 2, 0));
        assert_eq!(d.retry_after, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn period_from_yaml() {
        let p: Period = serde_yaml::from_str("month").unwrap();
        assert_eq!(p, Period::Month);
        assert!(serde_yaml::from_str::<Period>("week").is_err());
    }
}
