//! Acceptance [10/12] #13, downstream TLS: the certificate per SNI name, h2 by ALPN, h2c on a
//! plain port beside HTTP/1.1, a certificate swapped by SIGHUP served to new connections, mTLS
//! identities (pass, 403, refused; a new CA by reload), nothing below TLS 1.2 and no weak
//! cipher (`sslscan`, `openssl s_client`), handshakes that never finish closed at
//! `header_timeout` while normal HTTPS clients are served, and the TLS library's warnings about
//! what a client sent kept out of the error log (counted instead). Certificates are made here (rcgen).

mod common;
use common::grpc::*;
use common::*;
use portico::testing::pki::TestCa;
use portico::testing::tls;
use std::process::Command;
use std::time::{Duration, Instant};

const TLS_SPEC: &str = "127.0.0.1:0";
const PLAIN_SPEC: &str = "127.0.0.3:0";

fn routes(echo: &EchoServer) -> String {
    format!(
        "upstreams:\n  e: {{ endpoints: [{}] }}\nroutes:\n  - name: all\n    match: {{ path_prefix: / }}\n    upstream: e\n",
        echo.addr
    )
}

/// A TLS listener (`http2: true`) with a default certificate and two SNI ones, and a plain
/// listener with h2c.
fn sni_listeners(dir: &TempDir, ca: &TestCa, default_names: &[&str]) -> String {
    let (dc, dk) = ca.write_server(dir, "default", default_names);
    let (ac, ak) = ca.write_server(dir, "api", &["api.example.com"]);
    let (wc, wk) = ca.write_server(dir, "wild", &["*.example.org"]);
    format!(
        "  - address: {TLS_SPEC}\n    http2: true\n    tls:\n      cert: {dc}\n      key: {dk}\n      sni:\n        - {{ hosts: [api.example.com], cert: {ac}, key: {ak} }}\n        - {{ hosts: [\"*.example.org\"], cert: {wc}, key: {wk} }}\n  - address: {PLAIN_SPEC}\n    http2: true\n"
    )
}

fn served(addr: &str, name: &str) -> Vec<String> {
    let conn = tls::connect(addr, name, tls::client_any(&[])).unwrap_or_else(|e| panic!("{name}: {e}"));
    tls::served_names(&conn)
}

#[test]
fn sni_picks_the_certificate_alpn_gives_h2_and_h2c_shares_the_plain_port() {
    let ca = TestCa::new("Test CA");
    let dir = TempDir::new("tls-sni");
    let echo = EchoServer::start("e").unwrap();
    let gw = Gw::start_listeners(
        &sni_listeners(&dir, &ca, &["gw.test"]),
        &[TLS_SPEC, PLAIN_SPEC],
        &routes(&echo),
    );
    let (https, plain) = (gw.addrs[0].as_str(), gw.addrs[1].as_str());

    // The right certificate per name: exact, wildcard (one label), default; no SNI at all.
    assert_eq!(served(https, "api.example.com"), ["api.example.com"]);
    assert_eq!(served(https, "API.Example.COM"), ["api.example.com"]);
    assert_eq!(served(https, "www.example.org"), ["*.example.org"]);
    assert_eq!(served(https, "a.b.example.org"), ["gw.test"]);
    assert_eq!(served(https, "other.test"), ["gw.test"]);
    assert_eq!(served(https, "127.0.0.1"), ["gw.test"], "an IP name sends no SNI");

    // A verifying client: HTTP/1.1 when it offers only that, proxied with X-Forwarded-Proto.
    let h1 = tls::client(&ca, None, &["http/1.1"]);
    let conn = tls::connect(https, "api.example.com", h1).unwrap();
    assert_eq!(tls::alpn(&conn).as_deref(), Some("http/1.1"));
    let r = tls::exchange(conn, "api.example.com", &Request::get("/hello")).unwrap();
    let e = echoed(&r);
    assert_eq!(e["path"], "/hello");
    assert_eq!(e["headers"]["x-forwarded-proto"], "https");
    // No ALPN at all: HTTP/1.1.
    let conn = tls::connect(https, "gw.test", tls::client(&ca, None, &[])).unwrap();
    assert_eq!(tls::alpn(&conn), None);
    assert_eq!(tls::exchange(conn, "gw.test", &Request::get("/x")).unwrap().status, 200);

    rt().block_on(async {
        // h2 by ALPN on the TLS listener.
        let mut h2 = h2_tls(https, "api.example.com", tls::client(&ca, None, &["h2", "http/1.1"])).await;
        let (status, head, body) = h2_get(&mut h2, "https://api.example.com/over/h2").await;
        assert_eq!(status, 200);
        assert_eq!(head["x-echo-service"], "e");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["path"], "/over/h2");
        assert_eq!(v["headers"]["x-forwarded-proto"], "https");
        // Several streams on one connection.
        for i in 0..20 {
            let (status, _, _) = h2_get(&mut h2, &format!("https://api.example.com/s/{i}")).await;
            assert_eq!(status, 200);
        }
        // h2c (prior knowledge) on the plain port, which also speaks HTTP/1.1.
        let mut c = h2c(plain).await;
        let (status, _, body) = h2_get(&mut c, &format!("http://{plain}/over/h2c")).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["headers"]["x-forwarded-proto"], "http");
    });
    assert_eq!(echoed(&get(plain, "/over/h1").unwrap())["path"], "/over/h1");
}

