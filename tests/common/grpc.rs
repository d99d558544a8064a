//! HTTP/2 and gRPC for the tests, written over the `h2` crate: a gRPC server (h2c or TLS) with
//! unary, bidirectional-streaming, failing and slow methods, and a client with proper gRPC
//! framing (5-byte message prefix, `te: trailers`, `grpc-status` in trailers or a
//! trailers-only head).

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A runtime for a test's async part.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One gRPC message, length-prefixed (uncompressed).
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

/// Whole messages taken from the front of `buf` (a partial one stays).
pub fn unframe(buf: &mut BytesMut) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let n = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + n {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(n).to_vec());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Server

/// A gRPC server on `127.0.0.1:0`, on its own thread. Methods of service `test.Echo`:
/// `Unary` (echoes each message as `echo:MSG`), `Bidi` (answers its head at once, then echoes
/// each message as it comes, `grpc-status: 0` when the client ends), `Fail` (`grpc-status: 5`,
/// `grpc-message: no such thing`), `Slow` (as `Unary`, 3 s later), `Die` (as `Bidi` for its
/// first message, then resets the stream as a crashing server would). Every answer carries
/// `x-seen-traceparent` and `x-seen-grpc-timeout` (what the request had).
pub struct GrpcServer {
    pub addr: SocketAddr,
    /// The request heads it received.
    pub seen: Arc<Mutex<Vec<HeaderMap>>>,
    /// Calls whose request stream the client (the gateway) reset.
    pub resets: Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl GrpcServer {
    /// Plaintext HTTP/2 (h2c, prior knowledge).
    pub fn start() -> GrpcServer {
        Self::start_with(None)
    }

    /// HTTP/2 over TLS with this config (its ALPN should offer `h2`).
    pub fn start_tls(config: Arc<rustls::ServerConfig>) -> GrpcServer {
        Self::start_with(Some(config))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> GrpcServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = seen.clone();
        let r = resets.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let acceptor = tls.map(pingora::tls::TlsAcceptor::from);
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, seen, resets) = (acceptor.clone(), s.clone(), r.clone());
                        tokio::spawn(async move {
                            match acceptor {
                                None => serve_h2(tcp, seen, resets).await,
                                Some(a) => {
                                    if let Ok(tls) = a.accept(tcp).await {
                                        serve_h2(tls, seen, resets).await
                                    }
                                }
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        GrpcServer {
            addr,
            seen,
            resets,
            stop: Some(stop),
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve_h2<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: T,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    resets: Arc<std::sync::atomic::AtomicUsize>,
) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        seen.lock().unwrap().push(req.headers().clone());
        let resets = resets.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(req, respond).await {
                if e.is_reset() {
                    resets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
    }
}

fn trailers(status: u32, message: Option<&str>) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", status.to_string().parse().unwrap());
    if let Some(m) = message {
        t.insert("grpc-message", m.parse().unwrap());
    }
    t
}

async fn handle(req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) -> Result<(), h2::Error> {
    let method = req.uri().path().to_string();
    let seen = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let head = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("x-seen-traceparent", seen("traceparent"))
        .header("x-seen-grpc-timeout", seen("grpc-timeout"))
        .body(())
        .unwrap();
    let mut body = req.into_body();
    let mut buf = BytesMut::new();
    match method.as_str() {
        "/test.Echo/Bidi" => {
            let mut send = respond.send_response(head, false)?;
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.extend_from_slice(&chunk);
                for msg in unframe(&mut buf) {
                    let mut out = b"echo:".to_vec();
                    out.extend_from_slice(&msg);
                    send.send_data(frame(&out), false)?;
                }
            }
            send.send_trailers(trailers(0, None))?;
        }
        "/test.Echo/Die" => {
            let mut send = respond.send_response(head, false)?;
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.extend_from_slice(&chunk);
                if let Some(msg) = unframe(&mut buf).first() {
                    let mut out = b"echo:".to_vec();
                    out.extend_from_slice(msg);
                    send.send_data(frame(&out), false)?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    send.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Ok(());
                }
            }
        }
        "/test.Echo/Unary" | "/test.Echo/Slow" | "/test.Echo/Fail" => {
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.extend_from_slice(&chunk);
            }
            if method.ends_with("Slow") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let mut send = respond.send_response(head, false)?;
            if method.ends_with("Fail") {
                send.send_trailers(trailers(5, Some("no such thing")))?;
                return Ok(());
            }
            for msg in unframe(&mut buf) {
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&msg);
                send.send_data(frame(&out), false)?;
            }
            send.send_trailers(trailers(0, None))?;
        }
        _ => {
            let mut send = respond.send_response(head, false)?;
            send.send_trailers(trailers(12, Some("unknown method")))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client

/// An HTTP/2 client over `io` (plain TCP for h2c, a TLS stream that chose `h2`).
pub async fn h2_client<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: T) -> h2::client::SendRequest<Bytes> {
    let (send, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// HTTP/2 prior knowledge (h2c) to `addr`.
pub async fn h2c(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    h2_client(tcp).await
}

/// A TLS connection to `addr` for `name` (offer ALPN in `config`).
pub async fn tls(
    addr: &str,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<pingora::tls::ClientTlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    pingora::tls::TlsConnector::from(config).connect(name, tcp).await
}

/// HTTP/2 over TLS (ALPN `h2`) to `addr` for `name`.
pub async fn h2_tls(addr: &str, name: &str, config: Arc<rustls::ClientConfig>) -> h2::client::SendRequest<Bytes> {
    let stream = tls(addr, name, config).await.expect("TLS connect");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN chose h2");
    h2_client(stream).await
}

/// A plain HTTP/2 GET: status, head, body.
pub async fn h2_get(send: &mut h2::client::SendRequest<Bytes>, uri: &str) -> (u16, HeaderMap, Vec<u8>) {
    let req = Request::get(uri).body(()).unwrap();
    let (resp, _) = send
        .clone()
        .ready()
        .await
        .expect("ready")
        .send_request(req, true)
        .expect("send");
    let resp = resp.await.expect("response");
    let status = resp.status().as_u16();
    let head = resp.headers().clone();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (status, head, out)
}

/// How a gRPC call ended.
#[derive(Debug)]
pub struct GrpcReply {
    pub http_status: u16,
    pub head: HeaderMap,
    pub messages: Vec<Vec<u8>>,
    /// From the trailers, or from the head of a trailers-only answer.
    pub grpc_status: Option<u32>,
    pub grpc_message: Option<String>,
    pub trailers_only: bool,
}

fn grpc_request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

fn status_of(h: &HeaderMap) -> (Option<u32>, Option<String>) {
    let code = h.get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok());
    let msg = h.get("grpc-message").map(|v| v.to_str().unwrap_or("").to_string());
    (code, msg)
}

/// A unary call: one message out, the answer in.
pub async fn unary(
    send: &mut h2::client::SendRequest<Bytes>,
    uri: &str,
    msg: &[u8],
    headers: &[(&str, &str)],
) -> Result<GrpcReply, h2::Error> {
    unary_on(send, uri, msg, headers).await.map(|(_, reply)| reply)
}

/// The answer of a gRPC call: its head, messages and status.
pub async fn read_reply(resp: h2::client::ResponseFuture) -> Result<GrpcReply, h2::Error> {
    let resp = resp.await?;
    let http_status = resp.status().as_u16();
    let head = resp.headers().clone();
    let (code, message) = status_of(&head);
    let mut recv = resp.into_body();
    if code.is_some() {
        return Ok(GrpcReply {
            http_status,
            head,
            messages: Vec::new(),
            grpc_status: code,
            grpc_message: message,
            trailers_only: true,
        });
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?.unwrap_or_default();
    let (code, message) = status_of(&trailers);
    Ok(GrpcReply {
        http_status,
        head,
        messages: unframe(&mut buf),
        grpc_status: code,
        grpc_message: message,
        trailers_only: false,
    })
}

/// A bidirectional-streaming call in progress.
pub struct Bidi {
    /// The HTTP/2 stream it went on.
    pub id: u32,
    out: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    pub head: HeaderMap,
    pub http_status: u16,
    buf: BytesMut,
    pending: std::collections::VecDeque<Vec<u8>>,
}

impl Bidi {
    /// Open the call and wait for the answer's head.
    pub async fn open(
        send: &mut h2::client::SendRequest<Bytes>,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<Bidi, h2::Error> {
        let mut send = send.clone().ready().await?;
        let (resp, out) = send.send_request(grpc_request(uri, headers), false)?;
        let id = out.stream_id().into();
        let resp = resp.await?;
        Ok(Bidi {
            id,
            http_status: resp.status().as_u16(),
            head: resp.headers().clone(),
            recv: resp.into_body(),
            out,
            buf: BytesMut::new(),
            pending: Default::default(),
        })
    }

    pub fn send(&mut self, msg: &[u8]) -> Result<(), h2::Error> {
        self.out.send_data(frame(msg), false)
    }

    /// The next message, or `None` when the answer ended.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, h2::Error> {
        loop {
            self.pending.extend(unframe(&mut self.buf));
            if let Some(m) = self.pending.pop_front() {
                return Ok(Some(m));
            }
            match self.recv.data().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                None => return Ok(None),
            }
        }
    }

    /// Without ending the client's side: the rest of the answer, then the status its trailers
    /// carry (a call the server ends by itself).
    pub async fn status(mut self) -> Result<(Option<u32>, Option<String>), h2::Error> {
        while let Some(chunk) = self.recv.data().await {
            chunk?;
        }
        let t = self.recv.trailers().await?.unwrap_or_default();
        Ok(status_of(&t))
    }

    /// End the client's side and wait for the status.
    pub async fn finish(mut self) -> Result<(Option<u32>, Option<String>), h2::Error> {
        self.out.send_data(Bytes::new(), true)?;
        while let Some(chunk) = self.recv.data().await {
            chunk?;
        }
        let t = self.recv.trailers().await?.unwrap_or_default();
        Ok(status_of(&t))
    }
}

// ---------------------------------------------------------------------------------------------
// The frames on the wire

/// Every byte a peer sent on one connection, as the client read it (for HTTP/2: its frames).
#[derive(Clone, Default)]
pub struct Wire(Arc<Mutex<Vec<u8>>>);

/// An I/O stream that copies what it reads into a [`Wire`].
pub struct Recorded<T> {
    io: T,
    wire: Wire,
}

impl<T: AsyncRead + Unpin> AsyncRead for Recorded<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            self.wire.0.lock().unwrap().extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recorded<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An HTTP/2 client over `io` whose received frames are recorded.
pub async fn h2_recorded<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: T,
) -> (h2::client::SendRequest<Bytes>, Wire) {
    let wire = Wire::default();
    let send = h2_client(Recorded { io, wire: wire.clone() }).await;
    (send, wire)
}

/// One HTTP/2 frame as received: its type, flags and stream (the payload only for RST_STREAM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub len: usize,
    /// RST_STREAM's error code.
    pub error_code: Option<u32>,
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.kind {
            0 => "DATA",
            1 => "HEADERS",
            3 => "RST_STREAM",
            9 => "CONTINUATION",
            _ => "OTHER",
        };
        write!(f, "{name}")?;
        if self.kind == 0 {
            write!(f, "({})", self.len)?;
        }
        if let Some(code) = self.error_code {
            let reason = match code {
                0 => "NO_ERROR",
                2 => "INTERNAL_ERROR",
                8 => "CANCEL",
                _ => "OTHER",
            };
            write!(f, "({reason})")?;
        }
        if matches!(self.kind, 0 | 1) && self.flags & 0x1 != 0 {
            write!(f, "+END_STREAM")?;
        }
        Ok(())
    }
}

