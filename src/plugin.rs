//! The plugin API: what a plugin is, what it sees of a request, what it may answer, and the
//! registry that builds plugins from their YAML blocks by name.
//!
//! A plugin declares its [`PluginKind`] (which fixes where it runs in the request) and the
//! [`Phases`] it uses (so a hook with nothing to do costs nothing). Request-phase work returns
//! a [`Verdict`]: continue, or answer with a [`Reply`] that the core writes (JSON error bodies
//! carry the trace id; response-phase plugins run on it like on any upstream response).

use crate::config::ConfigError;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Where a plugin runs. A request meets the kinds in this order; within a kind, global plugins
/// run before route plugins, then in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PluginKind {
    /// Before anything else: CORS preflights, IP filters.
    Edge,
    /// Who is calling: JWT, API keys. Sets the consumer.
    Authenticate,
    /// May they: service-to-service allow lists.
    Authorize,
    /// How much: rate limits, quotas.
    Limit,
    /// Which upstream: canary.
    Select,
    /// Rewrite headers and bodies.
    Mediate,
    /// Answer the request itself (aggregation).
    Answer,
}

/// The hooks a plugin uses, as a small bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Phases(u8);

impl Phases {
    pub const NONE: Phases = Phases(0);
    /// [`Plugin::request`]: after routing, before an upstream is chosen.
    pub const REQUEST: Phases = Phases(1);
    /// [`Plugin::upstream_request`]: the head about to go upstream.
    pub const UPSTREAM_REQUEST: Phases = Phases(2);
    /// [`Plugin::response`]: the response head going to the client (also Portico's own replies).
    pub const RESPONSE: Phases = Phases(4);
    /// [`Plugin::response_body`]: each response body chunk.
    pub const RESPONSE_BODY: Phases = Phases(8);
    /// [`Plugin::log`]: once, when the request is done.
    pub const LOG: Phases = Phases(16);

    pub const fn union(self, other: Phases) -> Phases {
        Phases(self.0 | other.0)
    }
    pub const fn contains(self, other: Phases) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Phases {
    type Output = Phases;
    fn bitor(self, rhs: Phases) -> Phases {
        self.union(rhs)
    }
}

/// The W3C trace context and request id of one request.
#[derive(Debug, Clone, Default)]
pub struct TraceIds {
    /// The request id: the configured trace header's value, sent to the client and upstream,
    /// and written as `trace_id` in logs and error bodies.
    pub request_id: String,
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// This hop's span id, 16 hex digits (the upstream's parent).
    pub span_id: String,
    /// The trace flags to forward (`01` sampled).
    pub flags: String,
}

impl TraceIds {
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// What every plugin knows about the request in flight.
pub struct RequestState {
    pub trace: TraceIds,
    /// The client address, resolved once from the peer and `client_ip.trusted_proxies`.
    pub client_ip: IpAddr,
    /// The matched route's name (empty before routing or when nothing matched).
    pub route: Arc<str>,
    /// Parameters captured by a `{param}` path template.
    pub params: Vec<(String, String)>,
    /// The authenticated consumer, set by an authenticate plugin.
    pub consumer: Option<String>,
    /// The calling service's identity (mTLS or a JWT claim), for `allow_services`.
    pub identity: Option<String>,
    /// An upstream chosen by a select plugin instead of the route's own.
    pub upstream_override: Option<String>,
    /// Lower-case host without port, as routing saw it.
    pub host: String,
    /// The normalised path, as routing saw it.
    pub path: String,
    /// True on TLS listeners.
    pub tls: bool,
    /// When the request arrived.
    pub started: Instant,
    /// Per-request data of plugins, keyed by type.
    pub vars: http::Extensions,
}

impl RequestState {
    pub fn new(client_ip: IpAddr) -> Self {
        RequestState {
            trace: TraceIds::default(),
            client_ip,
            route: Arc::from(""),
            params: Vec::new(),
            consumer: None,
            identity: None,
            upstream_override: None,
            host: String::new(),
            path: String::new(),
            tls: false,
            started: Instant::now(),
            vars: http::Extensions::new(),
        }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The body of a reply Portico writes itself.
#[derive(Debug, Clone)]
pub enum ReplyBody {
    /// The contract's JSON error (`{"error", "message", "trace_id"}`), or a gRPC status for
    /// gRPC requests. The core fills in the trace id.
    Error {
        code: &'static str,
        message: String,
    },
    /// Any other body, with its content type.
    Data {
        content_type: &'static str,
        bytes: Bytes,
    },
    Empty,
}

/// A response a plugin asks the core to write instead of proxying.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: ReplyBody,
}

impl Reply {
    /// A gateway error: `status`, a snake_case `code` from the contract, a human `message`.
    pub fn error(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Error {
                code,
                message: message.into(),
            },
        }
    }

    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Data {
                content_type: "application/json",
                bytes: body.into(),
            },
        }
    }

