//! Replies Portico writes itself (with the same response-phase treatment as upstream replies),
//! and the final error handler that turns a Pingora error into the contract's JSON error.

use super::Ctx;
use crate::plugin::{Failure, Reply};
use crate::respond;
use bytes::Bytes;
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::HttpTask;

/// The response head going to the client: the trace header, then the response plugins.
pub fn finish_response_head(req: &RequestHeader, resp: &mut ResponseHeader, ctx: &mut Ctx) {
    // An intermediary answers with its own version (RFC 9110 §2.5): an HTTP/1.0 upstream must
    // not make an HTTP/1.1 client downgrade its next request.
    if req.version != http::Version::HTTP_2 && resp.version != http::Version::HTTP_11 {
        resp.set_version(http::Version::HTTP_11);
    }
    let chains = ctx.chains();
    // The trace header, Pingora's `Connection`, and a header from each response plugin at
    // once: the maps were sized for the upstream's headers.
    resp.reserve(2 + chains.response.len());
    let _ = resp.insert_header(&ctx.snap.trace.header, ctx.st.trace.request_id.as_str());
    // A trailers-only gRPC answer (or Portico's own gRPC error) carries its status in the head.
    if ctx.grpc.is_some() {
        if let Some(code) = grpc_status(&resp.headers) {
            ctx.grpc_status = Some(code);
        }
    }
    for entry in &chains.response {
        entry.plugin.response(req, resp, &mut ctx.st);
    }
}

/// The connection's side of an answer head, last before it goes:
///
/// - while the process drains (binary upgrade, shutdown), the answer closes its HTTP/1
///   connection, so the client's next request opens a new one (to the new process);
/// - an HTTP/1.0 client gets framing it can read (RFC 9112 §6.1: never chunked to it): a body
///   of unknown length goes close-delimited — Pingora frames an HTTP/1.0 upstream's body, or
///   any body without a length, as chunked for HTTP/1.1 clients — and the head says
///   `Connection: close`. Compression is never chosen for HTTP/1.0, so nothing adds chunked
///   after this.
pub fn client_framing(session: &mut Session, resp: &mut ResponseHeader, ctx: &Ctx) {
    if ctx.drain.as_ref().is_some_and(|d| *d.borrow()) {
        session.set_keepalive(None);
    }
    if session.req_header().version >= http::Version::HTTP_11 || resp.status.as_u16() < 200 {
        return;
    }
    if resp.headers.contains_key(http::header::TRANSFER_ENCODING) {
        resp.remove_header(&http::header::TRANSFER_ENCODING);
    }
    let no_body = session.req_header().method == Method::HEAD || matches!(resp.status.as_u16(), 204 | 304);
    if !no_body && !resp.headers.contains_key(http::header::CONTENT_LENGTH) {
        session.set_keepalive(None);
    }
}

