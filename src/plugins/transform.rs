//! `transform`: *mediation* of JSON bodies. Responses: XML → JSON, and `select` / `remove` /
//! `rename` / `set` / `wrap` with dot paths; requests: the same operations on JSON request
//! bodies (`rename`, `remove`, `set` with `${consumer}`, `${client_ip}`, `${trace_id}`).
//!
//! ```yaml
//! - transform:
//!     max_body: 1MiB                 # default; `response`/`request` may set their own
//!     on_error: fail                 # default; or passthrough (either side may set its own)
//!     response: { xml_to_json: true, select: [order.id, order.item], rename: {order.item: items}, wrap: data }
//!     request:  { remove: [debug], set: { meta.by: "${consumer}" } }
//! ```
//!
//! The pure work (the decision, the buffer, gzip, XML, the operations) lives in
//! [`crate::mediation`]; this is the glue to the hooks.
//!
//! # A body the client can make untransformable is not let through (`on_error: fail`)
//!
//! `remove` and `select` keep fields from clients and request rewrites (`set: meta.by`) decide
//! what an upstream believes, so a body a transform must reshape but cannot is refused by
//! default rather than passed on whole:
//!
//! - The request going upstream cannot steer the answer's shape: on a route with a response
//!   side, `Range`/`If-Range` are dropped (the client gets the whole 200) and `Accept-Encoding`
//!   becomes `gzip` (when the client accepts gzip) or `identity`, the encodings a transform
//!   decodes; `Upgrade` is never forwarded on a transform route (no raw tunnel past it).
//! - Responses: an answer that cannot be transformed and whose head has not gone yet — a
//!   declared length over `max_body`, an encoding other than gzip, a non-UTF-8 XML charset, a
//!   206 — becomes a 502 `transform_failed` JSON error with the trace id (the upstream's body is
//!   dropped). Once the head went (Pingora sends it before the body), a body that turns out
//!   untransformable (an undeclared length over `max_body`, malformed JSON or XML, gzip that does
//!   not decode or decodes past `max_body`) is **cut**: nothing of it is sent and the response
//!   ends incomplete (chunked without its last chunk, an HTTP/2 stream reset).
//! - Requests: a JSON body (any `charset`, `+json` types, case aside) that cannot be rewritten —
//!   malformed, NaN, a lone surrogate, not UTF-8, content-encoded, two `Content-Type`s — is
//!   refused with 400 `bad_request`, one over `max_body` with 413 `payload_too_large`; the
//!   upstream never gets it.
//!
//! `on_error: passthrough` restores the old behaviour for those who prefer it: the original
//! goes on as the head allows (counted in `portico_transform_passthrough_total`).
//! `portico_transform_refused_total{route,direction,reason}` counts refusals.
//!
//! # Responses: the head goes before the body
//!
//! Pingora sends the response head before any body hook runs, so the decision is made in the
//! `response` hook, from the head: a 2xx answer (not 206, not to HEAD) whose content type is
//! JSON (or XML with `xml_to_json`), plain or gzip, and whose declared length (if any) is
//! within `max_body`. Other content types, statuses and empty bodies pass untouched. A chosen
//! answer loses its `content-length` (it is chunked to HTTP/1.1 clients, close-delimited to
//! HTTP/1.0, DATA frames to HTTP/2), XML's content type becomes `application/json`, a gzip
//! body's `content-encoding` goes (the body is sent decoded), a strong `ETag` becomes weak and
//! `accept-ranges` goes. The body is then held, up to `max_body`, and the new document is sent
//! at its end.
//!
//! With `on_error: passthrough`, a body that turns out not to be transformable goes on as the
//! head allows: malformed JSON or XML, or an undeclared length that outgrows `max_body`, pass
//! through byte for byte (for XML, under the `application/json` content type already sent); a
//! gzip body that is too large (on the wire or once decoded) or whose document is malformed
//! passes through decoded. A gzip body that does not decode (or decodes past 32 × `max_body`)
//! cannot be sent as the plain body the head announced: the response is cut either way and
//! `portico_transform_cut_total` counts it.
//!
//! Portico's own answers (an aggregate's document) are transformed too: the core runs the body
//! hook on their whole body and writes the exact `content-length`.
//!
//! # Requests
//!
//! Decided in the `request` hook from the client's head. Bodies of up to 64 KiB are read whole
//! by the core before anything goes upstream, so the upstream gets the new body with its exact
//! `content-length` (a chunked upload too), or the client gets the refusal; larger ones are
//! held here up to `max_body` and sent rewritten at their end, chunked (a refusal then ends the
//! upstream exchange before the upstream has any of the body).
//!
//! (Over 500 lines: the request and response halves share their config, checks and failure
//! paths, and read best together; the body mechanics live in `mediation/`. Half of it is tests.)

use crate::config::units::Size;
use crate::config::ConfigError;
use crate::mediation::body::{
    accepts_gzip, gunzip, gunzip_capped, BodyPolicy, Buffer, Coding, Decision, Fill, Format, GunzipStream, Reason,
    Transform, JSON_CONTENT_TYPE,
};
use crate::mediation::json_ops::{ordered_map, JsonOps, OpsConfig, Var};
use crate::plugin::{Abort, BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{
    ACCEPT_ENCODING, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_RANGE, RANGE,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Version};
use once_cell::sync::Lazy;
use pingora::http::{RequestHeader, ResponseHeader};
use prometheus::{register_int_counter_vec, IntCounterVec};
use serde::Deserialize;
use std::sync::{Arc, Mutex};

pub const DEFAULT_MAX_BODY: u64 = 1 << 20;

/// A gzip body passed through decoded is bounded too: one piece (or the whole, when it was
/// held) may decode to at most this many times `max_body`.
pub const DECODED_PASS_FACTOR: usize = 32;

/// The error code of a response replaced because it could not be transformed.
pub const FAILED_CODE: &str = "transform_failed";

pub static PASSTHROUGH: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_transform_passthrough_total",
        "Bodies a transform left as they were, by route, direction (request | response) and reason",
        &["route", "direction", "reason"]
    )
    .expect("register portico_transform_passthrough_total")
});

