//! `jwt`: verify a JSON Web Token (RFC 7519) and make its `sub` the consumer.
//!
//! Follows RFC 8725: the algorithms a key may verify are pinned by the key's own type and the
//! configured list (so `alg: none` and HS/RS key confusion never pass); `jwk`/`jku`/`x5u`/`x5c`
//! in a token's header are ignored; an unknown `crit` is refused; `exp` is required and `nbf`
//! and `iat` are checked; tokens over 8 KiB are refused before any decoding.
//!
//! Verified tokens are cached per plugin instance (`cache.rs`): a repeated RS256 or ES256 token
//! then costs about what HS256 costs. Keys and JWKS are in `keys.rs`, verification and claim
//! checks in `verify.rs`. Time is the process's injected clock.
//!
//! (Over 500 lines because of its unit tests, kept beside the code they pin down.)

mod cache;
mod keys;
mod verify;

use crate::clock::Clock;
use crate::config::units::{bounded, Dur};
use crate::config::ConfigError;
use crate::plugin::{BuildContext, Claims, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use cache::TokenCache;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use keys::{jwks_keys, pem_key, Key, KeySet, Keys, RemoteJwks, HMAC, RSA};
use pingora::http::RequestHeader;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Tokens longer than this are refused before decoding.
pub const MAX_TOKEN_BYTES: usize = 8192;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub public_key_file: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<String>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_refresh: Option<Dur>,
    #[serde(default)]
    pub issuer: Option<OneOrMany>,
    #[serde(default)]
    pub audience: Option<OneOrMany>,
    #[serde(default)]
    pub leeway: Option<Dur>,
    #[serde(default)]
    pub require: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Verified tokens kept in the cache (0 turns the cache off). Default 10000.
    #[serde(default)]
    pub cache_size: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

enum TokenSource {
    /// `Authorization: Bearer …` (or another header, bearer prefix optional).
    Header(HeaderName),
    Cookie(String),
    Query(String),
}

pub struct Jwt {
    algorithms: Vec<Algorithm>,
    keys: Keys,
    validations: HashMap<Algorithm, Validation>,
    leeway: u64,
    require: Vec<String>,
    scopes: Vec<String>,
    from: TokenSource,
    forward: Vec<(String, HeaderName)>,
    cache: TokenCache,
    clock: Arc<dyn Clock>,
}

fn cfg_err(loc: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::new(loc, msg)
}

impl Jwt {
    pub fn new(cfg: Config, ctx: &BuildContext) -> Result<Self, ConfigError> {
        let names = cfg.algorithms.clone().unwrap_or_else(|| vec!["RS256".into()]);
        if names.is_empty() {
            return Err(cfg_err("algorithms", "list at least one algorithm"));
        }
        let mut algorithms = Vec::new();
        for (i, n) in names.iter().enumerate() {
            match Algorithm::from_str(n) {
                Ok(a) => algorithms.push(a),
                Err(_) => {
                    return Err(cfg_err(
                        &format!("algorithms[{i}]"),
                        format!("unknown algorithm '{n}' (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA; 'none' is never allowed)"),
                    ))
                }
            }
        }
        let sources = [
            &cfg.secret,
            &cfg.secret_env,
            &cfg.public_key_file,
            &cfg.jwks_file,
            &cfg.jwks_url,
        ]
        .iter()
        .filter(|s| s.is_some())
        .count();
        if sources != 1 {
            return Err(cfg_err(
                "",
                "give exactly one key source: secret, secret_env, public_key_file, jwks_file or jwks_url",
            ));
        }
        let need_family = |family: &[Algorithm], what: &str| -> Result<(), ConfigError> {
            for (i, a) in algorithms.iter().enumerate() {
                if !family.contains(a) {
                    return Err(cfg_err(
                        &format!("algorithms[{i}]"),
                        format!("{a:?} cannot be verified with {what}"),
                    ));
                }
            }
            Ok(())
        };
        let keys = if cfg.secret.is_some() || cfg.secret_env.is_some() {
            let secret = match (&cfg.secret, &cfg.secret_env) {
                (Some(s), _) => s.clone(),
                (_, Some(var)) => crate::config::env_secret(var).map_err(|e| cfg_err("secret_env", e))?,
                _ => unreachable!(),
            };
            need_family(&HMAC, "a shared secret")?;
            if secret.len() < 32 {
                return Err(cfg_err(
                    "secret",
                    format!("too short ({} bytes): an HMAC secret needs at least 32", secret.len()),
                ));
            }
            Keys::Static(Arc::new(KeySet::new(vec![Key {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                algs: HMAC.to_vec(),
            }])))
        } else if let Some(file) = &cfg.public_key_file {
            let pem = ctx.read_file(file).map_err(|e| cfg_err("public_key_file", e))?;
            let key = pem_key(&pem).map_err(|e| cfg_err("public_key_file", format!("'{file}': {e}")))?;
            let what = match key.algs[0] {
                Algorithm::EdDSA => "an Ed25519 key",
                Algorithm::ES256 => "an EC key",
                _ => "an RSA key",
            };
            need_family(&key.algs, what)?;
            Keys::Static(Arc::new(KeySet::new(vec![key])))
        } else if let Some(file) = &cfg.jwks_file {
            let text = ctx.read_file(file).map_err(|e| cfg_err("jwks_file", e))?;
            let keys = jwks_keys(&text).map_err(|e| cfg_err("jwks_file", format!("'{file}': {e}")))?;
            if keys.is_empty() {
                return Err(cfg_err("jwks_file", format!("'{file}' holds no usable signing key")));
            }
            need_family(
                &[&RSA[..], &[Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA]].concat(),
                "a public key set",
            )?;
            Keys::Static(Arc::new(KeySet::new(keys)))
        } else {
            let url = cfg.jwks_url.clone().unwrap_or_default();
            let parsed: Result<http::Uri, _> = url.parse();
            let ok = parsed
                .as_ref()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                return Err(cfg_err("jwks_url", format!("'{url}' is not an http(s) URL")));
            }
            need_family(
                &[&RSA[..], &[Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA]].concat(),
                "a public key set",
            )?;
            let refresh = cfg.jwks_refresh.map(|d| d.0).unwrap_or(Duration::from_secs(300));
            if let Err(m) = bounded(refresh, Duration::from_secs(1), Duration::from_secs(86400)) {
                return Err(cfg_err("jwks_refresh", m));
            }
            if ctx.offline {
                Keys::Static(Arc::new(KeySet::new(Vec::new())))
            } else {
                Keys::Remote(RemoteJwks::get(ctx, &url, refresh))
            }
        };
        if cfg.jwks_refresh.is_some() && cfg.jwks_url.is_none() {
            return Err(cfg_err("jwks_refresh", "only applies with jwks_url"));
        }
        if let Some(Err(m)) = cfg
            .leeway
            .map(|d| bounded(d.0, Duration::ZERO, Duration::from_secs(3600)))
        {
            return Err(cfg_err("leeway", m));
        }
        let leeway = cfg.leeway.map(|d| d.0.as_secs()).unwrap_or(30);
        // `exp` is required and checked by Portico itself (check_claims): jsonwebtoken reads
        // time claims as integers only (not fractions, and not at all with serde_json's
        // arbitrary_precision).
        let mut required: Vec<String> = Vec::new();
        let mut validations = HashMap::new();
        for a in &algorithms {
            let mut v = Validation::new(*a);
            v.leeway = leeway;
            // Time claims are checked against Portico's clock (check_claims), not the system's.
            v.validate_nbf = false;
            v.validate_exp = false;
            if let Some(iss) = &cfg.issuer {
                v.set_issuer(&iss.list());
                required.push("iss".into());
            }
            match &cfg.audience {
                Some(aud) => {
                    v.set_audience(&aud.list());
                    required.push("aud".into());
                }
                None => v.validate_aud = false,
            }
            required.dedup();
            v.set_required_spec_claims(&required);
            validations.insert(*a, v);
        }
        let from = match cfg.from.as_deref().unwrap_or("header:authorization").split_once(':') {
            Some(("header", h)) => TokenSource::Header(crate::util::header_name(h).map_err(|e| cfg_err("from", e))?),
            Some(("cookie", c)) if !c.is_empty() => TokenSource::Cookie(c.to_string()),
            Some(("query", q)) if !q.is_empty() => TokenSource::Query(q.to_string()),
            _ => return Err(cfg_err("from", "use header:NAME, cookie:NAME or query:NAME")),
        };
        let mut forward = Vec::new();
        for (claim, header) in &cfg.forward_claims {
            let h = crate::util::header_name(header).map_err(|e| cfg_err(&format!("forward_claims.{claim}"), e))?;
            forward.push((claim.clone(), h));
        }
        Ok(Jwt {
            algorithms,
            keys,
            validations,
            leeway,
            require: cfg.require,
            scopes: cfg.scopes,
            from,
            forward,
            cache: TokenCache {
                map: Mutex::new(HashMap::new()),
                capacity: cfg.cache_size.unwrap_or(10_000),
            },
            clock: ctx.clock(),
        })
    }

    /// The token, taken out of the request first when it sits in the query or a cookie: a
    /// credential goes neither upstream nor into the access log, whatever the verdict (as
    /// api_key does with its key).
    fn take_token(&self, req: &mut RequestHeader) -> Result<String, &'static str> {
        let token = self.token(req);
        match &self.from {
            TokenSource::Query(q) => {
                if let Some(uri) = crate::util::without_query_param(&req.uri, q) {
                    req.set_uri(uri);
                }
            }
            TokenSource::Cookie(c) => {
                if crate::util::cookie(&req.headers, c).is_some() {
                    crate::util::remove_cookie(req, c);
                }
            }
            TokenSource::Header(_) => {}
        }
        token
    }

    fn token(&self, req: &RequestHeader) -> Result<String, &'static str> {
        match &self.from {
            TokenSource::Header(h) => {
                let mut values = req.headers.get_all(h).iter();
                let v = values.next().ok_or("no token in the request")?;
                if values.next().is_some() {
                    return Err("more than one credential header");
                }
                let v = v.to_str().map_err(|_| "the credential header is not valid")?.trim();
                let token = match v.split_once(' ') {
                    Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
                    Some(_) => return Err("the credentials are not a Bearer token"),
                    None if *h == http::header::AUTHORIZATION => return Err("the credentials are not a Bearer token"),
                    None => v,
                };
                Ok(token.to_string())
            }
            TokenSource::Cookie(c) => crate::util::cookie(&req.headers, c)
                .map(str::to_string)
                .ok_or("no token in the request"),
            TokenSource::Query(q) => {
                if crate::util::query_params(&req.uri, q) > 1 {
                    return Err("more than one token in the query");
                }
                crate::util::query_param(&req.uri, q).ok_or("no token in the request")
            }
        }
    }
}

