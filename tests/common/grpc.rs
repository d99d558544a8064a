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
/// `grpc-message: no such thing`), `Slow` (as `Unary`, 3 s later). Every answer carries
/// `x-seen-traceparent` and `x-seen-grpc-timeout` (what the request had).
pub struct GrpcServer {
    pub addr: SocketAddr,
    /// The request heads it received.
    pub seen: Arc<Mutex<Vec<HeaderMap>>>,
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
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = seen.clone();
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
                        let (acceptor, seen) = (acceptor.clone(), s.clone());
                        tokio::spawn(async move {
                            match acceptor {
                                None => serve_h2(tcp, seen).await,
                                Some(a) => {
                                    if let Ok(tls) = a.accept(tcp).await {
                                        serve_h2(tls, seen).await
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

async fn serve_h2<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: T, seen: Arc<Mutex<Vec<HeaderMap>>>) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        seen.lock().unwrap().push(req.headers().clone());
        tokio::spawn(async move {
            let _ = handle(req, respond).await;
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
    let mut send = send.clone().ready().await?;
    let (resp, mut body) = send.send_request(grpc_request(uri, headers), false)?;
    body.send_data(frame(msg), true)?;
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
        let resp = resp.await?;
        Ok(Bidi {
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
