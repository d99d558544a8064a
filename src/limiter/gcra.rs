//! The rate limit's algorithm: GCRA (the generic cell rate algorithm, a token bucket that keeps
//! one number per key), with nginx `limit_req` semantics for `requests` per `per` plus `burst`.
//!
//! Each key stores its TAT, the "theoretical arrival time" at which its bucket is full again.
//! With the emission interval `T = per / requests` and the tolerance `τ = T × burst`, a request
//! at `now` passes when `max(TAT, now) − now ≤ τ`, and then moves TAT on by `T`. So a fresh key
//! admits `burst + 1` requests back to back, then one per `T`.
//!
//! [`decide`] is pure and is the one definition of the numbers: the local store calls it under
//! a lock, and the Redis store runs the same comparison in Lua (`gcra.lua`) and then calls
//! [`decide`] on what the script saw, so both stores answer alike.
//!
//! Time is in whole microseconds since the epoch, not nanoseconds: Redis' Lua has only doubles,
//! exact up to 2^53, which holds today's time in µs (≈ 1.7e15) but not in ns (≈ 1.7e18). One unit
//! on both sides keeps their arithmetic identical; a µs is far finer than any HTTP rate limit.

use super::decision::Decision;
use std::time::Duration;

/// The most `T + τ` may be, so `now + T + τ` stays exact in Lua's doubles for centuries.
const MAX_SPAN_US: u64 = 100 * 365 * 86_400 * 1_000_000;

/// A rate limit's parameters, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GcraParams {
    interval_us: u64,
    tolerance_us: u64,
    limit: u64,
}

impl GcraParams {
    /// `requests` per `per`, plus `burst` back to back. Errors read as config errors.
    pub fn new(requests: u64, per: Duration, burst: u64) -> Result<GcraParams, String> {
        if requests == 0 {
            return Err("requests must be at least 1".into());
        }
        let per_us = u64::try_from(per.as_micros()).unwrap_or(u64::MAX);
        if per_us == 0 {
            return Err("per must be at least 1µs".into());
        }
        let interval_us = per_us / requests;
        if interval_us == 0 {
            return Err(format!(
                "{requests} requests per {per:?} is more than one per microsecond: use a longer `per`"
            ));
        }
        let tolerance_us = interval_us
            .checked_mul(burst)
            .filter(|t| t.saturating_add(interval_us) <= MAX_SPAN_US)
            .ok_or_else(|| "burst × per / requests must be under 100 years".to_string())?;
        Ok(GcraParams {
            interval_us,
            tolerance_us,
            limit: burst + 1,
        })
    }

    /// `T`: one request's share of the budget.
    pub fn interval_us(&self) -> u64 {
        self.interval_us
    }

    /// `τ`: how far ahead of now a key's TAT may run and still pass.
    pub fn tolerance_us(&self) -> u64 {
        self.tolerance_us
    }

    /// The bucket's capacity, `burst + 1`.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// One decision and the TAT to store after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub decision: Decision,
    /// The key's TAT after this request (unchanged when refused). A TAT at or before `now`
    /// is a full bucket: such a key may be forgotten without changing any later decision.
    pub new_tat: u64,
}