fn invalid(message: impl Into<String>) -> Verdict {
    Verdict::Respond(
        Reply::error(401, "invalid_token", message).with_header("www-authenticate", "Bearer error=\"invalid_token\""),
    )
}

fn claim_header_value(v: &Value) -> Option<HeaderValue> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    HeaderValue::from_str(&text).ok()
}

#[async_trait]
impl Plugin for Jwt {
    fn kind(&self) -> PluginKind {
        PluginKind::Authenticate
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn credential_query_params(&self) -> Vec<String> {
        match &self.from {
            TokenSource::Query(q) => vec![q.clone()],
            _ => Vec::new(),
        }
    }

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        // Claim headers are the gateway's to set: a client's own copies never pass.
        for (_, h) in &self.forward {
            req.remove_header(h);
        }
        let token = match self.take_token(req) {
            Ok(t) => t,
            Err(why) => return invalid(why),
        };
        let claims = match self.verify(&token).await {
            Ok(c) => c,
            Err(why) => return invalid(why),
        };
        let missing = self.missing_scopes(&claims);
        if !missing.is_empty() {
            let scope = self.scopes.join(" ");
            return Verdict::Respond(
                Reply::error(
                    403,
                    "insufficient_scope",
                    format!("the token lacks the scope(s): {}", missing.join(", ")),
                )
                .with_header(
                    "www-authenticate",
                    format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\""),
                ),
            );
        }
        if let Some(sub) = claims.get("sub").and_then(Value::as_str) {
            st.consumer = Some(sub.to_string());
        }
        for (claim, h) in &self.forward {
            if let Some(v) = claims.get(claim).and_then(claim_header_value) {
                let _ = req.insert_header(h.clone(), v);
            }
        }
        st.vars.insert(Claims(claims));
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::resources::Resources;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef-unit-secret";
    const T0: u64 = 1_800_000_000;

