//! The limiter's metrics (the default registry, like `crate::metrics`). Call [`init`] with the
//! other metrics so they show as zeros from the start.

use once_cell::sync::Lazy;
use prometheus::{register_int_counter, register_int_counter_vec, IntCounter, IntCounterVec};

/// Decisions the shared store could not make, by reason (`timeout` | `error` | `circuit_open`).
/// Counted where the error arises (in `RedisBackend`), so no caller can forget it.
pub static STORE_ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    let c = register_int_counter_vec!(
        "portico_limit_store_errors_total",
        "Rate-limit and quota decisions the shared store could not make, by reason (timeout | error | circuit_open)",
        &["reason"]
    )
    .expect("register portico_limit_store_errors_total");
    for reason in ["timeout", "error", "circuit_open"] {
        c.with_label_values(&[reason]);
    }
    c
});

/// Live keys a local store forgot because it was full (idle keys are dropped silently).
pub static LOCAL_EVICTIONS: Lazy<IntCounter> = Lazy::new(|| {
    register_int_counter!(
        "portico_limit_local_evictions_total",
        "Live keys a local rate-limit or quota store evicted because it held max_keys (each then starts with a full budget)"
    )
    .expect("register portico_limit_local_evictions_total")
});

/// Requests the `rate_limit` and `quota` plugins decided, by route, plugin and result
/// (`admitted` | `limited`). A store error counts as what `on_store_error` made of it. The
/// plugins create their series at load, so they show as zeros before the first request.
pub static LIMIT_REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_limit_requests_total",
        "Requests seen by rate_limit and quota plugins, by route, plugin and result (admitted | limited)",
        &["route", "plugin", "result"]
    )
    .expect("register portico_limit_requests_total")
});

pub fn init() {
    Lazy::force(&LIMIT_REQUESTS);
    Lazy::force(&STORE_ERRORS);
    Lazy::force(&LOCAL_EVICTIONS);
}
