//! Acceptance [10/12] #13, TLS to upstreams: a private CA and SNI; a wrong name or an
//! untrusted CA → 502 `upstream_unavailable`; `verify: false`; mTLS to an upstream that
//! requires a client certificate; HTTP health checks over TLS. Certificates are made here.

mod common;
use common::*;
use portico::testing::pki::TestCa;
use portico::testing::tls;
use std::time::Duration;

#[test]
fn upstream_tls_checks_the_name_and_the_ca_and_presents_a_client_certificate() {
    let ca = TestCa::new("Upstream CA");
    let other = TestCa::new("Other CA");
    let dir = TempDir::new("up-tls");
    let ca_file = ca.write_ca(&dir, "ca");
    let other_file = other.write_ca(&dir, "other");
    let gateway = ca.client(Some("gateway"), &[]);
    let (gw_cert, gw_key) = gateway.write(&ca, &dir, "gw");

    // An upstream for users.internal, and one that also requires a client certificate.
    let plain_tls = EchoServer::start_tls("users", tls::server(&ca, &["users.internal"], None, &[])).unwrap();
    let mutual = EchoServer::start_tls("mutual", tls::server(&ca, &["users.internal"], Some(&ca), &[])).unwrap();
    let (u, m) = (plain_tls.addr, mutual.addr);
    let body = format!(
        r#"upstreams:
  good:
    endpoints: [{u}]
    tls: {{ sni: users.internal, ca: {ca_file} }}
    health_check: {{ kind: http, path: /healthz, interval: 300ms, timeout: 300ms }}
  wrong-name:
    endpoints: [{u}]
    tls: {{ sni: billing.internal, ca: {ca_file} }}
  untrusted:
    endpoints: [{u}]
    tls: {{ sni: users.internal, ca: {other_file} }}
  unverified:
    endpoints: [{u}]
    tls: {{ verify: false, ca: {other_file} }}
  mtls:
    endpoints: [{m}]
    tls: {{ sni: users.internal, ca: {ca_file}, client_cert: {gw_cert}, client_key: {gw_key} }}
    health_check: {{ kind: http, path: /healthz, interval: 300ms, timeout: 300ms }}
  mtls-without-cert:
    endpoints: [{m}]
    tls: {{ sni: users.internal, ca: {ca_file} }}
routes:
"#
    ) + &[
        "good",
        "wrong-name",
        "untrusted",
        "unverified",
        "mtls",
        "mtls-without-cert",
    ]
    .iter()
    .map(|n| {
        format!(
            "  - {{ name: {n}, match: {{ path_prefix: /{n} }}, upstream: {n}, rewrite: {{ strip_prefix: /{n} }} }}\n"
        )
    })
    .collect::<String>();
    let gw = Gw::start(&body);

    // A private CA and SNI.
    let r = gw.get("/good/users/7");
    assert_eq!(r.status, 200, "{}", gw.p.logs());
    let e = echoed(&r);
    assert_eq!(e["path"], "/users/7");
    assert_eq!(e["tls"]["sni"], "users.internal");
    assert_eq!(e["tls"]["client_cn"], serde_json::Value::Null);
    // Pooled TLS connections are reused: many requests, all fine.
    for _ in 0..20 {
        assert_eq!(gw.get("/good/again").status, 200);
    }

    // A name the certificate does not carry, or a CA that did not sign it: 502.
    for bad in ["/wrong-name/x", "/untrusted/x", "/mtls-without-cert/x"] {
        let r = gw.get(bad);
        assert_eq!(r.status, 502, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"], "upstream_unavailable", "{bad}");
    }
    // verify: false accepts any certificate (and sends no SNI without one).
    let r = gw.get("/unverified/x");
    assert_eq!(echoed(&r)["tls"]["sni"], serde_json::Value::Null);

    // mTLS to an upstream that requires a client certificate.
    let r = gw.get("/mtls/orders");
    let e = echoed(&r);
    assert_eq!(e["tls"]["client_cn"], "gateway");
    assert_eq!(e["path"], "/orders");

    // HTTP health checks reach TLS upstreams over TLS (with the client certificate too).
    wait_for("TLS upstreams healthy", Duration::from_secs(10), || {
        let text = gw.metrics();
        let up = |name: &str, ep: &str| {
            metric(
                &text,
                "portico_upstream_healthy",
                &[("upstream", name), ("endpoint", ep)],
            )
        };
        (up("good", &u.to_string()) == 1.0 && up("mtls", &m.to_string()) == 1.0).then_some(())
    });
}
