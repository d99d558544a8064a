//! Acceptance [3/9]: header and body limits, slow clients, per-IP connection caps, HTTP/1
//! framing verdicts, and no panics.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn body(up: &EchoServer, limits: &str) -> String {
    format!(
        "limits: {{ {limits} }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: small, upstream: up, match: {{ path_prefix: /small }}, max_request_body_bytes: 1KiB }}\n  - {{ name: r, upstream: up }}\n",
        up.addr
    )
}

/// The status of the response to `bytes`, or 0 when the connection closed without one.
fn status_of(addr: &str, bytes: &[u8]) -> (u16, String) {
    let mut s = connect(addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    match read_response(&mut s, false) {
        Ok(r) => (r.status, format!("{}\r\n\r\n{}", r.status, r.text())),
        Err(e) => (0, e.to_string()),
    }
}

#[test]
fn header_and_body_limits() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(
        &up,
        "max_request_header_bytes: 8KiB, max_request_body_bytes: 64KiB",
    ));
    // A head over the limit: 431 JSON, whether one big header or many small ones.
    let big = Request::get("/x").header("x-big", "a".repeat(9000));
    let r = gw.send(big);
    assert_eq!(r.status, 431, "{}", r.text());
    assert_eq!(r.json()["error"], "request_header_too_large");
    assert!(r.json()["trace_id"].as_str().is_some_and(|t| !t.is_empty()));
    let mut many = Request::get("/x");
    for i in 0..200 {
        many = many.header(Box::leak(format!("x-h{i}").into_boxed_str()), "v");
    }
    assert_eq!(gw.send(many).status, 431);
    let long_line = format!("/{}", "a".repeat(9000));
    assert_eq!(gw.get(&long_line).status, 431);
    // Just under the limit passes.
    assert_eq!(
        gw.send(Request::get("/x").header("x-big", "a".repeat(7000))).status,
        200
    );
    assert_eq!(up.requests(), 1);

    // A body over the limit with a declared length: 413 before anything goes upstream.
    let r = gw.send(Request::new("POST", "/x").body(vec![b'a'; 70_000]));
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "payload_too_large");
    let r = gw.send(Request::new("POST", "/small").body(vec![b'a'; 2000]));
    assert_eq!(r.status, 413, "a route's own limit");
    assert_eq!(up.requests(), 1);
    // Chunked: stopped at the limit; the upstream never gets a complete oversized body.
    let mut chunked = Vec::new();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n", 4096).as_bytes());
        chunked.extend_from_slice(&[b'b'; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = gw.send(
        Request::new("POST", "/x")
            .header("transfer-encoding", "chunked")
            .body(chunked),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    assert_eq!(up.requests(), 1, "the upstream answered no oversized request");
    // Within the limit, chunked bodies pass whole.
    let r = gw.send(
        Request::new("POST", "/x")
            .header("transfer-encoding", "chunked")
            .body(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
    );
    assert_eq!(echoed(&r)["body"], "hello");
}

/// A head the framing check refuses whatever follows (a bare CR, a NUL, a folded line) is
/// refused as soon as those bytes arrive, not held until the header timeout (attack-v4 #1).
#[test]
fn heads_refused_whatever_follows_are_refused_at_once() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, "header_timeout: 30s"));
    for head in [
        "GET /a HTTP/1.1\r\nHost: x\r\n\r\r\n",
        "GET /a HTTP/1.1\r\nHost: x\r\n\rX",
        "GET /a HTTP/1.1\r\nHost: x\r\n\r\0",
        "GET /a HTTP/1.1\r\nHost: x\0",
        "GET /a HTTP/1.1\r\nHost: x\r\n X",
    ] {
        // Sent, and the connection left open: the answer must come well before 30 s.
        let t = Instant::now();
        let (status, text) = status_of(&gw.addr, head.as_bytes());
        assert_eq!(status, 400, "{head:?}: {text}");
        assert!(text.contains("bad_request"), "{head:?}: {text}");
        assert!(t.elapsed() < Duration::from_secs(5), "{head:?}: {:?}", t.elapsed());
    }
    assert_eq!(up.requests(), 0);
}

