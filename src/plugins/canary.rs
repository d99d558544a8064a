//! `canary`: send a share of a route's traffic to a new version, and pull it back by itself when
//! the new version fails.
//!
//! - The route's own upstream is "stable", `upstream` is the canary. `percent` (0–100, decimals)
//!   of requests go to the canary: per request at random, or by a `sticky` key (a header, a
//!   cookie, the client address) hashed into [0, 100) and compared with the percent, so one key
//!   always lands on one side and raising the percent only moves keys from stable to canary.
//! - `force_header`: `1`/`true` → canary, `0`/`false` → stable, whatever the percent (also 0, and
//!   also after a rollback: it is how an operator looks at a rolled-back canary). Any client can
//!   send it, so forced requests never feed the guard (they are counted in the metrics).
//! - `guard`: the canary's requests and failures (5xx, connection failures, timeouts, failing
//!   gRPC statuses: [`Outcome::is_failure`]) are counted in a sliding `window`; once there are
//!   `min_requests` and the failure rate exceeds `max_error_rate`, the canary gets 0% until its
//!   block changes or an operator resets it (`POST /canaries/{route}/reset`). The state lives in
//!   the plugin's reload-surviving state, so a reload that leaves the block alone keeps it.
//!
//! (Over 500 lines: the split, the stickiness and the guard share one state; the rest is tests.)

use crate::clock::Clock;
use crate::config::units::{bounded, Dur};
use crate::config::ConfigError;
use crate::metrics;
use crate::plugin::{AdminState, BuildContext, Outcome, Phases, Plugin, PluginKind, RequestState, Verdict};
use async_trait::async_trait;
use http::{HeaderMap, HeaderName};
use pingora::http::RequestHeader;
use serde::Deserialize;
use serde_json::json;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub upstream: String,
    #[serde(default)]
    pub percent: f64,
    #[serde(default)]
    pub sticky: Option<String>,
    #[serde(default)]
    pub force_header: Option<String>,
    #[serde(default)]
    pub guard: Option<GuardConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    pub max_error_rate: f64,
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    #[serde(default = "default_window")]
    pub window: Dur,
}

fn default_min_requests() -> u64 {
    20
}

fn default_window() -> Dur {
    Dur(Duration::from_secs(60))
}

/// Where a request's sticky key comes from.
#[derive(Debug, Clone)]
enum Sticky {
    Header(HeaderName),
    Cookie(String),
    Ip,
}

impl Sticky {
    fn parse(s: &str) -> Result<Sticky, String> {
        let bad = || format!("'{s}' is not header:NAME | cookie:NAME | ip");
        match s.split_once(':') {
            Some(("header", n)) => crate::util::header_name(n).map(Sticky::Header).map_err(|_| bad()),
            Some(("cookie", n)) if !n.is_empty() => Ok(Sticky::Cookie(n.to_string())),
            None if s == "ip" => Ok(Sticky::Ip),
            _ => Err(bad()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Sticky::Header(h) => format!("header:{h}"),
            Sticky::Cookie(c) => format!("cookie:{c}"),
            Sticky::Ip => "ip".into(),
        }
    }

    fn key(&self, headers: &HeaderMap, ip: IpAddr) -> Option<Vec<u8>> {
        match self {
            Sticky::Header(h) => headers.get(h).map(|v| v.as_bytes().to_vec()),
            Sticky::Cookie(c) => crate::util::cookie(headers, c).map(|v| v.as_bytes().to_vec()),
            Sticky::Ip => Some(ip.to_string().into_bytes()),
        }
    }
}

/// A key's fixed point in [0, 100): FNV-1a, then SplitMix64's finaliser to spread similar keys.
/// The same in every process and every version, so stickiness survives restarts and holds
/// across several gateways.
pub fn bucket(key: &[u8]) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

/// Which side a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Stable,
    Canary,
}

impl Side {
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            Side::Stable => "stable",
            Side::Canary => "canary",
        }
    }
}

/// The side a request went to, and whether `force_header` chose it (kept in the request's vars
/// for the log hook).
#[derive(Debug, Clone, Copy)]
struct Picked {
    side: Side,
    forced: bool,
}

const SLOTS: usize = 10;

