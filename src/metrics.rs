//! Prometheus metrics (the default registry, so Pingora's own metrics show too).

use once_cell::sync::Lazy;
use prometheus::{
    register_gauge_vec, register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge_vec,
    Encoder, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, TextEncoder,
};
use std::sync::OnceLock;

pub static REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_requests_total",
        "Requests answered, by route, upstream and status",
        &["route", "upstream", "status"]
    )
    .expect("register portico_requests_total")
});

pub static DURATION: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "portico_request_duration_seconds",
        "Time from request head to the end of the response, by route",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("register portico_request_duration_seconds")
});

/// The statuses a route's [`RouteMetrics`] keeps a handle for; others are looked up by label.
const COMMON_STATUSES: [u16; 18] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 408, 413, 429, 499, 500, 502, 503,
];

/// One route's handles to the request metrics, resolved on its first request of each kind:
/// looking a series up by its labels hashes every label and takes the vector's lock, on every
/// request. A series appears in `/metrics` once it has counted something, as before.
#[derive(Default)]
pub struct RouteMetrics {
    duration: OnceLock<Histogram>,
    /// By position in [`COMMON_STATUSES`], for the route's own upstream.
    requests: [OnceLock<IntCounter>; COMMON_STATUSES.len()],
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteMetrics")
    }
}

impl RouteMetrics {
    /// Count a request of `route` answered with `status` by `upstream` (`own_upstream`: the
    /// route's configured one, whose handles are kept) after `seconds`.
    pub fn record(&self, route: &str, upstream: &str, own_upstream: bool, status: u16, seconds: f64) {
        let slot = COMMON_STATUSES
            .iter()
            .position(|&s| s == status)
            .filter(|_| own_upstream);
        match slot {
            Some(i) => self.requests[i]
                .get_or_init(|| REQUESTS.with_label_values(&[route, upstream, &status.to_string()]))
                .inc(),
            None => REQUESTS
                .with_label_values(&[route, upstream, &status.to_string()])
                .inc(),
        }
        self.duration
            .get_or_init(|| DURATION.with_label_values(&[route]))
            .observe(seconds);
    }
}

pub static UPSTREAM_HEALTHY: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "portico_upstream_healthy",
        "1 when the endpoint takes traffic (healthy and not ejected), else 0",
        &["upstream", "endpoint"]
    )
    .expect("register portico_upstream_healthy")
});

pub static UPSTREAM_EJECTIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_upstream_ejections_total",
        "Passive ejections of an endpoint (failed proxied exchanges; by default one failed connect)",
        &["upstream", "endpoint"]
    )
    .expect("register portico_upstream_ejections_total")
});

pub static RELOADS: Lazy<IntCounterVec> = Lazy::new(|| {
    let c = register_int_counter_vec!(
        "portico_config_reloads_total",
        "Config reloads, by result (ok | error)",
        &["result"]
    )
    .expect("register portico_config_reloads_total");
    c.with_label_values(&["ok"]);
    c.with_label_values(&["error"]);
    c
});

pub static CANARY_PERCENT: Lazy<GaugeVec> = Lazy::new(|| {
    register_gauge_vec!(
        "portico_canary_percent",
        "Effective share of a route's traffic sent to its canary",
        &["route"]
    )
    .expect("register portico_canary_percent")
});

pub static CANARY_ROLLBACKS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_canary_rollbacks_total",
        "Times a canary's guard cut it to 0%",
        &["route"]
    )
    .expect("register portico_canary_rollbacks_total")
});

pub static CANARY_REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_canary_requests_total",
        "Requests of a route with a canary, by side (stable | canary)",
        &["route", "side"]
    )
    .expect("register portico_canary_requests_total")
});

pub static CANARY_FAILURES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_canary_failures_total",
        "Failed requests (5xx, connection failures, timeouts, failing gRPC statuses) of a route with a canary, by side",
        &["route", "side"]
    )
    .expect("register portico_canary_failures_total")
});

pub static MIRROR_COPIES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_mirror_copies_total",
        "Mirrored copies by route and result: sent (the mirror answered), failed (it could not be reached or timed out), dropped (over max_in_flight)",
        &["route", "result"]
    )
    .expect("register portico_mirror_copies_total")
});

