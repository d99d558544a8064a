//! Replies Portico writes itself (with the same response-phase treatment as upstream replies),
//! and the final error handler that turns a Pingora error into the contract's JSON error.

use super::Ctx;
use crate::plugin::{Failure, Reply};
use crate::respond;
use bytes::Bytes;
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

/// The response head going to the client: the trace header, then the response plugins.
pub fn finish_response_head(req: &RequestHeader, resp: &mut ResponseHeader, ctx: &mut Ctx) {
    // An intermediary answers with its own version (RFC 9110 §2.5): an HTTP/1.0 upstream must
    // not make an HTTP/1.1 client downgrade its next request.
    if req.version != http::Version::HTTP_2 && resp.version != http::Version::HTTP_11 {
        resp.set_version(http::Version::HTTP_11);
    }
    let _ = resp.insert_header(ctx.snap.trace.header.clone(), ctx.st.trace.request_id.as_str());
    // A trailers-only gRPC answer (or Portico's own gRPC error) carries its status in the head.
    if let Some(code) = grpc_status(&resp.headers) {
        ctx.grpc_status = Some(code);
    }
    let chains = ctx.chains();
    for entry in &chains.response {
        entry.plugin.response(req, resp, &mut ctx.st);
    }
}

/// Write a reply of Portico's own, with the same response-phase treatment as upstream replies:
/// the response plugins on its head, then the body plugins on its whole body (one piece, the
/// last). The whole body is known before the head goes, so the head declares its exact length
/// whatever a body plugin did to it.
pub async fn send_reply(session: &mut Session, ctx: &mut Ctx, reply: Reply) -> Result<()> {
    let (mut head, body) = respond::render(&reply, &ctx.st, ctx.grpc);
    ctx.error_code = reply.error_code();
    finish_response_head(session.req_header(), &mut head, ctx);
    let body = reply_body(body, ctx);
    if head.headers.contains_key(http::header::TRANSFER_ENCODING) {
        head.remove_header(&http::header::TRANSFER_ENCODING);
    }
    let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
    super::compress_or_not(session, &mut head, ctx);
    // A request body we did not read would be parsed as the next request: close instead.
    let unread_body = !session.is_body_empty() && ctx.body_seen == 0;
    if unread_body || reply.status == 413 || reply.status == 400 {
        session.set_keepalive(None);
    }
    super::close_after_refused_upgrade(session, reply.status);
    let head_only = body.is_empty() || session.req_header().method == Method::HEAD;
    session.write_response_header(Box::new(head), head_only).await?;
    if !head_only {
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
        ErrorSource::Downstream => match e.etype() {
            // Nothing can be written to a client that is gone or reads nothing (send_timeout).
            ReadError | WriteError | WriteTimedout | ConnectionClosed => (0, "", ""),
            ReadTimedout => (408, "request_timeout", "the request did not arrive in time"),
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
/// (or with the reply a body plugin asked for).
pub async fn fail(session: &mut Session, e: &Error, ctx: &mut Ctx) -> u16 {
    if let Some(reply) = ctx.pending_reply.take() {
        let status = reply.status;
        if !final_response_written(session) {
            let _ = send_reply(session, ctx, reply).await;
        }
        return status;
    }
    if matches!(e.esource(), ErrorSource::Upstream) && ctx.failure.is_none() {
        ctx.failure = Some(match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => Failure::Timeout,
            ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure | ConnectProxyFailure => {
                Failure::Connect
            }
            _ => Failure::Broken,
        });
    }
    let (status, code, message) = classify(e);
    if status == 0 {
        return 0;
    }
    if final_response_written(session) {
        return status;
    }
    let reply = Reply::error(status, code, message);
    let _ = send_reply(session, ctx, reply).await;
    status
}