impl Wire {
    /// The frames received so far (a server sends no preface: frames from the first byte).
    pub fn frames(&self) -> Vec<Frame> {
        let bytes = self.0.lock().unwrap().clone();
        let mut out = Vec::new();
        let mut at = 0;
        while bytes.len() >= at + 9 {
            let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            if bytes.len() < at + 9 + len {
                break;
            }
            let kind = bytes[at + 3];
            let stream = u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]]) & 0x7fff_ffff;
            let payload = &bytes[at + 9..at + 9 + len];
            let error_code =
                (kind == 3 && len == 4).then(|| u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
            out.push(Frame {
                kind,
                flags: bytes[at + 4],
                stream,
                len,
                error_code,
            });
            at += 9 + len;
        }
        out
    }

    /// The frames of one stream, written out (`HEADERS+END_STREAM`, `DATA(5)`,
    /// `RST_STREAM(CANCEL)`), once the connection has been quiet for a moment: a reset that
    /// follows an answer is seen too.
    pub async fn stream(&self, id: u32) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = (self.0.lock().unwrap().len(), std::time::Instant::now());
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let len = self.0.lock().unwrap().len();
            if len != last.0 {
                last = (len, std::time::Instant::now());
            } else if last.1.elapsed() >= Duration::from_millis(300) {
                break;
            }
        }
        self.frames()
            .iter()
            .filter(|f| f.stream == id)
            .map(|f| f.to_string())
            .collect()
    }
}

/// A unary call that also says which stream it went on.
pub async fn unary_on(
    send: &mut h2::client::SendRequest<Bytes>,
    uri: &str,
    msg: &[u8],
    headers: &[(&str, &str)],
) -> Result<(u32, GrpcReply), h2::Error> {
    let mut send = send.clone().ready().await?;
    let (resp, mut body) = send.send_request(grpc_request(uri, headers), false)?;
    let id: u32 = body.stream_id().into();
    // The gateway may answer (a trailers-only status it makes before reading the request) and
    // end the stream before the message goes out (h2: InactiveStreamId): its answer counts.
    let sent = body.send_data(frame(msg), true);
    match (read_reply(resp).await, sent) {
        (Ok(reply), _) => Ok((id, reply)),
        (Err(_), Err(e)) | (Err(e), Ok(())) => Err(e),
    }
}
