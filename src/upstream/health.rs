//! Health of each endpoint: the active checker's verdict, passive failure counts and ejections,
//! and requests in flight. Kept in a registry by (upstream, endpoint) that outlives snapshots,
//! so a reload neither forgets that an endpoint is down nor resets an ejection.

use crate::metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{RetryWindow, Upstream};

/// Health of one endpoint of one upstream, shared by every snapshot that names it, so a reload
/// neither forgets that an endpoint is down nor resets an ejection.
#[derive(Debug)]
pub struct EndpointHealth {
    /// The active health check's verdict (starts healthy; the first probe runs at once).
    healthy: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    /// Consecutive proxied failures (passive checks).
    pub(super) passive_failures: AtomicU32,
    /// Ejected until this many ms after `EPOCH` (0 = not ejected).
    pub(super) ejected_until_ms: AtomicU64,
    /// Requests now in flight to this endpoint (least_requests).
    pub(super) in_flight: AtomicUsize,
    /// When the last active probe started.
    pub(crate) last_probe: Mutex<Option<Instant>>,
    labels: (String, String),
}

static EPOCH: once_cell::sync::Lazy<Instant> = once_cell::sync::Lazy::new(Instant::now);

pub(super) fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + 1
}

impl EndpointHealth {
    fn new(upstream: &str, address: &str) -> Self {
        let h = EndpointHealth {
            healthy: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_probe: Mutex::new(None),
            labels: (upstream.to_string(), address.to_string()),
        };
        metrics::endpoint_known(upstream, address);
        h.publish();
        h
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(now_ms())
    }

    /// Ejected at `now` (ms after `EPOCH`; injected by unit tests).
    pub(super) fn is_ejected_at(&self, now: u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    /// An ejection that has run out ends: the endpoint takes traffic again and the gauge says
    /// so (the health loop calls this; requests already ignore a run-out ejection).
    pub fn end_ejection(&self) {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until != 0
            && !self.is_ejected()
            && self
                .ejected_until_ms
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.publish();
            log::info!(
                "upstream {}: endpoint {} takes traffic again",
                self.labels.0,
                self.labels.1
            );
        }
    }

    /// Eject until `until` (ms after `EPOCH`): counted, and the gauge says 0.
    pub(super) fn eject(&self, until: u64) {
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.passive_failures.store(0, Ordering::Relaxed);
        metrics::upstream_ejected(&self.labels.0, &self.labels.1);
        self.publish();
    }

    /// Usable for new requests: healthy and not ejected.
    pub fn usable(&self) -> bool {
        self.is_healthy() && !self.is_ejected()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(super) fn publish(&self) {
        metrics::upstream_healthy(&self.labels.0, &self.labels.1, self.usable());
    }

    /// Record an active probe result; returns true when the verdict changed.
    pub fn record_probe(&self, ok: bool, healthy_threshold: u32, unhealthy_threshold: u32) -> bool {
        let was = self.is_healthy();
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !was && n >= healthy_threshold {
                self.healthy.store(true, Ordering::Relaxed);
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if was && n >= unhealthy_threshold {
                self.healthy.store(false, Ordering::Relaxed);
            }
        }
        let changed = was != self.is_healthy();
        if changed {
            self.publish();
        }
        changed
    }
}

/// Every endpoint's health, keyed by (upstream name, endpoint address), and each upstream's
/// retry budget window, by name; outlives snapshots.
#[derive(Default)]
pub struct HealthRegistry {
    map: Mutex<HashMap<(String, String), Arc<EndpointHealth>>>,
    retries: Mutex<HashMap<String, Arc<RetryWindow>>>,
}

impl HealthRegistry {
    pub fn get(&self, upstream: &str, address: &str) -> Arc<EndpointHealth> {
        let mut map = self.map.lock().unwrap();
        map.entry((upstream.to_string(), address.to_string()))
            .or_insert_with(|| Arc::new(EndpointHealth::new(upstream, address)))
            .clone()
    }

    /// The retry budget's window of upstream `name` (kept across reloads).
    pub fn retry_window(&self, upstream: &str) -> Arc<RetryWindow> {
        let mut map = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(upstream.to_string()).or_default().clone()
    }

    /// Forget endpoints (and retry windows) the live config no longer names.
    pub fn retain(&self, live: &HashMap<String, Arc<Upstream>>) {
        self.retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| live.get(name).is_some_and(|u| u.retries.budget.is_some()));
        let mut map = self.map.lock().unwrap();
        map.retain(|(u, a), _| {
            let keep = live
                .get(u)
                .is_some_and(|up| up.endpoints.iter().any(|e| &e.address == a));
            if !keep {
                metrics::forget_endpoint(u, a);
            }
            keep
        });
    }
}
