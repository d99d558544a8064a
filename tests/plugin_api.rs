//! The plugin API's hooks, exercised by test plugins in an in-process gateway: request bodies
//! (rewritten with correct framing, refused by content), response trailers, the outcome `log`
//! receives, state that survives a reload, and the upstream client.

mod common;
use bytes::Bytes;
use common::*;
use portico::async_trait::async_trait;
use portico::client::SubRequest;
use portico::plugin::{Outcome, Reply, Verdict};
use portico::{BuildContext, Phases, Plugin, PluginKind, Registry, RequestHeader, RequestState};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// A body plugin: rewrites `hello` to `HELLO, WORLD` (a different length) and refuses bodies
// that contain `forbidden`.

struct Rewriter;

#[async_trait]
impl Plugin for Rewriter {
    fn kind(&self) -> PluginKind {
        PluginKind::Mediate
    }
    fn phases(&self) -> Phases {
        Phases::REQUEST_BODY
    }
    async fn request_body(&self, body: &mut Option<Bytes>, _end: bool, _st: &mut RequestState) -> Result<(), Reply> {
        if let Some(b) = body {
            let text = String::from_utf8_lossy(b);
            if text.contains("forbidden") {
                return Err(Reply::error(422, "bad_request", "the body holds a forbidden word"));
            }
            if text.contains("hello") {
                *body = Some(Bytes::from(text.replace("hello", "HELLO, WORLD")));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[test]
fn a_body_plugin_rewrites_with_correct_framing_and_refuses_by_content() {
    let up = RecordingUpstream::start();
    let mut registry = Registry::builtin();
    registry.register("rewriter", |_: Empty, _: &BuildContext| Ok(Rewriter));
    let gw = InProcess::start(
        &format!(
            "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up, plugins: [rewriter] }}\n",
            up.addr
        ),
        registry,
    );
    // A small body, declared: read whole, rewritten, sent with its new length.
    let r = Request::new("POST", "/a")
        .header("x-id", "small")
        .body("say hello")
        .send(&gw.addr)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Chunked, small: the same (the upstream gets a Content-Length).
    let r = Request::new("POST", "/a")
        .header("x-id", "chunked")
        .header("transfer-encoding", "chunked")
        .body(b"4\r\nsay \r\n5\r\nhello\r\n0\r\n\r\n".to_vec())
        .send(&gw.addr)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Large: streamed through the plugin piece by piece, chunked upstream.
    let mut large = "x".repeat(100_000);
    large.push_str("hello");
    let r = Request::new("POST", "/a")
        .header("x-id", "large")
        .body(large.clone())
        .send(&gw.addr)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen: HashMap<String, Recorded> = up
        .requests()
        .into_iter()
        .map(|r| (r.header("x-id").unwrap_or("").to_string(), r))
        .collect();
    let small = &seen["small"];
    assert_eq!(small.body, b"say HELLO, WORLD");
    assert_eq!(small.header("content-length"), Some("16"));
    assert!(!small.chunked);
    let chunked = &seen["chunked"];
    assert_eq!(chunked.body, b"say HELLO, WORLD");
    assert_eq!(
        chunked.header("content-length"),
        Some("16"),
        "a small chunked body gets a length"
    );
    let big = &seen["large"];
    assert_eq!(big.body.len(), large.len() + 7, "rewritten in flight");
    assert!(big.body.ends_with(b"HELLO, WORLD"));
    assert!(big.chunked && big.header("content-length").is_none());
    assert!(up.garbage().is_empty(), "framing intact: {:?}", up.garbage());

    // Refused by content, before anything went upstream.
    let before = up.requests().len();
    let r = Request::new("POST", "/a")
        .body("a forbidden word")
        .send(&gw.addr)
        .unwrap();
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["error"], "bad_request");
    assert!(r.json()["trace_id"].is_string());
    assert_eq!(up.requests().len(), before);
}

// ---------------------------------------------------------------------------------------------
// A recorder: the trailers and the outcome of every request, by path.

type Seen = Arc<Mutex<HashMap<String, (Option<Outcome>, Option<http::HeaderMap>)>>>;

struct Recorder(Seen);

#[async_trait]
impl Plugin for Recorder {
    fn kind(&self) -> PluginKind {
        PluginKind::Edge
    }
    fn phases(&self) -> Phases {
        Phases::RESPONSE_TRAILERS | Phases::LOG
    }
    fn response_trailers(&self, trailers: &mut http::HeaderMap, st: &mut RequestState) {
        self.0.lock().unwrap().entry(st.path.clone()).or_default().1 = Some(trailers.clone());
    }
    fn log(&self, st: &RequestState, outcome: &Outcome) {
        self.0.lock().unwrap().entry(st.path.clone()).or_default().0 = Some(outcome.clone());
    }
}

/// An h2c upstream that answers gRPC-style: a body, then trailers with the `grpc-status` the
/// request asked for in `x-grpc-status`.
fn grpc_upstream() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let code = req
                            .headers()
                            .get("x-grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("0")
                            .to_string();
                        let resp = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(resp, false) else {
                            continue;
                        };
                        let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\0"), false);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", code.parse().unwrap());
                        trailers.insert("grpc-message", "from-upstream".parse().unwrap());
                        let _ = send.send_trailers(trailers);
                    }
                });
            }
        });
    });
    addr
}

