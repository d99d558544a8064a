//! The upstream client: requests a plugin sends to a named upstream of the request's own
//! config (aggregation, mirroring, the mesh) go through the same balancing, endpoint health,
//! passive ejection, timeouts, connect-failure retries and keep-alive pools as proxied traffic,
//! and carry the request's trace (a `traceparent` with a child span id, and the trace header).
//!
//! One client per process, over Pingora's own connector and its connection pool. Concurrent
//! calls to one endpoint are capped at the pool's size, so a burst queues for a connection
//! instead of opening one per call.

use crate::plugin::RequestState;
use crate::upstream::{FailureKind, RetryCause, Upstream};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// A request to send to an upstream.
#[derive(Debug, Clone)]
pub struct SubRequest {
    pub method: Method,
    /// Path and query, e.g. `/users/7?full=1`.
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// A bound on the whole exchange, on top of the upstream's own timeouts.
    pub timeout: Option<Duration>,
    /// Answers with a larger body are refused ([`SubError::TooLarge`]) without reading further.
    pub max_body: usize,
}

impl SubRequest {
    pub fn get(path: impl Into<String>) -> Self {
        SubRequest {
            method: Method::GET,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: None,
            max_body: 1 << 20,
        }
    }
}

/// An upstream's answer.
#[derive(Debug, Clone)]
pub struct SubResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The endpoint that answered, as written in the config.
    pub endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubError {
    /// No upstream of that name in the request's config.
    NoUpstream(String),
    /// Every attempt failed to connect or was cut.
    Unavailable(String),
    /// The exchange took longer than its timeout.
    Timeout,
    /// The answer's body was larger than `max_body`.
    TooLarge,
}

impl std::fmt::Display for SubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubError::NoUpstream(u) => write!(f, "no upstream named '{u}'"),
            SubError::Unavailable(why) => write!(f, "the upstream could not be reached: {why}"),
            SubError::Timeout => write!(f, "the upstream did not answer in time"),
            SubError::TooLarge => write!(f, "the upstream's answer is too large"),
        }
    }
}

pub struct UpstreamClient {
    /// Made on first use, after the first config set the pool size.
    connector: std::sync::OnceLock<Connector>,
    pool_size: std::sync::atomic::AtomicUsize,
    /// Calls in flight per endpoint, capped at the pool size.
    slots: Mutex<HashMap<SocketAddr, Arc<Semaphore>>>,
}

/// One attempt's failure, and whether another endpoint may be tried.
struct Failed {
    why: String,
    /// Nothing reached the upstream (connect failure): any method may be retried.
    before_sending: bool,
    timeout: bool,
}

