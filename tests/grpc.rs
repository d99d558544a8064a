//! Acceptance [10/12] #13, gRPC through the gateway with a real client and server (gRPC framing
//! over the `h2` crate): unary and bidirectional streaming on h2c→h2c, TLS h2→h2c and TLS
//! h2→TLS h2 with trailers intact; an upstream `grpc-status` passes through unchanged; Portico's
//! own failures are gRPC statuses (missing JWT → 16, rate-limited → 8, upstream down → 14, no
//! route → 12, grpc-timeout → 4), chosen by the request's media type (gRPC-web answered in its
//! own type); a stream idle longer than the upstream's read timeout (and than `body_timeout`)
//! survives on a route with its own `timeouts.read`, and not without.

mod common;
use common::grpc::*;
use common::*;
use portico::async_trait::async_trait;
use portico::plugin::{Reply, Verdict};
use portico::testing::pki::{Leaf, TestCa};
use portico::testing::tls;
use portico::{BuildContext, Phases, Plugin, PluginKind, Registry, RequestHeader, RequestState};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

const TLS_SPEC: &str = "127.0.0.1:0";
const PLAIN_SPEC: &str = "127.0.0.3:0";
const SECRET: &str = "grpc-test-secret-grpc-test-secret";

struct Setup {
    ca: TestCa,
    _dir: TempDir,
    gw: Gw,
    /// The h2c and the TLS upstream.
    servers: (GrpcServer, GrpcServer),
}

fn setup() -> Setup {
    let ca = TestCa::new("gRPC CA");
    let dir = TempDir::new("grpc");
    let (c, k) = ca.write_server(&dir, "gw", &["gw.test"]);
    let ca_file = ca.write_ca(&dir, "ca");
    let h2c_server = GrpcServer::start();
    let tls_server = GrpcServer::start_tls(tls::server(&ca, &["grpc.internal"], None, &["h2"]));
    let down = free_addr();
    let listeners = format!(
        "  - address: {TLS_SPEC}\n    http2: true\n    tls: {{ cert: {c}, key: {k}, client_ca: {ca_file} }}\n  - address: {PLAIN_SPEC}\n    http2: true\n"
    );
    let route = |name: &str, target: &str, upstream: &str, extra: &str| {
        format!(
            "  - name: {name}\n    match: {{ path_prefix: /test.Echo, headers: {{ x-target: {target} }} }}\n    upstream: {upstream}\n{extra}"
        )
    };
    let body = format!(
        "limits:\n  body_timeout: 1s\nupstreams:\n  grpc: {{ endpoints: [{g}], protocol: h2c }}\n  grpc-tls:\n    endpoints: [{t}]\n    protocol: h2\n    tls: {{ sni: grpc.internal, ca: {ca_file} }}\n  down: {{ endpoints: [{down}], protocol: h2c }}\n  short-read: {{ endpoints: [{g}], protocol: h2c, timeouts: {{ read: 1s }} }}\nroutes:\n{}{}{}{}{}{}{}{}{}  - name: grpc\n    match: {{ path_prefix: /test.Echo }}\n    upstream: grpc\n",
        route(
            "services",
            "services",
            "grpc",
            "    plugins:\n      - allow_services: { services: [billing], trust_domain: mesh }\n"
        ),
        route(
            "limited",
            "limited",
            "grpc",
            "    plugins:\n      - rate_limit: { requests: 1, per: 1h, key: global }\n"
        ),
        route(
            "small",
            "small",
            "grpc",
            "    max_request_body_bytes: 1KiB\n    timeouts: { read: 1h }\n"
        ),
        route(
            "small-tls",
            "small-tls",
            "grpc-tls",
            "    max_request_body_bytes: 1KiB\n    timeouts: { read: 1h }\n"
        ),
        route("tls-upstream", "tls", "grpc-tls", ""),
        route("down", "down", "down", ""),
        route(
            "secured",
            "jwt",
            "grpc",
            &format!("    plugins:\n      - jwt: {{ algorithms: [HS256], secret: \"{SECRET}\" }}\n")
        ),
        route("long", "long", "short-read", "    timeouts: { read: 30s }\n"),
        route("short", "short", "short-read", ""),
        g = h2c_server.addr,
        t = tls_server.addr,
    );
    let gw = Gw::start_listeners(&listeners, &[TLS_SPEC, PLAIN_SPEC], &body);
    Setup {
        ca,
        _dir: dir,
        gw,
        servers: (h2c_server, tls_server),
    }
}

