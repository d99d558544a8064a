//! Raw config → [`Snapshot`]: validation, name resolution, DNS, plugin construction.
//!
//! The file is read section by section (and list item by list item), so one mistake does not
//! hide the next: `portico -t` reports every error it can find, each with its location. A
//! section that fails to parse is left out of what follows (a route naming a broken upstream
//! does not also get "no upstream named …").
//!
//! - `server.rs`: Pingora's server settings and the edge limits;
//! - `consumers.rs`: identities and their API keys;
//! - `upstreams.rs`: endpoints (resolved), balancing, health checks, timeouts, retries;
//! - `routes.rs`: match rules, rewrites, per-route settings;
//! - `plugins.rs`: plugin blocks through the registry, and the chains per route.

mod consumers;
mod plugins;
mod routes;
mod server;
mod upstreams;

pub use server::env_secret;

use super::client_ip::ClientIpResolver;
use super::error::{parse_value, ConfigError, ConfigErrors};
use super::raw::{self, RawConfig};
use super::snapshot::{Meta, Snapshot};
use crate::plugin::{BuildContext, Chains, Registry};
use crate::resources::{CompileScope, Resources};
use crate::trace::TraceConfig;
use http::HeaderName;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// Read and compile a config file. With offline `resources` (`portico -t`) nothing is fetched
/// and no connection is made.
pub fn load_file(path: &Path, registry: &Registry, resources: &Arc<Resources>) -> Result<Snapshot, ConfigErrors> {
    use super::source::{ConfigSource, FileSource};
    let source = FileSource(path.to_path_buf());
    compile(&source.read()?, path, registry, resources)
}

/// serde_yaml locates a repeated key inside a section but not at the top level
/// (`duplicate entry with key "routes"`): the line of its second occurrence, found in the text.
fn duplicate_top_level_key(text: &str, message: &str) -> Option<usize> {
    let key = message.strip_prefix("duplicate entry with key \"")?.strip_suffix('"')?;
    let starts = |line: &str| {
        line.strip_prefix(key)
            .or_else(|| line.strip_prefix(&format!("\"{key}\"")))
            .or_else(|| line.strip_prefix(&format!("'{key}'")))
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| starts(line))
        .nth(1)
        .map(|(i, _)| i + 1)
}

/// Compile config text. `origin` is where it came from (for `/config` and messages).
pub fn compile(
    text: &str,
    origin: &Path,
    registry: &Registry,
    resources: &Arc<Resources>,
) -> Result<Snapshot, ConfigErrors> {
    super::bounds::check_yaml(text)?;
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let mut err = ConfigError::from_yaml("", &e);
        if let Some(line) = duplicate_top_level_key(text, &err.message) {
            err.message = format!("{} at line {line}", err.message);
        }
        err
    })?;
    let mut errs = ConfigErrors::default();
    let raw = sections(doc, &mut errs);
    let snapshot = build(raw, text, origin, registry, resources, &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(snapshot.expect("no errors, so a snapshot"))
}

/// The raw config, each section parsed on its own; what fails to parse is reported and left out.
struct Parsed {
    raw: RawConfig,
    /// Upstream names whose block failed to parse (routes naming them get no second error).
    broken_upstreams: HashSet<String>,
    /// Route names by index, for error messages.
    route_names: Vec<Option<String>>,
    /// A listener failed to parse (reported): "no listener" would only repeat it.
    broken_listeners: bool,
}

const SECTIONS: &[&str] = &[
    "server",
    "listeners",
    "client_ip",
    "limits",
    "access_log",
    "compression",
    "admin",
    "redis",
    "consumers",
    "upstreams",
    "trace",
    "plugins",
    "routes",
];

