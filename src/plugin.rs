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
    /// [`Plugin::log`]: once, when the request is done, with its [`Outcome`].
    pub const LOG: Phases = Phases(16);
    /// [`Plugin::request_body`]: the request body (whole when small, else piece by piece).
    pub const REQUEST_BODY: Phases = Phases(32);
    /// [`Plugin::response_trailers`]: the response's trailers (gRPC status lives there).
    pub const RESPONSE_TRAILERS: Phases = Phases(64);
    /// [`Plugin::observe_request_body`]: the request body as it goes upstream, read-only.
    pub const OBSERVE_REQUEST_BODY: Phases = Phases(128);

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
    /// The config the request runs on (the upstream client looks upstreams up in it).
    pub(crate) snapshot: Option<Arc<crate::config::Snapshot>>,
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
            snapshot: None,
        }
    }

    /// A copy for work that outlives the request (a mirrored copy, a background call): the
    /// ids, the client, the route, the consumer and the config, without the per-request `vars`.
    pub fn detached(&self) -> RequestState {
        RequestState {
            trace: self.trace.clone(),
            client_ip: self.client_ip,
            route: self.route.clone(),
            params: self.params.clone(),
            consumer: self.consumer.clone(),
            identity: self.identity.clone(),
            upstream_override: self.upstream_override.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            tls: self.tls,
            started: self.started,
            vars: http::Extensions::new(),
            snapshot: self.snapshot.clone(),
        }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The verified claims of the request's token, when an authenticate plugin (`jwt`) put
    /// them there.
    pub fn claims(&self) -> Option<&Claims> {
        self.vars.get::<Claims>()
    }
}

/// A verified token's claims, as an authenticate plugin leaves them for the plugins after it
/// (`allow_services` with `from: jwt:CLAIM`, header templates, your own).
#[derive(Debug, Clone)]
pub struct Claims(pub Arc<serde_json::Map<String, serde_json::Value>>);

impl Claims {
    /// A claim as a string (strings as they are; numbers and booleans written out).
    pub fn text(&self, name: &str) -> Option<String> {
        match self.0.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
            _ => None,
        }
    }
}

/// How a request ended, for the `log` hook (metrics, canary guards, audit).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The status sent to the client (0 if the client got nothing, e.g. it went away).
    pub status: u16,
    /// The upstream's own status, when an upstream answered.
    pub upstream_status: Option<u16>,
    /// The upstream the request went to (or would have), by name.
    pub upstream: Option<Arc<str>>,
    /// The endpoint of the last attempt, as written in the config.
    pub endpoint: Option<String>,
    /// Portico's error code when Portico wrote the answer (`no_route`, `upstream_timeout`, …).
    pub error: Option<&'static str>,
    /// Why the exchange with the upstream failed, when it did.
    pub failure: Option<Failure>,
    /// The gRPC status, from the trailers or a trailers-only answer.
    pub grpc_status: Option<u32>,
    /// From the request's arrival to the end of the response.
    pub duration: std::time::Duration,
}

/// A failed exchange with an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, TLS handshake).
    Connect,
    /// A connect, read or write timeout.
    Timeout,
    /// The connection broke, or the upstream's answer could not be read.
    Broken,
}

impl Outcome {
    /// 5xx, a failed exchange, or a gRPC status that means the server failed (UNKNOWN,
    /// DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE): what a canary guard counts against a side.
    pub fn is_failure(&self) -> bool {
        self.status >= 500 || self.failure.is_some() || matches!(self.grpc_status, Some(2 | 4 | 13 | 14))
    }
}