impl Setup {
    async fn over_tls(&self) -> h2::client::SendRequest<bytes::Bytes> {
        h2_tls(&self.gw.addrs[0], "gw.test", tls::client(&self.ca, None, &["h2"])).await
    }
    async fn over_h2c(&self) -> h2::client::SendRequest<bytes::Bytes> {
        h2c(&self.gw.addrs[1]).await
    }
    /// A new connection whose received frames are recorded: TLS (with this client
    /// certificate, if any) or h2c.
    async fn recorded(&self, over_tls: bool, cert: Option<&Leaf>) -> (h2::client::SendRequest<bytes::Bytes>, Wire) {
        if over_tls {
            let config = tls::client(&self.ca, cert.map(|c| (c, &self.ca)), &["h2"]);
            h2_recorded(tls(&self.gw.addrs[0], "gw.test", config).await.expect("TLS")).await
        } else {
            h2_recorded(
                tokio::net::TcpStream::connect(&self.gw.addrs[1])
                    .await
                    .expect("connect"),
            )
            .await
        }
    }
}

async fn unary_and_bidi(send: &mut h2::client::SendRequest<bytes::Bytes>, scheme: &str, target: &str, what: &str) {
    let uri = |m: &str| format!("{scheme}://gw.test/test.Echo/{m}");
    let headers = [("x-target", target)];
    let r = unary(send, &uri("Unary"), b"hi", &headers).await.unwrap();
    assert_eq!(r.http_status, 200, "{what}: {r:?}");
    assert!(!r.trailers_only, "{what}: {r:?}");
    assert_eq!(r.messages, [b"echo:hi".to_vec()], "{what}");
    assert_eq!(r.grpc_status, Some(0), "{what}: the trailers arrived");
    // Trace ids on gRPC: the client gets the request id, the upstream a traceparent.
    assert!(r.head.contains_key("x-request-id"), "{what}");
    assert!(!r.head["x-seen-traceparent"].is_empty(), "{what}");

    // Bidirectional: each answer arrives before the next message is sent (streamed, not
    // buffered), then the status in the trailers.
    let mut call = Bidi::open(send, &uri("Bidi"), &headers).await.unwrap();
    assert_eq!(call.http_status, 200, "{what}");
    for i in 0..10 {
        let msg = format!("m{i}");
        call.send(msg.as_bytes()).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), call.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: no echo of {msg} while the stream is open"))
            .unwrap();
        assert_eq!(got, Some(format!("echo:{msg}").into_bytes()), "{what}");
    }
    assert_eq!(call.finish().await.unwrap(), (Some(0), None), "{what}");
}

#[test]
fn unary_and_bidirectional_calls_on_every_path() {
    let s = setup();
    rt().block_on(async {
        let mut h2c_client = s.over_h2c().await;
        unary_and_bidi(&mut h2c_client, "http", "none", "h2c -> h2c").await;
        let mut tls_client = s.over_tls().await;
        unary_and_bidi(&mut tls_client, "https", "none", "TLS h2 -> h2c").await;
        unary_and_bidi(&mut tls_client, "https", "tls", "TLS h2 -> TLS h2").await;
        // Concurrent calls share the connections.
        let calls = (0..20).map(|i| {
            let mut c = tls_client.clone();
            async move {
                let msg = format!("c{i}");
                let r = unary(
                    &mut c,
                    "https://gw.test/test.Echo/Unary",
                    msg.as_bytes(),
                    &[("x-target", "tls")],
                )
                .await
                .unwrap();
                assert_eq!(r.messages, [format!("echo:{msg}").into_bytes()]);
            }
        });
        futures::future::join_all(calls).await;
    });
}

