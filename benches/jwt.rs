//! The verified-token cache: a repeated RS256/ES256 token should cost about what HS256 costs.
//! `cargo bench --bench jwt`

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portico::plugins::jwt::{Config, Jwt};
use portico::BuildContext;
use std::time::{SystemTime, UNIX_EPOCH};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn plugin(yaml: &str) -> Jwt {
    let mut ctx = BuildContext::standalone();
    ctx.route = Some("bench".into());
    let cfg: Config = ctx.parse(&serde_yaml::from_str(yaml).unwrap()).unwrap();
    Jwt::new(cfg, &ctx).unwrap()
}

fn token(alg: Algorithm, key: EncodingKey) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = serde_json::json!({ "sub": "user-1", "aud": "api", "iss": "bench", "exp": exp, "scope": "a b" });
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap()
}

fn verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pem = |f: &str| std::fs::read(fixture(f)).unwrap();
    let hs_token = token(Algorithm::HS256, EncodingKey::from_secret(SECRET.as_bytes()));
    let rs_token = token(Algorithm::RS256, EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap());
    let es_token = token(Algorithm::ES256, EncodingKey::from_ec_pem(&pem("ec256.key")).unwrap());
    let common = "audience: api, issuer: bench";
    let cases = [
        (
            "HS256, no cache",
            format!("{{ algorithms: [HS256], secret: '{SECRET}', {common}, cache_size: 0 }}"),
            &hs_token,
        ),
        (
            "HS256, cached",
            format!("{{ algorithms: [HS256], secret: '{SECRET}', {common} }}"),
            &hs_token,
        ),
        (
            "RS256, no cache",
            format!(
                "{{ algorithms: [RS256], public_key_file: {}, {common}, cache_size: 0 }}",
                fixture("rsa.pub")
            ),
            &rs_token,
        ),
        (
            "RS256, cached",
            format!(
                "{{ algorithms: [RS256], public_key_file: {}, {common} }}",
                fixture("rsa.pub")
            ),
            &rs_token,
        ),
        (
            "ES256, no cache",
            format!(
                "{{ algorithms: [ES256], public_key_file: {}, {common}, cache_size: 0 }}",
                fixture("ec256.pub")
            ),
            &es_token,
        ),
        (
            "ES256, cached",
            format!(
                "{{ algorithms: [ES256], public_key_file: {}, {common} }}",
                fixture("ec256.pub")
            ),
            &es_token,
        ),
    ];
    let mut group = c.benchmark_group("jwt verify");
    for (name, yaml, token) in cases {
        let p = plugin(&yaml);
        rt.block_on(p.verify(token)).expect("the bench token verifies");
        group.bench_function(name, |b| b.iter(|| rt.block_on(p.verify(token)).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
