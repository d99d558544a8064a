//! The two front doors the `rate_limit` and `quota` plugins hold: one limiter each, in this
//! process or in Redis, with the same `check` for both.

use super::decision::{Decision, StoreError};
use super::local::{LocalGcra, LocalQuota};
use super::redis::{RedisGcra, RedisQuota};
use std::sync::Arc;

/// A rate limit (GCRA) and where it keeps its keys. A local store is shared (`Arc`) so the
/// plugin can keep it in reload-surviving state and sweep it from a periodic task.
pub enum RateLimiter {
    Local(Arc<LocalGcra>),
    Redis(RedisGcra),
}

impl RateLimiter {
    /// Decide one request of `key`. A local limiter never fails; a Redis one may, and then
    /// the caller applies `on_store_error` (the error is already counted).
    pub async fn check(&self, key: &str) -> Result<Decision, StoreError> {
        match self {
            RateLimiter::Local(l) => Ok(l.check(key)),
            RateLimiter::Redis(r) => r.check(key).await,
        }
    }
}

/// A quota and where it keeps its counters.
pub enum QuotaLimiter {
    Local(Arc<LocalQuota>),
    Redis(RedisQuota),
}

impl QuotaLimiter {
    /// Decide one request of `key` in the current calendar window.
    pub async fn check(&self, key: &str) -> Result<Decision, StoreError> {
        match self {
            QuotaLimiter::Local(l) => Ok(l.check(key)),
            QuotaLimiter::Redis(r) => r.check(key).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plugin hooks are `async_trait` futures that must be `Send`: so must a check.
    #[allow(dead_code)]
    fn checks_are_send(r: &RateLimiter, q: &QuotaLimiter) {
        fn send<T: Send>(_: T) {}
        send(r.check("k"));
        send(q.check("k"));
    }

    #[tokio::test]
    async fn local_limiters_never_fail() {
        use crate::limiter::{GcraParams, ManualClock, Period, DEFAULT_MAX_KEYS};
        use std::time::Duration;
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1_700_000_000)));
        let p = GcraParams::new(1, Duration::from_secs(1), 0).unwrap();
        let r = RateLimiter::Local(Arc::new(LocalGcra::new(p, DEFAULT_MAX_KEYS, clock.clone())));
        assert!(r.check("k").await.unwrap().admitted);
        assert!(!r.check("k").await.unwrap().admitted);
        let q = QuotaLimiter::Local(Arc::new(LocalQuota::new(1, Period::Hour, DEFAULT_MAX_KEYS, clock)));
        assert!(q.check("k").await.unwrap().admitted);
        let refused = q.check("k").await.unwrap();
        assert!(!refused.admitted);
        assert!(refused.headers().iter().any(|(k, _)| *k == "retry-after"));
    }
}