    fn plugin(clock: Arc<ManualClock>) -> Jwt {
        let ctx = BuildContext::with_resources(Resources::with_clock(clock));
        let cfg: Config = ctx
            .parse(&serde_yaml::from_str(&format!("{{algorithms: [HS256], secret: '{SECRET}', leeway: 30s}}")).unwrap())
            .unwrap();
        Jwt::new(cfg, &ctx).unwrap()
    }

    fn token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn expiry_follows_the_injected_clock_even_for_cached_tokens() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(T0)));
        let jwt = plugin(clock.clone());
        let t = token(serde_json::json!({"sub": "a", "exp": T0 + 60}));
        assert!(run(jwt.verify(&t)).is_ok(), "valid now");
        clock.advance(Duration::from_secs(89));
        assert!(run(jwt.verify(&t)).is_ok(), "within the 30 s leeway (cached)");
        clock.advance(Duration::from_secs(2));
        assert_eq!(run(jwt.verify(&t)).unwrap_err(), "the token has expired");
    }

    #[test]
    fn not_before_and_issued_at_follow_the_injected_clock() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(T0)));
        let jwt = plugin(clock.clone());
        let later = token(serde_json::json!({"sub": "a", "exp": T0 + 3600, "nbf": T0 + 100}));
        assert_eq!(run(jwt.verify(&later)).unwrap_err(), "the token is not valid yet");
        clock.advance(Duration::from_secs(80));
        assert!(run(jwt.verify(&later)).is_ok(), "nbf within the leeway");
        let future = token(serde_json::json!({"sub": "a", "exp": T0 + 3600, "iat": T0 + 1000}));
        assert_eq!(
            run(jwt.verify(&future)).unwrap_err(),
            "the token was issued in the future"
        );
        // A token expired by the system clock's standards but valid by the injected one passes:
        // nothing reads the system time.
        let old = Arc::new(ManualClock::new(Duration::from_secs(1_000_000)));
        let jwt = plugin(old);
        let t = token(serde_json::json!({"sub": "a", "exp": 1_000_060}));
        assert!(run(jwt.verify(&t)).is_ok());
    }

    #[test]
    fn fractional_numeric_dates_are_rounded_against_the_whole_second_clock() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(T0)));
        let jwt = plugin(clock.clone());
        // exp T0 + 60.5 with a 30 s leeway: valid through second T0 + 90, expired at T0 + 91.
        let t = token(serde_json::json!({"sub": "a", "exp": T0 as f64 + 60.5, "iat": T0 as f64 + 0.25}));
        assert!(
            run(jwt.verify(&t)).is_ok(),
            "fractional exp and iat: {:?}",
            run(jwt.verify(&t))
        );
        clock.advance(Duration::from_secs(90));
        assert!(run(jwt.verify(&t)).is_ok(), "second T0 + 90 is before T0 + 90.5");
        clock.advance(Duration::from_secs(1));
        assert_eq!(run(jwt.verify(&t)).unwrap_err(), "the token has expired");

        // nbf T0 + 100.5 with a 30 s leeway: not valid in second T0 + 70, valid from T0 + 71.
        let clock = Arc::new(ManualClock::new(Duration::from_secs(T0 + 70)));
        let jwt = plugin(clock.clone());
        let t = token(serde_json::json!({"sub": "a", "exp": T0 + 3600, "nbf": T0 as f64 + 100.5}));
        assert_eq!(run(jwt.verify(&t)).unwrap_err(), "the token is not valid yet");
        clock.advance(Duration::from_secs(1));
        assert!(run(jwt.verify(&t)).is_ok());
        // In second T0 + 71 (leeway 30), iat T0 + 101.5 is in the future; T0 + 100.5 is not.
        let t = token(serde_json::json!({"sub": "a", "exp": T0 + 3600, "iat": T0 as f64 + 101.5}));
        assert_eq!(run(jwt.verify(&t)).unwrap_err(), "the token was issued in the future");
        let t = token(serde_json::json!({"sub": "a", "exp": T0 + 3600, "iat": T0 as f64 + 100.5}));
        assert!(run(jwt.verify(&t)).is_ok());

        for bad in [
            serde_json::json!(-0.5),
            serde_json::json!(1e300),
            serde_json::json!("1.5"),
        ] {
            let t = token(serde_json::json!({"sub": "a", "exp": bad}));
            assert_eq!(
                run(jwt.verify(&t)).unwrap_err(),
                "the 'exp' claim is not a number",
                "{bad}"
            );
        }
    }
}
