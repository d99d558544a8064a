//! The layer between Pingora's listeners and the proxy: edge safety for every connection.
//!
//! Pingora reads an HTTP/1 request head itself, before any `ProxyHttp` hook runs, with a 1 MiB
//! ceiling and a 60 s timeout *per read* — a slowloris never reaches a hook, and a 1 MiB head is
//! always read in full. So [`EdgeApp`] runs the HTTP/1 keep-alive loop itself (as Pingora's own
//! `ServerApp` does) and, before each request, reads the head on its own terms:
//!
//! - the whole head must arrive within `limits.header_timeout` (from accept for a connection's
//!   first request, from the first byte for later ones) → 408, then close;
//! - at most `limits.max_request_header_bytes` → 431, then close;
//! - ambiguous framing (CL+TE, repeated or malformed Content-Length, any Transfer-Encoding but
//!   a lone `chunked`, bare CR or LF, NUL, obs-fold, underscore twins of framing headers) → 400;
//! - at most `limits.max_connections_per_ip` connections per client address, held for the
//!   connection's life (Pingora's `ConnectionFilter` sees only the accept, not the close);
//! - at most `limits.keepalive_requests` requests per connection.
//!
//! The bytes read are replayed to Pingora through [`Replay`], so it parses exactly what was
//! checked. HTTP/2 (ALPN or the h2c preface) goes to Pingora's own handling, with its header
//! list bounded by the same limit.
//!
//! [`ProxyService`] wraps Pingora's listening service to know whether each proxy listener is
//! bound and serving: Pingora's service panics if a port cannot be bound and otherwise says
//! nothing, while `/healthz` must tell the truth about the proxy ports.

use crate::config::Snapshot;
use crate::plugin::{Reply, RequestState};
use crate::proxy::Gateway;
use crate::shared::Shared;
use async_trait::async_trait;
use futures::FutureExt;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::HttpProxy;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::listening::Service as Listening;
use pingora::services::{Service as ServiceTrait, ServiceReadyNotifier, ServiceWithDependents};
use std::collections::HashMap;
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// How long shutdown waits for just-accepted connections to send their request.
const FIRST_BYTES_DRAIN: Duration = Duration::from_secs(2);
/// How long an idle keep-alive connection may wait for its next request (Pingora's default).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// More request headers than this → 431.
const MAX_HEADERS: usize = 128;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct EdgeApp {
    proxy: Arc<HttpProxy<Gateway>>,
    shared: Arc<Shared>,
    h2c: bool,
    /// Connections accepted whose first bytes have not arrived yet.
    awaiting_first_bytes: AtomicUsize,
    per_ip: ConnectionCounts,
}

impl EdgeApp {
    pub fn new(proxy: HttpProxy<Gateway>, shared: Arc<Shared>) -> Self {
        let h2c = proxy.server_options.as_ref().is_some_and(|o| o.h2c);
        EdgeApp {
            proxy: Arc::new(proxy),
            shared,
            h2c,
            awaiting_first_bytes: AtomicUsize::new(0),
            per_ip: ConnectionCounts::default(),
        }
    }
}

/// Open connections per client address.
#[derive(Default)]
struct ConnectionCounts(Arc<Mutex<HashMap<IpAddr, u32>>>);

/// One open connection's place in [`ConnectionCounts`], given back on drop.
struct Slot(Arc<Mutex<HashMap<IpAddr, u32>>>, IpAddr);