#[test]
fn statuses_pass_through_and_gateway_failures_are_grpc_statuses() {
    let s = setup();
    rt().block_on(async {
        let c = s.over_tls().await;
        let uri = "https://gw.test/test.Echo/";
        let call = |m: &'static str, target: &'static str, extra: Option<(&'static str, String)>| {
            let mut c = c.clone();
            async move {
                let mut headers = vec![("x-target", target.to_string())];
                headers.extend(extra);
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                unary(&mut c, &format!("{uri}{m}"), b"x", &h).await.unwrap()
            }
        };
        // The upstream's own status and message, unchanged.
        let r = call("Fail", "none", None).await;
        assert_eq!(
            (r.grpc_status, r.grpc_message.as_deref()),
            (Some(5), Some("no such thing"))
        );
        let r = call("Fail", "tls", None).await;
        assert_eq!(
            (r.grpc_status, r.grpc_message.as_deref()),
            (Some(5), Some("no such thing"))
        );

        // Missing JWT: UNAUTHENTICATED (16), as a trailers-only answer with HTTP 200.
        let r = call("Unary", "jwt", None).await;
        assert_eq!(
            (r.http_status, r.grpc_status, r.trailers_only),
            (200, Some(16), true),
            "{r:?}"
        );
        assert!(r.head.contains_key("x-request-id"));
        // With a token: through.
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": "svc", "exp": 4_000_000_000u64}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let r = call("Unary", "jwt", Some(("authorization", format!("Bearer {token}")))).await;
        assert_eq!((r.grpc_status, r.messages.len()), (Some(0), 1), "{r:?}");

        // Upstream down: UNAVAILABLE (14).
        let r = call("Unary", "down", None).await;
        assert_eq!((r.http_status, r.grpc_status), (200, Some(14)), "{r:?}");
        // No route: UNIMPLEMENTED (12).
        let mut c2 = c.clone();
        let r = unary(&mut c2, "https://gw.test/other.Service/Call", b"x", &[])
            .await
            .unwrap();
        assert_eq!(r.grpc_status, Some(12), "{r:?}");

        // grpc-timeout bounds the upstream call: DEADLINE_EXCEEDED (4) at the deadline.
        let t = Instant::now();
        let r = call("Slow", "none", Some(("grpc-timeout", "500m".into()))).await;
        let took = t.elapsed();
        assert_eq!(r.grpc_status, Some(4), "{r:?}");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
            "{took:?}"
        );
        // A deadline long enough: the answer.
        let r = call("Unary", "none", Some(("grpc-timeout", "5S".into()))).await;
        assert_eq!(r.grpc_status, Some(0));
        assert_eq!(r.head["x-seen-grpc-timeout"], "5S", "the upstream sees the deadline");
    });
}

/// Which requests get gRPC-shaped errors: the content type decides, compared as a media type
/// (case-insensitive, `+codec` and parameters allowed), and gRPC-web gets its own type back.
#[test]
fn grpc_errors_follow_the_media_type_of_the_request() {
    let s = setup();
    rt().block_on(async {
        let c = s.over_h2c().await;
        let refused = |ct: &'static str| {
            let c = c.clone();
            async move {
                let req = http::Request::post("http://gw.test/test.Echo/Unary")
                    .header("content-type", ct)
                    .header("te", "trailers")
                    .header("x-target", "jwt")
                    .body(())
                    .unwrap();
                let (resp, _) = c.ready().await.unwrap().send_request(req, true).unwrap();
                let resp = resp.await.unwrap();
                let head = resp.headers().clone();
                let text = |n: &str| head.get(n).map(|v| v.to_str().unwrap().to_string());
                (resp.status().as_u16(), text("content-type"), text("grpc-status"))
            }
        };
        let grpc = |ct: &str| (200, Some(ct.to_string()), Some("16".to_string()));
        for (ct, answer) in [
            ("application/grpc", "application/grpc"),
            ("application/grpc+proto", "application/grpc"),
            ("Application/GRPC", "application/grpc"),
            ("application/grpc; charset=utf-8", "application/grpc"),
            ("application/grpc-web", "application/grpc-web"),
            ("application/grpc-web+proto", "application/grpc-web+proto"),
            ("application/grpc-web-text", "application/grpc-web-text"),
        ] {
            assert_eq!(refused(ct).await, grpc(answer), "{ct}");
        }
        for ct in ["application/grpcx", "application/grpc-webby", "application/json"] {
            let (status, content_type, grpc_status) = refused(ct).await;
            assert_eq!(
                (status, content_type.as_deref(), grpc_status),
                (401, Some("application/json"), None),
                "{ct}"
            );
        }
    });
}

