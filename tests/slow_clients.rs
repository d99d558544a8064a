//! Slow clients over HTTP/2 and slow request bodies: `header_timeout` applies to every HTTP/2
//! header block and the preface, idle HTTP/2 connections close after `h2_idle_timeout`, and a
//! request body that stops arriving is cut after `body_timeout`.

mod common;
use bytes::Bytes;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Read until the gateway closes the connection; how long that took from `start`.
fn time_to_close(s: &mut std::net::TcpStream, start: Instant, limit: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

fn config(up: &str, limits: &str) -> String {
    format!("limits: {{ {limits} }}\nupstreams:\n  up: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n")
}

#[test]
fn unfinished_http2_header_blocks_are_closed_at_header_timeout() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start_h2c(&config(
        &up.addr.to_string(),
        "header_timeout: 2s, h2_idle_timeout: 30s",
    ));
    let addr = gw.addr.clone();
    // 40 connections send the preface, SETTINGS and a HEADERS frame without END_HEADERS.
    let slow: Vec<_> = (0..40)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = connect(&addr, Some(format!("127.0.2.{}", 1 + i).parse().unwrap())).unwrap();
                let start = Instant::now();
                let mut bytes = PREFACE.to_vec();
                bytes.extend(frame(0x4, 0, 0, &[]));
                bytes.extend(frame(0x1, 0x0, 1, &[0x82])); // `:method GET`, block unfinished
                s.write_all(&bytes).unwrap();
                time_to_close(&mut s, start, Duration::from_secs(10))
            })
        })
        .collect();
    // A client that trickles the preface itself.
    let mut trickle = connect(&addr, None).unwrap();
    let start = Instant::now();
    trickle.write_all(&PREFACE[..PREFACE.len()]).unwrap();
    trickle.write_all(&frame(0x4, 0, 0, &[])[..4]).unwrap();
    let trickled = time_to_close(&mut trickle, start, Duration::from_secs(10));
    // Meanwhile a normal HTTP/1.1 client on the same port is served.
    assert_eq!(gw.get("/fine").status, 200);
    for t in slow {
        let closed = t.join().unwrap().expect("closed within 10 s");
        assert!(
            closed >= Duration::from_millis(1800) && closed <= Duration::from_secs(3),
            "closed after {closed:?}, expected 2 s (+1 s)"
        );
    }
    let trickled = trickled.expect("the trickled frame header closed");
    assert!(trickled <= Duration::from_secs(3), "{trickled:?}");
    let m = gw.metrics();
    assert!(
        metric(
            &m,
            "portico_rejected_connections_total",
            &[("reason", "header_timeout")]
        ) >= 41.0
    );
}

#[test]
fn idle_http2_connections_close_after_h2_idle_timeout() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start_h2c(&config(&up.addr.to_string(), "header_timeout: 2s, h2_idle_timeout: 3s"));
    let mut s = connect(&gw.addr, None).unwrap();
    let start = Instant::now();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&bytes).unwrap();
    let closed = time_to_close(&mut s, start, Duration::from_secs(10)).expect("closed within 10 s");
    assert!(
        closed >= Duration::from_millis(2800) && closed <= Duration::from_secs(4),
        "closed after {closed:?}, expected 3 s (+1 s)"
    );
}

