//! Raw config → [`Snapshot`]: validation, name resolution, DNS, plugin construction.

use super::error::{ConfigError, ConfigErrors};
use super::raw::{self, Balance, CheckKind, Protocol, RawConfig};
use crate::plugin::{BuildContext, Chains, Entry, PluginKind, Registry};
use crate::route::{HostPattern, Matcher, PathMatch};
use crate::trace::TraceConfig;
use crate::upstream::{
    Endpoint, HashOn, HealthCheckSpec, HealthRegistry, PassiveSpec, RetryPolicy, Timeouts, Upstream,
};
use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The live, immutable config. Requests hold one `Arc<Snapshot>` from start to end, so a reload
/// never shows them half of a change.
pub struct Snapshot {
    pub routes: Vec<Arc<Route>>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Global plugins alone: the chain for requests that match no route.
    pub global: Chains,
    pub client_ip: ClientIpResolver,
    pub limits: Limits,
    pub trace: TraceConfig,
    pub access_log: Option<raw::LogFormat>,
    pub consumers: Arc<Consumers>,
    pub listeners: Vec<raw::Listener>,
    pub admin: Option<raw::Admin>,
    /// The admin token POST endpoints require (`admin.token` / `token_env`); applied by reloads.
    pub admin_token: Option<String>,
    /// Pingora's server settings as written (validated), with Portico's defaults filled in.
    pub server: serde_yaml::Mapping,
    pub redis_url: Option<String>,
    pub meta: Meta,
}

#[derive(Debug, Clone)]
pub struct Meta {
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex.
    pub hash: String,
    pub loaded_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_header_bytes: usize,
    pub max_request_body_bytes: u64,
    pub header_timeout: Duration,
    pub max_connections_per_ip: u32,
    pub keepalive_requests: u32,
    /// A request body that makes no progress for this long is cut (408 when nothing was sent).
    pub body_timeout: Duration,
    /// An HTTP/2 connection with no open stream for this long is closed.
    pub h2_idle_timeout: Duration,
}

/// Consumers known to the gateway, looked up by the SHA-256 of an API key.
#[derive(Debug, Default)]
pub struct Consumers {
    pub names: Vec<String>,
    pub by_key_sha256: HashMap<[u8; 32], String>,
}

impl Consumers {
    /// The consumer owning `key`. The key is hashed first, so the lookup's timing says nothing
    /// about how close a guess was.
    pub fn by_key(&self, key: &[u8]) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        self.by_key_sha256.get(&digest).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
}

impl Rewrite {
    pub fn apply(&self, path: &str) -> String {
        let mut rest = path;
        if let Some(p) = &self.strip_prefix {
            if let Some(r) = path.strip_prefix(p.as_str()) {
                if r.is_empty() || r.starts_with('/') || p.ends_with('/') {
                    rest = r;
                }
            }
        }
        match &self.add_prefix {
            Some(prefix) if rest.is_empty() => prefix.clone(),
            Some(prefix) => {
                let rest = if rest.starts_with('/') {
                    rest.to_string()
                } else {
                    format!("/{rest}")
                };
                format!("{}{}", prefix.trim_end_matches('/'), rest)
            }
            None if rest.is_empty() => "/".to_string(),
            None if !rest.starts_with('/') => format!("/{rest}"),
            None => rest.to_string(),
        }
    }
}

/// Route-level timeout overrides (each falls back to the upstream's).
#[derive(Debug, Clone, Default)]
pub struct RouteTimeouts {
    pub connect: Option<Duration>,
    pub read: Option<Duration>,
    pub write: Option<Duration>,
    pub idle: Option<Duration>,
}

impl RouteTimeouts {
    pub fn over(&self, base: &Timeouts) -> Timeouts {
        Timeouts {
            connect: self.connect.unwrap_or(base.connect),
            read: self.read.unwrap_or(base.read),
            write: self.write.unwrap_or(base.write),
            idle: self.idle.unwrap_or(base.idle),
        }
    }
}

