//! Verifying a token: from the cache, or fully — the header read by Portico itself, the key
//! chosen by algorithm and `kid`, the signature, then the claims.

use super::cache::Verified;
use super::keys::Keys;
use super::{Jwt, MAX_TOKEN_BYTES};
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::str::FromStr;
use std::sync::Arc;

impl Jwt {
    /// Verify `token`: from the cache, or fully (header checks, key choice, signature, claims).
    pub async fn verify(&self, token: &str) -> Result<Arc<Map<String, Value>>, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("the token is longer than {MAX_TOKEN_BYTES} bytes"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut keys = self.keys.current();
        if let Some(hit) = self.cache.get(&digest, keys.generation) {
            self.check_times(hit.exp, hit.nbf, self.clock.unix_secs())?;
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
                        self.clock.unix_secs(),
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

    /// Claims Portico checks itself (jsonwebtoken's own time checks read the system clock, and
    /// Portico's clock is injected): `exp` and `nbf` with the leeway, `iat` not in the future,
    /// `require`d claims present.
    fn check_claims(&self, claims: &Map<String, Value>) -> Result<(u64, Option<u64>), String> {
        let num = |name: &str, round: Round| -> Result<Option<u64>, String> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => numeric_date(v, round)
                    .map(Some)
                    .ok_or_else(|| format!("the '{name}' claim is not a number")),
            }
        };
        let exp = num("exp", Round::Down)?.ok_or("the token has no 'exp' claim")?;
        let nbf = num("nbf", Round::Up)?;
        let now = self.clock.unix_secs();
        if num("iat", Round::Up)?.is_some_and(|iat| iat > now + self.leeway) {
            return Err("the token was issued in the future".into());
        }
        for r in &self.require {
            if !claims.contains_key(r) {
                return Err(format!("the token has no '{r}' claim"));
            }
        }
        self.check_times(exp, nbf, now)?;
        Ok((exp, nbf))
    }

    fn check_times(&self, exp: u64, nbf: Option<u64>, now: u64) -> Result<(), String> {
        if exp.saturating_add(self.leeway) < now {
            return Err("the token has expired".into());
        }
        if nbf.is_some_and(|n| n > now + self.leeway) {
            return Err("the token is not valid yet".into());
        }
        Ok(())
    }

    pub(super) fn missing_scopes(&self, claims: &Map<String, Value>) -> Vec<&str> {
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

/// Which way a fractional NumericDate goes to whole seconds.
#[derive(Clone, Copy)]
enum Round {
    Down,
    Up,
}

/// A NumericDate (RFC 7519 §2: seconds since the epoch, a fraction allowed) in whole seconds,
/// or `None` when it is not a non-negative finite number below 2^64. The clock ticks in whole
/// seconds, so rounding keeps every comparison exact: `exp` goes down (a token valid until
/// 100.5 is still valid in second 100, not in 101), `nbf` and `iat` go up (a token not valid
/// before 100.5 is not valid in second 100). Integers are read as integers, never through f64.
fn numeric_date(v: &Value, round: Round) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v
        .as_f64()
        .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)?;
    Some(match round {
        Round::Down => f.floor(),
        Round::Up => f.ceil(),
    } as u64)
}

pub(super) fn describe(e: &jsonwebtoken::errors::Error) -> String {
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
