//! Which response bodies `transform` touches, and how: the decision from the response head,
//! a bounded [`Buffer`] for the body, bounded gzip decoding, and the body → JSON → body step.
//!
//! The glue's flow for one response:
//!
//! 1. [`BodyPolicy::decide_headers`] on the response head. `PassThrough(reason)`: count the
//!    reason and touch nothing. `Transform(how)`: hold the body back in a [`Buffer`] of
//!    `max_body` bytes.
//! 2. A chunk that makes the buffer overflow comes back as [`Fill::Release`] with everything
//!    held so far: send it on untouched, and every later chunk too (the reason is
//!    [`Reason::TooLarge`]). The head must not have been changed before the body is known.
//! 3. At the end of the body, [`BodyPolicy::mediate`] turns the held bytes into the new JSON
//!    body, or says why the original must pass through after all (`Invalid`, `BadEncoding`,
//!    a gzip body that decodes past `max_body`, …).
//!
//! A transformed body is always plain (not encoded) `application/json`; the glue fixes
//! `content-type`, drops `content-encoding` and sets the framing.
//!
//! (Over 500 lines because of its table of unit tests, kept beside the code they pin down.)

use super::json_ops::{JsonOps, Vars};
use super::xml;
use bytes::{Bytes, BytesMut};
use serde_json::Value;
use std::borrow::Cow;
use std::io::{Read, Write};

/// The content type of every transformed body.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// What a body is, when it is transformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// XML, converted to JSON first.
    Xml,
}

/// How a transformed body arrives encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transform {
    pub format: Format,
    pub coding: Coding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Transform(Transform),
    PassThrough(Reason),
}

/// Why a body passed through untouched (a metric label: [`Reason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The declared length, the body, or its decoded size is over `max_body`.
    TooLarge,
    /// The content type is not JSON (nor XML when `xml_to_json` is on), or there is none.
    NotJson,
    /// A content encoding other than gzip (br, zstd, deflate, several codings).
    Encoded,
    /// A charset other than UTF-8.
    Charset,
    /// No body at all.
    Empty,
    /// gzip data that does not decode.
    BadEncoding,
    /// The body is not the JSON or XML its content type says.
    Invalid,
    /// A status whose body is not a document to reshape: not 2xx (errors keep their shape),
    /// 206 (a byte range), or no body by definition (1xx, 204, 304, an answer to HEAD).
    Status,
    /// More than one `Content-Type` (a reader may take either).
    Ambiguous,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::NotJson => "not_json",
            Reason::Encoded => "encoded",
            Reason::Charset => "charset",
            Reason::Empty => "empty",
            Reason::BadEncoding => "bad_encoding",
            Reason::Invalid => "invalid",
            Reason::Status => "status",
            Reason::Ambiguous => "ambiguous",
        }
    }
}

/// One route's body rules: how much may be held, and whether XML is converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPolicy {
    /// Bound on the body as it arrives and, for gzip, on its decoded size too.
    pub max_body: usize,
    pub xml_to_json: bool,
}

