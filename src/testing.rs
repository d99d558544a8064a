//! Helpers for testing Portico, and plugins built on it, against real sockets (the `testing`
//! feature): a raw HTTP/1.1 client, temp dirs, a Portico process or an in-process gateway that
//! binds port 0 and reports the ports it got, upstreams that record what they receive, and a
//! redis-server.
//! Readiness is always polled, never slept for.

mod fault;
pub use fault::{refusing_addr, Fault, FaultRequest, FaultServer, Unaccepting};

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on right now (bound and released; a tiny race, fine on loopback).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Poll `f` until it returns `Some`, or panic after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "portico-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.file(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
    stream.write_all(&bytes)?;
    read_response(&mut stream, req.method == "HEAD")
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
pub fn read_response(stream: &mut TcpStream, head_only: bool) -> std::io::Result<Response> {
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
fn dechunk_prefix(b: &[u8]) -> Option<(Vec<u8>, usize)> {
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

/// A Portico process started from a binary, with stdout (access log) and stderr captured.
pub struct Portico {
    child: Option<Child>,
    pub dir: TempDir,
    pub config: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Portico {
    /// Write `yaml` to a temp file and start `bin -c FILE` (plus `extra` arguments).
    pub fn start(bin: &str, yaml: &str, extra: &[&str]) -> Portico {
        let dir = TempDir::new("gw");
        let config = dir.write("portico.yaml", yaml);
        Self::start_in(bin, dir, config, extra)
    }

    /// Start `bin -c config` with logs in `dir`.
    pub fn start_in(bin: &str, dir: TempDir, config: PathBuf, extra: &[&str]) -> Portico {
        let n: u32 = rand::random();
        let stdout = dir.file(&format!("stdout-{n}.log"));
        let stderr = dir.file(&format!("stderr-{n}.log"));
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start portico");
        Portico {
            child: Some(child),
            dir,
            config,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The address Portico bound for a listener configured as `spec` (e.g. `127.0.0.1:0`), read
    /// from its log (`bound proxy listener 127.0.0.1:0 at 127.0.0.1:41234`).
    pub fn bound(&mut self, what: &str, spec: &str) -> String {
        let needle = format!("bound {what} listener {spec} at ");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.stderr_text().lines().find(|l| l.contains(&needle)) {
                let at = line.split(&needle).nth(1).unwrap_or("").trim();
                return at.split_whitespace().next().unwrap_or("").to_string();
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("portico exited ({status}) before binding {spec}:\n{}", self.logs());
            }
            if Instant::now() > end {
                panic!("timed out waiting for portico to bind {spec}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the admin listener says every proxy listener is serving.
    pub fn wait_ready(&mut self, admin: &str) -> &mut Self {
        let what = format!("portico at {admin} to be ready");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = get(admin, "/healthz") {
                if r.status == 200 {
                    return self;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("portico exited ({status}) before it was ready:\n{}", self.logs());
            }
            if Instant::now() > end {
                panic!("timed out waiting for {what}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a signal by name (`HUP`, `QUIT`, `TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name} failed");
    }

    /// Replace the config file's text (then signal HUP or POST /reload).
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("replace config");
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Wait for the process to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s.code();
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-INT").arg(c.id().to_string()).status();
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A metric's value in Prometheus text (the sum over series whose labels contain `labels`).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A tiny HTTP server answering every GET with the current body (e.g. a JWKS document whose
/// keys a test rotates). It counts the requests it answered.
pub struct ContentServer {
    pub addr: SocketAddr,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ContentServer {
    pub fn start(body: &str) -> ContentServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = std::sync::Arc::new(std::sync::Mutex::new(body.to_string()));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let text = b.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = stream.write_all(resp.as_bytes());
            }
        });
        ContentServer { addr, body, hits }
    }

    pub fn set(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_string();
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One request as a [`RecordingUpstream`] parsed it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    /// Lower-case names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// True when the body came chunked.
    pub chunked: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(k, _)| k == name).count()
    }
}

#[derive(Default)]
struct Recordings {
    /// Every byte received, per connection.
    connections: Vec<Vec<u8>>,
    requests: Vec<Recorded>,
    /// Bytes that did not parse as the start of a request.
    garbage: Vec<Vec<u8>>,
}

/// An HTTP/1.1 upstream for framing tests: it records the exact bytes of every connection and
/// parses requests strictly (Content-Length, or chunked with nothing but hex sizes). Bytes that
/// do not start a valid request are answered 400 and the connection is closed — as a strict
/// server would — and counted as garbage. Each answer echoes the request's `x-id` header in
/// `x-echo-id` and in its JSON body, so a client can tell whether an answer was meant for it.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    rec: std::sync::Arc<std::sync::Mutex<Recordings>>,
}

impl RecordingUpstream {
    pub fn start() -> RecordingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let rec = std::sync::Arc::new(std::sync::Mutex::new(Recordings::default()));
        let r = rec.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let r = r.clone();
                std::thread::spawn(move || recording_conn(stream, r));
            }
        });
        RecordingUpstream { addr, rec }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.rec.lock().unwrap().requests.clone()
    }

    /// Everything received on each connection so far, in order of connection.
    pub fn connection_bytes(&self) -> Vec<Vec<u8>> {
        self.rec.lock().unwrap().connections.clone()
    }

    /// Byte runs that did not parse as a request (a desync shows up here).
    pub fn garbage(&self) -> Vec<Vec<u8>> {
        self.rec.lock().unwrap().garbage.clone()
    }
}

fn recording_conn(mut s: TcpStream, rec: std::sync::Arc<std::sync::Mutex<Recordings>>) {
    let index = {
        let mut r = rec.lock().unwrap();
        r.connections.push(Vec::new());
        r.connections.len() - 1
    };
    let mut buf: Vec<u8> = Vec::new();
    let fill = |s: &mut TcpStream, buf: &mut Vec<u8>| -> bool {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                rec.lock().unwrap().connections[index].extend_from_slice(&chunk[..n]);
                true
            }
        }
    };
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(i + 4);
            }
            // A strict server looks at what it has: a non-token start is garbage at once.
            if !buf.is_empty() && !buf[0].is_ascii_uppercase() {
                break None;
            }
            if !fill(&mut s, &mut buf) {
                if !buf.is_empty() {
                    rec.lock().unwrap().garbage.push(buf.clone());
                }
                return;
            }
        };
        let parsed = head_end.and_then(|end| {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..end]) {
                Ok(httparse::Status::Complete(_)) => Some((
                    end,
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    req.headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).to_string(),
                            )
                        })
                        .collect::<Vec<_>>(),
                )),
                _ => None,
            }
        });
        let Some((end, method, target, headers)) = parsed else {
            rec.lock().unwrap().garbage.push(buf.clone());
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            return;
        };
        buf.drain(..end);
        let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let line = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break Some(i);
                    }
                    if !fill(&mut s, &mut buf) {
                        break None;
                    }
                };
                let Some(line) = line else { return };
                let size = std::str::from_utf8(&buf[..line])
                    .ok()
                    .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|t| usize::from_str_radix(t, 16).ok());
                let Some(size) = size else {
                    rec.lock().unwrap().garbage.push(buf.clone());
                    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    return;
                };
                buf.drain(..line + 2);
                if size == 0 {
                    // Trailer lines, then the empty line.
                    loop {
                        match buf.windows(2).position(|w| w == b"\r\n") {
                            Some(0) => {
                                buf.drain(..2);
                                break;
                            }
                            Some(i) => {
                                buf.drain(..i + 2);
                            }
                            None if fill(&mut s, &mut buf) => {}
                            None => return,
                        }
                    }
                    break body;
                }
                while buf.len() < size + 2 {
                    if !fill(&mut s, &mut buf) {
                        return;
                    }
                }
                if &buf[size..size + 2] != b"\r\n" {
                    rec.lock().unwrap().garbage.push(buf.clone());
                    return;
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else {
            let n: usize = find("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while buf.len() < n {
                if !fill(&mut s, &mut buf) {
                    return;
                }
            }
            buf.drain(..n).collect()
        };
        let id = find("x-id").unwrap_or_default();
        let payload = serde_json::json!({
            "id": id,
            "method": method,
            "target": target,
            "body": String::from_utf8_lossy(&body),
        })
        .to_string();
        let head_only = method == "HEAD";
        rec.lock().unwrap().requests.push(Recorded {
            method,
            target,
            headers,
            body,
            chunked,
        });
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-echo-id: {id}\r\n\r\n",
            payload.len()
        );
        if !head_only {
            resp.push_str(&payload);
        }
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// How test gateways write their listener and admin addresses: port 0, bound by Portico.
pub const PROXY_SPEC: &str = "127.0.0.1:0";
pub const ADMIN_SPEC: &str = "127.0.0.2:0";

