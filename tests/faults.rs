//! Acceptance [8/12] #7: each upstream fault gives its status within its deadline (±20%), no
//! truncated body is ever presented as complete, a connection that spoke garbage is not pooled,
//! and nothing panics.

mod common;
use common::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// One GET on a fresh connection: how long until the answer was complete or the connection
/// closed, the raw bytes, and whether the gateway closed the connection.
fn exchange(addr: &str, path: &str) -> (Duration, Vec<u8>, bool) {
    let mut s = connect(addr, None).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let t = Instant::now();
    write!(s, "GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (t.elapsed(), out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (t.elapsed(), out, false),
        }
        if complete(&out) {
            return (t.elapsed(), out, false);
        }
    }
}

/// Whether `raw` holds a complete response by its own framing.
fn complete(raw: &[u8]) -> bool {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let body = &raw[head_end..];
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.windows(5).any(|w| w == b"0\r\n\r\n");
    }
    false
}

fn status_of(raw: &[u8]) -> u16 {
    String::from_utf8_lossy(raw)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn body_json(raw: &[u8]) -> serde_json::Value {
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    serde_json::from_slice(&raw[at..]).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(raw)))
}

/// `took` is within ±20% of `deadline`.
fn near(took: Duration, deadline: Duration, what: &str) {
    eprintln!("{what}: {took:?} (deadline {deadline:?})");
    let (lo, hi) = (deadline.mul_f64(0.8), deadline.mul_f64(1.2));
    assert!(
        took >= lo && took <= hi,
        "{what}: took {took:?}, deadline {deadline:?} ±20%"
    );
}

