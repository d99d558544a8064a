//! Acceptance [2/9]: jwt (every algorithm, JWKS rotation, 40+ bad tokens, path tricks, the
//! verified-token cache), api_key, ip_filter, allow_services, cors, and located config errors.

mod common;
use base64::Engine;
use common::*;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn encoding_key(alg: Algorithm, key: &str) -> EncodingKey {
    let pem = || std::fs::read(fixture(key)).unwrap();
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(key.as_bytes()),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem()).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem()).unwrap(),
    }
}

/// A token signed with `key` (a secret for HS*, else a fixture file name).
fn sign(alg: Algorithm, key: &str, claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg, key)).unwrap()
}

/// A token from raw header and payload JSON text, signed (HS256 with `secret`) or not.
fn raw(header: &str, payload: &str, secret: Option<&str>) -> String {
    let msg = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = match secret {
        Some(s) => jsonwebtoken::crypto::sign(
            msg.as_bytes(),
            &EncodingKey::from_secret(s.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap(),
        None => String::new(),
    };
    format!("{msg}.{sig}")
}

fn claims(extra: Value) -> Value {
    let mut c = json!({ "sub": "user-1", "iss": "portico-test", "aud": "api", "exp": now() + 600, "iat": now() - 5 });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn bearer(gw: &Gw, path: &str, token: &str) -> Response {
    gw.send(Request::get(path).header("authorization", format!("Bearer {token}")))
}

fn jwks(keys: &[(&str, Algorithm, &str)]) -> String {
    let set = JwkSet {
        keys: keys
            .iter()
            .map(|(file, alg, kid)| {
                let mut jwk = Jwk::from_encoding_key(&encoding_key(*alg, file), *alg).unwrap();
                jwk.common.key_id = Some(kid.to_string());
                jwk
            })
            .collect(),
    };
    serde_json::to_string(&set).unwrap()
}

fn jwt_route(name: &str, jwt: &str) -> String {
    format!("  - {{ name: {name}, upstream: up, match: {{ path_prefix: /{name} }}, plugins: [ {{ jwt: {jwt} }} ] }}\n")
}

#[test]
fn every_algorithm_passes_and_claims_are_forwarded() {
    let up = EchoServer::start("up").unwrap();
    let common = "issuer: portico-test, audience: api, forward_claims: { sub: x-user, role: x-role, n: x-n }";
    let cases: Vec<(&str, Algorithm, String, &str)> = vec![
        ("hs256", Algorithm::HS256, format!("secret: '{SECRET}'"), SECRET),
        ("hs384", Algorithm::HS384, format!("secret: '{SECRET}'"), SECRET),
        ("hs512", Algorithm::HS512, format!("secret: '{SECRET}'"), SECRET),
        (
            "rs256",
            Algorithm::RS256,
            format!("public_key_file: {}", fixture("rsa.pub")),
            "rsa.key",
        ),
        (
            "rs384",
            Algorithm::RS384,
            format!("public_key_file: {}", fixture("rsa.pub")),
            "rsa.key",
        ),
        (
            "rs512",
            Algorithm::RS512,
            format!("public_key_file: {}", fixture("rsa.pub")),
            "rsa.key",
        ),
        (
            "ps256",
            Algorithm::PS256,
            format!("public_key_file: {}", fixture("rsa.pub")),
            "rsa.key",
        ),
        (
            "es256",
            Algorithm::ES256,
            format!("public_key_file: {}", fixture("ec256.pub")),
            "ec256.key",
        ),
        (
            "es384",
            Algorithm::ES384,
            format!("public_key_file: {}", fixture("ec384.pub")),
            "ec384.key",
        ),
        (
            "eddsa",
            Algorithm::EdDSA,
            format!("public_key_file: {}", fixture("ed25519.pub")),
            "ed25519.key",
        ),
    ];
    let mut routes = String::new();
    for (name, alg, source, _) in &cases {
        routes += &jwt_route(name, &format!("{{ algorithms: [{alg:?}], {source}, {common} }}"));
    }
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{routes}",
        up.addr
    ));
    for (name, alg, _, key) in &cases {
        let token = sign(*alg, key, &claims(json!({ "role": "admin", "n": 7 })), None);
        let r = gw.send(
            Request::get(&format!("/{name}/x"))
                .header("authorization", format!("Bearer {token}"))
                .header("x-role", "forged")
                .header("x-consumer", "forged"),
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let h = &echoed(&r)["headers"];
        assert_eq!(h["x-user"], "user-1", "{name}");
        assert_eq!(h["x-role"], "admin", "{name}: a client's own claim header never passes");
        assert_eq!(h["x-n"], "7", "{name}");
        assert_eq!(h["x-consumer"], "user-1", "{name}");
    }
}

#[test]
fn jwks_rotation_is_picked_up_on_an_unknown_kid() {
    let up = EchoServer::start("up").unwrap();
    let idp = ContentServer::start(&jwks(&[("rsa.key", Algorithm::RS256, "k1")]));
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{}",
        up.addr,
        jwt_route(
            "api",
            &format!("{{ jwks_url: 'http://{}/jwks.json', jwks_refresh: 10s }}", idp.addr)
        )
    ));
    let t1 = sign(Algorithm::RS256, "rsa.key", &claims(json!({})), Some("k1"));
    assert_eq!(bearer(&gw, "/api", &t1).status, 200);
    let t2 = sign(Algorithm::RS256, "rsa2.key", &claims(json!({})), Some("k2"));
    assert_eq!(bearer(&gw, "/api", &t2).status, 401, "k2 is not published yet");
    // The issuer rotates: k2 appears, k1 stays for a while.
    idp.set(&jwks(&[
        ("rsa.key", Algorithm::RS256, "k1"),
        ("rsa2.key", Algorithm::RS256, "k2"),
    ]));
    wait_for("the rotated key to be picked up", Duration::from_secs(15), || {
        (bearer(&gw, "/api", &t2).status == 200).then_some(())
    });
    assert_eq!(bearer(&gw, "/api", &t1).status, 200);
    // Unknown kids do not turn into a refetch per request.
    let before = idp.hits();
    let t3 = sign(Algorithm::RS256, "rsa2.key", &claims(json!({})), Some("k3"));
    for _ in 0..20 {
        assert_eq!(bearer(&gw, "/api", &t3).status, 401);
    }
    assert!(
        idp.hits() - before <= 2,
        "{} refetches for 20 requests",
        idp.hits() - before
    );
}

