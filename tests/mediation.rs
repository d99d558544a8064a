//! Acceptance [9/12] #12, mediation: `transform` reshapes JSON (and XML converted to JSON)
//! response bodies and rewrites JSON request bodies, over real upstreams: a scripted upstream
//! that answers fixed bytes (declared or chunked, plain or gzip), the echo service, and a
//! recording upstream that shows exactly what arrived.

mod common;
use bytes::Bytes;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// What a scripted upstream answers: head fields and a body, with a content-length or chunked.
struct Answer {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    chunked: bool,
}

fn answer(content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        status: 200,
        content_type,
        headers: Vec::new(),
        body: body.into(),
        chunked: false,
    }
}

impl Answer {
    fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
    fn header(mut self, k: &'static str, v: &str) -> Self {
        self.headers.push((k, v.to_string()));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} X\r\ncontent-type: {}\r\n", self.status, self.content_type);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut out;
        if self.chunked {
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            out = head.into_bytes();
            for piece in self.body.chunks(16 << 10) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            head.push_str(&format!("content-length: {}\r\n\r\n", self.body.len()));
            out = head.into_bytes();
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// An HTTP/1.1 upstream on a free port that answers each request by its path (keep-alive).
fn scripted(route: impl Fn(&str) -> Answer + Send + Sync + 'static) -> SocketAddr {
    scripted_heads(move |head| route(head.split_whitespace().nth(1).unwrap_or("/")))
}

/// As [`scripted`], answering by the whole request head (lower-case header names kept as sent).
fn scripted_heads(route: impl Fn(&str) -> Answer + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Arc::new(route);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let route = route.clone();
            std::thread::spawn(move || serve(stream, &*route));
        }
    });
    addr
}

fn serve(mut s: TcpStream, route: &dyn Fn(&str) -> Answer) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + len);
        let head_only = head.starts_with("HEAD ");
        let mut bytes = route(&head).bytes();
        if head_only {
            let cut = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            bytes.truncate(cut);
        }
        if s.write_all(&bytes).is_err() {
            return;
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

const DOC: &str = r#"{"id": 7, "user": {"name": "ann", "age": 41, "address": {"city": "Oslo"}},
  "items": [{"sku": "a", "price": 1}, {"sku": "b"}], "meta": null}"#;

const XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">
  <soap:Body>
    <order id="42" status="open">
      <item sku="A1">Pen</item>
      <item sku="B2"><![CDATA[Ink & paper]]></item>
      <total>12.50</total>
      <note/>
      <customer>Ann &amp; Bob</customer>
    </order>
  </soap:Body>
</soap:Envelope>"#;

/// A 5 MiB JSON array.
fn big_json() -> Vec<u8> {
    let mut out = b"[".to_vec();
    let mut i = 0u64;
    while out.len() < 5 << 20 {
        out.extend_from_slice(format!("{{\"n\":{i},\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}},").as_bytes());
        i += 1;
    }
    out.extend_from_slice(b"{}]");
    out
}

