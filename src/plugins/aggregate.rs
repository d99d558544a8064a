//! `aggregate`: *orchestration*. The route answers itself with one JSON document made of the
//! answers of several upstream calls: `{"user": {...}, "orders": [...]}`.
//!
//! ```yaml
//! - name: profile
//!   match: { path: "/profile/{id}" }          # no `upstream`: the plugin answers
//!   plugins:
//!     - aggregate:
//!         calls:
//!           user:   { upstream: users,  path: "/users/{id}" }
//!           orders: { upstream: orders, path: "/orders?user=${user.id}", depends_on: [user], timeout: 500ms }
//!         timeout: 2s              # the whole aggregate (and each call's default)
//!         on_error: partial        # fail (default) | partial
//!         forward_headers: [authorization]
//!         max_body: 1MiB           # per call answer
//! ```
//!
//! The calls' dependency graph ([`crate::mediation::calls`]) runs stage by stage; the calls of
//! one stage run concurrently. Each call goes through the process's upstream client (the
//! upstream's balancing, endpoint health, retries, timeouts and keep-alive pool) with a child
//! span of the request's trace. Its path is filled from the route's `{params}`, the client's
//! `${query.NAME}` and earlier answers `${KEY.field}`, every value percent-encoded
//! ([`crate::mediation::template`]).
//!
//! A call fails when its upstream cannot be reached, times out, answers a status outside 2xx,
//! or answers more than `max_body` bytes; a call whose dependency failed (or whose path needed
//! a value the earlier answer lacks) is not run. With `on_error: fail` the first failure ends
//! the aggregate at once: 502 `upstream_unavailable`, or 504 `upstream_timeout` when the call
//! timed out, naming the call. With `partial` the answer is 200, the failed call's key is
//! `null` and `"errors": {"KEY": {"status", "message"}}` says why.
//!
//! The answer is a [`Reply`], so the route's response-phase plugins (headers, transform, cors,
//! the trace header) run on it like on any upstream response.

use crate::client::{SubError, SubRequest, UpstreamClient};
use crate::config::units::{Dur, Size};
use crate::config::ConfigError;
use crate::mediation::calls::{Call, CallConfig, CallPlan};
use crate::mediation::merge::{answer_body, merge, CallFailure};
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use http::{HeaderName, HeaderValue};
use once_cell::sync::Lazy;
use pingora::http::RequestHeader;
use prometheus::{register_int_counter_vec, IntCounterVec};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_MAX_BODY: u64 = 1 << 20;

/// Sub-calls by route, call and result (`ok`, `failed`, `timeout`, `skipped`).
pub static CALLS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_aggregate_calls_total",
        "Aggregate sub-calls, by route, call and result (ok | failed | timeout | skipped)",
        &["route", "call", "result"]
    )
    .expect("register portico_aggregate_calls_total")
});

pub fn init_metrics() {
    Lazy::force(&CALLS);
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The first failed call fails the request (502, or 504 on a timeout).
    #[default]
    Fail,
    /// Failed calls are `null`, listed under `"errors"`; the answer is 200.
    Partial,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub calls: BTreeMap<String, CallConfig>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub forward_headers: Option<Vec<String>>,
    #[serde(default)]
    pub max_body: Option<Size>,
}

/// Headers Portico sets on each sub-call itself (or that frame the message): never copied
/// from the client.
const SET_BY_PORTICO: [&str; 17] = [
    "host",
    "accept-encoding",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "traceparent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-consumer",
    "forwarded",
];

pub struct Aggregate {
    plan: CallPlan,
    timeout: Duration,
    on_error: OnError,
    forward: Vec<HeaderName>,
    max_body: usize,
    client: Arc<UpstreamClient>,
}

