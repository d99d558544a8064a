//! Acceptance [1/9] #3: trace ids to the upstream, the client, the access log and error bodies.

mod common;
use common::*;
use std::time::Duration;

fn traceparent_parts(v: &str) -> (String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "traceparent {v}");
    assert_eq!(p[0], "00");
    assert!(p[1].len() == 32 && p[1].bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
    assert!(p[2].len() == 16 && p[2].bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
    (p[1].to_string(), p[2].to_string())
}

#[test]
fn trace_ids_everywhere() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up, match: {{ path_prefix: /api }} }}\n",
        up.addr
    ));

    // A fresh request: one id for the client, the upstream and the traceparent.
    let r = gw.get("/api/a");
    let e = echoed(&r);
    let id = r.header("x-request-id").expect("client sees the id").to_string();
    assert_eq!(e["headers"]["x-request-id"], id.as_str());
    let (trace, _) = traceparent_parts(e["headers"]["traceparent"].as_str().unwrap());
    assert_eq!(trace, id);

    // A valid incoming traceparent keeps its trace id; the hop gets a new span id.
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = gw.send(Request::get("/api/b").header("traceparent", incoming));
    let (trace, span) = traceparent_parts(echoed(&r)["headers"]["traceparent"].as_str().unwrap());
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(span, "00f067aa0ba902b7");
    assert_eq!(r.header("x-request-id"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));

    // Malformed traceparents are replaced.
    for bad in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let r = gw.send(Request::get("/api/c").header("traceparent", bad));
        let (trace, _) = traceparent_parts(echoed(&r)["headers"]["traceparent"].as_str().unwrap());
        assert_ne!(trace.to_lowercase(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
        assert_ne!(trace, "00000000000000000000000000000000");
    }

    // A well-formed x-request-id is kept; a bad one is replaced.
    let r = gw.send(Request::get("/api/d").header("x-request-id", "order-42:retry.1_x"));
    assert_eq!(r.header("x-request-id"), Some("order-42:retry.1_x"));
    assert_eq!(echoed(&r)["headers"]["x-request-id"], "order-42:retry.1_x");
    let long = "a".repeat(129);
    for bad in ["a b", "abc%0d%0ax-evil:1", long.as_str(), "id\"quote", "ünïcode"] {
        let r = gw.send(Request::get("/api/e").header("x-request-id", bad));
        let got = r.header("x-request-id").unwrap().to_string();
        assert_ne!(got, bad);
        assert_eq!(echoed(&r)["headers"]["x-request-id"], got.as_str());
        assert!(got.len() == 32 && got.bytes().all(|b| b.is_ascii_hexdigit()), "{got}");
    }

    // A CR inside the id never reaches the upstream or the client.
    let before = up.requests();
    let out = raw(
        &gw.addr,
        b"GET /api/f HTTP/1.1\r\nhost: x\r\nx-request-id: abc\rx-evil: 1\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("x-evil"), "{text}");
    if up.requests() > before {
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(!text.contains("abc\r"), "{text}");
    }

    // Error bodies and the access log carry the id.
    let r = gw.send(Request::get("/nowhere").header("x-request-id", "err-trace-1"));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["trace_id"], "err-trace-1");
    assert_eq!(r.header("x-request-id"), Some("err-trace-1"));
    let line = gw.access_line("err-trace-1");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["trace_id"], "err-trace-1");
    assert_eq!(v["status"], 404);
    assert_eq!(v["path"], "/nowhere");
    assert_eq!(v["error"], "no_route");
}

#[test]
fn combined_access_log_format() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "access_log: {{ enabled: true, format: combined }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    ));
    let r = gw.send(
        Request::get("/c?q=1")
            .header("x-request-id", "combined-1")
            .header("user-agent", "tester/1"),
    );
    assert_eq!(r.status, 200);
    let line = gw.access_line("combined-1");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("\"GET /c?q=1 HTTP/1.1\" 200 "), "{line}");
    assert!(line.contains("\"tester/1\""), "{line}");
    assert!(line.contains("trace_id=combined-1 route=r upstream=up"), "{line}");
}

/// A User-Agent in bytes beyond ASCII (obs-text) is logged, not dropped: UTF-8 as written,
/// invalid bytes as U+FFFD (the attack pass saw `null`).
#[test]
fn a_user_agent_beyond_ascii_is_logged() {
    use std::io::{Read, Write};
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "access_log: {{ enabled: true, format: json }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up }}\n",
        up.addr
    ));
    for (id, agent) in [
        ("ua-utf8", "caf\u{e9} \u{2615}".as_bytes().to_vec()),
        ("ua-bad", b"x\xffy".to_vec()),
    ] {
        let mut s = connect(&gw.addr, None).unwrap();
        let mut req = format!("GET /u HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-request-id: {id}\r\nuser-agent: ")
            .into_bytes();
        req.extend_from_slice(&agent);
        req.extend_from_slice(b"\r\n\r\n");
        s.write_all(&req).unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let logged = |id: &str| {
        let line = gw.access_line(id);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["user_agent"].as_str().map(str::to_string)
    };
    assert_eq!(logged("ua-utf8").as_deref(), Some("caf\u{e9} \u{2615}"));
    assert_eq!(logged("ua-bad").as_deref(), Some("x\u{fffd}y"));
}
