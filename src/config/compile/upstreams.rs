//! `upstreams`: endpoints (resolved at load: Pingora panics on a name that does not resolve),
//! balancing, health checks, passive ejection, timeouts and retries.

use crate::config::error::ConfigErrors;
use crate::config::raw::{self, Balance, CheckKind, Protocol};
use crate::config::units::bounded;
use crate::tls::UpstreamTlsSettings;
use crate::upstream::{
    Endpoint, HashOn, HealthCheckSpec, HealthRegistry, PassiveSpec, RetryBudget, RetryPolicy, Timeouts, Upstream,
};
use http::HeaderValue;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// What compiling an upstream needs besides its block.
pub(super) struct UpstreamInputs<'a> {
    pub health: &'a HealthRegistry,
    pub resolver: &'a dyn crate::resolver::Resolve,
    /// `portico -t`: names are checked for syntax, not resolved.
    pub offline: bool,
    /// Where relative file paths (CA, client certificate) start.
    pub base_dir: &'a Path,
}

pub(super) fn compile_upstream(
    name: &str,
    u: &raw::Upstream,
    inputs: &UpstreamInputs<'_>,
    errs: &mut ConfigErrors,
) -> Option<Upstream> {
    let (health, resolver, offline) = (inputs.health, inputs.resolver, inputs.offline);
    let loc = format!("upstreams.{name}");
    let before = errs.0.len();
    if u.endpoints.is_empty() {
        errs.push(format!("{loc}.endpoints"), "an upstream needs at least one endpoint");
    }
    let mut endpoints = Vec::new();
    let mut seen = HashSet::new();
    for (i, e) in u.endpoints.iter().enumerate() {
        let eloc = format!("{loc}.endpoints[{i}]");
        if e.weight == 0 || e.weight > 1000 {
            errs.push(format!("{eloc}.weight"), "weight must be between 1 and 1000");
        }
        let addr = match resolve(&e.address, resolver, offline) {
            Ok(a) => a,
            Err(msg) => {
                errs.push(eloc, msg);
                continue;
            }
        };
        if !seen.insert(e.address.clone()) {
            errs.push(eloc, format!("'{}' is listed twice", e.address));
            continue;
        }
        endpoints.push(Endpoint::new(
            e.address.clone(),
            addr,
            e.weight.clamp(1, 1000),
            health.get(name, &e.address),
        ));
    }
    let hash_on = match (&u.hash_on, u.balance) {
        (Some(h), Balance::ConsistentHash) => parse_hash_on(h).unwrap_or_else(|m| {
            errs.push(format!("{loc}.hash_on"), m);
            HashOn::Ip
        }),
        (Some(_), _) => {
            errs.push(
                format!("{loc}.hash_on"),
                "'hash_on' only applies to 'balance: consistent_hash'",
            );
            HashOn::Ip
        }
        (None, _) => HashOn::Ip,
    };
    let tls = match &u.tls {
        Some(block) => match UpstreamTlsSettings::load(inputs.base_dir, block, u.protocol) {
            Ok(t) => Some(t),
            Err(list) => {
                for e in list {
                    errs.0.push(e.under(&loc));
                }
                None
            }
        },
        None if u.protocol == Protocol::H2 => {
            errs.push(
                format!("{loc}.protocol"),
                "'h2' needs TLS to the upstream (a 'tls' block); use 'h2c' for plaintext HTTP/2",
            );
            None
        }
        None => None,
    };
    if let Some(h) = &u.host {
        if HeaderValue::from_str(h).is_err() || h.is_empty() {
            errs.push(format!("{loc}.host"), "not a valid Host value");
        }
    }
    let health_check = u.health_check.as_ref().map(|h| {
        let interval = h.interval.map(|d| d.0).unwrap_or(Duration::from_secs(5));
        let timeout = h.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(1));
        if let Err(m) = bounded(interval, Duration::from_millis(100), DAY) {
            errs.push(format!("{loc}.health_check.interval"), m);
        }
        if timeout > interval {
            errs.push(
                format!("{loc}.health_check.timeout"),
                "must not be longer than the interval",
            );
        }
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        if h.kind == CheckKind::Tcp && (h.path.is_some() || h.healthy_status.is_some()) {
            errs.push(
                format!("{loc}.health_check"),
                "'path' and 'healthy_status' apply to 'kind: http' only",
            );
        }
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            errs.push(format!("{loc}.health_check.path"), "must be a path starting with '/'");
        }
        let healthy_status = h.healthy_status.clone().unwrap_or_else(|| vec![200]);
        if healthy_status.is_empty() || healthy_status.iter().any(|s| !(100..=599).contains(s)) {
            errs.push(
                format!("{loc}.health_check.healthy_status"),
                "a non-empty list of HTTP status codes",
            );
        }
        let th = |v: Option<u32>, f: &str, errs: &mut ConfigErrors| {
            let v = v.unwrap_or(1);
            if v == 0 || v > 100 {
                errs.push(format!("{loc}.health_check.{f}"), "must be between 1 and 100");
            }
            v.max(1)
        };
        HealthCheckSpec {
            kind: h.kind,
            path,
            interval,
            timeout,
            healthy_status,
            healthy_threshold: th(h.healthy_threshold, "healthy_threshold", errs),
            unhealthy_threshold: th(h.unhealthy_threshold, "unhealthy_threshold", errs),
            host: u.host.clone(),
        }
    });
    let passive = match &u.passive {
        Some(raw::PassiveSetting::Off) => None,
        // No block: failed connects eject (nginx's max_fails=1 fail_timeout=10s).
        None => Some(PassiveSpec::default_for_connects()),
        Some(raw::PassiveSetting::On(p)) => {
            let n = p.consecutive_failures.unwrap_or(5);
            if n == 0 {
                errs.push(format!("{loc}.passive.consecutive_failures"), "must be at least 1");
            }
            if let Some(Err(m)) = p.eject_for.map(|d| bounded(d.0, Duration::ZERO, DAY)) {
                errs.push(format!("{loc}.passive.eject_for"), m);
            }
            Some(PassiveSpec {
                consecutive_failures: n.max(1),
                eject_for: p.eject_for.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
                connect_only: false,
            })
        }
    };
    let d = Timeouts::default();
    let t = &u.timeouts;
    let timeouts = Timeouts {
        connect: t.connect.map(|x| x.0).unwrap_or(d.connect),
        read: t.read.map(|x| x.0).unwrap_or(d.read),
        write: t.write.map(|x| x.0).unwrap_or(d.write),
        idle: t.idle.map(|x| x.0).unwrap_or(d.idle),
    };
    check_timeouts(t, &format!("{loc}.timeouts"), errs);
    let retries = match &u.retries {
        None => RetryPolicy::default(),
        Some(r) => retry_policy(name, r, &loc, health, errs),
    };
    let resolve_every = u.resolve_every.map(|d| d.0).unwrap_or(Duration::from_secs(30));
    if let Err(m) = bounded(resolve_every, Duration::from_millis(100), DAY) {
        errs.push(format!("{loc}.resolve_every"), m);
    }
    if errs.0.len() > before {
        return None;
    }
    let mut up = Upstream::new(
        name.to_string(),
        endpoints,
        u.balance,
        hash_on,
        u.protocol,
        u.host.clone(),
        u.preserve_host,
        health_check,
        passive,
        timeouts,
        retries,
    );
    up.tls = tls;
    if up.endpoints.iter().any(|e| e.name.is_some()) {
        up.resolve_every = Some(resolve_every);
    }
    Some(up)
}

