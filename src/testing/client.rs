//! A raw HTTP/1.1 client: exact bytes out, responses parsed as they come.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
    }
}

/// A request for [`send`].
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, String)>,
    pub body: Option<Vec<u8>>,
    /// Source address to connect from (e.g. 127.0.0.7).
    pub from: Option<IpAddr>,
}

impl<'a> Request<'a> {
    pub fn get(path: &'a str) -> Self {
        Request {
            method: "GET",
            path,
            headers: Vec::new(),
            body: None,
            from: None,
        }
    }
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Request {
            method,
            ..Request::get(path)
        }
    }
    pub fn header(mut self, k: &'a str, v: impl Into<String>) -> Self {
        self.headers.push((k, v.into()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = Some(b.into());
        self
    }
    pub fn from_ip(mut self, ip: &str) -> Self {
        self.from = Some(ip.parse().expect("ip"));
        self
    }
    /// Send it on a fresh connection (`Connection: close`).
    pub fn send(&self, addr: &str) -> std::io::Result<Response> {
        send(addr, self)
    }
}

/// Connect to `addr`, from `from` when given.
pub fn connect(addr: &str, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let target: SocketAddr = addr.parse().map_err(|_| std::io::Error::other("bad addr"))?;
    let stream = match from {
        None => TcpStream::connect_timeout(&target, Duration::from_secs(5))?,
        Some(ip) => {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(ip, 0).into())?;
            s.connect_timeout(&target.into(), Duration::from_secs(5))?;
            s.into()
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Send one request on a fresh connection and read the whole response.
pub fn send(addr: &str, req: &Request<'_>) -> std::io::Result<Response> {
    let mut stream = connect(addr, req.from)?;
    stream.write_all(&req.to_bytes(addr))?;
    read_response(&mut stream, req.method == "HEAD")
}

impl Request<'_> {
    /// The request as HTTP/1.1 bytes (`Connection: close`; `host: addr` unless given).
    pub fn to_bytes(&self, addr: &str) -> Vec<u8> {
        let req = self;
        let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
        if !req.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("host: {addr}\r\n"));
        }
        for (k, v) in &req.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = &req.body {
            if !req
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
            {
                head.push_str(&format!("content-length: {}\r\n", b.len()));
            }
        }
        head.push_str("connection: close\r\n\r\n");
        let mut bytes = head.into_bytes();
        if let Some(b) = &req.body {
            bytes.extend_from_slice(b);
        }
        bytes
    }
}

/// `GET path` with no extra headers.
pub fn get(addr: &str, path: &str) -> std::io::Result<Response> {
    Request::get(path).send(addr)
}

/// Write raw bytes, then read until the peer closes (or `timeout`). For framing tests.
pub fn raw(addr: &str, bytes: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = connect(addr, None)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(bytes)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Read one response from a stream (content-length, chunked, or until close).
pub fn read_response<S: Read>(stream: &mut S, head_only: bool) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Response {
            status,
            headers,
            body: Vec::new(),
        });
    }
    if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while body.len() < len {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    } else if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            if let Some(decoded) = dechunk(&body) {
                body = decoded;
                break;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "chunked body cut short",
                ));
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(Response { status, headers, body })
}

/// Decode a complete chunked body, or `None` if more bytes are needed.
fn dechunk(b: &[u8]) -> Option<Vec<u8>> {
    dechunk_prefix(b).map(|(body, _)| body)
}

/// Decode the complete chunked body at the start of `b`: the body and how many bytes it took
/// (trailers included), or `None` if more bytes are needed.
pub(super) fn dechunk_prefix(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let line_end = b[i..].windows(2).position(|w| w == b"\r\n")? + i;
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[i..line_end]).ok()?.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            // Trailer lines, then an empty line.
            loop {
                let end = b[i..].windows(2).position(|w| w == b"\r\n")? + i;
                let empty = end == i;
                i = end + 2;
                if empty {
                    return Some((out, i));
                }
            }
        }
        if b.len() < i + size + 2 {
            return None;
        }
        out.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
}