#[test]
fn trailers_and_outcomes_reach_plugins() {
    let seen: Seen = Default::default();
    let mut registry = Registry::builtin();
    let s = seen.clone();
    registry.register("recorder", move |_: Empty, _: &BuildContext| Ok(Recorder(s.clone())));
    let up = EchoServer::start("up").unwrap();
    let grpc = grpc_upstream();
    let dead = free_addr();
    let gw = InProcess::start(
        &format!(
            r#"
plugins: [recorder]
upstreams:
  up: {{ endpoints: ["{up}"] }}
  grpc: {{ endpoints: ["{grpc}"], protocol: h2c }}
  dead: {{ endpoints: ["{dead}"], timeouts: {{ connect: 500ms }} }}
routes:
  - {{ name: echo, upstream: up, match: {{ path_prefix: /echo }} }}
  - {{ name: grpc, upstream: grpc, match: {{ path_prefix: /pkg.Svc }} }}
  - {{ name: down, upstream: dead, match: {{ path_prefix: /down }} }}
"#,
            up = up.addr
        ),
        registry,
    );
    // A proxied answer.
    assert_eq!(get(&gw.addr, "/echo/1").unwrap().status, 200);
    // An answer Portico made (no route).
    assert_eq!(get(&gw.addr, "/nowhere").unwrap().status, 404);
    // An upstream that cannot be reached.
    assert_eq!(get(&gw.addr, "/down").unwrap().status, 502);
    // gRPC over h2c: a status in the trailers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = h2c_client(&gw.addr).await;
        for (path, code) in [("/pkg.Svc/Ok", "0"), ("/pkg.Svc/Fail", "14")] {
            let mut c = client.clone().ready().await.unwrap();
            let req = http::Request::post(format!("http://gw{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("x-grpc-status", code)
                .body(())
                .unwrap();
            let (resp, mut body) = c.send_request(req, false).unwrap();
            body.send_data(Bytes::from_static(b"\0\0\0\0\0"), true).unwrap();
            let mut resp = resp.await.unwrap().into_body();
            while let Some(d) = resp.data().await {
                let _ = d;
            }
            let trailers = resp.trailers().await.unwrap().expect("trailers");
            assert_eq!(
                trailers["grpc-status"], code,
                "{path}: the upstream's status passes through"
            );
        }
    });
    let outcome = |path: &str| {
        wait_for(&format!("the outcome of {path}"), Duration::from_secs(5), || {
            seen.lock().unwrap().get(path).and_then(|(o, _)| o.clone())
        })
    };
    let ok = outcome("/echo/1");
    assert_eq!((ok.status, ok.upstream_status), (200, Some(200)));
    assert_eq!(ok.upstream.as_deref(), Some("up"));
    assert_eq!(ok.endpoint, Some(up.addr.to_string()));
    assert!(ok.error.is_none() && ok.failure.is_none() && !ok.is_failure());
    let none = outcome("/nowhere");
    assert_eq!(
        (none.status, none.error, none.upstream_status),
        (404, Some("no_route"), None)
    );
    let down = outcome("/down");
    assert_eq!(down.status, 502);
    assert_eq!(down.error, Some("upstream_unavailable"));
    assert_eq!(down.failure, Some(portico::plugin::Failure::Connect));
    assert!(down.is_failure());
    let fine = outcome("/pkg.Svc/Ok");
    assert_eq!((fine.status, fine.grpc_status), (200, Some(0)));
    assert!(!fine.is_failure());
    let failed = outcome("/pkg.Svc/Fail");
    assert_eq!((failed.status, failed.grpc_status), (200, Some(14)));
    assert!(failed.is_failure(), "UNAVAILABLE in the trailers is a failure");
    let trailers = seen.lock().unwrap()["/pkg.Svc/Fail"].1.clone().expect("trailers seen");
    assert_eq!(trailers["grpc-status"], "14");
}