/// As nginx: empty lines before a request line are skipped (on a connection's first request
/// and between keep-alive requests, as a client that ends a body with an extra CRLF sends),
/// and a request line naming HTTP/2 or later is answered 505 with the reason.
#[test]
fn empty_lines_before_a_request_are_skipped_and_later_versions_get_505() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, ""));
    let (status, text) = status_of(&gw.addr, b"\r\n\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{text}");
    let mut s = connect(&gw.addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s, false).unwrap().status, 200);
    s.write_all(b"\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(
        read_response(&mut s, false).unwrap().status,
        200,
        "the next request on the connection"
    );
    assert_eq!(up.requests(), 3);
    for line in ["GET /d HTTP/2.0", "GET /d HTTP/3.0"] {
        let (status, text) = status_of(&gw.addr, format!("{line}\r\nHost: x\r\n\r\n").as_bytes());
        assert_eq!(status, 505, "{line}: {text}");
        assert!(
            text.contains("http_version_not_supported") && text.contains("trace_id"),
            "{text}"
        );
    }
    // A later HTTP/1 minor version is read as HTTP/1.1 (RFC 9110 §2.5), as nginx does.
    let answer = raw(
        &gw.addr,
        b"GET /v HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(up.requests(), 4);
    // A bare LF is still no empty line: refused, as any bare LF in a head.
    assert_eq!(status_of(&gw.addr, b"\nGET /e HTTP/1.1\r\nHost: x\r\n\r\n").0, 400);
    assert_eq!(up.requests(), 4);

    // Empty lines count toward no limit (attack-v5 F3), and a connection that sends nothing
    // else is closed without an answer at header_timeout, as one that sends nothing (F4).
    let gw = Gw::start(&body(&up, "max_request_header_bytes: 4KiB, header_timeout: 2s"));
    let mut flood = "\r\n".repeat(40_000).into_bytes();
    flood.extend_from_slice(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, text) = status_of(&gw.addr, &flood);
    assert_eq!(status, 200, "{text}");
    assert_eq!(up.requests(), 5);
    let mut s = connect(&gw.addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "no answer: {:?}", String::from_utf8_lossy(&got));
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "closed at header_timeout: {:?}",
        t.elapsed()
    );
}

#[test]
fn slow_heads_are_cut_at_header_timeout() {
    let up = EchoServer::start("up").unwrap();
    let timeout = Duration::from_secs(3);
    let gw = Gw::start(&body(&up, "header_timeout: 3s"));
    let addr = gw.addr.clone();
    // 200 clients trickle a head, one byte a second.
    let slow: Vec<_> = (0..200)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let from = format!("127.0.1.{}", 1 + i % 200);
                let mut s = connect(&addr, Some(from.parse().unwrap())).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let start = Instant::now();
                let head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                for b in head.iter().cycle() {
                    if s.write_all(&[*b]).is_err() {
                        break;
                    }
                    let tick = Instant::now();
                    let mut closed = false;
                    while tick.elapsed() < Duration::from_secs(1) {
                        match s.read(&mut buf) {
                            Ok(0) => {
                                closed = true;
                                break;
                            }
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if closed || start.elapsed() > Duration::from_secs(15) {
                        break;
                    }
                }
                (start.elapsed(), String::from_utf8_lossy(&got).to_string())
            })
        })
        .collect();
    // Meanwhile a normal client is served promptly.
    let mut latencies = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let t = Instant::now();
        let r = gw.get("/normal");
        latencies.push(t.elapsed());
        assert_eq!(r.status, 200);
    }
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    assert!(latencies.len() >= 20, "only {} requests in 3s", latencies.len());
    assert!(p99 < Duration::from_millis(200), "p99 {p99:?} while under slowloris");
    for t in slow {
        let (elapsed, text) = t.join().unwrap();
        let lo = timeout.mul_f64(0.8);
        let hi = timeout.mul_f64(1.2) + Duration::from_millis(300);
        assert!(elapsed >= lo && elapsed <= hi, "closed after {elapsed:?}");
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert_eq!(
        up.requests() as usize,
        latencies.len(),
        "no slow head reached the upstream"
    );
}

