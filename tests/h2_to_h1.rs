//! HTTP/2 clients in front of HTTP/1.1 upstreams: every way an HTTP/2 request can end (an empty
//! DATA frame with END_STREAM, as python-h2's `end_stream()` sends; END_STREAM on HEADERS;
//! trailers) must reach the upstream as exactly one request, framed once. A second chunk
//! terminator would be parsed upstream as another request whose answer waits in the pooled
//! connection for the next client (a request desync; Pingora issue #935).

mod common;
use bytes::Bytes;
use common::*;
use h2::client::SendRequest;
use std::time::{Duration, Instant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// How the client ends its request stream.
#[derive(Clone, Copy, Debug)]
enum End {
    /// END_STREAM on the HEADERS frame (no body at all).
    OnHeaders,
    /// The body pieces, then an empty DATA frame carrying END_STREAM.
    EmptyData,
    /// END_STREAM on the last piece.
    LastData,
    /// The body pieces, then a trailing HEADERS frame.
    Trailers,
}

struct Answer {
    status: u16,
    echo_id: String,
    body: Vec<u8>,
}

async fn send(
    client: &mut SendRequest<Bytes>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    pieces: &[&[u8]],
    end: End,
) -> Result<Answer, h2::Error> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://gw.test{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(()).unwrap();
    let mut client = client.clone().ready().await?;
    let (resp, mut stream) = client.send_request(req, matches!(end, End::OnHeaders))?;
    if !matches!(end, End::OnHeaders) {
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            stream.send_data(Bytes::copy_from_slice(p), last && matches!(end, End::LastData))?;
        }
        match end {
            End::EmptyData => stream.send_data(Bytes::new(), true)?,
            End::Trailers => {
                let mut t = http::HeaderMap::new();
                t.insert("x-trailer", "1".parse().unwrap());
                stream.send_trailers(t)?;
            }
            _ => {}
        }
    }
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let echo_id = resp
        .headers()
        .get("x-echo-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    Ok(Answer {
        status,
        echo_id,
        body: bytes,
    })
}

fn config(up: &RecordingUpstream) -> String {
    format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    )
}

/// (name, method, extra headers, body pieces, how it ends, expected body upstream, expect chunked)
type Case<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    &'a [&'a [u8]],
    End,
    &'a str,
    bool,
);