impl UpstreamClient {
    pub fn new(pool_size: usize) -> Self {
        UpstreamClient {
            connector: std::sync::OnceLock::new(),
            pool_size: std::sync::atomic::AtomicUsize::new(pool_size.max(1)),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The keep-alive pool's size (`server.upstream_keepalive_pool_size`); applies if set
    /// before the first call.
    pub fn set_pool_size(&self, n: usize) {
        self.pool_size.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn pool_size(&self) -> usize {
        self.pool_size.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn connector(&self) -> &Connector {
        self.connector
            .get_or_init(|| Connector::new(Some(ConnectorOptions::new(self.pool_size()))))
    }

    fn slot(&self, addr: SocketAddr) -> Arc<Semaphore> {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(addr)
            .or_insert_with(|| Arc::new(Semaphore::new(self.pool_size())))
            .clone()
    }

    /// Send `req` to upstream `name` of the request's config, on behalf of the request `st`.
    pub async fn send(&self, st: &RequestState, name: &str, req: SubRequest) -> Result<SubResponse, SubError> {
        let up = st
            .snapshot
            .as_ref()
            .and_then(|s| s.upstreams.get(name))
            .cloned()
            .ok_or_else(|| SubError::NoUpstream(name.to_string()))?;
        match req.timeout {
            Some(t) => tokio::time::timeout(t, self.attempts(st, &up, &req))
                .await
                .unwrap_or(Err(SubError::Timeout)),
            None => self.attempts(st, &up, &req).await,
        }
    }

    /// The attempts of one call, by the upstream's retry policy (as for proxied requests:
    /// another endpoint while one is left, idempotent methods only once bytes were sent,
    /// within the retry budget).
    async fn attempts(&self, st: &RequestState, up: &Upstream, req: &SubRequest) -> Result<SubResponse, SubError> {
        let mut tried = Vec::new();
        let replayable = req.method.is_idempotent();
        up.retries.count_request();
        let mut made = 0;
        loop {
            made += 1;
            let Some(i) = up.select(None, &tried).or_else(|| up.select(None, &[])) else {
                return Err(SubError::Unavailable("the upstream has no endpoint".into()));
            };
            if !tried.contains(&i) {
                tried.push(i);
            }
            let (cause, err) = match self.once(st, up, i, req).await {
                Ok(r) => {
                    let cause = RetryCause::Status(r.status);
                    if up.retries.allows(made, cause, replayable) {
                        continue;
                    }
                    return Ok(r);
                }
                Err(Ok(f)) => {
                    let kind = if f.before_sending {
                        FailureKind::Connect
                    } else {
                        FailureKind::Exchange
                    };
                    up.record_failure(i, kind);
                    let cause = match (f.before_sending, f.timeout) {
                        (true, true) => RetryCause::ConnectTimeout,
                        (true, false) => RetryCause::ConnectFailure,
                        (false, true) => RetryCause::Timeout,
                        (false, false) => RetryCause::Reset,
                    };
                    let err = if f.timeout {
                        SubError::Timeout
                    } else {
                        SubError::Unavailable(f.why)
                    };
                    (cause, err)
                }
                Err(Err(e)) => return Err(e),
            };
            if !up.retries.allows(made, cause, replayable) {
                return Err(err);
            }
        }
    }

    /// One attempt on endpoint `i`.
    async fn once(
        &self,
        st: &RequestState,
        up: &Upstream,
        i: usize,
        req: &SubRequest,
    ) -> Result<SubResponse, Result<Failed, SubError>> {
        let endpoint = &up.endpoints[i];
        let _slot = self
            .slot(endpoint.addr())
            .acquire_owned()
            .await
            .map_err(|_| Ok(failed("the client is closing", true, false)))?;
        let _in_flight = up.in_flight_guard(i);
        let peer = up.peer(i, &up.timeouts);
        // A pooled connection the upstream closed meanwhile is not the endpoint's fault: try a
        // fresh one on the same endpoint once.
        for fresh_try in [false, true] {
            let (mut session, reused) = self.connector().get_http_session(&*peer).await.map_err(|e| {
                let timeout = matches!(e.etype(), pingora::ErrorType::ConnectTimedout);
                Ok(failed(&e.to_string(), true, timeout))
            })?;
            session.set_read_timeout(Some(up.timeouts.read));
            session.set_write_timeout(Some(up.timeouts.write));
            let head = self.head(st, up, i, req);
            let sent = async {
                session.write_request_header(Box::new(head)).await?;
                if !req.body.is_empty() {
                    session.write_request_body(req.body.clone(), false).await?;
                }
                session.finish_request_body().await?;
                session.read_response_header().await
            }
            .await;
            if let Err(e) = sent {
                if reused && !fresh_try {
                    continue;
                }
                let timeout = matches!(
                    e.etype(),
                    pingora::ErrorType::ReadTimedout | pingora::ErrorType::WriteTimedout
                );
                return Err(Ok(failed(&e.to_string(), false, timeout)));
            }
            let Some(resp) = session.response_header().cloned() else {
                return Err(Ok(failed("no response head", false, false)));
            };
            let mut body = Vec::new();
            loop {
                match session.read_response_body().await {
                    Ok(Some(piece)) => {
                        if body.len() + piece.len() > req.max_body {
                            return Err(Err(SubError::TooLarge));
                        }
                        body.extend_from_slice(&piece);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let timeout = matches!(e.etype(), pingora::ErrorType::ReadTimedout);
                        return Err(Ok(failed(&e.to_string(), false, timeout)));
                    }
                }
            }
            let status = resp.status.as_u16();
            if (502..=504).contains(&status) {
                up.record_failure(i, FailureKind::Exchange);
            } else {
                up.record_success(i);
            }
            if session.response_done() {
                self.connector()
                    .release_http_session(session, &*peer, Some(up.timeouts.idle))
                    .await;
            }
            return Ok(SubResponse {
                status,
                headers: resp.headers.clone(),
                body: Bytes::from(body),
                endpoint: endpoint.address.clone(),
            });
        }
        Err(Ok(failed("the connection was closed", false, false)))
    }

    /// The head sent upstream: the caller's headers, Host as proxied requests get it, the trace.
    fn head(&self, st: &RequestState, up: &Upstream, i: usize, req: &SubRequest) -> RequestHeader {
        let mut head = RequestHeader::build(req.method.clone(), req.path.as_bytes(), Some(req.headers.len() + 5))
            .unwrap_or_else(|_| RequestHeader::build("GET", b"/", None).expect("a request head"));
        for (k, v) in &req.headers {
            let _ = head.append_header(k.clone(), v.clone());
        }
        let host = up.host.as_deref().unwrap_or(&up.endpoints[i].address);
        let _ = head.insert_header(http::header::HOST, host);
        // A child span of the request's own: same trace id, a new span id.
        let mut child = st.trace.clone();
        child.span_id = crate::trace::new_span_id();
        let _ = head.insert_header("traceparent", child.traceparent());
        if let Some(snap) = &st.snapshot {
            let _ = head.insert_header(&snap.trace.header, st.trace.request_id.as_str());
        }
        if !req.body.is_empty()
            || !matches!(
                req.method,
                Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
            )
        {
            let _ = head.insert_header(http::header::CONTENT_LENGTH, req.body.len().to_string());
        }
        head
    }
}

fn failed(why: &str, before_sending: bool, timeout: bool) -> Failed {
    Failed {
        why: why.to_string(),
        before_sending,
        timeout,
    }
}
