//! What users of nginx, Caddy or Traefik expect of a reverse proxy in front of real apps:
//! the proxy answers in its own HTTP version, `Expect: 100-continue` meets the body limit
//! cleanly, the pid file is written in the foreground, the access log goes to a file that
//! SIGUSR1 reopens.

mod common;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

/// An HTTP/1.0 upstream like python's http.server: `HTTP/1.0 200 OK`, a close-delimited body
/// (or a Content-Length with `Connection: keep-alive`), then it closes.
fn http10_upstream(with_length: bool) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).unwrap_or(0) == 0 {
                    break;
                }
                head.push(b[0]);
            }
            let resp = if with_length {
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
            } else {
                "HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.7\r\nContent-Type: text/plain\r\n\r\nhello"
            };
            let _ = s.write_all(resp.as_bytes());
        }
    });
    addr
}

#[test]
fn an_http10_upstream_does_not_downgrade_the_client() {
    let (plain, keep) = (http10_upstream(false), http10_upstream(true));
    let gw = Gw::start(&format!(
        "upstreams:\n  plain: {{ endpoints: [\"{plain}\"] }}\n  keep: {{ endpoints: [\"{keep}\"] }}\nroutes:\n  - {{ name: plain, upstream: plain, match: {{ path_prefix: /plain }} }}\n  - {{ name: keep, upstream: keep }}\n"
    ));
    for path in ["/plain", "/keep"] {
        let mut s = connect(&gw.addr, None).unwrap();
        for i in 0..2 {
            s.write_all(format!("GET {path}/{i} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .unwrap();
            let mut first = [0u8; 12];
            s.read_exact(&mut first).unwrap();
            assert_eq!(&first, b"HTTP/1.1 200", "{path}: the gateway speaks HTTP/1.1");
            let mut rest = read_response_after_status(&mut s);
            assert_eq!(rest.body, b"hello", "{path}: the whole body, framed for HTTP/1.1");
            rest.headers.retain(|(k, _)| k == "connection");
            assert!(
                rest.headers.iter().all(|(_, v)| !v.eq_ignore_ascii_case("close")),
                "{path}: the client's connection stays open: {:?}",
                rest.headers
            );
        }
    }
}

/// Read the rest of a response whose first 12 bytes (`HTTP/1.1 200`) were already read.
fn read_response_after_status(s: &mut std::net::TcpStream) -> Response {
    // Re-frame: prepend a status line prefix so read_response can parse it.
    let mut rest = Vec::new();
    let mut b = [0u8; 1];
    while !rest.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        rest.push(b[0]);
    }
    let head = format!("HTTP/1.1 200{}", String::from_utf8_lossy(&rest));
    let headers: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0u8; n];
        s.read_exact(&mut body).unwrap();
        body
    } else {
        assert_eq!(find("transfer-encoding").as_deref(), Some("chunked"), "{head}");
        let mut raw = Vec::new();
        while !raw.ends_with(b"0\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            raw.push(b[0]);
        }
        let text = String::from_utf8_lossy(&raw).to_string();
        let mut out = Vec::new();
        let mut rest = text.as_str();
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&after.as_bytes()[..n]);
            rest = &after[n + 2..];
        }
        out
    };
    Response {
        status: 200,
        headers,
        body,
    }
}

