//! Every response Portico writes itself is built here: the contract's JSON error body (or a
//! gRPC status for gRPC requests), content-type and content-length, the trace header.

use crate::plugin::{Reply, ReplyBody, RequestState};
use bytes::Bytes;
use pingora::http::ResponseHeader;

/// gRPC status for a gateway error code (the client sees why, in gRPC's own terms).
pub fn grpc_code(code: &str, http: u16) -> u32 {
    match code {
        "bad_request" => 3,                                              // INVALID_ARGUMENT
        "no_route" => 12,                                                // UNIMPLEMENTED
        "unauthorized" | "invalid_token" => 16,                          // UNAUTHENTICATED
        "forbidden" | "insufficient_scope" | "service_not_allowed" => 7, // PERMISSION_DENIED
        "rate_limited" | "quota_exceeded" | "payload_too_large" | "request_header_too_large" => 8, // RESOURCE_EXHAUSTED
        "request_timeout" | "upstream_timeout" => 4,                     // DEADLINE_EXCEEDED
        "upstream_unavailable" => 14,                                    // UNAVAILABLE
        _ if http >= 500 => 13,                                          // INTERNAL
        _ => 2,                                                          // UNKNOWN
    }
}

/// True when the request speaks gRPC (`content-type: application/grpc*`).
pub fn is_grpc(req: &pingora::http::RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The JSON error body: `{"error", "message", "trace_id"}`.
pub fn error_json(code: &str, message: &str, trace_id: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": code, "message": message, "trace_id": trace_id }).to_string())
}

/// The head and body of a reply, before response-phase plugins run on the head.
pub fn render(reply: &Reply, st: &RequestState, grpc: bool) -> (ResponseHeader, Bytes) {
    let (status, content_type, body, grpc) = match &reply.body {
        ReplyBody::Error { code, message } if grpc => (
            200,
            "application/grpc",
            Bytes::new(),
            Some((grpc_code(code, reply.status), message.as_str())),
        ),
        ReplyBody::Error { code, message } => (
            reply.status,
            "application/json",
            error_json(code, message, &st.trace.request_id),
            None,
        ),
        ReplyBody::Data { content_type, bytes } => (reply.status, *content_type, bytes.clone(), None),
        ReplyBody::Empty => (reply.status, "", Bytes::new(), None),
    };
    let mut head = ResponseHeader::build(status, Some(4 + reply.headers.len())).expect("valid status");
    if !content_type.is_empty() {
        let _ = head.insert_header(http::header::CONTENT_TYPE, content_type);
    }
    let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
    if let Some((code, message)) = grpc {
        for (k, v) in &grpc_trailers(code, message) {
            let _ = head.insert_header(k.clone(), v.clone());
        }
    }
    for (k, v) in &reply.headers {
        let _ = head.append_header(k.clone(), v.clone());
    }
    (head, body)
}

/// `grpc-status` and the percent-encoded `grpc-message`: the trailers of a gRPC call Portico
/// ends itself (or the head of a trailers-only answer).
pub fn grpc_trailers(code: u32, message: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::with_capacity(2);
    h.insert("grpc-status", http::HeaderValue::from(code));
    let encoded = percent_encoding::utf8_percent_encode(message, GRPC_MESSAGE).to_string();
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    h
}

/// A head and body as HTTP/1.1 bytes, for the edge layer, which answers before Pingora has a
/// session to write through.
pub fn http1_bytes(head: &ResponseHeader, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        head.status.as_u16(),
        head.status.canonical_reason().unwrap_or("Error")
    )
    .into_bytes();
    for (k, v) in head.headers.iter() {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// gRPC's grpc-message encoding: percent-encode everything outside printable ASCII, and '%'.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_body() {
        let mut st = RequestState::new("127.0.0.1".parse().unwrap());
        st.trace.request_id = "abc".into();
        let (head, body) = render(&Reply::error(404, "no_route", "no route \"x\""), &st, false);
        assert_eq!(head.status.as_u16(), 404);
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(head.headers["content-length"], body.len().to_string().as_str());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "no_route");
        assert_eq!(v["trace_id"], "abc");
        assert_eq!(v["message"], "no route \"x\"");
    }

    #[test]
    fn grpc_error() {
        let st = RequestState::new("127.0.0.1".parse().unwrap());
        let (head, body) = render(&Reply::error(403, "forbidden", "nope 100%"), &st, true);
        assert_eq!(head.status.as_u16(), 200);
        assert_eq!(head.headers["grpc-status"], "7");
        assert_eq!(head.headers["grpc-message"], "nope 100%25");
        assert!(body.is_empty());
    }
}