/// A response body transform that cannot go on: the response ends here (closed, so the client
/// can tell it is incomplete) rather than carrying a half-rewritten body.
#[derive(Debug, Clone)]
pub struct Abort(pub String);

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

    /// The request body. On routes with a body plugin, Portico reads bodies of up to 64 KiB
    /// (Pingora's replay buffer) whole before anything goes upstream: the chain sees one piece
    /// with `end_of_stream`, may rewrite it or answer instead, and the upstream gets the exact
    /// new Content-Length. Larger (or HTTP/2 bodies of unknown length) stream through piece by
    /// piece and go upstream chunked, so a plugin may change their length too; set a piece to
    /// empty to hold bytes back and emit them later. A `Reply` answers instead of the upstream
    /// (if the answer has not started yet; else the exchange is cut).
    async fn request_body(
        &self,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _st: &mut RequestState,
    ) -> Result<(), Reply> {
        Ok(())
    }

    /// The request body as it goes upstream, after every `request_body` plugin, piece by
    /// piece and each byte once (a retry's replay is not shown again); the last call has
    /// `end_of_stream` (with an empty piece when the body is empty). Observing changes nothing
    /// about how Portico reads or frames the body, unlike [`Plugin::request_body`].
    fn observe_request_body(&self, _piece: &Bytes, _end_of_stream: bool, _st: &mut RequestState) {}

    /// The head about to go upstream (after Portico set Host, X-Forwarded-*, trace headers).
    /// Called once per attempt (a retry calls it again).
    fn upstream_request(&self, _req: &mut RequestHeader, _st: &RequestState) {}

    /// The response head going to the client, from the upstream or from Portico itself.
    /// `req` is the client's request head.
    fn response(&self, _req: &RequestHeader, _resp: &mut ResponseHeader, _st: &mut RequestState) {}

    /// A response body chunk (`None` at a bodiless end); may rewrite or hold back bytes. Pingora
    /// sends the response head before the body, so decide in [`Plugin::response`] (and fix the
    /// framing there) whether to rewrite. `Err` ends the response at once.
    fn response_body(
        &self,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _st: &mut RequestState,
    ) -> Result<(), Abort> {
        Ok(())
    }

    /// The response's trailers, from the upstream (HTTP/2, or chunked HTTP/1).
    fn response_trailers(&self, _trailers: &mut http::HeaderMap, _st: &mut RequestState) {}

    /// Once per request, when it is done, with how it ended.
    fn log(&self, _st: &RequestState, _outcome: &Outcome) {}

    /// State this plugin shows on the admin listener, if any (see [`AdminState`]).
    fn admin_state(&self) -> Option<&dyn AdminState> {
        None
    }
}

/// What a plugin shows on the admin listener, and what an operator may do to it there. The
/// admin finds these in the live config's chains: `GET /{collection}` lists the state of every
/// plugin that reports under that collection (with its route), and
/// `POST /{collection}/{route}/{action}` acts on the one of that route (POSTs pass the admin's
/// Origin/Host/token checks first).
pub trait AdminState: Send + Sync {
    /// The admin path it appears under, e.g. `canaries`.
    fn collection(&self) -> &'static str;
    /// Its state, as a JSON object (the admin adds `route`).
    fn describe(&self) -> serde_json::Value;
    /// Do `action`; the new state, or `None` for an action it does not know.
    fn act(&self, action: &str) -> Option<serde_json::Value>;
}

/// What a plugin factory may look at while building a plugin, and the process resources it
/// may keep (state that survives reloads, the clock, the upstream client, periodic tasks).
#[derive(Clone)]
pub struct BuildContext {
    /// True under `portico -t`: check syntax only, touch no network.
    pub offline: bool,
    /// Where relative file paths in the config resolve from.
    pub base_dir: PathBuf,
    /// The route this block belongs to, or `None` for a global plugin.
    pub route: Option<String>,
    /// Parameter names of the route's `{param}` template.
    pub route_params: Vec<String>,
    /// The route's own upstream, by name (`None` for a global plugin, or a route without one).
    pub route_upstream: Option<String>,
    /// Names of every upstream in the config.
    pub upstreams: Vec<String>,
    /// The config's consumers (names, and API keys by hash).
    pub consumers: std::sync::Arc<crate::config::Consumers>,
    /// The config's `redis.url`, if any.
    pub redis_url: Option<String>,
    /// The plugin being built, by name, and the SHA-256 of its block (set by the core).
    pub plugin: String,
    pub block_hash: String,
    pub(crate) resources: Arc<crate::resources::Resources>,
    pub(crate) scope: Arc<crate::resources::CompileScope>,
}

