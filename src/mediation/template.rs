//! An aggregate call's path: `/users/{id}/orders?since=${query.since}&u=${user.id}`.
//!
//! # Placeholders
//!
//! | written | value |
//! |---|---|
//! | `{id}` | the route's path parameter `id` (the route's `path: /profile/{id}` template) |
//! | `${query.since}` | the client's query parameter `since` (the first one, form-decoded) |
//! | `${user.id}` | field `id` of the JSON answer of the earlier call `user` |
//! | `${user.items.0.id}` | a numeric segment indexes an array: `id` of the first item |
//! | `${user}` | the whole answer of `user`, when it is a string or a number |
//!
//! A value from an answer must be a string, a number or a boolean (`true`); anything else,
//! and a field that is missing, fails that one call (see [`MissingValue`]): never the gateway.
//! A client query parameter that is absent is the empty string in the query part, and fails
//! the call in the path part, where an empty segment would change the path's meaning.
//!
//! # Encoding: a value can never change the shape of the URL
//!
//! Every value is percent-encoded before it is put in, everything but `A-Z a-z 0-9 - . _ ~`:
//! `/`, `?`, `#`, `&`, `=`, `+`, `%` and spaces included (a space is `%20`). So `../x?y=1`
//! becomes `..%2Fx%3Fy%3D1`, and in a query value `a&admin=1` becomes `a%26admin%3D1`. Route
//! parameters arrive percent-encoded as the client sent them: they are decoded first, so
//! nothing is encoded twice.
//!
//! In the path, a value that is empty or made only of dots (`.`, `..`, `...`) fails the call.
//! Encoding cannot make a dot segment safe: `%2E` *is* `.` (RFC 3986 §6.2.2.2), and servers
//! that normalise paths, Portico's own [`crate::route::normalize_path`] among them, turn
//! `/users/%2E%2E/admin` into `/admin`. In the query such values are harmless and go as they
//! are.
//!
//! (Over 500 lines because of its table of unit tests, kept beside the code they pin down.)

use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;

/// Everything but RFC 3986's unreserved characters.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `${KEY.a.b}`: a field of an earlier call's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub key: String,
    pub path: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Param(String),
    Query(String),
    Answer(Reference),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    part: Part,
    /// After the template's `?`: encoded as a query value, and an absent query parameter is "".
    in_query: bool,
}

/// A call path, parsed once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    pieces: Vec<Piece>,
}