fn content(path: &str) -> Answer {
    match path {
        "/doc" => answer("application/json", DOC),
        "/doc-chunked" => answer("application/json; charset=utf-8", DOC).chunked(),
        "/xml" => answer("application/xml", XML).header("etag", "\"x1\""),
        "/xml-chunked" => answer("text/xml", XML).chunked(),
        "/big" => answer("application/json", big_json()),
        "/big-chunked" => answer("application/json", big_json()).chunked(),
        "/gzip" => answer("application/json", gzip(DOC.as_bytes())).header("content-encoding", "gzip"),
        "/gzip-chunked" => answer("application/json", gzip(DOC.as_bytes()))
            .header("content-encoding", "gzip")
            .chunked(),
        "/malformed" => answer("application/json", r#"{"id": 7, "user": {"#),
        "/malformed-xml" => answer("application/xml", "<a><b></a>"),
        "/text" => answer("text/plain", "plain words"),
        _ => answer("application/json", "{}"),
    }
}

/// A route on `/NAME/…` to the scripted upstream with a transform block.
fn route(name: &str, transform: &str) -> String {
    format!(
        "  - name: {name}\n    match: {{ path_prefix: /{name} }}\n    upstream: script\n    rewrite: {{ strip_prefix: /{name} }}\n    plugins:\n      - transform: {transform}\n"
    )
}

/// One request on a keep-alive connection (no `connection: close`).
fn on(stream: &mut TcpStream, method: &str, path: &str) -> Response {
    write!(stream, "{method} {path} HTTP/1.1\r\nhost: gw.test\r\n\r\n").unwrap();
    read_response(stream, method == "HEAD").unwrap()
}

#[test]
fn response_operations_table() {
    let script = scripted(content);
    // (transform block, expected document)
    let cases: Vec<(&str, Value)> = vec![
        ("{ response: { select: [id, user.name] } }", json!({"id": 7, "user": {"name": "ann"}})),
        (
            "{ response: { select: [items.price, user.address.city] } }",
            json!({"items": [{"price": 1}, {}], "user": {"address": {"city": "Oslo"}}}),
        ),
        ("{ response: { select: [nope, user.nope] } }", json!({"user": {}})),
        (
            "{ response: { remove: [user.age, items.sku, meta, nope.deeper] } }",
            json!({"id": 7, "user": {"name": "ann", "address": {"city": "Oslo"}}, "items": [{"price": 1}, {}]}),
        ),
        (
            "{ response: { rename: { user.name: fullName, items.price: cost, missing.x: y, id: key } } }",
            json!({"key": 7, "user": {"fullName": "ann", "age": 41, "address": {"city": "Oslo"}},
                   "items": [{"sku": "a", "cost": 1}, {"sku": "b"}], "meta": null}),
        ),
        ("{ response: { wrap: data } }", json!({"data": serde_json::from_str::<Value>(DOC).unwrap()})),
        (
            "{ response: { select: [user.name, items.sku], rename: { items.sku: code }, remove: [user.age], wrap: result } }",
            json!({"result": {"user": {"name": "ann"}, "items": [{"code": "a"}, {"code": "b"}]}}),
        ),
    ];
    let mut body = format!("upstreams:\n  script: {{ endpoints: [{script}] }}\nroutes:\n");
    for (i, (block, _)) in cases.iter().enumerate() {
        body.push_str(&route(&format!("t{i}"), block));
    }
    let gw = Gw::start(&body);
    for (i, (block, want)) in cases.iter().enumerate() {
        for upstream_path in ["/doc", "/doc-chunked"] {
            let r = gw.get(&format!("/t{i}{upstream_path}"));
            assert_eq!(r.status, 200, "{block}: {}", r.text());
            assert_eq!(&r.json(), want, "{block} on {upstream_path}");
            assert_eq!(r.header("content-length"), None, "{block}");
            assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{block}");
        }
    }
    let m = gw.metrics();
    assert_eq!(
        metric(&m, "portico_transform_transformed_total", &[("direction", "response")]),
        (cases.len() * 2) as f64
    );
}

#[test]
fn xml_becomes_json_with_correct_framing() {
    let script = scripted(content);
    let echo = EchoServer::start("v1").unwrap();
    let body = format!(
        "upstreams:\n  script: {{ endpoints: [{script}] }}\n  echo: {{ endpoints: [{}] }}\nroutes:\n{}{}  - name: echo\n    match: {{ path_prefix: /echo }}\n    upstream: echo\n    plugins:\n      - transform: {{ response: {{ xml_to_json: true, select: [echo.path, echo.method] }} }}\n",
        echo.addr,
        route("x", "{ response: { xml_to_json: true } }"),
        route("xs", "{ response: { xml_to_json: true, select: ['soap:Envelope.soap:Body.order.item'], wrap: items } }"),
    );
    let gw = Gw::start(&body);
    let want = json!({"soap:Envelope": {"soap:Body": {"order": {
        "@id": "42", "@status": "open",
        "customer": "Ann & Bob",
        "item": [{"@sku": "A1", "#text": "Pen"}, {"@sku": "B2", "#text": "Ink & paper"}],
        "note": null,
        "total": "12.50"}}}});
    // Two answers on one keep-alive connection: the framing is right or the second breaks.
    let mut conn = connect(&gw.addr, None).unwrap();
    for path in ["/x/xml", "/x/xml-chunked", "/x/xml"] {
        let r = on(&mut conn, "GET", path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.json(), want, "{path}");
    }
    let r = on(&mut conn, "GET", "/x/xml");
    assert_eq!(
        r.header("etag"),
        Some("W/\"x1\""),
        "another representation: a weak validator"
    );
    let r = on(&mut conn, "HEAD", "/x/xml");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/xml"),
        "HEAD is not transformed"
    );
    let r = on(&mut conn, "GET", "/xs/xml");
    assert_eq!(
        r.json(),
        json!({"items": {"soap:Envelope": {"soap:Body": {"order": {"item": want["soap:Envelope"]["soap:Body"]["order"]["item"].clone()}}}}})
    );
    // The echo service's own XML.
    let r = on(&mut conn, "GET", "/echo/orders?format=xml");
    assert_eq!(r.json(), json!({"echo": {"method": "GET", "path": "/echo/orders"}}));
    // HTTP/1.0: no chunked framing; the end of the body is the end of the connection.
    let raw = raw(
        &gw.addr,
        b"GET /x/xml HTTP/1.0\r\nhost: gw.test\r\n\r\n",
        Duration::from_secs(10),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("content-length"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(body).unwrap(), want);
}

#[test]
fn large_gzip_and_malformed_bodies() {
    let script = scripted(content);
    let body =
        format!(
        "upstreams:\n  script: {{ endpoints: [{script}] }}\nroutes:\n{}{}",
        route(
            "m",
            "{ max_body: 1MiB, on_error: passthrough, response: { xml_to_json: true, remove: [user.age], wrap: d } }"
        ),
        route("small", "{ response: { wrap: d, max_body: 100, on_error: passthrough } }"),
    );
    let gw = Gw::start(&body);
    let big = big_json();
    // 5 MiB with max_body 1MiB: byte for byte, declared (with its length) or chunked.
    let r = gw.get("/m/big");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(big.len().to_string().as_str()));
    assert!(r.body == big, "the 5 MiB body changed");
    let r = gw.get("/m/big-chunked");
    assert_eq!(r.status, 200);
    assert!(r.body == big, "the chunked 5 MiB body changed");
    // gzip: decoded, transformed, sent plain.
    for path in ["/m/gzip", "/m/gzip-chunked"] {
        let r = gw.send(Request::get(path).header("accept-encoding", "gzip"));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-encoding"), None, "{path}");
        let v = r.json();
        assert_eq!(
            v["d"]["user"],
            json!({"name": "ann", "address": {"city": "Oslo"}}),
            "{path}"
        );
    }
    // Malformed JSON and XML: the original passes through.
    let r = gw.get("/m/malformed");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, br#"{"id": 7, "user": {"#);
    let r = gw.get("/m/malformed-xml");
    assert_eq!(r.body, b"<a><b></a>");
    // Not JSON: untouched, with its own length.
    let r = gw.get("/m/text");
    assert_eq!(
        (r.header("content-length"), r.text().as_str()),
        (Some("11"), "plain words")
    );
    // A gzip body too large to transform goes on decoded.
    let r = gw.get("/small/gzip-chunked");
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.json(), serde_json::from_str::<Value>(DOC).unwrap());
    let m = gw.metrics();
    let passed = |reason: &str| {
        metric(
            &m,
            "portico_transform_passthrough_total",
            &[("direction", "response"), ("reason", reason)],
        )
    };
    assert_eq!(passed("too_large"), 3.0);
    assert_eq!(passed("invalid"), 2.0);
    assert_eq!(passed("not_json"), 1.0);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn h2_send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let client = h2c_client(addr).await;
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://gw.test{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut client = client.ready().await.unwrap();
    let (resp, mut stream) = client.send_request(b.body(()).unwrap(), body.is_none()).unwrap();
    if let Some(data) = body {
        stream.send_data(Bytes::copy_from_slice(data), true).unwrap();
    }
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
        out.extend_from_slice(&d);
    }
    (status, headers, out)
}

