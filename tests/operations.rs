//! Acceptance [1/9] #5–#7: SIGHUP reload (good, broken, under load), binary upgrade with no
//! failed request, /metrics and /healthz.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn body_to(upstream_addr: &str, extra_route: &str) -> String {
    format!(
        "upstreams:\n  u: {{ endpoints: [\"{upstream_addr}\"] }}\nroutes:\n  - {{ name: main, upstream: u, match: {{ path_prefix: /a }} }}\n{extra_route}"
    )
}

/// Requests in a loop on fresh connections until stopped; (ok, failed, first failure).
/// GETs `/a` until `stop`; every answer is also counted in `REQUESTS_SENT` (so a test can make
/// sure enough requests crossed what it does, however busy the machine).
fn hammer(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, usize, Option<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed, mut first) = (0, 0, None);
        while !stop.load(Ordering::Relaxed) {
            let answer = get(&addr, "/a");
            REQUESTS_SENT.fetch_add(1, Ordering::Relaxed);
            match answer {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => {
                    failed += 1;
                    first.get_or_insert(format!("{} {}", r.status, r.text()));
                }
                Err(e) => {
                    failed += 1;
                    first.get_or_insert(e.to_string());
                }
            }
        }
        (ok, failed, first)
    })
}

static REQUESTS_SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn sighup_reload_good_bad_and_under_load() {
    let (a, b) = (EchoServer::start("a").unwrap(), EchoServer::start("b").unwrap());
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let mut gw = Gw::start(&body_to(&a_addr, ""));
    assert_eq!(service(&gw.get("/a")), "a");

    // A changed route: new requests follow it.
    gw.reload(&body_to(&b_addr, ""));
    assert_eq!(service(&gw.get("/a")), "b");

    // A broken file: the old config keeps serving, the error is counted.
    let errors_before = metric(&gw.metrics(), "portico_config_reloads_total", &[("result", "error")]);
    gw.p.rewrite_config(&gw.config("routes: [ { name: x, upstream: nowhere } ]\n"));
    gw.p.signal("HUP");
    wait_for("the failed reload to be counted", Duration::from_secs(10), || {
        (metric(&gw.metrics(), "portico_config_reloads_total", &[("result", "error")]) > errors_before).then_some(())
    });
    assert_eq!(service(&gw.get("/a")), "b");
    assert!(gw.p.alive());

    // The same through the admin endpoint: 400 with the located errors.
    let r = Request::new("POST", "/reload").send(&gw.admin).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("routes[0].upstream"), "{}", r.text());

    // Requests running across several reloads see no failure.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3).map(|_| hammer(gw.addr.clone(), stop.clone())).collect();
    // At least six reloads, and as many more as it takes for 60 requests to cross them (a
    // busy machine may run the reloads faster than the clients).
    let sent_before = REQUESTS_SENT.load(Ordering::Relaxed);
    let started = std::time::Instant::now();
    let mut i = 0;
    while i < 6
        || (REQUESTS_SENT.load(Ordering::Relaxed) < sent_before + 60 && started.elapsed() < Duration::from_secs(60))
    {
        let target = if i % 2 == 0 { &a_addr } else { &b_addr };
        gw.reload(&body_to(
            target,
            &format!("  - {{ name: extra{i}, upstream: u, match: {{ path_prefix: /x{i} }} }}\n"),
        ));
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f, first) = c.join().unwrap();
        ok += o;
        failed += f;
        assert_eq!(f, 0, "first failure: {first:?}");
    }
    assert_eq!(failed, 0);
    assert!(ok > 20, "only {ok} requests ran");
    // A change to the listeners is reported, not applied.
    let before = gw.config_hash();
    let text = gw
        .config(&body_to(&a_addr, ""))
        .replace(&format!("address: {PROXY_SPEC}"), "address: 127.0.0.1:1");
    gw.p.rewrite_config(&text);
    let r = Request::new("POST", "/reload").send(&gw.admin).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["not_applied"][0], "listeners");
    assert_ne!(gw.config_hash(), before);
    assert_eq!(gw.get("/a").status, 200, "still serving on the old listener");
}

