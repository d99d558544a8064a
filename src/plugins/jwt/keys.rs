//! Verification keys: from a shared secret, a PEM file, a JWKS file, or a JWKS URL fetched and
//! refreshed in the background (shared across plugins and reloads through the plugin state).

use crate::plugin::BuildContext;
use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A verification key and the algorithms its type allows.
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) key: DecodingKey,
    pub(super) algs: Vec<Algorithm>,
}

pub(super) struct KeySet {
    pub(super) keys: Vec<Key>,
    /// Changes whenever the set changes, so cached verdicts of the old set are dropped.
    pub(super) generation: u64,
}

impl KeySet {
    pub(super) fn new(keys: Vec<Key>) -> Self {
        KeySet {
            keys,
            // Random, so sets made by different plugins (or processes) never share a number.
            generation: rand::random(),
        }
    }

    /// Keys that may verify `alg` (and carry `kid`, when the token names one).
    pub(super) fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<&Key> {
        self.keys
            .iter()
            .filter(|k| k.algs.contains(&alg))
            // A key without an id (a configured secret or PEM key) answers to any `kid`.
            .filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            .take(8)
            .collect()
    }
}

pub(super) const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
pub(super) const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The key from a PEM file: RSA, EC or Ed25519, with the algorithms its type allows.
pub(super) fn pem_key(pem: &[u8]) -> Result<Key, String> {
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
pub(super) fn jwks_keys(text: &[u8]) -> Result<Vec<Key>, String> {
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

/// A JWKS fetched from a URL, refreshed in the background and on an unknown `kid`. Kept in the
/// process's plugin state under its URL and refresh interval, so every plugin (and every
/// reload) that names them shares one set and one fetch schedule.
pub(super) struct RemoteJwks {
    url: String,
    refresh: Duration,
    pub(super) set: ArcSwap<KeySet>,
    last_attempt: Mutex<Option<Instant>>,
    last_success: Mutex<Option<Instant>>,
    refreshing: AtomicBool,
}

pub(super) fn fetch(url: &str) -> Result<Vec<Key>, String> {
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
    /// The shared set for `url`, fetched now if this is its first use.
    pub(super) fn get(ctx: &BuildContext, url: &str, refresh: Duration) -> Arc<RemoteJwks> {
        let remote = ctx.shared_state(&format!("jwt/jwks/{url}/{}", refresh.as_secs()), || RemoteJwks {
            url: url.to_string(),
            refresh,
            set: ArcSwap::from_pointee(KeySet::new(Vec::new())),
            last_attempt: Mutex::new(None),
            last_success: Mutex::new(None),
            refreshing: AtomicBool::new(false),
        });
        if remote.last_attempt.lock().unwrap().is_none() {
            remote.refresh_blocking();
        }
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
    pub(super) async fn refresh_for_unknown_kid(self: &Arc<Self>) -> bool {
        let min_gap = (self.refresh / 10).max(Duration::from_secs(1));
        let allowed = self.last_attempt.lock().unwrap().is_none_or(|t| t.elapsed() >= min_gap);
        if allowed {
            self.refresh().await;
        }
        allowed
    }
}

pub(super) enum Keys {
    Static(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

impl Keys {
    pub(super) fn current(&self) -> Arc<KeySet> {
        match self {
            Keys::Static(s) => s.clone(),
            Keys::Remote(r) => {
                r.refresh_if_stale();
                r.set.load_full()
            }
        }
    }
}
