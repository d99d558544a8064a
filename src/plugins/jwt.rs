//! `jwt`: verify a JSON Web Token (RFC 7519) and make its `sub` the consumer.
//!
//! Follows RFC 8725: the algorithms a key may verify are pinned by the key's own type and the
//! configured list (so `alg: none` and HS/RS key confusion never pass); `jwk`/`jku`/`x5u`/`x5c`
//! in a token's header are ignored; an unknown `crit` is refused; `exp` is required and `nbf`
//! and `iat` are checked; tokens over 8 KiB are refused before any decoding.
//!
//! Verified tokens are cached per plugin instance (so a token accepted for one route's audience
//! is still checked against another route's), keyed by the token's SHA-256: a repeated RS256 or
//! ES256 token then costs about what HS256 costs. Time claims are re-checked on every hit;
//! entries go when they expire and whenever the key set changes.

use crate::config::units::Dur;
use crate::config::ConfigError;
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use base64::Engine;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use once_cell::sync::Lazy;
use pingora::http::RequestHeader;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// The claims of a verified token, for later plugins (`allow_services` with `from: jwt:CLAIM`).
#[derive(Debug, Clone)]
pub struct JwtClaims(pub Arc<Map<String, Value>>);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Keys

/// A verification key and the algorithms its type allows.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algs: Vec<Algorithm>,
}

struct KeySet {
    keys: Vec<Key>,
    /// Changes whenever the set changes, so cached verdicts of the old set are dropped.
    generation: u64,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

impl KeySet {
    fn new(keys: Vec<Key>) -> Self {
        KeySet {
            keys,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Keys that may verify `alg` (and carry `kid`, when the token names one).
    fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<&Key> {
        self.keys
            .iter()
            .filter(|k| k.algs.contains(&alg))
            // A key without an id (a configured secret or PEM key) answers to any `kid`.
            .filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            .take(8)
            .collect()
    }
}

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The key from a PEM file: RSA, EC or Ed25519, with the algorithms its type allows.
fn pem_key(pem: &[u8]) -> Result<Key, String> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(Key {
            kid: None,
            key,
            algs: RSA.to_vec(),
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok(Key {
            kid: None,
            key,
            algs: vec![Algorithm::ES256, Algorithm::ES384],
        });
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok(Key {
            kid: None,
            key,
            algs: vec![Algorithm::EdDSA],
        });
    }
    Err("not a PEM public key (RSA, EC or Ed25519)".into())
}

/// Keys from a JWKS document. Keys for encryption, or of kinds Portico cannot verify, are
/// skipped; a key's `alg`, when given, narrows what it may verify.
fn jwks_keys(text: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let family: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA.to_vec(),
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
            // Shared secrets do not belong in a published key set.
            AlgorithmParameters::OctetKey(_) => continue,
        };
        let algs = match jwk
            .common
            .key_algorithm
            .and_then(|a| Algorithm::from_str(&a.to_string()).ok())
        {
            Some(a) if family.contains(&a) => vec![a],
            Some(_) => continue,
            None => family,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            key,
            algs,
        });
    }
    Ok(keys)
}

/// A JWKS fetched from a URL, refreshed in the background and on an unknown `kid`. Shared by
/// every plugin (and every reload) that names the same URL and refresh interval.
struct RemoteJwks {
    url: String,
    refresh: Duration,
    set: ArcSwap<KeySet>,
    last_attempt: Mutex<Option<Instant>>,
    last_success: Mutex<Option<Instant>>,
    refreshing: AtomicBool,
}

/// Live remote key sets by (URL, refresh interval).
type RemoteRegistry = Mutex<HashMap<(String, Duration), Weak<RemoteJwks>>>;
static REMOTE: Lazy<RemoteRegistry> = Lazy::new(Default::default);

fn fetch(url: &str) -> Result<Vec<Key>, String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let resp = agent.get(url).call().map_err(|e| format!("fetching {url}: {e}"))?;
    let mut body = Vec::new();
    use std::io::Read;
    resp.into_reader()
        .take(1 << 20)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading {url}: {e}"))?;
    jwks_keys(&body)
}

impl RemoteJwks {
    fn get(url: &str, refresh: Duration) -> Arc<RemoteJwks> {
        let mut map = REMOTE.lock().unwrap();
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(existing) = map.get(&(url.to_string(), refresh)).and_then(Weak::upgrade) {
            return existing;
        }
        let remote = Arc::new(RemoteJwks {
            url: url.to_string(),
            refresh,
            set: ArcSwap::from_pointee(KeySet::new(Vec::new())),
            last_attempt: Mutex::new(None),
            last_success: Mutex::new(None),
            refreshing: AtomicBool::new(false),
        });
        remote.refresh_blocking();
        map.insert((url.to_string(), refresh), Arc::downgrade(&remote));
        remote
    }