pub static TRANSFORMED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_transform_transformed_total",
        "Bodies a transform rewrote, by route and direction (request | response)",
        &["route", "direction"]
    )
    .expect("register portico_transform_transformed_total")
});

pub static CUT: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_transform_cut_total",
        "Responses a transform had to cut after their head went out (a body it could not reshape), by route",
        &["route"]
    )
    .expect("register portico_transform_cut_total")
});

pub static REFUSED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "portico_transform_refused_total",
        "Bodies a transform had to reshape but could not, not passed on (400/413 requests, 502 or cut responses), by route, direction and reason",
        &["route", "direction", "reason"]
    )
    .expect("register portico_transform_refused_total")
});

pub fn init_metrics() {
    Lazy::force(&PASSTHROUGH);
    Lazy::force(&TRANSFORMED);
    Lazy::force(&CUT);
    Lazy::force(&REFUSED);
}

/// What happens to a body a transform must reshape but cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Refuse it: 400/413 for a request, 502 (or a cut response) for an answer.
    #[default]
    Fail,
    /// Send the original on, as the head allows.
    Passthrough,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub response: Option<SideConfig>,
    #[serde(default)]
    pub request: Option<SideConfig>,
    /// For both directions, unless a side sets its own.
    #[serde(default)]
    pub max_body: Option<Size>,
    /// For both directions, unless a side sets its own.
    #[serde(default)]
    pub on_error: Option<OnError>,
}

/// One direction's block: the [`OpsConfig`] operations, `xml_to_json` (responses only) and an
/// optional `max_body` and `on_error`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideConfig {
    #[serde(default)]
    pub xml_to_json: bool,
    #[serde(default)]
    pub select: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default, deserialize_with = "ordered_map")]
    pub rename: Vec<(String, String)>,
    #[serde(default, deserialize_with = "ordered_map")]
    pub set: Vec<(String, serde_json::Value)>,
    #[serde(default)]
    pub wrap: Option<String>,
    #[serde(default)]
    pub max_body: Option<Size>,
    #[serde(default)]
    pub on_error: Option<OnError>,
}

impl SideConfig {
    fn ops(&self) -> OpsConfig {
        OpsConfig {
            select: self.select.clone(),
            remove: self.remove.clone(),
            rename: self.rename.clone(),
            set: self.set.clone(),
            wrap: self.wrap.clone(),
        }
    }
}

/// One direction, compiled.
struct Side {
    ops: JsonOps,
    policy: BodyPolicy,
    on_error: OnError,
    direction: &'static str,
}

impl Side {
    fn build(
        cfg: &SideConfig,
        loc: &'static str,
        default_max: u64,
        default_on_error: OnError,
    ) -> Result<Side, ConfigError> {
        let ops = JsonOps::compile(&cfg.ops(), loc)?;
        let max = cfg.max_body.map(|s| s.0).unwrap_or(default_max);
        let max_loc = if cfg.max_body.is_some() {
            format!("{loc}.max_body")
        } else {
            "max_body".to_string()
        };
        if max == 0 {
            return Err(ConfigError::new(max_loc, "must be larger than 0"));
        }
        let max_body = usize::try_from(max)
            .ok()
            .filter(|m| *m <= 1 << 30)
            .ok_or_else(|| ConfigError::new(max_loc, "at most 1GiB: the body is held in memory"))?;
        Ok(Side {
            ops,
            policy: BodyPolicy {
                max_body,
                xml_to_json: cfg.xml_to_json,
            },
            on_error: cfg.on_error.unwrap_or(default_on_error),
            direction: loc,
        })
    }

    fn fails(&self) -> bool {
        self.on_error == OnError::Fail
    }

    /// The held (plain) body → the new body, or why it cannot be.
    fn rewrite(&self, plain: &[u8], format: Format, st: &RequestState) -> Result<Bytes, Reason> {
        let vars = |v: Var| match v {
            Var::Consumer => st.consumer.clone(),
            Var::ClientIp => Some(st.client_ip.to_string()),
            Var::TraceId => Some(st.trace.request_id.clone()),
            Var::Route => Some(st.route.to_string()),
        };
        let how = Transform {
            format,
            coding: Coding::Identity,
        };
        let out = self.policy.mediate(plain, how, &self.ops, &vars)?;
        TRANSFORMED.with_label_values(&[&st.route, self.direction]).inc();
        Ok(Bytes::from(out))
    }

    fn passed(&self, st: &RequestState, reason: Reason) {
        PASSTHROUGH
            .with_label_values(&[&st.route, self.direction, reason.as_str()])
            .inc();
    }

    fn refused(&self, st: &RequestState, reason: Reason) {
        REFUSED
            .with_label_values(&[&st.route, self.direction, reason.as_str()])
            .inc();
    }

