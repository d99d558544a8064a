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
use portico::testing::pki::TestCa;
use portico::testing::tls;
use portico::{BuildContext, Phases, Plugin, PluginKind, Registry, RequestHeader, RequestState};
use std::time::{Duration, Instant};

const TLS_SPEC: &str = "127.0.0.1:0";
const PLAIN_SPEC: &str = "127.0.0.3:0";
const SECRET: &str = "grpc-test-secret-grpc-test-secret";

struct Setup {
    ca: TestCa,
    _dir: TempDir,
    gw: Gw,
    _servers: (GrpcServer, GrpcServer),
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
        "  - address: {TLS_SPEC}\n    http2: true\n    tls: {{ cert: {c}, key: {k} }}\n  - address: {PLAIN_SPEC}\n    http2: true\n"
    );
    let route = |name: &str, target: &str, upstream: &str, extra: &str| {
        format!(
            "  - name: {name}\n    match: {{ path_prefix: /test.Echo, headers: {{ x-target: {target} }} }}\n    upstream: {upstream}\n{extra}"
        )
    };
    let body = format!(
        "limits:\n  body_timeout: 1s\nupstreams:\n  grpc: {{ endpoints: [{g}], protocol: h2c }}\n  grpc-tls:\n    endpoints: [{t}]\n    protocol: h2\n    tls: {{ sni: grpc.internal, ca: {ca_file} }}\n  down: {{ endpoints: [{down}], protocol: h2c }}\n  short-read: {{ endpoints: [{g}], protocol: h2c, timeouts: {{ read: 1s }} }}\nroutes:\n{}{}{}{}{}  - name: grpc\n    match: {{ path_prefix: /test.Echo }}\n    upstream: grpc\n",
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
        _servers: (h2c_server, tls_server),
    }
}

impl Setup {
    async fn over_tls(&self) -> h2::client::SendRequest<bytes::Bytes> {
        h2_tls(&self.gw.addrs[0], "gw.test", tls::client(&self.ca, None, &["h2"])).await
    }
    async fn over_h2c(&self) -> h2::client::SendRequest<bytes::Bytes> {
        h2c(&self.gw.addrs[1]).await
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