impl Aggregate {
    pub fn new(cfg: Config, ctx: &BuildContext) -> Result<Self, ConfigError> {
        if ctx.route.is_none() {
            return Err(ConfigError::new(
                "",
                "aggregate answers a route's requests: configure it on a route, not globally",
            ));
        }
        let plan = CallPlan::compile(&cfg.calls, &ctx.route_params, &ctx.upstreams)?;
        let timeout = cfg.timeout.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be longer than 0"));
        }
        if timeout > Duration::from_secs(3600) {
            return Err(ConfigError::new("timeout", "must be at most 1h"));
        }
        for call in plan.calls() {
            match call.timeout {
                Some(t) if t.is_zero() => {
                    return Err(ConfigError::new(
                        format!("calls.{}.timeout", call.key),
                        "must be longer than 0",
                    ))
                }
                Some(t) if t > timeout => {
                    return Err(ConfigError::new(
                        format!("calls.{}.timeout", call.key),
                        format!(
                            "{} is longer than the aggregate's timeout ({}), which bounds every call",
                            humantime::format_duration(t),
                            humantime::format_duration(timeout)
                        ),
                    ))
                }
                _ => {}
            }
        }
        let names = cfg.forward_headers.unwrap_or_else(|| vec!["authorization".to_string()]);
        let mut forward = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let here = format!("forward_headers[{i}]");
            let name = crate::util::header_name(n).map_err(|e| ConfigError::new(&here, e))?;
            if SET_BY_PORTICO.contains(&name.as_str()) {
                return Err(ConfigError::new(
                    here,
                    format!("'{n}' is set by Portico on each call, not copied from the client"),
                ));
            }
            if !forward.contains(&name) {
                forward.push(name);
            }
        }
        let max_body = cfg.max_body.map(|s| s.0).unwrap_or(DEFAULT_MAX_BODY);
        if max_body == 0 {
            return Err(ConfigError::new("max_body", "must be larger than 0"));
        }
        if max_body > 1 << 30 {
            return Err(ConfigError::new("max_body", "at most 1GiB: answers are held in memory"));
        }
        Ok(Aggregate {
            plan,
            timeout,
            on_error: cfg.on_error,
            forward,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            client: ctx.upstream_client(),
        })
    }

    /// The headers every call of this request carries: the listed client headers, and what a
    /// proxied request would get from Portico about its client.
    fn headers(&self, req: &RequestHeader, st: &RequestState) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        for name in &self.forward {
            for v in req.headers.get_all(name) {
                out.push((name.clone(), v.clone()));
            }
        }
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                out.push((HeaderName::from_static(name), v));
            }
        };
        // The answers are parsed: ask for them plain (an encoded one is decoded if gzip, or
        // fails its call).
        put("accept-encoding", "identity");
        let ip = st.client_ip.to_string();
        put("x-forwarded-for", &ip);
        put("x-real-ip", &ip);
        put("x-forwarded-proto", if st.tls { "https" } else { "http" });
        // The client's Host as written (port included), as proxied requests get it.
        let host = req
            .headers
            .get(http::header::HOST)
            .cloned()
            .or_else(|| req.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        if let Some(c) = &st.consumer {
            put("x-consumer", c);
        }
        if let Some(h) = host {
            out.push((HeaderName::from_static("x-forwarded-host"), h));
        }
        out
    }

    /// One call: its answer as JSON (or a string), or why it has none.
    async fn call(
        &self,
        st: &RequestState,
        call: &Call,
        path: String,
        headers: Vec<(HeaderName, HeaderValue)>,
        deadline: Instant,
    ) -> Result<Value, CallFailure> {
        let limit = call.timeout.unwrap_or(self.timeout);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(self.timeout, true));
        }
        let (bound, overall) = if left < limit { (left, true) } else { (limit, false) };
        let sub = SubRequest {
            method: call.method.clone(),
            path,
            headers,
            body: bytes::Bytes::new(),
            timeout: Some(bound),
            max_body: self.max_body,
        };
        match self.client.send(st, &call.upstream, sub).await {
            Ok(r) if (200..300).contains(&r.status) => {
                let ct = r.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
                let ce: Vec<&str> = r
                    .headers
                    .get_all(http::header::CONTENT_ENCODING)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("unreadable"))
                    .collect();
                let ce = (!ce.is_empty()).then(|| ce.join(","));
                answer_body(ct, ce.as_deref(), &r.body, self.max_body).map_err(|why| CallFailure::new(502, why))
            }
            Ok(r) => Err(CallFailure::new(
                r.status,
                format!("the upstream answered {}", r.status),
            )),
            Err(SubError::Timeout) => Err(timed_out(if overall { self.timeout } else { limit }, overall)),
            Err(SubError::TooLarge) => Err(CallFailure::new(
                502,
                format!("the answer is larger than max_body ({} bytes)", self.max_body),
            )),
            Err(e @ (SubError::Unavailable(_) | SubError::NoUpstream(_))) => {
                log::debug!("aggregate {}: call '{}': {e}", st.route, call.key);
                Err(CallFailure::new(502, "the upstream could not be reached"))
            }
        }
    }
}