    /// The client's answer to a request body that cannot be rewritten.
    fn request_refusal(&self, st: &RequestState, reason: Reason) -> Reply {
        self.refused(st, reason);
        if reason == Reason::TooLarge {
            return Reply::error(
                413,
                "payload_too_large",
                format!(
                    "the JSON body is larger than this route's transform max_body ({} bytes)",
                    self.policy.max_body
                ),
            );
        }
        let why = match reason {
            Reason::Encoded => "a JSON body with a Content-Encoding cannot be rewritten",
            Reason::Ambiguous => "more than one Content-Type header",
            _ => "the body is not valid UTF-8 JSON, so it cannot be rewritten",
        };
        Reply::error(400, "bad_request", why)
    }

    /// Cut a response whose head already went out: nothing of the body is sent.
    fn cut(&self, st: &RequestState, reason: Reason) -> Abort {
        self.refused(st, reason);
        CUT.with_label_values(&[&st.route]).inc();
        Abort(format!(
            "the upstream's answer cannot be transformed ({})",
            reason.as_str()
        ))
    }
}

const RESPONSE: &str = "response";
const REQUEST: &str = "request";

pub struct TransformPlugin {
    response: Option<Side>,
    request: Option<Side>,
}

impl TransformPlugin {
    pub fn new(cfg: Config, _ctx: &BuildContext) -> Result<Self, ConfigError> {
        let default_max = cfg.max_body.map(|s| s.0).unwrap_or(DEFAULT_MAX_BODY);
        let default_on_error = cfg.on_error.unwrap_or_default();
        let response = cfg
            .response
            .as_ref()
            .map(|c| Side::build(c, RESPONSE, default_max, default_on_error))
            .transpose()?;
        let request = match &cfg.request {
            Some(c) if c.xml_to_json => {
                return Err(ConfigError::new(
                    "request.xml_to_json",
                    "converts responses only (request bodies must be JSON)",
                ))
            }
            Some(c) => Some(Side::build(c, REQUEST, default_max, default_on_error)?),
            None => None,
        };
        // Nothing to do on a side: do not hold its bodies at all.
        let response = response.filter(|s| !s.ops.is_noop() || s.policy.xml_to_json);
        let request = request.filter(|s| !s.ops.is_noop());
        Ok(TransformPlugin { response, request })
    }
}

/// What a response's body hook does, decided in the `response` hook.
#[derive(Clone)]
struct ResponseSlot(Arc<Mutex<Held>>);

/// A response replaced by the `transform_failed` error: its body, until sent (the upstream's
/// own body is dropped).
#[derive(Clone)]
struct Refusal(Arc<Mutex<Option<Bytes>>>);

/// What a request's body hook does, decided in the `request` hook.
#[derive(Clone)]
struct RequestSlot(Arc<Mutex<Held>>);

/// A body being held for a transform, or passing through after all.
struct Held {
    how: Transform,
    buf: Buffer,
    passing: Option<Passing>,
}

enum Passing {
    /// Byte for byte.
    Raw,
    /// Decoded piece by piece (the head already announced a plain body).
    Gunzip(Box<GunzipStream>),
}

impl Passing {
    fn piece(&mut self, b: Bytes) -> Result<Bytes, Reason> {
        match self {
            Passing::Raw => Ok(b),
            Passing::Gunzip(g) => g.push(&b),
        }
    }

    fn finish(&mut self) -> Result<Bytes, Reason> {
        match self {
            Passing::Raw => Ok(Bytes::new()),
            Passing::Gunzip(g) => g.finish(),
        }
    }
}

impl Held {
    fn new(how: Transform, max_body: usize) -> Held {
        Held {
            how,
            buf: Buffer::new(max_body),
            passing: None,
        }
    }
}

/// Take the framing out of a head whose body will change: chunked to HTTP/1.1 clients,
/// close-delimited to HTTP/1.0 ones; HTTP/2 frames it itself.
fn reframe(req: &RequestHeader, resp: &mut ResponseHeader) {
    if resp.headers.contains_key(CONTENT_LENGTH) {
        resp.remove_header(&CONTENT_LENGTH);
    }
    if req.version == Version::HTTP_11 {
        resp.set_version(Version::HTTP_11);
        let _ = resp.insert_header(TRANSFER_ENCODING, "chunked");
    } else if resp.headers.contains_key(TRANSFER_ENCODING) {
        resp.remove_header(&TRANSFER_ENCODING);
    }
}

/// Headers that describe the upstream's body (or how to cache it): they go when the answer is
/// replaced by Portico's error.
const REPRESENTATION: [&str; 15] = [
    "content-encoding",
    "content-length",
    "transfer-encoding",
    "content-range",
    "accept-ranges",
    "content-disposition",
    "content-language",
    "content-location",
    "content-md5",
    "content-digest",
    "repr-digest",
    "digest",
    "etag",
    "last-modified",
    "cache-control",
];

/// Replace an upstream answer, before its head goes out, by the `transform_failed` error.
fn refuse_head(side: &Side, resp: &mut ResponseHeader, st: &mut RequestState, reason: Reason) {
    side.refused(st, reason);
    let why = match reason {
        Reason::TooLarge => format!("its declared length is over max_body ({} bytes)", side.policy.max_body),
        Reason::Encoded => "its content encoding is not one transform decodes (gzip)".to_string(),
        Reason::Charset => "its charset is not UTF-8".to_string(),
        Reason::Status => "it is a partial answer (206)".to_string(),
        other => other.as_str().to_string(),
    };
    let body = crate::respond::error_json(
        FAILED_CODE,
        &format!("the upstream's answer cannot be transformed: {why}"),
        &st.trace.request_id,
    );
    let _ = resp.set_status(502);
    for h in REPRESENTATION {
        if resp.headers.contains_key(h) {
            resp.remove_header(h);
        }
    }
    let _ = resp.insert_header(CONTENT_TYPE, JSON_CONTENT_TYPE);
    let _ = resp.insert_header(CONTENT_LENGTH, body.len().to_string());
    st.vars.insert(Refusal(Arc::new(Mutex::new(Some(body)))));
}