#[test]
fn bad_tokens_are_all_rejected() {
    let up = EchoServer::start("up").unwrap();
    let idp = ContentServer::start(&jwks(&[("rsa.key", Algorithm::RS256, "k1")]));
    let hs = format!("{{ algorithms: [HS256], secret: '{SECRET}', issuer: portico-test, audience: api }}");
    let rs = format!(
        "{{ algorithms: [RS256], public_key_file: {}, issuer: portico-test, audience: api }}",
        fixture("rsa.pub")
    );
    let es = format!(
        "{{ algorithms: [ES256], public_key_file: {}, issuer: portico-test, audience: api }}",
        fixture("ec256.pub")
    );
    let jw = format!("{{ algorithms: [RS256], jwks_url: 'http://{}/jwks.json' }}", idp.addr);
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{}{}{}{}",
        up.addr,
        jwt_route("hs", &hs),
        jwt_route("rs", &rs),
        jwt_route("es", &es),
        jwt_route("jw", &jw)
    ));
    let good = claims(json!({}));
    let good_text = good.to_string();
    let hs_header = r#"{"alg":"HS256","typ":"JWT"}"#;
    let ok_hs = sign(Algorithm::HS256, SECRET, &good, None);
    // Controls: these pass.
    assert_eq!(bearer(&gw, "/hs", &ok_hs).status, 200);
    assert_eq!(
        bearer(
            &gw,
            "/hs",
            &sign(Algorithm::HS256, SECRET, &claims(json!({"exp": now() - 10})), None)
        )
        .status,
        200,
        "within leeway"
    );
    assert_eq!(
        bearer(&gw, "/rs", &sign(Algorithm::RS256, "rsa.key", &good, None)).status,
        200
    );
    assert_eq!(
        bearer(&gw, "/jw", &sign(Algorithm::RS256, "rsa.key", &good, Some("k1"))).status,
        200
    );
    let served = up.requests();

    let rsa_pub = std::fs::read_to_string(fixture("rsa.pub")).unwrap();
    let parts: Vec<&str> = ok_hs.split('.').collect();
    let flipped = {
        let mut sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        sig[0] ^= 1;
        format!("{}.{}.{}", parts[0], parts[1], b64(&sig))
    };
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims(json!({"sub": "admin"})).to_string().as_bytes()),
        parts[2]
    );
    let huge = sign(
        Algorithm::HS256,
        SECRET,
        &claims(json!({ "pad": "x".repeat(9000) })),
        None,
    );
    let es_zero = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"ES256","typ":"JWT"}"#),
        b64(good_text.as_bytes()),
        b64(&[0u8; 64])
    );
    let attacker_jwk = serde_json::to_string(
        &Jwk::from_encoding_key(&encoding_key(Algorithm::RS256, "rsa2.key"), Algorithm::RS256).unwrap(),
    )
    .unwrap();
    let embedded = {
        let mut h = Header::new(Algorithm::RS256);
        h.jwk = Some(serde_json::from_str(&attacker_jwk).unwrap());
        jsonwebtoken::encode(&h, &good, &encoding_key(Algorithm::RS256, "rsa2.key")).unwrap()
    };
    let jku = {
        let mut h = Header::new(Algorithm::RS256);
        h.jku = Some(format!("http://{}/attacker.json", idp.addr));
        h.kid = Some("k-attacker".into());
        jsonwebtoken::encode(&h, &good, &encoding_key(Algorithm::RS256, "rsa2.key")).unwrap()
    };
    let x5u = {
        let mut h = Header::new(Algorithm::RS256);
        h.x5u = Some("http://127.0.0.1:1/cert.pem".into());
        jsonwebtoken::encode(&h, &good, &encoding_key(Algorithm::RS256, "rsa2.key")).unwrap()
    };
    let with = |extra: Value| sign(Algorithm::HS256, SECRET, &claims(extra), None);
    let with_raw_payload = |payload: &str| raw(hs_header, payload, Some(SECRET));

    let cases: Vec<(&str, &str, String)> = vec![
        (
            "alg none",
            "/hs",
            raw(r#"{"alg":"none","typ":"JWT"}"#, &good_text, None),
        ),
        ("alg None", "/hs", raw(r#"{"alg":"None"}"#, &good_text, None)),
        ("alg NONE", "/hs", raw(r#"{"alg":"NONE"}"#, &good_text, None)),
        (
            "alg nOnE with a signature",
            "/hs",
            format!("{}.{}", raw(r#"{"alg":"nOnE"}"#, &good_text, None), "c2ln"),
        ),
        ("empty signature", "/hs", raw(hs_header, &good_text, None)),
        (
            "HS256 signed with the RSA public key",
            "/rs",
            sign(Algorithm::HS256, &rsa_pub, &good, None),
        ),
        (
            "HS256 signed with the RSA public key, kid",
            "/jw",
            sign(Algorithm::HS256, &rsa_pub, &good, Some("k1")),
        ),
        (
            "algorithm not allowed (HS512)",
            "/hs",
            sign(Algorithm::HS512, SECRET, &good, None),
        ),
        (
            "RS256 on an HS256 route",
            "/hs",
            sign(Algorithm::RS256, "rsa.key", &good, None),
        ),
        (
            "PS256 on an RS256 route",
            "/rs",
            sign(Algorithm::PS256, "rsa.key", &good, None),
        ),
        (
            "unknown kid",
            "/jw",
            sign(Algorithm::RS256, "rsa.key", &good, Some("nope")),
        ),
        (
            "junk kid: path",
            "/jw",
            sign(Algorithm::RS256, "rsa.key", &good, Some("../../../../etc/passwd")),
        ),
        (
            "junk kid: sql",
            "/jw",
            sign(Algorithm::RS256, "rsa.key", &good, Some("' OR 1=1 --")),
        ),
        (
            "kid not a string",
            "/jw",
            raw(r#"{"alg":"RS256","kid":7}"#, &good_text, None),
        ),
        ("embedded jwk", "/rs", embedded.clone()),
        ("embedded jwk on jwks route", "/jw", embedded),
        ("jku", "/jw", jku),
        ("x5u", "/rs", x5u),
        (
            "crit exp",
            "/hs",
            raw(r#"{"alg":"HS256","crit":["exp"]}"#, &good_text, Some(SECRET)),
        ),
        (
            "crit b64",
            "/hs",
            raw(
                r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
                &good_text,
                Some(SECRET),
            ),
        ),
        ("expired beyond leeway", "/hs", with(json!({"exp": now() - 120}))),
        ("nbf in the future", "/hs", with(json!({"nbf": now() + 300}))),
        ("iat in the future", "/hs", with(json!({"iat": now() + 300}))),
        ("wrong iss", "/hs", with(json!({"iss": "someone-else"}))),
        ("missing iss", "/hs", with(json!({"iss": null}))),
        ("wrong aud", "/hs", with(json!({"aud": "other"}))),
        ("aud list without ours", "/hs", with(json!({"aud": ["x", "y"]}))),
        ("missing aud", "/hs", with(json!({"aud": null}))),
        ("missing exp", "/hs", with(json!({"exp": null}))),
        ("non-numeric exp", "/hs", with(json!({"exp": "9999999999"}))),
        (
            "fractional exp beyond leeway",
            "/hs",
            with_raw_payload(&format!(
                r#"{{"sub":"a","iss":"portico-test","aud":"api","exp":{}.5}}"#,
                now() - 120
            )),
        ),
        (
            "fractional nbf in the future",
            "/hs",
            with_raw_payload(&format!(
                r#"{{"sub":"a","iss":"portico-test","aud":"api","exp":{},"nbf":{}.25}}"#,
                now() + 600,
                now() + 300
            )),
        ),
        (
            "fractional exp too large",
            "/hs",
            with_raw_payload(r#"{"sub":"a","iss":"portico-test","aud":"api","exp":1e300}"#),
        ),
        (
            "negative fractional exp",
            "/hs",
            with_raw_payload(r#"{"sub":"a","iss":"portico-test","aud":"api","exp":-0.5}"#),
        ),
        ("negative exp", "/hs", with(json!({"exp": -1}))),
        ("non-numeric nbf", "/hs", with(json!({"nbf": "soon"}))),
        ("non-numeric iat", "/hs", with(json!({"iat": "now"}))),
        ("bad base64 header", "/hs", format!("@@@.{}.{}", parts[1], parts[2])),
        ("bad base64 payload", "/hs", format!("{}.!!!.{}", parts[0], parts[2])),
        ("bad base64 signature", "/hs", format!("{}.{}.***", parts[0], parts[1])),
        ("truncated to two parts", "/hs", format!("{}.{}", parts[0], parts[1])),
        ("four parts", "/hs", format!("{ok_hs}.extra")),
        ("payload not JSON", "/hs", with_raw_payload("not json")),
        ("payload a JSON array", "/hs", with_raw_payload("[1,2]")),
        ("header not JSON", "/hs", raw("nope", &good_text, Some(SECRET))),
        ("header a JSON array", "/hs", raw("[]", &good_text, Some(SECRET))),
        ("over 8 KiB", "/hs", huge),
        (
            "wrong secret",
            "/hs",
            sign(Algorithm::HS256, "another-secret-another-secret-1234", &good, None),
        ),
        ("flipped signature bit", "/hs", flipped),
        ("payload changed after signing", "/hs", tampered),
        ("ECDSA r=s=0", "/es", es_zero),
        (
            "ES384 key on an ES256 route",
            "/es",
            sign(Algorithm::ES384, "ec384.key", &good, None),
        ),
        (
            "RS256 by another key",
            "/rs",
            sign(Algorithm::RS256, "rsa2.key", &good, None),
        ),
    ];
    assert!(cases.len() >= 40);
    for (what, path, token) in &cases {
        let r = bearer(&gw, path, token);
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_token", "{what}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\""),
            "{what}"
        );
    }
    // Tokens in the wrong place or wrong shape.
    let wrong_place: Vec<(&str, Request)> = vec![
        ("no token", Request::get("/hs")),
        ("empty bearer", Request::get("/hs").header("authorization", "Bearer ")),
        ("scheme only", Request::get("/hs").header("authorization", "Bearer")),
        (
            "basic auth",
            Request::get("/hs").header("authorization", format!("Basic {ok_hs}")),
        ),
        (
            "token without scheme",
            Request::get("/hs").header("authorization", ok_hs.clone()),
        ),
        (
            "in the query",
            Request::get(Box::leak(format!("/hs?access_token={ok_hs}").into_boxed_str())),
        ),
        (
            "in a cookie",
            Request::get("/hs").header("cookie", format!("token={ok_hs}")),
        ),
        (
            "two authorization headers",
            Request::get("/hs")
                .header("authorization", format!("Bearer {ok_hs}"))
                .header("authorization", "Bearer x"),
        ),
    ];
    for (what, req) in wrong_place {
        let r = gw.send(req);
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_token", "{what}");
    }
    assert_eq!(up.requests(), served, "no bad token reached the upstream");
    // NumericDates with a fraction (RFC 7519 §2) are times like any other.
    let fractional = with_raw_payload(&format!(
        r#"{{"sub":"a","iss":"portico-test","aud":"api","exp":{}.5,"nbf":{}.25,"iat":{}.123}}"#,
        now() + 600,
        now() - 5,
        now()
    ));
    let r = bearer(&gw, "/hs", &fractional);
    assert_eq!(r.status, 200, "fractional exp, nbf, iat: {}", r.text());
}

#[test]
fn path_tricks_do_not_bypass_a_protected_route() {
    let up = EchoServer::start("up").unwrap();
    // Only /admin exists, and it needs a token: no catch-all to fall through to.
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{}",
        up.addr,
        jwt_route("admin", &format!("{{ algorithms: [HS256], secret: '{SECRET}' }}"))
    ));
    let tricks = [
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/%2e%2e/admin",
        "/x/%2e%2e/admin",
        "/%2fadmin",
        "/admin%2f",
        "/%252fadmin",
        "/admin%252f",
        "/%5cadmin",
        "/x%5c..%5cadmin",
        "/admin;x",
        "/admin%00",
        "/ADMIN",
        "/Admin",
        "/admin/",
        "/admin/./x",
        "/%2e/admin",
        "/admin/%2e%2e/admin",
        "///admin//x",
    ];
    for path in tricks {
        let r = gw.get(path);
        assert!(matches!(r.status, 400 | 401 | 404), "{path}: {} {}", r.status, r.text());
    }
    assert_eq!(
        up.requests(),
        0,
        "nothing reached the protected upstream without a token"
    );
    let token = sign(Algorithm::HS256, SECRET, &json!({"sub": "a", "exp": now() + 60}), None);
    let r = bearer(&gw, "/x/../admin/./y", &token);
    assert_eq!(
        echoed(&r)["path"],
        "/admin/y",
        "the path the check saw is the path sent"
    );
}

#[test]
fn ip_filter_uses_the_real_client_address() {
    let up = EchoServer::start("up").unwrap();
    let body = |trusted: &str| {
        format!(
            "client_ip: {{ trusted_proxies: [{trusted}] }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: up, plugins: [ {{ ip_filter: {{ allow: [127.0.0.2, 127.0.0.4/32, 127.0.1.0/24], deny: [127.0.0.4] }} }} ] }}\n",
            up.addr
        )
    };
    let gw = Gw::start(&body("127.0.0.5"));
    let status = |from: &str, headers: &[(&'static str, &str)]| {
        let mut req = Request::get("/x").from_ip(from);
        for (k, v) in headers {
            req = req.header(k, *v);
        }
        gw.send(req).status
    };
    assert_eq!(status("127.0.0.2", &[]), 200);
    assert_eq!(status("127.0.1.77", &[]), 200);
    assert_eq!(status("127.0.0.4", &[]), 403, "deny wins");
    assert_eq!(status("127.0.0.3", &[]), 403, "not in allow");
    let r = gw.send(Request::get("/x").from_ip("127.0.0.3"));
    assert_eq!(r.json()["error"], "forbidden");
    // Spoofing from an untrusted peer changes nothing.
    for h in ["x-forwarded-for", "x-real-ip"] {
        assert_eq!(status("127.0.0.3", &[(h, "127.0.0.2")]), 403, "{h}");
    }
    assert_eq!(status("127.0.0.3", &[("forwarded", "for=127.0.0.2")]), 403);
    assert_eq!(
        status(
            "127.0.0.3",
            &[("x-forwarded-for", "127.0.0.2"), ("x-forwarded-for", "127.0.0.2")]
        ),
        403
    );
    assert_eq!(status("127.0.0.3", &[("x-forwarded-for", "::ffff:127.0.0.2")]), 403);
    // Through the trusted proxy (127.0.0.5), the right-most untrusted hop is the client.
    assert_eq!(status("127.0.0.5", &[("x-forwarded-for", "127.0.0.2")]), 200);
    assert_eq!(status("127.0.0.5", &[("x-forwarded-for", "127.0.0.2, 127.0.0.3")]), 403);
    assert_eq!(status("127.0.0.5", &[("x-forwarded-for", "127.0.0.3, 127.0.0.2")]), 200);
    assert_eq!(
        status("127.0.0.5", &[("x-forwarded-for", "::ffff:127.0.0.2")]),
        200,
        "v4-mapped is v4"
    );
    assert_eq!(
        status("127.0.0.5", &[("x-forwarded-for", "junk")]),
        403,
        "junk: the proxy itself is the client"
    );
    assert_eq!(
        status("127.0.0.6", &[("x-forwarded-for", "127.0.0.2")]),
        403,
        "127.0.0.6 is not trusted"
    );
    let r = gw.send(
        Request::get("/x")
            .from_ip("127.0.0.5")
            .header("x-forwarded-for", "10.9.8.7, 127.0.0.2"),
    );
    let e = echoed(&r);
    assert_eq!(e["headers"]["x-forwarded-for"], "10.9.8.7, 127.0.0.2, 127.0.0.5");
    assert_eq!(e["headers"]["x-real-ip"], "127.0.0.2");
}

#[test]
fn allow_services_by_jwt_claim() {
    let up = EchoServer::start("up").unwrap();
    let jwt = format!("{{ algorithms: [HS256], secret: '{SECRET}' }}");
    let gw = Gw::start(&format!(
        r#"upstreams:
  up: {{ endpoints: ["{}"] }}
routes:
  - name: billing
    match: {{ path_prefix: /billing }}
    upstream: up
    plugins:
      - allow_services: {{ services: [orders, "spiffe://mesh/reports"], from: "jwt:svc" }}
      - jwt: {jwt}
  - name: mtls-only
    match: {{ path_prefix: /internal }}
    upstream: up
    plugins:
      - allow_services: {{ services: [orders] }}
"#,
        up.addr
    ));
    let token = |svc: &str| {
        sign(
            Algorithm::HS256,
            SECRET,
            &json!({"sub": "x", "svc": svc, "exp": now() + 60}),
            None,
        )
    };
    assert_eq!(bearer(&gw, "/billing", &token("orders")).status, 200);
    assert_eq!(bearer(&gw, "/billing", &token("spiffe://mesh/orders")).status, 200);
    assert_eq!(bearer(&gw, "/billing", &token("spiffe://mesh/reports")).status, 200);
    let r = bearer(&gw, "/billing", &token("frontend"));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, json!("service_not_allowed"))
    );
    let r = bearer(&gw, "/billing", &token("spiffe://other/reports"));
    assert_eq!(r.status, 403);
    let no_claim = sign(Algorithm::HS256, SECRET, &json!({"sub": "x", "exp": now() + 60}), None);
    let r = bearer(&gw, "/billing", &no_claim);
    assert_eq!((r.status, r.json()["error"].clone()), (401, json!("unauthorized")));
    let r = gw.get("/internal");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, json!("unauthorized")),
        "no client certificate"
    );
}

#[test]
fn the_token_cache_rechecks_time_and_audience() {
    let up = EchoServer::start("up").unwrap();
    let rs = |aud: &str| {
        format!(
            "{{ algorithms: [RS256], public_key_file: {}, audience: {aud}, leeway: 0s }}",
            fixture("rsa.pub")
        )
    };
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{}{}",
        up.addr,
        jwt_route("a", &rs("a")),
        jwt_route("b", &rs("b"))
    ));
    // Cached on route a, still checked against route b's audience.
    let token = sign(
        Algorithm::RS256,
        "rsa.key",
        &json!({"sub": "u", "aud": "a", "exp": now() + 60}),
        None,
    );
    for _ in 0..3 {
        assert_eq!(bearer(&gw, "/a", &token).status, 200);
    }
    for _ in 0..2 {
        assert_eq!(bearer(&gw, "/b", &token).status, 401);
    }
    // A token cached while valid is refused once it expires.
    let exp = now() + 2;
    let short = sign(
        Algorithm::RS256,
        "rsa.key",
        &json!({"sub": "u", "aud": "a", "exp": exp}),
        None,
    );
    assert_eq!(bearer(&gw, "/a", &short).status, 200);
    assert_eq!(bearer(&gw, "/a", &short).status, 200, "served from the cache");
    wait_for("the cached token to expire", Duration::from_secs(10), || {
        let r = bearer(&gw, "/a", &short);
        (r.status == 401).then_some(())
    });
    assert!(now() > exp, "refused only after exp");
    assert_eq!(bearer(&gw, "/a", &short).json()["message"], "the token has expired");
}

#[test]
fn scopes_are_all_required() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{}",
        up.addr,
        jwt_route(
            "s",
            &format!("{{ algorithms: [HS256], secret: '{SECRET}', scopes: [orders:read, orders:write] }}")
        )
    ));
    let with = |c: Value| sign(Algorithm::HS256, SECRET, &c, None);
    let exp = now() + 60;
    assert_eq!(
        bearer(
            &gw,
            "/s",
            &with(json!({"exp": exp, "scope": "orders:read orders:write x"}))
        )
        .status,
        200
    );
    assert_eq!(
        bearer(
            &gw,
            "/s",
            &with(json!({"exp": exp, "scp": ["orders:write", "orders:read"]}))
        )
        .status,
        200
    );
    let r = bearer(&gw, "/s", &with(json!({"exp": exp, "scope": "orders:read"})));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "insufficient_scope");
    assert!(r.header("www-authenticate").unwrap().contains("insufficient_scope"));
    assert_eq!(bearer(&gw, "/s", &with(json!({"exp": exp}))).status, 403);
}

