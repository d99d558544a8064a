//! The two front doors the `rate_limit` and `quota` plugins hold: one limiter each, in this
//! process or in Redis, with the same `check` for both.

use super::decision::{Decision, StoreError};
use super::local::{LocalGcra, LocalQuota};
use super::redis::{RedisGcra, RedisQuota};

/// A rate limit (GCRA) and where it keeps its keys.
pub enum RateLimiter {
    Local(LocalGcra),
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
    Local(LocalQuota),
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
