//! Upstreams: endpoints, balancing, per-endpoint health (active and passive), and the peer
//! Pingora connects to. Balancing is Portico's own (not Pingora's `LoadBalancer`) so that health
//! lives per endpoint across reloads and every algorithm sees the same health view.

use crate::config::raw::{Balance, CheckKind, Protocol};
use crate::metrics;
use pingora::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Health of one endpoint of one upstream, shared by every snapshot that names it, so a reload
/// neither forgets that an endpoint is down nor resets an ejection.
#[derive(Debug)]
pub struct EndpointHealth {
    /// The active health check's verdict (starts healthy; the first probe runs at once).
    healthy: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    /// Consecutive proxied failures (passive checks).
    passive_failures: AtomicU32,
    /// Ejected until this many ms after `EPOCH` (0 = not ejected).
    ejected_until_ms: AtomicU64,
    /// Requests now in flight to this endpoint (least_requests).
    in_flight: AtomicUsize,
    /// When the last active probe started.
    pub(crate) last_probe: Mutex<Option<Instant>>,
    labels: (String, String),
}

static EPOCH: once_cell::sync::Lazy<Instant> = once_cell::sync::Lazy::new(Instant::now);

fn now_ms() -> u64 {
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
        h.publish();
        h
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Usable for new requests: healthy and not ejected.
    pub fn usable(&self) -> bool {
        self.is_healthy() && !self.is_ejected()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn publish(&self) {
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

/// Every endpoint's health, keyed by (upstream name, endpoint address); outlives snapshots.
#[derive(Default)]
pub struct HealthRegistry {
    map: Mutex<HashMap<(String, String), Arc<EndpointHealth>>>,
}

impl HealthRegistry {
    pub fn get(&self, upstream: &str, address: &str) -> Arc<EndpointHealth> {
        let mut map = self.map.lock().unwrap();
        map.entry((upstream.to_string(), address.to_string()))
            .or_insert_with(|| Arc::new(EndpointHealth::new(upstream, address)))
            .clone()
    }

    /// Forget endpoints the live config no longer names.
    pub fn retain(&self, live: &HashMap<String, Arc<Upstream>>) {
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

#[derive(Debug)]
pub struct Endpoint {
    /// As written in the config (`users.internal:9001`); the default Host header.
    pub address: String,
    /// Resolved at load.
    pub addr: SocketAddr,
    pub weight: u32,
    pub health: Arc<EndpointHealth>,
}

#[derive(Debug, Clone)]
pub struct HealthCheckSpec {
    pub kind: CheckKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_status: Vec<u16>,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Host header for HTTP probes.
    pub host: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PassiveSpec {
    pub consecutive_failures: u32,
    pub eject_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(30),
            write: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Extra attempts after the first (0 = none).
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_reset: bool,
}

/// What a consistent-hash key is taken from.
#[derive(Debug, Clone)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(String),
    Ip,
    Path,
}

/// One compiled upstream.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub balance: Balance,
    pub hash_on: HashOn,
    pub protocol: Protocol,
    pub host: Option<String>,
    pub preserve_host: bool,
    pub health_check: Option<HealthCheckSpec>,
    pub passive: Option<PassiveSpec>,
    pub timeouts: Timeouts,
    pub retries: RetryPolicy,
    /// Smooth weighted round-robin order of endpoint indexes.
    rr_order: Vec<u16>,
    rr_next: AtomicUsize,
    /// Cumulative weights, for weighted random picks.
    cumulative: Vec<u64>,
}

impl Upstream {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        endpoints: Vec<Endpoint>,
        balance: Balance,
        hash_on: HashOn,
        protocol: Protocol,
        host: Option<String>,
        preserve_host: bool,
        health_check: Option<HealthCheckSpec>,
        passive: Option<PassiveSpec>,
        timeouts: Timeouts,
        retries: RetryPolicy,
    ) -> Self {
        let weights: Vec<u64> = endpoints.iter().map(|e| e.weight as u64).collect();
        let cumulative = weights
            .iter()
            .scan(0u64, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        Upstream {
            rr_order: smooth_weighted_order(&weights),
            rr_next: AtomicUsize::new(rand::random::<u16>() as usize),
            cumulative,
            name,
            endpoints,
            balance,
            hash_on,
            protocol,
            host,
            preserve_host,
            health_check,
            passive,
            timeouts,
            retries,
        }
    }

    /// Choose an endpoint index, skipping `tried` ones and, while any remain, unusable ones.
    /// When every untried endpoint is down the pick ignores health (a request that might work
    /// beats a certain 502). `None` when every endpoint was tried.
    pub fn select(&self, hash_key: Option<&[u8]>, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        if tried.len() >= n {
            return None;
        }
        let open = |i: usize| !tried.contains(&i);
        let good = |i: usize| open(i) && self.endpoints[i].health.usable();
        if let Some(i) = self.pick(hash_key, &good) {
            return Some(i);
        }
        self.pick(hash_key, &open)
    }

    fn pick(&self, hash_key: Option<&[u8]>, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        match self.balance {
            Balance::RoundRobin => {
                let len = self.rr_order.len();
                let start = self.rr_next.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|k| self.rr_order[(start + k) % len] as usize)
                    .find(|&i| ok(i))
            }
            Balance::Random => {
                let total = *self.cumulative.last().unwrap_or(&0);
                for _ in 0..3 {
                    let r = rand::random::<u64>() % total.max(1);
                    let i = self.cumulative.partition_point(|&c| c <= r);
                    if i < n && ok(i) {
                        return Some(i);
                    }
                }
                let start = rand::random::<usize>() % n;
                (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
            }
            Balance::ConsistentHash => {
                // Weighted rendezvous hashing: stable per key, moves only 1/n of keys when an
                // endpoint comes or goes, and falls back in a stable order.
                let key = hash_key.unwrap_or(b"");
                let mut best: Option<(f64, usize)> = None;
                for (i, e) in self.endpoints.iter().enumerate() {
                    if !ok(i) {
                        continue;
                    }
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    key.hash(&mut h);
                    e.address.hash(&mut h);
                    let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    let score = -(e.weight as f64) / u.ln();
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i));
                    }
                }
                best.map(|(_, i)| i)
            }
            Balance::LeastRequests => {
                let start = rand::random::<usize>() % n;
                (0..n).map(|k| (start + k) % n).filter(|&i| ok(i)).min_by_key(|&i| {
                    let e = &self.endpoints[i];
                    (e.health.in_flight() as u64 * 1_000_000) / e.weight.max(1) as u64
                })
            }
        }
    }

    /// The peer for endpoint `i`, with this upstream's timeouts (route overrides applied).
    pub fn peer(&self, i: usize, timeouts: &Timeouts) -> Box<HttpPeer> {
        let e = &self.endpoints[i];
        let mut peer = HttpPeer::new(e.addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(timeouts.connect);
        o.total_connection_timeout = Some(timeouts.connect);
        o.read_timeout = Some(timeouts.read);
        o.write_timeout = Some(timeouts.write);
        o.idle_timeout = Some(timeouts.idle);
        if self.protocol == Protocol::H2c {
            o.set_http_version(2, 2);
            o.max_h2_streams = 100;
        }
        Box::new(peer)
    }

    /// A proxied exchange with endpoint `i` failed (connect error, reset, timeout, 5xx).
    pub fn record_failure(&self, i: usize) {
        let Some(p) = &self.passive else { return };
        let h = &self.endpoints[i].health;
        let n = h.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= p.consecutive_failures && !h.is_ejected() {
            // Never eject the last usable endpoint.
            let others = self
                .endpoints
                .iter()
                .enumerate()
                .any(|(j, e)| j != i && e.health.usable());
            if others {
                h.ejected_until_ms
                    .store(now_ms() + p.eject_for.as_millis() as u64, Ordering::Relaxed);
                h.passive_failures.store(0, Ordering::Relaxed);
                h.publish();
                log::warn!(
                    "upstream {}: endpoint {} ejected for {:?} after {n} failures",
                    self.name,
                    self.endpoints[i].address,
                    p.eject_for
                );
            }
        }
    }

    pub fn record_success(&self, i: usize) {
        if self.passive.is_some() {
            self.endpoints[i].health.passive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Mark a request in flight to endpoint `i` until the guard drops.
    pub fn in_flight_guard(&self, i: usize) -> InFlight {
        let h = self.endpoints[i].health.clone();
        h.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(h)
    }

    /// The consistent-hash key of a request.
    pub fn hash_key(&self, headers: &http::HeaderMap, client_ip: IpAddr, path: &str) -> Vec<u8> {
        let from_ip = || client_ip.to_string().into_bytes();
        match &self.hash_on {
            HashOn::Ip => from_ip(),
            HashOn::Path => path.as_bytes().to_vec(),
            HashOn::Header(h) => headers.get(h).map(|v| v.as_bytes().to_vec()).unwrap_or_else(from_ip),
            HashOn::Cookie(name) => crate::util::cookie(headers, name)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_else(from_ip),
        }
    }
}

/// Counts a request in flight to an endpoint for as long as it lives.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointHealth>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Nginx's smooth weighted round robin: weights 5,1,1 give a,a,b,a,c,a,a rather than bursts.
fn smooth_weighted_order(weights: &[u64]) -> Vec<u16> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|x| (x / g) as i64).collect();
    let total: i64 = w.iter().sum();
    if total > 1 << 16 {
        // Too long to unroll: fall back to blocks in proportion (still exact over a cycle).
        return w
            .iter()
            .enumerate()
            .flat_map(|(i, &k)| std::iter::repeat_n(i as u16, k as usize))
            .collect();
    }
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u16);
    }
    order
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_order_is_weighted_and_spread() {
        assert_eq!(smooth_weighted_order(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_weighted_order(&[2, 6]), vec![1, 0, 1, 1]);
        assert_eq!(smooth_weighted_order(&[1]), vec![0]);
    }

    fn upstream(balance: Balance, weights: &[u32]) -> Upstream {
        let reg = HealthRegistry::default();
        let eps = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let address = format!("127.0.0.1:{}", 1000 + i);
                Endpoint {
                    addr: address.parse().unwrap(),
                    health: reg.get("t", &address),
                    address,
                    weight: *w,
                }
            })
            .collect();
        Upstream::new(
            "t".into(),
            eps,
            balance,
            HashOn::Ip,
            Protocol::Http1,
            None,
            false,
            None,
            Some(PassiveSpec {
                consecutive_failures: 2,
                eject_for: Duration::from_secs(30),
            }),
            Timeouts::default(),
            RetryPolicy {
                attempts: 1,
                on_connect_failure: true,
                on_reset: false,
            },
        )
    }

    #[test]
    fn weights_hold_for_every_algorithm() {
        for b in [Balance::RoundRobin, Balance::Random] {
            let u = upstream(b, &[1, 3]);
            let mut counts = [0; 2];
            for _ in 0..4000 {
                counts[u.select(None, &[]).unwrap()] += 1;
            }
            let share = counts[1] as f64 / 4000.0;
            assert!((0.70..0.80).contains(&share), "{b:?} {counts:?}");
        }
    }

    #[test]
    fn skips_tried_and_unhealthy_but_never_strands() {
        let u = upstream(Balance::RoundRobin, &[1, 1, 1]);
        u.endpoints[0].health.record_probe(false, 1, 1);
        for _ in 0..10 {
            assert_ne!(u.select(None, &[]), Some(0));
        }
        assert_eq!(
            u.select(None, &[1, 2]),
            Some(0),
            "all others tried: try the unhealthy one"
        );
        assert_eq!(u.select(None, &[0, 1, 2]), None);
        u.endpoints[0].health.record_probe(true, 1, 1);
        assert!((0..30).any(|_| u.select(None, &[]) == Some(0)));
    }

    #[test]
    fn consistent_hash_is_stable() {
        let u = upstream(Balance::ConsistentHash, &[1, 1, 1, 1]);
        let a = u.select(Some(b"user-1"), &[]).unwrap();
        for _ in 0..10 {
            assert_eq!(u.select(Some(b"user-1"), &[]), Some(a));
        }
        let spread: std::collections::HashSet<_> = (0..200)
            .map(|k| u.select(Some(format!("user-{k}").as_bytes()), &[]).unwrap())
            .collect();
        assert_eq!(spread.len(), 4);
    }

    #[test]
    fn least_requests_prefers_idle() {
        let u = upstream(Balance::LeastRequests, &[1, 1]);
        let _busy = u.in_flight_guard(0);
        for _ in 0..10 {
            assert_eq!(u.select(None, &[]), Some(1));
        }
    }

    #[test]
    fn passive_ejection_spares_the_last_endpoint() {
        let u = upstream(Balance::RoundRobin, &[1, 1]);
        u.record_failure(0);
        u.record_failure(0);
        assert!(u.endpoints[0].health.is_ejected());
        u.record_failure(1);
        u.record_failure(1);
        assert!(!u.endpoints[1].health.is_ejected(), "the last usable endpoint stays");
    }
}