#[test]
fn api_keys_identify_consumers() {
    let up = EchoServer::start("up").unwrap();
    let partner_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"k-partner-456"))
    };
    let gw = Gw::start(&format!(
        r#"consumers:
  - {{ name: mobile-app, api_keys: ["k-live-123"] }}
  - {{ name: partner, api_key_sha256: ["{partner_hash}"] }}
upstreams:
  up: {{ endpoints: ["{}"] }}
routes:
  - {{ name: any, upstream: up, match: {{ path_prefix: /any }}, plugins: [ {{ api_key: {{}} }} ] }}
  - {{ name: partners, upstream: up, match: {{ path_prefix: /partners }}, plugins: [ {{ api_key: {{ allow: [partner], query: key }} }} ] }}
"#,
        up.addr
    ));
    let r = gw.send(
        Request::get("/any")
            .header("x-api-key", "k-live-123")
            .header("x-consumer", "forged"),
    );
    let e = echoed(&r);
    assert_eq!(e["headers"]["x-consumer"], "mobile-app");
    assert!(
        e["headers"].get("x-api-key").is_none(),
        "the key is removed before forwarding"
    );
    assert_eq!(
        echoed(&gw.send(Request::get("/any").header("x-api-key", "k-partner-456")))["headers"]["x-consumer"],
        "partner"
    );
    for (what, req) in [
        ("missing", Request::get("/any")),
        ("unknown", Request::get("/any").header("x-api-key", "k-live-124")),
        ("empty", Request::get("/any").header("x-api-key", "")),
        (
            "two keys",
            Request::get("/any")
                .header("x-api-key", "k-live-123")
                .header("x-api-key", "k-live-123"),
        ),
    ] {
        let r = gw.send(req);
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (401, json!("unauthorized")),
            "{what}"
        );
    }
    let r = gw.get("/partners?a=1&key=k-partner-456&b=2");
    assert_eq!(echoed(&r)["query"], "a=1&b=2", "the key is removed from the query");
    let r = gw.send(Request::get("/partners").header("x-api-key", "k-live-123"));
    assert_eq!((r.status, r.json()["error"].clone()), (403, json!("forbidden")));
}