#[test]
fn every_way_an_h2_request_ends_reaches_an_h1_upstream_framed_once() {
    let up = RecordingUpstream::start();
    let gw = Gw::start_h2c(&config(&up));
    let rt = runtime();
    rt.block_on(async {
        let mut c = h2c_client(&gw.addr).await;
        let hello: &[&[u8]] = &[b"hello"];
        let split: &[&[u8]] = &[b"he", b"llo"];
        let cases: Vec<Case> = vec![
            (
                "post-no-cl-empty-data",
                "POST",
                vec![],
                hello,
                End::EmptyData,
                "hello",
                true,
            ),
            (
                "post-no-cl-last-data",
                "POST",
                vec![],
                split,
                End::LastData,
                "hello",
                true,
            ),
            (
                "post-no-cl-split-empty-data",
                "POST",
                vec![],
                split,
                End::EmptyData,
                "hello",
                true,
            ),
            (
                "post-cl-empty-data",
                "POST",
                vec![("content-length", "5")],
                hello,
                End::EmptyData,
                "hello",
                false,
            ),
            (
                "post-cl-last-data",
                "POST",
                vec![("content-length", "5")],
                hello,
                End::LastData,
                "hello",
                false,
            ),
            ("post-trailers", "POST", vec![], hello, End::Trailers, "hello", true),
            (
                "post-cl-trailers",
                "POST",
                vec![("content-length", "5")],
                hello,
                End::Trailers,
                "hello",
                false,
            ),
            (
                "post-empty-body-empty-data",
                "POST",
                vec![],
                &[],
                End::EmptyData,
                "",
                true,
            ),
            (
                "post-cl0-on-headers",
                "POST",
                vec![("content-length", "0")],
                &[],
                End::OnHeaders,
                "",
                false,
            ),
            ("get-on-headers", "GET", vec![], &[], End::OnHeaders, "", false),
            ("get-empty-data", "GET", vec![], &[], End::EmptyData, "", true),
            ("head-empty-data", "HEAD", vec![], &[], End::EmptyData, "", true),
            ("head-on-headers", "HEAD", vec![], &[], End::OnHeaders, "", false),
            (
                "te-trailers",
                "POST",
                vec![("te", "trailers")],
                hello,
                End::EmptyData,
                "hello",
                true,
            ),
            (
                "two-equal-content-lengths",
                "POST",
                vec![("content-length", "5"), ("content-length", "5")],
                hello,
                End::EmptyData,
                "hello",
                false,
            ),
        ];
        for (i, (name, method, headers, pieces, end, want_body, want_chunked)) in cases.iter().enumerate() {
            let id = format!("case-{i}");
            let mut h = headers.clone();
            h.push(("x-id", &id));
            let a = send(&mut c, method, "/x", &h, pieces, *end)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}\n{}", gw.p.logs()));
            assert_eq!(a.status, 200, "{name}: {}", String::from_utf8_lossy(&a.body));
            assert_eq!(a.echo_id, id, "{name}: the answer was meant for another request");
            if *method == "HEAD" {
                assert!(a.body.is_empty(), "{name}: a HEAD answer has no body");
            }
            // The pooled upstream connection must hold nothing stray: a plain request right
            // after gets its own answer.
            let probe = format!("probe-{i}");
            let p = send(&mut c, "GET", "/probe", &[("x-id", &probe)], &[], End::OnHeaders)
                .await
                .unwrap();
            assert_eq!(
                (p.status, p.echo_id.as_str()),
                (200, probe.as_str()),
                "{name}: a request after it got another answer (desync)"
            );
            let reqs = up.requests();
            let seen = reqs
                .iter()
                .find(|r| r.header("x-id") == Some(&id))
                .unwrap_or_else(|| panic!("{name}: never reached the upstream"));
            assert_eq!(seen.method, *method, "{name}");
            assert_eq!(String::from_utf8_lossy(&seen.body), *want_body, "{name}");
            assert_eq!(seen.chunked, *want_chunked, "{name}: chunked");
            assert!(
                seen.header_count("content-length") <= 1,
                "{name}: one content-length at most"
            );
            assert!(
                !(seen.chunked && seen.header("content-length").is_some()),
                "{name}: chunked and a length"
            );
            assert_eq!(seen.header_count("te"), 0, "{name}: te is hop-by-hop");
        }
        assert_eq!(up.requests().len(), cases.len() * 2, "one upstream request per request");

        // Two different lengths: refused before anything goes upstream.
        let before = up.requests().len();
        let a = send(
            &mut c,
            "POST",
            "/x",
            &[("content-length", "5"), ("content-length", "6"), ("x-id", "bad-cl")],
            hello,
            End::EmptyData,
        )
        .await;
        match a {
            Ok(a) => assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body)),
            Err(e) => assert!(e.is_reset(), "refused by a stream reset or a 400: {e}"),
        }
        assert_eq!(up.requests().len(), before, "the upstream saw no conflicting lengths");
    });
    assert!(up.garbage().is_empty(), "stray bytes upstream: {:?}", up.garbage());
    // Each chunked body in the raw bytes ends once: no terminator is followed by another.
    for bytes in up.connection_bytes() {
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("0\r\n\r\n0\r\n\r\n"), "a doubled terminator:\n{text}");
    }
}