impl BodyPolicy {
    /// Decide from a head. The content type is checked first, then the encoding, the charset
    /// (XML only: JSON is UTF-8 by definition, RFC 8259, so a `charset` parameter on a JSON
    /// type changes nothing and a body that is not UTF-8 is invalid), and the declared length
    /// (an undeclared length is bounded by the [`Buffer`]).
    pub fn decide(
        &self,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        content_length: Option<u64>,
    ) -> Decision {
        let Some(ct) = content_type else {
            return Decision::PassThrough(Reason::NotJson);
        };
        let mut params = ct.split(';');
        let essence = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let format = if is_json(&essence) {
            Format::Json
        } else if self.xml_to_json && is_xml(&essence) {
            Format::Xml
        } else {
            return Decision::PassThrough(Reason::NotJson);
        };
        let coding = match coding(content_encoding) {
            Some(c) => c,
            None => return Decision::PassThrough(Reason::Encoded),
        };
        for p in params.filter(|_| format == Format::Xml) {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("charset") {
                    let v = v.trim().trim_matches('"').to_ascii_lowercase();
                    if !matches!(v.as_str(), "utf-8" | "utf8" | "us-ascii") {
                        return Decision::PassThrough(Reason::Charset);
                    }
                }
            }
        }
        match content_length {
            Some(0) => Decision::PassThrough(Reason::Empty),
            Some(n) if n > self.max_body as u64 => Decision::PassThrough(Reason::TooLarge),
            _ => Decision::Transform(Transform { format, coding }),
        }
    }

    /// [`BodyPolicy::decide`] on a response's headers. An unreadable `content-length` counts
    /// as undeclared: the [`Buffer`] bounds the body anyway.
    pub fn decide_headers(&self, headers: &http::HeaderMap) -> Decision {
        let ct = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        // Several content-encoding lines are one list of codings.
        let mut ce = String::new();
        for v in headers.get_all(http::header::CONTENT_ENCODING) {
            match v.to_str() {
                Ok(s) => {
                    if !ce.is_empty() {
                        ce.push(',');
                    }
                    ce.push_str(s);
                }
                Err(_) => return Decision::PassThrough(Reason::Encoded),
            }
        }
        let len = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        self.decide(ct, (!ce.is_empty()).then_some(ce.as_str()), len)
    }

    /// The held body as JSON: decoded (bounded by `max_body`) and parsed (XML converted).
    pub fn to_json(&self, body: &[u8], how: Transform) -> Result<Value, Reason> {
        if body.len() > self.max_body {
            return Err(Reason::TooLarge);
        }
        let plain: Cow<[u8]> = match how.coding {
            Coding::Identity => Cow::Borrowed(body),
            Coding::Gzip => Cow::Owned(gunzip(body, self.max_body)?),
        };
        if plain.is_empty() {
            return Err(Reason::Empty);
        }
        match how.format {
            // A UTF-8 byte order mark is ignored (RFC 8259 §8.1 allows it); NaN, a lone
            // surrogate or any other non-JSON is `Invalid`.
            Format::Json => serde_json::from_slice(plain.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&plain))
                .map_err(|_| Reason::Invalid),
            Format::Xml => xml::to_json(&plain).map_err(|_| Reason::Invalid),
        }
    }

    /// The whole step: the held body → JSON → `ops` → the new body's bytes (plain JSON).
    /// `Err` names why the original body must be sent instead.
    pub fn mediate(&self, body: &[u8], how: Transform, ops: &JsonOps, vars: &dyn Vars) -> Result<Vec<u8>, Reason> {
        let doc = ops.apply_with(self.to_json(body, how)?, vars);
        serde_json::to_vec(&doc).map_err(|_| Reason::Invalid)
    }
}

/// Whether an `Accept-Encoding` accepts gzip (`gzip`/`x-gzip`, or `*`, with a q-value above 0).
/// No header at all counts as no: a transform asks its upstream for gzip only when the client
/// could take a gzip answer that passes through untransformed (an error, say).
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    let mut star = None;
    for item in accept_encoding.unwrap_or("").split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map(|(_, v)| v.trim().parse::<f32>().unwrap_or(0.0))
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => return q > 0.0,
            "*" => star = Some(q > 0.0),
            _ => {}
        }
    }
    star.unwrap_or(false)
}

/// True for a JSON content type, parameters and case aside (`application/json; charset=utf-8`).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    is_json(&essence)
}

/// `application/json`, `text/json` and any `application/…+json` (problem+json, vnd.api+json).
fn is_json(essence: &str) -> bool {
    essence == "application/json"
        || essence == "text/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `application/xml`, `text/xml` and any `application/…+xml` (soap+xml, atom+xml).
fn is_xml(essence: &str) -> bool {
    essence == "application/xml"
        || essence == "text/xml"
        || (essence.starts_with("application/") && essence.ends_with("+xml"))
}

/// The coding of a `content-encoding` value, `None` when it is one we do not decode.
fn coding(ce: Option<&str>) -> Option<Coding> {
    let codings: Vec<String> = ce
        .unwrap_or("")
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    match codings.as_slice() {
        [] => Some(Coding::Identity),
        [c] if c == "gzip" || c == "x-gzip" => Some(Coding::Gzip),
        _ => None,
    }
}

/// Decode gzip (several members too), stopping at `max` decoded bytes: a small bomb that
/// inflates to gigabytes costs at most `max + 1` bytes of memory and is [`Reason::TooLarge`].
pub fn gunzip(input: &[u8], max: usize) -> Result<Vec<u8>, Reason> {
    let mut out = Vec::new();
    let limit = (max as u64).saturating_add(1);
    flate2::read::MultiGzDecoder::new(input)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|_| Reason::BadEncoding)?;
    if out.len() > max {
        return Err(Reason::TooLarge);
    }
    Ok(out)
}