#[test]
fn cors_preflight_and_headers_on_every_response() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        r#"upstreams:
  up: {{ endpoints: ["{}"] }}
plugins:
  - cors: {{ origins: ["https://app.example.com", "https://*.example.org"], methods: [GET, POST], headers: [authorization, content-type], expose: [x-request-id], credentials: true, max_age: 10m }}
routes:
  - name: api
    match: {{ path_prefix: /api, methods: [GET, POST, DELETE] }}
    upstream: up
    plugins:
      - jwt: {{ algorithms: [HS256], secret: '{SECRET}' }}
"#,
        up.addr
    ));
    let preflight = |origin: &str, method: &str, headers: &str| {
        gw.send(
            Request::new("OPTIONS", "/api/x")
                .header("origin", origin)
                .header("access-control-request-method", method)
                .header("access-control-request-headers", headers),
        )
    };
    // Answered before authentication, and without reaching the upstream.
    let r = preflight("https://app.example.com", "POST", "authorization, content-type");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example.com"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert!(r.header("access-control-allow-methods").unwrap().contains("POST"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, content-type")
    );
    assert_eq!(preflight("https://a.b.example.org", "GET", "").status, 204);
    for (origin, method, headers) in [
        ("https://evil.example.com", "GET", ""),
        ("https://example.org", "GET", ""),
        ("https://app.example.com", "DELETE", ""),
        ("https://app.example.com", "GET", "x-secret"),
    ] {
        let r = preflight(origin, method, headers);
        assert_eq!(r.status, 403, "{origin} {method} {headers}");
        assert!(r.header("access-control-allow-origin").is_none() || origin == "https://app.example.com");
    }
    assert_eq!(up.requests(), 0);
    // Error responses carry CORS headers for allowed origins, so the browser can read them.
    let r = gw.send(Request::get("/api/x").header("origin", "https://app.example.com"));
    assert_eq!(r.status, 401);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example.com"));
    assert_eq!(r.header("access-control-expose-headers"), Some("x-request-id"));
    let token = sign(Algorithm::HS256, SECRET, &json!({"sub": "a", "exp": now() + 60}), None);
    let r = gw.send(
        Request::get("/api/x")
            .header("origin", "https://app.example.com")
            .header("authorization", format!("Bearer {token}")),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example.com"));
    assert!(r.headers.iter().any(|(k, v)| k == "vary" && v.contains("origin")));
    // Other origins get nothing.
    let r = gw.send(Request::get("/api/x").header("origin", "https://evil.example.com"));
    assert!(r.header("access-control-allow-origin").is_none());
    let r = gw.get("/nowhere");
    assert!(r.header("access-control-allow-origin").is_none());
}

