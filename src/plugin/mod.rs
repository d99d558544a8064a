//! The plugin API: what a plugin is, what it sees of a request, what it may answer, and the
//! registry that builds plugins from their YAML blocks by name.
//!
//! A plugin declares its [`PluginKind`] (which fixes where it runs in the request) and the
//! [`Phases`] it uses (so a hook with nothing to do costs nothing). Request-phase work returns
//! a [`Verdict`]: continue, or answer with a [`Reply`] that the core writes (JSON error bodies
//! carry the trace id; response-phase plugins run on it like on any upstream response).
//!
//! - here: the [`Plugin`] trait, [`PluginKind`] and [`Phases`];
//! - `request.rs`: what a plugin sees of a request ([`RequestState`], [`TraceIds`], [`Claims`]);
//! - `outcome.rs`: how a request ended ([`Outcome`]) and how a body transform gives up ([`Abort`]);
//! - `reply.rs`: what a plugin may answer ([`Reply`], [`Verdict`]);
//! - `context.rs`: what a factory gets ([`BuildContext`]: config, state across reloads, clock,
//!   upstream client, Redis, periodic tasks);
//! - `registry.rs`: plugins by name ([`Registry`]) and the per-phase chains ([`Chains`]).

mod context;
mod outcome;
mod registry;
mod reply;
mod request;

pub use context::BuildContext;
pub use outcome::{Abort, Failure, Outcome};
pub use registry::{Chains, Entry, Factory, Registry};
pub use reply::{Reply, ReplyBody, Verdict};
pub use request::{Claims, RequestState, TraceIds};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};

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

    /// The head about to go upstream (after Portico set Host, X-Forwarded-*, trace headers).
    /// The request body as it goes upstream, after every `request_body` plugin, piece by
    /// piece and each byte once (a retry's replay is not shown again); the last call has
    /// `end_of_stream` (with an empty piece when the body is empty). Observing changes nothing
    /// about how Portico reads or frames the body, unlike [`Plugin::request_body`].
    fn observe_request_body(&self, _piece: &Bytes, _end_of_stream: bool, _st: &mut RequestState) {}

    fn upstream_request(&self, _req: &mut RequestHeader, _st: &RequestState) {}

    /// The response head going to the client, from the upstream or from Portico itself.
    /// `req` is the client's request head.
    fn response(&self, _req: &RequestHeader, _resp: &mut ResponseHeader, _st: &mut RequestState) {}

    /// A response body chunk (`None` at a bodiless end); may rewrite or hold back bytes. Pingora
    /// sends the response head before the body, so decide in [`Plugin::response`] (and fix the
    /// framing there) whether to rewrite. `Err` ends the response at once. A reply Portico
    /// writes itself comes whole, in one call with `end_of_stream`, before its head is written
    /// (the core then sets its exact `content-length`; an `Err` leaves that body unchanged).
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

    /// Query parameters this plugin reads credentials from (`api_key`'s `query`, `jwt`'s
    /// `query:NAME`). The access log never shows their values, also for a request refused before
    /// this plugin ran (the plugin itself should remove them before deciding, as the built-in
    /// ones do, so they go neither upstream nor into the log).
    fn credential_query_params(&self) -> Vec<String> {
        Vec::new()
    }

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