    /// Fetch now; a failure keeps the last good set.
    fn refresh_blocking(&self) {
        *self.last_attempt.lock().unwrap() = Some(Instant::now());
        match fetch(&self.url) {
            Ok(keys) => {
                let n = keys.len();
                self.set.store(Arc::new(KeySet::new(keys)));
                *self.last_success.lock().unwrap() = Some(Instant::now());
                log::info!("jwt: loaded {n} key(s) from {}", self.url);
            }
            Err(e) => log::error!("jwt: key set refresh failed, keeping the last good set: {e}"),
        }
    }

    async fn refresh(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(6),
            tokio::task::spawn_blocking(move || me.refresh_blocking()),
        )
        .await;
        self.refreshing.store(false, Ordering::Release);
    }

    /// Start a background refresh when the set is older than the refresh interval.
    fn refresh_if_stale(self: &Arc<Self>) {
        let stale = self
            .last_success
            .lock()
            .unwrap()
            .is_none_or(|t| t.elapsed() >= self.refresh)
            && self
                .last_attempt
                .lock()
                .unwrap()
                .is_none_or(|t| t.elapsed() >= self.refresh / 10);
        if stale && !self.refreshing.load(Ordering::Acquire) {
            let me = self.clone();
            tokio::spawn(async move { me.refresh().await });
        }
    }

    /// An unknown `kid` may mean the issuer rotated its keys: refetch, at most once per
    /// `refresh / 10`, and wait for it.
    async fn refresh_for_unknown_kid(self: &Arc<Self>) -> bool {
        let min_gap = (self.refresh / 10).max(Duration::from_secs(1));
        let allowed = self.last_attempt.lock().unwrap().is_none_or(|t| t.elapsed() >= min_gap);
        if allowed {
            self.refresh().await;
        }
        allowed
    }
}

