//! A scriptable faulty upstream, for the tests of what Portico does when an upstream misbehaves:
//! refuses connections, never accepts them, accepts and never answers, answers slowly, cuts a
//! body short, answers garbage, or hangs up. The fault can be changed while it runs, and the
//! server counts connections and requests (per connection), so a test can tell a retry from a
//! pooled connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a [`FaultServer`] does with the next request it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer 200 with a small JSON body (keep-alive).
    Ok,
    /// Answer this status with a small JSON body (keep-alive).
    Status(u16),
    /// Read the request and never answer (the connection stays open until the peer closes it).
    Silent,
    /// Answer 200 after this delay.
    SlowHead(Duration),
    /// Send the head (`Content-Length: total`) at once, then the body in `pieces` pieces with
    /// `gap` before each.
    SlowBody { total: usize, pieces: usize, gap: Duration },
    /// Declare `Content-Length: declared`, send `sent` bytes of it, and close.
    CutBody { declared: usize, sent: usize },
    /// Answer chunked, send one chunk of `sent` bytes, and close without the last chunk.
    CutChunked { sent: usize },
    /// Answer a status line that is not HTTP, and keep the connection open.
    Garbage,
    /// Read the request head and close without a word.
    CloseAfterRequest,
    /// Send a response head (`Content-Length: 100`) and close.
    CloseAfterHead,
}

/// A request a [`FaultServer`] read.
#[derive(Debug, Clone)]
pub struct FaultRequest {
    /// Which connection it came on (0 = the first the server accepted).
    pub connection: usize,
    pub method: String,
    pub target: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FaultRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct Shared {
    fault: Mutex<Fault>,
    connections: AtomicUsize,
    open: AtomicUsize,
    requests: Mutex<Vec<FaultRequest>>,
    /// Keep at most this many requests (bodies included) in `requests`.
    keep: usize,
    seen: AtomicUsize,
}

/// An HTTP/1.1 upstream that misbehaves as told. It lives as long as the test process (its
/// threads end when their connections close).
pub struct FaultServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultServer {
    pub fn start(fault: Fault) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            fault: Mutex::new(fault),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            keep: 20_000,
            seen: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let index = sh.connections.fetch_add(1, Ordering::SeqCst);
                sh.open.fetch_add(1, Ordering::SeqCst);
                let sh = sh.clone();
                std::thread::spawn(move || {
                    serve(stream, index, sh.clone());
                    sh.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FaultServer { addr, shared }
    }

    /// Change what the next requests get.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Requests read so far (all of them, also those no longer kept).
    pub fn request_count(&self) -> usize {
        self.shared.seen.load(Ordering::SeqCst)
    }

    /// The requests read so far (the first 20,000).
    pub fn requests(&self) -> Vec<FaultRequest> {
        self.shared.requests.lock().unwrap().clone()
    }
}

fn serve(mut s: TcpStream, connection: usize, sh: Arc<Shared>) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut s, &mut buf, connection) else {
            return;
        };
        let fault = sh.fault.lock().unwrap().clone();
        let n = sh.seen.fetch_add(1, Ordering::SeqCst);
        {
            let mut kept = sh.requests.lock().unwrap();
            if kept.len() < sh.keep {
                kept.push(req);
            }
        }
        let body = |status: u16| format!("{{\"fault\":true,\"status\":{status},\"n\":{n}}}");
        let answer = |s: &mut TcpStream, status: u16| {
            let b = body(status);
            let head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                reason(status),
                b.len()
            );
            s.write_all(head.as_bytes()).is_ok()
        };
        let keep_going = match fault {
            Fault::Ok => answer(&mut s, 200),
            Fault::Status(status) => answer(&mut s, status),
            Fault::Silent => {
                // Hold the connection until the peer gives up.
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                false
            }
            Fault::SlowHead(d) => {
                std::thread::sleep(d);
                answer(&mut s, 200)
            }
            Fault::SlowBody { total, pieces, gap } => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {total}\r\n\r\n");
                let mut ok = s.write_all(head.as_bytes()).is_ok();
                let pieces = pieces.max(1);
                let mut left = total;
                for k in 0..pieces {
                    if !ok {
                        break;
                    }
                    std::thread::sleep(gap);
                    let n = if k + 1 == pieces { left } else { total / pieces };
                    ok = s.write_all(&vec![b'x'; n]).is_ok();
                    left -= n;
                }
                ok
            }
            Fault::CutBody { declared, sent } => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {declared}\r\n\r\n");
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&vec![b'x'; sent.min(declared)]);
                false
            }
            Fault::CutChunked { sent } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{sent:x}\r\n{}\r\n",
                    "x".repeat(sent)
                );
                let _ = s.write_all(head.as_bytes());
                false
            }
            Fault::Garbage => s.write_all(b"HTTP/1.1 OOPS not a status\r\n\r\n").is_ok(),
            Fault::CloseAfterRequest => false,
            Fault::CloseAfterHead => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n");
                false
            }
        };
        if !keep_going {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// Read one request (head and body: Content-Length or chunked) off the connection.
fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>, connection: usize) -> Option<FaultRequest> {
    let fill = |s: &mut TcpStream, buf: &mut Vec<u8>| -> bool {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if !fill(s, buf) {
            return None;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(&buf[..head_end]).ok()?;
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("").to_string();
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).to_string(),
            )
        })
        .collect();
    buf.drain(..head_end);
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            if let Some((body, used)) = super::client::dechunk_prefix(buf) {
                buf.drain(..used);
                break body;
            }
            if !fill(s, buf) {
                return None;
            }
        }
    } else {
        let n: usize = find("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        while buf.len() < n {
            if !fill(s, buf) {
                return None;
            }
        }
        buf.drain(..n).collect()
    };
    Some(FaultRequest {
        connection,
        method,
        target,
        headers,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Status")
}

/// An address where a connection is refused at once (nothing listens there).
pub fn refusing_addr() -> String {
    super::free_addr()
}

/// An address where a connection is never accepted: a listener whose accept queue is full, so
/// the kernel drops new SYNs and a connect runs into its timeout.
pub struct Unaccepting {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fill: Vec<socket2::Socket>,
}

impl Unaccepting {
    pub fn start() -> Unaccepting {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("an inet address");
        // Fill the accept queue (its length is backlog + 1) with connections nobody accepts.
        let mut fill = Vec::new();
        for _ in 0..3 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            s.set_nonblocking(true).expect("nonblocking");
            let _ = s.connect(&addr.into());
            fill.push(s);
        }
        // Wait until a fresh connect no longer completes.
        let probe_deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < probe_deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
                break;
            }
        }
        Unaccepting {
            addr,
            _listener: listener,
            _fill: fill,
        }
    }
}
