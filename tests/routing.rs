//! Acceptance [1/9] #1: routing by host, prefix, exact path, template, method and header; what
//! the upstream receives; 404 JSON with the trace id.

mod common;
use common::*;

#[test]
fn routes_rewrite_and_forward_what_the_contract_says() {
    let (a, b, c) = (
        EchoServer::start("a").unwrap(),
        EchoServer::start("b").unwrap(),
        EchoServer::start("c").unwrap(),
    );
    let gw = Gw::start(&format!(
        r#"
upstreams:
  a: {{ endpoints: ["{a}"] }}
  b: {{ endpoints: ["{b}"], host: b.internal }}
  c: {{ endpoints: ["{c}"], preserve_host: true }}
routes:
  - name: by-host
    match: {{ hosts: [api.example.com, "*.example.org"] }}
    upstream: b
  - name: users
    match: {{ path_prefix: /users }}
    upstream: a
    rewrite: {{ strip_prefix: /users, add_prefix: /v1/users }}
  - name: exact
    match: {{ path: /exact }}
    upstream: a
  - name: template
    match: {{ path: "/profile/{{id}}" }}
    upstream: c
  - name: posts
    match: {{ path_prefix: /posts, methods: [POST] }}
    upstream: b
  - name: tenant
    match: {{ path_prefix: /tenant, headers: {{ x-tenant: acme }} }}
    upstream: c
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    ));

    // Prefix + rewrite; Host defaults to the endpoint's address; X-Forwarded-*.
    let r = gw.send(
        Request::get("/users/7?x=1")
            .header("x-forwarded-for", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6"),
    );
    assert_eq!(service(&r), "a");
    let e = echoed(&r);
    assert_eq!(e["path"], "/v1/users/7");
    assert_eq!(e["query"], "x=1");
    assert_eq!(e["headers"]["host"], a.addr.to_string());
    assert_eq!(
        e["headers"]["x-forwarded-for"], "127.0.0.1",
        "a client's own X-Forwarded-For is replaced"
    );
    assert!(e["headers"].get("forwarded").is_none());
    assert_eq!(e["headers"]["x-forwarded-proto"], "http");
    assert_eq!(e["headers"]["x-forwarded-host"], gw.addr);

    // The upstream receives the normalised path the route decision saw.
    for (raw, want) in [
        ("//users/./7", "/v1/users/7"),
        ("/users/x/../8", "/v1/users/8"),
        ("/%75sers/9", "/v1/users/9"),
    ] {
        assert_eq!(echoed(&gw.get(raw))["path"], want, "{raw}");
    }
    assert_eq!(gw.get("/users").json()["path"], "/v1/users");
    assert_eq!(gw.get("/usersX").status, 404, "prefixes are segment-aware");

    // Exact path.
    assert_eq!(echoed(&gw.get("/exact"))["path"], "/exact");
    assert_eq!(gw.get("/exact/more").status, 404);

    // Template; preserve_host sends the client's Host.
    let r = gw.send(Request::get("/profile/42").header("host", "shop.test"));
    assert_eq!(service(&r), "c");
    assert_eq!(echoed(&r)["headers"]["host"], "shop.test");
    assert_eq!(gw.get("/profile/42/x").status, 404);

    // Method.
    let r = gw.send(Request::new("POST", "/posts").body("hello"));
    assert_eq!(service(&r), "b");
    let e = echoed(&r);
    assert_eq!(e["headers"]["host"], "b.internal");
    assert_eq!(e["body"], "hello");
    assert_eq!(gw.get("/posts").status, 404);

    // Header.
    assert_eq!(
        service(&gw.send(Request::get("/tenant/x").header("x-tenant", "acme"))),
        "c"
    );
    assert_eq!(
        gw.send(Request::get("/tenant/x").header("x-tenant", "other")).status,
        404
    );

    // Hosts: exact (port ignored, case-insensitive) and wildcard.
    for host in ["api.example.com", "API.Example.com:8080", "a.b.example.org"] {
        assert_eq!(
            service(&gw.send(Request::get("/anything").header("host", host))),
            "b",
            "{host}"
        );
    }
    assert_eq!(
        gw.send(Request::get("/anything").header("host", "example.org")).status,
        404
    );

    // No route: JSON with the trace id the client also got.
    let r = gw.get("/nowhere");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["error"], "no_route");
    assert_eq!(body["trace_id"].as_str(), r.header("x-request-id"));
    assert!(!body["message"].as_str().unwrap().is_empty());

    // For gRPC clients the same failure is a gRPC status.
    let r = gw.send(
        Request::new("POST", "/nowhere")
            .header("content-type", "application/grpc")
            .body(vec![0, 0, 0, 0, 0]),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("12"), "UNIMPLEMENTED");
    assert!(r.header("grpc-message").is_some_and(|m| m.contains("no route")));

    // Paths that cannot be normalised safely.
    for bad in ["/users%2F7", "/users/%2e%2e/%2e%2e/etc", "/..", "/a%5cb"] {
        let r = gw.get(bad);
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"], "bad_request", "{bad}");
    }
    assert_eq!(
        a.requests() + b.requests() + c.requests(),
        12,
        "nothing else reached an upstream"
    );
}

