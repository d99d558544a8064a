//! Acceptance [9/12] #12, orchestration: `aggregate` answers a route with the JSON of several
//! upstream calls, run concurrently stage by stage through the upstream client, over real
//! upstreams (echo services, a recording upstream, a content server, a port nobody listens on).

mod common;
use bytes::Bytes;
use common::*;
use std::time::{Duration, Instant};

/// `upstreams:` with one endpoint each.
fn upstreams(list: &[(&str, String)]) -> String {
    let mut out = String::from("upstreams:\n");
    for (name, addr) in list {
        out.push_str(&format!("  {name}: {{ endpoints: [{addr}] }}\n"));
    }
    out
}

#[test]
fn profile_aggregates_users_and_orders_concurrently() {
    let users = EchoServer::start("users").unwrap();
    let orders = EchoServer::start("orders").unwrap();
    let body = format!(
        r#"{}routes:
  - name: profile
    match: {{ path: "/profile/{{id}}", methods: [GET] }}
    plugins:
      - aggregate:
          calls:
            user: {{ upstream: users, path: "/users/{{id}}" }}
            orders: {{ upstream: orders, path: "/orders?user={{id}}" }}
  - name: slow
    match: {{ path: "/slow/{{id}}" }}
    plugins:
      - aggregate:
          calls:
            user: {{ upstream: users, path: "/users/{{id}}?delay_ms=300" }}
            orders: {{ upstream: orders, path: "/orders?user={{id}}&delay_ms=300" }}
"#,
        upstreams(&[("users", users.addr.to_string()), ("orders", orders.addr.to_string())])
    );
    let gw = Gw::start(&body);
    let r = gw.get("/profile/7");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()));
    assert!(r.header("x-request-id").is_some());
    let v = r.json();
    assert_eq!(v["user"]["service"], "users");
    assert_eq!(v["user"]["path"], "/users/7");
    assert_eq!(v["orders"]["service"], "orders");
    assert_eq!(v["orders"]["path"], "/orders");
    assert_eq!(v["orders"]["query"], "user=7");
    assert!(v.get("errors").is_none(), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 2);

    // Two upstreams that take 300 ms each answer together: best of three under 500 ms.
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let r = gw.get("/slow/8");
        best = best.min(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["orders"]["query"], "user=8&delay_ms=300");
    }
    assert!(best >= Duration::from_millis(300), "{best:?}");
    assert!(
        best < Duration::from_millis(500),
        "the calls did not run concurrently: {best:?}"
    );
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            "portico_aggregate_calls_total",
            &[("route", "profile"), ("result", "ok")]
        ),
        2.0
    );
}

