//! The layer between Pingora's listeners and the proxy: edge safety for every connection.
//!
//! Pingora reads an HTTP/1 request head itself, before any `ProxyHttp` hook runs, with a 1 MiB
//! ceiling and a 60 s timeout *per read* — a slowloris never reaches a hook, and a 1 MiB head is
//! always read in full. So [`EdgeApp`] runs the HTTP/1 keep-alive loop itself (as Pingora's own
//! `ServerApp` does) and, before each request, reads the head on its own terms (`head.rs`):
//!
//! - the whole head must arrive within `limits.header_timeout` (from accept for a connection's
//!   first request, from the first byte for later ones) → 408, then close;
//! - at most `limits.max_request_header_bytes` → 431, then close;
//! - ambiguous framing (CL+TE, repeated or malformed Content-Length, any Transfer-Encoding but
//!   a lone `chunked`, bare CR or LF, NUL, obs-fold, underscore twins of framing headers) → 400;
//! - at most `limits.max_connections_per_ip` connections per client address, held for the
//!   connection's life (`per_ip.rs`);
//! - at most `limits.keepalive_requests` requests per connection.
//!
//! On TLS listeners the edge layer also does the TLS handshake (`tls.rs`), under
//! `limits.header_timeout` from accept, so every limit above applies to the decrypted stream.
//!
//! The bytes read are replayed to Pingora through [`EdgeStream`], so it parses exactly what was
//! checked. HTTP/2 (ALPN or the h2c preface) goes to Pingora's own handling, with its header
//! list bounded by the same limit and its frames watched for the same deadlines (`h2_watch.rs`).
//! Request bodies are timed by `limits.body_timeout` (HTTP/1: Pingora's read timeout, set per
//! request by the proxy; HTTP/2: the frame watch). Writes to a client that reads nothing are
//! cut after `limits.send_timeout` (the socket: `EdgeStream`; an HTTP/2 stream whose window
//! stays shut: Pingora's write timeout, set per request by the proxy).

mod framing;
mod h2_watch;
mod head;
mod per_ip;
mod refuse;
mod stream;
mod tls;

pub use framing::framing_error;
pub use h2_watch::body_timed_out as h2_body_timed_out;
pub use head::{check_framing, MAX_HEADERS};
pub use stream::EdgeStream;
pub use tls::{TlsListener, TlsListeners};

use crate::proxy::Gateway;
use crate::shared::Shared;
use async_trait::async_trait;
use head::{read_head, Head};
use per_ip::ConnectionCounts;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long shutdown waits for just-accepted connections to send their request.
const FIRST_BYTES_DRAIN: Duration = Duration::from_secs(2);
/// How long an idle keep-alive connection may wait for its next request (Pingora's default).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Once draining starts, how long an idle keep-alive connection stays open for a request that
/// may already be on its way (closing at once races a client that just sent one).
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

pub struct EdgeApp {
    proxy: Arc<HttpProxy<Gateway>>,
    shared: Arc<Shared>,
    h2c: bool,
    /// Connections accepted whose first bytes have not arrived yet.
    awaiting_first_bytes: AtomicUsize,
    per_ip: ConnectionCounts,
    /// TLS listeners of this service (empty: plain TCP only).
    tls: TlsListeners,
}

impl EdgeApp {
    pub fn new(proxy: HttpProxy<Gateway>, shared: Arc<Shared>) -> Self {
        Self::with_tls(proxy, shared, TlsListeners::default())
    }

    /// An edge for TLS listeners (given to Pingora as plain TCP): the edge does the handshake.
    pub fn with_tls(proxy: HttpProxy<Gateway>, shared: Arc<Shared>, tls: TlsListeners) -> Self {
        let h2c = proxy.server_options.as_ref().is_some_and(|o| o.h2c);
        EdgeApp {
            proxy: Arc::new(proxy),
            shared,
            h2c,
            awaiting_first_bytes: AtomicUsize::new(0),
            per_ip: ConnectionCounts::default(),
            tls,
        }
    }