/// Write a reply of Portico's own, with the same response-phase treatment as upstream replies:
/// the response plugins on its head, then the body plugins on its whole body (one piece, the
/// last). The whole body is known before the head goes, so the head declares its exact length
/// whatever a body plugin did to it.
pub async fn send_reply(session: &mut Session, ctx: &mut Ctx, reply: Reply) -> Result<()> {
    let (mut head, body) = respond::render(&reply, &ctx.st, ctx.grpc.as_deref());
    ctx.error_code = reply.error_code();
    finish_response_head(session.req_header(), &mut head, ctx);
    let body = reply_body(body, ctx);
    if head.headers.contains_key(http::header::TRANSFER_ENCODING) {
        head.remove_header(&http::header::TRANSFER_ENCODING);
    }
    let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
    super::compress_or_not(session, &mut head, ctx);
    client_framing(session, &mut head, ctx);
    // A request body we did not read would be parsed as the next request: close instead.
    let unread_body = !session.is_body_empty() && ctx.body_seen == 0;
    if unread_body || reply.status == 413 || reply.status == 400 {
        session.set_keepalive(None);
    }
    super::close_after_refused_upgrade(session, reply.status);
    let head_only = body.is_empty() || session.req_header().method == Method::HEAD;
    if head_only {
        // The head ends the response. `Session::write_response_header` never tells HTTP/2 so
        // (Pingora ends the stream later with an empty DATA frame, or a reset when the request
        // failed); as a task, the head goes out as one HEADERS frame with END_STREAM — which is
        // exactly a gRPC trailers-only answer.
        session
            .write_response_tasks(vec![HttpTask::Header(Box::new(head), true)])
            .await?;
    } else {
        session.write_response_header(Box::new(head), false).await?;
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A reply's body through the response-body plugins. A plugin that cannot go on leaves the
/// body as the reply made it.
fn reply_body(body: Bytes, ctx: &mut Ctx) -> Bytes {
    let chains = ctx.chains();
    if chains.response_body.is_empty() {
        return body;
    }
    let mut piece = (!body.is_empty()).then(|| body.clone());
    for entry in &chains.response_body {
        if let Err(abort) = entry.plugin.response_body(&mut piece, true, &mut ctx.st) {
            log::warn!("plugin {} could not rewrite a reply's body: {}", entry.name, abort.0);
            return body;
        }
    }
    piece.unwrap_or_default()
}

/// The client went away before its answer was sent: nginx's 499, in the log and the metrics
/// (nothing is written: there is no one to read it).
const CLIENT_CLOSED: (u16, &str, &str) = (499, "client_closed", "the client closed the connection");

/// A request body that stopped arriving (`body_timeout`, or the upstream's read timeout while
/// the gateway waited on the client: `upstream::proxy_failed`).
pub(super) const BODY_TIMEOUT: (u16, &str, &str) = (408, "request_timeout", "the request body did not arrive in time");

/// Whether `e` says the client went away (its connection closed or broke).
pub(super) fn client_went_away(e: &Error) -> bool {
    classify(e).0 == CLIENT_CLOSED.0
}

/// Whether `e` is the client closing its connection once its whole answer was on its way: an
/// upstream that answers before reading the request body (a 401 to an upload) ends the
/// exchange, the answer says `Connection: close`, and the client closes while Pingora still
/// reads the body it no longer needs. Nothing failed: the answer's status is logged, with no
/// error (as nginx logs it).
pub(super) fn closed_after_answer(e: &Error, ctx: &Ctx) -> bool {
    ctx.response_ended
        && matches!(e.esource(), ErrorSource::Downstream)
        && matches!(e.etype(), ReadError | ConnectionClosed)
}

/// A status and gateway error code for a Pingora error.
fn classify(e: &Error) -> (u16, &'static str, &'static str) {
    if let HTTPStatus(code) = e.etype() {
        return by_status(*code);
    }
    // The edge layer's strict chunked scan refused the body (`edge/framing.rs`), whatever
    // Pingora made of the failed read.
    if crate::edge::framing_error(e).is_some() {
        return (400, "bad_request", "the request body's chunked framing is malformed");
    }
    match e.esource() {
        ErrorSource::Upstream => match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => {
                (504, "upstream_timeout", "the upstream did not answer in time")
            }
            _ => (
                502,
                "upstream_unavailable",
                "the upstream could not be reached or failed",
            ),
        },
        // The edge layer's frame watch reset a stalled HTTP/2 body (`edge/h2_watch.rs`).
        ErrorSource::Downstream if crate::edge::h2_body_timed_out(e) => BODY_TIMEOUT,
        ErrorSource::Downstream => match e.etype() {
            // A client that is gone, reset its stream, or reads nothing (send_timeout): nothing
            // can be written to it.
            ReadError | WriteError | WriteTimedout | ConnectionClosed | H2Error => CLIENT_CLOSED,
            // Pingora reads only bodies with its read timeout (the edge layer reads heads).
            ReadTimedout => BODY_TIMEOUT,
            _ => (400, "bad_request", "the request could not be read"),
        },
        ErrorSource::Internal | ErrorSource::Unset => {
            (500, "internal_error", "the gateway failed to handle the request")
        }
    }
}

pub fn by_status(code: u16) -> (u16, &'static str, &'static str) {
    match code {
        400 => (400, "bad_request", "the request is malformed"),
        401 => (401, "unauthorized", "authentication is required"),
        403 => (403, "forbidden", "the request is not allowed"),
        404 => (404, "no_route", "no route matches the request"),
        408 => (408, "request_timeout", "the request did not arrive in time"),
        413 => (413, "payload_too_large", "the request body is too large"),
        429 => (429, "rate_limited", "too many requests"),
        431 => (431, "request_header_too_large", "the request head is too large"),
        502 | 503 => (
            code,
            "upstream_unavailable",
            "the upstream could not be reached or failed",
        ),
        504 => (504, "upstream_timeout", "the upstream did not answer in time"),
        505 => (
            505,
            "http_version_not_supported",
            "the HTTP version is not supported here",
        ),
        c if c >= 500 => (c, "internal_error", "the gateway failed to handle the request"),
        c => (c, "bad_request", "the request could not be handled"),
    }
}

/// Whether the client already has a final response head. An interim `100 Continue` (relayed
/// from the upstream) does not count: a body over the limit after it still gets its 413.
pub(super) fn final_response_written(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|h| !(100..200).contains(&h.status.as_u16()) || h.status.as_u16() == 101)
}