pub static PANICS: Lazy<IntCounter> = Lazy::new(|| {
    register_int_counter!("portico_panics_total", "Panics caught (each one is a bug)")
        .expect("register portico_panics_total")
});

pub static REJECTED_CONNECTIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    let c = register_int_counter_vec!(
        "portico_rejected_connections_total",
        "Downstream connections closed by an edge limit, by reason",
        &["reason"]
    )
    .expect("register portico_rejected_connections_total");
    // Every reason exists from the start, so alerts see 0 rather than nothing.
    for reason in [
        "per_ip_limit",
        "header_timeout",
        "body_timeout",
        "tls_handshake",
        "client_cert",
    ] {
        c.with_label_values(&[reason]);
    }
    c
});

pub static TLS_PEER_WARNINGS: Lazy<IntCounter> = Lazy::new(|| {
    register_int_counter!(
        "portico_tls_peer_warnings_total",
        "Warnings of the TLS library about what a peer sent (an IP address as SNI, a warning alert, an out-of-place message), logged at debug"
    )
    .expect("register portico_tls_peer_warnings_total")
});

/// Make every metric exist from the start (so dashboards see zeros, not gaps).
pub fn init() {
    Lazy::force(&REQUESTS);
    Lazy::force(&DURATION);
    Lazy::force(&UPSTREAM_HEALTHY);
    Lazy::force(&UPSTREAM_EJECTIONS);
    Lazy::force(&RELOADS);
    Lazy::force(&CANARY_PERCENT);
    Lazy::force(&CANARY_ROLLBACKS);
    Lazy::force(&CANARY_REQUESTS);
    Lazy::force(&CANARY_FAILURES);
    Lazy::force(&MIRROR_COPIES);
    Lazy::force(&PANICS);
    Lazy::force(&TLS_PEER_WARNINGS);
    Lazy::force(&REJECTED_CONNECTIONS);
    crate::limiter::metrics::init();
    crate::plugins::aggregate::init_metrics();
    crate::plugins::transform::init_metrics();
}

pub fn upstream_healthy(upstream: &str, endpoint: &str, up: bool) {
    UPSTREAM_HEALTHY.with_label_values(&[upstream, endpoint]).set(up as i64);
}

/// An endpoint the config names: its ejection count exists from the start (0, not missing, for
/// `rate()` and alerts).
pub fn endpoint_known(upstream: &str, endpoint: &str) {
    let _ = UPSTREAM_EJECTIONS.with_label_values(&[upstream, endpoint]);
}

pub fn upstream_ejected(upstream: &str, endpoint: &str) {
    UPSTREAM_EJECTIONS.with_label_values(&[upstream, endpoint]).inc();
}

pub fn forget_endpoint(upstream: &str, endpoint: &str) {
    let _ = UPSTREAM_HEALTHY.remove_label_values(&[upstream, endpoint]);
    let _ = UPSTREAM_EJECTIONS.remove_label_values(&[upstream, endpoint]);
}

/// Count panics: Pingora contains a panic to one request task, so without this a bug would
/// only show as a log line.
pub fn install_panic_hook() {
    Lazy::force(&PANICS);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.inc();
        previous(info);
    }));
}

/// The Prometheus text exposition of every registered metric.
pub fn render() -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 << 10);
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_handles_count_into_the_same_series_as_label_lookups() {
        let m = RouteMetrics::default();
        let route = "metrics-unit-route";
        let count = |upstream: &str, status: &str| REQUESTS.with_label_values(&[route, upstream, status]).get();
        // Nothing is shown for a route before its first request.
        assert!(!String::from_utf8(render()).unwrap().contains(route));
        m.record(route, "up", true, 200, 0.001);
        m.record(route, "up", true, 200, 0.002);
        m.record(route, "up", true, 418, 0.001);
        m.record(route, "other", false, 200, 0.001);
        assert_eq!(count("up", "200"), 2);
        assert_eq!(count("up", "418"), 1);
        assert_eq!(count("other", "200"), 1);
        assert_eq!(DURATION.with_label_values(&[route]).get_sample_count(), 4);
    }
}