#[test]
fn expect_continue_meets_the_body_limit() {
    let up = RecordingUpstream::start();
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: small, upstream: up, max_request_body_bytes: 1KiB }}\n",
        up.addr
    ));
    // A declared length over the limit: 413 at once, instead of 100 Continue.
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"PUT /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 60000000\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s, false).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    // Chunked: the upstream says 100 Continue, the body goes over the limit → the final 413
    // JSON, not a reset.
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"PUT /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ntransfer-encoding: chunked\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let first = read_response(&mut s, false).unwrap();
    let r = if first.status == 100 {
        let chunk = format!("{:x}\r\n{}\r\n", 4096, "a".repeat(4096));
        for _ in 0..4 {
            if s.write_all(chunk.as_bytes()).is_err() {
                break;
            }
        }
        read_response(&mut s, false).unwrap()
    } else {
        first
    };
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    // The access log and the metrics record the final status, never the interim 100.
    let lines = wait_for("two access-log lines", Duration::from_secs(10), || {
        let out = gw.p.stdout_text();
        let n: Vec<String> = out
            .lines()
            .filter(|l| l.contains("\"PUT\""))
            .map(str::to_string)
            .collect();
        (n.len() >= 2).then_some(n)
    });
    assert!(lines.iter().all(|l| l.contains("\"status\":413")), "{lines:?}");
    let m = gw.metrics();
    assert_eq!(metric(&m, "portico_requests_total", &[("status", "100")]), 0.0);
    assert_eq!(metric(&m, "portico_requests_total", &[("status", "413")]), 2.0);
}

#[test]
fn the_pid_file_is_written_in_the_foreground() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    ));
    let pid = std::fs::read_to_string(gw.p.dir.file("portico.pid")).expect("the pid file");
    assert_eq!(pid.trim(), gw.p.pid().to_string());
}

#[test]
fn sigusr1_reopens_the_access_log_file_and_loses_no_line() {
    let up = EchoServer::start("up").unwrap();
    let dir = TempDir::new("alog");
    let log = dir.file("access.log");
    let gw = Gw::start(&format!(
        "access_log: {{ format: json, path: {} }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        log.display(),
        up.addr
    ));
    let lines = |p: &std::path::Path| std::fs::read_to_string(p).map(|t| t.lines().count()).unwrap_or(0);
    let mut sent = 0;
    for _ in 0..10 {
        assert_eq!(gw.get("/before").status, 200);
        sent += 1;
    }
    wait_for("the first lines in the file", Duration::from_secs(10), || {
        (lines(&log) == 10).then_some(())
    });
    assert!(gw.p.stdout_text().is_empty(), "nothing on stdout when a path is set");
    // logrotate: move the file away, then USR1.
    let rotated = dir.file("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    gw.p.signal("USR1");
    wait_for("the reopened file", Duration::from_secs(10), || {
        assert_eq!(gw.get("/after").status, 200);
        sent += 1;
        log.exists().then_some(())
    });
    for _ in 0..5 {
        assert_eq!(gw.get("/after").status, 200);
        sent += 1;
    }
    wait_for("every line in one file or the other", Duration::from_secs(10), || {
        (lines(&rotated) + lines(&log) == sent).then_some(())
    });
    assert!(lines(&rotated) >= 10, "the moved file keeps its lines");
    assert!(lines(&log) >= 5, "later lines go to the new file");
}

/// An upstream that answers `/json` with a 100 KB JSON document, uncompressed, and `/gz` with a
/// body it compressed itself.
fn json_upstream() -> (std::net::SocketAddr, Vec<u8>) {
    let doc: Vec<u8> = serde_json::to_vec(
        &(0..2000)
            .map(|i| serde_json::json!({"id": i, "name": format!("item number {i}"), "ok": i % 3 == 0}))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(doc.len() > 60_000);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let body = doc.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || loop {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let (ce, payload): (&str, Vec<u8>) = if text.starts_with("GET /gz") {
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    e.write_all(&body).unwrap();
                    ("content-encoding: gzip\r\n", e.finish().unwrap())
                } else {
                    ("", body.clone())
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{ce}content-length: {}\r\n\r\n",
                    payload.len()
                );
                if s.write_all(resp.as_bytes()).is_err() || s.write_all(&payload).is_err() {
                    return;
                }
            });
        }
    });
    (addr, doc)
}