impl ConnectionCounts {
    fn acquire(&self, ip: IpAddr, max: u32) -> Option<Slot> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.0.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// How reading a request head ended.
enum Head {
    /// A whole, well-framed head is buffered.
    Ready,
    /// The peer closed, or stayed idle (between requests) until a timeout or shutdown.
    Closed,
    /// Answer this and close.
    Refuse(Reply),
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let accepted = Instant::now();
        let snap = self.shared.snapshot();
        let peer = stream.get_socket_digest().and_then(|d| {
            d.peer_addr()
                .and_then(|a| a.as_inet())
                .map(|a| crate::config::canonical_ip(a.ip()))
        });
        let _slot = match peer {
            Some(ip) => match self.per_ip.acquire(ip, snap.limits.max_connections_per_ip) {
                Some(slot) => Some(slot),
                None => {
                    crate::metrics::REJECTED_CONNECTIONS
                        .with_label_values(&["per_ip_limit"])
                        .inc();
                    return None;
                }
            },
            None => None,
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let mut conn = Replay::new(stream);
        // The first bytes decide between HTTP/1 and the h2c preface.
        self.awaiting_first_bytes.fetch_add(1, Ordering::AcqRel);
        let deadline = accepted + snap.limits.header_timeout;
        let first = conn.fill_until(deadline, |buf| !buf.is_empty()).await;
        self.awaiting_first_bytes.fetch_sub(1, Ordering::AcqRel);
        match first {
            Ok(true) => {}
            Ok(false) => return None,
            Err(_) => {
                crate::metrics::REJECTED_CONNECTIONS
                    .with_label_values(&["header_timeout"])
                    .inc();
                return None;
            }
        }
        if self.h2c {
            let decided = conn
                .fill_until(deadline, |b| b.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(b))
                .await;
            if decided.is_ok_and(|open| open) && conn.prefix.starts_with(H2_PREFACE) {
                return ServerApp::process_new(&self.proxy, Box::new(conn), shutdown).await;
            }
        }
        self.serve_http1(conn, accepted, shutdown).await
    }

    async fn cleanup(&self) {
        let end = Instant::now() + FIRST_BYTES_DRAIN;
        while self.awaiting_first_bytes.load(Ordering::Acquire) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ServerApp::cleanup(&*self.proxy).await;
    }
}

impl EdgeApp {
    /// The HTTP/1 keep-alive loop (as Pingora's own), with each head read and checked first.
    async fn serve_http1(
        self: &Arc<Self>,
        mut conn: Replay,
        accepted: Instant,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut served: u32 = 0;
        loop {
            let snap = self.shared.snapshot();
            let limits = &snap.limits;
            let head = if served == 0 {
                read_head(&mut conn, accepted + limits.header_timeout, &snap).await
            } else {
                // Between requests: idle until the next one starts (or shutdown), then the
                // head must be complete within header_timeout of its first byte.
                let idle = if conn.prefix.is_empty() {
                    let mut down = shutdown.clone();
                    tokio::select! {
                        r = conn.fill_until(Instant::now() + KEEPALIVE_IDLE, |b| !b.is_empty()) => r,
                        _ = down.wait_for(|s| *s) => Ok(false),
                    }
                } else {
                    Ok(true)
                };
                match idle {
                    Ok(true) => read_head(&mut conn, Instant::now() + limits.header_timeout, &snap).await,
                    _ => Head::Closed,
                }
            };
            match head {
                Head::Ready => {}
                Head::Closed => return None,
                Head::Refuse(reply) => {
                    refuse(&mut conn, reply, &snap, &self.shared).await;
                    return None;
                }
            }
            let mut session = ServerSession::new_http1(Box::new(conn));
            session.set_keepalive(if *shutdown.borrow() {
                None
            } else {
                Some(KEEPALIVE_IDLE.as_secs())
            });
            match settings.take() {
                Some(s) => s.apply_to_session(&mut session),
                // Reuses left after this request: the connection serves `keepalive_requests`.
                None => session.set_keepalive_reuses_remaining(Some(limits.keepalive_requests.saturating_sub(1))),
            }
            let reused = self.proxy.process_new_http(session, shutdown).await?;
            let (stream, next) = reused.consume();
            settings = next;
            conn = *stream.into_any().downcast::<Replay>().ok()?;
            served += 1;
        }
    }
}

/// Read until a whole head is buffered, within `deadline` and the size limit; then check its
/// framing.
async fn read_head(conn: &mut Replay, deadline: Instant, snap: &Snapshot) -> Head {
    let max = snap.limits.max_request_header_bytes;
    let mut scanned: usize = 0;
    let mut end = None;
    let filled = conn
        .fill_until(deadline, |b| {
            // Search only what is new (keeping 3 bytes of overlap for a split "\r\n\r\n"). A
            // head ended by bare LFs is found too, so that it is refused rather than waited on.
            let from = scanned.saturating_sub(3);
            end = b[from..].windows(2).enumerate().find_map(|(i, w)| match w {
                b"\n\n" => Some(from + i + 2),
                b"\n\r" if b.get(from + i + 2) == Some(&b'\n') => Some(from + i + 3),
                _ => None,
            });
            scanned = b.len();
            end.is_some() || b.len() > max
        })
        .await;
    match filled {
        Err(_) => {
            crate::metrics::REJECTED_CONNECTIONS
                .with_label_values(&["header_timeout"])
                .inc();
            Head::Refuse(Reply::error(
                408,
                "request_timeout",
                "the request head did not arrive in time",
            ))
        }
        Ok(false) => Head::Closed,
        Ok(true) => match end {
            Some(n) if n <= max => match check_framing(&conn.prefix[..n]) {
                Ok(()) => Head::Ready,
                Err(reply) => Head::Refuse(reply),
            },
            _ => Head::Refuse(Reply::error(
                431,
                "request_header_too_large",
                format!("the request head is larger than {max} bytes"),
            )),
        },
    }
}

fn bad(message: &str) -> Reply {
    Reply::error(400, "bad_request", message)
}

/// Portico's verdict on HTTP/1 framing: anything a server and an upstream could read two ways
/// is refused (the stricter, Envoy-like choice), so the upstream never sees a request the client
/// did not send.
pub fn check_framing(head: &[u8]) -> Result<(), Reply> {
    for (i, &b) in head.iter().enumerate() {
        match b {
            0 => return Err(bad("NUL in the request head")),
            b'\r' if head.get(i + 1) != Some(&b'\n') => return Err(bad("a bare CR in the request head")),
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Err(bad("a bare LF in the request head")),
            b'\n' if matches!(head.get(i + 1), Some(b' ' | b'\t')) => {
                return Err(bad("obsolete line folding in the request head"))
            }
            _ => {}
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("the request head is incomplete")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reply::error(
                431,
                "request_header_too_large",
                format!("the request has more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Err(bad(&format!("the request head is malformed ({e})"))),
    }
    let mut lengths = Vec::new();
    let mut encodings = Vec::new();
    let mut hosts = 0;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "content-length" => lengths.push(h.value),
            "transfer-encoding" => encodings.push(h.value),
            "host" => hosts += 1,
            "content_length" | "transfer_encoding" | "host_" => {
                return Err(bad("an underscore variant of a framing header"))
            }
            _ => {}
        }
    }
    if hosts > 1 {
        return Err(bad("more than one Host header"));
    }
    // An absolute-form target names its own authority: it must be the Host.
    if let Some(rest) = req
        .path
        .and_then(|p| p.strip_prefix("http://").or_else(|| p.strip_prefix("https://")))
    {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .map(|h| h.value);
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_bytes())) {
            return Err(bad("the request target's authority and the Host header disagree"));
        }
    }
    if !lengths.is_empty() && !encodings.is_empty() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    if lengths.len() > 1 {
        return Err(bad("more than one Content-Length"));
    }
    if let Some(v) = lengths.first() {
        if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return Err(bad("a malformed Content-Length"));
        }
    }
    if encodings.len() > 1 {
        return Err(bad("more than one Transfer-Encoding"));
    }
    if let Some(v) = encodings.first() {
        if req.version == Some(0) {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !v.eq_ignore_ascii_case(b"chunked") {
            return Err(bad("a Transfer-Encoding other than a lone 'chunked'"));
        }
    }
    Ok(())
}