fn timed_out(after: Duration, overall: bool) -> CallFailure {
    let what = if overall {
        "the aggregate's timeout"
    } else {
        "its timeout"
    };
    CallFailure::new(
        504,
        format!("no answer within {what} ({})", humantime::format_duration(after)),
    )
}

fn result_label(f: &CallFailure) -> &'static str {
    match f.status {
        504 => "timeout",
        424 => "skipped",
        _ => "failed",
    }
}

#[async_trait]
impl Plugin for Aggregate {
    fn kind(&self) -> PluginKind {
        PluginKind::Answer
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let st: &RequestState = st;
        let deadline = Instant::now() + self.timeout;
        let headers = self.headers(req, st);
        let query = req.uri.query();
        let mut answers: HashMap<String, Value> = HashMap::new();
        let mut outcomes: Vec<(String, Result<Value, CallFailure>)> = Vec::new();
        let mut failed: HashSet<String> = HashSet::new();
        let count = |key: &str, result: &str| {
            CALLS.with_label_values(&[&st.route, key, result]).inc();
        };
        for stage in self.plan.stages() {
            let mut running = FuturesUnordered::new();
            for call in stage {
                let blocked = call
                    .depends_on
                    .iter()
                    .find(|d| failed.contains(*d))
                    .map(|d| CallFailure::skipped(d));
                let ready = match blocked {
                    Some(f) => Err(f),
                    None => call
                        .path
                        .render(&st.params, query, &answers)
                        .map_err(|m| CallFailure::missing(&m)),
                };
                match ready {
                    Ok(path) => {
                        let fut = self.call(st, call, path, headers.clone(), deadline);
                        running.push(async move { (call, fut.await) });
                    }
                    Err(f) => {
                        count(&call.key, result_label(&f));
                        if self.on_error == OnError::Fail {
                            return Verdict::Respond(fail_reply(&call.key, &f));
                        }
                        failed.insert(call.key.clone());
                        outcomes.push((call.key.clone(), Err(f)));
                    }
                }
            }
            while let Some((call, result)) = running.next().await {
                match result {
                    Ok(v) => {
                        count(&call.key, "ok");
                        answers.insert(call.key.clone(), v);
                    }
                    Err(f) => {
                        count(&call.key, result_label(&f));
                        if self.on_error == OnError::Fail {
                            // Dropping `running` cancels the calls still in flight.
                            return Verdict::Respond(fail_reply(&call.key, &f));
                        }
                        failed.insert(call.key.clone());
                        outcomes.push((call.key.clone(), Err(f)));
                    }
                }
            }
        }
        // The document lists the calls by name, whatever order they finished in.
        for call in self.plan.calls() {
            if let Some(v) = answers.remove(&call.key) {
                outcomes.push((call.key.clone(), Ok(v)));
            }
        }
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        let doc = merge(outcomes.iter().map(|(k, r)| (k.as_str(), r.clone())));
        match serde_json::to_vec(&doc) {
            Ok(body) => Verdict::Respond(Reply::json(200, body)),
            Err(e) => Verdict::Respond(Reply::error(
                502,
                "upstream_unavailable",
                format!("the aggregate answer could not be written: {e}"),
            )),
        }
    }
}