/// gzip decoded piece by piece, for a body that must go on plain after all (the head already
/// said so) but is not held whole: each piece's plain bytes come back at once. The plain output
/// of one call is capped, so a small bomb cannot make a huge piece: past `cap` it is
/// [`Reason::TooLarge`] and the body cannot go on.
pub struct GunzipStream {
    dec: flate2::write::MultiGzDecoder<Capped>,
}

/// A `Vec` that refuses to grow past `cap` (so the decoder stops instead of filling memory).
struct Capped {
    out: Vec<u8>,
    cap: usize,
    over: bool,
}

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(b.len()) > self.cap {
            self.over = true;
            return Err(std::io::Error::other("decoded piece over the cap"));
        }
        self.out.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl GunzipStream {
    /// `cap`: the most plain bytes one [`GunzipStream::push`] (or the finish) may produce.
    pub fn new(cap: usize) -> GunzipStream {
        GunzipStream {
            dec: flate2::write::MultiGzDecoder::new(Capped {
                out: Vec::new(),
                cap,
                over: false,
            }),
        }
    }

    /// The plain bytes of the next compressed piece.
    pub fn push(&mut self, piece: &[u8]) -> Result<Bytes, Reason> {
        let r = self.dec.write_all(piece).and_then(|_| self.dec.flush());
        self.result(r)
    }

    /// At the end of the body: the last plain bytes, or why the gzip data is not whole.
    pub fn finish(&mut self) -> Result<Bytes, Reason> {
        let r = self.dec.try_finish();
        self.result(r)
    }

    fn result(&mut self, r: std::io::Result<()>) -> Result<Bytes, Reason> {
        let out = self.dec.get_mut();
        match r {
            Ok(()) => Ok(Bytes::from(std::mem::take(&mut out.out))),
            Err(_) if out.over => Err(Reason::TooLarge),
            Err(_) => Err(Reason::BadEncoding),
        }
    }
}

/// Decode a whole gzip body of any size up to `cap` (the plain body of a gzip answer that is
/// passed through decoded because it is too large to transform).
pub fn gunzip_capped(input: &[u8], cap: usize) -> Result<Bytes, Reason> {
    let mut s = GunzipStream::new(cap);
    let mut out = BytesMut::from(&s.push(input)?[..]);
    out.extend_from_slice(&s.finish()?);
    Ok(out.freeze())
}

/// A response body held back until its end, up to a limit. Past the limit it gives every byte
/// back, unchanged and in order, so the glue can send the original body on.
#[derive(Debug)]
pub struct Buffer {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    overflowed: bool,
}

/// What [`Buffer::push`] did with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Held: send nothing yet.
    Held,
    /// Over the limit: send these bytes now (on the first overflow, everything held so far
    /// followed by the chunk; after it, each chunk as it came).
    Release(Bytes),
}

impl Buffer {
    pub fn new(limit: usize) -> Buffer {
        Buffer {
            chunks: Vec::new(),
            len: 0,
            limit,
            overflowed: false,
        }
    }

