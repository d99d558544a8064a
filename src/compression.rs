//! Response compression at the gateway, for upstreams that send uncompressed text.
//!
//! Pingora's response-compression module does the encoding (gzip, br, zstd, streamed); Portico
//! decides. Per request, once routed: the client's `Accept-Encoding` is read *with* its q-values
//! (Pingora's own parser ignores them, so `gzip;q=0` would get gzip), the first algorithm of the
//! policy's preference order that the client accepts is chosen, and the request's
//! `Accept-Encoding` is narrowed to it (so the module compresses with exactly that, and the
//! upstream may only answer in it or in identity). Per response: only the policy's media types,
//! only bodies of at least `min_length` (when declared), never a body that already has a
//! `Content-Encoding`, never a `Cache-Control: no-transform` one; `Vary: Accept-Encoding` added.
//!
//! As nginx (`gzip_http_version 1.1`), never for an HTTP/1.0 client: a compressed body of
//! unknown length would need chunked framing, which HTTP/1.0 does not have. Never a partial
//! answer (206, or any `Content-Range`: the range counts identity bytes). Never
//! `text/event-stream`: the encoder buffers (it emits when its window fills, not per upstream
//! chunk), so events would reach the client late and in bursts; other streamed text is
//! buffered the same way, which is why such routes want `compression: off`.

use crate::config::raw::{self, RouteCompression};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::compression::ResponseCompression;
use pingora::protocols::http::compression::Algorithm;
use pingora::proxy::Session;

/// A compiled `compression` block.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    algorithms: Vec<(Algorithm, &'static str)>,
    min_length: u64,
    /// Media types (lower-case); an entry ending in `/*` matches a whole top-level type.
    content_types: Vec<String>,
    level: Option<u32>,
}