/// Contract § Hosts: a host matches without its trailing dot, port or case; an invalid host is
/// 400, so no spelling of a protected host falls through to a less protected route.
#[test]
fn hosts_are_normalised_and_invalid_ones_refused() {
    let (protected, open) = (
        EchoServer::start("protected").unwrap(),
        EchoServer::start("open").unwrap(),
    );
    let gw = Gw::start_h2c(&format!(
        r#"
upstreams:
  protected: {{ endpoints: ["{protected}"] }}
  open: {{ endpoints: ["{open}"] }}
routes:
  - name: api
    match: {{ hosts: [api.test] }}
    upstream: protected
  - name: fallback
    upstream: open
"#,
        protected = protected.addr,
        open = open.addr
    ));
    for host in ["api.test", "api.test.", "API.TEST:8080", "Api.Test.:80"] {
        let r = gw.send(Request::get("/x").header("host", host));
        assert_eq!(service(&r), "protected", "Host: {host}");
    }
    assert_eq!(
        service(&gw.send(Request::get("/x").header("host", "other.test"))),
        "open"
    );
    for host in [
        "api.test/x",
        "api.test#",
        "api.test:abc",
        "a b",
        "",
        "api.test:",
        "user@api.test",
    ] {
        let r = gw.send(Request::get("/x").header("host", host));
        assert_eq!(r.status, 400, "Host: {host:?} → {} {}", r.status, r.text());
        assert_eq!(r.json()["error"], "bad_request", "Host: {host:?} {:?}", r.headers);
    }
    assert_eq!(
        protected.requests() + open.requests(),
        5,
        "no invalid host reached an upstream"
    );

    // HTTP/2's :authority is held to the same rules.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = h2c_client(&gw.addr).await;
        for authority in ["api.test.", "API.TEST:8080"] {
            let mut c = client.clone().ready().await.unwrap();
            let req = http::Request::get(format!("http://{authority}/x")).body(()).unwrap();
            let (resp, _) = c.send_request(req, true).unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.headers()["x-echo-service"], "protected", ":authority {authority}");
        }
    });
}