#[test]
fn transforms_over_h2c() {
    let script = scripted(content);
    let rec = RecordingUpstream::start();
    let body = format!(
        "upstreams:\n  script: {{ endpoints: [{script}] }}\n  rec: {{ endpoints: [{}] }}\nroutes:\n{}  - name: up\n    match: {{ path_prefix: /up }}\n    upstream: rec\n    plugins:\n      - transform: {{ request: {{ rename: {{ a: b }} }} }}\n",
        rec.addr,
        route("x", "{ on_error: passthrough, response: { xml_to_json: true, select: ['soap:Envelope.soap:Body.order.total'] } }"),
    );
    let gw = Gw::start_h2c(&body);
    let addr = gw.addr.clone();
    runtime().block_on(async move {
        let (status, headers, body) = h2_send(&addr, "GET", "/x/xml", &[], None).await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/json");
        assert!(headers.get("content-length").is_none());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"soap:Envelope": {"soap:Body": {"order": {"total": "12.50"}}}})
        );
        let (status, _, body) = h2_send(&addr, "GET", "/x/big-chunked", &[], None).await;
        assert_eq!(status, 200);
        assert!(body == big_json());
        // A request body without a content-length (HTTP/2 DATA frames).
        let (status, _, _) = h2_send(
            &addr,
            "POST",
            "/up/h2",
            &[("content-type", "application/json")],
            Some(br#"{"a": 1, "c": [1, 2]}"#),
        )
        .await;
        assert_eq!(status, 200);
    });
    let seen = rec.requests();
    assert_eq!(seen.len(), 1);
    let got: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(got, json!({"b": 1, "c": [1, 2]}));
    assert_eq!(
        seen[0].header("content-length"),
        Some(seen[0].body.len().to_string().as_str())
    );
    assert!(!seen[0].chunked);
}

