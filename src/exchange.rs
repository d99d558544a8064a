//! The steps of one request through the gateway, called from the thin hooks in `proxy.rs`.

use crate::config::{canonical_ip, Route, Snapshot};
use crate::plugin::{Chains, Reply, RequestState};
use crate::respond;
use crate::route::{normalize_host, normalize_path, RequestKey};
use crate::shared::Shared;
use crate::upstream::{InFlight, Upstream};
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Deref;
use std::sync::Arc;

/// Per-request state of the gateway (Pingora's CTX).
pub struct Ctx {
    pub snap: Arc<Snapshot>,
    pub st: RequestState,
    pub route: Option<Arc<Route>>,
    pub upstream: Option<Arc<Upstream>>,
    /// Index of the endpoint of the current attempt.
    pub endpoint: Option<usize>,
    /// Endpoints already tried by this request.
    pub tried: Vec<usize>,
    /// Retry the same endpoint (a stale pooled connection, not the endpoint's fault).
    retry_same: bool,
    in_flight: Option<InFlight>,
    /// Path and query for the upstream: normalised and rewritten.
    upstream_path: Option<String>,
    body_limit: u64,
    body_seen: u64,
    pub grpc: bool,
    /// The gateway error code of the response, if Portico wrote one.
    pub error_code: Option<&'static str>,
    /// The TCP peer (may be a trusted proxy rather than the client).
    pub peer_ip: IpAddr,
}

/// A cheap handle on the chains that apply to this request (the route's, or the global ones).
pub struct ChainsRef(Result<Arc<Route>, Arc<Snapshot>>);

impl Deref for ChainsRef {
    type Target = Chains;
    fn deref(&self) -> &Chains {
        match &self.0 {
            Ok(r) => &r.chains,
            Err(s) => &s.global,
        }
    }
}

impl Ctx {
    pub fn new(snap: Arc<Snapshot>) -> Self {
        Ctx {
            snap,
            st: RequestState::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            route: None,
            upstream: None,
            endpoint: None,
            tried: Vec::new(),
            retry_same: false,
            in_flight: None,
            upstream_path: None,
            body_limit: u64::MAX,
            body_seen: 0,
            grpc: false,
            error_code: None,
            peer_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }

    pub fn chains(&self) -> ChainsRef {
        ChainsRef(self.route.clone().ok_or_else(|| self.snap.clone()))
    }
}

fn bad_request(message: impl Into<String>) -> Reply {
    Reply::error(400, "bad_request", message)
}

/// The request's host as routing compares it (see [`normalize_host`]): `:authority` /
/// absolute-form authority, else `Host`. Ambiguity (two Host headers, or an authority that
/// disagrees with Host) and invalid hosts are refused.
fn request_host(req: &RequestHeader) -> Result<String, Reply> {
    let mut hosts = req.headers.get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(bad_request("more than one Host header"));
    }
    let header = header
        .map(|h| h.to_str().map_err(|_| bad_request("the Host header is not valid")))
        .transpose()?;
    let norm = |h: &str| normalize_host(h).map_err(|why| bad_request(format!("invalid host: {why}")));
    match (req.uri.authority().map(|a| a.as_str()), header) {
        (Some(a), Some(h)) => {
            let a = norm(a)?;
            if a != norm(h)? {
                return Err(bad_request(
                    "the request target's authority and the Host header disagree",
                ));
            }
            Ok(a)
        }
        (Some(a), None) => norm(a),
        (None, Some(h)) => norm(h),
        (None, None) if req.version == http::Version::HTTP_10 => Ok(String::new()),
        (None, None) => Err(bad_request("an HTTP/1.1 request needs a Host header")),
    }
}

/// HTTP/2 lets a request repeat `content-length` (HTTP/1 framing is checked by the edge layer):
/// equal copies become one, different ones are refused, so an HTTP/1 upstream never sees two.
fn one_content_length(req: &mut RequestHeader) -> Result<(), Reply> {
    let mut values = req.headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = values.next().cloned() else {
        return Ok(());
    };
    let mut repeated = false;
    for v in values {
        if v.as_bytes().trim_ascii() != first.as_bytes().trim_ascii() {
            return Err(bad_request("the request has Content-Length headers that disagree"));
        }
        repeated = true;
    }
    if repeated {
        let _ = req.insert_header(CONTENT_LENGTH, first);
    }
    Ok(())
}

fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// First phase: trace ids, client address, host and path checks, routing, declared body size.
pub fn begin(session: &mut Session, ctx: &mut Ctx) -> Result<(), Reply> {
    let snap = ctx.snap.clone();
    let req = session.req_header();
    ctx.st.trace = snap.trace.ids_for(&req.headers);
    ctx.grpc = respond::is_grpc(req);
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    ctx.peer_ip = canonical_ip(peer);
    ctx.st.client_ip = snap.client_ip.resolve(peer, &req.headers);
    ctx.st.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    // HTTP/1 body reads: no progress for this long → 408 (HTTP/2 bodies: the edge's frame watch).
    session.set_read_timeout(Some(snap.limits.body_timeout));

    one_content_length(session.req_header_mut())?;
    let req = session.req_header();
    ctx.st.host = request_host(req)?;
    ctx.st.path = normalize_path(req.uri.path()).map_err(|e| bad_request(e.message()))?;

    let key = RequestKey {
        host: &ctx.st.host,
        path: &ctx.st.path,
        method: &req.method,
        headers: &req.headers,
    };
    let mut params = Vec::new();
    let mut route = snap
        .routes
        .iter()
        .find(|r| r.matcher.matches(&key, &mut params))
        .cloned();
    // A CORS preflight asks about another method: route it as that method would be, so the
    // route's cors plugin can answer it.
    if route.is_none() && req.method == Method::OPTIONS {
        let asked = req
            .headers
            .get("access-control-request-method")
            .and_then(|v| Method::from_bytes(v.as_bytes()).ok());
        if let Some(m) = asked {
            let key = RequestKey { method: &m, ..key };
            route = snap
                .routes
                .iter()
                .find(|r| r.matcher.matches(&key, &mut params))
                .cloned();
        }
    }
    let route = route.ok_or_else(|| {
        Reply::error(
            404,
            "no_route",
            format!("no route matches {} {}", req.method, ctx.st.path),
        )
    })?;
    ctx.st.params = params;
    ctx.st.route = route.name.clone();
    ctx.body_limit = route.max_request_body_bytes;
    ctx.route = Some(route);
    if declared_length(req).is_some_and(|n| n > ctx.body_limit) {
        return Err(too_large(ctx.body_limit));
    }
    Ok(())
}

fn too_large(limit: u64) -> Reply {
    Reply::error(
        413,
        "payload_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// After the request plugins: the upstream (a select plugin may have named another) and the
/// path it receives.
pub fn choose_upstream(session: &Session, ctx: &mut Ctx) -> Result<(), Reply> {
    let route = ctx.route.clone().expect("routed");
    let upstream = match &ctx.st.upstream_override {
        Some(name) => ctx.snap.upstreams.get(name).cloned(),
        None => route.upstream.clone(),
    };
    let Some(upstream) = upstream else {
        return Err(Reply::error(502, "upstream_unavailable", "the route has no upstream"));
    };
    ctx.upstream = Some(upstream);
    let path = match &route.rewrite {
        Some(rw) => rw.apply(&ctx.st.path),
        None => ctx.st.path.clone(),
    };
    ctx.upstream_path = Some(match session.req_header().uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    });
    Ok(())
}

/// Choose the endpoint of this attempt.
pub fn pick_peer(session: &Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
    let Some(up) = ctx.upstream.clone() else {
        return Error::e_explain(HTTPStatus(502), "no upstream chosen");
    };
    let index = match (ctx.retry_same, ctx.endpoint) {
        (true, Some(i)) => i,
        _ => {
            let key = (up.balance == crate::config::raw::Balance::ConsistentHash)
                .then(|| up.hash_key(&session.req_header().headers, ctx.st.client_ip, &ctx.st.path));
            match up.select(key.as_deref(), &ctx.tried) {
                Some(i) => i,
                None => return Error::e_explain(HTTPStatus(502), "every endpoint was tried"),
            }
        }
    };
    ctx.retry_same = false;
    if !ctx.tried.contains(&index) {
        ctx.tried.push(index);
    }
    ctx.endpoint = Some(index);
    ctx.in_flight = Some(up.in_flight_guard(index));
    let route = ctx.route.as_ref().expect("routed");
    Ok(up.peer(index, &route.timeouts.over(&up.timeouts)))
}

fn retries_left(ctx: &Ctx, up: &Upstream) -> bool {
    (ctx.tried.len() as u32) <= up.retries.attempts && ctx.tried.len() < up.endpoints.len()
}

/// A connection to the endpoint failed: count it, and say whether to try another.
pub fn connect_failed(ctx: &mut Ctx) -> bool {
    let (Some(up), Some(i)) = (ctx.upstream.clone(), ctx.endpoint) else {
        return false;
    };
    up.record_failure(i);
    up.retries.on_connect_failure && retries_left(ctx, &up)
}

/// The exchange failed after connecting. Only idempotent requests whose body is still
/// replayable, and whose response has not started, are retried.
pub fn proxy_failed(session: &mut Session, ctx: &mut Ctx, e: &mut Error, upstream_reused: bool) -> bool {
    let (Some(up), Some(i)) = (ctx.upstream.clone(), ctx.endpoint) else {
        return false;
    };
    let replayable = session.req_header().method.is_idempotent()
        && !session.as_ref().retry_buffer_truncated()
        && session.response_written().is_none();
    if !replayable {
        return false;
    }
    // A pooled connection the upstream had already closed is not the endpoint's fault:
    // Pingora marks those "retry only if reused"; retry them on the same endpoint.
    if matches!(e.retry, pingora::RetryType::ReusedOnly) {
        e.retry.decide_reuse(upstream_reused);
        if e.retry() {
            ctx.retry_same = true;
            return true;
        }
    }
    up.record_failure(i);
    up.retries.on_reset && retries_left(ctx, &up)
}

/// The upstream answered: passive health counts 502–504 as failures.
pub fn upstream_answered(status: u16, ctx: &mut Ctx) {
    if let (Some(up), Some(i)) = (&ctx.upstream, ctx.endpoint) {
        if (502..=504).contains(&status) {
            up.record_failure(i);
        } else {
            up.record_success(i);
        }
    }
}

/// Headers Portico sets on the way upstream; copies a client sent are replaced, never passed.
const GATEWAY_SET: [&str; 8] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "forwarded",
    "x-real-ip",
    "traceparent",
    "x-consumer",
];

