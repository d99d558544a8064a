//! Upstreams: endpoints, balancing (`balance.rs`), per-endpoint health, active and passive
//! (`health.rs`), and the peer Pingora connects to. Balancing is Portico's own (not Pingora's
//! `LoadBalancer`) so that health lives per endpoint across reloads and every algorithm sees the
//! same health view.

mod balance;
mod budget;
mod health;

pub use budget::{RetryBudget, RetryCause, RetryPolicy, RetryWindow, MIN_RETRIES_PER_WINDOW};
pub use health::{EndpointHealth, HealthRegistry};

use crate::config::raw::{Balance, CheckKind, Protocol};
use crate::tls::UpstreamTlsSettings;
use balance::smooth_weighted_order;
use health::now_ms;
use pingora::upstreams::peer::HttpPeer;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct Endpoint {
    /// As written in the config (`users.internal:9001`); the default Host header.
    pub address: String,
    /// Where it is now: resolved at load, and again every `resolve_every` for a host name.
    addr: arc_swap::ArcSwap<SocketAddr>,
    /// The host name and port to re-resolve (`None` for an IP literal).
    pub name: Option<(String, u16)>,
    /// When the name was last resolved.
    pub(crate) resolved_at: std::sync::Mutex<std::time::Instant>,
    pub weight: u32,
    pub health: Arc<EndpointHealth>,
    /// `address` as a Host header value, made once (`None` if it cannot be one).
    pub host_header: Option<http::HeaderValue>,
}

impl Endpoint {
    pub fn new(address: String, addr: SocketAddr, weight: u32, health: Arc<EndpointHealth>) -> Endpoint {
        let name = match address.parse::<SocketAddr>() {
            Ok(_) => None,
            Err(_) => address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?))),
        };
        Endpoint {
            host_header: http::HeaderValue::from_str(&address).ok(),
            address,
            addr: arc_swap::ArcSwap::from_pointee(addr),
            name,
            resolved_at: std::sync::Mutex::new(std::time::Instant::now()),
            weight,
            health,
        }
    }

    /// The endpoint's current address.
    pub fn addr(&self) -> SocketAddr {
        **self.addr.load()
    }

    /// A fresh resolution of its name; true when the address changed.
    pub fn set_addr(&self, addr: SocketAddr) -> bool {
        if self.addr() == addr {
            return false;
        }
        self.addr.store(Arc::new(addr));
        true
    }
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
    /// Only failed connects (refused, unreachable, timed out) count: the default with no
    /// `passive` block. A block counts every failed exchange (resets, 502–504 too).
    pub connect_only: bool,
}

impl PassiveSpec {
    /// With no `passive` block: nginx's `max_fails=1 fail_timeout=10s` for connects — an
    /// endpoint that cannot be reached is skipped for 10 s instead of costing every request
    /// its connect timeout.
    pub fn default_for_connects() -> PassiveSpec {
        PassiveSpec {
            consecutive_failures: 1,
            eject_for: Duration::from_secs(10),
            connect_only: true,
        }
    }
}

/// What failed, for passive ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection could not be made.
    Connect,
    /// A connected exchange failed: reset, timeout, or a 502–504 answer.
    Exchange,
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
    /// How often host names are resolved again (`None`: never, or no names).
    pub resolve_every: Option<Duration>,
    /// TLS to the endpoints (`tls:`), checked at load.
    pub tls: Option<UpstreamTlsSettings>,
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
            resolve_every: None,
            tls: None,
        }
    }

    /// The peer for endpoint `i`, with this upstream's timeouts (route overrides applied).
    pub fn peer(&self, i: usize, timeouts: &Timeouts) -> Box<HttpPeer> {
        let e = &self.endpoints[i];
        let mut peer = HttpPeer::new(e.addr(), false, String::new());
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
        if let Some(tls) = &self.tls {
            // Scheme, SNI, verification, CA, client certificate, ALPN (`h2` for `protocol: h2`).
            tls.apply_to_peer(&mut peer);
        }
        Box::new(peer)
    }

    /// A proxied exchange with endpoint `i` failed (connect error, reset, timeout, 5xx).
    pub fn record_failure(&self, i: usize, kind: FailureKind) {
        self.record_failure_at(i, kind, now_ms());
    }

    /// As [`Self::record_failure`], at `now` (ms after the health epoch; injected by tests).
    fn record_failure_at(&self, i: usize, kind: FailureKind, now: u64) {
        let Some(p) = &self.passive else { return };
        if p.connect_only && kind != FailureKind::Connect {
            return;
        }
        let h = &self.endpoints[i].health;
        let n = h.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= p.consecutive_failures && !h.is_ejected_at(now) {
            // Never eject the last usable endpoint.
            let others = self
                .endpoints
                .iter()
                .enumerate()
                .any(|(j, e)| j != i && e.health.is_healthy() && !e.health.is_ejected_at(now));
            if others {
                h.eject(now + p.eject_for.as_millis() as u64);
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
                Endpoint::new(address.clone(), address.parse().unwrap(), *w, reg.get("t", &address))
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
                connect_only: false,
            }),
            Timeouts::default(),
            RetryPolicy::default(),
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
        u.record_failure(0, FailureKind::Exchange);
        u.record_failure(0, FailureKind::Exchange);
        assert!(u.endpoints[0].health.is_ejected());
        u.record_failure(1, FailureKind::Exchange);
        u.record_failure(1, FailureKind::Exchange);
        assert!(!u.endpoints[1].health.is_ejected(), "the last usable endpoint stays");
    }

    /// Without a `passive` block: one failed connect ejects for 10 s (nginx's `max_fails=1
    /// fail_timeout=10s`); failed exchanges after a connect do not count.
    #[test]
    fn by_default_one_failed_connect_ejects_for_ten_seconds() {
        let mut u = upstream(Balance::RoundRobin, &[1, 1, 1]);
        u.passive = Some(PassiveSpec::default_for_connects());
        let t0 = 1_000_000;
        u.record_failure_at(2, FailureKind::Exchange, t0);
        u.record_failure_at(2, FailureKind::Exchange, t0);
        assert!(
            !u.endpoints[2].health.is_ejected_at(t0),
            "a reset or a 502 is not a failed connect"
        );
        u.record_failure_at(1, FailureKind::Connect, t0);
        let h = &u.endpoints[1].health;
        assert!(h.is_ejected_at(t0 + 9_999));
        assert!(!h.is_ejected_at(t0 + 10_000), "back after 10 s");
    }

    /// A retry does not take the round-robin turn: with `[good, dead, good]`, the request that
    /// met the dead one is retried on the next, and the next request starts after that one —
    /// the dead endpoint is first for 1 request in 3, not 1 in 2.
    #[test]
    fn a_retry_does_not_move_the_round_robin_cursor() {
        let mut u = upstream(Balance::RoundRobin, &[1, 1, 1]);
        u.passive = None;
        let mut first_on_dead = 0;
        for _ in 0..300 {
            let first = u.select(None, &[]).unwrap();
            if first == 1 {
                first_on_dead += 1;
                let retry = u.select(None, &[1]).unwrap();
                assert_ne!(retry, 1);
            }
        }
        assert_eq!(first_on_dead, 100, "the dead endpoint's fair share, no more");
    }
}