    pub fn empty(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Empty,
        }
    }

    /// Add a header (invalid values are dropped rather than breaking the reply).
    pub fn with_header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((HeaderName::from_static(name), v));
        }
        self
    }

    pub fn error_code(&self) -> Option<&'static str> {
        match &self.body {
            ReplyBody::Error { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A plugin's answer in the request phase.
#[derive(Debug)]
pub enum Verdict {
    Continue,
    Respond(Reply),
}

/// A gateway capability. Implement the hooks named by [`Plugin::phases`]; the others are never
/// called. Hooks must not block: the async one may await I/O.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    fn kind(&self) -> PluginKind;
    fn phases(&self) -> Phases;

    /// The request after routing. `req` is the client's request head (changes here are seen by
    /// later plugins and forwarded upstream).
    async fn request(&self, _req: &mut RequestHeader, _st: &mut RequestState) -> Verdict {
        Verdict::Continue
    }

    /// The head about to go upstream (after Portico set Host, X-Forwarded-*, trace headers).
    fn upstream_request(&self, _req: &mut RequestHeader, _st: &RequestState) {}

    /// The response head going to the client, from the upstream or from Portico itself.
    /// `req` is the client's request head.
    fn response(&self, _req: &RequestHeader, _resp: &mut ResponseHeader, _st: &mut RequestState) {}

    /// A response body chunk (`None` at a bodiless end); may rewrite or hold back bytes.
    fn response_body(&self, _body: &mut Option<Bytes>, _end_of_stream: bool, _st: &mut RequestState) {}

    /// Once per request, after the response, with the status sent to the client.
    fn log(&self, _st: &RequestState, _status: u16) {}
}

/// What a plugin factory may look at while building a plugin.
pub struct BuildContext {
    /// True under `portico -t`: check syntax only, touch no network.
    pub offline: bool,
    /// Where relative file paths in the config resolve from.
    pub base_dir: PathBuf,
    /// The route this block belongs to, or `None` for a global plugin.
    pub route: Option<String>,
    /// Parameter names of the route's `{param}` template.
    pub route_params: Vec<String>,
    /// Names of every upstream in the config.
    pub upstreams: Vec<String>,
    /// The config's consumers (names, and API keys by hash).
    pub consumers: std::sync::Arc<crate::config::Consumers>,
}

impl BuildContext {
    /// Parse a plugin block into its config type (errors carry the field's location).
    /// A bare `- NAME` parses as an empty block.
    pub fn parse<C: DeserializeOwned>(&self, value: &serde_yaml::Value) -> Result<C, ConfigError> {
        let v = if value.is_null() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            value.clone()
        };
        serde_path_to_error::deserialize(v).map_err(|e| {
            let mut path = e.path().to_string();
            let message = e.into_inner().to_string();
            if path == "." {
                path.clear();
            }
            // Name an unknown field in the message, located at its parent (as serde_yaml does).
            if message.starts_with("unknown field") {
                path = path
                    .rsplit_once('.')
                    .map(|(parent, _)| parent.to_string())
                    .unwrap_or_default();
            }
            ConfigError::new(path, message)
        })
    }

    /// Read a file the block names (a key, a certificate, a JWKS): a regular file of at most
    /// 1 MiB, relative to `base_dir`. The error names the file; the caller locates it.
    pub fn read_file(&self, p: &str) -> Result<Vec<u8>, String> {
        crate::config::files::read_config_file(&self.base_dir, p)
    }

    /// A config file path, relative to `base_dir`.
    pub fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }
}

/// Builds a plugin from its YAML block. Errors are located relative to the block
/// (`issuer`, `keys[1]`); the core prefixes `routes[N].plugins[M].NAME`.
pub type Factory = Arc<dyn Fn(&serde_yaml::Value, &BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> + Send + Sync>;

/// Plugins by name. [`Registry::builtin`] has Portico's own; add yours with [`Registry::register`].
#[derive(Clone, Default)]
pub struct Registry {
    factories: HashMap<String, Factory>,
}

impl Registry {
    pub fn empty() -> Self {
        Registry::default()
    }

    /// Every built-in plugin.
    pub fn builtin() -> Self {
        let mut r = Registry::empty();
        crate::plugins::register_builtins(&mut r);
        r
    }

    /// Register a plugin whose config type `C` is parsed from its block (give `C`
    /// `#[serde(deny_unknown_fields)]` so typos are errors).
    pub fn register<C, P, F>(&mut self, name: &str, build: F) -> &mut Self
    where
        C: DeserializeOwned,
        P: Plugin,
        F: Fn(C, &BuildContext) -> Result<P, ConfigError> + Send + Sync + 'static,
    {
        let f: Factory = Arc::new(move |value, ctx| {
            let cfg: C = ctx.parse(value)?;
            Ok(Arc::new(build(cfg, ctx)?) as Arc<dyn Plugin>)
        });
        self.factories.insert(name.to_string(), f);
        self
    }

    /// Register a raw factory that reads the YAML value itself.
    pub fn register_factory(&mut self, name: &str, factory: Factory) -> &mut Self {
        self.factories.insert(name.to_string(), factory);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Factory> {
        self.factories.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.factories.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }
}

/// One plugin in a compiled chain.
#[derive(Clone)]
pub struct Entry {
    pub name: Arc<str>,
    pub kind: PluginKind,
    pub plugin: Arc<dyn Plugin>,
}

/// A route's plugins, split per phase and ordered by kind, then global before route, then file
/// order. Built once per config; walked per request.
#[derive(Clone, Default)]
pub struct Chains {
    pub all: Vec<Entry>,
    pub request: Vec<Entry>,
    pub upstream_request: Vec<Entry>,
    pub response: Vec<Entry>,
    pub response_body: Vec<Entry>,
    pub log: Vec<Entry>,
}

impl Chains {
    /// `entries` must list global plugins first, then route plugins, each in file order.
    pub fn build(mut entries: Vec<Entry>) -> Self {
        entries.sort_by_key(|e| e.kind); // stable: keeps global-before-route and file order
        let pick = |p: Phases| -> Vec<Entry> {
            entries
                .iter()
                .filter(|e| e.plugin.phases().contains(p))
                .cloned()
                .collect()
        };
        Chains {
            request: pick(Phases::REQUEST),
            upstream_request: pick(Phases::UPSTREAM_REQUEST),
            response: pick(Phases::RESPONSE),
            response_body: pick(Phases::RESPONSE_BODY),
            log: pick(Phases::LOG),
            all: entries,
        }
    }
}