pub fn prepare_upstream_request(session: &Session, req: &mut RequestHeader, ctx: &Ctx) {
    if let Some(p) = &ctx.upstream_path {
        if let Ok(uri) = p.parse::<http::Uri>() {
            req.set_uri(uri);
        }
    }
    let up = ctx.upstream.as_ref().expect("upstream chosen");
    let original_host: Option<HeaderValue> = session.req_header().headers.get(HOST).cloned().or_else(|| {
        session
            .req_header()
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });

    // X-Forwarded-For: a trusted proxy's list is extended; anyone else's is replaced.
    let prior_xff = ctx
        .snap
        .client_ip
        .is_trusted(ctx.peer_ip)
        .then(|| {
            let v: Vec<&str> = req
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            v.join(", ")
        })
        .filter(|s| !s.is_empty());
    // Removing a header from Pingora's head also walks its case-preserving map: look first.
    for h in GATEWAY_SET {
        if req.headers.contains_key(h) {
            req.remove_header(h);
        }
    }
    if req.headers.contains_key(&ctx.snap.trace.header) {
        req.remove_header(&ctx.snap.trace.header);
    }
    let xff = match prior_xff {
        Some(p) => format!("{p}, {}", ctx.peer_ip),
        None => ctx.peer_ip.to_string(),
    };
    let _ = req.insert_header("x-forwarded-for", xff);
    let _ = req.insert_header("x-forwarded-proto", if ctx.st.tls { "https" } else { "http" });
    if let Some(h) = &original_host {
        let _ = req.insert_header("x-forwarded-host", h.clone());
    }
    let _ = req.insert_header("x-real-ip", ctx.st.client_ip.to_string());
    let _ = req.insert_header("traceparent", ctx.st.trace.traceparent());
    let _ = req.insert_header(ctx.snap.trace.header.clone(), ctx.st.trace.request_id.as_str());
    if let Some(c) = &ctx.st.consumer {
        if let Ok(v) = HeaderValue::from_str(c) {
            let _ = req.insert_header("x-consumer", v);
        }
    }

    let host = if up.preserve_host {
        original_host
    } else {
        let h = up
            .host
            .as_deref()
            .unwrap_or_else(|| &up.endpoints[ctx.endpoint.unwrap_or(0)].address);
        HeaderValue::from_str(h).ok()
    };
    if let Some(h) = host {
        let _ = req.insert_header(HOST, h);
    }
}

/// Enforce the body limit on the bytes actually received (chunked bodies declare nothing).
pub fn count_request_body(body: &mut Option<Bytes>, ctx: &mut Ctx) -> Result<()> {
    if let Some(b) = body {
        ctx.body_seen += b.len() as u64;
        if ctx.body_seen > ctx.body_limit {
            *body = None;
            return Error::e_explain(HTTPStatus(413), "request body over the limit");
        }
    }
    Ok(())
}

/// An HTTP/2 request may end with an empty DATA frame. Pingora 0.9.1 writes an empty final
/// piece to an HTTP/1 upstream as a zero-size chunk and then ends the chunked body again: two
/// terminators, and the upstream reads a second request (a desync; Pingora issue #935). An
/// empty final piece therefore only ends the body. This runs after every plugin, since a
/// plugin may empty a piece too.
pub fn end_body_once(body: &mut Option<Bytes>, end_of_stream: bool) {
    if end_of_stream && body.as_ref().is_some_and(|b| b.is_empty()) {
        *body = None;
    }
}

