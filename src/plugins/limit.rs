//! What the two `limit` plugins, `rate_limit` and `quota`, share: the key a request counts
//! under, where the counters live, what a failing shared store means, the `RateLimit-*` headers
//! carried from the request phase to the response, and the admitted/limited counters.
//! Not a plugin itself; the algorithms and stores are in [`crate::limiter`].

use crate::config::canonical_ip;
use crate::limiter::metrics::LIMIT_REQUESTS;
use crate::limiter::Decision;
use crate::plugin::{BuildContext, Reply, RequestState, Verdict};
use http::HeaderName;
use pingora::http::{RequestHeader, ResponseHeader};
use prometheus::IntCounter;
use serde::Deserialize;

/// What a request is counted under (`key:` in the block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyForm {
    /// The client address `client_ip` resolved (a spoofed X-Forwarded-For changes nothing).
    Ip,
    /// The authenticated consumer; the client address when there is none.
    Consumer,
    /// The matched route: all its clients share one budget.
    Route,
    /// One budget for everything the plugin sees.
    Global,
    /// The values of a request header; the client address when it is absent.
    Header(HeaderName),
}

impl KeyForm {
    pub const FORMS: &'static str = "ip, consumer, route, global or header:NAME";

    pub fn parse(s: &str) -> Result<KeyForm, String> {
        match s.trim() {
            "ip" => Ok(KeyForm::Ip),
            "consumer" => Ok(KeyForm::Consumer),
            "route" => Ok(KeyForm::Route),
            "global" => Ok(KeyForm::Global),
            other => match other.strip_prefix("header:") {
                Some(name) => crate::util::header_name(name.trim())
                    .map(KeyForm::Header)
                    .map_err(|e| format!("'{s}': {e}")),
                None => Err(format!("unknown key '{s}': use {}", Self::FORMS)),
            },
        }
    }

    /// The request's key. Each form has its own prefix, so a consumer named like an address,
    /// or a header value, never shares a budget with that address.
    pub fn key(&self, req: &RequestHeader, st: &RequestState) -> String {
        let ip = |out: &mut String| {
            out.push_str("ip:");
            crate::util::push_ip(out, canonical_ip(st.client_ip));
        };
        let mut out = String::with_capacity(48);
        match self {
            KeyForm::Ip => ip(&mut out),
            KeyForm::Consumer => match &st.consumer {
                Some(c) => {
                    out.push_str("c:");
                    out.push_str(c);
                }
                None => ip(&mut out),
            },
            KeyForm::Route => {
                out.push_str("r:");
                out.push_str(&st.route);
            }
            KeyForm::Global => out.push('g'),
            KeyForm::Header(name) => {
                let mut values = req.headers.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    ip(&mut out);
                } else {
                    out.push_str("h:");
                    for (i, v) in values.enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
                    }
                }
            }
        }
        out
    }
}

/// Where the counters live (`store:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process: sharded, bounded to `max_keys`.
    #[default]
    Local,
    /// In the config's `redis`: every Portico process using it shares one budget.
    Redis,
}

/// What a request gets when the shared store cannot decide (`on_store_error:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Let it through (availability first; the default, as Kong's `fault_tolerant`).
    #[default]
    Allow,
    /// Refuse it with 429 and `Retry-After: 1`.
    Deny,
}

/// The Redis backend for `store: redis`, or the located reason there is none.
pub fn redis_backend(
    ctx: &BuildContext,
    store: StoreKind,
) -> Result<Option<std::sync::Arc<crate::limiter::RedisBackend>>, crate::config::ConfigError> {
    use crate::config::ConfigError;
    if store != StoreKind::Redis {
        return Ok(None);
    }
    match ctx.redis() {
        Ok(Some(backend)) => Ok(Some(backend)),
        Ok(None) => Err(ConfigError::new(
            "store",
            "store: redis needs the top-level `redis` section (redis: { url: redis://HOST:PORT })",
        )),
        Err(e) => Err(ConfigError::new("store", format!("redis.url: {e}"))),
    }
}