#[test]
fn a_certificate_swapped_by_sighup_is_served_to_new_connections() {
    let ca = TestCa::new("Test CA");
    let dir = TempDir::new("tls-swap");
    let echo = EchoServer::start("e").unwrap();
    let mut gw = Gw::start_listeners(
        &sni_listeners(&dir, &ca, &["old.test"]),
        &[TLS_SPEC, PLAIN_SPEC],
        &routes(&echo),
    );
    let https = gw.addrs[0].clone();
    assert_eq!(served(&https, "gw.test"), ["old.test"]);
    // A connection opened before the swap keeps working on what it negotiated.
    let client = tls::client(&ca, None, &["http/1.1"]);
    let before = tls::connect(&https, "api.example.com", client.clone()).unwrap();

    // New files, named by the reloaded config: no restart, same sockets.
    let dir2 = TempDir::new("tls-swap2");
    gw.reload_listeners(&sni_listeners(&dir2, &ca, &["new.test"]), &routes(&echo));
    assert_eq!(served(&https, "gw.test"), ["new.test"]);
    assert_eq!(served(&https, "api.example.com"), ["api.example.com"]);
    let r = tls::exchange(before, "api.example.com", &Request::get("/kept")).unwrap();
    assert_eq!(r.status, 200);
    assert!(gw.p.stderr_text().contains("config reloaded"), "{}", gw.p.stderr_text());
    assert!(
        !gw.p.stderr_text().contains("changes to listeners are not applied"),
        "a certificate change is not a listener change:\n{}",
        gw.p.stderr_text()
    );

    // The same through POST /reload: it says nothing was left unapplied.
    let dir3 = TempDir::new("tls-swap3");
    let listeners = sni_listeners(&dir3, &ca, &["third.test"]);
    gw.listeners = Some(listeners);
    gw.p.rewrite_config(&gw.config(&routes(&echo)));
    let r = Request::new("POST", "/reload").send(&gw.admin).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["not_applied"], serde_json::json!([]));
    assert_eq!(served(&https, "gw.test"), ["third.test"]);
    assert_eq!(
        metric(&gw.metrics(), "portico_config_reloads_total", &[("result", "ok")]),
        2.0
    );
    drop(dir);
}

// ---------------------------------------------------------------------------------------------
// mTLS

struct Mesh {
    ca: TestCa,
    dir: TempDir,
    echo: EchoServer,
}

fn mtls_listener(m: &Mesh, ca_file: &str, require: bool) -> String {
    let (c, k) = m.ca.write_server(&m.dir, "gw", &["gw.mesh"]);
    format!(
        "  - address: {TLS_SPEC}\n    tls:\n      cert: {c}\n      key: {k}\n      client_ca: {ca_file}\n      require_client_cert: {require}\n"
    )
}

