//! What a user moving from nginx found different, in front of real apps (gunicorn/Flask,
//! python's http.server): HTTP/1.0 clients, compression of partial and streamed answers, HEAD
//! under compression, redirects naming the app's own address.

mod common;
use common::*;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A text body big enough to be compressed (over the default `min_length`).
fn text(n: usize) -> String {
    "all work and no play makes jack a dull boy\n".repeat(n / 43 + 1)[..n].to_string()
}

/// Read one request head from `s` (byte by byte: the tests' upstreams serve one request per
/// connection, so nothing is read past it).
fn read_head(s: &mut std::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// An upstream that answers each request with what `answer` makes of its head (the whole
/// response, bytes), then closes the connection.
fn scripted(answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || {
                if let Some(head) = read_head(&mut s) {
                    let _ = s.write_all(&answer(&head));
                }
            });
        }
    });
    addr
}

/// The request line's path.
fn path_of(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or("/")
}

/// Split a raw response into its head (lower-case) and the bytes after it.
fn split(raw: &[u8]) -> (String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)))
        + 4;
    (
        String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase(),
        raw[end..].to_vec(),
    )
}

const COMPRESS_TEXT: &str = "compression: { algorithms: [gzip], content_types: [\"text/*\", application/json] }\n";

/// D1: an HTTP/1.0 client does not know chunked (RFC 9112 §6.1): whatever the upstream's
/// framing, and with compression configured, it gets a close-delimited body (or a
/// Content-Length) and an uncompressed one (nginx: `gzip_http_version 1.1`).
#[test]
fn http10_clients_never_get_chunked_or_compressed_bodies() {
    let big = text(20_000);
    let body = big.clone();
    let up = scripted(move |head| match path_of(head) {
        // A generator behind gunicorn: chunked.
        "/chunked" => {
            let (a, b) = body.split_at(7000);
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            )
            .into_bytes()
        }
        // python's http.server: HTTP/1.0, close-delimited.
        "/close" => format!("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n{body}").into_bytes(),
        // A plain answer with its length, which compression would make chunked.
        _ => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    });
    let gw = Gw::start(&format!(
        "{COMPRESS_TEXT}upstreams:\n  up: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    for path in ["/chunked", "/close", "/big"] {
        for keep_alive in [false, true] {
            let req = format!(
                "GET {path} HTTP/1.0\r\nhost: x\r\naccept-encoding: gzip\r\n{}\r\n",
                if keep_alive { "connection: keep-alive\r\n" } else { "" }
            );
            let raw = raw(&gw.addr, req.as_bytes(), Duration::from_secs(10)).unwrap();
            let (head, got) = split(&raw);
            assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
            assert!(
                !head.contains("transfer-encoding"),
                "{path}: no chunked for HTTP/1.0: {head}"
            );
            assert!(
                !head.contains("content-encoding"),
                "{path}: not compressed for HTTP/1.0: {head}"
            );
            if !head.contains("content-length") {
                assert!(
                    head.contains("connection: close"),
                    "{path}: a close-delimited body says so: {head}"
                );
            }
            assert!(
                got == big.as_bytes(),
                "{path}: the body as sent, unframed ({} bytes)",
                got.len()
            );
        }
    }
    // HTTP/1.1 clients still get both.
    let r = gw.send(Request::get("/chunked").header("accept-encoding", "gzip"));
    assert_eq!(r.header("content-encoding"), Some("gzip"));
}