#[test]
fn connections_are_capped_per_client_address() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, "max_connections_per_ip: 50"));
    let open = |from: &str| -> std::io::Result<TcpStream> {
        let mut s = connect(&gw.addr, Some(from.parse().unwrap()))?;
        s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")?;
        let r = read_response(&mut s, false)?;
        if r.status != 200 {
            return Err(std::io::Error::other(format!("status {}", r.status)));
        }
        Ok(s)
    };
    let mut held: Vec<TcpStream> = (0..50).map(|_| open("127.0.0.2").expect("within the cap")).collect();
    // The 51st from the same address is refused; another address is not affected.
    assert!(open("127.0.0.2").is_err(), "the 51st connection must be refused");
    assert!(open("127.0.0.3").is_ok());
    // Closing connections frees their slots.
    held.truncate(40);
    wait_for("freed slots", Duration::from_secs(10), || open("127.0.0.2").ok());
    let rejected = metric(
        &gw.metrics(),
        "portico_rejected_connections_total",
        &[("reason", "per_ip_limit")],
    );
    assert!(rejected >= 1.0);
    drop(held);
}

#[test]
fn keepalive_requests_are_bounded() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, "keepalive_requests: 3"));
    let mut s = connect(&gw.addr, None).unwrap();
    for i in 1..=3 {
        s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let r = read_response(&mut s, false).unwrap();
        assert_eq!(r.status, 200);
        let close = r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        assert_eq!(close, i == 3, "request {i}");
    }
}

