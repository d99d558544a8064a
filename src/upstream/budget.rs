//! The retry policy of an upstream, and its retry budget: over a short sliding window, retries
//! may not exceed `budget` × requests (plus a small floor, so a quiet upstream still retries its
//! rare failure). In an outage every first attempt fails; without a budget each would be tried
//! `1 + attempts` times, multiplying the load on an upstream that is already struggling.
//!
//! The window's counts live in the health registry by upstream name, so a reload keeps them.

use std::sync::{Arc, Mutex};

/// How long the budget looks back, in one-second slots.
const SLOTS: usize = 10;
/// Retries always allowed per window, whatever the traffic (Envoy's `min_retry_concurrency`
/// and Linkerd's `minRetriesPerSecond` play the same part).
pub const MIN_RETRIES_PER_WINDOW: f64 = 3.0;

/// Why an attempt failed, as the retry policy's `on` list names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// No connection could be made (refused, unreachable, TLS handshake).
    ConnectFailure,
    /// The connection was not made within `timeouts.connect` (`connect_failure` or `timeout`).
    ConnectTimeout,
    /// The connection broke after it was made, or the answer could not be read.
    Reset,
    /// The upstream did not answer (or stopped answering) within `timeouts.read`/`write`.
    Timeout,
    /// The upstream answered with this status.
    Status(u16),
}

impl RetryCause {
    /// Nothing reached the upstream: any method may be retried.
    pub fn before_sending(self) -> bool {
        matches!(self, RetryCause::ConnectFailure | RetryCause::ConnectTimeout)
    }
}

/// `retries: {attempts, on, budget}` of one upstream.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Extra attempts after the first (0 = none).
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    /// Upstream answers retried (502, 503, 504).
    pub on_status: Vec<u16>,
    pub budget: Option<RetryBudget>,
}

impl Default for RetryPolicy {
    /// One retry on a connection failure, no budget.
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            on_connect_failure: true,
            on_reset: false,
            on_timeout: false,
            on_status: Vec::new(),
            budget: None,
        }
    }
}

impl RetryPolicy {
    /// Whether the `on` list names this cause.
    pub fn covers(&self, cause: RetryCause) -> bool {
        match cause {
            RetryCause::ConnectFailure => self.on_connect_failure,
            RetryCause::ConnectTimeout => self.on_connect_failure || self.on_timeout,
            RetryCause::Reset => self.on_reset,
            RetryCause::Timeout => self.on_timeout,
            RetryCause::Status(s) => self.on_status.contains(&s),
        }
    }

    /// Whether the request that made `attempts_made` attempts so far may make another after
    /// `cause`. `replayable`: the method is idempotent and the body can be sent again (what
    /// every cause but a connect failure requires). Takes a retry from the budget when it says
    /// yes.
    pub fn allows(&self, attempts_made: u32, cause: RetryCause, replayable: bool) -> bool {
        (cause.before_sending() || replayable)
            && self.covers(cause)
            && attempts_made <= self.attempts
            && self
                .budget
                .as_ref()
                .is_none_or(|b| b.window.try_retry(b.ratio, now_ms()))
    }

    /// A request's first attempt (what the budget is a fraction of).
    pub fn count_request(&self) {
        if let Some(b) = &self.budget {
            b.window.request(now_ms());
        }
    }
}

/// `budget`: retries ≤ `ratio` × requests over the window (+ [`MIN_RETRIES_PER_WINDOW`]).
#[derive(Debug, Clone)]
pub struct RetryBudget {
    pub ratio: f64,
    pub window: Arc<RetryWindow>,
}

fn now_ms() -> u64 {
    super::health::now_ms()
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The second this slot counts (since the process's epoch).
    second: u64,
    requests: u64,
    retries: u64,
}

/// Requests and retries of one upstream over the last [`SLOTS`] seconds.
#[derive(Debug, Default)]
pub struct RetryWindow {
    slots: Mutex<[Slot; SLOTS]>,
}

impl RetryWindow {
    fn slot(slots: &mut [Slot; SLOTS], second: u64) -> &mut Slot {
        let s = &mut slots[(second % SLOTS as u64) as usize];
        if s.second != second {
            *s = Slot {
                second,
                ..Slot::default()
            };
        }
        s
    }

    /// Count a request at `now_ms`.
    pub fn request(&self, now_ms: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Self::slot(&mut slots, now_ms / 1000).requests += 1;
    }

    /// Take a retry at `now_ms` if the budget has room for it.
    pub fn try_retry(&self, ratio: f64, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, retries) = slots
            .iter()
            .filter(|s| s.second + (SLOTS as u64) > second && s.second <= second)
            .fold((0u64, 0u64), |(q, r), s| (q + s.requests, r + s.retries));
        if (retries + 1) as f64 > ratio * requests as f64 + MIN_RETRIES_PER_WINDOW {
            return false;
        }
        Self::slot(&mut slots, second).retries += 1;
        true
    }

    /// (requests, retries) in the window ending at `now_ms`.
    pub fn counts(&self, now_ms: u64) -> (u64, u64) {
        let second = now_ms / 1000;
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .filter(|s| s.second + (SLOTS as u64) > second && s.second <= second)
            .fold((0, 0), |(q, r), s| (q + s.requests, r + s.retries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_budget() {
        let w = RetryWindow::default();
        let t = 50_000;
        for _ in 0..100 {
            w.request(t);
        }
        let granted = (0..100).filter(|_| w.try_retry(0.2, t)).count();
        assert_eq!(granted, 23, "20% of 100 requests, plus the floor of 3");
        // More requests make room for more retries.
        for _ in 0..10 {
            w.request(t + 500);
        }
        assert!(w.try_retry(0.2, t + 500));
        assert!(w.try_retry(0.2, t + 500));
        assert!(!w.try_retry(0.2, t + 500));
    }

    #[test]
    fn the_window_slides() {
        let w = RetryWindow::default();
        for _ in 0..100 {
            w.request(0);
        }
        while w.try_retry(0.2, 0) {}
        assert_eq!(w.counts(9_999), (100, 23));
        // Ten seconds later the old second no longer counts: only the floor is left.
        assert_eq!(w.counts(10_000), (0, 0));
        assert_eq!((0..10).filter(|_| w.try_retry(0.2, 10_000)).count(), 3);
    }

    #[test]
    fn a_quiet_upstream_still_retries() {
        let w = RetryWindow::default();
        w.request(1_000);
        assert!(w.try_retry(0.2, 1_000));
    }

    #[test]
    fn policy_covers_causes_and_guards_replays() {
        let p = RetryPolicy {
            attempts: 2,
            on_connect_failure: false,
            on_reset: true,
            on_timeout: true,
            on_status: vec![503],
            budget: None,
        };
        assert!(p.allows(1, RetryCause::Status(503), true));
        assert!(!p.allows(1, RetryCause::Status(502), true));
        assert!(
            !p.allows(1, RetryCause::Status(503), false),
            "a POST that reached the upstream"
        );
        assert!(
            p.allows(1, RetryCause::ConnectTimeout, false),
            "on: timeout covers connect timeouts"
        );
        assert!(!p.allows(1, RetryCause::ConnectFailure, true));
        assert!(p.allows(2, RetryCause::Reset, true));
        assert!(!p.allows(3, RetryCause::Reset, true), "two retries at most");
    }
}