/// Answer a refused head with the contract's JSON error (global response plugins applied),
/// log and count it, and close.
async fn refuse(conn: &mut Replay, reply: Reply, snap: &Snapshot, shared: &Shared) {
    let mut st = RequestState::new(
        conn.get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
    );
    st.trace = snap.trace.ids_for(&http::HeaderMap::new());
    let (mut head, body) = crate::respond::render(&reply, &st, false);
    let _ = head.insert_header(snap.trace.header.clone(), st.trace.request_id.as_str());
    let _ = head.insert_header(http::header::CONNECTION, "close");
    let req = pingora::http::RequestHeader::build("GET", b"/", None).expect("a request head");
    for entry in &snap.global.response {
        entry.plugin.response(&req, &mut head, &mut st);
    }
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        head.status.as_u16(),
        head.status.canonical_reason().unwrap_or("Error")
    )
    .into_bytes();
    for (k, v) in head.headers.iter() {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = conn.write_all(&out).await;
        let _ = conn.flush().await;
    })
    .await;
    crate::metrics::REQUESTS
        .with_label_values(&["none", "none", &reply.status.to_string()])
        .inc();
    if snap.access_log.is_some() {
        shared.access_log.write_line(
            serde_json::json!({
                "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                "trace_id": st.trace.request_id,
                "client_ip": st.client_ip.to_string(),
                "status": reply.status,
                "route": "",
                "error": reply.error_code(),
            })
            .to_string(),
        );
    }
    // Read (and drop) what the client still sends for a moment, so it sees the answer rather
    // than a reset.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Shutdown::shutdown(conn).await;
}