enum Keys {
    Static(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

impl Keys {
    fn current(&self) -> Arc<KeySet> {
        match self {
            Keys::Static(s) => s.clone(),
            Keys::Remote(r) => {
                r.refresh_if_stale();
                r.set.load_full()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The verified-token cache

struct Verified {
    claims: Arc<Map<String, Value>>,
    exp: u64,
    nbf: Option<u64>,
    generation: u64,
}

struct TokenCache {
    map: Mutex<HashMap<[u8; 32], Arc<Verified>>>,
    capacity: usize,
}

impl TokenCache {
    fn get(&self, digest: &[u8; 32], generation: u64) -> Option<Arc<Verified>> {
        if self.capacity == 0 {
            return None;
        }
        let hit = self.map.lock().unwrap().get(digest).cloned()?;
        (hit.generation == generation).then_some(hit)
    }

    fn put(&self, digest: [u8; 32], v: Verified, leeway: u64) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap();
        if map.len() >= self.capacity {
            let now = now_secs();
            map.retain(|_, e| e.exp + leeway >= now);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(digest, Arc::new(v));
    }
}

// ---------------------------------------------------------------------------------------------
// The plugin

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
            if refresh < Duration::from_secs(1) {
                return Err(cfg_err("jwks_refresh", "must be at least 1s"));
            }
            if ctx.offline {
                Keys::Static(Arc::new(KeySet::new(Vec::new())))
            } else {
                Keys::Remote(RemoteJwks::get(&url, refresh))
            }
        };
        if cfg.jwks_refresh.is_some() && cfg.jwks_url.is_none() {
            return Err(cfg_err("jwks_refresh", "only applies with jwks_url"));
        }
        let leeway = cfg.leeway.map(|d| d.0.as_secs()).unwrap_or(30);
        let mut required: Vec<String> = vec!["exp".into()];
        let mut validations = HashMap::new();
        for a in &algorithms {
            let mut v = Validation::new(*a);
            v.leeway = leeway;
            v.validate_nbf = true;
            v.validate_exp = true;
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
        })
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
            TokenSource::Query(q) => crate::util::query_param(&req.uri, q).ok_or("no token in the request"),
        }
    }

    /// Verify `token`: from the cache, or fully (header checks, key choice, signature, claims).
    pub async fn verify(&self, token: &str) -> Result<Arc<Map<String, Value>>, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("the token is longer than {MAX_TOKEN_BYTES} bytes"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut keys = self.keys.current();
        if let Some(hit) = self.cache.get(&digest, keys.generation) {
            self.check_times(hit.exp, hit.nbf)?;
            return Ok(hit.claims.clone());
        }
        let (alg, kid) = self.check_header(token)?;
        let mut candidates_empty = keys.candidates(alg, kid.as_deref()).is_empty();
        if candidates_empty {
            if let (Keys::Remote(remote), Some(_)) = (&self.keys, &kid) {
                if remote.refresh_for_unknown_kid().await {
                    keys = remote.set.load_full();
                    candidates_empty = keys.candidates(alg, kid.as_deref()).is_empty();
                }
            }
        }
        if candidates_empty {
            return Err(match kid {
                Some(_) => "the token's key id is unknown".into(),
                None => "no key can verify this token".into(),
            });
        }
        let validation = &self.validations[&alg];
        let mut last = String::new();
        for key in keys.candidates(alg, kid.as_deref()) {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let (exp, nbf) = self.check_claims(&claims)?;
                    let claims = Arc::new(claims);
                    self.cache.put(
                        digest,
                        Verified {
                            claims: claims.clone(),
                            exp,
                            nbf,
                            generation: keys.generation,
                        },
                        self.leeway,
                    );
                    return Ok(claims);
                }
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                    last = describe(&e);
                }
                Err(e) => return Err(describe(&e)),
            }
        }
        Err(last)
    }

    /// The header, read by Portico itself: `alg` must be allowed, `crit` is refused, and
    /// key-carrying fields (`jwk`, `jku`, `x5u`, `x5c`) are never used.
    fn check_header(&self, token: &str) -> Result<(Algorithm, Option<String>), String> {
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err("the token is not a signed JWT (three dot-separated parts)".into());
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .map_err(|_| "the token's header is not base64url".to_string())?;
        let header: Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|_| "the token's header is not a JSON object".to_string())?;
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or("the token names no algorithm")?;
        if alg_name.eq_ignore_ascii_case("none") {
            return Err("unsigned tokens (alg none) are never accepted".into());
        }
        let alg = Algorithm::from_str(alg_name).map_err(|_| format!("algorithm '{alg_name}' is not supported"))?;
        if !self.algorithms.contains(&alg) {
            return Err(format!("algorithm {alg:?} is not allowed here"));
        }
        if header.contains_key("crit") {
            return Err("the token requires header extensions ('crit') that are not supported".into());
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) if !k.is_empty() && k.len() <= 256 => Some(k.clone()),
            Some(_) => return Err("the token's key id is malformed".into()),
        };
        Ok((alg, kid))
    }

    /// Claims jsonwebtoken leaves alone: `iat` not in the future, `require`d claims present.
    fn check_claims(&self, claims: &Map<String, Value>) -> Result<(u64, Option<u64>), String> {
        let num = |name: &str| -> Result<Option<u64>, String> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| format!("the '{name}' claim is not a number")),
            }
        };
        let exp = num("exp")?.ok_or("the token has no 'exp' claim")?;
        let nbf = num("nbf")?;
        if num("iat")?.is_some_and(|iat| iat > now_secs() + self.leeway) {
            return Err("the token was issued in the future".into());
        }
        for r in &self.require {
            if !claims.contains_key(r) {
                return Err(format!("the token has no '{r}' claim"));
            }
        }
        self.check_times(exp, nbf)?;
        Ok((exp, nbf))
    }

    fn check_times(&self, exp: u64, nbf: Option<u64>) -> Result<(), String> {
        let now = now_secs();
        if exp.saturating_add(self.leeway) < now {
            return Err("the token has expired".into());
        }
        if nbf.is_some_and(|n| n > now + self.leeway) {
            return Err("the token is not valid yet".into());
        }
        Ok(())
    }

    fn missing_scopes(&self, claims: &Map<String, Value>) -> Vec<&str> {
        let mut granted: Vec<&str> = Vec::new();
        if let Some(Value::String(s)) = claims.get("scope") {
            granted.extend(s.split_whitespace());
        }
        match claims.get("scp") {
            Some(Value::Array(a)) => granted.extend(a.iter().filter_map(Value::as_str)),
            Some(Value::String(s)) => granted.extend(s.split_whitespace()),
            _ => {}
        }
        self.scopes
            .iter()
            .map(String::as_str)
            .filter(|s| !granted.contains(s))
            .collect()
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        InvalidSignature => "the token's signature is not valid".into(),
        ExpiredSignature => "the token has expired".into(),
        ImmatureSignature => "the token is not valid yet".into(),
        InvalidIssuer => "the token's issuer is not accepted".into(),
        InvalidAudience => "the token's audience is not accepted".into(),
        MissingRequiredClaim(c) => format!("the token has no '{c}' claim"),
        InvalidClaimFormat(c) => format!("the token's '{c}' claim is malformed"),
        InvalidAlgorithm => "the token's algorithm does not match its key".into(),
        _ => "the token is malformed".into(),
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

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        // Claim headers are the gateway's to set: a client's own copies never pass.
        for (_, h) in &self.forward {
            req.remove_header(h);
        }
        let token = match self.token(req) {
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
        st.vars.insert(JwtClaims(claims));
        Verdict::Continue
    }
}
