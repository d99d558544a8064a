//! A small HTTP/1.1 echo service: it answers JSON describing the request it got (method,
//! path, query, headers, body size). `portico demo` runs two of them as its upstreams, and the
//! tests use them as real upstreams on ephemeral ports.
//!
//! Query parameters steer it: `?status=503` answers that status, `?delay_ms=200` waits first,
//! `?format=xml` answers the same description as XML (`<echo service="v1"><method>…`).
//! `GET /healthz` answers the status set with [`EchoServer::set_health`] (200 at start).
//!
//! [`EchoServer::start_tls`] serves the same over TLS (an upstream for TLS tests); its JSON
//! then also says what the TLS handshake showed: `"tls": {"sni", "client_cn"}`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

struct State {
    name: String,
    health: AtomicU16,
    requests: AtomicU64,
}

/// A running echo service. It stops when dropped.
pub struct EchoServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl EchoServer {
    /// Start one on `127.0.0.1:0`, on its own thread.
    pub fn start(name: &str) -> io::Result<EchoServer> {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name)
    }

    pub fn start_on(addr: SocketAddr, name: &str) -> io::Result<EchoServer> {
        Self::start_with(addr, name, None)
    }

    /// Start one on `127.0.0.1:0` that speaks TLS with `config` (its certificate, and client
    /// certificates it asks for).
    pub fn start_tls(name: &str, config: Arc<rustls::ServerConfig>) -> io::Result<EchoServer> {
        Self::start_with("127.0.0.1:0".parse().unwrap(), name, Some(config))
    }

    fn start_with(addr: SocketAddr, name: &str, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<EchoServer> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_string(),
            health: AtomicU16::new(200),
            requests: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        std::thread::Builder::new()
            .name(format!("echo-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    tokio::select! {
                        _ = accept_loop(listener, st, tls) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(EchoServer {
            addr,
            state,
            stop: Some(stop),
        })
    }

    /// The status `GET /healthz` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.state.health.store(status, Ordering::Relaxed);
    }

    /// Requests answered so far (health checks excluded).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, tls: Option<Arc<rustls::ServerConfig>>) {
    let acceptor = tls.map(pingora::tls::TlsAcceptor::from);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let _ = serve(stream, state, None).await;
                }
                Some(a) => {
                    let Ok(tls) = a.accept(stream).await else { return };
                    let conn = tls.get_ref().1;
                    let seen = serde_json::json!({
                        "sni": conn.server_name(),
                        "alpn": conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).to_string()),
                        "client_cn": conn.peer_certificates().and_then(|c| c.first()).and_then(|c| common_name(c)),
                    });
                    let _ = serve(tls, state, Some(seen)).await;
                }
            }
        });
    }
}

/// The subject CN of a certificate (DER).
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

const MAX_HEAD: usize = 64 << 10;

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    state: Arc<State>,
    tls: Option<serde_json::Value>,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read a head.
        let head_len = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Ok(());
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if req.parse(&buf[..head_len]).is_err() {
            stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
        let method = req.method.unwrap_or("").to_string();
        let target = req.path.unwrap_or("/").to_string();
        let version = req.version.unwrap_or(1);
        let mut hmap = serde_json::Map::new();
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        let mut close = version == 0;
        for h in req.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            let value = String::from_utf8_lossy(h.value).to_string();
            match name.as_str() {
                "content-length" => content_length = value.trim().parse().ok(),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                "connection" => close = close || value.eq_ignore_ascii_case("close"),
                _ => {}
            }
            match hmap.get_mut(&name) {
                Some(serde_json::Value::Array(a)) => a.push(value.into()),
                Some(v) => {
                    let first = v.take();
                    *v = serde_json::Value::Array(vec![first, value.into()]);
                }
                None => {
                    hmap.insert(name, value.into());
                }
            }
        }
        buf.drain(..head_len);
        // Read the body.
        let body = if chunked {
            read_chunked(&mut stream, &mut buf).await?
        } else {
            let n = content_length.unwrap_or(0);
            while buf.len() < n {
                let mut chunk = [0u8; 16384];
                let r = stream.read(&mut chunk).await?;
                if r == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..r]);
            }
            buf.drain(..n).collect()
        };
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let (status, payload) = if path == "/healthz" && method == "GET" {
            (
                state.health.load(Ordering::Relaxed),
                format!("{{\"service\":{:?}}}", state.name),
            )
        } else {
            state.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(ms) = param("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
            }
            let status = param("status")
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|s| (200..600).contains(s))
                .unwrap_or(200);
            let mut v = serde_json::json!({
                "service": state.name,
                "method": method,
                "path": path,
                "query": query,
                "headers": hmap,
                "body_bytes": body.len(),
                "body": String::from_utf8(body.clone()).ok().filter(|b| b.len() <= 4096),
            });
            if let Some(seen) = &tls {
                v["tls"] = seen.clone();
            }
            if param("format").as_deref() == Some("xml") {
                (status, to_xml(&v))
            } else {
                (status, v.to_string())
            }
        };
        let content_type = if payload.starts_with("<?xml") {
            "application/xml"
        } else {
            "application/json"
        };
        let mut resp = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nx-echo-service: {}\r\n{}\r\n",
            reason(status),
            payload.len(),
            state.name,
            if close { "connection: close\r\n" } else { "" }
        );
        if method != "HEAD" {
            resp.push_str(&payload);
        }
        stream.write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// The echo description as XML: `<echo service="v1">` holding `method`, `path`, `query`,
/// `body_bytes` and one `<header name="…">value</header>` per header.
fn to_xml(v: &serde_json::Value) -> String {
    let text = |k: &str| match &v[k] {
        serde_json::Value::String(s) => xml_escape(s),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<echo service=\"{}\">\n  <method>{}</method>\n  <path>{}</path>\n  <query>{}</query>\n  <body_bytes>{}</body_bytes>\n  <headers>\n",
        text("service"),
        text("method"),
        text("path"),
        text("query"),
        text("body_bytes"),
    );
    if let Some(headers) = v["headers"].as_object() {
        for (name, value) in headers {
            let values = match value {
                serde_json::Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            for one in values {
                out.push_str(&format!(
                    "    <header name=\"{}\">{}</header>\n",
                    xml_escape(name),
                    xml_escape(one.as_str().unwrap_or(""))
                ));
            }
        }
    }
    out.push_str("  </headers>\n</echo>\n");
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

async fn read_chunked<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            fill(stream, buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers end with an empty line.
            loop {
                if let Some(i) = find(buf, b"\r\n") {
                    buf.drain(..i + 2);
                    if i == 0 {
                        return Ok(body);
                    }
                    continue;
                }
                fill(stream, buf).await?;
            }
        }
        while buf.len() < size + 2 {
            fill(stream, buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 16384];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_answer_converts_back() {
        let v = serde_json::json!({
            "service": "v1", "method": "GET", "path": "/a", "query": "x=<&>",
            "headers": {"host": "h", "x-two": ["1", "2\""]}, "body_bytes": 0, "body": null
        });
        let doc = crate::mediation::xml::to_json(to_xml(&v).as_bytes()).unwrap();
        assert_eq!(doc["echo"]["@service"], "v1");
        assert_eq!(doc["echo"]["query"], "x=<&>");
        assert_eq!(doc["echo"]["body_bytes"], "0");
        assert_eq!(
            doc["echo"]["headers"]["header"][2],
            serde_json::json!({"@name": "x-two", "#text": "2\""})
        );
    }
}