/// A connection whose already-read bytes are replayed before the socket's own.
#[derive(Debug)]
pub struct Replay {
    inner: Stream,
    prefix: Vec<u8>,
}

impl Replay {
    fn new(inner: Stream) -> Self {
        Replay {
            inner,
            prefix: Vec::new(),
        }
    }

    /// Read more into the buffer until `done(buffer)`, the peer closes (`Ok(false)`) or the
    /// deadline passes (`Err`). Returns at once if the buffer already satisfies `done`.
    async fn fill_until(&mut self, deadline: Instant, mut done: impl FnMut(&[u8]) -> bool) -> Result<bool, ()> {
        let mut chunk = [0u8; 4096];
        loop {
            if done(&self.prefix) {
                return Ok(true);
            }
            match tokio::time::timeout_at(deadline, self.inner.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(false),
                Ok(Ok(n)) => self.prefix.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Replay {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Replay {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Replay {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Replay {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Replay {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Replay {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, d: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(d)
    }
}

#[async_trait]
impl Peek for Replay {
    /// Peeks from the replayed bytes, reading more from the socket if needed.
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let want = buf.len();
        let far = Instant::now() + Duration::from_secs(3600);
        match self.fill_until(far, |b| b.len() >= want).await {
            Ok(true) => {
                buf.copy_from_slice(&self.prefix[..want]);
                Ok(true)
            }
            _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// A listening service for proxy listeners that reports their state to `/healthz`.
pub struct ProxyService {
    inner: Option<Listening<EdgeApp>>,
    name: String,
    addresses: Vec<String>,
    shared: Arc<Shared>,
}

impl ProxyService {
    pub fn new(inner: Listening<EdgeApp>, addresses: Vec<String>, shared: Arc<Shared>) -> Self {
        ProxyService {
            name: ServiceTrait::name(&inner).to_string(),
            inner: Some(inner),
            addresses,
            shared,
        }
    }
}

#[async_trait]
impl ServiceWithDependents for ProxyService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        ready_notifier.notify_ready();
        let Some(mut inner) = self.inner.take() else { return };
        let states = &self.shared.listeners;
        for a in &self.addresses {
            states.set_serving(a, true);
        }
        // A listener is bound once its socket is in the table Pingora hands to a new process
        // on upgrade: that is the moment `accept` can succeed.
        let watcher = fds.clone().map(|fds| {
            let (shared, addresses) = (self.shared.clone(), self.addresses.clone());
            tokio::spawn(async move {
                loop {
                    let missing = {
                        let table = fds.lock();
                        addresses.iter().filter(|a| table.get(a).is_none()).count()
                    };
                    if missing == 0 {
                        for a in &addresses {
                            shared.listeners.set_bound(a, true);
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        });
        let run = ServiceTrait::start_service(&mut inner, fds, shutdown, listeners_per_fd);
        let result = AssertUnwindSafe(run).catch_unwind().await;
        if let Some(w) = watcher {
            w.abort();
        }
        for a in &self.addresses {
            states.set_serving(a, false);
        }
        if result.is_err() {
            log::error!(
                "proxy listener(s) {} stopped: the service failed (is the port in use, or a certificate unreadable?)",
                self.addresses.join(", ")
            );
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        self.inner.as_ref().and_then(ServiceTrait::threads)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.addresses.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(head: &str) -> u16 {
        check_framing(head.as_bytes()).err().map(|r| r.status).unwrap_or(200)
    }

    #[test]
    fn framing_verdicts() {
        assert_eq!(verdict("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(verdict("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"), 200);
        assert_eq!(
            verdict("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            200
        );
        for bad in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\ncontent_length: 5\r\n\r\n",
        ] {
            assert_eq!(verdict(bad), 400, "{bad:?}");
        }
        let many: String = (0..200).map(|i| format!("x-{i}: y\r\n")).collect();
        assert_eq!(verdict(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")), 431);
    }
}
