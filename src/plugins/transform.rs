//! `transform`: *mediation* of JSON bodies. Responses: XML → JSON, and `select` / `remove` /
//! `rename` / `set` / `wrap` with dot paths; requests: the same operations on JSON request
//! bodies (`rename`, `remove`, `set` with `${consumer}`, `${client_ip}`, `${trace_id}`).
//!
//! ```yaml
//! - transform:
//!     max_body: 1MiB                 # default; `response`/`request` may set their own
//!     response: { xml_to_json: true, select: [order.id, order.item], rename: {order.item: items}, wrap: data }
//!     request:  { remove: [debug], set: { meta.by: "${consumer}" } }
//! ```
//!
//! The pure work (the decision, the buffer, gzip, XML, the operations) lives in
//! [`crate::mediation`]; this is the glue to the hooks.
//!
//! # Responses: the head goes before the body
//!
//! Pingora sends the response head before any body hook runs, so the decision is made in the
//! `response` hook, from the head: a 2xx answer (not 206, not to HEAD) whose content type is
//! JSON (or XML with `xml_to_json`), plain or gzip, UTF-8, and whose declared length (if any)
//! is within `max_body`. Anything else passes untouched and
//! `portico_transform_passthrough_total{route,direction,reason}` counts it. A chosen answer
//! loses its `content-length` (it is chunked to HTTP/1.1 clients, close-delimited to HTTP/1.0,
//! DATA frames to HTTP/2), XML's content type becomes `application/json`, a gzip body's
//! `content-encoding` goes (the body is sent decoded), a strong `ETag` becomes weak and
//! `accept-ranges` goes. The body is then held, up to `max_body`, and the new document is sent
//! at its end.
//!
//! When the body turns out not to be transformable, the original goes on, as the head allows:
//! malformed JSON or XML, or an undeclared length that outgrows `max_body`, pass through byte
//! for byte (for XML, under the `application/json` content type already sent); a gzip body that
//! is too large (on the wire or once decoded) or whose document is malformed passes through
//! decoded. A gzip body that does not decode (or decodes past 32 × `max_body`) cannot be sent as
//! the plain body the head announced: the response is cut (the client sees it incomplete) and
//! `portico_transform_cut_total` counts it.
//!
//! Portico's own answers (an aggregate's document) are transformed too: the core runs the body
//! hook on their whole body and writes the exact `content-length`.
//!
//! # Requests
//!
//! Decided in the `request` hook from the client's head (JSON, not encoded, UTF-8, within
//! `max_body`). Bodies of up to 64 KiB are read whole by the core before anything goes
//! upstream, so the upstream gets the new body with its exact `content-length` (a chunked upload
//! too); larger ones are held here up to `max_body` and sent rewritten at their end, chunked.
//! Malformed JSON, or a body past `max_body`, goes to the upstream unchanged.

use crate::config::units::Size;
use crate::config::ConfigError;
use crate::mediation::body::{
    gunzip, gunzip_capped, BodyPolicy, Buffer, Coding, Decision, Fill, Format, GunzipStream, Reason, Transform,
    JSON_CONTENT_TYPE,
};
use crate::mediation::json_ops::{ordered_map, JsonOps, OpsConfig, Var};
use crate::plugin::{Abort, BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, TRANSFER_ENCODING};
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
        "Responses a transform had to cut (a gzip body announced plain that does not decode), by route",
        &["route"]
    )
    .expect("register portico_transform_cut_total")
});

pub fn init_metrics() {
    Lazy::force(&PASSTHROUGH);
    Lazy::force(&TRANSFORMED);
    Lazy::force(&CUT);
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
}

/// One direction's block: the [`OpsConfig`] operations, `xml_to_json` (responses only) and an
/// optional `max_body`.
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
}

impl Side {
    fn build(cfg: &SideConfig, loc: &str, default_max: u64) -> Result<Side, ConfigError> {
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
        })
    }

    /// The held (plain) body → the new body, or the original when it is not the document its
    /// head promised. Counts either way.
    fn rewrite(&self, plain: Bytes, format: Format, st: &RequestState, direction: &str) -> Bytes {
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
        match self.policy.mediate(&plain, how, &self.ops, &vars) {
            Ok(out) => {
                TRANSFORMED.with_label_values(&[&st.route, direction]).inc();
                Bytes::from(out)
            }
            Err(reason) => {
                passed(st, direction, reason);
                plain
            }
        }
    }
}