/// Two clients race through one pool of upstream connections: one ends its requests with empty
/// DATA frames, the other sends ordinary requests with a secret. No answer may reach the wrong
/// client.
#[test]
fn racing_clients_never_get_each_others_answers() {
    let up = RecordingUpstream::start();
    let gw = Gw::start_h2c(&config(&up));
    let rt = runtime();
    let (wrong_a, wrong_b, total) = rt.block_on(async {
        let addr = gw.addr.clone();
        let until = Instant::now() + Duration::from_secs(3);
        let attacker = tokio::spawn({
            let addr = addr.clone();
            async move {
                let mut c = h2c_client(&addr).await;
                let (mut wrong, mut n) = (0, 0);
                while Instant::now() < until {
                    let id = format!("a-{n}");
                    match send(&mut c, "POST", "/a", &[("x-id", &id)], &[b"hello"], End::EmptyData).await {
                        Ok(a) if a.status == 200 && a.echo_id == id => {}
                        _ => wrong += 1,
                    }
                    n += 1;
                }
                (wrong, n)
            }
        });
        let victim = tokio::spawn(async move {
            let mut c = h2c_client(&addr).await;
            let (mut wrong, mut n) = (0, 0);
            while Instant::now() < until {
                let id = format!("b-{n}");
                let h = [("x-id", id.as_str()), ("authorization", "Bearer victim-secret")];
                match send(&mut c, "GET", "/b", &h, &[], End::OnHeaders).await {
                    Ok(a) if a.status == 200 && a.echo_id == id => {}
                    _ => wrong += 1,
                }
                n += 1;
            }
            (wrong, n)
        });
        let (wa, na) = attacker.await.unwrap();
        let (wb, nb) = victim.await.unwrap();
        (wa, wb, na + nb)
    });
    assert!(total > 200, "the race ran ({total} requests)");
    assert_eq!((wrong_a, wrong_b), (0, 0), "answers delivered to the wrong request");
    assert!(up.garbage().is_empty(), "stray bytes upstream: {:?}", up.garbage());
}

/// Browsers send each cookie as a field of its own over HTTP/2 (RFC 9113 §8.2.3); an HTTP/1
/// upstream must get them as one `Cookie` header joined with "; " (gunicorn folds repeated
/// lines with "," and Flask then reads `a=1,b=2` as one cookie).
#[test]
fn split_cookies_reach_an_h1_upstream_as_one_header() {
    let up = RecordingUpstream::start();
    let gw = Gw::start_h2c(&config(&up));
    runtime().block_on(async {
        let mut c = h2c_client(&gw.addr).await;
        let h = [
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
            ("x-id", "cookies"),
        ];
        let a = send(&mut c, "GET", "/x", &h, &[], End::OnHeaders).await.unwrap();
        assert_eq!(a.status, 200);
        let a = send(
            &mut c,
            "GET",
            "/x",
            &[("cookie", "only=1"), ("x-id", "one")],
            &[],
            End::OnHeaders,
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200);
    });
    let reqs = up.requests();
    let seen = reqs.iter().find(|r| r.header("x-id") == Some("cookies")).unwrap();
    assert_eq!(seen.header_count("cookie"), 1, "{:?}", seen.headers);
    assert_eq!(seen.header("cookie"), Some("a=1; b=2; c=3"));
    let seen = reqs.iter().find(|r| r.header("x-id") == Some("one")).unwrap();
    assert_eq!(seen.header("cookie"), Some("only=1"));
}

/// HTTP/2 requests are held to the header count HTTP/1 ones are (128 → 431), so an HTTP/1
/// upstream never gets more (attack-v3 D5).
#[test]
fn an_http2_request_with_too_many_headers_gets_431() {
    let up = RecordingUpstream::start();
    let gw = Gw::start_h2c(&config(&up));
    runtime().block_on(async {
        let mut c = h2c_client(&gw.addr).await;
        let names: Vec<String> = (0..200).map(|i| format!("x-h{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let a = send(&mut c, "GET", "/x", &many, &[], End::OnHeaders).await.unwrap();
        assert_eq!(a.status, 431, "{}", String::from_utf8_lossy(&a.body));
        let few = &many[..100];
        let a = send(&mut c, "GET", "/x", few, &[], End::OnHeaders).await.unwrap();
        assert_eq!(a.status, 200);
    });
    assert_eq!(up.requests().len(), 1);
}