#[test]
fn binary_upgrade_drops_nothing() {
    let up = EchoServer::start("up").unwrap();
    // In-flight requests finish within the old process's grace period.
    let mut gw = Gw::start_with_grace(&body_to(&up.addr.to_string(), ""), 2);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2).map(|_| hammer(gw.addr.clone(), stop.clone())).collect();
    let served_before = Arc::new(AtomicUsize::new(up.requests() as usize));

    // The safe order: validate, start the new process with -u, then SIGQUIT the old one.
    let out = std::process::Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(&gw.p.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = TempDir::new("upgrade");
    let mut next = Portico::start_in(BIN, dir, gw.p.config.clone(), &["-u"]);
    let sock = gw.p.dir.file("upgrade.sock");
    wait_for(
        "the new process to wait on the upgrade socket",
        Duration::from_secs(10),
        || sock.exists().then_some(()),
    );
    gw.expect_exit = true;
    gw.p.signal("QUIT");
    let code = gw.p.wait_exit(Duration::from_secs(30));
    assert!(
        code.is_some(),
        "the old process should exit after handing over:\n{}",
        gw.p.logs()
    );
    next.wait_ready(&gw.admin);
    // Traffic keeps flowing through the new process alone.
    let mark = up.requests();
    wait_for("requests served by the new process", Duration::from_secs(10), || {
        (up.requests() > mark + 20).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed, first) = c.join().unwrap();
        assert_eq!(
            failed,
            0,
            "first failure: {first:?}\nold:\n{}\nnew:\n{}",
            gw.p.logs(),
            next.logs()
        );
        total += ok;
    }
    assert!(total > 50, "{total}");
    assert!(up.requests() as usize > served_before.load(Ordering::Relaxed));
}

/// One keep-alive connection, requests back to back, strictly: a request that fails on the
/// connection it was sent on is a failure (no silent retry, as python's `requests` does not
/// retry). `Connection: close` in an answer moves the client to a new connection.
fn keep_alive_client(
    addr: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize, Option<String>, usize)> {
    std::thread::spawn(move || {
        use std::io::Write;
        let (mut ok, mut failed, mut first, mut connections) = (0, 0, None, 0);
        let mut conn: Option<std::net::TcpStream> = None;
        while !stop.load(Ordering::Relaxed) {
            let s = match conn.as_mut() {
                Some(s) => s,
                None => match connect(&addr, None) {
                    Ok(s) => {
                        connections += 1;
                        conn.insert(s)
                    }
                    Err(e) => {
                        failed += 1;
                        first.get_or_insert(format!("connect: {e}"));
                        continue;
                    }
                },
            };
            let sent = s.write_all(format!("GET /a HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes());
            match sent.and_then(|_| read_response(s, false)) {
                Ok(r) if r.status == 200 => {
                    ok += 1;
                    if r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                        conn = None;
                    }
                }
                Ok(r) => {
                    failed += 1;
                    first.get_or_insert(format!("{} {}", r.status, r.text()));
                    conn = None;
                }
                Err(e) => {
                    failed += 1;
                    first.get_or_insert(format!("after {ok} ok: {e}"));
                    conn = None;
                }
            }
        }
        (ok, failed, first, connections)
    })
}

/// The trial's D5: kept-alive clients across a binary upgrade. During the hand-over window
/// the old process answers `Connection: close`, so each client moves to a new connection (the
/// new process's) between requests; none sees its connection closed under a request.
#[test]
fn keep_alive_clients_move_to_the_new_process_at_an_upgrade() {
    let up = EchoServer::start("up").unwrap();
    let mut gw = Gw::start_with_grace(&body_to(&up.addr.to_string(), ""), 2);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| keep_alive_client(gw.addr.clone(), stop.clone()))
        .collect();
    wait_for("the clients to run", Duration::from_secs(10), || {
        (up.requests() > 30).then_some(())
    });
    let dir = TempDir::new("upgrade-ka");
    let mut next = Portico::start_in(BIN, dir, gw.p.config.clone(), &["-u"]);
    let sock = gw.p.dir.file("upgrade.sock");
    wait_for(
        "the new process to wait on the upgrade socket",
        Duration::from_secs(10),
        || sock.exists().then_some(()),
    );
    gw.expect_exit = true;
    gw.p.signal("QUIT");
    let code = gw.p.wait_exit(Duration::from_secs(30));
    assert!(code.is_some(), "the old process should exit:\n{}", gw.p.logs());
    next.wait_ready(&gw.admin);
    let mark = up.requests();
    wait_for("requests served by the new process", Duration::from_secs(10), || {
        (up.requests() > mark + 30).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (ok, failed, first, connections) = c.join().unwrap();
        assert_eq!(
            failed,
            0,
            "first failure: {first:?}\nold:\n{}\nnew:\n{}",
            gw.p.logs(),
            next.logs()
        );
        assert!(ok > 10, "{ok}");
        assert!(connections >= 2, "the client moved to a new connection ({connections})");
    }
}

/// HTTP/2 connections get GOAWAY as soon as the old process hands over — not when its
/// listeners stop 5 s later — so h2 clients move to the new process during the hand-over.
#[test]
fn http2_connections_get_goaway_when_the_hand_over_starts() {
    let up = EchoServer::start("up").unwrap();
    let mut gw = Gw::start_h2c(&body_to(&up.addr.to_string(), ""));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (send, conn) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
        h2::client::handshake(tcp).await.unwrap()
    });
    let closed = rt.spawn(conn);
    // The client's connection lives as long as a handle does: keep one.
    let keep = send.clone();
    let status = rt.block_on(async {
        let req = http::Request::get("http://gw.test/a").body(()).unwrap();
        let (resp, _) = send.ready().await.unwrap().send_request(req, true).unwrap();
        resp.await.unwrap().status().as_u16()
    });
    assert_eq!(status, 200);
    let dir = TempDir::new("upgrade-h2");
    let mut next = Portico::start_in(BIN, dir, gw.p.config.clone(), &["-u"]);
    let sock = gw.p.dir.file("upgrade.sock");
    wait_for(
        "the new process to wait on the upgrade socket",
        Duration::from_secs(10),
        || sock.exists().then_some(()),
    );
    gw.expect_exit = true;
    gw.p.signal("QUIT");
    // The old process keeps its listeners for 5 s after handing over: GOAWAY must come first.
    let ended = rt.block_on(async { tokio::time::timeout(Duration::from_secs(4), closed).await });
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the connection should end by GOAWAY within the hand-over: {ended:?}\n{}",
        gw.p.logs()
    );
    drop(keep);
    assert!(gw.p.wait_exit(Duration::from_secs(30)).is_some());
    next.wait_ready(&gw.admin);
}