#[test]
fn partial_and_fail() {
    let users = EchoServer::start("users").unwrap();
    let slow = EchoServer::start("slow").unwrap();
    let down = free_addr(); // nothing listens there
    let route = |name: &str, on_error: &str, orders: &str| {
        format!(
            r#"  - name: {name}
    match: {{ path: "/{name}/{{id}}" }}
    plugins:
      - aggregate:
          on_error: {on_error}
          timeout: 1500ms
          calls:
            user: {{ upstream: users, path: "/users/{{id}}" }}
            orders: {orders}
"#
        )
    };
    let body = format!(
        "{}routes:\n{}{}{}{}{}{}",
        upstreams(&[
            ("users", users.addr.to_string()),
            ("slow", slow.addr.to_string()),
            ("down", down)
        ]),
        route("pdown", "partial", "{ upstream: down, path: /orders }"),
        route(
            "pslow",
            "partial",
            "{ upstream: slow, path: '/orders?delay_ms=5000', timeout: 300ms }"
        ),
        route("p500", "partial", "{ upstream: slow, path: '/orders?status=500' }"),
        route("fdown", "fail", "{ upstream: down, path: /orders }"),
        route(
            "fslow",
            "fail",
            "{ upstream: slow, path: '/orders?delay_ms=5000', timeout: 300ms }"
        ),
        route("foverall", "fail", "{ upstream: slow, path: '/orders?delay_ms=5000' }"),
    );
    let gw = Gw::start(&body);

    // partial: 200, the failed key null, the failure under "errors".
    let v = gw.get("/pdown/1").json();
    assert_eq!(v["user"]["path"], "/users/1");
    assert!(v["orders"].is_null(), "{v}");
    assert_eq!(v["errors"]["orders"]["status"], 502);
    assert_eq!(v["errors"]["orders"]["message"], "the upstream could not be reached");
    assert!(v["errors"].get("user").is_none());

    let t = Instant::now();
    let r = gw.get("/pslow/2");
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["user"]["path"], "/users/2");
    assert!(v["orders"].is_null());
    assert_eq!(v["errors"]["orders"]["status"], 504);
    assert_eq!(v["errors"]["orders"]["message"], "no answer within its timeout (300ms)");
    assert!(took < Duration::from_millis(1400), "{took:?}");

    let v = gw.get("/p500/3").json();
    assert_eq!(v["errors"]["orders"]["status"], 500);
    assert_eq!(v["errors"]["orders"]["message"], "the upstream answered 500");

    // fail: 502 naming the call; 504 when it timed out, within the timeout.
    let r = gw.get("/fdown/4");
    assert_eq!(r.status, 502);
    let v = r.json();
    assert_eq!(v["error"], "upstream_unavailable");
    assert_eq!(
        v["message"],
        "aggregate call 'orders' failed: the upstream could not be reached"
    );
    assert_eq!(v["trace_id"].as_str(), r.header("x-request-id"));

    let t = Instant::now();
    let r = gw.get("/fslow/5");
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert!(r.json()["message"].as_str().unwrap().contains("'orders'"));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1400),
        "{took:?}"
    );

    // The overall timeout bounds a call without its own.
    let t = Instant::now();
    let r = gw.get("/foverall/6");
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(
        r.json()["message"],
        "aggregate call 'orders' failed: no answer within the aggregate's timeout (1s 500ms)"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(3000),
        "{took:?}"
    );
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            "portico_aggregate_calls_total",
            &[("route", "pslow"), ("call", "orders"), ("result", "timeout")]
        ),
        1.0
    );
}