/// `retries: N` or `{attempts, on, budget}`; `on` defaults to `[connect_failure]`.
const DAY: Duration = Duration::from_secs(86400);

/// Bounds of `timeouts` (an upstream's or a route's): connect more than 0 and at most 1h; read
/// and write more than 0 and at most 1d (long-lived streams); idle at most 1d.
pub(super) fn check_timeouts(t: &raw::Timeouts, loc: &str, errs: &mut ConfigErrors) {
    let positive = Duration::from_nanos(1);
    for (f, v, min, max) in [
        ("connect", t.connect, positive, Duration::from_secs(3600)),
        ("read", t.read, positive, DAY),
        ("write", t.write, positive, DAY),
        ("idle", t.idle, Duration::ZERO, DAY),
    ] {
        if let Some(Err(m)) = v.map(|d| bounded(d.0, min, max)) {
            errs.push(format!("{loc}.{f}"), m);
        }
    }
}

fn retry_policy(
    name: &str,
    r: &raw::Retries,
    loc: &str,
    health: &HealthRegistry,
    errs: &mut ConfigErrors,
) -> RetryPolicy {
    if r.attempts > 10 {
        errs.push(format!("{loc}.retries.attempts"), "at most 10");
    }
    let budget = r.budget.and_then(|ratio| {
        if !(0.0..=10.0).contains(&ratio) || !ratio.is_finite() {
            errs.push(
                format!("{loc}.retries.budget"),
                "a fraction of requests between 0 and 10 (0.2 = retries may add 20% to the load)",
            );
            return None;
        }
        Some(RetryBudget {
            ratio,
            window: health.retry_window(name),
        })
    });
    let mut p = RetryPolicy {
        attempts: r.attempts,
        on_connect_failure: false,
        on_reset: false,
        on_timeout: false,
        on_status: Vec::new(),
        budget,
    };
    let on = r.on.clone().unwrap_or_else(|| vec!["connect_failure".into()]);
    for (i, cond) in on.iter().enumerate() {
        match cond.as_str() {
            "connect_failure" => p.on_connect_failure = true,
            "reset" => p.on_reset = true,
            "timeout" => p.on_timeout = true,
            "502" | "503" | "504" => p.on_status.push(cond.parse().expect("a status")),
            other => errs.push(
                format!("{loc}.retries.on[{i}]"),
                format!("unknown retry condition '{other}' (connect_failure | reset | timeout | 502 | 503 | 504)"),
            ),
        }
    }
    p
}

fn parse_hash_on(s: &str) -> Result<HashOn, String> {
    let bad = || format!("'{s}' is not header:NAME | cookie:NAME | ip | path");
    match s.split_once(':') {
        Some(("header", n)) => crate::util::header_name(n).map(HashOn::Header).map_err(|_| bad()),
        Some(("cookie", n)) if !n.is_empty() => Ok(HashOn::Cookie(n.to_string())),
        None if s == "ip" => Ok(HashOn::Ip),
        None if s == "path" => Ok(HashOn::Path),
        _ => Err(bad()),
    }
}

/// Resolve `host:port` once, at load: Pingora's `HttpPeer::new` panics on a name that does
/// not resolve, so no name ever reaches it. Offline (`portico -t`) checks the syntax only.
fn resolve(address: &str, resolver: &dyn crate::resolver::Resolve, offline: bool) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("'{address}' is not host:port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("'{address}' is not host:port"));
    }
    if offline {
        let port = port.parse::<u16>().unwrap_or(0);
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let port = port.parse::<u16>().unwrap_or(0);
    match resolver.resolve(host, port) {
        Ok(addrs) => addrs
            .into_iter()
            .next()
            .ok_or_else(|| format!("'{host}' does not resolve to any address")),
        Err(e) => Err(format!("'{host}' does not resolve: {e}")),
    }
}