pub struct Route {
    pub name: Arc<str>,
    pub matcher: Matcher,
    pub upstream: Option<Arc<Upstream>>,
    pub rewrite: Option<Rewrite>,
    pub timeouts: RouteTimeouts,
    pub max_request_body_bytes: u64,
    pub chains: Chains,
}

/// Finds the client's address: the peer, unless the peer is a trusted proxy; then the
/// right-most address of X-Forwarded-For that is not itself trusted.
#[derive(Debug, Clone, Default)]
pub struct ClientIpResolver {
    pub trusted: Vec<IpNet>,
}

/// `::ffff:10.0.0.1` is `10.0.0.1`.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl ClientIpResolver {
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    pub fn resolve(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        let peer = canonical_ip(peer);
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        // Walk the hops right to left; stop at the first address not ours to trust, or at junk.
        let values: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
            let hop = hop.trim();
            let Some(ip) = parse_forwarded_ip(hop) else {
                break;
            };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }
}

fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical_ip(ip));
    }
    // `1.2.3.4:5678` or `[::1]:5678`
    s.parse::<SocketAddr>().ok().map(|a| canonical_ip(a.ip()))
}

/// Read and compile a config file. `offline` (for `portico -t`) fetches nothing.
pub fn load_file(
    path: &Path,
    registry: &Registry,
    health: &HealthRegistry,
    offline: bool,
) -> Result<Snapshot, ConfigErrors> {
    let bytes =
        super::files::read_bounded(path, super::bounds::MAX_CONFIG_BYTES).map_err(|e| ConfigError::new("", e))?;
    let text =
        String::from_utf8(bytes).map_err(|_| ConfigError::new("", format!("{} is not UTF-8", path.display())))?;
    compile(&text, path, registry, health, offline)
}

/// Portico's defaults for Pingora's server settings, where Pingora's own are not safe.
fn server_defaults() -> Vec<(&'static str, serde_yaml::Value)> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64;
    vec![
        ("threads", threads.into()),
        ("grace_period_seconds", 5u64.into()),
        ("graceful_shutdown_timeout_seconds", 5u64.into()),
        ("pid_file", "/tmp/portico.pid".into()),
        ("upgrade_sock", "/tmp/portico_upgrade.sock".into()),
    ]
}