fn mtls_routes(m: &Mesh) -> String {
    format!(
        r#"upstreams:
  e: {{ endpoints: [{}] }}
routes:
  - name: orders-only
    match: {{ path_prefix: /orders-only }}
    upstream: e
    plugins:
      - allow_services: {{ services: [orders] }}
  - name: frontend-only
    match: {{ path_prefix: /frontend-only }}
    upstream: e
    plugins:
      - allow_services: {{ services: [frontend] }}
  - name: other-domain
    match: {{ path_prefix: /other-domain }}
    upstream: e
    plugins:
      - allow_services: {{ services: [orders], trust_domain: elsewhere }}
  - name: open
    match: {{ path_prefix: / }}
    upstream: e
"#,
        m.echo.addr
    )
}

#[test]
fn mtls_identities_pass_are_refused_and_follow_a_new_ca() {
    let m = Mesh {
        ca: TestCa::new("Mesh CA"),
        dir: TempDir::new("mtls"),
        echo: EchoServer::start("e").unwrap(),
    };
    let ca_file = m.ca.write_ca(&m.dir, "mesh-ca");
    let mut gw = Gw::start_listeners(&mtls_listener(&m, &ca_file, true), &[TLS_SPEC], &mtls_routes(&m));
    let https = gw.addr.clone();
    let orders = m.ca.client(Some("ignored-cn"), &["spiffe://mesh/orders"]);
    let billing = m.ca.client(None, &["spiffe://mesh/billing"]);
    let frontend = m.ca.client(Some("frontend"), &[]);
    let call = |cert: Option<&portico::testing::pki::Leaf>, path: &str| {
        let config = tls::client(&m.ca, cert.map(|c| (c, &m.ca)), &["http/1.1"]);
        tls::send(&https, "gw.mesh", config, &Request::get(path))
    };

    // spiffe://mesh/orders passes allow_services: [orders].
    let r = call(Some(&orders), "/orders-only/1").unwrap();
    assert_eq!(echoed(&r)["path"], "/orders-only/1");
    // billing is not listed: 403 service_not_allowed.
    let r = call(Some(&billing), "/orders-only/1").unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "service_not_allowed");
    // Without a SPIFFE URI the CN is the service.
    assert_eq!(call(Some(&frontend), "/frontend-only").unwrap().status, 200);
    assert_eq!(call(Some(&orders), "/frontend-only").unwrap().status, 403);
    // trust_domain: only that domain's identities count.
    assert_eq!(call(Some(&orders), "/other-domain").unwrap().status, 403);

    // No client certificate: the handshake is refused (require_client_cert).
    assert!(call(None, "/open").is_err(), "no certificate, no answer");
    // A certificate from another CA: refused.
    let rogue_ca = TestCa::new("Rogue CA");
    let rogue = rogue_ca.client(None, &["spiffe://mesh/orders"]);
    let config = tls::client(&m.ca, Some((&rogue, &rogue_ca)), &["http/1.1"]);
    assert!(tls::send(&https, "gw.mesh", config, &Request::get("/open")).is_err());
    // The client may see the alert before the gateway has counted the handshake: poll.
    wait_for("both refused handshakes counted", Duration::from_secs(10), || {
        let refused = metric(
            &gw.metrics(),
            "portico_rejected_connections_total",
            &[("reason", "tls_handshake")],
        );
        (refused >= 2.0).then_some(())
    });

    // One client config (so its TLS session may resume) before and after a reload that
    // replaces the CA: the old certificate no longer gets in, resumed session or not.
    let kept = tls::client(&m.ca, Some((&orders, &m.ca)), &["http/1.1"]);
    for _ in 0..2 {
        let r = tls::send(&https, "gw.mesh", kept.clone(), &Request::get("/orders-only/x")).unwrap();
        assert_eq!(r.status, 200);
    }
    let next_ca = TestCa::new("Next Mesh CA");
    let next_file = next_ca.write_ca(&m.dir, "next-ca");
    gw.reload_listeners(&mtls_listener(&m, &next_file, true), &mtls_routes(&m));
    for _ in 0..2 {
        assert!(
            tls::send(&https, "gw.mesh", kept.clone(), &Request::get("/orders-only/x")).is_err(),
            "a certificate from the old CA is refused after the reload"
        );
    }
    let next_orders = next_ca.client(None, &["spiffe://mesh/orders"]);
    // The server certificate is still from the first CA; the client certificate from the next.
    let config = tls::client(&m.ca, Some((&next_orders, &next_ca)), &["http/1.1"]);
    let r = tls::send(&https, "gw.mesh", config, &Request::get("/orders-only/y")).unwrap();
    assert_eq!(r.status, 200);

    // Optional client certificates: without one the request has no identity (401).
    gw.reload_listeners(&mtls_listener(&m, &next_file, false), &mtls_routes(&m));
    let anonymous = tls::client(&m.ca, None, &["http/1.1"]);
    let r = tls::send(&https, "gw.mesh", anonymous.clone(), &Request::get("/orders-only/z")).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "unauthorized");
    let r = tls::send(&https, "gw.mesh", anonymous, &Request::get("/open")).unwrap();
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------------------------
// Protocol versions and ciphers

