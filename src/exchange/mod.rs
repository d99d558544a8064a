//! The steps of one request through the gateway, called from the thin hooks in `proxy.rs`:
//!
//! - here: the per-request state ([`Ctx`]), the first phase (trace ids, client address, host
//!   and path checks, routing) and the choice of upstream;
//! - `upstream.rs`: the endpoint of each attempt, retries, and the head sent upstream;
//! - `body.rs`: the request body (limits, body plugins, framing);
//! - `reply.rs`: replies Portico writes itself, and the final error handler;
//! - `done.rs`: the end of a request — its outcome, metrics, the log chain, the access log.

mod body;
mod done;
mod location;
mod reply;
mod upstream;

pub use body::{answer_expect_continue, end_body_once, read_small_body, request_body};
pub use done::done;
pub use reply::{by_status, client_framing, fail, finish_response_head, send_reply, trailers_arrived};
pub use upstream::{
    connect_failed, past_deadline, pick_peer, prepare_upstream_request, proxy_failed, upgraded, upstream_answered,
};

use crate::config::{canonical_ip, Route, Snapshot};
use crate::plugin::{Chains, Failure, Reply, RequestState};
use crate::respond;
use crate::route::{normalize_host, normalize_path, RequestKey};
use crate::upstream::{InFlight, Upstream};
use http::header::{CONNECTION, CONTENT_LENGTH, COOKIE, HOST, UPGRADE};
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
    /// Attempts made so far (a stale pooled connection's retry not counted).
    pub attempts: u32,
    /// The upstream's answer was turned into an error to retry it (`retries.on: [503]`).
    status_retry: bool,
    /// The upstream's read timed out while the client still owed body bytes: the client's stall,
    /// not the upstream's fault (`upstream::proxy_failed`).
    client_stalled: bool,
    /// Retry the same endpoint (a stale pooled connection, not the endpoint's fault).
    retry_same: bool,
    in_flight: Option<InFlight>,
    /// Path and query for the upstream: normalised and rewritten.
    upstream_path: Option<String>,
    body_limit: u64,
    body_seen: u64,
    /// For a gRPC (or gRPC-web) request, the content type its gRPC-shaped errors carry.
    pub grpc: Option<String>,
    /// A gRPC call's deadline (its `grpc-timeout`): the upstream call ends by then.
    pub deadline: Option<std::time::Instant>,
    /// The gateway error code of the response, if Portico wrote one.
    pub error_code: Option<&'static str>,
    /// The answer's last body bytes have passed the response filters (on their way out).
    pub(crate) response_ended: bool,
    /// The TCP peer (may be a trusted proxy rather than the client).
    pub peer_ip: IpAddr,
    /// How the request body reaches the upstream (see `body.rs`).
    pub(crate) body: body::BodyMode,
    /// How much of the body this attempt and earlier ones carried (retries replay it).
    pub(crate) body_pos: body::Replay,
    /// A reply a body plugin asked for after the upstream exchange began (written by `fail`).
    pub(crate) pending_reply: Option<Reply>,
    /// The upstream's own status, once one answered.
    pub upstream_status: Option<u16>,
    /// Why the exchange with the upstream failed, if it did.
    pub failure: Option<Failure>,
    /// The gRPC status of the answer (trailers, a trailers-only head, or Portico's own).
    pub grpc_status: Option<u32>,
    /// What the first phase decided (routing runs before Pingora's modules see the request, so
    /// compression can be negotiated per route); the request phase acts on it.
    pub(crate) early: Option<Result<(), Reply>>,
    /// The route's compression policy and the algorithm chosen for this request.
    pub(crate) compression: Option<(Arc<crate::compression::Policy>, Option<crate::compression::Chosen>)>,
    /// Turns true when the process starts draining (see [`crate::shared::Shared::start_draining`]).
    pub drain: Option<tokio::sync::watch::Receiver<bool>>,
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
        let mut st = RequestState::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        st.snapshot = Some(snap.clone());
        Ctx {
            snap,
            st,
            route: None,
            upstream: None,
            endpoint: None,
            tried: Vec::new(),
            attempts: 0,
            status_retry: false,
            client_stalled: false,
            retry_same: false,
            in_flight: None,
            upstream_path: None,
            body_limit: u64::MAX,
            body_seen: 0,
            grpc: None,
            deadline: None,
            error_code: None,
            response_ended: false,
            peer_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            body: body::BodyMode::Plain,
            body_pos: body::Replay::default(),
            pending_reply: None,
            upstream_status: None,
            failure: None,
            grpc_status: None,
            early: None,
            compression: None,
            drain: None,
        }
    }

    pub fn chains(&self) -> ChainsRef {
        ChainsRef(self.route.clone().ok_or_else(|| self.snap.clone()))
    }
}