/// Compile config text. `path` is where it came from (for `/config` and relative paths).
pub fn compile(
    text: &str,
    path: &Path,
    registry: &Registry,
    health: &HealthRegistry,
    offline: bool,
) -> Result<Snapshot, ConfigErrors> {
    super::bounds::check_yaml(text)?;
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::from_yaml("", &e))?;
    let mut errs = ConfigErrors::default();
    let base_dir = std::env::current_dir().unwrap_or_default();

    let server = check_server(&raw.server, &mut errs);

    // Listeners and admin.
    if raw.listeners.is_empty() {
        errs.push("listeners", "at least one listener is needed");
    }
    let mut seen_addrs = HashSet::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        let loc = format!("listeners[{i}].address");
        match l.address.parse::<SocketAddr>() {
            Ok(a) if !seen_addrs.insert(a) => errs.push(loc, format!("'{}' is listed twice", l.address)),
            Ok(_) => {}
            Err(_) => errs.push(loc, format!("'{}' is not ip:port (e.g. 0.0.0.0:8080)", l.address)),
        }
        if l.tls.is_some() {
            errs.push(
                format!("listeners[{i}].tls"),
                "TLS listeners are not available in this build yet (see the README's roadmap)",
            );
        }
    }
    if let Some(a) = &raw.admin {
        match a.address.parse::<SocketAddr>() {
            Ok(addr) if seen_addrs.contains(&addr) => errs.push(
                "admin.address",
                "the admin listener must not share a port with proxied traffic",
            ),
            Ok(_) => {}
            Err(_) => errs.push("admin.address", format!("'{}' is not ip:port", a.address)),
        }
    }
    let admin_token = raw.admin.as_ref().and_then(|a| {
        if a.token.is_none() && a.token_env.is_none() {
            return None;
        }
        let t = secret("admin", a.token.as_deref(), a.token_env.as_deref(), "token", &mut errs)?;
        if t.len() < 16 {
            errs.push("admin.token", "an admin token needs at least 16 characters");
        }
        Some(t)
    });

    // Client address.
    let mut trusted = Vec::new();
    for (i, p) in raw.client_ip.trusted_proxies.iter().enumerate() {
        match crate::util::parse_net(p) {
            Some(n) => trusted.push(n),
            None => errs.push(
                format!("client_ip.trusted_proxies[{i}]"),
                format!("'{p}' is not a CIDR (e.g. 10.0.0.0/8) or an IP address"),
            ),
        }
    }

    let limits = check_limits(&raw.limits, &mut errs);

    let trace = match crate::util::header_name(&raw.trace.header) {
        Ok(h) => TraceConfig {
            header: h,
            trust_incoming: raw.trace.trust_incoming,
        },
        Err(_) => {
            errs.push(
                "trace.header",
                format!("'{}' is not a valid header name", raw.trace.header),
            );
            TraceConfig {
                header: HeaderName::from_static("x-request-id"),
                trust_incoming: raw.trace.trust_incoming,
            }
        }
    };

    let redis_url = raw
        .redis
        .as_ref()
        .and_then(|r| secret("redis", r.url.as_deref(), r.url_env.as_deref(), "url", &mut errs));

    let consumers = Arc::new(compile_consumers(&raw.consumers, &mut errs));

    // Upstreams.
    let mut upstreams = HashMap::new();
    for (name, u) in &raw.upstreams {
        if let Some(up) = compile_upstream(name, u, health, offline, &mut errs) {
            upstreams.insert(name.clone(), Arc::new(up));
        }
    }
    let upstream_names: Vec<String> = raw.upstreams.keys().cloned().collect();

    // Plugins: global first, then per route.
    let ctx_for = |route: Option<&str>, params: Vec<String>| BuildContext {
        offline,
        base_dir: base_dir.clone(),
        route: route.map(str::to_string),
        route_params: params,
        upstreams: upstream_names.clone(),
        consumers: consumers.clone(),
    };
    let global_ctx = ctx_for(None, vec![]);
    let mut global_entries = Vec::new();
    for (i, p) in raw.plugins.iter().enumerate() {
        if let Some(PluginSlot::On(e)) = build_plugin(registry, p, &format!("plugins[{i}]"), &global_ctx, &mut errs) {
            if global_entries.iter().any(|g: &Entry| g.name == e.name) {
                errs.push(format!("plugins[{i}]"), format!("plugin '{}' is listed twice", e.name));
            }
            global_entries.push(e);
        }
    }

    let mut routes = Vec::new();
    let mut route_names = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let loc = format!("routes[{i}]");
        if r.name.trim().is_empty() {
            errs.push(format!("{loc}.name"), "a route needs a name");
        } else if !route_names.insert(r.name.clone()) {
            errs.push(format!("{loc}.name"), format!("duplicate route name '{}'", r.name));
        }
        let matcher = compile_match(&r.matcher, &format!("{loc}.match"), &mut errs);
        let params = matcher.as_ref().map(|m| m.path.params()).unwrap_or_default();
        let ctx = ctx_for(Some(&r.name), params);

        let mut entries: Vec<Entry> = Vec::new();
        let mut replaced: HashSet<Arc<str>> = HashSet::new();
        for (j, p) in r.plugins.iter().enumerate() {
            let ploc = format!("{loc}.plugins[{j}]");
            match build_plugin(registry, p, &ploc, &ctx, &mut errs) {
                Some(PluginSlot::On(e)) => {
                    if !replaced.insert(e.name.clone()) {
                        errs.push(ploc, format!("plugin '{}' is listed twice", e.name));
                    }
                    entries.push(e);
                }
                Some(PluginSlot::Off(name)) => {
                    replaced.insert(name);
                }
                None => {}
            }
        }
        let mut all: Vec<Entry> = global_entries
            .iter()
            .filter(|g| !replaced.contains(&g.name))
            .cloned()
            .collect();
        all.extend(entries);
        let chains = Chains::build(all);
        let answers = chains.all.iter().any(|e| e.kind == PluginKind::Answer);

        let upstream = match &r.upstream {
            Some(u) => match upstreams.get(u) {
                Some(up) => Some(up.clone()),
                None if raw.upstreams.contains_key(u) => None, // its own error is already reported
                None => {
                    errs.push(format!("{loc}.upstream"), format!("no upstream named '{u}'"));
                    None
                }
            },
            None if answers => None,
            None => {
                errs.push(
                    format!("{loc}.upstream"),
                    "a route needs an upstream unless one of its plugins answers every request itself",
                );
                None
            }
        };

        let rewrite = r.rewrite.as_ref().map(|rw| {
            for (field, v) in [("strip_prefix", &rw.strip_prefix), ("add_prefix", &rw.add_prefix)] {
                if let Some(v) = v {
                    if !v.starts_with('/') || crate::route::normalize_path(v).ok().as_deref() != Some(v.as_str()) {
                        errs.push(
                            format!("{loc}.rewrite.{field}"),
                            format!("'{v}' must be a normalised path starting with '/'"),
                        );
                    }
                }
            }
            Rewrite {
                strip_prefix: rw.strip_prefix.clone().map(|s| {
                    if s.len() > 1 {
                        s.trim_end_matches('/').to_string()
                    } else {
                        s
                    }
                }),
                add_prefix: rw.add_prefix.clone(),
            }
        });
        let timeouts = r
            .timeouts
            .as_ref()
            .map(|t| RouteTimeouts {
                connect: t.connect.map(|d| d.0),
                read: t.read.map(|d| d.0),
                write: t.write.map(|d| d.0),
                idle: t.idle.map(|d| d.0),
            })
            .unwrap_or_default();
        let max_body = r
            .max_request_body_bytes
            .map(|s| s.0)
            .unwrap_or(limits.max_request_body_bytes);

        if let Some(matcher) = matcher {
            routes.push(Arc::new(Route {
                name: Arc::from(r.name.as_str()),
                matcher,
                upstream,
                rewrite,
                timeouts,
                max_request_body_bytes: max_body,
                chains,
            }));
        }
    }

    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Snapshot {
        routes,
        upstreams,
        global: Chains::build(global_entries),
        client_ip: ClientIpResolver { trusted },
        limits,
        trace,
        access_log: raw.access_log.enabled.then_some(raw.access_log.format),
        consumers,
        listeners: raw.listeners,
        admin: raw.admin,
        admin_token,
        server,
        redis_url,
        meta: Meta {
            path: path.to_path_buf(),
            hash: hex::encode(Sha256::digest(text.as_bytes())),
            loaded_at: SystemTime::now(),
        },
    })
}