#[test]
fn nothing_below_tls_1_2_and_no_weak_cipher() {
    let ca = TestCa::new("Test CA");
    let dir = TempDir::new("tls-scan");
    let echo = EchoServer::start("e").unwrap();
    let gw = Gw::start_listeners(
        &sni_listeners(&dir, &ca, &["gw.test"]),
        &[TLS_SPEC, PLAIN_SPEC],
        &routes(&echo),
    );
    let https = gw.addrs[0].clone();

    // openssl s_client, one protocol at a time.
    let s_client = |flag: &str| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &https, "-servername", "gw.test", flag])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed (./dev deps)");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    for old in ["-tls1", "-tls1_1"] {
        let (ok, text) = s_client(old);
        assert!(!ok, "{old} was accepted:\n{text}");
    }
    for (flag, proto) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, text) = s_client(flag);
        assert!(ok && text.contains(proto), "{flag}:\n{text}");
    }

    // sslscan: every protocol and every cipher the server accepts.
    let out = Command::new("sslscan")
        .args([
            "--no-colour",
            "--no-fallback",
            "--no-renegotiation",
            "--no-heartbleed",
            &https,
        ])
        .output()
        .expect("sslscan is installed (./dev deps)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for proto in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(proto))
            .unwrap_or_else(|| panic!("no {proto} line:\n{text}"));
        assert!(line.contains("disabled"), "{line}\n{text}");
    }
    for proto in ["TLSv1.2", "TLSv1.3"] {
        let line = text.lines().find(|l| l.starts_with(proto)).unwrap();
        assert!(line.contains("enabled"), "{line}");
    }
    let ciphers: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("Preferred") || l.starts_with("Accepted"))
        .collect();
    assert!(ciphers.len() >= 3, "{text}");
    for c in &ciphers {
        assert!(c.contains("TLSv1.2") || c.contains("TLSv1.3"), "{c}");
        let bits: u32 = c.split_whitespace().nth(2).and_then(|b| b.parse().ok()).unwrap_or(0);
        assert!(bits >= 128, "{c}");
        for weak in ["RC4", "DES", "NULL", "EXP", "MD5", "CBC", "SHA1 ", "anon", "PSK"] {
            assert!(!c.contains(weak), "weak cipher {weak}: {c}");
        }
        // Forward secrecy only: every TLS 1.2 suite is ECDHE (TLS 1.3 suites always are).
        assert!(c.contains("TLSv1.3") || c.contains("ECDHE"), "{c}");
    }
}

// ---------------------------------------------------------------------------------------------
// Handshakes that never finish