/// Requests and failures of the canary over a sliding window, in [`SLOTS`] slots.
#[derive(Debug)]
struct Window {
    width_ns: u128,
    slots: [(u128, u64, u64); SLOTS],
}

impl Window {
    fn new(window: Duration) -> Window {
        Window {
            width_ns: (window.as_nanos() / SLOTS as u128).max(1),
            slots: [(0, 0, 0); SLOTS],
        }
    }

    fn record(&mut self, now: Duration, failed: bool) {
        let index = now.as_nanos() / self.width_ns;
        let slot = &mut self.slots[(index % SLOTS as u128) as usize];
        if slot.0 != index {
            *slot = (index, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u64::from(failed);
    }

    /// (requests, failures) in the window ending at `now`.
    fn counts(&self, now: Duration) -> (u64, u64) {
        let index = now.as_nanos() / self.width_ns;
        self.slots
            .iter()
            .filter(|s| s.0 <= index && s.0 + (SLOTS as u128) > index)
            .fold((0, 0), |(q, f), s| (q + s.1, f + s.2))
    }

    fn clear(&mut self) {
        self.slots = [(0, 0, 0); SLOTS];
    }
}

/// The numbers a rollback was decided on.
#[derive(Debug, Clone, Copy)]
struct Rollback {
    at: Duration,
    requests: u64,
    failures: u64,
}

/// What survives a reload that leaves the block alone: counts, the window, the rollback.
#[derive(Debug)]
struct State {
    route: String,
    rolled_back: AtomicBool,
    rollback: Mutex<Option<Rollback>>,
    window: Mutex<Window>,
    requests: [AtomicU64; 2],
    failures: [AtomicU64; 2],
}

#[derive(Debug, Clone, Copy)]
struct Guard {
    max_error_rate: f64,
    min_requests: u64,
    window: Duration,
}

pub struct Canary {
    route: String,
    stable: Option<String>,
    upstream: String,
    percent: f64,
    sticky: Option<Sticky>,
    force_header: Option<HeaderName>,
    guard: Option<Guard>,
    state: Arc<State>,
    clock: Arc<dyn Clock>,
    /// Per-side counters, resolved on first use (so a config that never goes live leaves none).
    counters: OnceLock<[(prometheus::IntCounter, prometheus::IntCounter); 2]>,
}

impl Canary {
    pub fn new(cfg: Config, ctx: &BuildContext) -> Result<Self, ConfigError> {
        let Some(route) = ctx.route.clone() else {
            return Err(ConfigError::new(
                "",
                "canary is route-level only: put it in a route's plugins (its upstream is the stable side)",
            ));
        };
        if !ctx.upstreams.contains(&cfg.upstream) {
            return Err(ConfigError::new(
                "upstream",
                format!("no upstream named '{}'", cfg.upstream),
            ));
        }
        if ctx.route_upstream.as_deref() == Some(cfg.upstream.as_str()) {
            return Err(ConfigError::new(
                "upstream",
                format!(
                    "'{}' is the route's own upstream (the stable side); name the new version",
                    cfg.upstream
                ),
            ));
        }
        if !(0.0..=100.0).contains(&cfg.percent) {
            return Err(ConfigError::new("percent", "must be between 0 and 100"));
        }
        let sticky = cfg
            .sticky
            .as_deref()
            .map(Sticky::parse)
            .transpose()
            .map_err(|m| ConfigError::new("sticky", m))?;
        let force_header = cfg
            .force_header
            .as_deref()
            .map(crate::util::header_name)
            .transpose()
            .map_err(|m| ConfigError::new("force_header", m))?;
        let guard = cfg
            .guard
            .map(|g| {
                if !(0.0..=1.0).contains(&g.max_error_rate) {
                    return Err(ConfigError::new(
                        "guard.max_error_rate",
                        "a fraction between 0 and 1 (0.1 = 10% of the canary's requests failed)",
                    ));
                }
                if g.min_requests == 0 {
                    return Err(ConfigError::new("guard.min_requests", "must be at least 1"));
                }
                if let Err(m) = bounded(g.window.0, Duration::from_secs(1), Duration::from_secs(86400)) {
                    return Err(ConfigError::new("guard.window", m));
                }
                Ok(Guard {
                    max_error_rate: g.max_error_rate,
                    min_requests: g.min_requests,
                    window: g.window.0,
                })
            })
            .transpose()?;
        let window = guard.map(|g| g.window).unwrap_or(Duration::from_secs(60));
        let state = ctx.state(|| State {
            route: route.clone(),
            rolled_back: AtomicBool::new(false),
            rollback: Mutex::new(None),
            window: Mutex::new(Window::new(window)),
            requests: Default::default(),
            failures: Default::default(),
        });
        // The effective percent is published while this config is live (a config that fails
        // to load, or is replaced, publishes nothing).
        let (r, s) = (route.clone(), state.clone());
        let percent = cfg.percent;
        ctx.every("canary percent", Duration::from_secs(1), move || {
            let value = effective(percent, &s);
            metrics::CANARY_PERCENT.with_label_values(&[&r]).set(value);
            async {}
        });
        Ok(Canary {
            route,
            stable: ctx.route_upstream.clone(),
            upstream: cfg.upstream,
            percent: cfg.percent,
            sticky,
            force_header,
            guard,
            state,
            clock: ctx.clock(),
            counters: OnceLock::new(),
        })
    }

    /// The share the canary gets now: the configured percent, or 0 after a rollback.
    pub fn effective_percent(&self) -> f64 {
        effective(self.percent, &self.state)
    }

    pub fn rolled_back(&self) -> bool {
        self.state.rolled_back.load(Ordering::Relaxed)
    }

    /// The side `force_header` asks for, if the request has it with a value it knows.
    fn forced(&self, headers: &HeaderMap) -> Option<Side> {
        let v = headers.get(self.force_header.as_ref()?)?.to_str().ok()?;
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" => Some(Side::Canary),
            "0" | "false" => Some(Side::Stable),
            _ => None,
        }
    }

    /// The side for a request with these headers from this client.
    pub fn choose(&self, headers: &HeaderMap, client_ip: IpAddr) -> Side {
        if let Some(side) = self.forced(headers) {
            return side;
        }
        let percent = self.effective_percent();
        if percent <= 0.0 {
            return Side::Stable;
        }
        if percent >= 100.0 {
            return Side::Canary;
        }
        let point = match self.sticky.as_ref().and_then(|s| s.key(headers, client_ip)) {
            Some(key) => bucket(&key),
            None => rand::random::<f64>() * 100.0,
        };
        if point < percent {
            Side::Canary
        } else {
            Side::Stable
        }
    }

    fn counters(&self) -> &[(prometheus::IntCounter, prometheus::IntCounter); 2] {
        self.counters.get_or_init(|| {
            [Side::Stable, Side::Canary].map(|side| {
                let labels = [self.route.as_str(), side.label()];
                (
                    metrics::CANARY_REQUESTS.with_label_values(&labels),
                    metrics::CANARY_FAILURES.with_label_values(&labels),
                )
            })
        })
    }

    /// Count one finished request of `side`; the guard may roll the canary back.
    pub fn record(&self, side: Side, failed: bool) {
        self.count(side, failed);
        self.guard_sees(side, failed);
    }

    /// Count one finished request that `force_header` sent to `side`. Any client may send the
    /// header, so the guard never sees these: forced failures cannot roll a canary back for
    /// everyone, nor forced successes dilute a failing canary's error rate.
    pub fn record_forced(&self, side: Side, failed: bool) {
        self.count(side, failed);
    }

    fn count(&self, side: Side, failed: bool) {
        let (requests, failures) = &self.counters()[side.index()];
        requests.inc();
        self.state.requests[side.index()].fetch_add(1, Ordering::Relaxed);
        if failed {
            failures.inc();
            self.state.failures[side.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn guard_sees(&self, side: Side, failed: bool) {
        let Some(guard) = self.guard else { return };
        if side != Side::Canary {
            return;
        }
        let now = self.clock.now();
        let (n, f) = {
            let mut w = self.state.window.lock().unwrap_or_else(|p| p.into_inner());
            w.record(now, failed);
            w.counts(now)
        };
        if n >= guard.min_requests && f as f64 > guard.max_error_rate * n as f64 {
            self.roll_back(now, n, f, guard);
        }
    }

    fn roll_back(&self, now: Duration, requests: u64, failures: u64, guard: Guard) {
        if self
            .state
            .rolled_back
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        *self.state.rollback.lock().unwrap_or_else(|p| p.into_inner()) = Some(Rollback {
            at: now,
            requests,
            failures,
        });
        metrics::CANARY_ROLLBACKS.with_label_values(&[&self.route]).inc();
        metrics::CANARY_PERCENT.with_label_values(&[&self.route]).set(0.0);
        log::warn!(
            "canary of route '{}' rolled back: {failures} of its last {requests} requests to '{}' failed \
             ({:.1}% > max_error_rate {:.1}%, window {}); it gets 0% until its block changes or \
             POST /canaries/{}/reset",
            self.route,
            self.upstream,
            100.0 * failures as f64 / requests as f64,
            100.0 * guard.max_error_rate,
            humantime::format_duration(guard.window),
            self.route,
        );
    }

    /// Re-arm a rolled-back canary: the configured percent again, with a fresh window.
    pub fn reset(&self) {
        self.state.window.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.state.rollback.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.state.rolled_back.swap(false, Ordering::AcqRel) {
            log::info!(
                "canary of route '{}' re-armed by an admin reset: {}% to '{}'",
                self.route,
                self.percent,
                self.upstream
            );
        }
        metrics::CANARY_PERCENT
            .with_label_values(&[&self.route])
            .set(self.percent);
    }
}

/// The state goes when no live config has this canary any more (its route went, or its block
/// changed): so does its gauge, until a live canary of the route publishes it again.
impl Drop for State {
    fn drop(&mut self) {
        let _ = metrics::CANARY_PERCENT.remove_label_values(&[&self.route]);
    }
}

fn effective(percent: f64, state: &State) -> f64 {
    if state.rolled_back.load(Ordering::Relaxed) {
        0.0
    } else {
        percent
    }
}

#[async_trait]
impl Plugin for Canary {
    fn kind(&self) -> PluginKind {
        PluginKind::Select
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::LOG
    }

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let forced = self.forced(&req.headers);
        let side = forced.unwrap_or_else(|| self.choose(&req.headers, st.client_ip));
        if side == Side::Canary {
            st.upstream_override = Some(self.upstream.clone());
        }
        st.vars.insert(Picked {
            side,
            forced: forced.is_some(),
        });
        Verdict::Continue
    }

    fn log(&self, st: &RequestState, outcome: &Outcome) {
        match st.vars.get::<Picked>() {
            Some(p) if p.forced => self.record_forced(p.side, outcome.is_failure()),
            Some(p) => self.record(p.side, outcome.is_failure()),
            None => {}
        }
    }

    fn admin_state(&self) -> Option<&dyn AdminState> {
        Some(self)
    }
}

impl AdminState for Canary {
    fn collection(&self) -> &'static str {
        "canaries"
    }

    fn describe(&self) -> serde_json::Value {
        let count = |a: &[AtomicU64; 2]| json!({ "stable": a[0].load(Ordering::Relaxed), "canary": a[1].load(Ordering::Relaxed) });
        let guard = self.guard.map(|g| {
            let now = self.clock.now();
            let (requests, failures) = self.state.window.lock().unwrap_or_else(|p| p.into_inner()).counts(now);
            let rollback = *self.state.rollback.lock().unwrap_or_else(|p| p.into_inner());
            json!({
                "max_error_rate": g.max_error_rate,
                "min_requests": g.min_requests,
                "window": humantime::format_duration(g.window).to_string(),
                "window_requests": requests,
                "window_failures": failures,
                "rollback": rollback.map(|r| json!({
                    "at": humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + r.at).to_string(),
                    "requests": r.requests,
                    "failures": r.failures,
                    "error_rate": r.failures as f64 / r.requests.max(1) as f64,
                })),
            })
        });
        json!({
            "stable": self.stable,
            "canary": self.upstream,
            "percent": self.percent,
            "effective_percent": self.effective_percent(),
            "sticky": self.sticky.as_ref().map(Sticky::describe),
            "force_header": self.force_header.as_ref().map(|h| h.as_str()),
            "requests": count(&self.state.requests),
            "failures": count(&self.state.failures),
            "rolled_back": self.rolled_back(),
            "guard": guard,
        })
    }

    fn act(&self, action: &str) -> Option<serde_json::Value> {
        match action {
            "reset" => {
                self.reset();
                Some(self.describe())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::resources::Resources;
    use http::HeaderValue;

    fn ctx(clock: Arc<ManualClock>) -> BuildContext {
        let mut ctx = BuildContext::with_resources(Resources::with_clock(clock));
        ctx.route = Some("shop".into());
        ctx.route_upstream = Some("v1".into());
        ctx.upstreams = vec!["v1".into(), "v2".into()];
        ctx.plugin = "canary".into();
        ctx.block_hash = "h1".into();
        ctx
    }

    fn build(yaml: &str, ctx: &BuildContext) -> Result<Canary, ConfigError> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        Canary::new(ctx.parse(&v)?, ctx)
    }

    fn ip() -> IpAddr {
        "192.0.2.1".parse().unwrap()
    }

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn config_errors_are_located() {
        let c = ctx(Arc::new(ManualClock::new(Duration::ZERO)));
        let err = |yaml: &str, c: &BuildContext| build(yaml, c).err().expect("an error");
        let mut global = c.clone();
        global.route = None;
        assert!(err("{upstream: v2}", &global).message.contains("route-level only"));
        let e = err("{upstream: v3}", &c);
        assert_eq!(
            (e.location.as_str(), e.message.as_str()),
            ("upstream", "no upstream named 'v3'")
        );
        assert_eq!(err("{upstream: v1}", &c).location, "upstream");
        assert_eq!(err("{upstream: v2, percent: 100.5}", &c).location, "percent");
        assert_eq!(err("{upstream: v2, sticky: session}", &c).location, "sticky");
        assert_eq!(err("{upstream: v2, force_header: 'a b'}", &c).location, "force_header");
        assert_eq!(
            err("{upstream: v2, guard: {max_error_rate: 1.5}}", &c).location,
            "guard.max_error_rate"
        );
        assert_eq!(
            err("{upstream: v2, guard: {max_error_rate: 0.1, min_requests: 0}}", &c).location,
            "guard.min_requests"
        );
        assert!(err("{upstream: v2, precent: 5}", &c).message.contains("unknown field"));
    }

    #[test]
    fn splits_per_request() {
        let c = ctx(Arc::new(ManualClock::new(Duration::ZERO)));
        for (percent, lo, hi) in [
            (10.0, 0.09, 0.11),
            (0.5, 0.003, 0.007),
            (0.0, 0.0, 0.0),
            (100.0, 1.0, 1.0),
        ] {
            let canary = build(&format!("{{upstream: v2, percent: {percent}}}"), &c).unwrap();
            let n = 40_000;
            let hits = (0..n)
                .filter(|_| canary.choose(&HeaderMap::new(), ip()) == Side::Canary)
                .count();
            let share = hits as f64 / n as f64;
            assert!((lo..=hi).contains(&share), "{percent}%: {share}");
        }
    }

    #[test]
    fn sticky_keys_only_move_to_the_canary() {
        let c = ctx(Arc::new(ManualClock::new(Duration::ZERO)));
        let at10 = build("{upstream: v2, percent: 10, sticky: header:x-user}", &c).unwrap();
        let at20 = build("{upstream: v2, percent: 20, sticky: header:x-user}", &c).unwrap();
        let mut canary10 = 0;
        for k in 0..2000 {
            let h = with("x-user", &format!("user-{k}"));
            let a = at10.choose(&h, ip());
            assert!((0..5).all(|_| at10.choose(&h, ip()) == a), "a key stays on its side");
            if a == Side::Canary {
                canary10 += 1;
                assert_eq!(at20.choose(&h, ip()), Side::Canary, "user-{k} moved back to stable");
            }
        }
        assert!((160..=240).contains(&canary10), "{canary10} of 2000 keys at 10%");
        // Buckets are fixed forever (stickiness across restarts and gateways).
        assert!((bucket(b"user-1") - bucket(b"user-1")).abs() < f64::EPSILON);
        assert!((0.0..100.0).contains(&bucket(b"")));
    }

    #[test]
    fn force_header_overrides_both_ways() {
        let c = ctx(Arc::new(ManualClock::new(Duration::ZERO)));
        let zero = build("{upstream: v2, percent: 0, force_header: x-canary}", &c).unwrap();
        let all = build("{upstream: v2, percent: 100, force_header: x-canary}", &c).unwrap();
        for v in ["1", "true", "TRUE"] {
            assert_eq!(zero.choose(&with("x-canary", v), ip()), Side::Canary);
        }
        for v in ["0", "false"] {
            assert_eq!(all.choose(&with("x-canary", v), ip()), Side::Stable);
        }
        assert_eq!(zero.choose(&with("x-canary", "maybe"), ip()), Side::Stable);
    }

    #[test]
    fn forced_requests_never_feed_the_guard() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1_000_000)));
        let c = ctx(clock.clone());
        let canary = build(
            "{upstream: v2, percent: 50, force_header: x-canary, guard: {max_error_rate: 0.5, min_requests: 5, window: 1m}}",
            &c,
        )
        .unwrap();
        // Anyone can force failures: no rollback.
        for _ in 0..50 {
            canary.record_forced(Side::Canary, true);
        }
        assert!(!canary.rolled_back());
        assert_eq!(canary.describe()["guard"]["window_requests"], 0);
        assert_eq!(canary.describe()["failures"]["canary"], 50, "counted, not guarded");
        // Nor dilute real failures with forced successes.
        for _ in 0..100 {
            canary.record_forced(Side::Canary, false);
        }
        for _ in 0..5 {
            canary.record(Side::Canary, true);
        }
        assert!(canary.rolled_back());
        // The demo's sticky user lands on a 20% canary (the demo's guard walkthrough uses it).
        assert!(bucket(b"carol") < 20.0);
    }

    #[test]
    fn guard_rolls_back_once_and_reset_rearms() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1_000_000)));
        let c = ctx(clock.clone());
        let yaml = "{upstream: v2, percent: 50, guard: {max_error_rate: 0.2, min_requests: 10, window: 10s}}";
        let canary = build(yaml, &c).unwrap();
        // Failures of the stable side never count.
        for _ in 0..50 {
            canary.record(Side::Stable, true);
        }
        assert!(!canary.rolled_back());
        // 9 failures in 9 requests: not yet min_requests.
        for _ in 0..9 {
            canary.record(Side::Canary, true);
        }
        assert!(!canary.rolled_back());
        canary.record(Side::Canary, true);
        assert!(canary.rolled_back());
        assert_eq!(canary.effective_percent(), 0.0);
        assert!((0..200).all(|_| canary.choose(&HeaderMap::new(), ip()) == Side::Stable));
        let d = canary.describe();
        assert_eq!(d["rolled_back"], true);
        assert_eq!(d["guard"]["rollback"]["requests"], 10);
        assert_eq!(d["failures"]["canary"], 10);

        // A reload that leaves the block alone keeps the rollback; a changed block starts fresh.
        let again = build(yaml, &c).unwrap();
        assert!(again.rolled_back());
        let mut changed = c.clone();
        changed.block_hash = "h2".into();
        assert!(!build(yaml, &changed).unwrap().rolled_back());

        // The reset re-arms it, with a fresh window.
        assert_eq!(canary.act("reset").unwrap()["rolled_back"], false);
        assert!(!again.rolled_back());
        assert_eq!(canary.effective_percent(), 50.0);
        assert!(canary.act("explode").is_none());
    }

    #[test]
    fn the_guard_window_slides() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1_000_000)));
        let c = ctx(clock.clone());
        let canary = build(
            "{upstream: v2, percent: 50, guard: {max_error_rate: 0.5, min_requests: 10, window: 10s}}",
            &c,
        )
        .unwrap();
        // Old failures age out: 5 failures, then 11 s of quiet, then healthy traffic.
        for _ in 0..5 {
            canary.record(Side::Canary, true);
        }
        clock.advance(Duration::from_secs(11));
        for _ in 0..20 {
            canary.record(Side::Canary, false);
        }
        assert!(!canary.rolled_back());
        // A rate at the limit is not over it.
        for _ in 0..20 {
            canary.record(Side::Canary, true);
        }
        assert!(!canary.rolled_back(), "20 of 40 is 50%, not more");
        canary.record(Side::Canary, true);
        assert!(canary.rolled_back());
    }
}