/// A secret from the environment: set and not empty, or an error saying which variable.
pub fn env_secret(var: &str) -> Result<String, String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("environment variable '{var}' is not set"))
}

/// A value given inline or through an environment variable (`NAME` or `NAME_env`).
fn secret(loc: &str, inline: Option<&str>, env: Option<&str>, field: &str, errs: &mut ConfigErrors) -> Option<String> {
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
fn check_server(server: &serde_yaml::Mapping, errs: &mut ConfigErrors) -> serde_yaml::Mapping {
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

fn check_limits(l: &raw::Limits, errs: &mut ConfigErrors) -> Limits {
    if l.max_request_header_bytes.0 < 1024 || l.max_request_header_bytes.0 > 1 << 20 {
        errs.push(
            "limits.max_request_header_bytes",
            "must be between 1KiB and 1MiB (Pingora's own ceiling)",
        );
    }
    if l.header_timeout.0 < Duration::from_millis(100) {
        errs.push("limits.header_timeout", "must be at least 100ms");
    }
    if l.keepalive_requests == 0 {
        errs.push("limits.keepalive_requests", "must be at least 1");
    }
    for (field, d) in [
        ("body_timeout", l.body_timeout.0),
        ("h2_idle_timeout", l.h2_idle_timeout.0),
    ] {
        if d < Duration::from_millis(100) {
            errs.push(format!("limits.{field}"), "must be at least 100ms");
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
    }
}

fn compile_consumers(list: &[raw::Consumer], errs: &mut ConfigErrors) -> Consumers {
    let mut c = Consumers::default();
    for (i, con) in list.iter().enumerate() {
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

fn compile_match(m: &raw::Match, loc: &str, errs: &mut ConfigErrors) -> Option<Matcher> {
    let mut ok = true;
    let mut hosts = Vec::new();
    for (i, h) in m.hosts.iter().enumerate() {
        match HostPattern::parse(h) {
            Ok(p) => hosts.push(p),
            Err(e) => {
                errs.push(format!("{loc}.hosts[{i}]"), e);
                ok = false;
            }
        }
    }
    let path = match (&m.path_prefix, &m.path) {
        (Some(_), Some(_)) => {
            errs.push(loc, "give either 'path_prefix' or 'path', not both");
            ok = false;
            PathMatch::Any
        }
        (Some(p), None) => PathMatch::prefix(p).unwrap_or_else(|e| {
            errs.push(format!("{loc}.path_prefix"), e);
            ok = false;
            PathMatch::Any
        }),
        (None, Some(p)) => PathMatch::path(p).unwrap_or_else(|e| {
            errs.push(format!("{loc}.path"), e);
            ok = false;
            PathMatch::Any
        }),
        (None, None) => PathMatch::Any,
    };
    let mut methods = Vec::new();
    for (i, name) in m.methods.iter().enumerate() {
        let upper = name.to_ascii_uppercase();
        match Method::from_bytes(upper.as_bytes()) {
            Ok(me) if upper.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(me),
            _ => {
                errs.push(format!("{loc}.methods[{i}]"), format!("'{name}' is not an HTTP method"));
                ok = false;
            }
        }
    }
    let mut headers = Vec::new();
    for (k, v) in &m.headers {
        match (crate::util::header_name(k), HeaderValue::from_str(v)) {
            (Ok(k), Ok(v)) => headers.push((k, v)),
            _ => {
                errs.push(format!("{loc}.headers.{k}"), "not a valid header name and value");
                ok = false;
            }
        }
    }
    ok.then_some(Matcher {
        hosts,
        path,
        methods,
        headers,
    })
}

fn compile_upstream(
    name: &str,
    u: &raw::Upstream,
    health: &HealthRegistry,
    offline: bool,
    errs: &mut ConfigErrors,
) -> Option<Upstream> {
    let loc = format!("upstreams.{name}");
    let before = errs.0.len();
    if u.endpoints.is_empty() {
        errs.push(format!("{loc}.endpoints"), "an upstream needs at least one endpoint");
    }
    let mut endpoints = Vec::new();
    let mut seen = HashSet::new();
    for (i, e) in u.endpoints.iter().enumerate() {
        let eloc = format!("{loc}.endpoints[{i}]");
        if e.weight == 0 || e.weight > 1000 {
            errs.push(format!("{eloc}.weight"), "weight must be between 1 and 1000");
        }
        let addr = match resolve(&e.address, offline) {
            Ok(a) => a,
            Err(msg) => {
                errs.push(eloc, msg);
                continue;
            }
        };
        if !seen.insert(e.address.clone()) {
            errs.push(eloc, format!("'{}' is listed twice", e.address));
            continue;
        }
        endpoints.push(Endpoint {
            health: health.get(name, &e.address),
            address: e.address.clone(),
            addr,
            weight: e.weight.clamp(1, 1000),
        });
    }
    let hash_on = match (&u.hash_on, u.balance) {
        (Some(h), Balance::ConsistentHash) => parse_hash_on(h).unwrap_or_else(|m| {
            errs.push(format!("{loc}.hash_on"), m);
            HashOn::Ip
        }),
        (Some(_), _) => {
            errs.push(
                format!("{loc}.hash_on"),
                "'hash_on' only applies to 'balance: consistent_hash'",
            );
            HashOn::Ip
        }
        (None, _) => HashOn::Ip,
    };
    if u.tls.is_some() {
        errs.push(
            format!("{loc}.tls"),
            "TLS to upstreams is not available in this build yet (see the README's roadmap)",
        );
    }
    if u.protocol == Protocol::H2 {
        errs.push(
            format!("{loc}.protocol"),
            "'h2' needs TLS to the upstream; use 'h2c' for plaintext HTTP/2",
        );
    }
    if let Some(h) = &u.host {
        if HeaderValue::from_str(h).is_err() || h.is_empty() {
            errs.push(format!("{loc}.host"), "not a valid Host value");
        }
    }
    let health_check = u.health_check.as_ref().map(|h| {
        let interval = h.interval.map(|d| d.0).unwrap_or(Duration::from_secs(5));
        let timeout = h.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(1));
        if interval < Duration::from_millis(100) {
            errs.push(format!("{loc}.health_check.interval"), "must be at least 100ms");
        }
        if timeout > interval {
            errs.push(
                format!("{loc}.health_check.timeout"),
                "must not be longer than the interval",
            );
        }
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        if h.kind == CheckKind::Tcp && (h.path.is_some() || h.healthy_status.is_some()) {
            errs.push(
                format!("{loc}.health_check"),
                "'path' and 'healthy_status' apply to 'kind: http' only",
            );
        }
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            errs.push(format!("{loc}.health_check.path"), "must be a path starting with '/'");
        }
        let healthy_status = h.healthy_status.clone().unwrap_or_else(|| vec![200]);
        if healthy_status.is_empty() || healthy_status.iter().any(|s| !(100..=599).contains(s)) {
            errs.push(
                format!("{loc}.health_check.healthy_status"),
                "a non-empty list of HTTP status codes",
            );
        }
        let th = |v: Option<u32>, f: &str, errs: &mut ConfigErrors| {
            let v = v.unwrap_or(1);
            if v == 0 || v > 100 {
                errs.push(format!("{loc}.health_check.{f}"), "must be between 1 and 100");
            }
            v.max(1)
        };
        HealthCheckSpec {
            kind: h.kind,
            path,
            interval,
            timeout,
            healthy_status,
            healthy_threshold: th(h.healthy_threshold, "healthy_threshold", errs),
            unhealthy_threshold: th(h.unhealthy_threshold, "unhealthy_threshold", errs),
            host: u.host.clone(),
        }
    });
    let passive = u.passive.as_ref().map(|p| {
        let n = p.consecutive_failures.unwrap_or(5);
        if n == 0 {
            errs.push(format!("{loc}.passive.consecutive_failures"), "must be at least 1");
        }
        PassiveSpec {
            consecutive_failures: n.max(1),
            eject_for: p.eject_for.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
        }
    });
    let d = Timeouts::default();
    let t = &u.timeouts;
    let timeouts = Timeouts {
        connect: t.connect.map(|x| x.0).unwrap_or(d.connect),
        read: t.read.map(|x| x.0).unwrap_or(d.read),
        write: t.write.map(|x| x.0).unwrap_or(d.write),
        idle: t.idle.map(|x| x.0).unwrap_or(d.idle),
    };
    for (f, v) in [
        ("connect", timeouts.connect),
        ("read", timeouts.read),
        ("write", timeouts.write),
    ] {
        if v.is_zero() {
            errs.push(format!("{loc}.timeouts.{f}"), "must be more than 0");
        }
    }
    let retries = match &u.retries {
        None => RetryPolicy {
            attempts: 1,
            on_connect_failure: true,
            on_reset: false,
        },
        Some(r) => {
            if r.attempts > 10 {
                errs.push(format!("{loc}.retries.attempts"), "at most 10");
            }
            if r.budget.is_some() {
                errs.push(
                    format!("{loc}.retries.budget"),
                    "retry budgets are not available in this build yet (see the README's roadmap)",
                );
            }
            let on = r.on.clone().unwrap_or_else(|| vec!["connect_failure".into()]);
            let mut p = RetryPolicy {
                attempts: r.attempts,
                on_connect_failure: false,
                on_reset: false,
            };
            for (i, cond) in on.iter().enumerate() {
                match cond.as_str() {
                    "connect_failure" => p.on_connect_failure = true,
                    "reset" => p.on_reset = true,
                    "502" | "503" | "504" | "timeout" => errs.push(
                        format!("{loc}.retries.on[{i}]"),
                        format!("retrying on '{cond}' is not available in this build yet (see the README's roadmap)"),
                    ),
                    other => errs.push(
                        format!("{loc}.retries.on[{i}]"),
                        format!("unknown retry condition '{other}' (connect_failure | reset)"),
                    ),
                }
            }
            p
        }
    };
    if errs.0.len() > before {
        return None;
    }
    Some(Upstream::new(
        name.to_string(),
        endpoints,
        u.balance,
        hash_on,
        u.protocol,
        u.host.clone(),
        u.preserve_host,
        health_check,
        passive,
        timeouts,
        retries,
    ))
}

fn parse_hash_on(s: &str) -> Result<HashOn, String> {
    let bad = || format!("'{s}' is not header:NAME | cookie:NAME | ip | path");
    match s.split_once(':') {
        Some(("header", n)) => crate::util::header_name(n).map(HashOn::Header).map_err(|_| bad()),
        Some(("cookie", n)) if !n.is_empty() => Ok(HashOn::Cookie(n.to_string())),
        None if s == "ip" => Ok(HashOn::Ip),
        None if s == "path" => Ok(HashOn::Path),
        _ => Err(bad()),
    }
}

/// Resolve `host:port` once, at load: Pingora's `HttpPeer::new` panics on a name that does
/// not resolve, so no name ever reaches it. Offline (`portico -t`) checks the syntax only.
fn resolve(address: &str, offline: bool) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("'{address}' is not host:port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("'{address}' is not host:port"));
    }
    if offline {
        let port = port.parse::<u16>().unwrap_or(0);
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    match address.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("'{host}' does not resolve to any address")),
        Err(e) => Err(format!("'{host}' does not resolve: {e}")),
    }
}

enum PluginSlot {
    On(Entry),
    /// `- NAME: { enabled: false }`: switches a global plugin off for a route.
    Off(Arc<str>),
}

fn build_plugin(
    registry: &Registry,
    p: &raw::PluginEntry,
    loc: &str,
    ctx: &BuildContext,
    errs: &mut ConfigErrors,
) -> Option<PluginSlot> {
    let Some(factory) = registry.get(&p.name) else {
        errs.push(
            loc,
            format!("unknown plugin '{}' (known: {})", p.name, registry.names().join(", ")),
        );
        return None;
    };
    let ploc = format!("{loc}.{}", p.name);
    let mut config = p.config.clone();
    if let serde_yaml::Value::Mapping(m) = &mut config {
        if let Some(v) = m.remove("enabled") {
            match v.as_bool() {
                Some(false) => return Some(PluginSlot::Off(Arc::from(p.name.as_str()))),
                Some(true) => {}
                None => {
                    errs.push(format!("{ploc}.enabled"), "must be true or false");
                    return None;
                }
            }
        }
    }
    match factory(&config, ctx) {
        Ok(plugin) => Some(PluginSlot::On(Entry {
            name: Arc::from(p.name.as_str()),
            kind: plugin.kind(),
            plugin,
        })),
        Err(e) => {
            let location = match (e.location.is_empty(), e.location.starts_with('[')) {
                (true, _) => ploc,
                (false, true) => format!("{ploc}{}", e.location),
                (false, false) => format!("{ploc}.{}", e.location),
            };
            errs.0.push(ConfigError {
                location,
                message: e.message,
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<Snapshot, ConfigErrors> {
        compile(
            yaml,
            Path::new("test.yaml"),
            &Registry::builtin(),
            &HealthRegistry::default(),
            true,
        )
    }

    fn errors(yaml: &str) -> String {
        match check(yaml) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.to_string(),
        }
    }

    const BASE: &str = "listeners: [{address: 127.0.0.1:18080}]\nupstreams:\n  a: {endpoints: [127.0.0.1:9001]}\n";

    #[test]
    fn minimal_config_compiles() {
        let s = check(&format!("{BASE}routes:\n  - {{name: r, upstream: a}}\n")).unwrap();
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.limits.max_request_header_bytes, 32 << 10);
    }

    #[test]
    fn errors_are_located() {
        let e = errors(&format!(
            "{BASE}routes:\n  - {{name: r, upstream: a, match: {{path_prefx: /x}}}}\n"
        ));
        assert!(e.contains("routes[0].match: unknown field 'path_prefx'"), "{e}");
        let e = errors(&format!("{BASE}routes:\n  - {{name: r, upstream: b}}\n"));
        assert!(e.contains("routes[0].upstream: no upstream named 'b'"), "{e}");
        let e = errors(&format!(
            "{BASE}routes:\n  - {{name: r, upstream: a}}\n  - {{name: r, upstream: a}}\n"
        ));
        assert!(e.contains("routes[1].name: duplicate route name 'r'"), "{e}");
        let e = errors(&format!(
            "{BASE}routes:\n  - {{name: r, upstream: a, plugins: [nope: {{}}]}}\n"
        ));
        assert!(e.contains("routes[0].plugins[0]: unknown plugin 'nope'"), "{e}");
        let e = errors(&format!(
            "{BASE}client_ip: {{trusted_proxies: [10.0.0.0/33]}}\nroutes: []\n"
        ));
        assert!(e.contains("client_ip.trusted_proxies[0]"), "{e}");
        let e = errors(&format!("{BASE}limits: {{header_timeout: fast}}\nroutes: []\n"));
        assert!(
            e.contains("limits.header_timeout") && e.contains("invalid duration"),
            "{e}"
        );
        let e = errors(&format!("{BASE}server: {{thread: 2}}\nroutes: []\n"));
        assert!(e.contains("server: unknown field 'thread'"), "{e}");
        let e = errors(&format!(
            "{BASE}routes:\n  - {{name: r, upstream: a, plugins: [headers: {{request: {{sett: {{}}}}}}]}}\n"
        ));
        assert!(
            e.contains("routes[0].plugins[0].headers.request: unknown field 'sett'"),
            "{e}"
        );
    }

    #[test]
    fn unresolvable_host_is_a_config_error() {
        let yaml = "listeners: [{address: 127.0.0.1:1}]\nupstreams:\n  a: {endpoints: [no-such-host.invalid:80]}\n";
        let e = compile(
            yaml,
            Path::new("t.yaml"),
            &Registry::builtin(),
            &HealthRegistry::default(),
            false,
        )
        .err()
        .expect("an unresolvable name is an error at load")
        .to_string();
        assert!(e.contains("upstreams.a.endpoints[0]"), "{e}");
        assert!(check(yaml).is_ok(), "-t checks syntax only, offline");
    }

    #[test]
    fn rewrite() {
        let rw = Rewrite {
            strip_prefix: Some("/users".into()),
            add_prefix: Some("/v1/users".into()),
        };
        assert_eq!(rw.apply("/users"), "/v1/users");
        assert_eq!(rw.apply("/users/7"), "/v1/users/7");
        assert_eq!(rw.apply("/users/"), "/v1/users/");
        let rw = Rewrite {
            strip_prefix: Some("/api".into()),
            add_prefix: None,
        };
        assert_eq!(rw.apply("/api/x"), "/x");
        assert_eq!(rw.apply("/api"), "/");
        assert_eq!(rw.apply("/apix"), "/apix");
    }

    #[test]
    fn client_ip_walks_trusted_hops() {
        let r = ClientIpResolver {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2, 10.0.0.5".parse().unwrap());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(r.resolve(peer, &h), "2.2.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            r.resolve("9.9.9.9".parse().unwrap(), &h),
            "9.9.9.9".parse::<IpAddr>().unwrap()
        );
        let mut junk = http::HeaderMap::new();
        junk.append("x-forwarded-for", "1.1.1.1, junk".parse().unwrap());
        assert_eq!(r.resolve(peer, &junk), peer);
        assert_eq!(
            r.resolve("::ffff:9.9.9.9".parse().unwrap(), &h),
            "9.9.9.9".parse::<IpAddr>().unwrap()
        );
    }
}