fn passed(st: &RequestState, direction: &str, reason: Reason) {
    PASSTHROUGH
        .with_label_values(&[&st.route, direction, reason.as_str()])
        .inc();
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
        let response = cfg
            .response
            .as_ref()
            .map(|c| Side::build(c, RESPONSE, default_max))
            .transpose()?;
        let request = match &cfg.request {
            Some(c) if c.xml_to_json => {
                return Err(ConfigError::new(
                    "request.xml_to_json",
                    "converts responses only (request bodies must be JSON)",
                ))
            }
            Some(c) => Some(Side::build(c, REQUEST, default_max)?),
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

fn abort(st: &RequestState, why: Reason) -> Abort {
    CUT.with_label_values(&[&st.route]).inc();
    Abort(format!(
        "transform: the gzip body cannot be sent decoded ({}), and its head already went out without content-encoding",
        why.as_str()
    ))
}

#[async_trait]
impl Plugin for TransformPlugin {
    fn kind(&self) -> PluginKind {
        PluginKind::Mediate
    }

    fn phases(&self) -> Phases {
        let mut p = Phases::NONE;
        if self.response.is_some() {
            p = p | Phases::RESPONSE | Phases::RESPONSE_BODY;
        }
        if self.request.is_some() {
            p = p | Phases::REQUEST | Phases::REQUEST_BODY;
        }
        p
    }

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let Some(side) = &self.request else {
            return Verdict::Continue;
        };
        let has_body = req.headers.contains_key(TRANSFER_ENCODING)
            || req.headers.get(CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
            || (req.version == Version::HTTP_2 && req.headers.contains_key(CONTENT_TYPE));
        match side.policy.decide_headers(&req.headers) {
            Decision::Transform(how) if how.coding == Coding::Identity => {
                st.vars
                    .insert(RequestSlot(Arc::new(Mutex::new(Held::new(how, side.policy.max_body)))));
            }
            // A compressed request body goes to the upstream as it is.
            Decision::Transform(_) => passed(st, REQUEST, Reason::Encoded),
            Decision::PassThrough(reason) if has_body => passed(st, REQUEST, reason),
            Decision::PassThrough(_) => {}
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
                    passed(st, REQUEST, Reason::TooLarge);
                    held.passing = Some(Passing::Raw);
                    *body = Some(all);
                    return Ok(());
                }
            }
        }
        if end_of_stream {
            let plain = held.buf.take();
            if !plain.is_empty() {
                *body = Some(side.rewrite(plain, held.how.format, st, REQUEST));
            }
        }
        Ok(())
    }

    fn response(&self, req: &RequestHeader, resp: &mut ResponseHeader, st: &mut RequestState) {
        let Some(side) = &self.response else {
            return;
        };
        let status = resp.status.as_u16();
        let decision = if req.method == Method::HEAD || !(200..300).contains(&status) || matches!(status, 204 | 206) {
            Decision::PassThrough(Reason::Status)
        } else {
            side.policy.decide_headers(&resp.headers)
        };
        let how = match decision {
            Decision::Transform(how) => how,
            Decision::PassThrough(reason) => {
                passed(st, RESPONSE, reason);
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
        let (Some(side), Some(slot)) = (&self.response, st.vars.get::<ResponseSlot>().cloned()) else {
            return Ok(());
        };
        let mut held = slot.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = &mut *held;
        let cap = side.policy.max_body.saturating_mul(DECODED_PASS_FACTOR);
        // Passing through already (or from this piece on): the rest goes as it comes.
        if held.passing.is_none() {
            if let Some(piece) = body.take() {
                if let Fill::Release(all) = held.buf.push(piece) {
                    passed(st, RESPONSE, Reason::TooLarge);
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
                Some(b) => pass.piece(b).map_err(|r| abort(st, r))?,
                None => Bytes::new(),
            };
            if end_of_stream {
                let last = pass.finish().map_err(|r| abort(st, r))?;
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
                Err(Reason::TooLarge) => {
                    // Fits on the wire, too large once decoded: it goes on decoded, untouched.
                    passed(st, RESPONSE, Reason::TooLarge);
                    let plain = gunzip_capped(&held_body, cap).map_err(|r| abort(st, r))?;
                    *body = Some(plain);
                    return Ok(());
                }
                Err(r) => return Err(abort(st, r)),
            },
        };
        if plain.is_empty() {
            passed(st, RESPONSE, Reason::Empty);
            return Ok(());
        }
        *body = Some(side.rewrite(plain, held.how.format, st, RESPONSE));
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
        assert_eq!(p.phases(), Phases::RESPONSE | Phases::RESPONSE_BODY);
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
        let p = build("response: {wrap: d}\nmax_body: 10").unwrap();
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
        let p = build("response: {remove: [b]}\nmax_body: 100").unwrap();
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

    #[test]
    fn request_bodies() {
        let p = build(
            "request: {rename: {a: b}, remove: [x], set: {by: '${consumer}', ip: '${client_ip}', t: '${trace_id}'}}",
        )
        .unwrap();
        assert_eq!(p.phases(), Phases::REQUEST | Phases::REQUEST_BODY);
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
            ("response: {selct: [a]}", "response: unknown field 'selct', expected one of 'xml_to_json', 'select', 'remove', 'rename', 'set', 'wrap', 'max_body'"),
        ];
        for (yaml, want) in cases {
            let err = build(yaml).err().unwrap_or_else(|| panic!("{yaml} should fail"));
            assert_eq!(err.to_string(), *want, "{yaml}");
        }
        assert_eq!(build("{}").unwrap().phases(), Phases::NONE);
    }
}