/// Decide one request of a key whose stored TAT is `tat` (`None`: never seen, or forgotten),
/// at `now` (µs since the epoch).
pub fn decide(tat: Option<u64>, now: u64, p: &GcraParams) -> Step {
    let tat = tat.map_or(now, |t| t.max(now));
    let debt = tat - now;
    let admitted = debt <= p.tolerance_us;
    let new_tat = if admitted {
        tat.saturating_add(p.interval_us)
    } else {
        tat
    };
    let after = new_tat - now;
    // Requests that would still pass now, one after another: each adds T to the debt.
    let remaining = if after <= p.tolerance_us {
        (p.tolerance_us - after) / p.interval_us + 1
    } else {
        0
    };
    Step {
        decision: Decision {
            admitted,
            limit: p.limit,
            remaining,
            reset_after: Duration::from_micros(after),
            retry_after: (!admitted).then(|| Duration::from_micros(debt - p.tolerance_us)),
        },
        new_tat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const MS: u64 = 1_000;

    fn params(requests: u64, per_ms: u64, burst: u64) -> GcraParams {
        GcraParams::new(requests, Duration::from_millis(per_ms), burst).unwrap()
    }

    /// Run `decide` the way a store does; returns (admitted, decision).
    fn run(tat: &mut Option<u64>, now: u64, p: &GcraParams) -> Decision {
        let step = decide(*tat, now, p);
        *tat = Some(step.new_tat);
        step.decision
    }

    #[test]
    fn parameters() {
        let p = params(10, 1000, 4);
        assert_eq!(p.interval_us(), 100 * MS);
        assert_eq!(p.tolerance_us(), 400 * MS);
        assert_eq!(p.limit(), 5);
        assert!(GcraParams::new(0, Duration::from_secs(1), 0).is_err());
        assert!(GcraParams::new(1, Duration::ZERO, 0).is_err());
        assert!(GcraParams::new(2_000_000, Duration::from_secs(1), 0).is_err());
        assert!(GcraParams::new(1, Duration::from_secs(86_400), u64::MAX).is_err());
        assert!(GcraParams::new(1, Duration::from_secs(86_400), 1000).is_ok());
    }

    #[test]
    fn fresh_key_admits_burst_plus_one_then_one_per_interval() {
        let p = params(10, 1000, 4); // T = 100ms, τ = 400ms
        let t0 = 1_700_000_000 * S;
        let mut tat = None;
        let admitted = (0..20).filter(|_| run(&mut tat, t0, &p).admitted).count();
        assert_eq!(admitted, 5, "burst + 1 back to back");
        // One more per T, never two.
        for i in 1..=10 {
            let now = t0 + i * 100 * MS;
            assert!(run(&mut tat, now, &p).admitted, "one at +{i}T");
            assert!(!run(&mut tat, now, &p).admitted, "only one at +{i}T");
        }
        // Just before the next T: refused; at it: admitted.
        assert!(!run(&mut tat, t0 + 1100 * MS - 1, &p).admitted);
        assert!(run(&mut tat, t0 + 1100 * MS, &p).admitted);
    }

    #[test]
    fn burst_zero_admits_one_per_interval() {
        let p = params(2, 1000, 0); // T = 500ms
        let mut tat = None;
        assert!(run(&mut tat, 0, &p).admitted);
        assert!(!run(&mut tat, 0, &p).admitted);
        assert!(!run(&mut tat, 499 * MS, &p).admitted);
        assert!(run(&mut tat, 500 * MS, &p).admitted);
    }

    #[test]
    fn sustained_double_rate_gets_the_rate_plus_burst() {
        let p = params(10, 1000, 4);
        let mut tat = None;
        // 20 requests a second for 3 seconds, evenly spaced.
        let admitted = (0..60)
            .filter(|i| run(&mut tat, 5 * S + i * 50 * MS, &p).admitted)
            .count() as i64;
        let expected = 10 * 3 + 4 + 1;
        assert!(
            (admitted - expected).abs() <= 1,
            "admitted {admitted}, expected {expected}±1"
        );
    }

    #[test]
    fn remaining_reset_and_retry_after() {
        let p = params(10, 1000, 2); // T = 100ms, τ = 200ms, capacity 3
        let mut tat = None;
        let d = run(&mut tat, 0, &p);
        assert_eq!((d.admitted, d.limit, d.remaining), (true, 3, 2));
        assert_eq!(d.reset_after, Duration::from_millis(100));
        assert_eq!(d.retry_after, None);
        let d = run(&mut tat, 0, &p);
        assert_eq!((d.remaining, d.reset_after), (1, Duration::from_millis(200)));
        let d = run(&mut tat, 0, &p);
        assert_eq!((d.admitted, d.remaining), (true, 0));
        assert_eq!(d.reset_after, Duration::from_millis(300));
        // Refused: the debt is 300ms, 100ms over τ.
        let d = run(&mut tat, 0, &p);
        assert!(!d.admitted);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after, Duration::from_millis(300));
        assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
        // 30ms later: 70ms to wait.
        let d = run(&mut tat, 30 * MS, &p);
        assert_eq!(d.retry_after, Some(Duration::from_millis(70)));
        assert_eq!(d.reset_after, Duration::from_millis(270));
        // Half an interval of refill is not a request yet.
        let d = run(&mut tat, 150 * MS, &p);
        assert!(d.admitted);
        assert_eq!(d.remaining, 0);
        // A long idle key is a full bucket again.
        let d = run(&mut tat, 10 * S, &p);
        assert_eq!((d.admitted, d.remaining), (true, 2));
        let headers = d.headers();
        assert!(headers.contains(&("ratelimit-reset", "1".to_string())));
    }

    #[test]
    fn refused_request_does_not_move_the_tat() {
        let p = params(1, 1000, 0);
        let first = decide(None, 0, &p);
        let refused = decide(Some(first.new_tat), 10, &p);
        assert!(!refused.decision.admitted);
        assert_eq!(refused.new_tat, first.new_tat);
    }

    #[test]
    fn stale_tat_counts_as_a_full_bucket() {
        let p = params(10, 1000, 4);
        assert_eq!(decide(Some(5), 1_000 * S, &p), decide(None, 1_000 * S, &p));
    }
}