impl Policy {
    /// Compile a block; errors are `(field, message)` for the caller to locate.
    pub fn compile(c: &raw::Compression) -> Result<Policy, (String, String)> {
        let mut algorithms = Vec::new();
        for (i, a) in c.algorithms.iter().enumerate() {
            let alg = match a.to_ascii_lowercase().as_str() {
                "gzip" => (Algorithm::Gzip, "gzip"),
                "br" | "brotli" => {
                    // Pingora 0.9.1's brotli encoder flushes instead of finishing the stream,
                    // so every br body it makes lacks its last meta-block and strict decoders
                    // refuse it. Offered again once that is fixed upstream.
                    log::warn!(
                        "compression: 'br' is not offered (Pingora 0.9.1's brotli encoder does not end its stream); zstd and gzip are"
                    );
                    continue;
                }
                "zstd" => (Algorithm::Zstd, "zstd"),
                other => {
                    return Err((
                        format!("algorithms[{i}]"),
                        format!("unknown algorithm '{other}' (gzip | br | zstd)"),
                    ))
                }
            };
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        if algorithms.is_empty() {
            return Err((
                "algorithms".into(),
                "list at least one algorithm Portico can offer (zstd, gzip; br is not available with Pingora 0.9.1)"
                    .into(),
            ));
        }
        for (i, t) in c.content_types.iter().enumerate() {
            if !t.contains('/') || t.contains(';') || t.trim() != t {
                return Err((format!("content_types[{i}]"), format!("'{t}' is not a media type")));
            }
        }
        if let Some(l) = c.level {
            if !(1..=19).contains(&l) {
                return Err(("level".into(), "must be between 1 and 19".into()));
            }
        }
        Ok(Policy {
            algorithms,
            min_length: c.min_length.0,
            content_types: c.content_types.iter().map(|t| t.to_ascii_lowercase()).collect(),
            level: c.level,
        })
    }

    /// The policy a route uses: its own block, `off`, or the global one.
    pub fn for_route(
        route: Option<&RouteCompression>,
        global: Option<&std::sync::Arc<Policy>>,
    ) -> Result<Option<std::sync::Arc<Policy>>, (String, String)> {
        match route {
            Some(RouteCompression::Off) => Ok(None),
            Some(RouteCompression::On(c)) => Ok(Some(std::sync::Arc::new(Policy::compile(c)?))),
            None => Ok(global.cloned()),
        }
    }

    /// The algorithm to use for this `Accept-Encoding`, honouring q-values (`q=0` refuses).
    pub fn choose(&self, accept_encoding: Option<&str>) -> Option<(Algorithm, &'static str)> {
        let header = accept_encoding?;
        let mut star: Option<f32> = None;
        let mut offered: Vec<(String, f32)> = Vec::new();
        for item in header.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if token.is_empty() {
                continue;
            }
            let mut q = 1.0f32;
            for p in parts {
                if let Some(v) = p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")) {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            if token == "*" {
                star = Some(q);
            } else {
                offered.push((token, q));
            }
        }
        let q_of = |name: &str| -> f32 {
            offered
                .iter()
                .find(|(t, _)| t == name || (name == "br" && t == "brotli"))
                .map(|(_, q)| *q)
                .or(star)
                .unwrap_or(0.0)
        };
        // The policy's order decides between acceptable algorithms; a higher q wins over it.
        let mut best: Option<((Algorithm, &'static str), f32)> = None;
        for (alg, name) in &self.algorithms {
            let q = q_of(name);
            if q > 0.0 && best.is_none_or(|(_, bq)| q > bq) {
                best = Some(((*alg, *name), q));
            }
        }
        best.map(|(a, _)| a)
    }

    /// Whether a response with this head is one to compress.
    pub fn wants(&self, resp: &ResponseHeader) -> bool {
        let h = &resp.headers;
        if h.contains_key(http::header::CONTENT_ENCODING) {
            return false;
        }
        let no_transform = h
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("no-transform"));
        if no_transform || matches!(resp.status.as_u16(), 204 | 206 | 304) || resp.status.as_u16() < 200 {
            return false;
        }
        // A range of the identity body (RFC 9110 §14): compressing it would describe bytes of a
        // representation that does not exist.
        if h.contains_key(http::header::CONTENT_RANGE) {
            return false;
        }
        let length = h
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if length.is_some_and(|n| n < self.min_length) {
            return false;
        }
        let Some(ct) = h.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        // An event stream must reach the client event by event; the encoder would hold events
        // back until its buffer fills (even under `text/*`).
        if mime == "text/event-stream" {
            return false;
        }
        self.content_types.iter().any(|t| match t.strip_suffix("/*") {
            Some(top) => mime.split('/').next() == Some(top),
            None => *t == mime,
        })
    }

    fn level(&self, alg: Algorithm) -> u32 {
        self.level.unwrap_or(match alg {
            Algorithm::Gzip => 6,
            Algorithm::Brotli => 5,
            _ => 3,
        })
    }
}

/// What was decided for one request (kept in the request's context).
#[derive(Debug, Clone, Copy)]
pub struct Chosen(Algorithm);

/// Once routed: pick the algorithm, narrow the request's `Accept-Encoding`, arm the module.
pub fn negotiate(session: &mut Session, policy: &Policy) -> Option<Chosen> {
    // HTTP/1.0 has no chunked framing for a body whose compressed length is not known yet:
    // never compressed (nginx's `gzip_http_version 1.1`). The client's Accept-Encoding goes to
    // the upstream as sent, as nginx does.
    if session.req_header().version < http::Version::HTTP_11 {
        return None;
    }
    let ae = session
        .req_header()
        .headers
        .get(http::header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let req: &mut RequestHeader = session.req_header_mut();
    let chosen = match policy.choose(ae.as_deref()) {
        Some((alg, name)) => {
            let _ = req.insert_header(http::header::ACCEPT_ENCODING, name);
            Some(Chosen(alg))
        }
        None => {
            if ae.is_some() {
                // Nothing the client accepts: ask the upstream for identity too.
                let _ = req.insert_header(http::header::ACCEPT_ENCODING, "identity");
            }
            None
        }
    };
    if let (Some(Chosen(alg)), Some(module)) = (chosen, session.downstream_modules_ctx.get_mut::<ResponseCompression>())
    {
        // The module reads Accept-Encoding again when the request head passes through it.
        module.adjust_algorithm_level(alg, policy.level(alg));
    }
    chosen
}

/// A response head on its way: compress it or not. Called before the module sees the head.
pub fn decide(session: &mut Session, resp: &mut ResponseHeader, policy: &Policy, chosen: Option<Chosen>) {
    let compress = chosen.is_some() && policy.wants(resp);
    if policy.wants_vary(resp) {
        crate::util::add_vary(resp, "accept-encoding");
    }
    if let (true, Some(Chosen(alg))) = (compress, chosen) {
        if session.req_header().method == http::Method::HEAD {
            // The module leaves a head without a body alone; a HEAD must still announce what
            // a GET would get (RFC 9110 §9.3.2): the encoding, no identity length, a weak ETag.
            announce_encoding(resp, alg);
        }
    }
    if !compress {
        if let Some(module) = session.downstream_modules_ctx.get_mut::<ResponseCompression>() {
            if module.is_header_phase() {
                module.adjust_level(0);
            }
        }
    }
}

/// The head a compressed answer carries, as the module writes it for a GET: no identity
/// length, no ranges, the encoding, the ETag weakened (or dropped when it is not a valid one).
fn announce_encoding(resp: &mut ResponseHeader, alg: Algorithm) {
    for name in [http::header::CONTENT_LENGTH, http::header::ACCEPT_RANGES] {
        if resp.headers.contains_key(&name) {
            resp.remove_header(&name);
        }
    }
    let _ = resp.insert_header(http::header::CONTENT_ENCODING, alg.as_str());
    let etag = resp.headers.get(http::header::ETAG).map(|v| v.as_bytes().to_vec());
    match etag {
        Some(e) if e.starts_with(b"W/") => {}
        Some(e) if e.starts_with(b"\"") => {
            let _ = resp.insert_header(http::header::ETAG, [b"W/".as_slice(), &e].concat());
        }
        Some(_) => {
            resp.remove_header(&http::header::ETAG);
        }
        None => {}
    }
}

impl Policy {
    /// A response whose representation depends on Accept-Encoding (a compressible type).
    fn wants_vary(&self, resp: &ResponseHeader) -> bool {
        !resp.headers.contains_key(http::header::CONTENT_ENCODING) && {
            let mut probe = resp.clone();
            probe.remove_header(&http::header::CONTENT_LENGTH);
            self.wants(&probe)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::compile(&raw::Compression {
            algorithms: vec!["zstd".into(), "br".into(), "gzip".into()],
            min_length: crate::config::units::Size(1024),
            content_types: vec!["text/*".into(), "application/json".into()],
            level: None,
        })
        .unwrap()
    }

    #[test]
    fn the_policy_order_and_q_values_choose() {
        let p = policy();
        let name = |ae: &str| p.choose(Some(ae)).map(|(_, n)| n);
        assert_eq!(name("gzip, deflate, br, zstd"), Some("zstd"));
        assert_eq!(name("gzip, br"), Some("gzip"), "br is never offered");
        assert_eq!(name("gzip"), Some("gzip"));
        assert_eq!(name("gzip;q=0, br"), None);
        assert_eq!(name("zstd;q=0.5, gzip;q=1.0"), Some("gzip"), "a higher q wins");
        assert_eq!(name("*"), Some("zstd"));
        assert_eq!(name("*;q=0"), None);
        assert_eq!(name("identity"), None);
        assert_eq!(p.choose(None), None, "no Accept-Encoding: identity");
    }

    #[test]
    fn only_listed_types_above_the_minimum_and_never_twice() {
        let p = policy();
        let resp = |ct: &str, len: Option<u64>, ce: Option<&str>| {
            let mut r = ResponseHeader::build(200, None).unwrap();
            r.insert_header("content-type", ct).unwrap();
            if let Some(l) = len {
                r.insert_header("content-length", l.to_string()).unwrap();
            }
            if let Some(e) = ce {
                r.insert_header("content-encoding", e).unwrap();
            }
            r
        };
        assert!(p.wants(&resp("application/json; charset=utf-8", Some(100_000), None)));
        assert!(p.wants(&resp("text/html", None, None)), "undeclared length");
        assert!(!p.wants(&resp("text/html", Some(100), None)), "too small");
        assert!(!p.wants(&resp("image/png", Some(100_000), None)));
        assert!(
            !p.wants(&resp("application/json", Some(100_000), Some("gzip"))),
            "already encoded"
        );
    }

    #[test]
    fn bad_blocks_are_located() {
        let mut c = raw::Compression {
            algorithms: vec!["lzma".into()],
            min_length: crate::config::units::Size(0),
            content_types: vec![],
            level: None,
        };
        assert_eq!(Policy::compile(&c).unwrap_err().0, "algorithms[0]");
        c.algorithms = vec!["gzip".into()];
        c.content_types = vec!["json".into()];
        assert_eq!(Policy::compile(&c).unwrap_err().0, "content_types[0]");
    }
}