/// Whether a request carries a body (HTTP/2: a content type says one may follow).
fn has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key(TRANSFER_ENCODING)
        || req.headers.get(CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
        || (req.version == Version::HTTP_2 && req.headers.contains_key(CONTENT_TYPE))
}

/// An upgrade (WebSocket) would make the route a raw tunnel past the transform: the upstream
/// never sees it offered, so it answers plainly.
fn no_upgrade(req: &mut RequestHeader) {
    if !req.headers.contains_key(UPGRADE) {
        return;
    }
    req.remove_header(&UPGRADE);
    let kept: Vec<String> = req
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("upgrade"))
        .map(str::to_string)
        .collect();
    if req.headers.contains_key(CONNECTION) {
        req.remove_header(&CONNECTION);
    }
    if !kept.is_empty() {
        let _ = req.insert_header(CONNECTION, kept.join(", "));
    }
}

#[async_trait]
impl Plugin for TransformPlugin {
    fn kind(&self) -> PluginKind {
        PluginKind::Mediate
    }

    fn phases(&self) -> Phases {
        let mut p = Phases::NONE;
        if self.response.is_some() {
            p = p | Phases::RESPONSE | Phases::RESPONSE_BODY | Phases::UPSTREAM_REQUEST;
        }
        if self.request.is_some() {
            p = p | Phases::REQUEST | Phases::REQUEST_BODY | Phases::UPSTREAM_REQUEST;
        }
        p
    }

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let Some(side) = &self.request else {
            return Verdict::Continue;
        };
        let body = has_body(req);
        // Two Content-Types: this decision and the upstream's could read different ones.
        if body && req.headers.get_all(CONTENT_TYPE).iter().nth(1).is_some() {
            if side.fails() {
                return Verdict::Respond(side.request_refusal(st, Reason::Ambiguous));
            }
            side.passed(st, Reason::Ambiguous);
            return Verdict::Continue;
        }
        // A JSON body this transform cannot rewrite: compressed, or declared too large.
        let cannot = match side.policy.decide_headers(&req.headers) {
            Decision::Transform(how) if how.coding == Coding::Identity => {
                st.vars
                    .insert(RequestSlot(Arc::new(Mutex::new(Held::new(how, side.policy.max_body)))));
                None
            }
            Decision::Transform(_) => Some(Reason::Encoded),
            Decision::PassThrough(reason @ (Reason::Encoded | Reason::TooLarge)) => Some(reason),
            // Not JSON (or no body): nothing to rewrite.
            Decision::PassThrough(reason) => {
                if body {
                    side.passed(st, reason);
                }
                None
            }
        };
        if let Some(reason) = cannot.filter(|_| body) {
            if side.fails() {
                return Verdict::Respond(side.request_refusal(st, reason));
            }
            side.passed(st, reason);
        }
        Verdict::Continue
    }

    async fn request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        st: &mut RequestState,
    ) -> Result<(), Reply> {
        let (Some(side), Some(slot)) = (&self.request, st.vars.get::<RequestSlot>().cloned()) else {
            return Ok(());
        };
        let mut held = slot.0.lock().unwrap_or_else(|p| p.into_inner());
        if held.passing.is_some() {
            return Ok(());
        }
        if let Some(piece) = body.take() {
            match held.buf.push(piece) {
                Fill::Held => *body = Some(Bytes::new()),
                Fill::Release(all) => {
                    if side.fails() {
                        return Err(side.request_refusal(st, Reason::TooLarge));
                    }
                    side.passed(st, Reason::TooLarge);
                    held.passing = Some(Passing::Raw);
                    *body = Some(all);
                    return Ok(());
                }
            }
        }
        if end_of_stream {
            let plain = held.buf.take();
            if !plain.is_empty() {
                *body = Some(match side.rewrite(&plain, held.how.format, st) {
                    Ok(new) => new,
                    Err(reason) if side.fails() => return Err(side.request_refusal(st, reason)),
                    Err(reason) => {
                        side.passed(st, reason);
                        plain
                    }
                });
            }
        }
        Ok(())
    }

    fn upstream_request(&self, req: &mut RequestHeader, _st: &RequestState) {
        no_upgrade(req);
        if self.response.is_none() {
            return;
        }
        // The client must not choose a shape of the answer that passes untransformed: a byte
        // range of it, or an encoding a transform cannot decode.
        for h in [RANGE, IF_RANGE] {
            if req.headers.contains_key(&h) {
                req.remove_header(&h);
            }
        }
        let offered: Vec<&str> = req
            .headers
            .get_all(ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let ae = if accepts_gzip(Some(&offered.join(","))) {
            "gzip"
        } else {
            "identity"
        };
        let _ = req.insert_header(ACCEPT_ENCODING, ae);
    }

    fn response(&self, req: &RequestHeader, resp: &mut ResponseHeader, st: &mut RequestState) {
        let Some(side) = &self.response else {
            return;
        };
        // A new head (Portico's own error after a cut, say): nothing of an earlier one holds.
        st.vars.remove::<ResponseSlot>();
        st.vars.remove::<Refusal>();
        let status = resp.status.as_u16();
        let decision = if req.method == Method::HEAD || !(200..300).contains(&status) || status == 204 {
            Decision::PassThrough(Reason::Status)
        } else if status == 206 {
            // Range is never sent upstream from a transform route: a byte range of the
            // document is not a document to reshape, nor one to pass on.
            if side.fails() {
                return refuse_head(side, resp, st, Reason::Status);
            }
            Decision::PassThrough(Reason::Status)
        } else {
            side.policy.decide_headers(&resp.headers)
        };
        let how = match decision {
            Decision::Transform(how) => how,
            Decision::PassThrough(reason @ (Reason::TooLarge | Reason::Encoded | Reason::Charset)) if side.fails() => {
                return refuse_head(side, resp, st, reason);
            }
            Decision::PassThrough(reason) => {
                side.passed(st, reason);
                return;
            }
        };
        reframe(req, resp);
        if how.format == Format::Xml {
            let _ = resp.insert_header(CONTENT_TYPE, JSON_CONTENT_TYPE);
        }
        if how.coding == Coding::Gzip {
            resp.remove_header(&CONTENT_ENCODING);
        }
        // Another representation: a strong validator no longer holds, and byte ranges of the
        // upstream's body mean nothing here.
        if let Some(etag) = resp.headers.get(ETAG).and_then(|v| v.to_str().ok()) {
            if !etag.starts_with("W/") {
                let weak = format!("W/{etag}");
                let _ = resp.insert_header(ETAG, weak);
            }
        }
        if resp.headers.contains_key("accept-ranges") {
            resp.remove_header("accept-ranges");
        }
        st.vars
            .insert(ResponseSlot(Arc::new(Mutex::new(Held::new(how, side.policy.max_body)))));
    }

    fn response_body(&self, body: &mut Option<Bytes>, end_of_stream: bool, st: &mut RequestState) -> Result<(), Abort> {
        let Some(side) = &self.response else {
            return Ok(());
        };
        if let Some(refusal) = st.vars.get::<Refusal>().cloned() {
            // The error goes out with the first piece; the upstream's body is dropped.
            *body = refusal.0.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Ok(());
        }
        let Some(slot) = st.vars.get::<ResponseSlot>().cloned() else {
            return Ok(());
        };
        let mut held = slot.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = &mut *held;
        let cap = side.policy.max_body.saturating_mul(DECODED_PASS_FACTOR);
        // Passing through already (or from this piece on): the rest goes as it comes.
        if held.passing.is_none() {
            if let Some(piece) = body.take() {
                if let Fill::Release(all) = held.buf.push(piece) {
                    if side.fails() {
                        return Err(side.cut(st, Reason::TooLarge));
                    }
                    side.passed(st, Reason::TooLarge);
                    held.passing = Some(match held.how.coding {
                        Coding::Identity => Passing::Raw,
                        Coding::Gzip => Passing::Gunzip(Box::new(GunzipStream::new(cap))),
                    });
                    *body = Some(all);
                }
            }
        }
        if let Some(pass) = &mut held.passing {
            let mut out = match body.take() {
                Some(b) => pass.piece(b).map_err(|r| side.cut(st, r))?,
                None => Bytes::new(),
            };
            if end_of_stream {
                let last = pass.finish().map_err(|r| side.cut(st, r))?;
                if !last.is_empty() {
                    let mut joined = BytesMut::from(&out[..]);
                    joined.extend_from_slice(&last);
                    out = joined.freeze();
                }
            }
            *body = (!out.is_empty()).then_some(out);
            return Ok(());
        }
        if !end_of_stream {
            return Ok(()); // held
        }
        let held_body = held.buf.take();
        let plain = match held.how.coding {
            Coding::Identity => held_body,
            Coding::Gzip => match gunzip(&held_body, side.policy.max_body) {
                Ok(p) => Bytes::from(p),
                Err(Reason::TooLarge) if !side.fails() => {
                    // Fits on the wire, too large once decoded: it goes on decoded, untouched.
                    side.passed(st, Reason::TooLarge);
                    let plain = gunzip_capped(&held_body, cap).map_err(|r| side.cut(st, r))?;
                    *body = Some(plain);
                    return Ok(());
                }
                Err(r) => return Err(side.cut(st, r)),
            },
        };
        if plain.is_empty() {
            side.passed(st, Reason::Empty);
            return Ok(());
        }
        *body = Some(match side.rewrite(&plain, held.how.format, st) {
            Ok(new) => new,
            Err(reason) if side.fails() => return Err(side.cut(st, reason)),
            Err(reason) => {
                side.passed(st, reason);
                plain
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn build(yaml: &str) -> Result<TransformPlugin, ConfigError> {
        let ctx = BuildContext::standalone();
        let cfg: Config = ctx.parse(&serde_yaml::from_str(yaml).unwrap())?;
        TransformPlugin::new(cfg, &ctx)
    }

    fn st() -> RequestState {
        let mut st = RequestState::new("10.0.0.9".parse().unwrap());
        st.route = "r".into();
        st.trace.request_id = "rid-1".into();
        st
    }

    fn head(ct: &str, len: Option<usize>) -> ResponseHeader {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.insert_header("content-type", ct).unwrap();
        if let Some(n) = len {
            h.insert_header("content-length", n.to_string()).unwrap();
        }
        h
    }

    fn get() -> RequestHeader {
        RequestHeader::build("GET", b"/", None).unwrap()
    }

    /// Run a response through the hooks, in pieces; the body the client would get.
    fn run(p: &TransformPlugin, resp: &mut ResponseHeader, pieces: &[&[u8]]) -> Result<Vec<u8>, Abort> {
        let mut st = st();
        p.response(&get(), resp, &mut st);
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let mut b = Some(Bytes::copy_from_slice(piece));
            p.response_body(&mut b, i + 1 == pieces.len(), &mut st)?;
            out.extend_from_slice(&b.unwrap_or_default());
        }
        Ok(out)
    }

    #[test]
    fn json_in_pieces_is_reframed_and_rewritten() {
        let p = build("response: {select: [a.b], rename: {a.b: c}}").unwrap();
        assert_eq!(
            p.phases(),
            Phases::RESPONSE | Phases::RESPONSE_BODY | Phases::UPSTREAM_REQUEST
        );
        let mut resp = head("application/json", Some(27));
        let out = run(&p, &mut resp, &[b"{\"a\": {\"b\": 1, ", b"\"x\": 2}, \"y\": 3}"]).unwrap();
        assert_eq!(out, br#"{"a":{"c":1}}"#);
        assert!(resp.headers.get("content-length").is_none());
        assert_eq!(resp.headers["transfer-encoding"], "chunked");
    }

    #[test]
    fn xml_gets_a_json_content_type() {
        let p = build("response: {xml_to_json: true}").unwrap();
        let mut resp = head("text/xml; charset=utf-8", None);
        resp.insert_header("etag", "\"v1\"").unwrap();
        let out = run(&p, &mut resp, &[b"<a x=\"1\"><b>t</b></a>"]).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            json!({"a": {"@x": "1", "b": "t"}})
        );
        assert_eq!(resp.headers["content-type"], "application/json");
        assert_eq!(resp.headers["etag"], "W/\"v1\"");
    }

    #[test]
    fn pass_through_cases() {
        let p = build("response: {wrap: d}\nmax_body: 10\non_error: passthrough").unwrap();
        // Declared too large: the head is untouched.
        let mut resp = head("application/json", Some(11));
        let out = run(&p, &mut resp, &[b"[1,2,3,4,5]"]).unwrap();
        assert_eq!(out, b"[1,2,3,4,5]");
        assert_eq!(resp.headers["content-length"], "11");
        // Undeclared and too long: everything held is released in order, then the rest.
        let mut resp = head("application/json", None);
        let out = run(&p, &mut resp, &[b"[1,2,3,", b"4,5,6,7", b",8]"]).unwrap();
        assert_eq!(out, b"[1,2,3,4,5,6,7,8]");
        // Malformed: the original.
        let mut resp = head("application/json", None);
        assert_eq!(run(&p, &mut resp, &[b"{\"a\":"]).unwrap(), b"{\"a\":");
        // Not JSON, or not 2xx: untouched.
        let mut resp = head("text/plain", Some(2));
        assert_eq!(run(&p, &mut resp, &[b"hi"]).unwrap(), b"hi");
        assert_eq!(resp.headers["content-length"], "2");
        let mut resp = head("application/json", Some(2));
        resp.set_status(404).unwrap();
        assert_eq!(run(&p, &mut resp, &[b"{}"]).unwrap(), b"{}");
        assert_eq!(resp.headers["content-length"], "2");
    }

    #[test]
    fn gzip_is_decoded() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let gz = |d: &[u8]| {
            let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(d).unwrap();
            e.finish().unwrap()
        };
        let p = build("response: {remove: [b], on_error: passthrough}\nmax_body: 100").unwrap();
        let mut resp = head("application/json", None);
        resp.insert_header("content-encoding", "gzip").unwrap();
        let packed = gz(b"{\"a\":1,\"b\":2}");
        let (x, y) = packed.split_at(7);
        assert_eq!(run(&p, &mut resp, &[x, y]).unwrap(), br#"{"a":1}"#);
        assert!(resp.headers.get("content-encoding").is_none());
        // Malformed inside: the decoded original.
        let mut resp = head("application/json", None);
        resp.insert_header("content-encoding", "gzip").unwrap();
        assert_eq!(run(&p, &mut resp, &[&gz(b"{nope")]).unwrap(), b"{nope");
        // Too large decoded: decoded, untouched.
        let big = format!("[{}0]", "0,".repeat(100));
        let mut resp = head("application/json", None);
        resp.insert_header("content-encoding", "gzip").unwrap();
        assert_eq!(run(&p, &mut resp, &[&gz(big.as_bytes())]).unwrap(), big.as_bytes());
        // Too large on the wire (undeclared): decoded as it streams.
        let noisy: Vec<u8> = (0..3000u32)
            .flat_map(|i| format!("{},", i * 7919 % 10007).into_bytes())
            .collect();
        let packed = gz(&noisy);
        assert!(packed.len() > 100);
        let mut resp = head("application/json", None);
        resp.insert_header("content-encoding", "gzip").unwrap();
        let pieces: Vec<&[u8]> = packed.chunks(64).collect();
        assert_eq!(run(&p, &mut resp, &pieces).unwrap(), noisy);
        // Not gzip at all: cut.
        let mut resp = head("application/json", None);
        resp.insert_header("content-encoding", "gzip").unwrap();
        assert!(run(&p, &mut resp, &[b"{\"a\":1}"]).is_err());
    }

    /// The default, `on_error: fail`: nothing the transform could not reshape reaches the client.
    #[test]
    fn fail_closed_cases() {
        let p = build("response: {remove: [secret]}\nmax_body: 20").unwrap();
        let refused = |resp: &ResponseHeader, out: &[u8], reason: &str| {
            assert_eq!(resp.status.as_u16(), 502, "{reason}");
            assert_eq!(resp.headers["content-type"], "application/json");
            assert_eq!(resp.headers["content-length"], out.len().to_string().as_str());
            assert!(resp.headers.get("content-encoding").is_none());
            let v: serde_json::Value = serde_json::from_slice(out).unwrap();
            assert_eq!(v["error"], FAILED_CODE);
            assert_eq!(v["trace_id"], "rid-1");
            assert!(v["message"].as_str().unwrap().contains(reason), "{v}");
        };
        // Declared too large: the head has not gone, so it becomes the 502.
        let mut resp = head("application/json", Some(30));
        resp.insert_header("etag", "\"v\"").unwrap();
        resp.insert_header("cache-control", "max-age=600").unwrap();
        let out = run(&p, &mut resp, &[b"{\"secret\":\"s\",\"a\":", b"\"xxxxxxxxxxxxx\"}"]).unwrap();
        refused(&resp, &out, "max_body");
        assert!(resp.headers.get("etag").is_none() && resp.headers.get("cache-control").is_none());
        // Encodings a transform cannot decode, and a byte range.
        for ce in ["deflate", "br", "zstd", "gzip, br"] {
            let mut resp = head("application/json", Some(10));
            resp.insert_header("content-encoding", ce).unwrap();
            let out = run(&p, &mut resp, &[b"0123456789"]).unwrap();
            refused(&resp, &out, "encoding");
        }
        let mut resp = head("application/json", Some(12));
        resp.set_status(206).unwrap();
        let out = run(&p, &mut resp, &[br#"{"secret":1}"#]).unwrap();
        refused(&resp, &out, "206");
        // After the head: an undeclared length past max_body, malformed JSON, bad gzip: cut.
        let mut resp = head("application/json", None);
        assert!(run(&p, &mut resp, &[b"{\"secret\":\"0123456789", b"0123456789\"}"]).is_err());
        let mut resp = head("application/json", None);
        assert!(run(&p, &mut resp, &[b"{\"secret\":NaN}"]).is_err());
        let mut resp = head("application/json", None);
        resp.insert_header("content-encoding", "gzip").unwrap();
        assert!(run(&p, &mut resp, &[b"{\"secret\":1}"]).is_err());
        // What a transform does not cover still passes: other types, errors, empty bodies.
        let mut resp = head("text/plain", Some(2));
        assert_eq!(run(&p, &mut resp, &[b"hi"]).unwrap(), b"hi");
        let mut resp = head("application/json", Some(50));
        resp.set_status(500).unwrap();
        assert_eq!(run(&p, &mut resp, &[&[b'x'; 50]]).unwrap(), vec![b'x'; 50]);
        let mut resp = head("application/json", None);
        assert_eq!(run(&p, &mut resp, &[b""]).unwrap(), b"");
        // JSON with a charset parameter, and a BOM, are transformed.
        let mut resp = head("application/json; charset=ISO-8859-1", None);
        let out = run(
            &p,
            &mut resp,
            &["\u{feff}{\"secret\":1,\"a\":2}".as_bytes()[..19].as_ref(), b"}"],
        );
        assert!(out.is_err(), "23 bytes: over max_body, cut");
        let mut resp = head("application/json; charset=ISO-8859-1", None);
        let out = run(
            &p,
            &mut resp,
            &["\u{feff}{\"secret\":1,\"a\":2}".as_bytes()[3..].as_ref()],
        )
        .unwrap();
        assert_eq!(out, br#"{"a":2}"#);
        let mut resp = head("application/json", None);
        let out = run(&p, &mut resp, &["\u{feff}{\"a\":[1e2]}".as_bytes()]).unwrap();
        assert_eq!(out, br#"{"a":[1e+2]}"#);
    }

    #[test]
    fn the_upstream_request_cannot_steer_the_answer() {
        let p = build("response: {remove: [secret]}").unwrap();
        let st = st();
        let req = |headers: &[(&str, &str)]| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            for (k, v) in headers {
                r.append_header(k.to_string(), *v).unwrap();
            }
            p.upstream_request(&mut r, &st);
            r
        };
        let r = req(&[
            ("range", "bytes=0-"),
            ("if-range", "\"v\""),
            ("accept-encoding", "br, deflate, gzip;q=0.1"),
        ]);
        assert!(r.headers.get("range").is_none() && r.headers.get("if-range").is_none());
        assert_eq!(r.headers["accept-encoding"], "gzip");
        assert_eq!(
            req(&[("accept-encoding", "deflate, br, zstd")]).headers["accept-encoding"],
            "identity"
        );
        assert_eq!(req(&[]).headers["accept-encoding"], "identity");
        let r = req(&[("upgrade", "websocket"), ("connection", "keep-alive, Upgrade")]);
        assert!(r.headers.get("upgrade").is_none());
        assert_eq!(r.headers["connection"], "keep-alive");
        // A request-only transform leaves the answer's shape alone, but no tunnel either.
        let p = build("request: {remove: [role]}").unwrap();
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.insert_header("range", "bytes=0-").unwrap();
        r.insert_header("upgrade", "websocket").unwrap();
        p.upstream_request(&mut r, &st);
        assert_eq!(r.headers["range"], "bytes=0-");
        assert!(r.headers.get("upgrade").is_none());
    }

    /// A request, its body in `pieces`: the body the upstream gets, or the reply instead.
    fn send(p: &TransformPlugin, headers: &[(&str, &str)], pieces: &[&[u8]]) -> Result<Vec<u8>, Reply> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut st = st();
        st.consumer = Some("app".into());
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        rt.block_on(async {
            if let Verdict::Respond(r) = p.request(&mut req, &mut st).await {
                return Err(r);
            }
            let mut out = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                let mut b = Some(Bytes::copy_from_slice(piece));
                p.request_body(&mut b, i + 1 == pieces.len(), &mut st).await?;
                out.extend_from_slice(&b.unwrap_or_default());
            }
            Ok(out)
        })
    }

    #[test]
    fn request_bodies_that_cannot_be_rewritten_are_refused() {
        let p = build("request: {remove: [role], set: {meta.by: '${consumer}'}}\nmax_body: 64").unwrap();
        let json = |ct: &'static str| vec![("content-type", ct), ("transfer-encoding", "chunked")];
        let doc: &[u8] = br#"{"role":"admin","meta":{"by":"someone-else"}}"#;
        // Every spelling of JSON is rewritten.
        for ct in [
            "application/json",
            "application/json; charset=latin1",
            "Application/JSON;charset=UTF-8",
            "application/json ; charset=\"utf-8\"",
            "application/merge-patch+json",
        ] {
            let out = send(&p, &json(ct), &[doc]).unwrap_or_else(|r| panic!("{ct}: {r:?}"));
            assert_eq!(out, br#"{"meta":{"by":"app"}}"#, "{ct}");
        }
        let bom = [b"\xEF\xBB\xBF".as_slice(), doc].concat();
        assert_eq!(
            send(&p, &json("application/json"), &[&bom]).unwrap(),
            br#"{"meta":{"by":"app"}}"#
        );
        // What cannot be rewritten: 400 (413 past max_body).
        let status = |headers: &[(&str, &str)], pieces: &[&[u8]]| {
            send(&p, headers, pieces).map(|_| 200).unwrap_or_else(|r| r.status)
        };
        for bad in [
            &br#"{"role":"admin","x":NaN}"#[..],
            br#"{"role":"admin","x":"\ud800"}"#,
            b"{\"role\":\"adm\xE9n\"}",
            b"{\"role\":",
        ] {
            let r = send(&p, &json("application/json"), &[bad]).unwrap_err();
            assert_eq!(
                (r.status, r.error_code()),
                (400, Some("bad_request")),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(status(&json("application/json"), &[&[b' '; 40], &[b' '; 40]]), 413);
        assert_eq!(
            status(&[("content-type", "application/json"), ("content-length", "65")], &[]),
            413
        );
        assert_eq!(
            status(
                &[
                    ("content-type", "application/json"),
                    ("content-length", "5"),
                    ("content-encoding", "gzip")
                ],
                &[]
            ),
            400
        );
        assert_eq!(
            status(
                &[
                    ("content-type", "text/plain"),
                    ("content-type", "application/json"),
                    ("content-length", "5")
                ],
                &[]
            ),
            400
        );
        // Not JSON: nothing to rewrite, it goes on.
        assert_eq!(send(&p, &json("text/plain"), &[doc]).unwrap(), doc);
        // on_error: passthrough: the original goes on.
        let lax = build("request: {remove: [role], on_error: passthrough}").unwrap();
        assert_eq!(
            send(&lax, &json("application/json"), &[b"{\"role\":NaN}"]).unwrap(),
            b"{\"role\":NaN}"
        );
    }

    #[test]
    fn request_bodies() {
        let p = build(
            "request: {rename: {a: b}, remove: [x], set: {by: '${consumer}', ip: '${client_ip}', t: '${trace_id}'}}",
        )
        .unwrap();
        assert_eq!(
            p.phases(),
            Phases::REQUEST | Phases::REQUEST_BODY | Phases::UPSTREAM_REQUEST
        );
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut st = st();
        st.consumer = Some("app".into());
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        req.insert_header("content-type", "application/json").unwrap();
        req.insert_header("content-length", "20").unwrap();
        rt.block_on(async {
            p.request(&mut req, &mut st).await;
            let mut b = Some(Bytes::from_static(b"{\"a\":1,"));
            p.request_body(&mut b, false, &mut st).await.unwrap();
            assert_eq!(b.as_deref(), Some(&b""[..]), "held");
            let mut b = Some(Bytes::from_static(b"\"x\":2}"));
            p.request_body(&mut b, true, &mut st).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&b.unwrap()).unwrap();
            assert_eq!(v, json!({"b": 1, "by": "app", "ip": "10.0.0.9", "t": "rid-1"}));
        });
    }

    #[test]
    fn config_errors_are_located() {
        let cases: &[(&str, &str)] = &[
            ("response: {select: ['a..b']}", "response.select[0]: 'a..b': empty path segment"),
            ("request: {rename: {a: 'b.c'}}", "request.rename.a: new name: 'b.c' must be a single key, not a path (no dots)"),
            ("request: {xml_to_json: true}", "request.xml_to_json: converts responses only (request bodies must be JSON)"),
            ("response: {wrap: x}\nmax_body: 0", "max_body: must be larger than 0"),
            ("response: {wrap: x, max_body: 2GiB}", "response.max_body: at most 1GiB: the body is held in memory"),
            ("response: {selct: [a]}", "response: unknown field 'selct', expected one of 'xml_to_json', 'select', 'remove', 'rename', 'set', 'wrap', 'max_body', 'on_error'"),
            ("response: {wrap: x}\non_error: open", "on_error: unknown variant 'open', expected 'fail' or 'passthrough'"),
        ];
        for (yaml, want) in cases {
            let err = build(yaml).err().unwrap_or_else(|| panic!("{yaml} should fail"));
            assert_eq!(err.to_string(), *want, "{yaml}");
        }
        assert_eq!(build("{}").unwrap().phases(), Phases::NONE);
    }
}