fn sections(doc: serde_yaml::Value, errs: &mut ConfigErrors) -> Parsed {
    let mut parsed = Parsed {
        raw: RawConfig::default(),
        broken_upstreams: HashSet::new(),
        route_names: Vec::new(),
        broken_listeners: false,
    };
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => return parsed,
        _ => {
            errs.push(
                "",
                "the config must be a mapping of sections (server, listeners, routes, …)",
            );
            return parsed;
        }
    };
    let raw = &mut parsed.raw;
    for (k, v) in map {
        let Some(key) = k.as_str().map(str::to_string) else {
            errs.push("", "a section name must be a string");
            continue;
        };
        match key.as_str() {
            "server" => raw.server = section(&v, "server", errs),
            "listeners" => {
                let reported = errs.0.len();
                raw.listeners = items(&v, "listeners", errs);
                parsed.broken_listeners = errs.0.len() > reported;
            }
            "client_ip" => raw.client_ip = section(&v, "client_ip", errs),
            "limits" => raw.limits = section(&v, "limits", errs),
            "access_log" => raw.access_log = section(&v, "access_log", errs),
            "compression" => raw.compression = section::<Option<raw::Compression>>(&v, "compression", errs),
            "admin" => raw.admin = section::<Option<raw::Admin>>(&v, "admin", errs),
            "redis" => raw.redis = section::<Option<raw::Redis>>(&v, "redis", errs),
            "consumers" => raw.consumers = items(&v, "consumers", errs),
            "trace" => raw.trace = section(&v, "trace", errs),
            "plugins" => raw.plugins = items(&v, "plugins", errs),
            "upstreams" => {
                let blocks: BTreeMap<String, serde_yaml::Value> = section(&v, "upstreams", errs);
                for (name, block) in blocks {
                    match parse_value::<raw::Upstream>(&block, &format!("upstreams.{name}")) {
                        Ok(u) => {
                            raw.upstreams.insert(name, u);
                        }
                        Err(e) => {
                            errs.0.push(e);
                            parsed.broken_upstreams.insert(name);
                        }
                    }
                }
            }
            "routes" => {
                let list: Vec<serde_yaml::Value> = section(&v, "routes", errs);
                for (i, item) in list.iter().enumerate() {
                    let name = item.get("name").and_then(|n| n.as_str()).map(str::to_string);
                    parsed.route_names.push(name.clone());
                    match parse_value::<raw::Route>(item, &format!("routes[{i}]")) {
                        Ok(r) => raw.routes.push((i, r)),
                        Err(e) => errs.0.push(e),
                    }
                }
            }
            other => errs.push(
                other,
                format!("unknown section '{other}' (known: {})", SECTIONS.join(", ")),
            ),
        }
    }
    parsed
}

/// A section as `T`, or its default after reporting why not.
fn section<T: DeserializeOwned + Default>(v: &serde_yaml::Value, loc: &str, errs: &mut ConfigErrors) -> T {
    if v.is_null() {
        return T::default();
    }
    parse_value(v, loc).unwrap_or_else(|e| {
        errs.0.push(e);
        T::default()
    })
}

/// A list section, item by item: the items that parse, with their index in the file.
fn items<T: DeserializeOwned>(v: &serde_yaml::Value, loc: &str, errs: &mut ConfigErrors) -> Vec<(usize, T)> {
    let list: Vec<serde_yaml::Value> = section(v, loc, errs);
    list.iter()
        .enumerate()
        .filter_map(|(i, item)| {
            parse_value(item, &format!("{loc}[{i}]"))
                .map(|t| (i, t))
                .map_err(|e| errs.0.push(e))
                .ok()
        })
        .collect()
}