/// Why a call's path could not be rendered: that call fails, the others go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{placeholder}: {why}")]
pub struct MissingValue {
    /// The placeholder as written: `${user.items.0.id}`.
    pub placeholder: String,
    pub why: Why,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Why {
    #[error("the route captured no such parameter")]
    NoParam,
    #[error("the request has no such query parameter")]
    NoQuery,
    #[error("call '{0}' has no answer")]
    NoAnswer(String),
    #[error("the answer of call '{key}' has no field '{path}'")]
    NoField { key: String, path: String },
    #[error("the answer of call '{key}' at '{path}' is not a string, a number or a boolean")]
    NotScalar { key: String, path: String },
    #[error("the value is empty, and a path segment must not be")]
    Empty,
    #[error("the value is made only of dots, which a path would read as '.' or '..'")]
    DotSegment,
}

impl PathTemplate {
    /// Parse and check the syntax (which names exist is [`super::calls`]' job).
    pub fn parse(s: &str) -> Result<PathTemplate, String> {
        if !s.starts_with('/') {
            return Err(format!("'{s}' must start with '/'"));
        }
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut in_query = false;
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            let placeholder = if rest.starts_with("${") {
                Some(2)
            } else if c == '{' {
                Some(1)
            } else {
                None
            };
            if let Some(open) = placeholder {
                let end = rest
                    .find('}')
                    .ok_or_else(|| format!("unclosed '{}' in '{s}'", &rest[..open]))?;
                let inner = &rest[open..end];
                let part = if open == 2 { dollar(inner)? } else { param(inner)? };
                if !lit.is_empty() {
                    pieces.push(Piece {
                        part: Part::Lit(std::mem::take(&mut lit)),
                        in_query,
                    });
                }
                pieces.push(Piece { part, in_query });
                rest = &rest[end + 1..];
                continue;
            }
            match c {
                '}' => return Err(format!("'}}' without '{{' in '{s}'")),
                '#' => return Err(format!("'{s}' has a fragment ('#'), which is never sent to a server")),
                '?' if !in_query => {
                    if !lit.is_empty() {
                        pieces.push(Piece {
                            part: Part::Lit(std::mem::take(&mut lit)),
                            in_query,
                        });
                    }
                    in_query = true;
                }
                _ => {}
            }
            lit.push(c);
            rest = &rest[c.len_utf8()..];
        }
        if !lit.is_empty() {
            pieces.push(Piece {
                part: Part::Lit(lit),
                in_query,
            });
        }
        let t = PathTemplate {
            source: s.to_string(),
            pieces,
        };
        // The literal text must make a valid request target on its own.
        let sample = t.fill(|_| Ok::<_, String>("x".to_string()))?;
        sample
            .parse::<http::uri::PathAndQuery>()
            .map_err(|_| format!("'{s}' is not a valid path (spaces and control characters must be encoded)"))?;
        Ok(t)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The route parameters used (`{id}`).
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match &p.part {
            Part::Param(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// The answers of other calls used (`${user.id}`).
    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.pieces.iter().filter_map(|p| match &p.part {
            Part::Answer(r) => Some(r),
            _ => None,
        })
    }

    /// The path and query for this request. `params` are the route's captured parameters,
    /// `query` the client's raw query string, `answers` the JSON (or string) answers of the
    /// calls this one depends on.
    pub fn render(
        &self,
        params: &[(String, String)],
        query: Option<&str>,
        answers: &HashMap<String, Value>,
    ) -> Result<String, MissingValue> {
        self.fill(|piece| {
            let missing = |why| MissingValue {
                placeholder: placeholder(&piece.part),
                why,
            };
            let value = match &piece.part {
                // `fill` asks only for placeholders.
                Part::Lit(_) => return Ok(String::new()),
                Part::Param(n) => {
                    let raw = params
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.as_str())
                        .ok_or_else(|| missing(Why::NoParam))?;
                    percent_decode_str(raw).collect::<Vec<u8>>()
                }
                Part::Query(n) => match query.and_then(|q| query_value(q, n)) {
                    Some(v) => v,
                    None if piece.in_query => Vec::new(),
                    None => return Err(missing(Why::NoQuery)),
                },
                Part::Answer(r) => answer_value(r, answers).map_err(missing)?.into_bytes(),
            };
            if !piece.in_query {
                if value.is_empty() {
                    return Err(missing(Why::Empty));
                }
                if value.iter().all(|b| *b == b'.') {
                    return Err(missing(Why::DotSegment));
                }
            }
            Ok(encode(&value))
        })
    }

    /// The template with each placeholder replaced by `value(piece)`.
    fn fill<E>(&self, mut value: impl FnMut(&Piece) -> Result<String, E>) -> Result<String, E> {
        let mut out = String::with_capacity(self.source.len());
        for piece in &self.pieces {
            match &piece.part {
                Part::Lit(s) => out.push_str(s),
                _ => out.push_str(&value(piece)?),
            }
        }
        Ok(out)
    }
}

fn placeholder(part: &Part) -> String {
    match part {
        Part::Lit(s) => s.clone(),
        Part::Param(n) => format!("{{{n}}}"),
        Part::Query(n) => format!("${{query.{n}}}"),
        Part::Answer(r) if r.path.is_empty() => format!("${{{}}}", r.key),
        Part::Answer(r) => format!("${{{}.{}}}", r.key, r.path.join(".")),
    }
}

/// `{name}`: a route parameter (the route's own rule: letters, digits, '_').
fn param(inner: &str) -> Result<Part, String> {
    if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "bad parameter '{{{inner}}}': use {{name}} with letters, digits or '_'"
        ));
    }
    Ok(Part::Param(inner.to_string()))
}

/// `${query.NAME}` or `${KEY.field.sub}`.
fn dollar(inner: &str) -> Result<Part, String> {
    if inner == "query" {
        return Err("'${query}' needs a parameter name: ${query.NAME}".into());
    }
    if let Some(name) = inner.strip_prefix("query.") {
        if name.is_empty() {
            return Err("'${query.}' needs a parameter name: ${query.NAME}".into());
        }
        return Ok(Part::Query(name.to_string()));
    }
    let mut segs = inner.split('.');
    let key = segs.next().unwrap_or("");
    let path: Vec<String> = segs.map(str::to_string).collect();
    if key.is_empty() || path.iter().any(String::is_empty) {
        return Err(format!(
            "bad reference '${{{inner}}}': write ${{KEY.field}} with no empty segment"
        ));
    }
    Ok(Part::Answer(Reference {
        key: key.to_string(),
        path,
    }))
}

