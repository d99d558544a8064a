//! Pingora's server settings, listeners and the admin listener, the edge limits, and secrets
//! read from the environment.

use super::socket_addr;
use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::raw::{self, RawConfig};
use crate::config::snapshot::Limits;
use crate::config::units::bounded;
use crate::tls::ServerTlsConfig;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

/// Portico's defaults for Pingora's server settings, where Pingora's own are not safe.
fn server_defaults() -> Vec<(&'static str, serde_yaml::Value)> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64;
    vec![
        ("threads", threads.into()),
        ("grace_period_seconds", 5u64.into()),
        ("graceful_shutdown_timeout_seconds", 5u64.into()),
        ("pid_file", "/tmp/portico.pid".into()),
        ("upgrade_sock", "/tmp/portico_upgrade.sock".into()),
        // Timeouts of a second or more on Tokio's timer wheel (sharded per worker in current
        // Tokio) rather than Pingora's "fast" timers, which read the clock and take a lock on
        // every timed read or write, armed or not: about 1.2k instructions and 7 clock reads
        // less per proxied request (bench/README.md).
        ("fast_timeout_to_tokio_threshold_seconds", 0u64.into()),
    ]
}

/// A secret from the environment: set and not empty, or an error saying which variable.
pub fn env_secret(var: &str) -> Result<String, String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("environment variable '{var}' is not set"))
}

/// A value given inline or through an environment variable (`NAME` or `NAME_env`).
pub(super) fn secret(
    loc: &str,
    inline: Option<&str>,
    env: Option<&str>,
    field: &str,
    errs: &mut ConfigErrors,
) -> Option<String> {
    match (inline, env) {
        (Some(_), Some(_)) => {
            errs.push(loc, format!("give either '{field}' or '{field}_env', not both"));
            None
        }
        (Some(v), None) => Some(v.to_string()),
        (None, Some(var)) => match env_secret(var) {
            Ok(v) => Some(v),
            Err(e) => {
                errs.push(format!("{loc}.{field}_env"), e);
                None
            }
        },
        (None, None) => {
            errs.push(loc, format!("'{field}' (or '{field}_env') is required"));
            None
        }
    }
}