#[test]
fn upstream_faults_get_their_status_in_time() {
    let silent = FaultServer::start(Fault::Silent);
    let slow_head = FaultServer::start(Fault::SlowHead(Duration::from_secs(5)));
    let trickle = FaultServer::start(Fault::SlowBody {
        total: 4000,
        pieces: 4,
        gap: Duration::from_millis(200),
    });
    let stall = FaultServer::start(Fault::SlowBody {
        total: 4000,
        pieces: 2,
        gap: Duration::from_secs(4),
    });
    let cut = FaultServer::start(Fault::CutBody {
        declared: 100_000,
        sent: 1000,
    });
    let cut_chunked = FaultServer::start(Fault::CutChunked { sent: 1000 });
    let garbage = FaultServer::start(Fault::Garbage);
    let hang_up = FaultServer::start(Fault::CloseAfterRequest);
    let head_only = FaultServer::start(Fault::CloseAfterHead);
    let ok = FaultServer::start(Fault::Ok);
    let unaccepting = Unaccepting::start();
    let refused = refusing_addr();
    let t = "timeouts: { connect: 1s, read: 1s }";
    let up = |name: &str, endpoints: String, retries: &str| {
        format!("  {name}:\n    endpoints: [{endpoints}]\n    {t}\n    retries: {retries}\n")
    };
    let body = format!(
        "upstreams:\n{}{}{}{}{}{}{}{}{}{}{}{}{}routes:\n{}",
        up("refused", format!("\"{refused}\""), "1"),
        up("refused_then_ok", format!("\"{refused}\", \"{}\"", ok.addr), "1"),
        up("unaccepting", format!("\"{}\"", unaccepting.addr), "0"),
        up("unaccepting_retried", format!("\"{}\"", unaccepting.addr), "1"),
        up("silent", format!("\"{}\"", silent.addr), "0"),
        up("slow_head", format!("\"{}\"", slow_head.addr), "0"),
        up("trickle", format!("\"{}\"", trickle.addr), "0"),
        up("stall", format!("\"{}\"", stall.addr), "0"),
        up("cut", format!("\"{}\"", cut.addr), "0"),
        up("cut_chunked", format!("\"{}\"", cut_chunked.addr), "0"),
        up("garbage", format!("\"{}\"", garbage.addr), "0"),
        up("hang_up", format!("\"{}\"", hang_up.addr), "0"),
        up("head_only", format!("\"{}\"", head_only.addr), "0"),
        [
            "refused",
            "refused_then_ok",
            "unaccepting",
            "unaccepting_retried",
            "silent",
            "slow_head",
            "trickle",
            "stall",
            "cut",
            "cut_chunked",
            "garbage",
            "hang_up",
            "head_only"
        ]
        .iter()
        .map(|n| format!("  - {{ name: {n}, upstream: {n}, match: {{ path_prefix: /{n} }} }}\n"))
        .collect::<String>()
    );
    let gw = Gw::start(&body);
    let second = Duration::from_secs(1);

    // Nothing listens: 502 at once (the retry to the same dead endpoint is refused too).
    let (took, raw, _) = exchange(&gw.addr, "/refused");
    assert_eq!(status_of(&raw), 502, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(body_json(&raw)["error"], "upstream_unavailable");
    assert!(took < Duration::from_millis(500), "refused took {took:?}");
    // With another endpoint, the refused one's turns are retried there.
    for _ in 0..6 {
        let (_, raw, _) = exchange(&gw.addr, "/refused_then_ok");
        assert_eq!(status_of(&raw), 200, "{}", String::from_utf8_lossy(&raw));
    }

    // The connection is never accepted: 504 at the connect timeout, twice that with a retry.
    let (took, raw, _) = exchange(&gw.addr, "/unaccepting");
    assert_eq!(status_of(&raw), 504, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(body_json(&raw)["error"], "upstream_timeout");
    near(took, second, "connect timeout");
    let (took, raw, _) = exchange(&gw.addr, "/unaccepting_retried");
    assert_eq!(status_of(&raw), 504);
    near(took, 2 * second, "connect timeout, retried once");

    // Accepted, never answered; a head slower than the read timeout: 504 at the read timeout.
    for path in ["/silent", "/slow_head"] {
        let (took, raw, _) = exchange(&gw.addr, path);
        assert_eq!(status_of(&raw), 504, "{path}: {}", String::from_utf8_lossy(&raw));
        assert_eq!(body_json(&raw)["error"], "upstream_timeout");
        near(took, second, path);
    }

    // A body trickled within the read timeout arrives whole; one that stalls past it is cut:
    // the client's connection closes at the read timeout, short of the declared length.
    let (_, raw, closed) = exchange(&gw.addr, "/trickle");
    assert!(complete(&raw) && !closed, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(status_of(&raw), 200);
    let (took, raw, closed) = exchange(&gw.addr, "/stall");
    assert_eq!(status_of(&raw), 200, "the head had gone to the client");
    assert!(
        closed && !complete(&raw),
        "a stalled body is never presented as complete"
    );
    near(took, second, "stalled body");

    // Cut mid-body: the client gets the head and what arrived, then the connection closes,
    // before the declared length (or, chunked, without the last chunk).
    for path in ["/cut", "/cut_chunked", "/head_only"] {
        let (took, raw, closed) = exchange(&gw.addr, path);
        assert_eq!(status_of(&raw), 200, "{path}");
        assert!(closed, "{path}: the connection must close");
        assert!(
            !complete(&raw),
            "{path}: presented as complete: {}",
            String::from_utf8_lossy(&raw)
        );
        assert!(took < second, "{path} took {took:?}");
    }

    // An upstream that hangs up after reading the request: 502 at once.
    let (took, raw, _) = exchange(&gw.addr, "/hang_up");
    assert_eq!(status_of(&raw), 502);
    assert_eq!(body_json(&raw)["error"], "upstream_unavailable");
    assert!(took < Duration::from_millis(500), "hang-up took {took:?}");

    // A garbage status line: 502, and that connection is not pooled (the server keeps it open,
    // so a pooled one would carry the next request).
    let (took, raw, _) = exchange(&gw.addr, "/garbage");
    assert_eq!(status_of(&raw), 502, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(body_json(&raw)["error"], "upstream_unavailable");
    assert!(took < Duration::from_millis(500), "garbage took {took:?}");
    garbage.set(Fault::Ok);
    for _ in 0..3 {
        let (_, raw, _) = exchange(&gw.addr, "/garbage");
        assert_eq!(status_of(&raw), 200);
    }
    let seen = garbage.requests();
    assert_eq!(seen.len(), 4);
    assert!(
        seen[1..].iter().all(|r| r.connection != seen[0].connection),
        "a request went on the connection that answered garbage: {:?}",
        seen.iter().map(|r| r.connection).collect::<Vec<_>>()
    );

    // Every fault was a failure counted against its route, and nothing panicked (Gw's drop).
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            "portico_requests_total",
            &[("route", "unaccepting"), ("status", "504")]
        ),
        1.0
    );
}

/// An upstream that answers before reading the body (a 401 to an upload) ends the exchange;
/// the client, with its whole answer, closes while the gateway still reads the body it no
/// longer needs. Nothing failed: the access log shows the 401 and no error (trial-v5 F5: it
/// showed `client_closed`, the 499 family that alerting watches).
#[test]
fn an_answer_before_the_body_is_read_is_no_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { break };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = c.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 5\r\nconnection: close\r\n\r\nnope\n");
        }
    });
    let gw = Gw::start(&format!(
        "upstreams:\n  up:\n    endpoints: [\"{addr}\"]\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    let mut s = connect(&gw.addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\nx-request-id: early-401\r\ncontent-length: 1000000\r\n\r\n")
        .unwrap();
    s.write_all(&[b'a'; 64 << 10]).unwrap();
    let r = read_response(&mut s, false).expect("the upstream's answer");
    assert_eq!(r.status, 401, "{}", r.text());
    drop(s);
    let line = gw.access_line("early-401");
    assert!(
        line.contains("\"status\":401") && line.contains("\"error\":null"),
        "{line}"
    );
}

/// A 101 to a request that asked for no upgrade is a broken answer: 502, and nothing the
/// upstream sends after it reaches the client (nginx passes the 101 on).
#[test]
fn an_unasked_protocol_switch_is_a_broken_answer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { break };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nSMUGGLED",
            );
            held.push(c);
        }
    });
    let gw = Gw::start(&format!(
        "upstreams:\n  up:\n    endpoints: [\"{addr}\"]\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    let (_, raw, _) = exchange(&gw.addr, "/plain");
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(status_of(&raw), 502, "{text}");
    assert_eq!(body_json(&raw)["error"], "upstream_unavailable", "{text}");
    assert!(!text.contains("SMUGGLED"), "{text}");
}