/// The Redis key namespace of one plugin block: its route and its block's hash, so another
/// route, or a changed block (a reload that changes the limit), starts from a fresh budget,
/// while every process running the same block shares one.
pub fn namespace(ctx: &BuildContext) -> String {
    let hash = ctx.block_hash.get(..16).unwrap_or(&ctx.block_hash);
    format!("{}:{hash}", ctx.route.as_deref().unwrap_or("*"))
}

/// The bound on a local store's keys (`max_keys:`), checked.
pub fn max_keys(value: Option<i64>, store: StoreKind) -> Result<usize, crate::config::ConfigError> {
    use crate::config::ConfigError;
    match value {
        None => Ok(crate::limiter::DEFAULT_MAX_KEYS),
        Some(_) if store == StoreKind::Redis => Err(ConfigError::new(
            "max_keys",
            "applies to store: local only (Redis expires idle keys itself)",
        )),
        Some(n) if n < 1 => Err(ConfigError::new("max_keys", "must be at least 1")),
        Some(n) => usize::try_from(n).map_err(|_| ConfigError::new("max_keys", "too large")),
    }
}

/// The decision whose headers the response carries: the tightest of the request's limits
/// (a refusal, else the fewest requests remaining, else the longest wait to a full budget).
#[derive(Debug, Clone, Copy)]
struct Carried(Decision);

/// Remember a decision for the response phase (kept in `st.vars`).
pub fn remember(st: &mut RequestState, d: Decision) {
    match st.vars.get_mut::<Carried>() {
        Some(Carried(cur)) => {
            let tighter = (!d.admitted && cur.admitted)
                || (d.admitted == cur.admitted
                    && (d.remaining < cur.remaining
                        || (d.remaining == cur.remaining && d.reset_after > cur.reset_after)));
            if tighter {
                *cur = d;
            }
        }
        None => {
            st.vars.insert(Carried(d));
        }
    }
}

/// Put the remembered decision's `RateLimit-*` (and on a refusal `Retry-After`) headers on the
/// response: the upstream's answer or Portico's own 429.
pub fn apply(st: &RequestState, resp: &mut ResponseHeader) {
    if let Some(Carried(d)) = st.vars.get::<Carried>() {
        for (name, value) in d.prepared_headers() {
            let _ = resp.insert_header(name, value);
        }
    }
}

/// The 429 for a refused decision, with its headers.
pub fn refusal(code: &'static str, message: String, d: &Decision) -> Reply {
    d.headers()
        .into_iter()
        .fold(Reply::error(429, code, message), |r, (name, value)| {
            r.with_header(name, value)
        })
}

/// The shared store could not decide (the error is already counted in
/// `portico_limit_store_errors_total`, where it arose): `policy` says whether the request
/// passes; a refusal is a 429 `code` with `Retry-After: 1`. `what` names the limit in the
/// message ("the quota", "the rate limit").
pub fn store_unavailable(
    e: &dyn std::fmt::Display,
    policy: OnStoreError,
    counters: &Counters,
    st: &RequestState,
    code: &'static str,
    what: &str,
) -> Verdict {
    log::debug!("{}: {e}; on_store_error: {policy:?}", counters.plugin);
    let admitted = policy == OnStoreError::Allow;
    counters.count(st, admitted);
    if admitted {
        return Verdict::Continue;
    }
    Verdict::Respond(
        Reply::error(429, code, format!("{what} cannot be checked right now; retry later"))
            .with_header("retry-after", "1"),
    )
}

/// The admitted/limited counters of one plugin block. A route plugin holds its two series; a
/// global one looks up the request's route (and creates every route's series at load).
pub struct Counters {
    plugin: &'static str,
    fixed: Option<(IntCounter, IntCounter)>,
}

impl Counters {
    pub fn new(ctx: &BuildContext, plugin: &'static str) -> Counters {
        let pair = |route: &str| {
            (
                LIMIT_REQUESTS.with_label_values(&[route, plugin, "admitted"]),
                LIMIT_REQUESTS.with_label_values(&[route, plugin, "limited"]),
            )
        };
        match &ctx.route {
            Some(route) => Counters {
                plugin,
                fixed: Some(pair(route)),
            },
            None => {
                for route in &ctx.routes {
                    pair(route);
                }
                Counters { plugin, fixed: None }
            }
        }
    }