impl BuildContext {
    /// A context for building plugins outside a config (unit tests, benches): offline, no
    /// route, no upstreams or consumers, with its own throwaway resources.
    pub fn standalone() -> Self {
        BuildContext::with_resources(crate::resources::Resources::offline())
    }

    /// As [`BuildContext::standalone`], with these resources (e.g. a manual clock).
    pub fn with_resources(resources: Arc<crate::resources::Resources>) -> Self {
        BuildContext {
            offline: resources.offline,
            base_dir: std::env::current_dir().unwrap_or_default(),
            route: None,
            route_params: Vec::new(),
            route_upstream: None,
            upstreams: Vec::new(),
            consumers: Default::default(),
            redis_url: None,
            plugin: String::new(),
            block_hash: String::new(),
            resources,
            scope: Default::default(),
        }
    }

    /// Parse a plugin block into its config type (errors carry the field's location).
    /// A bare `- NAME` parses as an empty block.
    pub fn parse<C: DeserializeOwned>(&self, value: &serde_yaml::Value) -> Result<C, ConfigError> {
        crate::config::parse_value(value, "")
    }

    /// This plugin's own state, kept across reloads while its route, name and block stay the
    /// same (so a reload that does not touch a `rate_limit` block keeps its counters); `init`
    /// makes it the first time, or after the block changed.
    pub fn state<T: std::any::Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let key = format!(
            "{}/{}/{}",
            self.route.as_deref().unwrap_or("*"),
            self.plugin,
            self.block_hash
        );
        self.shared_state(&key, init)
    }

    /// State under a key of the plugin's choosing (e.g. a JWKS shared by every route that names
    /// the same URL); kept while some plugin of the live config asks for it.
    pub fn shared_state<T: std::any::Any + Send + Sync>(&self, key: &str, init: impl FnOnce() -> T) -> Arc<T> {
        self.scope
            .state_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        self.resources.state.get_or_init(key, init)
    }

    /// Run `task` every `period` while this config is live (it stops when a reload retires the
    /// config; a run in progress finishes on its own and never holds a reload).
    pub fn every<F, Fut>(&self, name: &str, period: std::time::Duration, task: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        use futures::FutureExt;
        let task = Arc::new(task);
        self.scope
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(crate::resources::Periodic {
                name: format!("{}/{}", self.route.as_deref().unwrap_or("*"), name),
                period,
                run: Arc::new(move || task().boxed()),
                last: std::sync::Mutex::new(None),
            }));
    }

    /// The process's Redis backend for the config's `redis.url` (`None` without a `redis`
    /// section): one per URL, shared by every plugin and kept across reloads. Creating it only
    /// parses the URL; the connection is made on first use (never by `portico -t`).
    pub fn redis(&self) -> Result<Option<Arc<crate::limiter::RedisBackend>>, String> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let options = crate::limiter::RedisOptions::new(url.clone());
        let fresh = crate::limiter::RedisBackend::with_clock(&options, self.clock())?;
        Ok(Some(self.shared_state(&format!("redis/{url}"), || fresh)))
    }

    /// The process's clock (a manual one in tests).
    pub fn clock(&self) -> Arc<dyn crate::clock::Clock> {
        self.resources.clock.clone()
    }

    /// The process's client for calling upstreams of the request's config.
    pub fn upstream_client(&self) -> Arc<crate::client::UpstreamClient> {
        self.resources.client.clone()
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
    pub request_body: Vec<Entry>,
    pub upstream_request: Vec<Entry>,
    pub response: Vec<Entry>,
    pub response_body: Vec<Entry>,
    pub response_trailers: Vec<Entry>,
    pub observe_request_body: Vec<Entry>,
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
            request_body: pick(Phases::REQUEST_BODY),
            upstream_request: pick(Phases::UPSTREAM_REQUEST),
            response: pick(Phases::RESPONSE),
            response_body: pick(Phases::RESPONSE_BODY),
            response_trailers: pick(Phases::RESPONSE_TRAILERS),
            observe_request_body: pick(Phases::OBSERVE_REQUEST_BODY),
            log: pick(Phases::LOG),
            all: entries,
        }
    }
}