#[test]
fn compression_at_the_gateway() {
    let (up, doc) = json_upstream();
    let gw = Gw::start(&format!(
        "compression: {{ algorithms: [zstd, br, gzip] }}\nupstreams:\n  up: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: plain, upstream: up, match: {{ path_prefix: /off }}, compression: off }}\n  - {{ name: r, upstream: up }}\n"
    ));
    let fetch = |path: &str, ae: Option<&str>| {
        let mut r = Request::get(path);
        if let Some(ae) = ae {
            r = r.header("accept-encoding", ae);
        }
        gw.send(r)
    };
    // Each algorithm as asked, decoding to the very bytes the upstream sent.
    // (br is never offered: Pingora 0.9.1's brotli encoder does not end its stream.)
    for (ae, want) in [
        ("gzip", "gzip"),
        ("zstd", "zstd"),
        ("gzip, br, zstd", "zstd"),
        ("br, gzip", "gzip"),
        ("gzip;q=1, zstd;q=0.5", "gzip"),
    ] {
        let r = fetch("/json", Some(ae));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some(want), "Accept-Encoding: {ae}");
        assert!(r.body.len() < doc.len() / 3, "compressed: {} bytes", r.body.len());
        let decoded = match want {
            "gzip" => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&r.body[..]).read_to_end(&mut out).unwrap();
                out
            }
            _ => zstd::decode_all(&r.body[..]).unwrap(),
        };
        assert!(decoded == doc, "{want}: decodes to the upstream's bytes");
        let vary: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "vary")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(vary.len(), 1, "{vary:?}");
        assert!(vary[0].to_ascii_lowercase().contains("accept-encoding"));
    }
    // Without Accept-Encoding (or refusing everything): identity.
    for ae in [None, Some("gzip;q=0, br;q=0, zstd;q=0"), Some("identity"), Some("br")] {
        let r = fetch("/json", ae);
        assert_eq!(r.header("content-encoding"), None, "{ae:?}");
        assert!(r.body == doc);
    }
    // Already compressed by the upstream: passed on as it is, never twice.
    let r = fetch("/gz", Some("gzip, br"));
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..]).read_to_end(&mut out).unwrap();
    assert!(out == doc, "decodes once to the document");
    // A route with `compression: off`.
    assert_eq!(fetch("/off/json", Some("gzip")).header("content-encoding"), None);
}

/// An app behind `strip_prefix: /files` that redirects in its own terms, as python's
/// http.server does for a directory without its slash.
fn redirecting_upstream() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).unwrap_or(0) == 0 {
                    break;
                }
                head.push(b[0]);
            }
            let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let resp = match path.as_str() {
                "/sub" => format!("HTTP/1.1 301 Moved\r\nLocation: http://{addr}/sub/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
                "/rel" => "HTTP/1.1 302 Found\r\nLocation: /sub/?from=rel\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
                "/away" => "HTTP/1.1 302 Found\r\nLocation: https://example.org/elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
                p => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{p}", p.len()),
            };
            let _ = s.write_all(resp.as_bytes());
        }
    });
    addr
}

#[test]
fn redirects_behind_a_rewrite_are_followable() {
    let up = redirecting_upstream();
    let gw = Gw::start(&format!(
        "upstreams:\n  app: {{ endpoints: [\"{up}\"] }}\nroutes:\n  - {{ name: files, upstream: app, match: {{ path_prefix: /files }}, rewrite: {{ strip_prefix: /files }} }}\n  - {{ name: raw, upstream: app, match: {{ path_prefix: /raw }}, rewrite: {{ strip_prefix: /raw }}, rewrite_location: false }}\n"
    ));
    let host = "gw.example:8080";
    let r = gw.send(Request::get("/files/sub").header("host", host));
    assert_eq!(r.status, 301);
    let loc = r.header("location").unwrap().to_string();
    assert_eq!(
        loc,
        format!("http://{host}/files/sub/"),
        "the app's own address becomes the gateway's"
    );
    // Follow it through the gateway.
    let path = loc.strip_prefix(&format!("http://{host}")).unwrap();
    let next = gw.send(Request::get(path).header("host", host));
    assert_eq!((next.status, next.text().as_str()), (200, "/sub/"));
    // A relative Location is mapped back through the rewrite too.
    let r = gw.send(Request::get("/files/rel").header("host", host));
    assert_eq!(r.header("location"), Some("/files/sub/?from=rel"));
    // A Location elsewhere is left alone; and a route can switch the mapping off.
    assert_eq!(
        gw.send(Request::get("/files/away")).header("location"),
        Some("https://example.org/elsewhere")
    );
    assert_eq!(
        gw.send(Request::get("/raw/rel")).header("location"),
        Some("/sub/?from=rel")
    );
}

