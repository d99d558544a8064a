//! The compiled, immutable config that request code uses: a [`Snapshot`] and what it holds.

use super::client_ip::ClientIpResolver;
use super::raw;
use crate::plugin::Chains;
use crate::route::{Matcher, RequestKey, RouteIndex};
use crate::trace::TraceConfig;
use crate::upstream::{Timeouts, Upstream};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The live, immutable config. Requests hold one `Arc<Snapshot>` from start to end, so a reload
/// never shows them half of a change.
pub struct Snapshot {
    /// In file order: the first that matches a request is its route ([`Snapshot::find_route`]).
    pub routes: Vec<Arc<Route>>,
    /// Which routes a request needs to try (built from `routes`).
    pub route_index: RouteIndex,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Global plugins alone: the chain for requests that match no route.
    pub global: Chains,
    pub client_ip: ClientIpResolver,
    pub limits: Limits,
    pub trace: TraceConfig,
    pub access_log: Option<raw::LogFormat>,
    /// The global `compression` policy (routes may have their own).
    pub compression: Option<Arc<crate::compression::Policy>>,
    /// The access log's file (stdout when `None`).
    pub access_log_path: Option<PathBuf>,
    pub consumers: Arc<Consumers>,
    pub listeners: Vec<raw::Listener>,
    /// Each TLS listener's certificates and client-CA policy, loaded, by listener address. A
    /// reload applies them to the running listeners (see `Shared::reload`).
    pub listener_tls: HashMap<String, crate::tls::ServerTlsConfig>,
    pub admin: Option<raw::Admin>,
    /// The admin token POST endpoints require (`admin.token` / `token_env`); applied by reloads.
    pub admin_token: Option<String>,
    /// Pingora's server settings as written (validated), with Portico's defaults filled in.
    pub server: serde_yaml::Mapping,
    pub redis_url: Option<String>,
    /// The plugin state keys this config uses (the rest is dropped after it goes live).
    pub state_keys: HashSet<String>,
    /// Periodic tasks of this config's plugins (run while it is live).
    pub tasks: Vec<Arc<crate::resources::Periodic>>,
    /// Query parameters that carry credentials somewhere in this config (any route's plugins):
    /// their values are redacted from every access-log line.
    pub credential_query_params: Vec<String>,
    pub meta: Meta,
}

impl Snapshot {
    /// The longest timeout a request can be given (upstream and route timeouts, body reads,
    /// sends): how long Pingora may keep a request's timer after the request ended.
    pub fn longest_timeout(&self) -> Duration {
        let upstreams = self.upstreams.values().map(|u| &u.timeouts);
        let routes = self.routes.iter().map(|r| &r.timeouts);
        upstreams
            .flat_map(|t| [t.connect, t.read, t.write])
            .chain(routes.flat_map(|t| [t.connect, t.read, t.write]).flatten())
            .chain([self.limits.body_timeout, self.limits.send_timeout])
            .max()
            .unwrap_or_default()
    }

    /// The first route, in file order, whose match block accepts the request (its template
    /// parameters in `params`), trying only the routes the index files under its host and path.
    pub fn find_route(&self, key: &RequestKey<'_>, params: &mut Vec<(String, String)>) -> Option<&Arc<Route>> {
        self.route_index
            .candidates(key, self.routes.len())
            .map(|i| &self.routes[i])
            .find(|r| r.matcher.matches(key, params))
    }
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
    /// Writing to the client that makes no progress for this long ends the connection (HTTP/2:
    /// the stream), and the upstream connection is closed, not pooled.
    pub send_timeout: Duration,
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
    /// The compression policy responses on this route follow (`None`: none).
    pub compression: Option<Arc<crate::compression::Policy>>,
    /// Map `Location`/`Content-Location` back through the rewrite and to the client's host.
    pub rewrite_location: bool,
    pub chains: Chains,
    /// Handles to this route's request metrics (a reload starts new ones: same series).
    pub metrics: crate::metrics::RouteMetrics,
}
