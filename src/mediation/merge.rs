//! The aggregate's answer: the calls' outcomes merged into one JSON document.
//!
//! ```json
//! {"user": {"id": 7}, "orders": null, "banner": "plain text",
//!  "errors": {"orders": {"status": 504, "message": "timed out after 2s"}}}
//! ```
//!
//! Each call's answer sits under its name: its JSON when the upstream said `application/json`
//! (or `…+json`) and the body parses, else the body as a string, and `null` for an empty body.
//! A gzip answer is decoded first (bounded); an answer in another encoding, gzip that does not
//! decode, or a body that is neither JSON nor UTF-8 text fails its call — the document never
//! carries bytes mangled into a string. With `on_error: partial`, a failed call is `null` and is listed
//! under `"errors"` with a status and a message; `"errors"` is there only when a call failed.
//! A call skipped because a call it depends on failed, or whose path needed a value the earlier
//! answer did not have, fails with status 424 (failed dependency).

use super::body::{gunzip, is_json_content_type, Reason};
use super::template::MissingValue;
use serde_json::{json, Map, Value};

/// Why a call has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailure {
    /// The upstream's status, or the gateway's view of the failure (502 unreachable, 504 timed
    /// out, 424 a dependency failed).
    pub status: u16,
    pub message: String,
}

impl CallFailure {
    pub fn new(status: u16, message: impl Into<String>) -> CallFailure {
        CallFailure {
            status,
            message: message.into(),
        }
    }

    /// Not run, because the call `dependency` failed.
    pub fn skipped(dependency: &str) -> CallFailure {
        CallFailure::new(424, format!("not run: call '{dependency}' failed"))
    }

    /// Not run, because its path needed a value that was not there.
    pub fn missing(m: &MissingValue) -> CallFailure {
        CallFailure::new(424, format!("not run: {m}"))
    }
}

/// A call's answer as it goes into the document (and into later calls' templates), or why it
/// cannot be: `content_encoding` is the answer's `Content-Encoding` (its values joined), `max`
/// bounds a gzip body's decoded size.
pub fn answer_body(
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    body: &[u8],
    max: usize,
) -> Result<Value, String> {
    let codings: Vec<String> = content_encoding
        .unwrap_or("")
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    let decoded;
    let body = match codings.as_slice() {
        [] => body,
        [c] if c == "gzip" || c == "x-gzip" => {
            decoded = gunzip(body, max).map_err(|why| match why {
                Reason::TooLarge => format!("the answer is larger than max_body ({max} bytes) once decoded"),
                _ => "the answer's gzip encoding does not decode".to_string(),
            })?;
            &decoded[..]
        }
        _ => {
            return Err(format!(
                "the answer is encoded ({}), which aggregate does not decode",
                codings.join(", ")
            ))
        }
    };
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if content_type.is_some_and(is_json_content_type) {
        if let Ok(v) = serde_json::from_slice(body) {
            return Ok(v);
        }
    }
    match std::str::from_utf8(body) {
        Ok(text) => Ok(Value::String(text.to_string())),
        Err(_) => Err("the answer is neither JSON nor UTF-8 text".to_string()),
    }
}

/// The aggregate's document from every call's outcome (the `on_error: partial` shape; with
/// no failure it is the plain `{"KEY": answer, ...}`).
pub fn merge<'a>(outcomes: impl IntoIterator<Item = (&'a str, Result<Value, CallFailure>)>) -> Value {
    let mut doc = Map::new();
    let mut errors = Map::new();
    for (key, outcome) in outcomes {
        match outcome {
            Ok(v) => {
                doc.insert(key.to_string(), v);
            }
            Err(f) => {
                doc.insert(key.to_string(), Value::Null);
                errors.insert(key.to_string(), json!({"status": f.status, "message": f.message}));
            }
        }
    }
    if !errors.is_empty() {
        doc.insert("errors".to_string(), Value::Object(errors));
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mediation::template::{MissingValue, Why};

    #[test]
    fn answer_bodies() {
        let cases: &[(Option<&str>, &[u8], Value)] = &[
            (Some("application/json"), b"{\"a\":1}", json!({"a": 1})),
            (Some("application/problem+json; charset=utf-8"), b"[1]", json!([1])),
            (Some("application/json"), b"not json", json!("not json")),
            (Some("text/plain"), b"{\"a\":1}", json!("{\"a\":1}")),
            (None, b"hi", json!("hi")),
            (Some("application/json"), b"", Value::Null),
        ];
        for (ct, body, want) in cases {
            assert_eq!(answer_body(*ct, None, body, 1 << 20).as_ref(), Ok(want), "{ct:?}");
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn encoded_and_binary_answers() {
        let json = Some("application/json");
        let z = gzip(br#"{"a":[1,2]}"#);
        assert_eq!(answer_body(json, Some("gzip"), &z, 100), Ok(json!({"a": [1, 2]})));
        assert_eq!(
            answer_body(json, Some("identity, GZIP"), &z, 100),
            Ok(json!({"a": [1, 2]}))
        );
        assert_eq!(
            answer_body(Some("text/plain"), Some("x-gzip"), &gzip(b"hi"), 100),
            Ok(json!("hi"))
        );
        assert_eq!(
            answer_body(json, Some("gzip"), &z, 5),
            Err("the answer is larger than max_body (5 bytes) once decoded".into())
        );
        assert_eq!(
            answer_body(json, Some("gzip"), b"not gzip", 100),
            Err("the answer's gzip encoding does not decode".into())
        );
        assert_eq!(
            answer_body(json, Some("br"), b"\x0b\x02", 100),
            Err("the answer is encoded (br), which aggregate does not decode".into())
        );
        assert_eq!(
            answer_body(Some("application/octet-stream"), None, b"\xffok", 100),
            Err("the answer is neither JSON nor UTF-8 text".into())
        );
    }

    #[test]
    fn merge_table() {
        let ok = |v: Value| -> Result<Value, CallFailure> { Ok(v) };
        type Outcomes<'a> = Vec<(&'a str, Result<Value, CallFailure>)>;
        let cases: Vec<(Outcomes, Value)> = vec![
            (vec![], json!({})),
            (
                vec![("user", ok(json!({"id": 7}))), ("banner", ok(json!("hi")))],
                json!({"user": {"id": 7}, "banner": "hi"}),
            ),
            (
                vec![
                    ("user", ok(json!({"id": 7}))),
                    ("orders", Err(CallFailure::new(504, "timed out after 2s"))),
                    ("items", Err(CallFailure::skipped("orders"))),
                ],
                json!({
                    "user": {"id": 7}, "orders": null, "items": null,
                    "errors": {
                        "orders": {"status": 504, "message": "timed out after 2s"},
                        "items": {"status": 424, "message": "not run: call 'orders' failed"}
                    }
                }),
            ),
            // An answer that is itself null is not an error.
            (vec![("a", ok(Value::Null))], json!({"a": null})),
        ];
        for (outcomes, want) in cases {
            assert_eq!(merge(outcomes), want);
        }
    }

    #[test]
    fn missing_value_failure() {
        let m = MissingValue {
            placeholder: "${user.id}".into(),
            why: Why::NoAnswer("user".into()),
        };
        assert_eq!(
            CallFailure::missing(&m),
            CallFailure::new(424, "not run: ${user.id}: call 'user' has no answer")
        );
    }
}
