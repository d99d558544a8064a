//! [`EdgeStream`]: the connection as the edge layer hands it to Pingora. Bytes the edge layer
//! read ahead (a request head it checked, the h2c preface) are replayed first, so Pingora parses
//! exactly what was checked; on HTTP/2 connections an [`H2Watch`] sees every frame go by and
//! keeps the header and body deadlines.

use super::framing::RequestBounds;
use super::h2_watch::{H2Watch, Verdict};
use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Until the edge layer sets the configured one.
const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

pub struct EdgeStream {
    inner: Stream,
    /// Bytes read ahead, replayed before the socket's own.
    pub(super) prefix: Vec<u8>,
    h2: Option<Box<H2State>>,
    /// HTTP/1: the request being served, handed over without a byte past it (`framing.rs`).
    pub(super) bounds: Option<RequestBounds>,
    /// `limits.send_timeout`: how long a write may wait for a client that reads nothing.
    pub(super) send_timeout: Duration,
    /// Runs while writes are refused (the client's window and our socket buffer are full).
    write_stall: Option<Pin<Box<Sleep>>>,
    /// HTTP/1: the last read Pingora made of the client found nothing — it waits on the client,
    /// rather than holding the client's bytes back while the upstream takes none.
    awaiting_client: bool,
}

struct H2State {
    watch: H2Watch,
    /// Wakes the reader when the next deadline passes.
    timer: Pin<Box<Sleep>>,
    /// A frame Portico feeds to the h2 server (a RST_STREAM for a stalled body).
    feed: Vec<u8>,
}

impl std::fmt::Debug for EdgeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStream")
            .field("prefix", &self.prefix.len())
            .field("h2", &self.h2.is_some())
            .finish()
    }
}

impl EdgeStream {
    pub fn new(inner: Stream) -> Self {
        EdgeStream {
            inner,
            prefix: Vec::new(),
            h2: None,
            bounds: None,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            write_stall: None,
            awaiting_client: false,
        }
    }

    /// Whether Pingora's last read of the client (HTTP/1) found nothing: a request body that is
    /// not complete then stalls on the client's side, not on the upstream's.
    pub fn awaiting_client(&self) -> bool {
        self.awaiting_client
    }

    /// A write the socket could not take (`Pending`) starts the `send_timeout` clock; any write
    /// that goes through stops it. A client that reads nothing for that long is cut (an error
    /// for the writer, as nginx's `send_timeout`), so it cannot hold the connection — and the
    /// upstream connection feeding it — for ever. This covers every write on the socket: HTTP/1
    /// heads and bodies, tunnels after an upgrade, and HTTP/2 frames (a stream whose HTTP/2
    /// window stays shut is cut by the same timeout in Pingora, set per request).
    fn timed<T>(&mut self, cx: &mut Context<'_>, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if !polled.is_pending() {
            self.write_stall = None;
            return polled;
        }
        let timeout = self.send_timeout;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_ready() {
            self.write_stall = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?} (send_timeout)"),
            )));
        }
        Poll::Pending
    }

    /// Watch this connection's HTTP/2 frames from now on (before its preface is read).
    pub fn watch_h2(&mut self, header_timeout: Duration, body_timeout: Duration) {
        let now = Instant::now();
        self.h2 = Some(Box::new(H2State {
            watch: H2Watch::new(header_timeout, body_timeout, now),
            timer: Box::pin(tokio::time::sleep_until(now + header_timeout)),
            feed: Vec::new(),
        }));
    }

    /// Read more into the buffer until `done(buffer)`, the peer closes (`Ok(false)`) or the
    /// deadline passes (`Err`). Returns at once if the buffer already satisfies `done`.
    pub async fn fill_until(&mut self, deadline: Instant, mut done: impl FnMut(&[u8]) -> bool) -> Result<bool, ()> {
        loop {
            if done(&self.prefix) {
                return Ok(true);
            }
            match tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| self.poll_fill(cx))).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(false),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// One read from the socket, appended to `prefix` (see [`poll_fill`]).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        poll_fill(&mut self.inner, &mut self.prefix, cx)
    }
}