/// The upstream's trailers arrived: a gRPC status lives there.
pub fn trailers_arrived(trailers: &http::HeaderMap, ctx: &mut Ctx) {
    if let Some(code) = grpc_status(trailers) {
        ctx.grpc_status = Some(code);
    }
}

/// `grpc-status` as a number, if present and well-formed.
pub(super) fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// The final error handler: answer with the contract's JSON error if nothing was sent yet
/// (or with the reply a body plugin asked for). When the answer had already begun, the error
/// code is kept for the log and a gRPC call gets its status as trailers (one HEADERS frame with
/// END_STREAM) instead of a reset, so the client learns UNAVAILABLE or DEADLINE_EXCEEDED rather
/// than CANCELLED.
pub async fn fail(session: &mut Session, e: &Error, ctx: &mut Ctx) -> u16 {
    // Pingora never keeps a client connection after a failed request (`finish` reuses it only
    // when the exchange succeeded): the answer must say so, or a keep-alive or pipelining
    // client sends its next request into a connection about to close.
    session.set_keepalive(None);
    if let Some(reply) = ctx.pending_reply.take() {
        let status = reply.status;
        if !final_response_written(session) {
            let _ = send_reply(session, ctx, reply).await;
        } else {
            ctx.error_code
                .get_or_insert(reply.error_code().unwrap_or("internal_error"));
        }
        return status;
    }
    if matches!(e.esource(), ErrorSource::Upstream) && ctx.failure.is_none() && !ctx.client_stalled {
        ctx.failure = Some(match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => Failure::Timeout,
            ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure | ConnectProxyFailure => {
                Failure::Connect
            }
            _ => Failure::Broken,
        });
    }
    if closed_after_answer(e, ctx) {
        return session
            .response_written()
            .map_or(CLIENT_CLOSED.0, |h| h.status.as_u16());
    }
    let (status, code, message) = classify_in(e, session, ctx);
    // HTTP/2's are counted by the frame watch that resets them.
    if status == 408 && session.req_header().version != http::Version::HTTP_2 {
        body_timed_out();
    }
    if status == CLIENT_CLOSED.0 {
        ctx.error_code.get_or_insert(code);
        return status;
    }
    if final_response_written(session) {
        ctx.error_code.get_or_insert(code);
        // HTTP/2 trailers end a gRPC call; a gRPC-web client reads trailers from the body only.
        let grpc = ctx.grpc.as_deref() == Some("application/grpc");
        if grpc && ctx.grpc_status.is_none() && session.req_header().version == http::Version::HTTP_2 {
            let grpc = respond::grpc_code(code, status);
            let trailers = respond::grpc_trailers(grpc, message);
            let end = HttpTask::Trailer(Some(Box::new(trailers)));
            if session.write_response_tasks(vec![end]).await.is_ok() {
                ctx.grpc_status = Some(grpc);
            }
        }
        return status;
    }
    let reply = Reply::error(status, code, message);
    let _ = send_reply(session, ctx, reply).await;
    status
}

/// An HTTP/1 request body timed out (its connection is closed with the 408): counted with the
/// edge layer's refusals, as HTTP/2's are (`portico_rejected_connections_total`).
pub(super) fn body_timed_out() {
    crate::metrics::REJECTED_CONNECTIONS
        .with_label_values(&["body_timeout"])
        .inc();
}

/// [`classify`], knowing what the request was doing. An upstream read timeout while the client
/// still owed body bytes is the client's (`upstream::proxy_failed`). A timeout Portico
/// enforces on a running answer (the gRPC deadline) is the upstream's timeout; so is the read
/// timeout that ends an idle upgraded connection (WebSocket) — on either side, it is the
/// route's `timeouts.read`.
fn classify_in(e: &Error, session: &Session, ctx: &Ctx) -> (u16, &'static str, &'static str) {
    if ctx.client_stalled {
        return BODY_TIMEOUT;
    }
    let timed_out = matches!(e.etype(), ReadTimedout | WriteTimedout);
    let enforced = ctx.failure == Some(Failure::Timeout) && !matches!(e.esource(), ErrorSource::Downstream);
    if timed_out && (enforced || session.was_upgraded()) {
        return by_status(504);
    }
    classify(e)
}

/// The error code the access log shows for a request that ended with `e` (the final error
/// handler normally decided it already).
pub fn error_code(e: &Error) -> &'static str {
    classify(e).1
}