/// Open a bidirectional call on `target`, exchange a message, stay idle for `idle` (longer
/// than the upstream's read timeout and than `body_timeout`), then exchange another.
async fn idle_stream(
    c: &mut h2::client::SendRequest<bytes::Bytes>,
    target: &str,
    idle: Duration,
) -> Result<(), String> {
    let mut call = Bidi::open(c, "https://gw.test/test.Echo/Bidi", &[("x-target", target)])
        .await
        .map_err(|e| e.to_string())?;
    call.send(b"before").map_err(|e| e.to_string())?;
    let first = call.recv().await.map_err(|e| e.to_string())?;
    assert_eq!(first, Some(b"echo:before".to_vec()));
    tokio::time::sleep(idle).await;
    call.send(b"after").map_err(|e| e.to_string())?;
    let second = tokio::time::timeout(Duration::from_secs(5), call.recv())
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    if second != Some(b"echo:after".to_vec()) {
        return Err(format!("got {second:?}"));
    }
    match call.finish().await.map_err(|e| e.to_string())? {
        (Some(0), _) => Ok(()),
        other => Err(format!("status {other:?}")),
    }
}

#[test]
fn a_long_idle_stream_survives_on_a_route_with_its_own_read_timeout() {
    let s = setup();
    rt().block_on(async {
        let mut c = s.over_tls().await;
        // The upstream's read timeout is 1s and body_timeout is 1s; the route says 30s.
        idle_stream(&mut c, "long", Duration::from_millis(3500))
            .await
            .expect("the stream survives 3.5 s idle on a route with timeouts.read: 30s");
        // The same upstream on a route without its own timeout: cut at the read timeout.
        let cut = idle_stream(&mut c, "short", Duration::from_millis(3500)).await;
        assert!(cut.is_err(), "the default read timeout ends an idle stream");
        // h2c downstream too.
        let mut p = s.over_h2c().await;
        idle_stream(&mut p, "long", Duration::from_millis(2500))
            .await
            .expect("h2c");
    });
}

// ---------------------------------------------------------------------------------------------
// Rate limited → RESOURCE_EXHAUSTED (8), with a test plugin that answers 429 as a limiter would.

struct Limited;