#[test]
fn handshakes_that_never_finish_are_closed_at_header_timeout() {
    use std::io::{Read, Write};
    let ca = TestCa::new("Test CA");
    let dir = TempDir::new("tls-slow");
    let echo = EchoServer::start("e").unwrap();
    let body = format!("limits:\n  header_timeout: 2s\n{}", routes(&echo));
    let gw = Gw::start_listeners(&sni_listeners(&dir, &ca, &["gw.test"]), &[TLS_SPEC, PLAIN_SPEC], &body);
    let https = gw.addrs[0].clone();

    // 300 connections: a third send nothing, a third the start of a ClientHello, a third a
    // whole TLS record header and then stop.
    let hello_start: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    let opened = Instant::now();
    let mut slow = Vec::new();
    for i in 0..300 {
        let mut s = connect(&https, None).expect("connect");
        match i % 3 {
            0 => {}
            1 => s.write_all(&hello_start[..3]).unwrap(),
            _ => s.write_all(hello_start).unwrap(),
        }
        slow.push(s);
    }

    // Meanwhile, normal HTTPS clients are served promptly.
    let client = tls::client(&ca, None, &["http/1.1"]);
    let mut latencies = Vec::new();
    let until = opened + Duration::from_millis(1500);
    while Instant::now() < until || latencies.len() < 20 {
        let t = Instant::now();
        let r = tls::send(&https, "gw.test", client.clone(), &Request::get("/during")).unwrap();
        assert_eq!(r.status, 200);
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    assert!(
        p99 < Duration::from_millis(500),
        "p99 {p99:?} while 300 handshakes hang"
    );

    // Every slow connection is closed by the gateway at header_timeout (2 s), not later.
    let mut closed_at = Vec::new();
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // an alert, perhaps
            }
        }
        closed_at.push(opened.elapsed());
    }
    let last = *closed_at.iter().max().unwrap();
    let first = *closed_at.iter().min().unwrap();
    eprintln!(
        "300 unfinished handshakes closed between {first:?} and {last:?} (header_timeout 2s); {} HTTPS requests meanwhile, p50 {:?}, p99 {p99:?}",
        latencies.len(),
        latencies[latencies.len() / 2]
    );
    assert!(first >= Duration::from_millis(1800), "closed too early: {first:?}");
    assert!(last < Duration::from_secs(5), "the last one was closed at {last:?}");
    let timed_out = metric(
        &gw.metrics(),
        "portico_rejected_connections_total",
        &[("reason", "header_timeout")],
    );
    assert!(timed_out >= 300.0, "{timed_out}");
    // And the listener still serves.
    let r = tls::send(&https, "gw.test", client, &Request::get("/after")).unwrap();
    assert_eq!(r.status, 200);
}

/// A ClientHello (TLS 1.2 form, one cipher suite) whose SNI `host_name` is `name`.
fn client_hello_with_sni(name: &[u8]) -> Vec<u8> {
    let u16be = |n: usize| (n as u16).to_be_bytes();
    let mut entry = vec![0u8]; // name_type host_name
    entry.extend(u16be(name.len()));
    entry.extend(name);
    let mut list = u16be(entry.len()).to_vec();
    list.extend(entry);
    let mut ext = vec![0, 0]; // server_name
    ext.extend(u16be(list.len()));
    ext.extend(list);
    let mut body = vec![3, 3];
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    body.extend([0, 2, 0x13, 0x01, 1, 0]); // TLS_AES_128_GCM_SHA256; null compression
    body.extend(u16be(ext.len()));
    body.extend(ext);
    let mut hs = vec![1u8]; // client_hello
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(u16be(hs.len()));
    record.extend(hs);
    record
}