/// Everything after parsing. Returns the snapshot if nothing was reported along the way.
fn build(
    parsed: Parsed,
    text: &str,
    origin: &Path,
    registry: &Registry,
    resources: &Arc<Resources>,
    errs: &mut ConfigErrors,
) -> Option<Snapshot> {
    let Parsed {
        raw,
        broken_upstreams,
        route_names,
        broken_listeners,
    } = parsed;
    let offline = resources.offline;
    let base_dir = std::env::current_dir().unwrap_or_default();

    let server = server::check_server(&raw.server, errs);
    let listener_tls = server::check_listeners(&raw, broken_listeners, &base_dir, errs);
    let admin_token = server::admin_token(&raw, errs);
    let limits = server::check_limits(&raw.limits, errs);

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

    let trace_header = crate::util::header_name(&raw.trace.header).unwrap_or_else(|_| {
        errs.push(
            "trace.header",
            format!("'{}' is not a valid header name", raw.trace.header),
        );
        HeaderName::from_static("x-request-id")
    });
    let trace = TraceConfig {
        header: pingora::http::PreparedHeaderName::new(trace_header),
        trust_incoming: raw.trace.trust_incoming,
    };

    let redis_url = raw
        .redis
        .as_ref()
        .and_then(|r| server::secret("redis", r.url.as_deref(), r.url_env.as_deref(), "url", errs));

    let access_log_path = raw.access_log.path.as_ref().map(|p| {
        let path = ctx_path(&base_dir, p);
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            errs.push("access_log.path", format!("the directory of '{p}' does not exist"));
        }
        path
    });

    let compression = raw
        .compression
        .as_ref()
        .and_then(|c| match crate::compression::Policy::compile(c) {
            Ok(p) => Some(Arc::new(p)),
            Err((field, message)) => {
                errs.push(format!("compression.{field}"), message);
                None
            }
        });

    let consumers = Arc::new(consumers::compile_consumers(&raw.consumers, errs));

    let mut upstreams = HashMap::new();
    let mut broken_upstreams = broken_upstreams;
    for (name, u) in &raw.upstreams {
        let inputs = upstreams::UpstreamInputs {
            health: &resources.health,
            resolver: &*resources.resolver,
            offline,
            base_dir: &base_dir,
        };
        match upstreams::compile_upstream(name, u, &inputs, errs) {
            Some(up) => {
                upstreams.insert(name.clone(), Arc::new(up));
            }
            None => {
                broken_upstreams.insert(name.clone());
            }
        }
    }
    let mut upstream_names: Vec<String> = raw.upstreams.keys().cloned().collect();
    upstream_names.extend(broken_upstreams.iter().cloned());

    let scope = Arc::new(CompileScope::default());
    let ctx = BuildContext {
        offline,
        base_dir,
        route: None,
        route_params: Vec::new(),
        route_upstream: None,
        upstreams: upstream_names,
        routes: raw.routes.iter().map(|(_, r)| r.name.clone()).collect(),
        consumers: consumers.clone(),
        redis_url: redis_url.clone(),
        plugin: String::new(),
        block_hash: String::new(),
        resources: resources.clone(),
        scope: scope.clone(),
    };
    let global = plugins::global_entries(registry, &raw.plugins, &ctx, errs);
    let routes = routes::compile_routes(
        &raw.routes,
        &routes::RouteInputs {
            registry,
            global: &global,
            upstreams: &upstreams,
            broken_upstreams: &broken_upstreams,
            limits: &limits,
            compression: compression.as_ref(),
            ctx: &ctx,
        },
        errs,
    );

    name_routes_in(errs, &route_names);
    if !errs.is_empty() {
        return None;
    }
    let global = Chains::build(global);
    let mut credential_query_params: Vec<String> = std::iter::once(&global)
        .chain(routes.iter().map(|r| &r.chains))
        .flat_map(|c| c.all.iter())
        .flat_map(|e| e.plugin.credential_query_params())
        .collect();
    credential_query_params.sort();
    credential_query_params.dedup();
    let state_keys = std::mem::take(&mut *scope.state_keys.lock().unwrap_or_else(|p| p.into_inner()));
    let tasks = std::mem::take(&mut *scope.tasks.lock().unwrap_or_else(|p| p.into_inner()));
    Some(Snapshot {
        route_index: crate::route::RouteIndex::build(routes.iter().map(|r| &r.matcher)),
        routes,
        upstreams,
        global,
        client_ip: ClientIpResolver { trusted },
        limits,
        trace,
        access_log: raw.access_log.enabled.then_some(raw.access_log.format),
        access_log_path,
        compression,
        consumers,
        listeners: raw.listeners.into_iter().map(|(_, l)| l).collect(),
        listener_tls,
        admin: raw.admin,
        admin_token,
        server,
        redis_url,
        state_keys,
        tasks,
        credential_query_params,
        meta: Meta {
            path: origin.to_path_buf(),
            hash: hex::encode(Sha256::digest(text.as_bytes())),
            loaded_at: SystemTime::now(),
        },
    })
}

/// `routes[3].upstream: no upstream named 'ordrs'` gains `(route 'orders')`: the index stays the
/// location (as the contract writes it), the name says which route a reader is looking for.
fn name_routes_in(errs: &mut ConfigErrors, names: &[Option<String>]) {
    for e in &mut errs.0 {
        let Some(rest) = e.location.strip_prefix("routes[") else {
            continue;
        };
        let Some(i) = rest.split(']').next().and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        if let Some(Some(name)) = names.get(i) {
            if !name.is_empty() {
                e.message = format!("{} (route '{name}')", e.message);
            }
        }
    }
}

/// A path written in the config: relative ones from `base_dir`.
fn ctx_path(base_dir: &Path, p: &str) -> std::path::PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// Listener addresses as parsed, for the checks that compare them.
fn socket_addr(a: &str) -> Option<SocketAddr> {
    a.parse().ok()
}

#[cfg(test)]
mod tests;