    pub fn count(&self, st: &RequestState, admitted: bool) {
        match &self.fixed {
            Some((a, l)) => {
                if admitted {
                    a.inc()
                } else {
                    l.inc()
                }
            }
            None => {
                let result = if admitted { "admitted" } else { "limited" };
                LIMIT_REQUESTS
                    .with_label_values(&[st.route.as_ref(), self.plugin, result])
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn key_forms_parse() {
        assert_eq!(KeyForm::parse("ip"), Ok(KeyForm::Ip));
        assert_eq!(KeyForm::parse("consumer"), Ok(KeyForm::Consumer));
        assert_eq!(KeyForm::parse("route"), Ok(KeyForm::Route));
        assert_eq!(KeyForm::parse("global"), Ok(KeyForm::Global));
        assert_eq!(
            KeyForm::parse("header:X-Tenant"),
            Ok(KeyForm::Header(HeaderName::from_static("x-tenant")))
        );
        for bad in ["cookie:sid", "IP", "", "header:", "header:a b", "user"] {
            assert!(KeyForm::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_of_a_request() {
        let mut st = RequestState::new("::ffff:10.0.0.7".parse().unwrap());
        st.route = "orders".into();
        let plain = req(&[]);
        assert_eq!(KeyForm::Ip.key(&plain, &st), "ip:10.0.0.7", "v4-mapped counts as v4");
        assert_eq!(
            KeyForm::Consumer.key(&plain, &st),
            "ip:10.0.0.7",
            "falls back to the address"
        );
        st.consumer = Some("10.0.0.7".into());
        assert_eq!(
            KeyForm::Consumer.key(&plain, &st),
            "c:10.0.0.7",
            "never the address's budget"
        );
        assert_eq!(KeyForm::Route.key(&plain, &st), "r:orders");
        assert_eq!(KeyForm::Global.key(&plain, &st), "g");
        let h = KeyForm::parse("header:x-tenant").unwrap();
        assert_eq!(h.key(&plain, &st), "ip:10.0.0.7", "absent header: the address");
        assert_eq!(h.key(&req(&[("x-tenant", "acme")]), &st), "h:acme");
        assert_eq!(h.key(&req(&[("x-tenant", "a"), ("x-tenant", "b")]), &st), "h:a,b");
    }

    fn decision(admitted: bool, remaining: u64, reset_ms: u64) -> Decision {
        Decision {
            admitted,
            limit: 10,
            remaining,
            reset_after: Duration::from_millis(reset_ms),
            retry_after: (!admitted).then(|| Duration::from_secs(1)),
        }
    }

    #[test]
    fn the_tightest_decision_is_carried() {
        let mut st = RequestState::new("127.0.0.1".parse().unwrap());
        let carried = |st: &RequestState| st.vars.get::<Carried>().unwrap().0;
        remember(&mut st, decision(true, 5, 100));
        remember(&mut st, decision(true, 7, 100));
        assert_eq!(carried(&st).remaining, 5);
        remember(&mut st, decision(true, 5, 900));
        assert_eq!(carried(&st).reset_after, Duration::from_millis(900));
        remember(&mut st, decision(false, 0, 50));
        assert!(!carried(&st).admitted);
        remember(&mut st, decision(true, 0, 5000));
        assert!(!carried(&st).admitted, "a refusal wins");

        let mut resp = ResponseHeader::build(200, None).unwrap();
        apply(&st, &mut resp);
        assert_eq!(resp.headers["ratelimit-remaining"], "0");
        assert_eq!(resp.headers["retry-after"], "1");
        // Applied twice (two limit plugins on a route), still one of each.
        apply(&st, &mut resp);
        assert_eq!(resp.headers.get_all("ratelimit-limit").iter().count(), 1);
    }

    #[test]
    fn no_decision_no_headers() {
        let st = RequestState::new("127.0.0.1".parse().unwrap());
        let mut resp = ResponseHeader::build(200, None).unwrap();
        apply(&st, &mut resp);
        assert!(resp.headers.get("ratelimit-limit").is_none());
    }
}