/// SIGTERM: a request sent on an idle keep-alive connection just after the shutdown started
/// is answered (with `Connection: close`), not met by a closed connection; so is a request
/// whose head had begun to arrive.
#[test]
fn shutdown_answers_requests_on_idle_keep_alive_connections() {
    use std::io::{Read, Write};
    let up = EchoServer::start("up").unwrap();
    let mut gw = Gw::start_with_grace(&body_to(&up.addr.to_string(), ""), 3);
    let request = format!("GET /a HTTP/1.1\r\nhost: {}\r\n\r\n", gw.addr);
    let mut idle = connect(&gw.addr, None).unwrap();
    idle.write_all(request.as_bytes()).unwrap();
    let r = read_response(&mut idle, false).unwrap();
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let mut partial = connect(&gw.addr, None).unwrap();
    partial.write_all(request.as_bytes()).unwrap();
    read_response(&mut partial, false).unwrap();
    partial.write_all(&request.as_bytes()[..10]).unwrap();

    gw.expect_exit = true;
    gw.p.signal("TERM");
    wait_for("the drain to start", Duration::from_secs(10), || {
        gw.p.logs().contains("draining").then_some(())
    });
    idle.write_all(request.as_bytes()).unwrap();
    let r = read_response(&mut idle, false).unwrap_or_else(|e| panic!("{e}\n{}", gw.p.logs()));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    partial.write_all(&request.as_bytes()[10..]).unwrap();
    let r = read_response(&mut partial, false).unwrap_or_else(|e| panic!("{e}\n{}", gw.p.logs()));
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    // Then the connection ends.
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(idle.read(&mut [0u8; 16]).unwrap_or(0), 0);
    assert!(gw.p.wait_exit(Duration::from_secs(30)).is_some());
}