// ---------------------------------------------------------------------------------------------
// State that survives a reload.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterConfig {
    #[allow(dead_code)]
    label: String,
}

/// Counts the requests it saw, in state kept across reloads; the count goes upstream.
struct Counter(Arc<AtomicU64>);

#[async_trait]
impl Plugin for Counter {
    fn kind(&self) -> PluginKind {
        PluginKind::Mediate
    }
    fn phases(&self) -> Phases {
        Phases::REQUEST
    }
    async fn request(&self, req: &mut RequestHeader, _st: &mut RequestState) -> Verdict {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        req.insert_header("x-count", n.to_string()).unwrap();
        Verdict::Continue
    }
}

#[test]
fn plugin_state_survives_a_reload_while_its_block_is_unchanged() {
    let up = EchoServer::start("up").unwrap();
    let jwks = ContentServer::start(r#"{"keys": []}"#);
    let mut registry = Registry::builtin();
    registry.register("counter", |_: CounterConfig, ctx: &BuildContext| {
        Ok(Counter(ctx.state(|| AtomicU64::new(0))))
    });
    let body = |label: &str, other: &str| {
        format!(
            r#"
upstreams:
  up: {{ endpoints: ["{up}"] }}
routes:
  - name: counted
    match: {{ path_prefix: /counted }}
    upstream: up
    plugins: [{{ counter: {{ label: {label} }} }}]
  - name: a
    match: {{ path_prefix: /a }}
    upstream: up
    plugins: [{{ jwt: {{ jwks_url: "http://{jwks}/keys" }} }}]
  - name: b{other}
    match: {{ path_prefix: /b }}
    upstream: up
    plugins: [{{ jwt: {{ jwks_url: "http://{jwks}/keys" }} }}]
"#,
            up = up.addr,
            jwks = jwks.addr
        )
    };
    let gw = InProcess::start(&body("one", ""), registry);
    let count = || {
        echoed(&get(&gw.addr, "/counted").unwrap())["headers"]["x-count"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(count(), "1");
    assert_eq!(count(), "2");
    assert_eq!(jwks.hits(), 1, "two routes naming one JWKS URL share one fetch");
    // A reload that leaves the counter's block alone keeps its state (and the JWKS).
    let r = gw.reload(&body("one", "-renamed"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(count(), "3");
    assert_eq!(jwks.hits(), 1, "the key set survived the reload: no refetch");
    // A changed block starts fresh.
    assert_eq!(gw.reload(&body("two", "-renamed")).status, 200);
    assert_eq!(count(), "1");
}

// ---------------------------------------------------------------------------------------------
// The upstream client.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerConfig {
    upstream: String,
    calls: usize,
}

/// Answers every request itself with `calls` concurrent calls to `upstream` through the client.
struct Caller {
    client: Arc<portico::client::UpstreamClient>,
    upstream: String,
    calls: usize,
}

#[async_trait]
impl Plugin for Caller {
    fn kind(&self) -> PluginKind {
        PluginKind::Answer
    }
    fn phases(&self) -> Phases {
        Phases::REQUEST
    }
    async fn request(&self, _req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let st = &*st;
        let calls = (0..self.calls).map(|i| {
            let mut sub = SubRequest::get(format!("/sub/{i}"));
            sub.headers
                .push((http::HeaderName::from_static("x-id"), http::HeaderValue::from(i)));
            self.client.send(st, &self.upstream, sub)
        });
        let results = futures::future::join_all(calls).await;
        let ok = results
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
            .count();
        let first_error = results.iter().find_map(|r| r.as_ref().err().map(|e| e.to_string()));
        Verdict::Respond(Reply::json(
            200,
            serde_json::json!({ "ok": ok, "error": first_error }).to_string(),
        ))
    }
}

#[test]
fn plugins_call_upstreams_through_the_shared_client() {
    let up = RecordingUpstream::start();
    let dead = free_addr();
    let mut registry = Registry::builtin();
    registry.register("caller", |cfg: CallerConfig, ctx: &BuildContext| {
        Ok(Caller {
            client: ctx.upstream_client(),
            upstream: cfg.upstream,
            calls: cfg.calls,
        })
    });
    let gw = InProcess::start(
        &format!(
            r#"
upstreams:
  live: {{ endpoints: ["{up}"] }}
  half: {{ endpoints: ["{dead}", "{up}"], timeouts: {{ connect: 500ms }} }}
routes:
  - {{ name: one, match: {{ path_prefix: /one }}, plugins: [{{ caller: {{ upstream: live, calls: 1 }} }}] }}
  - {{ name: half, match: {{ path_prefix: /half }}, plugins: [{{ caller: {{ upstream: half, calls: 10 }} }}] }}
  - {{ name: burst, match: {{ path_prefix: /burst }}, plugins: [{{ caller: {{ upstream: live, calls: 200 }} }}] }}
"#,
            up = up.addr
        ),
        registry,
    );
    // The trace reaches the upstream: the request's trace id, with a child span.
    let r = Request::get("/one")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("x-request-id", "client-rid")
        .send(&gw.addr)
        .unwrap();
    assert_eq!(r.json()["ok"], 1, "{}", r.text());
    let sub = up.requests().pop().unwrap();
    let tp = sub.header("traceparent").expect("traceparent");
    assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
    assert!(!tp.contains("00f067aa0ba902b7"), "a span of its own: {tp}");
    assert_eq!(sub.header("x-request-id"), Some("client-rid"));

    // One endpoint of two is dead: every call still succeeds (connect-failure retries, health).
    for _ in 0..3 {
        let r = get(&gw.addr, "/half").unwrap();
        assert_eq!(r.json()["ok"], 10, "{}", r.text());
    }

    // A burst of 200 concurrent calls: no more connections than the pool allows (128).
    let before = up.connection_bytes().len();
    let r = get(&gw.addr, "/burst").unwrap();
    assert_eq!(r.json()["ok"], 200, "{}", r.text());
    let opened = up.connection_bytes().len() - before;
    assert!(opened <= 128, "{opened} connections for 200 calls");
    // And they are pooled: another burst reuses them.
    let before = up.connection_bytes().len();
    assert_eq!(get(&gw.addr, "/burst").unwrap().json()["ok"], 200);
    let reopened = up.connection_bytes().len() - before;
    assert!(reopened < 100, "{reopened} new connections for a second burst of 200");
}

// ---------------------------------------------------------------------------------------------
// WebSocket frames are not a request body.

#[test]
fn websocket_frames_do_not_count_against_the_body_limit() {
    use std::io::{Read, Write};
    // An upstream that accepts the upgrade and then echoes every byte.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                );
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{up_addr}\"] }}\nroutes:\n  - {{ name: ws, upstream: up, max_request_body_bytes: 1KiB }}\n"
    ));
    let mut s = connect(&gw.addr, None).unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .unwrap();
    let head = read_response(&mut s, true).unwrap();
    assert_eq!(head.status, 101);
    // 64 KiB each way, far over the route's 1 KiB body limit.
    let payload: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let p = payload.clone();
        std::thread::spawn(move || w.write_all(&p).unwrap())
    };
    let mut echoed = vec![0u8; payload.len()];
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.read_exact(&mut echoed).unwrap();
    writer.join().unwrap();
    assert!(echoed == payload, "frames crossed intact both ways");
}

// ---------------------------------------------------------------------------------------------
// Periodic tasks run while their config is live, and stop when a reload retires it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TickerConfig {
    name: String,
}