/// `body` sent chunked, in pieces of `piece` bytes.
fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for p in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[test]
fn request_bodies_are_rewritten_with_a_correct_length() {
    let rec = RecordingUpstream::start();
    let body = format!(
        r#"consumers:
  - {{ name: app-1, api_keys: ["k-1"] }}
upstreams:
  rec: {{ endpoints: [{}] }}
routes:
  - name: orders
    match: {{ path_prefix: /orders }}
    upstream: rec
    plugins:
      - api_key: {{}}
      - transform:
          request:
            rename: {{ customer_id: customerId, items.qty: quantity }}
            remove: [debug, items.internal]
            set: {{ meta.by: "${{consumer}}", meta.ip: "${{client_ip}}", meta.trace: "${{trace_id}}" }}
"#,
        rec.addr
    );
    let gw = Gw::start(&body);
    let doc = json!({"customer_id": 5, "debug": true, "items": [{"sku": "a", "qty": 2, "internal": "x"}]});
    let want = json!({"customerId": 5, "items": [{"sku": "a", "quantity": 2}],
                      "meta": {"by": "app-1", "ip": "127.0.0.1", "trace": "req-1"}});
    // A large one: 100 KB of items, over the 64 KiB the core reads whole.
    let mut large = doc.clone();
    large["items"] = Value::Array(
        (0..2000)
            .map(|i| json!({"sku": format!("s{i}"), "qty": i, "internal": "yyyyyyyyyyyyyyyyyyyyyyyy"}))
            .collect(),
    );
    let large_text = large.to_string();
    assert!(large_text.len() > 100_000);
    let small_text = doc.to_string();
    let send = |body: Vec<u8>, is_chunked: bool| {
        let mut r = Request::new("POST", "/orders")
            .header("x-api-key", "k-1")
            .header("x-request-id", "req-1")
            .header("content-type", "application/json");
        if is_chunked {
            r = r.header("transfer-encoding", "chunked");
        }
        let resp = gw.send(r.body(body));
        assert_eq!(resp.status, 200, "{}", resp.text());
    };
    send(small_text.clone().into_bytes(), false);
    send(chunked(small_text.as_bytes(), 7), true);
    send(large_text.clone().into_bytes(), false);
    send(chunked(large_text.as_bytes(), 10_000), true);
    // Malformed: refused (on_error: fail, the default), the upstream never sees it.
    let r = gw.send(
        Request::new("POST", "/orders")
            .header("x-api-key", "k-1")
            .header("content-type", "application/json")
            .body(b"{\"customer_id\": 5, ".to_vec()),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "bad_request");
    let seen = rec.requests();
    assert_eq!(seen.len(), 4);
    for (i, s) in seen.iter().enumerate().take(2) {
        assert!(!s.chunked, "#{i}");
        assert_eq!(
            s.header("content-length"),
            Some(s.body.len().to_string().as_str()),
            "#{i}"
        );
        assert_eq!(s.header("transfer-encoding"), None, "#{i}");
        assert_eq!(serde_json::from_slice::<Value>(&s.body).unwrap(), want, "#{i}");
        assert_eq!(s.header("x-api-key"), None);
    }
    for (i, s) in seen.iter().enumerate().skip(2).take(2) {
        // Streamed: chunked, no length, and the whole rewritten document.
        assert!(s.chunked, "#{i}");
        assert_eq!(s.header("content-length"), None, "#{i}");
        let v: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(v["customerId"], 5);
        assert_eq!(v["meta"]["by"], "app-1");
        assert_eq!(v["items"].as_array().unwrap().len(), 2000);
        assert_eq!(v["items"][1999], json!({"sku": "s1999", "quantity": 1999}));
    }
    assert!(rec.garbage().is_empty());
    let m = gw.metrics();
    assert_eq!(
        metric(&m, "portico_transform_transformed_total", &[("direction", "request")]),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            "portico_transform_refused_total",
            &[("direction", "request"), ("reason", "invalid")]
        ),
        1.0
    );
}

