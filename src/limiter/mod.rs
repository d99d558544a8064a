//! The limiter core behind the `rate_limit` and `quota` plugins: pure algorithms with their
//! stores, no request handling (the plugins are thin glue over this).
//!
//! - [`gcra`]: the rate-limit algorithm (`requests` per `per` plus `burst`, nginx semantics),
//!   a pure function both stores share.
//! - [`quota`]: calendar windows in UTC (hour, day, month) and the quota decision.
//! - [`local`]: the in-process store, sharded and bounded to `max_keys`.
//! - [`redis`]: the shared store (one Lua script per decision, a deadline, a circuit breaker).
//! - [`store`]: [`RateLimiter`] and [`QuotaLimiter`], one `check(key)` over either store.
//! - [`Decision`]: what every check answers; [`Decision::headers`] gives the `RateLimit-*` and
//!   `Retry-After` headers.
//!
//! Time comes from a [`Clock`], so tests move a [`ManualClock`] instead of sleeping.

pub mod breaker;
pub mod decision;
pub mod gcra;
pub mod local;
pub mod metrics;
pub mod quota;
pub mod redis;
pub mod store;

pub use crate::clock::{Clock, ManualClock, SystemClock};
pub use breaker::BreakerConfig;
pub use decision::{Decision, StoreError};
pub use gcra::GcraParams;
pub use local::{LocalGcra, LocalQuota, DEFAULT_MAX_KEYS};
pub use quota::Period;
pub use redis::{RedisBackend, RedisGcra, RedisOptions, RedisQuota};
pub use store::{QuotaLimiter, RateLimiter};