/// A gateway running in this process (with a registry of the test's own plugins), on ports it
/// bound itself. Stopped when dropped. Reload it with [`InProcess::reload`] (POST /reload: a
/// signal would reach every gateway of the test process).
pub struct InProcess {
    pub addr: String,
    pub admin: String,
    pub dir: TempDir,
    config: PathBuf,
    stop: Option<tokio::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct StopSignal(tokio::sync::Mutex<tokio::sync::mpsc::Receiver<()>>);

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        self.0.lock().await.recv().await;
        pingora::server::ShutdownSignal::GracefulTerminate
    }
}

impl InProcess {
    /// The config head for a test gateway in `dir`: fast shutdown, its own pid and upgrade
    /// files, a listener and an admin listener on port 0 (on two loopback addresses, since the
    /// address as written is the listener's identity).
    pub fn head(dir: &Path) -> String {
        format!(
            "server:\n  threads: 2\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {d}/portico.pid\n  upgrade_sock: {d}/upgrade.sock\nlisteners:\n  - address: {PROXY_SPEC}\nadmin:\n  address: {ADMIN_SPEC}\n",
            d = dir.display()
        )
    }

    /// Start a gateway on [`InProcess::head`] + `body`, with `registry`, and wait until it serves.
    pub fn start(body: &str, registry: crate::plugin::Registry) -> InProcess {
        let dir = TempDir::new("inproc");
        let config = dir.write("portico.yaml", &format!("{}{body}", Self::head(dir.path())));
        let prepared = crate::server::prepare(crate::server::RunOptions {
            config: config.clone(),
            upgrade: false,
            daemon: false,
            registry,
        })
        .unwrap_or_else(|e| panic!("the test gateway does not start: {e}"));
        let addr = prepared.shared.bound.local_addr(PROXY_SPEC).expect("bound").to_string();
        let admin = prepared.shared.bound.local_addr(ADMIN_SPEC).expect("bound").to_string();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let thread = std::thread::spawn(move || prepared.run(Box::new(StopSignal(tokio::sync::Mutex::new(rx)))));
        wait_for("the in-process gateway", Duration::from_secs(20), || {
            get(&admin, "/healthz").ok().filter(|r| r.status == 200)
        });
        InProcess {
            addr,
            admin,
            dir,
            config,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Replace the config's body and reload it; the reload's answer.
    pub fn reload(&self, body: &str) -> Response {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, format!("{}{body}", Self::head(self.dir.path()))).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("replace config");
        Request::new("POST", "/reload").send(&self.admin).expect("reload")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.blocking_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
/// A `redis-server` of the test's own, on a free loopback port, persisting nothing, stopped
/// (by its PID) on drop. `REDIS_SERVER` names the binary when it is not `redis-server` on PATH.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    /// Start one and wait until it answers PING.
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let mut last = String::new();
        // Another process may take the free port before redis binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            match Self::spawn(port, &dir) {
                Ok(child) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        dir,
                    }
                }
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(port: u16, dir: &TempDir) -> Result<Child, String> {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let log = dir.file("redis.log");
        let mut child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {bin} ({e}): the Redis tests need redis-server \
                     (`./dev deps` installs it, or `apt-get install redis-server`)"
                )
            });
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_ping(port) {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("{bin} exited ({status}) on port {port}:\n{text}"));
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{bin} on port {port} did not answer PING within 10s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kill it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port (after [`RedisServer::kill`]), empty.
    pub fn restart(&mut self) {
        self.kill();
        match Self::spawn(self.port, &self.dir) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("redis-server did not restart: {e}"),
        }
    }

    /// Freeze it (SIGSTOP): connections stay open and nothing answers, like a hung server.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Undo [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.pid().expect("redis-server is running");
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when a Redis server answers PING on loopback `port`.
pub fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}