#[test]
fn bad_transforms_are_located_config_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "{ response: { select: ['a..b'] } }",
            "routes[0].plugins[0].transform.response.select[0]: 'a..b': empty path segment",
        ),
        (
            "{ response: { wrap: 'a.b' } }",
            "routes[0].plugins[0].transform.response.wrap: 'a.b' must be a single key, not a path (no dots)",
        ),
        (
            "{ request: { set: { a: '${nope}' } } }",
            "routes[0].plugins[0].transform.request.set.a: unknown variable '${nope}'",
        ),
        (
            "{ respnse: {} }",
            "routes[0].plugins[0].transform: unknown field 'respnse'",
        ),
        ("{ max_body: lots }", "routes[0].plugins[0].transform.max_body"),
    ];
    for (block, want) in cases {
        let yaml = format!(
            "listeners: [{{ address: 127.0.0.1:18080 }}]\nupstreams:\n  u: {{ endpoints: [127.0.0.1:9001] }}\nroutes:\n  - name: r\n    match: {{ path_prefix: /r }}\n    upstream: u\n    plugins:\n      - transform: {block}\n"
        );
        let (code, text) = check(&yaml);
        assert_eq!(code, 1, "{block}: {text}");
        assert!(text.contains(want), "want {want}\ngot {text}");
    }
}

