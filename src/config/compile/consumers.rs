//! `consumers`: the identities the gateway knows, and their API keys (kept as SHA-256 only).

use crate::config::error::ConfigErrors;
use crate::config::raw;
use crate::config::snapshot::Consumers;
use sha2::{Digest, Sha256};

pub(super) fn compile_consumers(list: &[(usize, raw::Consumer)], errs: &mut ConfigErrors) -> Consumers {
    let mut c = Consumers::default();
    for (i, con) in list {
        let loc = format!("consumers[{i}]");
        if con.name.trim().is_empty() {
            errs.push(format!("{loc}.name"), "a consumer needs a name");
        } else if c.names.contains(&con.name) {
            errs.push(format!("{loc}.name"), format!("duplicate consumer '{}'", con.name));
        }
        c.names.push(con.name.clone());
        let mut keys: Vec<[u8; 32]> = con
            .api_keys
            .iter()
            .map(|k| Sha256::digest(k.as_bytes()).into())
            .collect();
        if let Some(var) = &con.api_keys_env {
            match std::env::var(var) {
                Ok(v) => keys.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(|k| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() }),
                ),
                Err(_) => errs.push(
                    format!("{loc}.api_keys_env"),
                    format!("environment variable '{var}' is not set"),
                ),
            }
        }
        for (j, h) in con.api_key_sha256.iter().enumerate() {
            match hex::decode(h.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                Some(d) => keys.push(d),
                None => errs.push(
                    format!("{loc}.api_key_sha256[{j}]"),
                    "must be 64 hex digits (a SHA-256)",
                ),
            }
        }
        for k in keys {
            if let Some(other) = c.by_key_sha256.insert(k, con.name.clone()) {
                errs.push(
                    loc.to_string(),
                    format!("an API key of '{}' is also a key of '{other}'", con.name),
                );
            }
        }
    }
    c
}
