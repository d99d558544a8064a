//! A circuit breaker for the shared store: after `failures` consecutive failed calls, stop
//! calling for `cool_down`, then let one probe through. The probe's success closes the circuit;
//! its failure opens it for another cool-down.
//!
//! While Redis is down every request would otherwise wait out the timeout, and every gateway
//! would keep hammering a server that may be struggling to come back. Open, a call costs a
//! lock and a clock read.

use crate::clock::{micros, Clock};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit (at least 1).
    pub failures: u32,
    /// How long an open circuit refuses calls before it lets a probe through.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 3,
            cool_down: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    /// Set while open: calls before this instant (µs since the epoch) are refused.
    open_until: Option<u64>,
    /// A half-open probe is in flight: others wait for its verdict.
    probing: bool,
}

pub(crate) struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        Breaker {
            config: BreakerConfig {
                failures: config.failures.max(1),
                ..config
            },
            state: Mutex::new(State::default()),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a call go out now? `None` while open (or while another call is the probe).
    pub(crate) fn admit(&self) -> Option<Permit<'_>> {
        let mut s = self.lock();
        let Some(until) = s.open_until else {
            return Some(Permit::new(self, false));
        };
        let now = micros(self.clock.now());
        let cool_down = micros(self.config.cool_down);
        // `until - now > cool_down` means the wall clock stepped back: don't stay open for it.
        let cooling = now < until && until - now <= cool_down;
        if cooling || s.probing {
            return None;
        }
        s.probing = true;
        Some(Permit::new(self, true))
    }

    /// True while calls are refused (open, or half-open with a probe out).
    pub(crate) fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    fn record(&self, probe: bool, ok: Option<bool>) {
        let mut s = self.lock();
        if probe {
            s.probing = false;
        }
        match ok {
            Some(true) => *s = State::default(),
            Some(false) => {
                s.failures = s.failures.saturating_add(1);
                if probe || s.failures >= self.config.failures {
                    s.open_until = Some(micros(self.clock.now()).saturating_add(micros(self.config.cool_down)));
                }
            }
            // Abandoned (the caller went away): no verdict; a probe slot is free again.
            None => {}
        }
    }
}

/// One admitted call. Report how it went; dropping it unreported frees a probe slot.
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl<'a> Permit<'a> {
    fn new(breaker: &'a Breaker, probe: bool) -> Self {
        Permit {
            breaker,
            probe,
            done: false,
        }
    }

    pub(crate) fn success(mut self) {
        self.done = true;
        self.breaker.record(self.probe, Some(true));
    }

    pub(crate) fn failure(mut self) {
        self.done = true;
        self.breaker.record(self.probe, Some(false));
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn breaker() -> (Breaker, Arc<ManualClock>) {
        let c = Arc::new(ManualClock::new(Duration::from_secs(1_000)));
        (Breaker::new(BreakerConfig::default(), c.clone()), c)
    }

    fn fail(b: &Breaker) {
        b.admit().expect("admitted").failure();
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let (b, _) = breaker();
        fail(&b);
        fail(&b);
        b.admit().unwrap().success(); // resets the count
        fail(&b);
        fail(&b);
        assert!(!b.is_open());
        fail(&b);
        assert!(b.is_open());
        assert!(b.admit().is_none());
    }

    #[test]
    fn one_probe_after_the_cool_down() {
        let (b, c) = breaker();
        (0..3).for_each(|_| fail(&b));
        c.advance(Duration::from_millis(1999));
        assert!(b.admit().is_none(), "still cooling down");
        c.advance(Duration::from_millis(1));
        let probe = b.admit().expect("the probe");
        assert!(b.admit().is_none(), "one probe at a time");
        probe.success();
        assert!(!b.is_open());
        assert!(b.admit().is_some());
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_cool_down() {
        let (b, c) = breaker();
        (0..3).for_each(|_| fail(&b));
        c.advance(Duration::from_secs(2));
        fail(&b); // the probe
        assert!(b.admit().is_none());
        c.advance(Duration::from_millis(1999));
        assert!(b.admit().is_none());
        c.advance(Duration::from_millis(1));
        assert!(b.admit().is_some());
    }

    #[test]
    fn an_abandoned_probe_lets_another_through() {
        let (b, c) = breaker();
        (0..3).for_each(|_| fail(&b));
        c.advance(Duration::from_secs(2));
        drop(b.admit().expect("probe"));
        assert!(b.admit().is_some());
    }

    #[test]
    fn a_clock_stepping_back_does_not_hold_it_open() {
        let (b, c) = breaker();
        (0..3).for_each(|_| fail(&b));
        c.set(Duration::from_secs(10));
        assert!(b.admit().is_some());
    }
}
