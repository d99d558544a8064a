//! Time as plugins see it: injected, so tests move it instead of waiting for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time since the UNIX epoch. Portico's own is [`SystemClock`]; tests use
/// [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;

    /// Whole seconds since the epoch.
    fn unix_secs(&self) -> u64 {
        self.now().as_secs()
    }
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `since_epoch`.
    pub fn new(since_epoch: Duration) -> Self {
        ManualClock(AtomicU64::new(since_epoch.as_nanos() as u64))
    }

    /// A clock at a calendar instant (UTC), e.g. `ManualClock::at(2024, 2, 29, 23, 59, 59)`.
    pub fn at(year: i64, month: u32, day: u32, hour: u32, min: u32, sec: u32) -> Self {
        let days = days_from_civil(year, month, day);
        let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec);
        ManualClock::new(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
    }
    pub fn set(&self, since_epoch: Duration) {
        self.0.store(since_epoch.as_nanos() as u64, Ordering::SeqCst);
    }
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

/// Whole microseconds of a time since the epoch (what the limiter's stores count in: Redis' Lua
/// numbers hold today's time exactly in µs, not in ns).
pub fn micros(t: Duration) -> u64 {
    u64::try_from(t.as_micros()).unwrap_or(u64::MAX)
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (m, d) = (i64::from(month), i64::from(day));
    let y = if m <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400; // [0, 399]
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}