struct Ticker;

#[async_trait]
impl Plugin for Ticker {
    fn kind(&self) -> PluginKind {
        PluginKind::Mediate
    }
    fn phases(&self) -> Phases {
        Phases::NONE
    }
}

#[test]
fn periodic_tasks_run_while_their_config_is_live() {
    let up = EchoServer::start("up").unwrap();
    let ticks: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let mut registry = Registry::builtin();
    let t = ticks.clone();
    registry.register("ticker", move |cfg: TickerConfig, ctx: &BuildContext| {
        let (t, name) = (t.clone(), cfg.name.clone());
        ctx.every("tick", Duration::from_millis(100), move || {
            let (t, name) = (t.clone(), name.clone());
            async move {
                *t.lock().unwrap().entry(name).or_default() += 1;
            }
        });
        Ok(Ticker)
    });
    let body = |name: &str| {
        format!(
            "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up, plugins: [{{ ticker: {{ name: {name} }} }}] }}\n",
            up.addr
        )
    };
    let gw = InProcess::start(&body("first"), registry);
    let count = |n: &str| ticks.lock().unwrap().get(n).copied().unwrap_or(0);
    wait_for(
        "the first config's task to run a few times",
        Duration::from_secs(10),
        || (count("first") >= 3).then_some(()),
    );
    assert_eq!(gw.reload(&body("second")).status, 200);
    wait_for("the second config's task to run", Duration::from_secs(10), || {
        (count("second") >= 3).then_some(())
    });
    // The retired config's task stopped with it.
    let retired = count("first");
    let later = count("second") + 5;
    wait_for("more runs of the live task", Duration::from_secs(10), || {
        (count("second") >= later).then_some(())
    });
    assert_eq!(count("first"), retired, "the retired config's task no longer runs");
}