#[test]
fn what_a_client_sends_in_a_handshake_does_not_fill_the_error_log() {
    let ca = TestCa::new("Test CA");
    let dir = TempDir::new("tls-noise");
    let echo = EchoServer::start("e").unwrap();
    let gw = Gw::start_listeners(
        &sni_listeners(&dir, &ca, &["gw.test"]),
        &[TLS_SPEC, PLAIN_SPEC],
        &routes(&echo),
    );
    let https = gw.addrs[0].clone();
    // An IP address as SNI makes rustls warn (RFC 6066 forbids it) on every such handshake.
    let hello = client_hello_with_sni(b"127.0.0.1");
    for _ in 0..50 {
        raw(&https, &hello, Duration::from_secs(5)).expect("a handshake");
    }
    // Counted, once per handshake ...
    wait_for("50 peer warnings counted", Duration::from_secs(10), || {
        (metric(&gw.metrics(), "portico_tls_peer_warnings_total", &[]) == 50.0).then_some(())
    });
    // ... and not one line in the log at the default level (info).
    let logs = gw.p.stderr_text();
    assert!(!logs.contains("Illegal SNI"), "{logs}");
    assert!(!logs.contains("WARN rustls"), "{logs}");
    // The listener still serves.
    let r = tls::send(
        &https,
        "gw.test",
        tls::client(&ca, None, &["http/1.1"]),
        &Request::get("/after"),
    )
    .unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn bad_tls_config_is_a_located_error() {
    let ca = TestCa::new("Test CA");
    let dir = TempDir::new("tls-bad");
    let (c, _) = ca.write_server(&dir, "a", &["a.test"]);
    let (_, other_key) = ca.write_server(&dir, "b", &["b.test"]);
    let (api, api_key) = ca.write_server(&dir, "api", &["api.example.com"]);
    let config = dir.write(
        "bad.yaml",
        &format!(
            r#"listeners:
  - address: 127.0.0.1:0
    tls:
      cert: {c}
      key: {other_key}
      sni:
        - {{ hosts: [nope.example.com], cert: {api}, key: {api_key} }}
      require_client_cert: true
upstreams:
  u:
    endpoints: [127.0.0.1:1]
    protocol: h2
  v:
    endpoints: [127.0.0.1:1]
    tls: {{ ca: {dir}/missing.crt }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, upstream: u }}
"#,
            dir = dir.path().display()
        ),
    );
    let out = Command::new(BIN).args(["-t", "-c"]).arg(&config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for want in [
        "listeners[0].tls.key: the private key in",
        "listeners[0].tls.sni[0].hosts[0]: the certificate does not cover 'nope.example.com'",
        "listeners[0].tls.require_client_cert: needs 'client_ca'",
        "upstreams.u.protocol: 'h2' needs TLS to the upstream",
        "upstreams.v.tls.sni: required when 'verify' is true",
        "upstreams.v.tls.ca: cannot read",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// The verified identity, upstream and in refusals

/// `${identity}` passes the verified client certificate's identity upstream (`headers` `set`
/// replaces, so a client's own copy never passes; an empty value sends no header); 403s name
/// the caller's whole SPIFFE ID and the real reason; SPIFFE IDs are lowercase up to the path.
#[test]
fn the_verified_identity_reaches_the_upstream_and_refusals_say_why() {
    let m = Mesh {
        ca: TestCa::new("Mesh CA"),
        dir: TempDir::new("ident"),
        echo: EchoServer::start("e").unwrap(),
    };
    let ca_file = m.ca.write_ca(&m.dir, "mesh-ca");
    let routes = mtls_routes(&m).replace(
        "routes:\n",
        "routes:\n  - name: ident\n    match: { path_prefix: /ident }\n    upstream: e\n    plugins:\n      - headers: { request: { set: { x-client-identity: \"${identity}\", x-consumer-name: \"${consumer}\" } } }\n",
    );
    let gw = Gw::start_listeners(&mtls_listener(&m, &ca_file, false), &[TLS_SPEC], &routes);
    let call = |cert: Option<&portico::testing::pki::Leaf>, req: Request<'_>| {
        let config = tls::client(&m.ca, cert.map(|c| (c, &m.ca)), &["http/1.1"]);
        tls::send(&gw.addr, "gw.mesh", config, &req).unwrap()
    };
    let spoofed = |path| {
        Request::get(path)
            .header("x-client-identity", "spiffe://mesh/admin")
            .header("x-consumer-name", "admin")
    };
    let orders = m.ca.client(Some("ignored-cn"), &["spiffe://mesh/orders"]);
    let frontend = m.ca.client(Some("frontend"), &[]);
    let billing = m.ca.client(None, &["spiffe://mesh/billing"]);

    // The identity reaches the upstream; the client's own copy is replaced.
    let seen = echoed(&call(Some(&orders), spoofed("/ident")));
    assert_eq!(seen["headers"]["x-client-identity"], "spiffe://mesh/orders", "{seen}");
    // No consumer: no x-consumer-name at all (not an empty one, not the client's).
    assert!(seen["headers"].get("x-consumer-name").is_none(), "{seen}");
    let seen = echoed(&call(Some(&frontend), Request::get("/ident")));
    assert_eq!(seen["headers"]["x-client-identity"], "frontend");
    // No certificate: no identity, and the client cannot supply one.
    let seen = echoed(&call(None, spoofed("/ident")));
    assert!(seen["headers"].get("x-client-identity").is_none(), "{seen}");
    assert!(seen["headers"].get("x-consumer-name").is_none(), "{seen}");

    // 403s say who was refused, and why.
    let r = call(Some(&orders), Request::get("/other-domain"));
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("service_not_allowed"))
    );
    assert_eq!(
        r.json()["message"],
        "'spiffe://mesh/orders' is not of trust domain 'elsewhere', the only one this route accepts"
    );
    let r = call(Some(&billing), Request::get("/orders-only"));
    assert_eq!(
        r.json()["message"],
        "'spiffe://mesh/billing' is not among the services that may call this route"
    );

    // SPIFFE IDs: the scheme and the trust domain are lowercase (SPIFFE ID standard §2, §2.1).
    // Written otherwise it is no SPIFFE ID — no identity — and never falls back to the CN.
    for bad in ["SPIFFE://MESH/orders", "spiffe://Mesh/orders", "SPIFFE://mesh/orders"] {
        let cert = m.ca.client(Some("orders"), &[bad]);
        let r = call(Some(&cert), Request::get("/orders-only"));
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (401, Some("unauthorized")),
            "{bad}"
        );
        let seen = echoed(&call(Some(&cert), Request::get("/ident")));
        assert!(seen["headers"].get("x-client-identity").is_none(), "{bad}: {seen}");
    }
}