/// The report's leak, answered the way real upstreams answer what a client asks for: a byte
/// range (206, like nginx) when the request has `Range`, deflate or gzip when offered (like a
/// compression middleware), as long a page as `?n=` asks; `/stubborn` sends br whatever was
/// asked. Every head it saw is kept.
fn obliging_upstream(seen: Arc<std::sync::Mutex<Vec<String>>>) -> SocketAddr {
    scripted_heads(move |head| {
        seen.lock().unwrap().push(head.to_string());
        let lower = head.to_ascii_lowercase();
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let n: usize = target.split("n=").nth(1).and_then(|v| v.parse().ok()).unwrap_or(2);
        let doc = format!(
            r#"{{"secret":"s3cr3t","internal":{{"db":"pg://admin:pw@10.0.0.5"}},"items":[{}]}}"#,
            vec!["1"; n].join(",")
        );
        let asked = |h: &str| lower.lines().find_map(|l| l.strip_prefix(h)).unwrap_or("").to_string();
        let mut a = match target.split('?').next().unwrap_or("") {
            "/stubborn" => {
                return answer("application/json", b"\x8b\x05\x80not-really-br".to_vec())
                    .header("content-encoding", "br")
            }
            "/malformed" => return answer("application/json", r#"{"secret":"s3cr3t","#).chunked(),
            "/numbers" => {
                return answer(
                    "application/json",
                    r#"{"z":1,"id":18446744073709551616,"secret":0,"big":12345678901234567890123,"neg":-9223372036854775809,"f":1.50,"a":1E400}"#,
                )
            }
            _ => answer("application/json", doc.clone()),
        };
        if target.starts_with("/chunked") {
            a = a.chunked();
        }
        if !asked("range:").is_empty() {
            a.status = 206;
            a = a.header("content-range", &format!("bytes 0-{}/{}", doc.len() - 1, doc.len()));
        }
        let ae = asked("accept-encoding:");
        if ae.contains("deflate") {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(doc.as_bytes()).unwrap();
            a.body = e.finish().unwrap();
            a = a.header("content-encoding", "deflate");
        } else if ae.contains("gzip") {
            a.body = gzip(doc.as_bytes());
            a = a.header("content-encoding", "gzip");
        }
        a
    })
}

/// Attack-d #1: the client cannot make `remove` skip a field, whatever it sends: Range, an
/// Accept-Encoding the transform cannot decode, a page over `max_body`, an upgrade.
#[test]
fn a_client_cannot_get_the_removed_fields() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let up = obliging_upstream(seen.clone());
    let body = format!(
        "upstreams:\n  up: {{ endpoints: [{up}] }}\nroutes:\n{}{}",
        route("leak", "{ max_body: 4KiB, response: { remove: [secret, internal] } }"),
        route(
            "lax",
            "{ max_body: 4KiB, on_error: passthrough, response: { remove: [secret, internal] } }"
        ),
    )
    .replace("upstream: script", "upstream: up");
    let gw = Gw::start_h2c(&body);
    let last_seen = || {
        seen.lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let clean = json!({"items": [1, 1]});
    let mut conn = connect(&gw.addr, None).unwrap();
    let mut get = |path: &str, headers: &[(&str, &str)]| {
        let mut head = format!("GET {path} HTTP/1.1\r\nhost: gw.test\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        conn.write_all(format!("{head}\r\n").as_bytes()).unwrap();
        let r = read_response(&mut conn, false).unwrap();
        // (An upgrade that was not accepted closes the connection: next request, new one.)
        if r.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            conn = connect(&gw.addr, None).unwrap();
        }
        r
    };
    let r = get("/leak/page", &[]);
    assert_eq!((r.status, r.json()), (200, clean.clone()));
    // Range: not forwarded; the whole document, transformed.
    let r = get("/leak/page", &[("range", "bytes=0-"), ("if-range", "\"v1\"")]);
    assert_eq!((r.status, r.json()), (200, clean.clone()), "{}", r.text());
    assert!(!last_seen().contains("range"), "{}", last_seen());
    // Encodings: the upstream is asked only for what a transform decodes.
    let r = get("/leak/page", &[("accept-encoding", "deflate")]);
    assert_eq!((r.status, r.json()), (200, clean.clone()), "{}", r.text());
    assert!(last_seen().contains("accept-encoding: identity"), "{}", last_seen());
    for ae in ["br", "zstd", "deflate, br, zstd;q=0.5"] {
        let r = get("/leak/page", &[("accept-encoding", ae)]);
        assert_eq!((r.status, r.json()), (200, clean.clone()), "{ae}");
    }
    let r = get("/leak/chunked", &[("accept-encoding", "deflate, gzip")]);
    assert_eq!((r.status, r.json()), (200, clean.clone()), "{}", r.text());
    assert_eq!(r.header("content-encoding"), None);
    assert!(last_seen().contains("accept-encoding: gzip"), "{}", last_seen());
    // A page over max_body with a declared length: the 502, on a connection that stays usable.
    let r = get("/leak/page?n=3000", &[("x-request-id", "big-page")]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")));
    let v = r.json();
    assert_eq!(
        (v["error"].as_str(), v["trace_id"].as_str()),
        (Some("transform_failed"), Some("big-page"))
    );
    assert!(!r.text().contains("s3cr3t"));
    // An upstream that sends br whatever it is asked: the 502 too.
    let r = get("/leak/stubborn", &[]);
    assert_eq!((r.status, r.json()["error"].as_str()), (502, Some("transform_failed")));
    // An upgrade is not offered upstream: no tunnel past the transform.
    let r = get(
        "/leak/page",
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    );
    assert_eq!((r.status, r.json()), (200, clean.clone()));
    assert!(!last_seen().contains("upgrade"), "{}", last_seen());
    // Numbers and key order pass as written (attack-d #6).
    let r = get("/leak/numbers", &[]);
    assert_eq!(
        r.text(),
        r#"{"z":1,"id":18446744073709551616,"big":12345678901234567890123,"neg":-9223372036854775809,"f":1.50,"a":1e+400}"#
    );
    // Found out at the body (a chunked page over max_body, malformed JSON): when the head had
    // not gone out yet, the 502; else cut (below). Never a byte of the body.
    for path in ["/leak/chunked?n=3000", "/leak/malformed"] {
        let bytes = raw(
            &gw.addr,
            format!("GET {path} HTTP/1.1\r\nhost: gw.test\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        )
        .unwrap();
        refused_or_cut(path, &bytes);
    }
    // With on_error: passthrough the page goes through whole, as documented.
    let r = gw.get("/lax/page?n=3000");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("s3cr3t"));
    let m = gw.metrics();
    let refused = |reason: &str| {
        metric(
            &m,
            "portico_transform_refused_total",
            &[("route", "leak"), ("direction", "response"), ("reason", reason)],
        )
    };
    assert_eq!(refused("too_large"), 2.0);
    assert_eq!(refused("encoded"), 1.0);
    assert_eq!(refused("invalid"), 1.0);
    assert_eq!(metric(&m, "portico_panics_total", &[]), 0.0);
}

/// What a client got for an answer the transform refused: the 502 `transform_failed`, or (the
/// head already sent) a 200 whose chunked body never ends. Never a byte of the upstream's body.
fn refused_or_cut(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes).to_string();
    assert!(!text.contains("s3cr3t") && !text.contains("pg://"), "{what}: {text}");
    if text.starts_with("HTTP/1.1 502") {
        let r = read_response(&mut std::io::Cursor::new(bytes.to_vec()), false).unwrap();
        assert_eq!(r.json()["error"], "transform_failed", "{what}");
        return;
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{what}: {text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "{what}: a cut body must not look complete: {text}"
    );
    assert!(
        read_response(&mut std::io::Cursor::new(bytes.to_vec()), false).is_err(),
        "{what}"
    );
}

/// An upstream that sends its (chunked) head and the start of a document, then waits for the
/// test to say go before it sends the rest: `/big` (past any max_body) or `/bad` (malformed).
fn gated_upstream() -> (SocketAddr, std::sync::mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let first = r#"{"secret":"s3cr3t","items":["#;
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
                    first.len()
                )
                .as_bytes(),
            );
            let _ = s.flush();
            if rx.recv().is_err() {
                return;
            }
            let rest = if head.contains("/big") {
                format!("{}1]}}", "1,".repeat(5000))
            } else {
                "1,}".to_string()
            };
            let _ = s.write_all(format!("{:x}\r\n{rest}\r\n0\r\n\r\n", rest.len()).as_bytes());
        }
    });
    (addr, tx)
}