/// D4: a 206 (or any answer with a Content-Range) is never compressed: its range describes
/// the identity bytes (nginx does the same).
#[test]
fn partial_content_is_never_compressed() {
    let body = text(3001);
    let up = scripted(move |head| {
        let status = if path_of(head) == "/range" {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-range: bytes 0-3000/5001\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    });
    let gw = Gw::start(&format!(
        "{COMPRESS_TEXT}upstreams:\n  up: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    for path in ["/range", "/odd"] {
        let r = gw.send(
            Request::get(path)
                .header("range", "bytes=0-3000")
                .header("accept-encoding", "gzip"),
        );
        assert_eq!(r.header("content-encoding"), None, "{path}");
        assert_eq!(r.header("content-range"), Some("bytes 0-3000/5001"));
        assert_eq!(r.body.len(), 3001, "{path}: the identity bytes of the range");
    }
}

/// D6: server-sent events are never compressed — compression buffers, and an event stream
/// must reach the client as each event is sent. The upstream holds its second event until
/// the client has the first.
#[test]
fn event_streams_are_not_compressed_and_arrive_as_sent() {
    let got_first = Arc::new(AtomicBool::new(false));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = listener.local_addr().unwrap();
    let flag = got_first.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let flag = flag.clone();
            std::thread::spawn(move || {
                if read_head(&mut s).is_none() {
                    return;
                }
                let event = |n: u32| {
                    let data = format!("data: event {n} {}\n\n", text(2000).replace('\n', " "));
                    format!("{:x}\r\n{data}\r\n", data.len())
                };
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(format!("{head}{}", event(1)).as_bytes()).is_err() {
                    return;
                }
                // Until the client read the first event (or the test gave up).
                let end = std::time::Instant::now() + Duration::from_secs(10);
                while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = s.write_all(format!("{}0\r\n\r\n", event(2)).as_bytes());
            });
        }
    });
    let gw = Gw::start(&format!(
        "{COMPRESS_TEXT}upstreams:\n  up: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    let mut s = connect(&gw.addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(&seen).contains("data: event 1") {
        let n = s.read(&mut buf).unwrap_or_else(|e| {
            panic!(
                "the first event never came alone ({e}): {:?}",
                String::from_utf8_lossy(&seen)
            )
        });
        assert!(n > 0, "closed before the first event");
        seen.extend_from_slice(&buf[..n]);
    }
    got_first.store(true, Ordering::SeqCst);
    let (head, _) = split(&seen);
    assert!(!head.contains("content-encoding"), "{head}");
}

/// D8: HEAD announces what GET would send: the same Content-Encoding, no stale length.
#[test]
fn head_announces_the_compression_get_would_use() {
    let body = text(20_000);
    let up = scripted(move |head| {
        let is_head = head.starts_with("HEAD");
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: \"v1\"\r\ncontent-length: {}\r\n\r\n{}",
            body.len(),
            if is_head { "" } else { body.as_str() }
        )
        .into_bytes()
    });
    let gw = Gw::start(&format!(
        "{COMPRESS_TEXT}upstreams:\n  up: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    let get = gw.send(Request::get("/big").header("accept-encoding", "gzip"));
    let head = gw.send(Request::new("HEAD", "/big").header("accept-encoding", "gzip"));
    assert_eq!(get.header("content-encoding"), Some("gzip"));
    for name in ["content-encoding", "content-length", "etag", "vary"] {
        assert_eq!(
            head.header(name),
            get.header(name),
            "{name}: {:?} vs {:?}",
            head.headers,
            get.headers
        );
    }
}

/// D7: an absolute Location naming the app's own address is the gateway's on every proxied
/// route (nginx's implicit `proxy_redirect default`), the protocol-relative form too;
/// `rewrite_location: false` keeps it as the app wrote it.
#[test]
fn redirects_naming_the_app_are_rewritten_on_plain_routes() {
    let up = scripted(|head| {
        let me = head
            .lines()
            .find_map(|l| l.strip_prefix("host: ").or_else(|| l.strip_prefix("Host: ")))
            .unwrap_or("")
            .trim()
            .to_string();
        let p = path_of(head);
        let loc = if p.ends_with("/pr") {
            format!("//{me}/api/echo")
        } else {
            format!("http://{me}/api/echo")
        };
        format!("HTTP/1.1 302 Found\r\nlocation: {loc}\r\ncontent-length: 0\r\n\r\n").into_bytes()
    });
    let gw = Gw::start(&format!(
        "upstreams:\n  app: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: raw, upstream: app, match: {{ path_prefix: /raw }}, rewrite_location: false }}\n  - {{ name: plain, upstream: app }}\n"
    ));
    let host = "gw.example:8080";
    let r = gw.send(Request::get("/go").header("host", host));
    assert_eq!(r.header("location"), Some(format!("http://{host}/api/echo").as_str()));
    let r = gw.send(Request::get("/go/pr").header("host", host));
    assert_eq!(r.header("location"), Some(format!("//{host}/api/echo").as_str()));
    let r = gw.send(Request::get("/raw").header("host", host));
    assert_eq!(r.header("location"), Some(format!("http://{up}/api/echo").as_str()));
}

/// D8: the answers the edge layer writes itself (431, 400, 505) carry a Date, as every other
/// answer does; an HTTP/2 preface on a listener without `http2: true` gets nginx's 505.
#[test]
fn edge_answers_carry_a_date_and_h2c_without_http2_is_named() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "limits: {{ max_request_header_bytes: 4KiB }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    ));
    let big = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(8000));
    let bare_lf = "GET / HTTP/1.1\nhost: x\n\n".to_string();
    for (req, status) in [(big, "431"), (bare_lf, "400")] {
        let (head, _) = split(&raw(&gw.addr, req.as_bytes(), Duration::from_secs(10)).unwrap());
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
    }
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    let raw = raw(&gw.addr, &preface, Duration::from_secs(10)).unwrap();
    let (head, body) = split(&raw);
    assert!(head.starts_with("http/1.1 505"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "http_version_not_supported");
    assert!(json["message"].as_str().unwrap().contains("http2: true"), "{json}");
    wait_for("the logged reason", Duration::from_secs(10), || {
        gw.p.logs().contains("HTTP/2 connection preface").then_some(())
    });
}