/// A preflight reaches the route its real request will reach, even when a later route without
/// a method list would take an OPTIONS request (user-v3 D1).
#[test]
fn a_preflight_reaches_the_route_of_the_method_it_asks_about() {
    let (posts, rest) = (EchoServer::start("posts").unwrap(), EchoServer::start("rest").unwrap());
    let gw = Gw::start(&format!(
        r#"upstreams:
  posts: {{ endpoints: ["{}"] }}
  rest: {{ endpoints: ["{}"] }}
routes:
  - name: posts
    match: {{ path_prefix: /api, methods: [POST] }}
    upstream: posts
    plugins:
      - cors: {{ origins: ["https://app.example.com"], methods: [POST], headers: [content-type] }}
  - name: rest
    match: {{ path_prefix: /api }}
    upstream: rest
"#,
        posts.addr, rest.addr
    ));
    let r = gw.send(
        Request::new("OPTIONS", "/api/x")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type"),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example.com"));
    // A plain OPTIONS (no preflight) and a preflight for a method only `rest` takes go there.
    assert_eq!(service(&gw.send(Request::new("OPTIONS", "/api/x"))), "rest");
    let r = gw.send(
        Request::new("OPTIONS", "/api/x")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "GET"),
    );
    assert_eq!(service(&r), "rest");
    assert_eq!(posts.requests(), 0);
}