    pub fn push(&mut self, chunk: Bytes) -> Fill {
        if self.overflowed {
            return Fill::Release(chunk);
        }
        if self.len.saturating_add(chunk.len()) > self.limit {
            self.overflowed = true;
            let mut all = BytesMut::with_capacity(self.len + chunk.len());
            for c in self.chunks.drain(..) {
                all.extend_from_slice(&c);
            }
            all.extend_from_slice(&chunk);
            self.len = 0;
            return Fill::Release(all.freeze());
        }
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push(chunk);
        }
        Fill::Held
    }

    /// True once the limit was passed (the body is being passed through).
    pub fn is_overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes held now.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The held body as one piece (no copy when it came in one chunk); the buffer is left empty.
    pub fn take(&mut self) -> Bytes {
        self.len = 0;
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(self.chunks.iter().map(Bytes::len).sum());
                for c in self.chunks.drain(..) {
                    all.extend_from_slice(&c);
                }
                all.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mediation::json_ops::{NoVars, OpsConfig};
    use flate2::write::GzEncoder;
    use serde_json::json;
    use std::io::Write;

    const JSON: Transform = Transform {
        format: Format::Json,
        coding: Coding::Identity,
    };

    fn policy() -> BodyPolicy {
        BodyPolicy {
            max_body: 1000,
            xml_to_json: true,
        }
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn decide_table() {
        use Decision::{PassThrough as Pass, Transform as T};
        use Reason::*;
        let t = |format, coding| T(Transform { format, coding });
        let (json, xml) = (t(Format::Json, Coding::Identity), t(Format::Xml, Coding::Identity));
        // (content-type, content-encoding, content-length, decision)
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<u64>, Decision);
        let cases: &[Case] = &[
            (Some("application/json"), None, Some(10), json),
            (Some("application/json; charset=utf-8"), None, None, json),
            (Some("Application/JSON;Charset=\"UTF-8\""), None, None, json),
            (Some("text/json"), None, None, json),
            (Some("application/problem+json"), None, None, json),
            (Some("application/vnd.api+json"), Some("identity"), None, json),
            (
                Some("application/json"),
                Some("gzip"),
                Some(10),
                t(Format::Json, Coding::Gzip),
            ),
            (
                Some("application/json"),
                Some("x-gzip"),
                None,
                t(Format::Json, Coding::Gzip),
            ),
            (
                Some("application/json"),
                Some("identity, GZIP"),
                None,
                t(Format::Json, Coding::Gzip),
            ),
            (Some("application/xml"), None, None, xml),
            (Some("text/xml; charset=utf-8"), None, None, xml),
            (
                Some("application/soap+xml"),
                Some("gzip"),
                None,
                t(Format::Xml, Coding::Gzip),
            ),
            (Some("image/svg+xml"), None, None, Pass(NotJson)),
            (Some("text/html"), None, None, Pass(NotJson)),
            (Some("application/jsonx"), None, None, Pass(NotJson)),
            (Some("text/plain"), Some("br"), Some(2000), Pass(NotJson)),
            (None, None, None, Pass(NotJson)),
            (Some("application/json"), Some("br"), None, Pass(Encoded)),
            (Some("application/json"), Some("zstd"), None, Pass(Encoded)),
            (Some("application/json"), Some("deflate"), None, Pass(Encoded)),
            (Some("application/json"), Some("gzip, gzip"), None, Pass(Encoded)),
            (Some("application/json"), Some("gzip, br"), None, Pass(Encoded)),
            // JSON is UTF-8 whatever the label says: the body decides (not UTF-8 → Invalid).
            (Some("application/json; charset=iso-8859-1"), None, None, json),
            (Some("Application/Merge-Patch+JSON; Charset=latin1"), None, None, json),
            (Some("application/xml; charset=iso-8859-1"), None, None, Pass(Charset)),
            (Some("text/xml; charset=\"UTF-8\""), None, None, xml),
            (Some("application/json"), None, Some(1000), json),
            (Some("application/json"), None, Some(1001), Pass(TooLarge)),
            (Some("application/json"), Some("gzip"), Some(5000), Pass(TooLarge)),
            (Some("application/json"), None, Some(0), Pass(Empty)),
        ];
        for (ct, ce, len, want) in cases {
            assert_eq!(policy().decide(*ct, *ce, *len), *want, "{ct:?} {ce:?} {len:?}");
        }
        let no_xml = BodyPolicy {
            xml_to_json: false,
            ..policy()
        };
        assert_eq!(no_xml.decide(Some("application/xml"), None, None), Pass(NotJson));
    }

    #[test]
    fn decide_from_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("content-length", "12".parse().unwrap());
        assert_eq!(policy().decide_headers(&h), Decision::Transform(JSON));
        h.append("content-encoding", "identity".parse().unwrap());
        h.append("content-encoding", "gzip".parse().unwrap());
        assert_eq!(
            policy().decide_headers(&h),
            Decision::Transform(Transform {
                format: Format::Json,
                coding: Coding::Gzip
            })
        );
        h.append("content-encoding", "br".parse().unwrap());
        assert_eq!(policy().decide_headers(&h), Decision::PassThrough(Reason::Encoded));
        h.remove("content-encoding");
        h.insert("content-length", "nope".parse().unwrap());
        assert_eq!(policy().decide_headers(&h), Decision::Transform(JSON));
        h.insert("content-length", "5000".parse().unwrap());
        assert_eq!(policy().decide_headers(&h), Decision::PassThrough(Reason::TooLarge));
        assert_eq!(
            policy().decide_headers(&http::HeaderMap::new()),
            Decision::PassThrough(Reason::NotJson)
        );
    }

    #[test]
    fn to_json_table() {
        let p = policy();
        let gzip = |format| Transform {
            format,
            coding: Coding::Gzip,
        };
        let xml = Transform {
            format: Format::Xml,
            coding: Coding::Identity,
        };
        let big = format!("[{}0]", "0,".repeat(600));
        let cases: Vec<(Vec<u8>, Transform, Result<Value, Reason>)> = vec![
            (b"{\"a\":1}".to_vec(), JSON, Ok(json!({"a": 1}))),
            (b"<a>1</a>".to_vec(), xml, Ok(json!({"a": "1"}))),
            (gz(b"{\"a\":1}"), gzip(Format::Json), Ok(json!({"a": 1}))),
            (gz(b"<a>1</a>"), gzip(Format::Xml), Ok(json!({"a": "1"}))),
            ([gz(b"[1,"), gz(b"2]")].concat(), gzip(Format::Json), Ok(json!([1, 2]))),
            (b"".to_vec(), JSON, Err(Reason::Empty)),
            (gz(b""), gzip(Format::Json), Err(Reason::Empty)),
            (b"{\"a\":".to_vec(), JSON, Err(Reason::Invalid)),
            (b"\xEF\xBB\xBF{\"a\":1}".to_vec(), JSON, Ok(json!({"a": 1}))),
            (b"{\"a\":NaN}".to_vec(), JSON, Err(Reason::Invalid)),
            (b"{\"a\":\"\\ud800\"}".to_vec(), JSON, Err(Reason::Invalid)),
            (b"{\"a\":\"\xE9\"}".to_vec(), JSON, Err(Reason::Invalid)),
            (
                b"{\"a\":1e400}".to_vec(),
                JSON,
                Ok(serde_json::from_str("{\"a\":1e400}").unwrap()),
            ),
            (b"<a>".to_vec(), xml, Err(Reason::Invalid)),
            (b"{\"a\":1}".to_vec(), gzip(Format::Json), Err(Reason::BadEncoding)),
            (
                gz(b"{\"a\":1}")[..10].to_vec(),
                gzip(Format::Json),
                Err(Reason::BadEncoding),
            ),
            (big.clone().into_bytes(), JSON, Err(Reason::TooLarge)),
            // Small on the wire, past max_body once decoded.
            (gz(big.as_bytes()), gzip(Format::Json), Err(Reason::TooLarge)),
        ];
        for (body, how, want) in cases {
            assert_eq!(
                p.to_json(&body, how),
                want,
                "{how:?} {}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn accept_encoding_for_the_upstream() {
        for (ae, gzip) in [
            (None, false),
            (Some(""), false),
            (Some("gzip"), true),
            (Some("br, GZIP;q=0.5"), true),
            (Some("x-gzip"), true),
            (Some("deflate, br, zstd"), false),
            (Some("gzip;q=0"), false),
            (Some("gzip; q=0.000"), false),
            (Some("*"), true),
            (Some("*;q=0"), false),
            (Some("gzip;q=0, *"), false),
            (Some("identity"), false),
        ] {
            assert_eq!(accepts_gzip(ae), gzip, "{ae:?}");
        }
    }

    #[test]
    fn zip_bomb_stops_at_the_bound() {
        // 64 MiB of zeros is about 64 KiB of gzip.
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 1 << 17);
        assert_eq!(gunzip(&bomb, 1 << 20), Err(Reason::TooLarge));
        assert_eq!(gunzip(&gz(b"abc"), 3), Ok(b"abc".to_vec()));
        assert_eq!(gunzip(&gz(b"abcd"), 3), Err(Reason::TooLarge));
        assert_eq!(gunzip(&gz(b""), 0), Ok(Vec::new()));
    }

    #[test]
    fn mediate_end_to_end() {
        let cfg: OpsConfig = serde_yaml::from_str("select: [order.item]\nwrap: data").unwrap();
        let ops = JsonOps::compile(&cfg, "response").unwrap();
        let xml = b"<order id=\"1\"><item>a</item><item>b</item></order>";
        let how = Transform {
            format: Format::Xml,
            coding: Coding::Gzip,
        };
        let out = policy().mediate(&gz(xml), how, &ops, &NoVars).unwrap();
        assert_eq!(out, br#"{"data":{"order":{"item":["a","b"]}}}"#);
        assert_eq!(policy().mediate(b"nope", JSON, &ops, &NoVars), Err(Reason::Invalid));
        assert_eq!(Reason::TooLarge.as_str(), "too_large");
    }

    #[test]
    fn gunzip_stream_piece_by_piece() {
        let plain: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_string().into_bytes()).collect();
        let packed = [gz(&plain[..20_000]), gz(&plain[20_000..])].concat();
        let mut s = GunzipStream::new(1 << 20);
        let mut out = Vec::new();
        for piece in packed.chunks(777) {
            out.extend_from_slice(&s.push(piece).unwrap());
        }
        out.extend_from_slice(&s.finish().unwrap());
        assert_eq!(out, plain);
        assert_eq!(gunzip_capped(&packed, 1 << 20).unwrap(), plain);
        // Cut short, or not gzip at all.
        let mut cut = GunzipStream::new(1 << 20);
        cut.push(&packed[..packed.len() / 3]).unwrap();
        assert_eq!(cut.finish(), Err(Reason::BadEncoding));
        let mut not_gzip = GunzipStream::new(100);
        let _ = not_gzip.push(b"{\"a\":1}");
        assert_eq!(not_gzip.finish(), Err(Reason::BadEncoding));
        assert_eq!(
            GunzipStream::new(100).push(b"{\"a\":1, \"b\": [1, 2, 3]}"),
            Err(Reason::BadEncoding)
        );
        // A piece that inflates past the cap stops there.
        let zeros = gz(&vec![0u8; 1 << 20]);
        assert_eq!(GunzipStream::new(64 << 10).push(&zeros), Err(Reason::TooLarge));
        assert_eq!(gunzip_capped(&zeros, 64 << 10), Err(Reason::TooLarge));
    }

    #[test]
    fn buffer_holds_then_releases_everything_in_order() {
        let mut b = Buffer::new(10);
        assert!(b.is_empty());
        assert_eq!(b.push(Bytes::from_static(b"abcd")), Fill::Held);
        assert_eq!(b.push(Bytes::new()), Fill::Held);
        assert_eq!(b.push(Bytes::from_static(b"efgh")), Fill::Held);
        assert_eq!(b.len(), 8);
        assert!(!b.is_overflowed());
        assert_eq!(
            b.push(Bytes::from_static(b"ijk")),
            Fill::Release(Bytes::from_static(b"abcdefghijk"))
        );
        assert!(b.is_overflowed());
        assert_eq!(b.len(), 0);
        assert_eq!(
            b.push(Bytes::from_static(b"lm")),
            Fill::Release(Bytes::from_static(b"lm"))
        );
        assert_eq!(b.take(), Bytes::new());
    }

    #[test]
    fn buffer_take() {
        let mut b = Buffer::new(10);
        assert_eq!(
            b.push(Bytes::from_static(b"0123456789")),
            Fill::Held,
            "exactly the limit fits"
        );
        assert_eq!(b.take(), Bytes::from_static(b"0123456789"));
        assert!(b.is_empty());
        b.push(Bytes::from_static(b"ab"));
        b.push(Bytes::from_static(b"cd"));
        assert_eq!(b.take(), Bytes::from_static(b"abcd"));
        assert_eq!(b.take(), Bytes::new());
        let mut zero = Buffer::new(0);
        assert_eq!(zero.push(Bytes::new()), Fill::Held);
        assert_eq!(
            zero.push(Bytes::from_static(b"x")),
            Fill::Release(Bytes::from_static(b"x"))
        );
    }
}