/// One read from `inner`, appended to `prefix`. Room is only held while bytes are there to
/// read: a connection waiting idle between requests keeps no buffer at all (Portico's memory
/// per idle keep-alive connection). Without room to spare, the read goes to scratch space on the
/// stack (not zeroed) and room is taken only for the bytes that came: most reads find none (the
/// wait for a keep-alive connection's next request, the watch for a client that goes away while
/// its answer is on its way), and reserving 4 KiB for each, freed again at once, cost an
/// allocation per read. With room, the read goes straight into it.
pub(super) fn poll_fill(
    inner: &mut Stream,
    prefix: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    const READ_SIZE: usize = 4096;
    if prefix.capacity() - prefix.len() >= READ_SIZE / 4 {
        return tokio_util::io::poll_read_buf(Pin::new(inner), cx, prefix);
    }
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
    let mut buf = ReadBuf::uninit(&mut scratch);
    match Pin::new(inner).poll_read(cx, &mut buf) {
        Poll::Pending => {
            if prefix.is_empty() {
                *prefix = Vec::new();
            }
            Poll::Pending
        }
        Poll::Ready(Ok(())) => {
            prefix.extend_from_slice(buf.filled());
            Poll::Ready(Ok(buf.filled().len()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
    }
}

impl H2State {
    /// Act on the deadlines: `Some` ends this read (an error, or a frame to feed).
    fn enforce(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Option<Poll<std::io::Result<()>>> {
        loop {
            match self.watch.check(Instant::now()) {
                Verdict::Close(late) => {
                    crate::metrics::REJECTED_CONNECTIONS
                        .with_label_values(&[late.reason()])
                        .inc();
                    return Some(Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("HTTP/2 {}", late.reason()),
                    ))));
                }
                Verdict::Reset(stream) => {
                    crate::metrics::REJECTED_CONNECTIONS
                        .with_label_values(&["body_timeout"])
                        .inc();
                    self.feed.extend_from_slice(&H2Watch::rst_frame(stream));
                    self.drain_feed(buf);
                    return Some(Poll::Ready(Ok(())));
                }
                Verdict::Wait(None) => return None,
                Verdict::Wait(Some(at)) => {
                    self.timer.as_mut().reset(at);
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return None;
                    }
                    // Already due: check again.
                }
            }
        }
    }

    fn drain_feed(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.feed.len().min(buf.remaining());
        buf.put_slice(&self.feed[..n]);
        self.feed.drain(..n);
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(bounds) = this.bounds.as_mut() {
            let polled = bounds.poll_read(&mut this.inner, &mut this.prefix, cx, buf);
            this.awaiting_client = polled.is_pending();
            return polled;
        }
        if let Some(h2) = this.h2.as_mut() {
            if !h2.feed.is_empty() {
                h2.drain_feed(buf);
                return Poll::Ready(Ok(()));
            }
            if let Some(done) = h2.enforce(cx, buf) {
                return done;
            }
        }
        let before = buf.filled().len();
        let polled = if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            if n == this.prefix.len() {
                // Replayed whole: give the room back (the next read reserves its own).
                this.prefix = Vec::new();
            } else {
                this.prefix.drain(..n);
            }
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        };
        if let Some(h2) = this.h2.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) => h2.watch.client_bytes(&buf.filled()[before..], Instant::now()),
                // Nothing to read: make sure a deadline wakes this reader.
                Poll::Pending => {
                    if let Some(done) = h2.enforce(cx, buf) {
                        return done;
                    }
                }
                Poll::Ready(Err(_)) => {}
            }
        }
        polled
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Some(bounds) = self.bounds.as_mut() {
            bounds.wrote(buf);
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Some(h2), Poll::Ready(Ok(n))) = (self.h2.as_mut(), &polled) {
            h2.watch.server_bytes(&buf[..*n]);
        }
        self.timed(cx, polled)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.timed(cx, polled)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.timed(cx, polled)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let (Some(bounds), Some(first)) = (self.bounds.as_mut(), bufs.iter().find(|b| !b.is_empty())) {
            bounds.wrote(first);
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let (Some(h2), Poll::Ready(Ok(n))) = (self.h2.as_mut(), &polled) {
            let mut left = *n;
            for b in bufs {
                let take = left.min(b.len());
                h2.watch.server_bytes(&b[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        self.timed(cx, polled)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for EdgeStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for EdgeStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for EdgeStream {
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

impl GetTimingDigest for EdgeStream {
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

impl GetProxyDigest for EdgeStream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for EdgeStream {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, d: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(d)
    }
}

#[async_trait]
impl Peek for EdgeStream {
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