/// Spellings that Servlet containers, IIS or trimming frameworks read as `/admin` while a
/// segment-exact route would not (attack-c D3: they fell through to the open route) are 400 on
/// HTTP/1 and HTTP/2 alike, and never reach an upstream.
#[test]
fn ambiguous_spellings_of_a_protected_path_are_refused() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start_h2c(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: admin, upstream: up, match: {{ path_prefix: /admin }}, plugins: [ {{ ip_filter: {{ allow: [10.0.0.0/8] }} }} ] }}\n  - {{ name: open, upstream: up }}\n",
        up.addr
    ));
    let vectors = [
        "/admin;x",
        "/admin;/x",
        "/;/admin",
        "/x/..;/admin",
        "/admin%3B",
        "/admin%3b",
        "/admin.",
        "/admin..",
        "/admin%2e",
        "/admin%20",
        "/%20/admin",
    ];
    for path in vectors {
        let r = gw.get(path);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request", "{path}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = h2c_client(&gw.addr).await;
        for path in vectors {
            let mut client = client.clone().ready().await.unwrap();
            let req = http::Request::get(format!("http://x{path}")).body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            assert_eq!(resp.await.unwrap().status(), 400, "h2 {path}");
        }
    });
    assert_eq!(up.requests(), 0, "no spelling reached the upstream");
    // Dots and spaces inside a segment are fine.
    assert_eq!(gw.get("/v1.2/my%20file").status, 200);
}

/// A route on a path with non-ASCII characters is not skipped by spelling them the other way
/// (raw UTF-8 bytes or percent-escapes, in either case): attack-v3 D1. The upstream receives
/// the escaped spelling.
#[test]
fn non_ascii_paths_route_the_same_in_every_spelling() {
    let (a, b) = (EchoServer::start("a").unwrap(), EchoServer::start("b").unwrap());
    let gw = Gw::start(&format!(
        r#"
upstreams:
  a: {{ endpoints: ["{a}"] }}
  b: {{ endpoints: ["{b}"] }}
routes:
  - name: raw-written
    match: {{ path_prefix: "/café" }}
    upstream: a
  - name: escaped-written
    match: {{ path_prefix: "/men%C3%BC" }}
    upstream: a
  - name: rest
    upstream: b
"#,
        a = a.addr,
        b = b.addr
    ));
    for path in [
        "/caf\u{e9}",
        "/caf%C3%A9",
        "/caf%c3%a9/x",
        "/men\u{fc}",
        "/men%C3%BC",
        "/men%c3%bc",
    ] {
        let r = send_head(&gw, &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let e = r.json();
        assert_eq!(e["service"], "a", "{path} reached the catch-all");
        assert!(e["path"].as_str().unwrap().is_ascii(), "{path}: {}", e["path"]);
    }
}

/// An HTTP/1.0 absolute-form request without `Host` is routed by its target's authority, and
/// the upstream still gets a `Host` (attack-v3 D2).
#[test]
fn an_absolute_form_request_without_host_routes_by_its_authority() {
    let (a, b) = (EchoServer::start("a").unwrap(), EchoServer::start("b").unwrap());
    let gw = Gw::start(&format!(
        r#"
upstreams:
  a: {{ endpoints: ["{a}"], preserve_host: true }}
  b: {{ endpoints: ["{b}"] }}
routes:
  - name: secure
    match: {{ hosts: [secure.test] }}
    upstream: a
  - name: rest
    upstream: b
"#,
        a = a.addr,
        b = b.addr
    ));
    for target in [
        "http://secure.test/x",
        "http://SECURE.test:80/x?y=1",
        "HTTP://secure.test",
    ] {
        let r = send_head(&gw, &format!("GET {target} HTTP/1.0\r\n\r\n"));
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        let e = r.json();
        assert_eq!(e["service"], "a", "{target} skipped the host route");
        let host = e["headers"]["host"].as_str().unwrap_or("");
        assert!(
            host.eq_ignore_ascii_case("secure.test") || host.eq_ignore_ascii_case("secure.test:80"),
            "{target}: Host {host:?}"
        );
    }
}

/// Send a request head exactly as written (bytes a client library would not produce) and read
/// its answer.
fn send_head(gw: &Gw, head: &str) -> Response {
    let mut s = connect(&gw.addr, None).unwrap();
    std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
    read_response(&mut s, false).unwrap()
}
