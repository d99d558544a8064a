//! Each attempt's endpoint, what happens when one fails, and the head the upstream receives.

use super::Ctx;
use crate::plugin::Failure;
use crate::upstream::{FailureKind, RetryCause};
use http::header::HOST;
use http::HeaderValue;
use pingora::http::{PreparedHeaderName, RequestHeader};
use pingora::prelude::*;

/// Choose the endpoint of this attempt: an endpoint this request has not tried yet, while one
/// is left (else any, by the upstream's balancing).
pub fn pick_peer(session: &Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
    let Some(up) = ctx.upstream.clone() else {
        return Error::e_explain(HTTPStatus(502), "no upstream chosen");
    };
    let index = match (ctx.retry_same, ctx.endpoint) {
        (true, Some(i)) => i,
        _ => {
            let key = (up.balance == crate::config::raw::Balance::ConsistentHash)
                .then(|| up.hash_key(&session.req_header().headers, ctx.st.client_ip, &ctx.st.path));
            let fresh = up.select(key.as_deref(), &ctx.tried);
            match fresh.or_else(|| up.select(key.as_deref(), &[])) {
                Some(i) => i,
                None => return Error::e_explain(HTTPStatus(502), "the upstream has no endpoint"),
            }
        }
    };
    if !ctx.retry_same {
        if ctx.attempts == 0 {
            up.retries.count_request();
        }
        ctx.attempts += 1;
    }
    ctx.retry_same = false;
    if !ctx.tried.contains(&index) {
        ctx.tried.push(index);
    }
    ctx.endpoint = Some(index);
    ctx.in_flight = Some(up.in_flight_guard(index));
    ctx.body_pos.new_attempt();
    let route = ctx.route.as_ref().expect("routed");
    let mut timeouts = route.timeouts.over(&up.timeouts);
    if let Some(deadline) = ctx.deadline {
        // A gRPC call's deadline: connecting and every wait for the upstream end by then.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            ctx.failure = Some(Failure::Timeout);
            return Error::e_explain(HTTPStatus(504), "the gRPC deadline (grpc-timeout) passed");
        }
        timeouts.connect = timeouts.connect.min(left);
        timeouts.read = timeouts.read.min(left);
        timeouts.write = timeouts.write.min(left);
    }
    Ok(up.peer(index, &timeouts))
}

/// Whether a gRPC call's deadline has passed (its response is then ended).
pub fn past_deadline(ctx: &Ctx) -> bool {
    ctx.deadline.is_some_and(|d| std::time::Instant::now() >= d)
}

/// A connection to the endpoint failed: count it, and say whether to try again.
pub fn connect_failed(ctx: &mut Ctx, e: &Error) -> bool {
    let timeout = matches!(e.etype(), ConnectTimedout | TLSHandshakeTimedout);
    ctx.failure = Some(if timeout { Failure::Timeout } else { Failure::Connect });
    let (Some(up), Some(i)) = (ctx.upstream.clone(), ctx.endpoint) else {
        return false;
    };
    up.record_failure(i, FailureKind::Connect);
    let cause = if timeout {
        RetryCause::ConnectTimeout
    } else {
        RetryCause::ConnectFailure
    };
    up.retries.allows(ctx.attempts, cause, false)
}

/// Whether the request can be sent again: an idempotent method whose body Pingora still holds
/// whole, and no answer has started going to the client.
fn replayable(session: &Session) -> bool {
    session.req_header().method.is_idempotent()
        && !session.as_ref().retry_buffer_truncated()
        && session.response_written().is_none()
}