/// An upstream named by a host name follows the name when it moves (Docker, Kubernetes), with
/// no failed request; a name that stops resolving keeps its last good address.
#[test]
fn upstream_names_are_resolved_again() {
    use portico::resolver::MapResolver;
    // Two instances of "the service" on one port, at two loopback addresses.
    let first = EchoServer::start_on("127.0.0.1:0".parse().unwrap(), "first").unwrap();
    let port = first.addr.port();
    let second = match EchoServer::start_on(format!("127.0.0.3:{port}").parse().unwrap(), "second") {
        Ok(s) => s,
        Err(e) => panic!("127.0.0.3:{port} is taken ({e}); rerun"),
    };
    let resolver = std::sync::Arc::new(MapResolver::default());
    resolver.set("svc.test", "127.0.0.1".parse().unwrap());
    let resources = portico::resources::Resources::with_resolver(resolver.clone());
    let gw = InProcess::start_with(
        &format!(
            "upstreams:\n  svc: {{ endpoints: [\"svc.test:{port}\"], resolve_every: 200ms }}\nroutes:\n  - {{ name: r, upstream: svc }}\n"
        ),
        portico::Registry::builtin(),
        Some(resources),
    );
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (addr, failures, stop) = (gw.addr.clone(), failures.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(&addr, "/x") {
                    Ok(r) if r.status == 200 => {}
                    _ => {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        })
    };
    assert_eq!(service(&get(&gw.addr, "/x").unwrap()), "first");
    resolver.set("svc.test", "127.0.0.3".parse().unwrap());
    let start = std::time::Instant::now();
    wait_for("the new address to be used", Duration::from_secs(10), || {
        (service(&get(&gw.addr, "/x").unwrap()) == "second").then_some(())
    });
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "followed within resolve_every (+ slack): {took:?}"
    );
    // The name stops resolving: the last good address stays in use.
    resolver.remove("svc.test");
    let mark = resolver.lookups();
    wait_for("two failed lookups", Duration::from_secs(10), || {
        (resolver.lookups() >= mark + 2).then_some(())
    });
    assert_eq!(service(&get(&gw.addr, "/x").unwrap()), "second");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    hammer.join().unwrap();
    assert_eq!(
        failures.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no request failed"
    );
    assert!(second.requests() > 0);
}

/// `Expect: 100-continue` is answered by Portico once the request phase has accepted the
/// request (as nginx does), and not passed on: an upstream that ignores it (the echo service
/// does) no longer leaves the client waiting its expect timeout (attack-c D8).
#[test]
fn expect_continue_is_answered_by_the_gateway() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    ));
    for framing in ["content-length: 5", "transfer-encoding: chunked"] {
        let mut s = connect(&gw.addr, None).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("POST /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n{framing}\r\n\r\n").as_bytes())
            .unwrap();
        let first = read_response(&mut s, true).expect("an interim 100 before the body is sent");
        assert_eq!(first.status, 100, "{framing}");
        let body: &[u8] = if framing.starts_with("content") {
            b"hello"
        } else {
            b"5\r\nhello\r\n0\r\n\r\n"
        };
        s.write_all(body).unwrap();
        let r = read_response(&mut s, false).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.json();
        assert_eq!(echo["body_bytes"], 5);
        assert!(echo["headers"].get("expect").is_none(), "{echo}");
    }
    // A request without a body, or in HTTP/1.0, gets no 100.
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s, false).unwrap().status, 200);
}