/// `on_error: fail`: the gateway error naming the call.
fn fail_reply(key: &str, f: &CallFailure) -> Reply {
    let message = format!("aggregate call '{key}' failed: {}", f.message);
    if f.status == 504 {
        Reply::error(504, "upstream_timeout", message)
    } else {
        Reply::error(502, "upstream_unavailable", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: &str, params: &[&str]) -> Result<Aggregate, ConfigError> {
        let mut ctx = BuildContext::standalone();
        ctx.route = Some("r".into());
        ctx.route_params = params.iter().map(|s| s.to_string()).collect();
        ctx.upstreams = vec!["users".into(), "orders".into()];
        let cfg: Config = ctx.parse(&serde_yaml::from_str(yaml).unwrap())?;
        Aggregate::new(cfg, &ctx)
    }

    #[test]
    fn defaults() {
        let a = build("calls: {user: {upstream: users, path: '/u/{id}'}}", &["id"]).unwrap();
        assert_eq!(a.timeout, DEFAULT_TIMEOUT);
        assert_eq!(a.on_error, OnError::Fail);
        assert_eq!(a.forward, [HeaderName::from_static("authorization")]);
        assert_eq!(a.max_body, 1 << 20);
        assert_eq!(a.kind(), PluginKind::Answer);
    }

    #[test]
    fn config_errors_are_located() {
        let cases: &[(&str, &str)] = &[
            (
                "calls: {a: {upstream: users, path: /a, depends_on: [b]}, b: {upstream: users, path: /b, depends_on: [a]}}",
                "calls.a.depends_on: cycle a -> b -> a",
            ),
            (
                "calls: {a: {upstream: users, path: '/a/${zz.id}'}}",
                "calls.a.path: '${zz.id}' refers to unknown call 'zz'",
            ),
            (
                "calls: {a: {upstream: users, path: /a, depends_on: [zz]}}",
                "calls.a.depends_on: unknown call 'zz'",
            ),
            ("calls: {a: {upstream: nope, path: /a}}", "calls.a.upstream: unknown upstream 'nope'"),
            (
                "calls: {a: {upstream: users, path: /a, timeout: 3s}}",
                "calls.a.timeout: 3s is longer than the aggregate's timeout (2s), which bounds every call",
            ),
            (
                "calls: {a: {upstream: users, path: /a}}\nforward_headers: [authorization, Host]",
                "forward_headers[1]: 'Host' is set by Portico on each call, not copied from the client",
            ),
            (
                "calls: {a: {upstream: users, path: /a}}\nforward_headers: ['bad header']",
                "forward_headers[0]: 'bad header' is not a valid header name",
            ),
            ("calls: {a: {upstream: users, path: /a}}\non_error: maybe", "on_error: unknown variant 'maybe', expected 'fail' or 'partial'"),
            ("calls: {a: {upstream: users, path: /a}}\ntimeout: 0s", "timeout: must be longer than 0"),
            ("calls: {a: {upstream: users, path: /a}}\nretries: 3", "unknown field 'retries', expected one of 'calls', 'timeout', 'on_error', 'forward_headers', 'max_body'"),
        ];
        for (yaml, want) in cases {
            let err = build(yaml, &["id"])
                .err()
                .unwrap_or_else(|| panic!("{yaml} should fail"));
            assert_eq!(err.to_string(), *want, "{yaml}");
        }
        let mut global = BuildContext::standalone();
        global.upstreams = vec!["users".into()];
        let cfg: Config = global
            .parse(&serde_yaml::from_str("calls: {a: {upstream: users, path: /a}}").unwrap())
            .unwrap();
        assert!(Aggregate::new(cfg, &global).is_err());
    }

    #[test]
    fn fail_replies_name_the_call() {
        let r = fail_reply("orders", &CallFailure::new(504, "no answer within its timeout (300ms)"));
        assert_eq!((r.status, r.error_code()), (504, Some("upstream_timeout")));
        let r = fail_reply("user", &CallFailure::new(500, "the upstream answered 500"));
        assert_eq!((r.status, r.error_code()), (502, Some("upstream_unavailable")));
        match r.body {
            crate::plugin::ReplyBody::Error { message, .. } => {
                assert_eq!(message, "aggregate call 'user' failed: the upstream answered 500")
            }
            other => panic!("{other:?}"),
        }
    }
}