fn bad_request(message: impl Into<String>) -> Reply {
    Reply::error(400, "bad_request", message)
}

/// The authority the request target names: HTTP/2's `:authority`, or an HTTP/1 absolute-form
/// target's (which Pingora keeps only in the raw target: its `uri` holds the path alone).
pub(crate) fn target_authority(req: &RequestHeader) -> Option<&str> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str());
    }
    let raw = std::str::from_utf8(req.raw_path()).ok()?;
    let scheme = raw.find("://").filter(|&i| {
        let s = &raw[..i];
        s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https")
    })?;
    let rest = &raw[scheme + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|a| !a.is_empty())
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
    match (target_authority(req), header) {
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

/// HTTP/2 clients send each cookie as a header field of its own (RFC 9113 §8.2.3); an HTTP/1
/// server folds repeated headers with "," (gunicorn: `a=1,b=2` is one cookie). They become one
/// `Cookie` header joined with "; ", as the RFC asks before passing them to HTTP/1 — and as
/// plugins then see them.
fn one_cookie_header(req: &mut RequestHeader) {
    let mut values = req.headers.get_all(COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in req.headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        let _ = req.insert_header(COOKIE, v);
    }
}

/// An `Upgrade` that `Connection` does not name is not an upgrade request (RFC 9110 §7.8): it
/// is dropped, and the request goes upstream as an ordinary one. (Pingora would take any
/// `Upgrade` for one, tunnel the connection after a 101, and let the bytes that follow skip
/// routing and plugins — the shape of "WebSocket smuggling" behind a front proxy that did not
/// see an upgrade.)
fn drop_unannounced_upgrade(req: &mut RequestHeader) {
    if !req.headers.contains_key(UPGRADE) {
        return;
    }
    let announced = req
        .headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    if !announced {
        req.remove_header(&UPGRADE);
    }
}

/// An HTTP/1 upgrade request answered with anything but 101: the client may already have sent
/// bytes of the new protocol (WebSocket frames) behind it, which must never be read as the next
/// HTTP request; so the connection closes after this answer, and the answer says so.
pub(crate) fn close_after_refused_upgrade(session: &mut Session, status: u16) {
    let req = session.req_header();
    if status != 101 && req.version != http::Version::HTTP_2 && req.headers.contains_key(UPGRADE) {
        session.set_keepalive(None);
    }
}

pub(crate) fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// First phase: trace ids, client address, host and path checks, routing, declared body size.
pub fn begin(session: &mut Session, ctx: &mut Ctx) -> Result<(), Reply> {
    let snap = ctx.snap.clone();
    let req = session.req_header();
    ctx.st.trace = snap.trace.ids_for(&req.headers);
    ctx.grpc = respond::grpc_content_type(req);
    if ctx.grpc.is_some() {
        ctx.deadline = crate::grpc::timeout(&req.headers).map(|t| std::time::Instant::now() + t);
    }
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    ctx.peer_ip = canonical_ip(peer);
    ctx.st.client_ip = snap.client_ip.resolve(peer, &req.headers);
    let ssl = session.digest().and_then(|d| d.ssl_digest.as_ref());
    ctx.st.tls = ssl.is_some();
    // The service the verified client certificate names (mTLS): `allow_services` reads it.
    ctx.st.identity = ssl
        .and_then(|d| crate::tls::identity_of(d))
        .map(|id| id.principal().to_string());
    // HTTP/1 body reads: no progress for this long → 408 (HTTP/2 bodies: the edge's frame watch).
    session.set_read_timeout(Some(snap.limits.body_timeout));
    // Response writes that make no progress for this long (an HTTP/2 window the client never
    // opens) end the request, and free the upstream connection. HTTP/1 writes go through the
    // edge's socket, which cuts a client that reads nothing after the same time: a second
    // timer on each write would only cost a timer registration per write.
    if session.is_http2() {
        session.set_write_timeout(Some(snap.limits.send_timeout));
    }

    // HTTP/1 heads are held to this count by the edge layer; HTTP/2 ones here (the h2 crate
    // bounds their size, not their count), so an upstream never gets more than HTTP/1 allows.
    if session.is_http2() && session.req_header().headers.len() > crate::edge::MAX_HEADERS {
        return Err(Reply::error(
            431,
            "request_header_too_large",
            format!("the request has more than {} headers", crate::edge::MAX_HEADERS),
        ));
    }
    one_content_length(session.req_header_mut())?;
    one_cookie_header(session.req_header_mut());
    drop_unannounced_upgrade(session.req_header_mut());
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
    // A CORS preflight asks about another method: it is routed as that method would be, so the
    // cors plugin of the route the real request will reach answers it (a route without a
    // method list further down would otherwise take it). Only when no route takes that method
    // is it routed as the OPTIONS request it is.
    let asked = (req.method == Method::OPTIONS && req.headers.contains_key(http::header::ORIGIN))
        .then(|| req.headers.get("access-control-request-method"))
        .flatten()
        .and_then(|v| Method::from_bytes(v.as_bytes()).ok());
    let mut route = asked.and_then(|m| {
        let key = RequestKey { method: &m, ..key };
        snap.find_route(&key, &mut params).cloned()
    });
    if route.is_none() {
        route = snap.find_route(&key, &mut params).cloned();
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

pub(crate) fn too_large(limit: u64) -> Reply {
    Reply::error(
        413,
        "payload_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// The first phase, before Pingora's downstream modules see the request: [`begin`], then the
/// compression negotiation for the route. What `begin` decided is kept for the request phase.
pub fn early(session: &mut Session, ctx: &mut Ctx) {
    let step = begin(session, ctx);
    let policy = match &ctx.route {
        Some(r) => r.compression.clone(),
        None => ctx.snap.compression.clone(),
    };
    if let Some(policy) = policy {
        let chosen = crate::compression::negotiate(session, &policy);
        ctx.compression = Some((policy, chosen));
    }
    ctx.early = Some(step);
}

/// An upstream's response head: its redirects mapped back to the client's terms.
pub fn upstream_head(req: &RequestHeader, resp: &mut ResponseHeader, ctx: &Ctx) {
    location::rewrite_locations(req, resp, ctx);
}

/// A response head on its way to the client: compress it or not (before the module sees it).
pub fn compress_or_not(session: &mut Session, resp: &mut ResponseHeader, ctx: &Ctx) {
    if let Some((policy, chosen)) = &ctx.compression {
        crate::compression::decide(session, resp, policy, *chosen);
    }
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
    // None when the request's own origin-form target is already what the upstream gets (no
    // rewrite, nothing normalised): no second parse of the same URI. (An absolute-form target
    // is always rewritten to origin-form.)
    let req = session.req_header();
    let unchanged = req
        .raw_path()
        .strip_prefix(path.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'?');
    ctx.upstream_path = (!unchanged).then(|| match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    });
    Ok(())
}