/// Attack-d #1, after the head: a body found untransformable once its head went out is cut —
/// nothing of it is sent and the response never looks complete (HTTP/1.1 and HTTP/2).
#[test]
fn an_answer_found_untransformable_after_its_head_is_cut() {
    let (up, go) = gated_upstream();
    let body = format!(
        "upstreams:\n  up: {{ endpoints: [{up}] }}\nroutes:\n{}",
        route("leak", "{ max_body: 4KiB, response: { remove: [secret] } }"),
    )
    .replace("upstream: script", "upstream: up");
    let gw = Gw::start_h2c(&body);
    for path in ["/leak/big", "/leak/bad"] {
        let mut conn = connect(&gw.addr, None).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nhost: gw.test\r\n\r\n").unwrap();
        // The head arrives while the upstream still holds the rest back.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before the head");
            got.extend_from_slice(&chunk[..n]);
        }
        go.send(()).unwrap();
        loop {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        refused_or_cut(path, &got);
    }
    // HTTP/2: the stream ends in an error, never as a complete-looking empty answer.
    let addr = gw.addr.clone();
    runtime().block_on(async move {
        let client = h2c_client(&addr).await;
        let mut client = client.ready().await.unwrap();
        let req = http::Request::get("http://gw.test/leak/big").body(()).unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        go.send(()).unwrap();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        let mut failed = false;
        while let Some(d) = body.data().await {
            match d {
                Ok(d) => got.extend_from_slice(&d),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(
            failed,
            "the stream must end in an error, got {:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(!String::from_utf8_lossy(&got).contains("s3cr3t"));
    });
    let m = gw.metrics();
    assert_eq!(metric(&m, "portico_transform_cut_total", &[("route", "leak")]), 3.0);
    assert_eq!(metric(&m, "portico_panics_total", &[]), 0.0);
}

/// Attack-d #2: a request rewrite is not a suggestion the client may decline. Every spelling
/// of JSON is rewritten; what cannot be is refused, and the upstream never sees it.
#[test]
fn request_rewrites_cannot_be_declined() {
    let rec = RecordingUpstream::start();
    let body = format!(
        r#"consumers:
  - {{ name: app, api_keys: ["k-1"] }}
upstreams:
  rec: {{ endpoints: [{}] }}
routes:
  - name: app
    match: {{ path_prefix: /app }}
    upstream: rec
    plugins:
      - api_key: {{}}
      - transform: {{ max_body: 100KiB, request: {{ remove: [role], set: {{ meta.by: "${{consumer}}" }} }} }}
"#,
        rec.addr
    );
    let gw = Gw::start(&body);
    let post = |ct: &str, extra: &[(&str, &str)], body: Vec<u8>| {
        let mut r = Request::new("POST", "/app/x")
            .header("x-api-key", "k-1")
            .header("content-type", ct.to_string())
            .header("x-request-id", "rq-1");
        for (k, v) in extra {
            r = r.header(k, v.to_string());
        }
        gw.send(r.body(body))
    };
    let forged = br#"{"role":"admin","meta":{"by":"someone-else"}}"#.to_vec();
    for ct in [
        "application/json",
        "application/json; charset=latin1",
        "application/json;charset=UTF-8",
        "application/json; charset=\"utf-8\"",
        "APPLICATION/JSON ; charset=utf-8",
        "application/merge-patch+json",
    ] {
        let r = post(ct, &[], forged.clone());
        assert_eq!(r.status, 200, "{ct}: {}", r.text());
    }
    let bom = [b"\xEF\xBB\xBF".as_slice(), &forged].concat();
    assert_eq!(post("application/json", &[], bom).status, 200);
    let r = post(
        "application/json",
        &[],
        br#"{"id":12345678901234567890123,"role":"x","x":1e400}"#.to_vec(),
    );
    assert_eq!(r.status, 200);
    let refused = [
        br#"{"role":"admin","meta":{"by":"someone-else"},"x":NaN}"#.to_vec(),
        br#"{"role":"admin","meta":{"by":"someone-else"},"x":"\ud800"}"#.to_vec(),
        b"{\"role\":\"adm\xE9n\",\"meta\":{\"by\":\"someone-else\"}}".to_vec(),
        // Over the 64 KiB read whole: refused at its end, streamed.
        format!(r#"{{"role":"admin","pad":"{}","#, "x".repeat(90_000)).into_bytes(),
    ];
    for b in refused {
        let r = post("application/json", &[], b);
        assert_eq!(r.status, 400, "{}", r.text());
        let v = r.json();
        assert_eq!(
            (v["error"].as_str(), v["trace_id"].as_str()),
            (Some("bad_request"), Some("rq-1"))
        );
    }
    let r = post("application/json", &[("content-encoding", "gzip")], gzip(&forged));
    assert_eq!(r.status, 400);
    let big = format!(r#"{{"role":"admin","pad":"{}"}}"#, "x".repeat(150_000)).into_bytes();
    let r = post("application/json", &[], big.clone());
    assert_eq!((r.status, r.json()["error"].as_str()), (413, Some("payload_too_large")));
    let r = post(
        "application/json",
        &[("transfer-encoding", "chunked")],
        chunked(&big, 20_000),
    );
    assert_eq!((r.status, r.json()["error"].as_str()), (413, Some("payload_too_large")));
    // Not JSON: not a body a JSON transform rewrites; it goes on as sent (documented).
    assert_eq!(post("text/plain", &[], b"role=admin".to_vec()).status, 200);
    let seen = rec.requests();
    let bodies: Vec<String> = seen
        .iter()
        .map(|s| String::from_utf8_lossy(&s.body).to_string())
        .collect();
    assert_eq!(bodies.len(), 9, "{bodies:?}");
    for b in &bodies[..7] {
        assert_eq!(b, r#"{"meta":{"by":"app"}}"#);
    }
    assert_eq!(
        bodies[7],
        r#"{"id":12345678901234567890123,"x":1e+400,"meta":{"by":"app"}}"#
    );
    assert_eq!(bodies[8], "role=admin");
    assert!(rec.garbage().is_empty());
    assert_eq!(metric(&gw.metrics(), "portico_panics_total", &[]), 0.0);
}