#[test]
fn metrics_and_healthz() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&body_to(&up.addr.to_string(), ""));
    for _ in 0..7 {
        assert_eq!(gw.get("/a").status, 200);
    }
    gw.get("/nope");
    // A request is counted once its response is sent (in Pingora's logging phase): poll.
    let text = wait_for("the requests to be counted", Duration::from_secs(10), || {
        let text = gw.metrics();
        (metric(&text, "portico_requests_total", &[("route", "none"), ("status", "404")]) == 1.0
            && metric(&text, "portico_requests_total", &[("route", "main"), ("status", "200")]) == 7.0)
            .then_some(text)
    });
    // Every sample line is `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line}"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "bad labels in {line}");
        }
    }
    assert_eq!(
        metric(
            &text,
            "portico_requests_total",
            &[("route", "main"), ("upstream", "u"), ("status", "200")]
        ),
        7.0
    );
    assert_eq!(
        metric(&text, "portico_requests_total", &[("route", "none"), ("status", "404")]),
        1.0
    );
    assert!(metric(&text, "portico_request_duration_seconds_count", &[("route", "main")]) >= 7.0);
    assert_eq!(metric(&text, "portico_upstream_healthy", &[("upstream", "u")]), 1.0);
    assert_eq!(metric(&text, "portico_panics_total", &[]), 0.0);
    for name in [
        "portico_config_reloads_total",
        "portico_panics_total",
        "portico_upstream_healthy",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let r = get(&gw.admin, "/healthz").unwrap();
    assert_eq!((r.status, r.text().trim()), (200, "ok"));
    let cfg = get(&gw.admin, "/config").unwrap().json();
    assert_eq!(cfg["hash"].as_str().unwrap().len(), 64);
    assert!(cfg["path"].as_str().unwrap().ends_with("portico.yaml"));
    assert!(cfg["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(get(&gw.admin, "/nope").unwrap().status, 404);
}

/// A port that cannot be bound at start is a one-line error naming it, and the process exits
/// non-zero at once (as nginx does) — for a proxy listener and for the admin listener.
#[test]
fn a_taken_port_is_a_clear_error_at_start() {
    let up = EchoServer::start("up").unwrap();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    for (listener, admin) in [(taken.as_str(), ADMIN_SPEC), (PROXY_SPEC, taken.as_str())] {
        let dir = TempDir::new("taken");
        let yaml = format!(
            "{}{}",
            head(dir.path(), listener, admin),
            body_to(&up.addr.to_string(), "")
        );
        let config = dir.write("portico.yaml", &yaml);
        let start = std::time::Instant::now();
        let mut p = Portico::start_in(BIN, dir, config, &[]);
        let code = p.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(1), "exits non-zero:\n{}", p.logs());
        assert!(start.elapsed() < Duration::from_secs(5), "at once, not after retries");
        let err = p.stderr_text();
        let line = err
            .lines()
            .find(|l| l.contains(&taken))
            .unwrap_or_else(|| panic!("names {taken}:\n{err}"));
        assert!(line.contains("cannot listen on") && line.contains("in use"), "{line}");
    }
    drop(squatter);
}

/// Contract § Admin listener: no cross-site or DNS-rebinding reloads; an optional token.
#[test]
fn admin_posts_refuse_foreign_origins_and_hosts_and_need_the_token_when_set() {
    let up = EchoServer::start("up").unwrap();
    let body = format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    );
    let gw = Gw::start(&body);
    let post = |extra: Vec<(&'static str, &str)>| {
        let mut r = Request::new("POST", "/reload");
        for (k, v) in extra {
            r = r.header(k, v);
        }
        r.send(&gw.admin).unwrap()
    };
    let r = post(vec![("origin", "http://evil.example")]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "forbidden");
    assert_eq!(post(vec![("origin", "null")]).status, 403);
    assert_eq!(post(vec![("host", "evil.example")]).status, 403);
    assert_eq!(post(vec![("host", "evil.example:9901")]).status, 403);
    let port = gw.admin.rsplit(':').next().unwrap();
    assert_eq!(post(vec![("host", &format!("localhost:{port}"))]).status, 200);
    assert_eq!(post(vec![]).status, 200, "an operator's curl passes");
    // GETs stay open (read-only).
    assert_eq!(
        Request::get("/config")
            .header("origin", "http://evil.example")
            .send(&gw.admin)
            .unwrap()
            .status,
        200
    );

    // A token, added by a reload: POSTs now need it.
    let token = "s3cret-admin-token-0123456789";
    let with_token = gw.config(&body).replace(
        &format!("admin:\n  address: {ADMIN_SPEC}\n"),
        &format!("admin:\n  address: {ADMIN_SPEC}\n  token: {token}\n"),
    );
    let before = gw.config_hash();
    gw.p.rewrite_config(&with_token);
    gw.p.signal("HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        (gw.config_hash() != before).then_some(())
    });
    let r = post(vec![]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "unauthorized");
    assert_eq!(post(vec![("authorization", "Bearer wrong")]).status, 401);
    assert_eq!(post(vec![("authorization", &format!("Bearer {token}"))]).status, 200);
    assert_eq!(
        post(vec![
            ("authorization", &format!("Bearer {token}")),
            ("origin", "http://evil.example")
        ])
        .status,
        403,
        "the token does not make a cross-site POST acceptable"
    );
}
