//! Trace ids: every request gets one in its first phase (contract § Trace ids).

use crate::plugin::TraceIds;
use http::HeaderMap;

/// The `trace:` block, compiled.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// Lower-case header name for the request id (default `x-request-id`), parsed once: it is
    /// set on every request and answer.
    pub header: pingora::http::PreparedHeaderName,
    /// Keep a well-formed incoming request id and W3C `traceparent`.
    pub trust_incoming: bool,
}

/// `bytes` (at most 16) random bytes, never all zero, as lower-case hex.
fn random_hex(bytes: usize) -> String {
    let mut raw = [0u8; 16];
    let raw = &mut raw[..bytes];
    // All-zero ids are invalid in W3C trace context.
    while raw.iter().all(|&b| b == 0) {
        rand::Rng::fill(&mut rand::thread_rng(), &mut *raw);
    }
    hex(raw)
}

/// A fresh trace id (16 bytes) and span id (8 bytes), each never all zero, as lower-case hex,
/// from one draw of the generator (this runs once per request).
fn fresh_trace_and_span() -> (String, String) {
    let mut raw = [0u8; 24];
    rand::Rng::fill(&mut rand::thread_rng(), &mut raw[..]);
    let (trace, span) = raw.split_at(16);
    let id = |bytes: &[u8]| {
        if bytes.iter().all(|&b| b == 0) {
            random_hex(bytes.len())
        } else {
            hex(bytes)
        }
    };
    (id(trace), id(span))
}

/// Lower-case hex digits of `raw`, two per byte (a table lookup: this runs twice per request).
fn hex(raw: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Into a zeroed buffer by index pairs, not pushed byte by byte: this runs twice for every
    // request, and pushing checked the capacity at each digit.
    let mut out = vec![0u8; raw.len() * 2];
    for (pair, b) in out.chunks_exact_mut(2).zip(raw) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// A fresh W3C span id (16 hex digits), e.g. for a sub-request's child span.
pub fn new_span_id() -> String {
    random_hex(8)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A valid W3C `traceparent`, as (trace-id, flags).
pub fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let v = v.trim();
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() < 4 {
        return None;
    }
    let (version, trace_id, parent, flags) = (parts[0], parts[1], parts[2], parts[3]);
    let ok = version.len() == 2
        && is_lower_hex(version)
        && version != "ff"
        && (version != "00" || parts.len() == 4)
        && trace_id.len() == 32
        && is_lower_hex(trace_id)
        && trace_id.bytes().any(|b| b != b'0')
        && parent.len() == 16
        && is_lower_hex(parent)
        && parent.bytes().any(|b| b != b'0')
        && flags.len() == 2
        && is_lower_hex(flags);
    ok.then(|| {
        // Only the sampled bit is defined for version 00; forward that alone.
        let sampled = u8::from_str_radix(flags, 16).unwrap_or(0) & 1;
        (trace_id.to_string(), format!("{sampled:02x}"))
    })
}

/// A well-formed incoming request id: 1–128 characters of `A-Za-z0-9._:-`.
pub fn valid_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl TraceConfig {
    /// The ids for a request with these headers.
    pub fn ids_for(&self, headers: &HeaderMap) -> TraceIds {
        let mut incoming_trace = None;
        let mut incoming_id = None;
        if self.trust_incoming {
            // A repeated header is ambiguous: trust neither copy.
            let mut tp = headers.get_all("traceparent").iter();
            if let (Some(v), None) = (tp.next(), tp.next()) {
                incoming_trace = v.to_str().ok().and_then(parse_traceparent);
            }
            let mut rid = headers.get_all(self.header.name()).iter();
            if let (Some(v), None) = (rid.next(), rid.next()) {
                if valid_request_id(v.as_bytes()) {
                    incoming_id = v.to_str().ok().map(str::to_string);
                }
            }
        }
        let (trace_id, span_id, flags) = match incoming_trace {
            Some((trace_id, flags)) => (trace_id, random_hex(8), flags),
            None => {
                let (trace_id, span_id) = fresh_trace_and_span();
                (trace_id, span_id, "01".to_string())
            }
        };
        let request_id = incoming_id.unwrap_or_else(|| trace_id.clone());
        TraceIds {
            request_id,
            trace_id,
            span_id,
            flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TraceConfig {
        TraceConfig {
            header: pingora::http::PreparedHeaderName::from_static("x-request-id"),
            trust_incoming: true,
        }
    }

    #[test]
    fn fresh_ids() {
        let ids = cfg().ids_for(&HeaderMap::new());
        assert_eq!(ids.trace_id.len(), 32);
        assert_eq!(ids.span_id.len(), 16);
        assert_eq!(ids.request_id, ids.trace_id);
        assert!(parse_traceparent(&ids.traceparent()).is_some());
    }

    #[test]
    fn keeps_valid_incoming() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        h.insert("x-request-id", "abc-123".parse().unwrap());
        let ids = cfg().ids_for(&h);
        assert_eq!(ids.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(ids.span_id, "00f067aa0ba902b7");
        assert_eq!(ids.request_id, "abc-123");
    }

    #[test]
    fn replaces_malformed() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "junk",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(!valid_request_id(b"a\r\nb"));
        assert!(!valid_request_id(b"a b"));
        assert!(valid_request_id(b"A-z_0.9:x"));
    }
}
