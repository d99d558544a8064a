//! Answering a request head the edge layer refuses (408, 431, 400): the contract's JSON error,
//! rendered by `respond.rs` like every reply Portico writes (global response plugins applied),
//! counted, and logged through the same access-log record as proxied requests — with the
//! method, target and trace id when the head got that far.

use super::stream::EdgeStream;
use crate::access_log::Record;
use crate::config::Snapshot;
use crate::plugin::{Reply, RequestState};
use crate::shared::Shared;
use pingora::protocols::{GetSocketDigest, Shutdown};
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// What a refused head said before it was cut off.
#[derive(Default)]
struct HeadSoFar {
    method: String,
    target: String,
    protocol: String,
    headers: http::HeaderMap,
}

impl HeadSoFar {
    /// The request line and the complete header lines of `bytes` (at most 64 of them).
    fn parse(bytes: &[u8]) -> HeadSoFar {
        let mut head = HeadSoFar::default();
        let mut lines = bytes.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let complete = |line: &[u8]| bytes.len() > line.len();
        if let Some(line) = lines.next().filter(|l| complete(l)) {
            let mut parts = line.split(|b| *b == b' ');
            let (m, t, v) = (parts.next(), parts.next(), parts.next());
            if let (Some(m), Some(t), Some(v), None) = (m, t, v, parts.next()) {
                if m.iter().all(u8::is_ascii_uppercase) && v.starts_with(b"HTTP/") {
                    head.method = String::from_utf8_lossy(m).into_owned();
                    head.target = String::from_utf8_lossy(&t[..t.len().min(2048)]).into_owned();
                    head.protocol = String::from_utf8_lossy(v).into_owned();
                }
            }
        }
        for line in lines.take(64) {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                break;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
                head.headers.append(n, v);
            }
        }
        head
    }
}

/// Answer `reply`, log and count it, and close.
pub(super) async fn refuse(conn: &mut EdgeStream, reply: Reply, snap: &Snapshot, shared: &Shared, since: Instant) {
    let peer = conn
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let seen = HeadSoFar::parse(&conn.prefix);
    let mut st = RequestState::new(snap.client_ip.resolve(peer, &seen.headers));
    st.trace = snap.trace.ids_for(&seen.headers);
    let (mut head, body) = crate::respond::render(&reply, &st, None);
    let _ = head.insert_header(&snap.trace.header, st.trace.request_id.as_str());
    let _ = head.insert_header(http::header::CONNECTION, "close");
    // Every answer carries a Date (RFC 9110 §6.6.1), these too: Pingora adds it to the
    // answers it writes, not to bytes the edge writes itself.
    let _ = head.insert_header(http::header::DATE, pingora::protocols::http::date::get_cached_date());
    let req = pingora::http::RequestHeader::build("GET", b"/", None).expect("a request head");
    for entry in &snap.global.response {
        entry.plugin.response(&req, &mut head, &mut st);
    }
    let out = crate::respond::http1_bytes(&head, &body);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = conn.write_all(&out).await;
        let _ = conn.flush().await;
    })
    .await;
    crate::metrics::REQUESTS
        .with_label_values(&["none", "none", &reply.status.to_string()])
        .inc();
    if let Some(format) = snap.access_log {
        let header = |n: &str| seen.headers.get(n).and_then(|v| v.to_str().ok());
        // Free text a client may write in any bytes (obs-text): logged as UTF-8 with the
        // invalid bytes replaced, never dropped (each format then escapes what it must).
        let text = |n: &str| seen.headers.get(n).map(|v| String::from_utf8_lossy(v.as_bytes()));
        let (user_agent, referer) = (text("user-agent"), text("referer"));
        let record = Record {
            trace_id: &st.trace.request_id,
            traceparent_id: &st.trace.trace_id,
            client_ip: Some(st.client_ip),
            method: &seen.method,
            host: header("host").unwrap_or(""),
            target: &crate::access_log::redact_query(&seen.target, &snap.credential_query_params),
            protocol: &seen.protocol,
            status: reply.status,
            route: "none",
            upstream: "none",
            duration: since.elapsed(),
            bytes_sent: body.len(),
            user_agent: user_agent.as_deref(),
            referer: referer.as_deref(),
            error: reply.error_code(),
            ..Default::default()
        };
        shared.access_log.write(format, &record);
    }
    // Read (and drop) what the client still sends for a moment, so it sees the answer rather
    // than a reset.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Shutdown::shutdown(conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_head_says_what_it_had() {
        let h = HeadSoFar::parse(b"GET /slow?x=1 HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc\r\nX-Slo");
        assert_eq!(
            (h.method.as_str(), h.target.as_str(), h.protocol.as_str()),
            ("GET", "/slow?x=1", "HTTP/1.1")
        );
        assert_eq!(h.headers["x-request-id"], "abc");
        assert!(!h.headers.contains_key("x-slo"));
        let h = HeadSoFar::parse(b"GET /sl");
        assert!(h.method.is_empty() && h.headers.is_empty());
    }
}