/// The first value of query parameter `name` in a raw query string, form-decoded (bytes, so
/// that what is not UTF-8 passes through unchanged).
fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    query
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| form_decode(k) == name.as_bytes())
        .map(|(_, v)| form_decode(v))
}

fn form_decode(s: &str) -> Vec<u8> {
    percent_decode_str(&s.replace('+', " ")).collect()
}

fn answer_value(r: &Reference, answers: &HashMap<String, Value>) -> Result<String, Why> {
    let mut v = answers.get(&r.key).ok_or_else(|| Why::NoAnswer(r.key.clone()))?;
    let path = || r.path.join(".");
    for seg in &r.path {
        let next = match v {
            Value::Object(m) => m.get(seg),
            Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        v = next.ok_or_else(|| Why::NoField {
            key: r.key.clone(),
            path: path(),
        })?;
    }
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(Why::NotScalar {
            key: r.key.clone(),
            path: path(),
        }),
    }
}

/// Percent-encode everything but unreserved characters.
fn encode(value: &[u8]) -> String {
    percent_encode(value, VALUE).to_string()
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> PathTemplate {
        PathTemplate::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn answers() -> HashMap<String, Value> {
        let mut a = HashMap::new();
        a.insert(
            "user".to_string(),
            json!({"id": 42, "name": "../x?y=1", "ok": true, "items": [{"id": "i-1"}, {"id": 2.5}],
                   "dots": "..", "dot": ".", "empty": "", "none": null, "obj": {}, "amp": "a&admin=1 +#"}),
        );
        a.insert("plain".to_string(), json!("text/plain answer"));
        a
    }

    fn params() -> Vec<(String, String)> {
        vec![
            ("id".to_string(), "7".to_string()),
            ("enc".to_string(), "a%20b%2Fc".to_string()),
            ("dots".to_string(), "%2E%2E".to_string()),
        ]
    }

    #[test]
    fn render_table() {
        let q = Some("since=2024-01-01&u=a+b&x=%26y%3D1&since=ignored&flag&e=");
        let cases: &[(&str, &str)] = &[
            ("/users/{id}/orders", "/users/7/orders"),
            (
                "/users/{id}/orders?since=${query.since}&u=${user.id}",
                "/users/7/orders?since=2024-01-01&u=42",
            ),
            ("/q?u=${query.u}&x=${query.x}", "/q?u=a%20b&x=%26y%3D1"),
            (
                "/q?flag=${query.flag}&e=${query.e}&missing=${query.nope}",
                "/q?flag=&e=&missing=",
            ),
            ("/n/${user.name}", "/n/..%2Fx%3Fy%3D1"),
            ("/n?v=${user.amp}", "/n?v=a%26admin%3D1%20%2B%23"),
            ("/d/v${user.name}", "/d/v..%2Fx%3Fy%3D1"),
            ("/d?a=${user.dots}&b={dots}", "/d?a=..&b=.."),
            ("/e/{enc}", "/e/a%20b%2Fc"),
            ("/i/${user.items.0.id}/${user.items.1.id}/${user.ok}", "/i/i-1/2.5/true"),
            ("/p/${plain}", "/p/text%2Fplain%20answer"),
            ("/x/{id}-{id}.json?a={id}", "/x/7-7.json?a=7"),
            ("/q?a=${user.empty}", "/q?a="),
            ("/q?sort=name&dir=asc", "/q?sort=name&dir=asc"),
        ];
        for (tpl, want) in cases {
            let got = t(tpl).render(&params(), q, &answers());
            assert_eq!(got.as_deref(), Ok(*want), "{tpl}");
        }
    }

    #[test]
    fn missing_values_fail_the_call() {
        let cases: &[(&str, Why)] = &[
            ("/u/{nope}", Why::NoParam),
            ("/u/${query.nope}", Why::NoQuery),
            ("/u/${other.id}", Why::NoAnswer("other".into())),
            (
                "/u/${user.nope}",
                Why::NoField {
                    key: "user".into(),
                    path: "nope".into(),
                },
            ),
            (
                "/u/${user.items.9.id}",
                Why::NoField {
                    key: "user".into(),
                    path: "items.9.id".into(),
                },
            ),
            (
                "/u/${user.items.x}",
                Why::NoField {
                    key: "user".into(),
                    path: "items.x".into(),
                },
            ),
            (
                "/u/${user.id.deeper}",
                Why::NoField {
                    key: "user".into(),
                    path: "id.deeper".into(),
                },
            ),
            (
                "/u/${user.none}",
                Why::NotScalar {
                    key: "user".into(),
                    path: "none".into(),
                },
            ),
            (
                "/u/${user.obj}",
                Why::NotScalar {
                    key: "user".into(),
                    path: "obj".into(),
                },
            ),
            (
                "/u?x=${user}",
                Why::NotScalar {
                    key: "user".into(),
                    path: "".into(),
                },
            ),
            ("/u/${user.empty}", Why::Empty),
            ("/u/${user.dots}/x", Why::DotSegment),
            ("/u/${user.dot}", Why::DotSegment),
            ("/u/{dots}", Why::DotSegment),
            ("/u/x${user.dot}", Why::DotSegment),
            ("/u/${user.dot}${user.dot}", Why::DotSegment),
        ];
        for (tpl, why) in cases {
            let err = t(tpl).render(&params(), None, &answers()).expect_err(tpl);
            assert_eq!(&err.why, why, "{tpl}");
        }
        // Why dots fail instead of being encoded: `%2E` is `.` to a normalising server.
        assert_eq!(
            crate::route::normalize_path("/users/%2E%2E/admin").as_deref(),
            Ok("/admin")
        );
        let err = t("/u/${user.items.9.id}").render(&[], None, &answers()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "${user.items.9.id}: the answer of call 'user' has no field 'items.9.id'"
        );
    }

    #[test]
    fn parse_errors() {
        let cases: &[&str] = &[
            "users/{id}",
            "",
            "/u/{id",
            "/u/${user.id",
            "/u/}",
            "/u/{}",
            "/u/{a-b}",
            "/u/${}",
            "/u/${query}",
            "/u/${query.}",
            "/u/${user..id}",
            "/u/${.id}",
            "/u/${user.}",
            "/u#frag",
            "/u/a b",
            "/u/\n",
        ];
        for s in cases {
            assert!(PathTemplate::parse(s).is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn names_used() {
        let p = t("/a/{id}/{x}?q=${query.q}&u=${user.id}&v=${acct.items.0.id}");
        assert_eq!(p.params().collect::<Vec<_>>(), ["id", "x"]);
        assert_eq!(
            p.references().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["user", "acct"]
        );
        assert_eq!(
            p.to_string(),
            "/a/{id}/{x}?q=${query.q}&u=${user.id}&v=${acct.items.0.id}"
        );
    }

    #[test]
    fn hostile_values_never_change_the_url_shape() {
        let hostile = [
            "../../admin",
            "..",
            ".",
            "...",
            "a/b",
            "a?b=c",
            "a#b",
            "a&b=c",
            "%2e%2e",
            "a b",
            "\r\nX: y",
            "é",
            "%",
            "+",
            ";",
            "=",
        ];
        let tpl = t("/base/${v.x}/end?k=${v.x}&z=1");
        for h in hostile {
            let mut a = HashMap::new();
            a.insert("v".to_string(), json!({ "x": h }));
            let out = match tpl.render(&[], None, &a) {
                Ok(out) => out,
                Err(e) if e.why == Why::DotSegment && h.chars().all(|c| c == '.') => continue,
                Err(e) => panic!("{h:?}: {e}"),
            };
            let (path, query) = out.split_once('?').unwrap();
            // The shape survives the normalisation an upstream (Portico itself, here) applies,
            // or the upstream refuses the path (an encoded slash, a control character): never a
            // different path.
            let normal = match crate::route::normalize_path(path) {
                Ok(n) => n,
                Err(
                    crate::route::PathError::EncodedSlash
                    | crate::route::PathError::Forbidden(_)
                    | crate::route::PathError::PathParameter
                    | crate::route::PathError::AmbiguousSegment,
                ) => path.to_string(),
                Err(e) => panic!("{h:?} -> {out}: {e:?}"),
            };
            let segs: Vec<&str> = normal.split('/').collect();
            assert_eq!(segs.len(), 4, "{h:?} -> {out} -> {normal}");
            assert_eq!((segs[1], segs[3]), ("base", "end"), "{h:?} -> {out} -> {normal}");
            assert_eq!(query.split('&').count(), 2, "{h:?} -> {out}");
            assert!(query.ends_with("&z=1"), "{h:?} -> {out}");
            assert!(out.parse::<http::uri::PathAndQuery>().is_ok(), "{h:?} -> {out}");
        }
    }
}