#[async_trait]
impl Plugin for Limited {
    fn kind(&self) -> PluginKind {
        PluginKind::Limit
    }
    fn phases(&self) -> Phases {
        Phases::REQUEST
    }
    async fn request(&self, _req: &mut RequestHeader, _st: &mut RequestState) -> Verdict {
        Verdict::Respond(Reply::error(429, "rate_limited", "too many requests"))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[test]
fn rate_limited_is_resource_exhausted() {
    let server = GrpcServer::start();
    let mut registry = Registry::builtin();
    registry.register("always_limited", |_: Empty, _: &BuildContext| Ok(Limited));
    let gw = InProcess::start(
        &format!(
            "upstreams:\n  g: {{ endpoints: [{}], protocol: h2c }}\nroutes:\n  - {{ name: limited, match: {{ path_prefix: /test.Echo }}, upstream: g, plugins: [always_limited] }}\n",
            server.addr
        ),
        registry,
    );
    rt().block_on(async {
        let mut c = h2c(&gw.addr).await;
        let r = unary(&mut c, "http://gw.test/test.Echo/Unary", b"x", &[])
            .await
            .unwrap();
        assert_eq!(
            (r.http_status, r.grpc_status, r.trailers_only),
            (200, Some(8), true),
            "{r:?}"
        );
        assert_eq!(r.grpc_message.as_deref(), Some("too many requests"));
    });
    assert!(server.seen.lock().unwrap().is_empty(), "the upstream saw nothing");
}

// ---------------------------------------------------------------------------------------------
// Statuses Portico makes itself, frame by frame (what grpcio and grpc-go need).

/// A reset with NO_ERROR after a complete answer only says the server reads no more of the
/// request (RFC 9113 §8.1); clients ignore it. Any other reset is a failure.
fn without_final_no_error(mut frames: Vec<String>) -> Vec<String> {
    if frames.last().is_some_and(|f| f == "RST_STREAM(NO_ERROR)") {
        frames.pop();
    }
    frames
}

/// A status Portico makes before the answer began is gRPC's *trailers-only* answer: one
/// HEADERS frame with END_STREAM carrying `:status 200`, `content-type: application/grpc`,
/// `grpc-status` and `grpc-message` — no DATA frame, no reset.
async fn assert_trailers_only(
    s: &Setup,
    over_tls: bool,
    cert: Option<&Leaf>,
    method: &str,
    headers: &[(&str, &str)],
    want: u32,
) {
    let what = format!("{method} {headers:?} over {}", if over_tls { "TLS" } else { "h2c" });
    let (mut c, wire) = s.recorded(over_tls, cert).await;
    let uri = format!("{}://gw.test{method}", if over_tls { "https" } else { "http" });
    let (id, r) = unary_on(&mut c, &uri, b"x", headers).await.unwrap();
    assert_eq!(
        (r.http_status, r.grpc_status, r.trailers_only),
        (200, Some(want), true),
        "{what}: {r:?}"
    );
    assert_eq!(r.head["content-type"], "application/grpc", "{what}");
    assert!(
        r.grpc_message.as_deref().is_some_and(|m| !m.is_empty()),
        "{what}: {r:?}"
    );
    assert_eq!(
        without_final_no_error(wire.stream(id).await),
        ["HEADERS+END_STREAM"],
        "{what}: one HEADERS frame with END_STREAM"
    );
}

#[test]
fn portico_s_own_statuses_are_one_headers_frame_with_end_stream() {
    let s = setup();
    let orders = s.ca.client(None, &["spiffe://mesh/orders"]);
    rt().block_on(async {
        for over_tls in [false, true] {
            // Refused before the call: no route, no identity, wrong identity, rate limited.
            assert_trailers_only(&s, over_tls, None, "/other.Service/Call", &[], 12).await;
            let svc = [("x-target", "services")];
            assert_trailers_only(&s, over_tls, None, "/test.Echo/Unary", &svc, 16).await;
            if over_tls {
                assert_trailers_only(&s, true, Some(&orders), "/test.Echo/Unary", &svc, 7).await;
            }
            // Upstream failures: refused → UNAVAILABLE, read timeout and grpc-timeout →
            // DEADLINE_EXCEEDED.
            assert_trailers_only(&s, over_tls, None, "/test.Echo/Unary", &[("x-target", "down")], 14).await;
            assert_trailers_only(&s, over_tls, None, "/test.Echo/Slow", &[("x-target", "short")], 4).await;
            let deadline = [("x-target", "none"), ("grpc-timeout", "300m")];
            assert_trailers_only(&s, over_tls, None, "/test.Echo/Slow", &deadline, 4).await;
        }
        // The first call of the hour passes, the next is RESOURCE_EXHAUSTED.
        let lim = [("x-target", "limited")];
        let mut c = s.over_h2c().await;
        let r = unary(&mut c, "http://gw.test/test.Echo/Unary", b"x", &lim)
            .await
            .unwrap();
        assert_eq!(r.grpc_status, Some(0), "{r:?}");
        assert_trailers_only(&s, false, None, "/test.Echo/Unary", &lim, 8).await;
    });
}

/// The frames of a call whose answer had begun when Portico ended it: the head, messages,
/// then the status as trailers (HEADERS with END_STREAM) — never a reset in their place.
fn assert_ended_by_trailers(frames: Vec<String>, what: &str) {
    let frames = without_final_no_error(frames);
    assert!(frames.len() >= 3, "{what}: {frames:?}");
    assert_eq!(frames[0], "HEADERS", "{what}: {frames:?}");
    assert!(
        frames[1..frames.len() - 1]
            .iter()
            .all(|f| f.starts_with("DATA(") && !f.ends_with("END_STREAM")),
        "{what}: {frames:?}"
    );
    assert_eq!(frames.last().unwrap(), "HEADERS+END_STREAM", "{what}: {frames:?}");
}

#[test]
fn a_call_cut_after_its_head_ends_with_its_status_in_trailers() {
    let s = setup();
    rt().block_on(async {
        for over_tls in [false, true] {
            let scheme = if over_tls { "https" } else { "http" };
            // (method, request headers, the grpc-status wanted)
            type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u32);
            let cases: [Case; 3] = [
                // Idle past the upstream's read timeout (1 s): DEADLINE_EXCEEDED.
                ("Bidi", &[("x-target", "short")], 4),
                // The client's deadline passes while the stream is open.
                ("Bidi", &[("x-target", "none"), ("grpc-timeout", "1S")], 4),
                // The upstream resets the stream after its first message: UNAVAILABLE.
                ("Die", &[("x-target", "none")], 14),
            ];
            for (method, headers, want) in cases {
                let what = format!("{method} {headers:?} over {scheme}");
                let (mut c, wire) = s.recorded(over_tls, None).await;
                let uri = format!("{scheme}://gw.test/test.Echo/{method}");
                let mut call = Bidi::open(&mut c, &uri, headers).await.unwrap();
                assert_eq!(call.http_status, 200, "{what}");
                call.send(b"one").unwrap();
                assert_eq!(call.recv().await.unwrap(), Some(b"echo:one".to_vec()), "{what}");
                let id = call.id;
                let t = Instant::now();
                let (code, message) = tokio::time::timeout(Duration::from_secs(10), call.status())
                    .await
                    .unwrap_or_else(|_| panic!("{what}: no end"))
                    .unwrap_or_else(|e| panic!("{what}: the stream was reset ({e}) instead of ending with a status"));
                assert_eq!(code, Some(want), "{what}: {message:?}");
                assert!(message.is_some_and(|m| !m.is_empty()), "{what}");
                assert!(t.elapsed() < Duration::from_secs(5), "{what}: {:?}", t.elapsed());
                assert_ended_by_trailers(wire.stream(id).await, &what);
            }
        }
    });
    let log = s.gw.p.stdout_text();
    for line in log.lines().filter(|l| l.contains("\"route\":\"short\"")) {
        assert!(line.contains("\"error\":\"upstream_timeout\""), "{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// A request body over the limit, to an HTTP/2 upstream: refused at once, the upstream's stream
// reset (the route's read timeout is an hour).

#[test]
fn a_body_over_the_limit_to_an_h2_upstream_is_refused_at_once() {
    let s = setup();
    let big = vec![b'q'; 2048];
    rt().block_on(async {
        for (target, server) in [("small", &s.servers.0), ("small-tls", &s.servers.1)] {
            for over_tls in [false, true] {
                let what = format!("{target} over {}", if over_tls { "TLS" } else { "h2c" });
                // gRPC (no content-length; the message streamed): RESOURCE_EXHAUSTED, trailers-only.
                let (mut c, wire) = s.recorded(over_tls, None).await;
                let before = server.resets.load(SeqCst);
                let t = Instant::now();
                let (id, r) = tokio::time::timeout(
                    Duration::from_secs(10),
                    unary_on(&mut c, "http://gw.test/test.Echo/Unary", &big, &[("x-target", target)]),
                )
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
                .unwrap();
                assert_eq!((r.http_status, r.grpc_status), (200, Some(8)), "{what}: {r:?}");
                assert!(t.elapsed() < Duration::from_secs(5), "{what}: {:?}", t.elapsed());
                assert_eq!(
                    without_final_no_error(wire.stream(id).await),
                    ["HEADERS+END_STREAM"],
                    "{what}"
                );
                // The upstream's stream was reset, not left waiting for the rest of the body.
                wait_for("the upstream stream reset", Duration::from_secs(5), || {
                    (server.resets.load(SeqCst) > before).then_some(())
                });

                // Plain HTTP/2, no content-length: 413 payload_too_large.
                let c = if over_tls {
                    s.over_tls().await
                } else {
                    s.over_h2c().await
                };
                let before = server.resets.load(SeqCst);
                let req = http::Request::post("http://gw.test/test.Echo/Unary")
                    .header("x-target", target)
                    .body(())
                    .unwrap();
                let (resp, mut body) = c.clone().ready().await.unwrap().send_request(req, false).unwrap();
                body.send_data(bytes::Bytes::from(vec![b'a'; 1000]), false).unwrap();
                body.send_data(bytes::Bytes::from(vec![b'b'; 1000]), true).unwrap();
                let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                    .await
                    .unwrap_or_else(|_| panic!("{what}: no HTTP/2 answer within 10 s"))
                    .unwrap();
                assert_eq!(resp.status(), 413, "{what}");
                let mut recv = resp.into_body();
                let mut text = Vec::new();
                while let Some(chunk) = recv.data().await {
                    text.extend_from_slice(&chunk.unwrap());
                }
                let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
                assert_eq!(v["error"], "payload_too_large", "{what}");
                wait_for("the upstream stream reset", Duration::from_secs(5), || {
                    (server.resets.load(SeqCst) > before).then_some(())
                });
            }
        }
    });
    // HTTP/1.1 chunked, to the same h2c upstream: 413 at once.
    let chunked = format!(
        "POST /test.Echo/Unary HTTP/1.1\r\nhost: gw.test\r\nx-target: small\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
        "c".repeat(2048)
    );
    let t = Instant::now();
    let raw = raw(&s.gw.addrs[1], chunked.as_bytes(), Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The access log line is written after the answer: poll for all nine.
    let log = wait_for("nine access log lines", Duration::from_secs(10), || {
        let log = s.gw.p.stdout_text();
        (log.lines().filter(|l| l.contains("\"route\":\"small")).count() >= 9).then_some(log)
    });
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("\"route\":\"small")).collect();
    assert_eq!(lines.len(), 9, "{log}");
    for line in lines {
        assert!(line.contains("\"error\":\"payload_too_large\""), "{line}");
    }
}

/// A call the client gives up on (its deadline passed, so it resets the stream) is logged as
/// `client_closed`, a documented code.
#[test]
fn a_call_the_client_cancels_is_logged_as_client_closed() {
    let s = setup();
    let rt = rt();
    // The connection stays open (the runtime lives on): only the stream is reset.
    let _conn = rt.block_on(async {
        let c = s.over_h2c().await;
        let req = http::Request::post("http://gw.test/test.Echo/Slow")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-request-id", "cancelled-call-1")
            .body(())
            .unwrap();
        let (_resp, mut body) = c.clone().ready().await.unwrap().send_request(req, false).unwrap();
        body.send_data(frame(b"x"), true).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        body.send_reset(h2::Reason::CANCEL);
        c
    });
    let line = wait_for("the access log line", Duration::from_secs(10), || {
        let log = s.gw.p.stdout_text();
        log.lines().find(|l| l.contains("cancelled-call-1")).map(str::to_string)
    });
    assert!(line.contains("\"error\":\"client_closed\""), "{line}");
}