/// Plain HTTP sent to a TLS port gets what nginx gives ("400 The plain HTTP request was sent
/// to HTTPS port"), as the contract's JSON error with a trace id — not a TLS alert that a
/// client reads as HTTP/0.9 garbage. TLS clients are served as before.
#[test]
fn plain_http_on_the_tls_port_gets_a_400_json_error() {
    let ca = TestCa::new("Test CA");
    let dir = TempDir::new("tls-plain");
    let echo = EchoServer::start("e").unwrap();
    let gw = Gw::start_listeners(
        &sni_listeners(&dir, &ca, &["gw.test"]),
        &[TLS_SPEC, PLAIN_SPEC],
        &routes(&echo),
    );
    let https = &gw.addrs[0];
    let raw = raw(
        https,
        b"GET /x HTTP/1.1\r\nHost: gw.test\r\nx-request-id: plain-to-tls-1\r\n\r\n",
        Duration::from_secs(10),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"], "bad_request");
    assert_eq!(
        v["message"],
        "a plain HTTP request was sent to a TLS port: use https://"
    );
    assert_eq!(v["trace_id"], "plain-to-tls-1");
    let line = gw.access_line("plain-to-tls-1");
    assert!(
        line.contains("\"status\":400") && line.contains("\"error\":\"bad_request\""),
        "{line}"
    );
    // TLS still works on the port.
    let r = tls::send(
        https,
        "gw.test",
        tls::client(&ca, None, &["http/1.1"]),
        &Request::get("/after"),
    )
    .unwrap();
    assert_eq!(r.status, 200);
}
