//! Upstreams for tests: one that serves set content, one that records every byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

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
        // As gunicorn and most servers do: say Continue before reading an expected body.
        if find("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
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