/// The response head going to the client: the trace header, then the response plugins.
pub fn finish_response_head(req: &RequestHeader, resp: &mut ResponseHeader, ctx: &mut Ctx) {
    let _ = resp.insert_header(ctx.snap.trace.header.clone(), ctx.st.trace.request_id.as_str());
    let chains = ctx.chains();
    for entry in &chains.response {
        entry.plugin.response(req, resp, &mut ctx.st);
    }
}

/// Write a reply of Portico's own, with the same response-phase treatment as upstream replies.
pub async fn send_reply(session: &mut Session, ctx: &mut Ctx, reply: Reply) -> Result<()> {
    let (mut head, body) = respond::render(&reply, &ctx.st, ctx.grpc);
    ctx.error_code = reply.error_code();
    finish_response_head(session.req_header(), &mut head, ctx);
    // A request body we did not read would be parsed as the next request: close instead.
    let unread_body = !session.is_body_empty() && ctx.body_seen == 0;
    if unread_body || reply.status == 413 || reply.status == 400 {
        session.set_keepalive(None);
    }
    let head_only = body.is_empty() || session.req_header().method == Method::HEAD;
    session.write_response_header(Box::new(head), head_only).await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A status and gateway error code for a Pingora error.
fn classify(e: &Error) -> (u16, &'static str, &'static str) {
    if let HTTPStatus(code) = e.etype() {
        return by_status(*code);
    }
    match e.esource() {
        ErrorSource::Upstream => match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => {
                (504, "upstream_timeout", "the upstream did not answer in time")
            }
            _ => (
                502,
                "upstream_unavailable",
                "the upstream could not be reached or failed",
            ),
        },
        ErrorSource::Downstream => match e.etype() {
            ReadError | WriteError | ConnectionClosed => (0, "", ""),
            ReadTimedout => (408, "request_timeout", "the request did not arrive in time"),
            _ => (400, "bad_request", "the request could not be read"),
        },
        ErrorSource::Internal | ErrorSource::Unset => {
            (500, "internal_error", "the gateway failed to handle the request")
        }
    }
}

pub fn by_status(code: u16) -> (u16, &'static str, &'static str) {
    match code {
        400 => (400, "bad_request", "the request is malformed"),
        401 => (401, "unauthorized", "authentication is required"),
        403 => (403, "forbidden", "the request is not allowed"),
        404 => (404, "no_route", "no route matches the request"),
        408 => (408, "request_timeout", "the request did not arrive in time"),
        413 => (413, "payload_too_large", "the request body is too large"),
        429 => (429, "rate_limited", "too many requests"),
        431 => (431, "request_header_too_large", "the request head is too large"),
        502 | 503 => (
            code,
            "upstream_unavailable",
            "the upstream could not be reached or failed",
        ),
        504 => (504, "upstream_timeout", "the upstream did not answer in time"),
        c if c >= 500 => (c, "internal_error", "the gateway failed to handle the request"),
        c => (c, "bad_request", "the request could not be handled"),
    }
}

/// The final error handler: answer with the contract's JSON error if nothing was sent yet.
pub async fn fail(session: &mut Session, e: &Error, ctx: &mut Ctx) -> u16 {
    let (status, code, message) = classify(e);
    if status == 0 {
        return 0;
    }
    if session.response_written().is_some() {
        return status;
    }
    let reply = Reply::error(status, code, message);
    let _ = send_reply(session, ctx, reply).await;
    status
}

/// Once per request: metrics, the log chain, the access log line.
pub fn done(session: &Session, e: Option<&Error>, ctx: &mut Ctx, shared: &Shared) {
    let status = session.response_written().map(|h| h.status.as_u16()).unwrap_or(0);
    let route = if ctx.st.route.is_empty() { "none" } else { &ctx.st.route };
    let upstream = ctx.upstream.as_ref().map(|u| u.name.as_str()).unwrap_or("none");
    crate::metrics::REQUESTS
        .with_label_values(&[route, upstream, &status.to_string()])
        .inc();
    crate::metrics::DURATION
        .with_label_values(&[route])
        .observe(ctx.st.started.elapsed().as_secs_f64());
    for entry in &ctx.chains().log {
        entry.plugin.log(&ctx.st, status);
    }
    if let Some(format) = ctx.snap.access_log {
        let endpoint = ctx
            .endpoint
            .and_then(|i| ctx.upstream.as_ref().map(|u| u.endpoints[i].address.as_str()));
        shared
            .access_log
            .write(format, session, ctx, status, upstream, endpoint, e);
    }
    ctx.in_flight = None;
}