/// `server:` is passed to Pingora, but only keys Pingora knows: a typo is an error, not a
/// silently ignored setting.
pub(super) fn check_server(server: &serde_yaml::Mapping, errs: &mut ConfigErrors) -> serde_yaml::Mapping {
    let known = serde_yaml::to_value(pingora::server::configuration::ServerConf::default())
        .ok()
        .and_then(|v| v.as_mapping().cloned())
        .unwrap_or_default();
    let mut out = serde_yaml::Mapping::new();
    for (k, v) in server {
        let key = k.as_str().unwrap_or_default();
        if !known.contains_key(k) {
            let mut names: Vec<&str> = known.keys().filter_map(|k| k.as_str()).collect();
            names.sort();
            errs.push(
                "server",
                format!(
                    "unknown field '{key}', expected one of Pingora's server settings: {}",
                    names.join(", ")
                ),
            );
            continue;
        }
        if key == "daemon" {
            errs.push("server.daemon", "use the -d flag to daemonize");
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    for (k, v) in server_defaults() {
        if !out.contains_key(k) {
            out.insert(k.into(), v);
        }
    }
    if let Err(e) =
        serde_yaml::from_value::<pingora::server::configuration::ServerConf>(serde_yaml::Value::Mapping(out.clone()))
    {
        errs.0.push(ConfigError::from_yaml("server", &e));
    }
    out
}

pub(super) fn check_limits(l: &raw::Limits, errs: &mut ConfigErrors) -> Limits {
    if l.max_request_header_bytes.0 < 1024 || l.max_request_header_bytes.0 > 1 << 20 {
        errs.push(
            "limits.max_request_header_bytes",
            "must be between 1KiB and 1MiB (Pingora's own ceiling)",
        );
    }
    if l.max_request_body_bytes.0 > MAX_BODY_BYTES {
        errs.push("limits.max_request_body_bytes", "must be at most 1TiB");
    }
    if l.keepalive_requests == 0 {
        errs.push("limits.keepalive_requests", "must be at least 1");
    }
    // Every deadline is computed as `now + d`: each key has a sane ceiling, far from overflow.
    let (min, hour, day) = (
        Duration::from_millis(100),
        Duration::from_secs(3600),
        Duration::from_secs(86400),
    );
    for (field, d, max) in [
        ("header_timeout", l.header_timeout.0, hour),
        ("body_timeout", l.body_timeout.0, hour),
        ("send_timeout", l.send_timeout.0, hour),
        ("h2_idle_timeout", l.h2_idle_timeout.0, day),
    ] {
        if let Err(m) = bounded(d, min, max) {
            errs.push(format!("limits.{field}"), m);
        }
    }
    Limits {
        max_request_header_bytes: l.max_request_header_bytes.0 as usize,
        max_request_body_bytes: l.max_request_body_bytes.0,
        header_timeout: l.header_timeout.0,
        max_connections_per_ip: l.max_connections_per_ip,
        keepalive_requests: l.keepalive_requests,
        body_timeout: l.body_timeout.0,
        h2_idle_timeout: l.h2_idle_timeout.0,
        send_timeout: l.send_timeout.0,
    }
}

/// The largest request body a limit may allow (`limits.` and per route).
pub(super) const MAX_BODY_BYTES: u64 = 1 << 40;

/// Listener addresses: well-formed, not repeated; the admin listener on a port of its own.
/// TLS blocks are loaded (certificates, keys and client CA read and checked) and returned by
/// listener address.
pub(super) fn check_listeners(
    raw: &RawConfig,
    broken: bool,
    base_dir: &Path,
    errs: &mut ConfigErrors,
) -> HashMap<String, ServerTlsConfig> {
    let mut tls = HashMap::new();
    // A listener that did not parse is already reported: no "none at all" on top of it.
    if raw.listeners.is_empty() && !broken {
        errs.push("listeners", "at least one listener is needed");
    }
    let mut seen = HashSet::new();
    for (i, l) in &raw.listeners {
        let loc = format!("listeners[{i}].address");
        match socket_addr(&l.address) {
            Some(a) if !seen.insert(a) => errs.push(loc, format!("'{}' is listed twice", l.address)),
            Some(_) => {}
            None => errs.push(loc, format!("'{}' is not ip:port (e.g. 0.0.0.0:8080)", l.address)),
        }
        if let Some(block) = &l.tls {
            match ServerTlsConfig::load(base_dir, block) {
                Ok(config) => {
                    tls.insert(l.address.clone(), config);
                }
                Err(list) => {
                    for e in list {
                        errs.0.push(e.under(&format!("listeners[{i}].tls")));
                    }
                }
            }
        }
    }
    if let Some(a) = &raw.admin {
        match socket_addr(&a.address) {
            Some(addr) if seen.contains(&addr) => errs.push(
                "admin.address",
                "the admin listener must not share a port with proxied traffic",
            ),
            Some(_) => {}
            None => errs.push("admin.address", format!("'{}' is not ip:port", a.address)),
        }
    }
    tls
}

/// The token admin POSTs need (`admin.token` / `token_env`), if one is set.
pub(super) fn admin_token(raw: &RawConfig, errs: &mut ConfigErrors) -> Option<String> {
    let a = raw.admin.as_ref()?;
    if a.token.is_none() && a.token_env.is_none() {
        return None;
    }
    let t = secret("admin", a.token.as_deref(), a.token_env.as_deref(), "token", errs)?;
    if t.len() < 16 {
        errs.push("admin.token", "an admin token needs at least 16 characters");
    }
    Some(t)
}
