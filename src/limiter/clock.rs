//! Where the limiter's time comes from. Time is always injected: the stores ask a [`Clock`],
//! so tests move a [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time since the UNIX epoch. Wall time, not a monotonic instant, because quota
/// windows are calendar windows and the Redis store compares times across processes.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        // A clock set before 1970 is a broken host; treating it as the epoch keeps the
        // limiter working (every key then looks fresh) instead of panicking in a request.
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }
}

/// A clock that only moves when told to (nanosecond resolution), for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start` since the epoch.
    pub fn new(start: Duration) -> Self {
        let clock = ManualClock::default();
        clock.set(start);
        clock
    }

    /// A clock at a calendar instant (UTC), e.g. `ManualClock::at(2024, 2, 29, 23, 59, 59)`.
    pub fn at(year: i64, month: u32, day: u32, hour: u32, min: u32, sec: u32) -> Self {
        let days = super::quota::days_from_civil(year, month, day);
        let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec);
        ManualClock::new(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
    }

    pub fn set(&self, t: Duration) {
        self.nanos
            .store(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// Microseconds since the epoch: the limiter's unit of time (see `gcra.rs` for why µs).
pub fn micros(t: Duration) -> u64 {
    u64::try_from(t.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Duration::from_secs(10));
        assert_eq!(c.now(), Duration::from_secs(10));
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now(), Duration::from_millis(11_500));
        c.set(Duration::from_secs(3));
        assert_eq!(c.now(), Duration::from_secs(3));
    }

    #[test]
    fn manual_clock_at_a_calendar_instant() {
        // 2024-02-29T23:59:59Z
        assert_eq!(ManualClock::at(2024, 2, 29, 23, 59, 59).now().as_secs(), 1_709_251_199);
        assert_eq!(ManualClock::at(1970, 1, 1, 0, 0, 0).now(), Duration::ZERO);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > Duration::from_secs(1_577_836_800));
    }
}