#[test]
fn depends_on_uses_an_earlier_answer_percent_encoded() {
    let accounts = ContentServer::start(r#"{"id": 7, "account": "../x?y=1", "tags": ["a b"]}"#);
    let rec = RecordingUpstream::start();
    let body = format!(
        r#"{}routes:
  - name: chain
    match: {{ path: "/chain/{{id}}" }}
    plugins:
      - aggregate:
          on_error: partial
          calls:
            user: {{ upstream: accounts, path: "/users/{{id}}" }}
            acct: {{ upstream: rec, path: "/accounts/${{user.account}}?u=${{user.id}}&t=${{user.tags.0}}&q=${{query.q}}", depends_on: [user] }}
            nope: {{ upstream: rec, path: "/x/${{user.missing}}", depends_on: [user] }}
            after: {{ upstream: rec, path: "/after/${{nope.id}}", depends_on: [nope] }}
"#,
        upstreams(&[("accounts", accounts.addr.to_string()), ("rec", rec.addr.to_string())])
    );
    let gw = Gw::start(&body);
    let v = gw.get("/chain/a%20b?q=1%262").json();
    let targets: Vec<String> = rec.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/accounts/..%2Fx%3Fy%3D1?u=7&t=a%20b&q=1%262"]);
    assert_eq!(v["user"]["account"], "../x?y=1");
    assert_eq!(v["acct"]["target"], "/accounts/..%2Fx%3Fy%3D1?u=7&t=a%20b&q=1%262");
    // A value the earlier answer lacks: that call is not run, nor the one that needs it.
    assert!(v["nope"].is_null());
    assert_eq!(v["errors"]["nope"]["status"], 424);
    assert_eq!(
        v["errors"]["nope"]["message"],
        "not run: ${user.missing}: the answer of call 'user' has no field 'missing'"
    );
    assert_eq!(v["errors"]["after"]["message"], "not run: call 'nope' failed");
    // The route parameter arrived percent-encoded and is sent in one segment.
    assert_eq!(accounts.hits(), 1);
}

#[test]
fn every_sub_call_carries_the_trace_and_reuses_connections() {
    let rec = RecordingUpstream::start();
    let body = format!(
        r#"{}routes:
  - name: both
    match: {{ path: "/both/{{id}}" }}
    plugins:
      - aggregate:
          forward_headers: [authorization, x-tenant]
          calls:
            a: {{ upstream: rec, path: "/a/{{id}}" }}
            b: {{ upstream: rec, path: "/b/{{id}}" }}
"#,
        upstreams(&[("rec", rec.addr.to_string())])
    );
    let gw = Gw::start(&body);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let r = gw.send(
        Request::get("/both/1")
            .header("x-request-id", "agg-trace-1")
            .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
            .header("authorization", "Bearer t0k")
            .header("x-tenant", "acme")
            .header("cookie", "secret=1"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("agg-trace-1"));
    let seen = rec.requests();
    assert_eq!(seen.len(), 2);
    let mut spans = Vec::new();
    for s in &seen {
        assert_eq!(s.header("x-request-id"), Some("agg-trace-1"), "{s:?}");
        let tp: Vec<&str> = s.header("traceparent").unwrap().split('-').collect();
        assert_eq!(tp[1], trace, "{s:?}");
        assert_ne!(tp[2], "b7ad6b7169203331", "a child span, not the client's");
        spans.push(tp[2].to_string());
        assert_eq!(s.header("authorization"), Some("Bearer t0k"));
        assert_eq!(s.header("x-tenant"), Some("acme"));
        assert_eq!(s.header("cookie"), None, "only the listed headers are forwarded");
        assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(s.header_count("host"), 1);
    }
    assert_ne!(spans[0], spans[1], "each sub-call is its own span");

    // 500 aggregate requests, 1000 sub-calls: pooled connections, not one each.
    for i in 0..500 {
        let r = gw.get(&format!("/both/{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let requests = rec.requests().len();
    let connections = rec.connection_bytes().len();
    assert_eq!(requests, 1002);
    assert!(
        connections <= 20,
        "{connections} upstream connections for {requests} sub-calls"
    );
    assert!(rec.garbage().is_empty());
}

#[test]
fn answers_are_embedded_by_type_and_bounded() {
    let small = ContentServer::start(r#"{"id": 1}"#);
    let echo = EchoServer::start("echo").unwrap();
    let body = format!(
        r#"{}routes:
  - name: kinds
    match: {{ path: "/kinds" }}
    plugins:
      - aggregate:
          calls:
            json: {{ upstream: small, path: /j }}
            xml: {{ upstream: echo, path: "/x?format=xml" }}
  - name: bounded
    match: {{ path: "/bounded" }}
    plugins:
      - aggregate:
          on_error: partial
          max_body: 1KiB
          forward_headers: [x-pad]
          calls:
            small: {{ upstream: small, path: /s }}
            big: {{ upstream: echo, path: /b }}
"#,
        upstreams(&[("small", small.addr.to_string()), ("echo", echo.addr.to_string())])
    );
    let gw = Gw::start(&body);
    let v = gw.get("/kinds").json();
    assert_eq!(v["json"], serde_json::json!({"id": 1}));
    let xml = v["xml"].as_str().expect("a non-JSON answer is a string");
    assert!(xml.starts_with("<?xml") && xml.contains("<path>/x</path>"), "{xml}");
    // The echo answer carries the 2 KB header back: over max_body, not read further.
    let r = gw.send(Request::get("/bounded").header("x-pad", "p".repeat(2000)));
    let v = r.json();
    assert_eq!(v["small"]["id"], 1);
    assert!(v["big"].is_null());
    assert_eq!(v["errors"]["big"]["status"], 502);
    assert_eq!(
        v["errors"]["big"]["message"],
        "the answer is larger than max_body (1024 bytes)"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn aggregate_over_h2c() {
    let users = EchoServer::start("users").unwrap();
    let orders = EchoServer::start("orders").unwrap();
    let body = format!(
        r#"{}routes:
  - name: profile
    match: {{ path: "/profile/{{id}}" }}
    plugins:
      - aggregate:
          calls:
            user: {{ upstream: users, path: "/users/{{id}}" }}
            orders: {{ upstream: orders, path: "/orders/{{id}}?delay_ms=50" }}
"#,
        upstreams(&[("users", users.addr.to_string()), ("orders", orders.addr.to_string())])
    );
    let gw = Gw::start_h2c(&body);
    let addr = gw.addr.clone();
    runtime().block_on(async move {
        let client = h2c_client(&addr).await;
        // Several streams at once on one connection.
        let mut waits = Vec::new();
        for id in 0..4 {
            let mut c = client.clone().ready().await.unwrap();
            let req = http::Request::builder()
                .uri(format!("http://gw.test/profile/{id}"))
                .body(())
                .unwrap();
            let (resp, _) = c.send_request(req, true).unwrap();
            waits.push((id, resp));
        }
        for (id, resp) in waits {
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-type"], "application/json");
            let mut body = resp.into_body();
            let mut bytes = Vec::new();
            while let Some(d) = body.data().await {
                let d: Bytes = d.unwrap();
                let _ = body.flow_control().release_capacity(d.len());
                bytes.extend_from_slice(&d);
            }
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["user"]["path"], format!("/users/{id}"));
            assert_eq!(v["orders"]["path"], format!("/orders/{id}"));
        }
    });
}

#[test]
fn a_transform_reshapes_the_aggregate_answer() {
    let users = EchoServer::start("users").unwrap();
    let body = format!(
        r#"{}routes:
  - name: profile
    match: {{ path: "/profile/{{id}}" }}
    plugins:
      - aggregate:
          calls:
            user: {{ upstream: users, path: "/users/{{id}}" }}
      - transform: {{ response: {{ select: [user.path, user.service], rename: {{ user.path: p }}, wrap: data }} }}
      - headers: {{ response: {{ set: {{ x-shaped: "yes" }} }} }}
"#,
        upstreams(&[("users", users.addr.to_string())])
    );
    let gw = Gw::start(&body);
    let r = gw.get("/profile/9");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-shaped"), Some("yes"));
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()));
    assert_eq!(
        r.json(),
        serde_json::json!({"data": {"user": {"p": "/users/9", "service": "users"}}})
    );
    // Portico's own errors keep the contract's shape.
    let r = gw.get("/nowhere");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
}

#[test]
fn bad_aggregates_are_located_config_errors() {
    let base = "listeners: [{ address: 127.0.0.1:18080 }]\nupstreams:\n  u: { endpoints: [127.0.0.1:9001] }\nroutes:\n  - name: r\n    match: { path: \"/p/{id}\" }\n    plugins:\n      - aggregate:\n          calls:\n";
    let cases: &[(&str, &str)] = &[
        (
            "            a: { upstream: u, path: '/a/${b.x}', depends_on: [b] }\n            b: { upstream: u, path: '/b/${a.x}', depends_on: [a] }\n",
            "routes[0].plugins[0].aggregate.calls.a.depends_on: cycle a -> b -> a",
        ),
        (
            "            a: { upstream: u, path: '/a/${zz.x}' }\n",
            "routes[0].plugins[0].aggregate.calls.a.path: '${zz.x}' refers to unknown call 'zz'",
        ),
        (
            "            a: { upstream: u, path: /a, depends_on: [zz] }\n",
            "routes[0].plugins[0].aggregate.calls.a.depends_on: unknown call 'zz'",
        ),
        (
            "            a: { upstream: u, path: '/a/{nope}' }\n",
            "routes[0].plugins[0].aggregate.calls.a.path: unknown route parameter '{nope}' (the route has: id)",
        ),
        (
            "            a: { upstream: missing, path: /a }\n",
            "routes[0].plugins[0].aggregate.calls.a.upstream: unknown upstream 'missing'",
        ),
    ];
    for (calls, want) in cases {
        let (code, out) = check(&format!("{base}{calls}"));
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(want), "want {want}\ngot {out}");
    }
    let (code, out) = check(&format!("{base}            a: {{ upstream: u, path: '/a/{{id}}' }}\n"));
    assert_eq!((code, out.trim()), (0, "ok"));
}

/// An upstream that answers each path with fixed bytes, whatever the request asked for (an app
/// behind a compressing middleware gzips even unasked), and records each request head.
struct Canned {
    addr: std::net::SocketAddr,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Canned {
    fn start(answer: fn(&str) -> (&'static str, &'static str, Vec<u8>)) -> Canned {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                seen.lock().unwrap().push(head);
                let (content_type, encoding, body) = answer(&path);
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                if !encoding.is_empty() {
                    resp.push_str(&format!("content-encoding: {encoding}\r\n"));
                }
                resp.push_str("\r\n");
                let _ = stream.write_all(resp.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        Canned { addr, heads }
    }

    /// The value of header `name` in each request received.
    fn header(&self, name: &str) -> Vec<String> {
        let prefix = format!("\r\n{name}: ");
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| {
                h.split(&prefix)
                    .nth(1)
                    .and_then(|rest| rest.split("\r\n").next())
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Sub-calls ask for plain answers (`Accept-Encoding: identity`); a gzip answer sent anyway is
/// decoded and embedded as JSON; an answer in another encoding, gzip that does not decode, or
/// binary bytes fail their call — never a string of mangled bytes. Calls get the client's
/// `X-Forwarded-Host` as written (port included), as proxied requests do.
#[test]
fn encoded_answers_are_decoded_or_fail_and_calls_forward_the_host_as_written() {
    let app = Canned::start(|path| match path {
        "/gz" => ("application/json", "gzip", gzip(br#"{"name":"ann","n":[1,2]}"#)),
        "/bad" => ("application/json", "gzip", b"\x1f\x8b not gzip at all".to_vec()),
        "/br" => ("application/json", "br", vec![0x0b, 0x02, 0x80]),
        "/bin" => ("application/octet-stream", "", vec![0x1f, 0x8b, 0xff, 0x00, 0xfe]),
        _ => ("text/plain", "", b"hello".to_vec()),
    });
    let body = format!(
        r#"{}routes:
  - name: agg
    match: {{ path: "/agg" }}
    plugins:
      - aggregate:
          on_error: partial
          calls:
            gz: {{ upstream: app, path: /gz }}
            bad: {{ upstream: app, path: /bad }}
            br: {{ upstream: app, path: /br }}
            bin: {{ upstream: app, path: /bin }}
            text: {{ upstream: app, path: /text }}
  - name: proxied
    match: {{ path: "/text" }}
    upstream: app
"#,
        upstreams(&[("app", app.addr.to_string())])
    );
    let gw = Gw::start(&body);
    let r = gw.get("/agg");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["gz"], serde_json::json!({"name": "ann", "n": [1, 2]}), "{v}");
    assert_eq!(v["text"], "hello");
    let failed = |k: &str| {
        (
            v[k].clone(),
            v["errors"][k]["status"].clone(),
            v["errors"][k]["message"].clone(),
        )
    };
    assert_eq!(
        failed("bad"),
        (
            serde_json::Value::Null,
            502.into(),
            "the answer's gzip encoding does not decode".into()
        )
    );
    assert_eq!(
        failed("br"),
        (
            serde_json::Value::Null,
            502.into(),
            "the answer is encoded (br), which aggregate does not decode".into()
        )
    );
    assert_eq!(
        failed("bin"),
        (
            serde_json::Value::Null,
            502.into(),
            "the answer is neither JSON nor UTF-8 text".into()
        )
    );
    assert!(
        !r.text().contains('\u{fffd}'),
        "no replacement characters: {}",
        r.text()
    );
    assert_eq!(app.header("accept-encoding"), vec!["identity"; 5]);

    // X-Forwarded-Host: what a proxied request gets, the sub-calls get.
    assert_eq!(gw.get("/text").text(), "hello");
    let hosts = app.header("x-forwarded-host");
    assert_eq!(hosts.len(), 6);
    assert!(
        hosts.iter().all(|h| h == &gw.addr),
        "{hosts:?} (the client sent {})",
        gw.addr
    );
}