/// Portico's verdicts on ambiguous HTTP/1 framing. Each row: what is sent, the status the
/// client gets, and how many requests the upstream answers (it must never see one the client
/// did not send).
#[test]
fn framing_vectors() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, "max_request_header_bytes: 16KiB"));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let long_header = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let rows: Vec<(&str, String, u16, u64)> = vec![
        ("plain GET", "GET /a HTTP/1.1\r\nHost: x\r\n\r\n".into(), 200, 1),
        ("HTTP/1.0 GET without Host", "GET /a HTTP/1.0\r\n\r\n".into(), 200, 1),
        ("HTTP/1.0 with a body", "POST /a HTTP/1.0\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".into(), 200, 1),
        ("chunked body", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(), 200, 1),
        ("CL then TE", format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), 400, 0),
        ("TE then CL", format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{smuggled}"), 400, 0),
        ("duplicate CL, same value", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".into(), 400, 0),
        ("duplicate CL, different values", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(), 400, 0),
        ("CL as a list", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello".into(), 400, 0),
        ("CL with a plus", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello".into(), 400, 0),
        ("CL negative", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello".into(), 400, 0),
        ("CL hex", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello".into(), 400, 0),
        ("CL empty", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n".into(), 400, 0),
        ("CL overflow", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n".into(), 400, 0),
        ("TE chunked, identity", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("TE identity", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nhello".into(), 400, 0),
        ("TE gzip, chunked", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("TE twice", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("TE with a space before the colon", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("TE chunkedx", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("TE with a vertical tab", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("TE in HTTP/1.0", "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("underscore CL twin", "POST /a HTTP/1.1\r\nHost: x\r\nContent_Length: 5\r\n\r\nhello".into(), 400, 0),
        ("underscore TE twin", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400, 0),
        ("bare LF line ends", "GET /a HTTP/1.1\nHost: x\n\n".into(), 400, 0),
        ("bare CR inside a header", "GET /a HTTP/1.1\r\nHost: x\rX-Evil: 1\r\n\r\n".into(), 400, 0),
        ("NUL in a header", "GET /a HTTP/1.1\r\nHost: x\0y\r\n\r\n".into(), 400, 0),
        ("obs-fold", "GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n X-B: 2\r\n\r\n".into(), 400, 0),
        ("space in the request target", "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n".into(), 400, 0),
        ("a quote in the request target's query", "GET /a?x=\"b HTTP/1.1\r\nHost: x\r\n\r\n".into(), 400, 0),
        ("HTTP/2.0 request line over HTTP/1 (505, as nginx)", "GET /a HTTP/2.0\r\nHost: x\r\n\r\n".into(), 505, 0),
        ("two Host headers", "GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".into(), 400, 0),
        ("HTTP/1.1 without Host", "GET /a HTTP/1.1\r\n\r\n".into(), 400, 0),
        ("absolute-form, other authority", "GET http://evil/a HTTP/1.1\r\nHost: x\r\n\r\n".into(), 400, 0),
        ("chunk size overflow", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nhello\r\n0\r\n\r\n".into(), 400, 0),
        ("chunk size not hex", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(), 400, 0),
        ("one header over the limit", long_header, 431, 0),
        ("CONNECT", "CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n".into(), 405, 0),
        // Chunked grammar (RFC 9112 §7.1) that a front proxy could read another way (attack-c D6).
        ("bare LF in a chunk extension", format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x\n{smuggled}abc\r\n0\r\n\r\n"), 400, 0),
        ("a trailer line without a colon", format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n{smuggled}"), 400, 0),
        ("a space after the chunk size", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n".into(), 400, 0),
        // Request targets that are neither a path nor an http(s) URL (attack-c D8: were sent as `/`).
        ("a target without a leading slash", "GET admin HTTP/1.1\r\nHost: x\r\n\r\n".into(), 400, 0),
        ("authority-form on GET", "GET secret.test:80 HTTP/1.1\r\nHost: x\r\n\r\n".into(), 400, 0),
        ("an ftp:// target", "GET ftp://x/a HTTP/1.1\r\nHost: x\r\n\r\n".into(), 400, 0),
        (
            "Upgrade refused by the upstream, then a pipelined request",
            format!("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n{smuggled}"),
            200,
            1,
        ),
    ];
    assert!(rows.len() >= 30);
    let mut failures = Vec::new();
    for (name, bytes, want, upstream_requests) in &rows {
        let before = up.requests();
        let (status, text) = status_of(&gw.addr, bytes.as_bytes());
        // The echo service counts a request before it answers it.
        let served = up.requests() - before;
        if status != *want || served != *upstream_requests {
            failures.push(format!(
                "{name}: got {status} / upstream saw {served}, want {want} / {upstream_requests}\n{text}"
            ));
        }
        if *want >= 400 && *want != 405 && status == *want {
            let json = text.split("\r\n\r\n").nth(1).unwrap_or("");
            if !json.contains("\"trace_id\"") {
                failures.push(format!("{name}: not a JSON error body: {text}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
    assert_eq!(up.requests(), 5, "only the accepted requests, never /smuggled");
}

/// Refusals the edge layer makes before Pingora parses a request are logged like any request:
/// through the access log's own format, with what the head had (method, target, trace id).
#[test]
fn edge_refusals_are_in_the_access_log_in_its_format() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "access_log: {{ format: combined }}\n{}",
        body(&up, "header_timeout: 1s, max_request_header_bytes: 4KiB")
    ));
    // A head that stops coming: 408.
    let (status, _) = status_of(
        &gw.addr,
        b"GET /slow?x=1 HTTP/1.1\r\nHost: a\r\nX-Request-Id: slow-123\r\nUser-Agent: slowpoke\r\nX-Slo",
    );
    assert_eq!(status, 408);
    // A head too large: 431.
    let big = format!(
        "POST /big HTTP/1.1\r\nHost: a\r\nX-Request-Id: big-456\r\nX-Big: {}\r\n\r\n",
        "a".repeat(5000)
    );
    let (status, _) = status_of(&gw.addr, big.as_bytes());
    assert_eq!(status, 431);
    // A target Pingora's URI parser refuses (a `"`): 400, the JSON error with its trace id.
    let (status, text) = status_of(
        &gw.addr,
        b"GET /evil/x?a=\"b HTTP/1.1\r\nHost: a\r\nX-Request-Id: quote-789\r\n\r\n",
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"trace_id\":\"quote-789\""), "{text}");
    assert!(!text.contains("Pingora"), "{text}");
    let lines = wait_for("the refusals in the access log", Duration::from_secs(10), || {
        let out = gw.p.stdout_text();
        let found: Vec<String> = out
            .lines()
            .filter(|l| l.contains("slow-123") || l.contains("big-456") || l.contains("quote-789"))
            .map(str::to_string)
            .collect();
        (found.len() == 3).then_some(found)
    });
    let slow = lines.iter().find(|l| l.contains("slow-123")).unwrap();
    assert!(slow.contains("\"GET /slow?x=1 HTTP/1.1\" 408 "), "{slow}");
    assert!(slow.contains("\"slowpoke\""), "{slow}");
    assert!(
        slow.contains(" - - [") && slow.contains(" +0000] "),
        "Apache's timestamp: {slow}"
    );
    let big = lines.iter().find(|l| l.contains("big-456")).unwrap();
    assert!(big.contains("\"POST /big HTTP/1.1\" 431 "), "{big}");
    assert!(big.contains("route=none"), "{big}");
    let quote = lines.iter().find(|l| l.contains("quote-789")).unwrap();
    assert!(quote.contains("\"GET /evil/x?a=") && quote.contains(" 400 "), "{quote}");
    assert!(quote.contains("route=none"), "{quote}");
}

/// Responses in `bytes` (each with a Content-Length): status, lower-case headers, body.
/// A response as `split_responses` reads it: status, lower-case headers, body.
type Parsed = (u16, Vec<(String, String)>, String);

fn split_responses(mut bytes: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let body_end = (end + 4 + len).min(bytes.len());
        out.push((
            status,
            headers,
            String::from_utf8_lossy(&bytes[end + 4..body_end]).to_string(),
        ));
        bytes = &bytes[body_end..];
    }
    out
}

/// Read until the gateway closes the connection.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

fn closes(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"))
}

/// HTTP/1.1 pipelining (attack-c D4, user-a D2): requests written back to back are all
/// answered, in order, each read and checked by the edge layer like any other; only the last
/// response says `Connection: close`.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, ""));
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(
        b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /p2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          POST /p3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nx-t: 1\r\n\r\n\
          GET /p4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let got = split_responses(&read_to_close(&mut s));
    let seen: Vec<(u16, String, u64, bool)> = got
        .iter()
        .map(|(status, headers, body)| {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            (
                *status,
                v["path"].as_str().unwrap_or("").to_string(),
                v["body_bytes"].as_u64().unwrap_or(99),
                closes(headers),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (200, "/p1".to_string(), 0, false),
            (200, "/p2".to_string(), 5, false),
            (200, "/p3".to_string(), 6, false),
            (200, "/p4".to_string(), 0, true),
        ]
    );
    // HTTP/1.0 keep-alive, pipelined: both answered, then the connection closes.
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
        .unwrap();
    let got = split_responses(&read_to_close(&mut s));
    let paths: Vec<String> = got
        .iter()
        .map(|(_, _, b)| serde_json::from_str::<serde_json::Value>(b).unwrap_or_default()["path"].to_string())
        .collect();
    assert_eq!(paths, ["\"/a\"", "\"/b\""]);
}

/// A request that arrives while the one before it is still with the upstream waits its turn:
/// the first is answered 200 (it was refused 400 when the second arrived in another write),
/// then the second.
#[test]
fn a_request_sent_while_the_previous_is_in_flight_waits_its_turn() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, ""));
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"GET /first?delay_ms=400 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_for("the first request upstream", Duration::from_secs(10), || {
        (up.requests() == 1).then_some(())
    });
    s.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let got = split_responses(&read_to_close(&mut s));
    let seen: Vec<(u16, String)> = got
        .iter()
        .map(|(status, _, b)| {
            let v: serde_json::Value = serde_json::from_str(b).unwrap_or_default();
            (*status, v["path"].as_str().unwrap_or("").to_string())
        })
        .collect();
    assert_eq!(seen, vec![(200, "/first".to_string()), (200, "/second".to_string())]);
}

/// `Upgrade` that `Connection` does not name is not an upgrade (RFC 9110 §7.8, attack-c D7):
/// the request goes upstream as an ordinary one, without `Upgrade`, and what follows it is the
/// next request — never tunnelled past routing.
#[test]
fn an_upgrade_connection_does_not_name_is_not_an_upgrade() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body(&up, ""));
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n\
          GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let got = split_responses(&read_to_close(&mut s));
    assert_eq!(got.len(), 2, "{got:?}");
    let first: serde_json::Value = serde_json::from_str(&got[0].2).unwrap();
    assert_eq!(first["path"], "/ws");
    let headers = first["headers"].to_string().to_ascii_lowercase();
    assert!(
        !headers.contains("websocket") && !headers.contains("\"upgrade\""),
        "{headers}"
    );
    let second: serde_json::Value = serde_json::from_str(&got[1].2).unwrap();
    assert_eq!(second["path"], "/after");
}