    /// The TLS handshake of a connection accepted on a TLS listener, within `deadline`; `None`
    /// closes the connection (counted by reason).
    async fn handshake(&self, stream: Stream, deadline: Instant) -> Option<Stream> {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let Some(listener) = local.and_then(|a| self.tls.find(a)) else {
            log::error!("a connection on {local:?} matches no TLS listener; closed");
            return None;
        };
        // Pingora's listener hands over its plain TCP stream; the acceptor wants it as such.
        let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
            log::error!("a connection on a TLS listener is not a TCP stream; closed");
            return None;
        };
        self.awaiting_first_bytes.fetch_add(1, Ordering::AcqRel);
        let done = tls::handshake(&listener.acceptor, *tcp, deadline, &self.shared).await;
        self.awaiting_first_bytes.fetch_sub(1, Ordering::AcqRel);
        let reject = |reason: &str| {
            crate::metrics::REJECTED_CONNECTIONS.with_label_values(&[reason]).inc();
            None
        };
        let tls = match done {
            Err(_) => return reject("header_timeout"),
            Ok(Err(e)) => {
                log::debug!("TLS handshake failed: {e}");
                return reject("tls_handshake");
            }
            Ok(Ok(tls)) => tls,
        };
        // A resumed TLS session skips the client-certificate verifier: with
        // `require_client_cert`, only a certificate the current policy accepts may go on.
        if !listener.state.admits(tls.ssl_digest().as_deref()) {
            return reject("client_cert");
        }
        Some(Box::new(tls))
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let reused = self.serve_connection(stream, shutdown).await;
        crate::memory::connection_closed();
        reused
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
    /// One connection, from accept to close: per-IP cap, TLS handshake, HTTP/1 or HTTP/2.
    async fn serve_connection(self: &Arc<Self>, stream: Stream, pingora_shutdown: &ShutdownWatch) -> Option<Stream> {
        let accepted = Instant::now();
        // Pingora's watch turns true only after a binary upgrade's hand-over window; ours as
        // soon as a hand-over or shutdown starts, so HTTP/2 connections get GOAWAY and HTTP/1
        // answers `Connection: close` while the new process is already accepting.
        let mut drain = self.shared.drain_watch();
        if *drain.borrow() {
            // Accepted while draining: HTTP/2 waits for a *change* to send GOAWAY; make the
            // current value count as one, so this connection gets it at once too.
            drain.mark_changed();
        }
        let shutdown = if *pingora_shutdown.borrow() {
            pingora_shutdown
        } else {
            &drain
        };
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
        let limits = &snap.limits;
        let stream = if self.tls.is_empty() {
            stream
        } else {
            // Boxed: the handshake's state is large and only needed while it runs, and every
            // byte of this future is held by each idle keep-alive connection.
            Box::pin(self.handshake(stream, accepted + limits.header_timeout)).await?
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let mut conn = EdgeStream::new(stream);
            conn.send_timeout = limits.send_timeout;
            conn.watch_h2(limits.header_timeout, limits.body_timeout);
            return ServerApp::process_new(&self.proxy, Box::new(conn), shutdown).await;
        }
        let mut conn = EdgeStream::new(stream);
        conn.send_timeout = limits.send_timeout;
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
                .fill_until(deadline, |b| {
                    b.len() >= h2_watch::PREFACE.len() || !h2_watch::PREFACE.starts_with(b)
                })
                .await;
            if decided.is_ok_and(|open| open) && conn.prefix.starts_with(h2_watch::PREFACE) {
                conn.watch_h2(limits.header_timeout, limits.body_timeout);
                return ServerApp::process_new(&self.proxy, Box::new(conn), shutdown).await;
            }
        }
        // Boxed once for the connection's life: Pingora takes the stream boxed for each request
        // and hands it back boxed (boxing and unboxing it per request cost an allocation).
        self.serve_http1(Box::new(conn), accepted, shutdown).await
    }

    /// The HTTP/1 keep-alive loop (as Pingora's own), with each head read and checked first.
    async fn serve_http1(
        self: &Arc<Self>,
        mut conn: Box<EdgeStream>,
        accepted: Instant,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut served: u32 = 0;
        loop {
            let snap = self.shared.snapshot();
            let limits = &snap.limits;
            let mut head_started = accepted;
            let head = if served == 0 {
                read_head(&mut conn, accepted + limits.header_timeout, &snap).await
            } else {
                // Between requests: idle until the next one starts, then the head must be
                // complete within header_timeout of its first byte. Once draining, an idle
                // connection is closed after a short grace — never with request bytes unread.
                let idle = if conn.prefix.is_empty() {
                    let mut down = shutdown.clone();
                    let drained = tokio::select! {
                        biased;
                        r = conn.fill_until(Instant::now() + KEEPALIVE_IDLE, |b| !b.is_empty()) => Some(r),
                        _ = down.wait_for(|s| *s) => None,
                    };
                    match drained {
                        Some(r) => r,
                        None => Ok(conn
                            .fill_until(Instant::now() + DRAIN_IDLE_GRACE, |b| !b.is_empty())
                            .await
                            .unwrap_or(false)),
                    }
                } else {
                    Ok(true)
                };
                match idle {
                    Ok(true) => {
                        head_started = Instant::now();
                        read_head(&mut conn, head_started + limits.header_timeout, &snap).await
                    }
                    _ => Head::Closed,
                }
            };
            // A reload's value applies from the connection's next request on.
            conn.send_timeout = limits.send_timeout;
            match head {
                Head::Ready => {}
                Head::Closed => return None,
                Head::Refuse(reply) => {
                    Box::pin(refuse::refuse(&mut conn, reply, &snap, &self.shared, head_started)).await;
                    return None;
                }
            }
            let mut session = ServerSession::new_http1(conn);
            // Draining: this answer says `Connection: close` (the proxy also closes answers to
            // requests that were under way when draining started).
            session.set_keepalive(if *shutdown.borrow() || self.shared.draining() {
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
            conn = stream.into_any().downcast::<EdgeStream>().ok()?;
            served += 1;
        }
    }
}