#[test]
fn bad_plugin_configs_are_located() {
    let dir = TempDir::new("auth-t");
    let check = |plugins: &str| {
        let path = dir.write(
            "c.yaml",
            &format!(
                "listeners: [{{ address: 127.0.0.1:1 }}]\nupstreams:\n  up: {{ endpoints: [127.0.0.1:2] }}\nroutes:\n  - {{ name: r, upstream: up, plugins: [ {plugins} ] }}\n"
            ),
        );
        let out = std::process::Command::new(BIN)
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{plugins}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let cases = [
        (
            format!("{{ jwt: {{ algorithms: [HS257], secret: '{SECRET}' }} }}"),
            "routes[0].plugins[0].jwt.algorithms[0]: unknown algorithm 'HS257'",
        ),
        (
            format!("{{ jwt: {{ algorithms: [none], secret: '{SECRET}' }} }}"),
            "routes[0].plugins[0].jwt.algorithms[0]",
        ),
        (
            "{ jwt: { algorithms: [RS256] } }".to_string(),
            "routes[0].plugins[0].jwt: give exactly one key source",
        ),
        (
            format!("{{ jwt: {{ secret: '{SECRET}', public_key_file: x.pem }} }}"),
            "give exactly one key source",
        ),
        (
            "{ jwt: { public_key_file: /nonexistent/key.pem } }".to_string(),
            "routes[0].plugins[0].jwt.public_key_file: cannot read",
        ),
        (
            format!("{{ jwt: {{ algorithms: [RS256], secret: '{SECRET}' }} }}"),
            "routes[0].plugins[0].jwt.algorithms[0]: RS256 cannot be verified with a shared secret",
        ),
        (
            format!(
                "{{ jwt: {{ algorithms: [HS256], public_key_file: {} }} }}",
                fixture("rsa.pub")
            ),
            "HS256 cannot be verified with an RSA key",
        ),
        (
            "{ jwt: { algorithms: [HS256], secret: short } }".to_string(),
            "routes[0].plugins[0].jwt.secret: too short",
        ),
        (
            "{ jwt: { jwks_url: 'ftp://x' } }".to_string(),
            "routes[0].plugins[0].jwt.jwks_url",
        ),
        (
            format!("{{ jwt: {{ secret: '{SECRET}', algorithms: [HS256], isuer: x }} }}"),
            "routes[0].plugins[0].jwt: unknown field 'isuer'",
        ),
        (
            "{ jwt: { secret_env: PORTICO_TEST_UNSET_VAR, algorithms: [HS256] } }".to_string(),
            "jwt.secret_env: environment variable 'PORTICO_TEST_UNSET_VAR' is not set",
        ),
        (
            "{ ip_filter: { allow: [10.0.0.0/8, 10.0.0.0/40] } }".to_string(),
            "routes[0].plugins[0].ip_filter.allow[1]",
        ),
        ("{ ip_filter: {} }".to_string(), "routes[0].plugins[0].ip_filter"),
        (
            "{ api_key: { allow: [ghost] } }".to_string(),
            "routes[0].plugins[0].api_key.allow[0]: no consumer named 'ghost'",
        ),
        (
            "{ allow_services: { services: [a], from: header } }".to_string(),
            "routes[0].plugins[0].allow_services.from",
        ),
        (
            "{ cors: { origins: ['*'], credentials: true } }".to_string(),
            "routes[0].plugins[0].cors.origins[0]",
        ),
        (
            "{ cors: { origins: [example.com] } }".to_string(),
            "routes[0].plugins[0].cors.origins[0]",
        ),
    ];
    for (plugins, want) in cases {
        let out = check(&plugins);
        assert!(out.contains(want), "expected `{want}` for {plugins}, got:\n{out}");
    }
}

/// Attack-d #3: a token in the query (or a cookie) is a credential: refused or not, it goes
/// neither upstream nor into the access log — also when a plugin before jwt refused the request,
/// or the edge refused its head.
#[test]
fn query_and_cookie_tokens_never_reach_the_log_or_the_upstream() {
    let up = EchoServer::start("up").unwrap();
    let jwt = |from: &str, extra: &str| {
        format!("{{ algorithms: [HS256], secret: '{SECRET}', audience: api, from: '{from}'{extra} }}")
    };
    let gw = Gw::start(&format!(
        "upstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{}{}{}  - {{ name: walled, upstream: up, match: {{ path_prefix: /walled }}, plugins: [ {{ ip_filter: {{ allow: [10.0.0.0/8] }} }}, {{ jwt: {} }} ] }}\n",
        up.addr,
        jwt_route("q", &jwt("query:tok", "")),
        jwt_route("qscope", &jwt("query:tok", ", scopes: [admin]")),
        jwt_route("c", &jwt("cookie:session", ", scopes: [admin]")),
        jwt("query:tok", ""),
    ));
    let good = sign(Algorithm::HS256, SECRET, &claims(json!({})), None);
    let other_aud = sign(Algorithm::HS256, SECRET, &claims(json!({"aud": "elsewhere"})), None);
    let mut cases = vec![
        (
            format!("/qscope/x?tok={good}&a=1"),
            403,
            "a valid token without the scope",
        ),
        (format!("/q/x?tok={other_aud}"), 401, "a token for another audience"),
        (format!("/q/x?tok={good}&tok={good}"), 401, "two tokens"),
        (format!("/q/x?t%6Fk={good}&tok=x"), 401, "an encoded name"),
        (
            format!("/walled/x?tok={good}"),
            403,
            "refused before jwt ran (ip_filter)",
        ),
    ];
    for (i, (path, status, what)) in cases.drain(..).enumerate() {
        let id = format!("tok-case-{i}");
        let r = gw.send(Request::get(&path).header("x-request-id", id.clone()));
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let line = gw.access_line(&id);
        assert!(
            !line.contains(&good[20..]) && !line.contains(&other_aud[20..]),
            "{what}: {line}"
        );
    }
    // Accepted: removed from the query the upstream gets.
    let r = gw.get(&format!("/q/x?a=1&tok={good}"));
    assert_eq!((r.status, echoed(&r)["query"].as_str()), (200, Some("a=1")));
    // A cookie token is taken out of Cookie before deciding; the other cookies go on.
    let r = gw.send(Request::get("/c/x").header("cookie", format!("a=1; session={good}; b=2")));
    assert_eq!(r.status, 403);
    // A head the edge refuses (two Host headers) is logged with the token redacted.
    let out = portico::testing::raw(
        &gw.addr,
        format!("GET /q/x?tok={good} HTTP/1.1\r\nhost: a\r\nhost: b\r\nx-request-id: edge-tok\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"));
    let line = wait_for("the edge's access log line", Duration::from_secs(5), || {
        gw.p.stdout_text()
            .lines()
            .find(|l| l.contains("edge-tok"))
            .map(str::to_string)
    });
    assert!(line.contains("/q/x?tok=REDACTED"), "{line}");
    let all = gw.p.stdout_text() + &gw.p.stderr_text();
    assert!(!all.contains(&good[20..]), "a token in the logs");
    assert_eq!(metric(&gw.metrics(), "portico_panics_total", &[]), 0.0);
}

/// Attack-d #4: a token's `sub` (the consumer) cannot forge access-log lines: a newline, quotes
/// and spaces in it are escaped as nginx escapes them, in the combined format.
#[test]
fn a_consumer_cannot_forge_combined_log_lines() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "access_log: {{ format: combined }}\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\nroutes:\n{}",
        up.addr,
        jwt_route("hs", &format!("{{ algorithms: [HS256], secret: '{SECRET}' }}")),
    ));
    let sub = "mallory - [01/Jan/2026:00:00:00 +0000] \"GET /admin/delete-all HTTP/1.1\" 200 0 \"-\" \"forged\"\n6.6.6.6 - root";
    let token = sign(Algorithm::HS256, SECRET, &json!({"sub": sub, "exp": now() + 600}), None);
    let r = gw.send(
        Request::get("/hs/combined")
            .header("authorization", format!("Bearer {token}"))
            .header("x-request-id", "forge-1"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let line = gw.access_line("forge-1");
    let out = gw.p.stdout_text();
    assert!(
        !out.lines()
            .any(|l| l.starts_with("6.6.6.6") || l.contains("/admin/delete-all HTTP/1.1\" 200")),
        "{out}"
    );
    assert!(line.starts_with("127.0.0.1 - mallory\\x20-\\x20[01/Jan/2026"), "{line}");
    assert!(line.contains("\\x0A6.6.6.6\\x20-\\x20root ["), "{line}");
    assert!(line.contains("\"GET /hs/combined HTTP/1.1\" 200 "), "{line}");
}