/// The exchange failed after connecting: only replayable requests are retried, and only for a
/// cause the policy names.
pub fn proxy_failed(session: &mut Session, ctx: &mut Ctx, e: &Error, upstream_reused: bool) -> bool {
    // An answer turned into an error to retry it (see `upstream_answered`): already decided.
    if std::mem::take(&mut ctx.status_retry) {
        return true;
    }
    // Only the upstream's faults are retried: a client that went away, a body over the limit
    // or a body plugin's answer end the request.
    if !matches!(e.esource(), ErrorSource::Upstream) {
        return false;
    }
    // The upstream's read timed out before its answer's head, while the client still owed body
    // bytes and the gateway was waiting for them. Pingora waits for both at once and re-arms
    // the upstream's read timer each time the client sends more, so this is a client that
    // stopped sending (nginx sends the whole request before its `proxy_read_timeout` runs):
    // the client's timeout (408), no mark against the endpoint — a client stalling its body
    // must not get a healthy upstream ejected — and no retry. An upstream that stopped taking
    // the body (the client's bytes held back, not awaited) stays the upstream's timeout. (Once
    // the answer's head went out, a stream is an exchange both ways, idle-limited by the read
    // timeout: README, "Long-lived streams".)
    if matches!(e.etype(), ReadTimedout)
        && !session.was_upgraded()
        && session.response_written().is_none()
        && !session.is_body_done()
        && awaiting_client(session)
    {
        ctx.client_stalled = true;
        return false;
    }
    let timeout = matches!(e.etype(), ReadTimedout | WriteTimedout);
    ctx.failure = Some(if timeout { Failure::Timeout } else { Failure::Broken });
    let (Some(up), Some(i)) = (ctx.upstream.clone(), ctx.endpoint) else {
        return false;
    };
    // A pooled connection the upstream had already closed is not the endpoint's fault:
    // Pingora marks those "retry only if reused"; they are retried on the same endpoint.
    let stale = matches!(e.retry, pingora::RetryType::ReusedOnly) && upstream_reused;
    if !replayable(session) {
        if !stale {
            up.record_failure(i, FailureKind::Exchange);
        }
        return false;
    }
    if stale {
        ctx.retry_same = true;
        return true;
    }
    up.record_failure(i, FailureKind::Exchange);
    let cause = if timeout {
        RetryCause::Timeout
    } else {
        RetryCause::Reset
    };
    up.retries.allows(ctx.attempts, cause, true)
}

/// Whether the gateway's last read of the client found nothing (HTTP/1, through the edge
/// layer's stream); HTTP/2 bodies are timed by the edge layer's frame watch instead.
fn awaiting_client(session: &Session) -> bool {
    session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<crate::edge::EdgeStream>())
        .is_some_and(|edge| edge.awaiting_client())
}

/// The upstream answered: passive health counts 502–504 as failures. An answer the retry
/// policy names (`on: [503]`) is, while nothing went to the client and the request can be
/// replayed, turned into an error so that Pingora tries again (the answer is dropped with its
/// connection); the last attempt's answer goes to the client as it is.
pub fn upstream_answered(session: &Session, status: u16, ctx: &mut Ctx) -> Result<()> {
    // A 101 the client did not ask for would turn its connection into a tunnel it does not
    // expect, carrying whatever the upstream sends next: a broken answer (nginx passes it on).
    if status == 101 && !pingora::protocols::http::v1::common::is_upgrade_req(session.req_header()) {
        ctx.failure = Some(Failure::Broken);
        return Err(Error::explain(
            InvalidHTTPHeader,
            "the upstream switched protocols for a request that asked for no upgrade",
        )
        .into_up());
    }
    if status >= 200 || status == 101 {
        ctx.upstream_status = Some(status);
        // An answer came after all: an earlier attempt's failure is not this request's.
        ctx.failure = None;
    }
    let (Some(up), Some(i)) = (ctx.upstream.clone(), ctx.endpoint) else {
        return Ok(());
    };
    if (502..=504).contains(&status) {
        up.record_failure(i, FailureKind::Exchange);
    } else {
        up.record_success(i);
    }
    if up.retries.on_status.contains(&status)
        && replayable(session)
        && up.retries.allows(ctx.attempts, RetryCause::Status(status), true)
    {
        ctx.status_retry = true;
        return Err(Error::explain(HTTPStatus(status), "the upstream's answer is retried").into_up());
    }
    Ok(())
}

/// The upstream accepted an upgrade (WebSocket): from now on the connection is a stream both
/// ways, and the client's side may idle as long as the upstream's may — the route's read
/// timeout when it sets one, else the upstream's — instead of `body_timeout`.
pub fn upgraded(session: &mut Session, ctx: &Ctx) {
    if let (Some(route), Some(up)) = (&ctx.route, &ctx.upstream) {
        session.set_read_timeout(Some(route.timeouts.over(&up.timeouts).read));
    }
}

/// An IP address as a header value (by hand: see [`crate::util::push_ip`]).
fn ip_header_value(ip: std::net::IpAddr) -> HeaderValue {
    let mut text = String::with_capacity(15);
    crate::util::push_ip(&mut text, ip);
    HeaderValue::try_from(text).expect("an IP address is a valid header value")
}

// The names set on every request, parsed once rather than on each insert.
static X_FORWARDED_FOR: PreparedHeaderName = PreparedHeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: PreparedHeaderName = PreparedHeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: PreparedHeaderName = PreparedHeaderName::from_static("x-forwarded-host");
static X_REAL_IP: PreparedHeaderName = PreparedHeaderName::from_static("x-real-ip");
static TRACEPARENT: PreparedHeaderName = PreparedHeaderName::from_static("traceparent");
static X_CONSUMER: PreparedHeaderName = PreparedHeaderName::from_static("x-consumer");