/// D8: a client that goes away before its answer is logged and counted as 499
/// (`client_closed`), as nginx logs it — not as status 0.
#[test]
fn a_client_that_goes_away_is_a_499() {
    let slow = FaultServer::start(Fault::SlowHead(Duration::from_secs(3)));
    let gw = Gw::start(&format!(
        "access_log: {{ format: json }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        slow.addr
    ));
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    wait_for("the request upstream", Duration::from_secs(10), || {
        (slow.request_count() == 1).then_some(())
    });
    drop(s);
    let line = wait_for("the access-log line", Duration::from_secs(10), || {
        gw.p.stdout_text()
            .lines()
            .find(|l| l.contains("/slow"))
            .map(str::to_string)
    });
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["status"], 499, "{line}");
    assert_eq!(record["error"], "client_closed", "{line}");
    let m = gw.metrics();
    assert_eq!(metric(&m, "portico_requests_total", &[("status", "499")]), 1.0, "{m}");
    assert_eq!(metric(&m, "portico_requests_total", &[("status", "0")]), 0.0, "{m}");
}

/// D8: the pid file goes at exit (as nginx's does).
#[test]
fn the_pid_file_is_removed_at_exit() {
    let up = EchoServer::start("up").unwrap();
    let mut gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    ));
    let pid_file = gw.p.dir.file("portico.pid");
    assert!(pid_file.exists());
    gw.expect_exit = true;
    gw.p.signal("TERM");
    assert_eq!(gw.p.wait_exit(Duration::from_secs(30)), Some(0), "{}", gw.p.logs());
    assert!(!pid_file.exists(), "the pid file is left behind");
}

/// D8: `-u` with no running Portico says so at once (not "EAGAIN" after 5 s), and
/// `portico health` names the URL once.
#[test]
fn upgrade_without_an_old_process_and_health_errors_are_clear() {
    let dir = TempDir::new("nold");
    let config = dir.write(
        "portico.yaml",
        &format!(
            "{}upstreams:\n  up: {{ endpoints: [\"127.0.0.1:9\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
            head(dir.path(), "127.0.0.1:0", "127.0.0.2:0")
        ),
    );
    let start = std::time::Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["-u", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(start.elapsed() < Duration::from_secs(3), "answered at once");
    assert!(err.contains("-u takes over a running Portico"), "{err}");
    assert!(!err.contains("EAGAIN"), "{err}");
    let dead = format!("http://{}/healthz", free_addr());
    let out = std::process::Command::new(BIN)
        .args(["health", "--url", &dead])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches(&dead).count(), 1, "{err}");
}

/// A failed request's answer (502 here) closes the connection, and says so: Pingora never
/// keeps a client connection after a failure, and a keep-alive or pipelining client must not
/// send its next request into it (attack pass: the 502 said `keep-alive`, the next request was
/// lost).
#[test]
fn a_failed_request_says_connection_close() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{dead}\"], retries: {{ attempts: 0 }}, passive: off }}\nroutes:\n  - {{ name: r, upstream: up }}\n"
    ));
    let mut s = connect(&gw.addr, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let (head, _) = split(&raw);
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
}

/// A `Connection` header naming Host or an X-Forwarded-* header is served, as nginx serves it
/// (trial-v6: 400 "the request could not be read"): the nomination is ignored — Portico sets
/// the X-Forwarded-* headers itself — and other nominated headers are still stripped.
#[test]
fn connection_naming_a_forwarding_header_is_served() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    ));
    for nominated in [
        "X-Forwarded-For",
        "Host",
        "close, x-forwarded-host",
        "x-forwarded-proto, x-secret",
    ] {
        let r = gw.send(
            Request::get("/n")
                .header("connection", nominated)
                .header("x-secret", "s"),
        );
        assert_eq!(r.status, 200, "{nominated}: {}", r.text());
        let seen = &echoed(&r)["headers"];
        assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{nominated}: {seen}");
        assert_eq!(seen["x-forwarded-proto"], "http", "{nominated}: {seen}");
        assert!(
            seen.get("connection")
                .is_none_or(|c| !c.to_string().contains("forwarded")),
            "{seen}"
        );
        if nominated.contains("x-secret") {
            assert!(seen.get("x-secret").is_none(), "a nominated header is stripped: {seen}");
        }
    }
}