/// Send `bytes` on a new connection and wait (up to 10 s) for the answer: it and how long it took.
fn answer_to(addr: &str, bytes: &[u8]) -> (Response, Duration) {
    let mut s = connect(addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    s.write_all(bytes).unwrap();
    let r = read_response(&mut s, false).expect("an answer");
    (r, start.elapsed())
}

/// A POST whose body goes one byte at a time, `gap` before each (the pace is what is tested).
fn trickle(addr: &str, id: &str, body: &[u8], gap: Duration) -> Response {
    let mut s = connect(addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: x\r\nx-id: {id}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    for b in body {
        std::thread::sleep(gap);
        s.write_all(&[*b]).unwrap();
    }
    read_response(&mut s, false).unwrap()
}

#[test]
fn a_stalled_http1_body_gets_408_at_body_timeout() {
    let up = RecordingUpstream::start();
    let gw = Gw::start(&config(&up.addr.to_string(), "body_timeout: 2s"));
    let (r, took) = answer_to(
        &gw.addr,
        b"POST /upload HTTP/1.1\r\nhost: x\r\nx-id: stalled\r\ncontent-length: 100\r\n\r\n0123456789",
    );
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(r.json()["error"], "request_timeout");
    assert!(
        took >= Duration::from_millis(1800) && took <= Duration::from_secs(3),
        "cut after {took:?}, expected 2 s (±1 s)"
    );
    assert!(
        up.requests().iter().all(|r| r.header("x-id") != Some("stalled")),
        "the upstream never got a complete request"
    );
    // A chunked body stalls the same way.
    let (r, took) = answer_to(
        &gw.addr,
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    );
    assert_eq!(r.status, 408);
    assert!(took <= Duration::from_secs(3));
    // Bodies that keep moving are not cut, however long they take in all.
    let r = trickle(&gw.addr, "steady", b"abcd", Duration::from_millis(900));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-echo-id"), Some("steady"));
}

/// A body that stops arriving is the client's timeout whatever the upstream's read timeout:
/// 408 at `body_timeout`, never 504, and no mark against the endpoint (attack-v5 F1: with the
/// defaults, read 30 s and body_timeout 30 s, the answer was 408 or 504 at random, and each
/// stall counted as an endpoint failure). The upstream's read timeout waits for an answer to a
/// request sent whole, as nginx's `proxy_read_timeout`: a client sending slower than it, but
/// within `body_timeout`, is served (trial-v5 F3: it was cut at the read timeout).
#[test]
fn a_stalled_body_is_the_clients_timeout_whatever_the_upstreams_read_timeout() {
    let up = RecordingUpstream::start();
    for (read, body_timeout, secs) in [("1s", "1s", 1.0), ("1s", "3s", 3.0)] {
        let gw = Gw::start(&format!(
            "limits: {{ body_timeout: {body_timeout} }}\nupstreams:\n  up:\n    endpoints: [\"{up}\"]\n    timeouts: {{ read: {read} }}\n    passive: {{ consecutive_failures: 1, eject_for: 60s }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
            up = up.addr
        ));
        for i in 0..4 {
            let (r, took) = answer_to(
                &gw.addr,
                b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789",
            );
            assert_eq!(
                r.status,
                408,
                "read {read}, body_timeout {body_timeout}, #{i}: {}",
                r.text()
            );
            assert_eq!(r.json()["error"], "request_timeout");
            assert!(
                took >= Duration::from_secs_f64(secs * 0.8) && took <= Duration::from_secs_f64(secs + 2.0),
                "read {read}, body_timeout {body_timeout}: cut after {took:?}"
            );
        }
        let m = gw.metrics();
        let endpoint = up.addr.to_string();
        let labels = [("upstream", "up"), ("endpoint", endpoint.as_str())];
        assert_eq!(metric(&m, "portico_upstream_ejections_total", &labels), 0.0, "{m}");
        assert!(
            m.lines()
                .any(|l| l.starts_with("portico_upstream_ejections_total{") && l.contains(&endpoint)),
            "the endpoint's ejection count exists from the start, at 0: {m}"
        );
        // Counted with the edge layer's refusals, as HTTP/2's body timeouts are.
        let refused = metric(&m, "portico_rejected_connections_total", &[("reason", "body_timeout")]);
        assert_eq!(refused, 4.0, "{m}");
        assert_eq!(gw.get("/after").status, 200, "the endpoint still serves");
        if secs > 1.0 {
            // One byte every 1.5 s: slower than the read timeout, within body_timeout.
            let r = trickle(&gw.addr, "trickle", b"abc", Duration::from_millis(1500));
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
}

/// An upstream that stops taking a request body is the upstream's timeout (504: its write
/// timeout, here), not the client's: the client's bytes are held back, not awaited. It is
/// answered when the write timeout passes, not a read timeout later (as nginx's
/// `proxy_send_timeout`), and the upstream's connection is closed then (trial-v5 F1).
#[test]
fn an_upstream_that_stops_taking_a_body_is_the_upstreams_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { break };
            // The head (and what came with it), then nothing more is read: held open.
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = held_tx.send(c);
        }
    });
    let gw = Gw::start(&format!(
        "limits: {{ body_timeout: 30s, max_request_body_bytes: 256MiB }}\nupstreams:\n  up:\n    endpoints: [\"{addr}\"]\n    timeouts: {{ read: 20s, write: 1s }}\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    let mut s = connect(&gw.addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = s.try_clone().unwrap();
    // More than every socket buffer on the way can hold: the upload blocks on the upstream.
    let size = 128usize << 20;
    std::thread::spawn(move || {
        let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
        let _ = writer.write_all(head.as_bytes());
        let chunk = vec![b'a'; 64 << 10];
        for _ in 0..size / chunk.len() {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let r = read_response(&mut s, false).expect("an answer");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "not the read timeout (20 s): {:?}",
        start.elapsed()
    );
    // The upstream's connection was closed with the answer: what it holds ends well before
    // the read timeout would have run out.
    let mut upstream = held_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream got the request");
    upstream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match upstream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the upstream's connection is still open after {:?}", start.elapsed())
            }
            Err(_) => break, // reset: closed with unread bytes
        }
    }
}

#[test]
fn a_stalled_http2_body_is_reset_at_body_timeout() {
    let up = RecordingUpstream::start();
    let gw = Gw::start_h2c(&config(&up.addr.to_string(), "body_timeout: 2s"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = h2c_client(&gw.addr).await;
        let mut client = client.ready().await.unwrap();
        let req = http::Request::post("http://x/upload")
            .header("x-id", "stalled")
            .header("x-request-id", "h2-stalled")
            .body(())
            .unwrap();
        let (_resp, mut stream) = client.send_request(req, false).unwrap();
        stream
            .send_data(Bytes::from_static(b"some of the body"), false)
            .unwrap();
        // Stall, and watch the gateway give up on the body.
        let start = Instant::now();
        let reset = loop {
            let m = get(&gw.admin, "/metrics").unwrap().text();
            if metric(&m, "portico_rejected_connections_total", &[("reason", "body_timeout")]) >= 1.0 {
                break start.elapsed();
            }
            assert!(start.elapsed() < Duration::from_secs(6), "no body timeout");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            reset >= Duration::from_millis(1800) && reset <= Duration::from_secs(3),
            "reset after {reset:?}"
        );
        // The connection itself still serves other requests.
        let mut client = client.ready().await.unwrap();
        let req = http::Request::get("http://x/after")
            .header("x-id", "after")
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-echo-id"], "after");
    });
    assert!(
        up.requests().iter().all(|r| r.header("x-id") != Some("stalled")),
        "the upstream never got a complete request"
    );
    // Logged as the body timeout it is, as HTTP/1's (trial-v5 F4: it read as a client reset, 499).
    let line = gw.access_line("h2-stalled");
    assert!(
        line.contains("\"status\":408") && line.contains("\"error\":\"request_timeout\""),
        "{line}"
    );
    let m = gw.metrics();
    assert_eq!(
        metric(&m, "portico_rejected_connections_total", &[("reason", "body_timeout")]),
        1.0,
        "counted once: {m}"
    );
}

/// A big answer no buffer along the way can hold (client, gateway and upstream socket buffers).
fn big_upstream() -> FaultServer {
    FaultServer::start(Fault::SlowBody {
        total: 96 << 20,
        pieces: 384,
        gap: Duration::ZERO,
    })
}

/// A client that never reads its answer is cut after `send_timeout` (nginx's `send_timeout`),
/// and the upstream connection feeding it is let go (attack-c D2: both stayed open for ever).
#[test]
fn an_http1_client_that_never_reads_is_cut_at_send_timeout() {
    let up = big_upstream();
    let gw = Gw::start(&config(&up.addr.to_string(), "send_timeout: 1s"));
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    wait_for("the upstream request", Duration::from_secs(10), || {
        (up.request_count() == 1).then_some(())
    });
    let start = Instant::now();
    wait_for("the upstream connection let go", Duration::from_secs(20), || {
        (up.open_connections() == 0).then_some(())
    });
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "cut after {:?}",
        start.elapsed()
    );
    // The client connection is closed too (after what was already in flight).
    assert!(time_to_close(&mut s, Instant::now(), Duration::from_secs(20)).is_some());
    // A client that reads gets the whole answer, however long it takes.
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("after {total} bytes: {e}"),
        }
    }
    assert!(total > 96 << 20, "{total} bytes");
}

/// HTTP/2: a stream whose flow-control window the client never opens is reset after
/// `send_timeout`, and its upstream connection let go; the connection itself lives on.
#[test]
fn an_http2_stream_whose_window_stays_shut_is_cut_at_send_timeout() {
    let up = big_upstream();
    let gw = Gw::start_h2c(&config(&up.addr.to_string(), "send_timeout: 1s"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        let req = http::Request::get("http://x/big").body(()).unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let start = Instant::now();
        while up.open_connections() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the upstream connection is still held"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "cut after {:?}",
            start.elapsed()
        );
        // The body stream ends in an error (the stream was reset), not in a clean end.
        let mut body = resp.into_body();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(piece) = body.data().await {
                if let Err(e) = piece {
                    return Some(e);
                }
            }
            None
        })
        .await
        .expect("the stream was neither reset nor ended");
        assert!(ended.is_some(), "the stream ended cleanly");
    });
}