/// Headers Portico sets on the way upstream; copies a client sent are replaced, never passed.
const GATEWAY_SET: [&str; 8] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "forwarded",
    "x-real-ip",
    "traceparent",
    "x-consumer",
];

pub fn prepare_upstream_request(session: &Session, req: &mut RequestHeader, ctx: &Ctx) {
    if let Some(p) = &ctx.upstream_path {
        if let Ok(uri) = p.parse::<http::Uri>() {
            req.set_uri(uri);
        }
    }
    let up = ctx.upstream.as_ref().expect("upstream chosen");
    // The client's Host, else the authority its target names (HTTP/2, or an HTTP/1.0
    // absolute-form request without Host): an HTTP/1.1 upstream always gets a Host.
    let original_host: Option<HeaderValue> = session
        .req_header()
        .headers
        .get(HOST)
        .cloned()
        .or_else(|| super::target_authority(session.req_header()).and_then(|a| HeaderValue::from_str(a).ok()));

    // X-Forwarded-For: a trusted proxy's list is extended; anyone else's is replaced.
    let prior_xff = ctx
        .snap
        .client_ip
        .is_trusted(ctx.peer_ip)
        .then(|| {
            let v: Vec<&str> = req
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            v.join(", ")
        })
        .filter(|s| !s.is_empty());
    // Client copies of the headers Portico sets. One pass over the request's (few) names
    // rather than a lookup per name; removing also walks Pingora's case-preserving map.
    let trace_header = &ctx.snap.trace.header;
    let copies: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| GATEWAY_SET.contains(&k.as_str()) || k == trace_header.name())
        .cloned()
        .collect();
    for name in &copies {
        req.remove_header(name);
    }
    // Room for every header set below at once: Pingora sized the maps for the client's headers
    // (wrk sends one), and each growth rehashes two maps (values and case-preserving names).
    req.reserve(GATEWAY_SET.len() + 3);
    let peer_ip = ip_header_value(ctx.peer_ip);
    let xff = match prior_xff {
        Some(p) => HeaderValue::try_from(format!("{p}, {}", ctx.peer_ip)).unwrap_or_else(|_| peer_ip.clone()),
        None => peer_ip.clone(),
    };
    let _ = req.insert_header(&X_FORWARDED_FOR, xff);
    let proto = HeaderValue::from_static(if ctx.st.tls { "https" } else { "http" });
    let _ = req.insert_header(&X_FORWARDED_PROTO, proto);
    if let Some(h) = &original_host {
        let _ = req.insert_header(&X_FORWARDED_HOST, h.clone());
    }
    let real_ip = if ctx.st.client_ip == ctx.peer_ip {
        peer_ip
    } else {
        ip_header_value(ctx.st.client_ip)
    };
    let _ = req.insert_header(&X_REAL_IP, real_ip);
    let _ = req.insert_header(&TRACEPARENT, ctx.st.trace.traceparent());
    let _ = req.insert_header(trace_header, ctx.st.trace.request_id.as_str());
    if let Some(c) = &ctx.st.consumer {
        if let Ok(v) = HeaderValue::from_str(c) {
            let _ = req.insert_header(&X_CONSUMER, v);
        }
    }

    let host = if up.preserve_host {
        original_host
    } else {
        match &up.host {
            Some(h) => HeaderValue::from_str(h).ok(),
            None => up.endpoints[ctx.endpoint.unwrap_or(0)].host_header.clone(),
        }
    };
    if let Some(h) = host {
        let _ = req.insert_header(HOST, h);
    }
    // Body plugins may change the body's length: a body read whole declares its new length;
    // a streamed one declares none (Pingora frames it chunked to HTTP/1).
    if let Some(n) = ctx.body.whole_len() {
        if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
            req.remove_header(&http::header::TRANSFER_ENCODING);
        }
        let _ = req.insert_header(http::header::CONTENT_LENGTH, n.to_string());
    } else if ctx.body.is_streaming() && req.headers.contains_key(http::header::CONTENT_LENGTH) {
        req.remove_header(&http::header::CONTENT_LENGTH);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ip_header_values_read_as_display_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.100.9",
            "::1",
            "2001:db8::7",
        ] {
            let parsed: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(super::ip_header_value(parsed).to_str().unwrap(), ip);
        }
    }
}
