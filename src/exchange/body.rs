//! The request body on its way upstream: the body limit, the body plugins, and framing.
//!
//! Pingora sends the request head upstream before the first body piece reaches a hook, so a
//! plugin that changes a body's length cannot fix the head from there. Portico therefore reads
//! small bodies (up to [`PREREAD_MAX`], Pingora's replay buffer) whole, in the request phase, on
//! routes with body plugins: the chain sees the body once, may rewrite it or answer instead —
//! before anything goes upstream — and the upstream gets the exact new Content-Length. Larger
//! bodies (and HTTP/2 bodies of unknown length that outgrow the buffer) stream through the chain
//! piece by piece and go upstream without a Content-Length (chunked to HTTP/1).

use super::{declared_length, too_large, Ctx};
use crate::plugin::Reply;
use bytes::{Bytes, BytesMut};
use pingora::prelude::*;

/// Pingora replays request bodies of up to 64 KiB (`BODY_BUF_LIMIT`) to the upstream.
pub const PREREAD_MAX: u64 = 64 << 10;

/// How the body reaches the upstream.
#[derive(Debug, Default)]
pub enum BodyMode {
    /// As the client sent it (no body plugins on the route).
    #[default]
    Plain,
    /// Read whole and run through the chain: this is what the upstream gets.
    Whole(Bytes),
    /// Through the chain piece by piece; `held` is what the request phase read ahead.
    Streaming { held: Option<Bytes> },
}

impl BodyMode {
    /// The length the upstream head must declare, if the core fixes it.
    pub fn whole_len(&self) -> Option<usize> {
        match self {
            BodyMode::Whole(b) => Some(b.len()),
            _ => None,
        }
    }

    pub fn is_streaming(&self) -> bool {
        matches!(self, BodyMode::Streaming { .. })
    }
}

/// Where the body stands. Pingora sends the body again on a retry (from its replay buffer),
/// through the same hook: bytes an earlier attempt carried are not counted against the limit
/// again, nor shown to body observers twice.
#[derive(Debug, Default)]
pub struct Replay {
    /// Bytes from the client in this attempt, and the most any attempt reached.
    this_in: u64,
    max_in: u64,
    /// Bytes to the upstream in this attempt, and the most any attempt reached.
    this_out: u64,
    max_out: u64,
    /// Observers were told the body ended.
    ended: bool,
}

impl Replay {
    pub fn new_attempt(&mut self) {
        self.this_in = 0;
        self.this_out = 0;
    }

    /// Count `n` bytes from the client; how many no earlier attempt carried.
    fn fresh_in(&mut self, n: u64) -> u64 {
        self.this_in += n;
        let fresh = self.this_in.saturating_sub(self.max_in);
        self.max_in = self.max_in.max(self.this_in);
        fresh
    }

    /// The part of a piece going upstream that observers have not seen, and whether it ends
    /// the body for them (`None`: nothing new).
    fn fresh_out(&mut self, piece: Option<&Bytes>, end: bool) -> Option<(Bytes, bool)> {
        let piece = piece.cloned().unwrap_or_default();
        let start = self.this_out;
        self.this_out += piece.len() as u64;
        let skip = self.max_out.saturating_sub(start).min(piece.len() as u64) as usize;
        self.max_out = self.max_out.max(self.this_out);
        let ends = end && !self.ended;
        self.ended |= end;
        let fresh = piece.slice(skip..);
        (!fresh.is_empty() || ends).then_some((fresh, ends))
    }
}

/// A request accepted by the request phase that waits for `100 Continue` before sending its
/// body gets it from Portico, as from nginx, and `Expect` is not passed on: the body will be
/// read now (whole, or streamed to the upstream), and an upstream that ignores `Expect` would
/// leave the client waiting its own expect timeout (curl: 1 s) for nothing. A request refused
/// before this point (a plugin, a declared length over the limit) never gets a `100`. An
/// HTTP/1.0 expectation is ignored (RFC 9110 §10.1.1) and passed on as sent.
pub async fn answer_expect_continue(session: &mut Session) {
    let req = session.req_header();
    let expects = req.version != http::Version::HTTP_10
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects {
        return;
    }
    session.req_header_mut().remove_header(&http::header::EXPECT);
    if session.is_body_empty() {
        return;
    }
    if let Ok(cont) = pingora::http::ResponseHeader::build(100, Some(0)) {
        let _ = session.write_response_header(Box::new(cont), false).await;
    }
}

/// In the request phase, on routes with body plugins: read a small body whole and run the chain
/// on it, or prepare to stream. `Err` is the reply to send instead of proxying.
pub async fn read_small_body(session: &mut Session, ctx: &mut Ctx) -> Result<(), Reply> {
    if session.is_body_empty() {
        return Ok(());
    }
    let small = match declared_length(session.req_header()) {
        Some(n) => n <= PREREAD_MAX,
        // Unknown length (chunked, or HTTP/2 without content-length): read while it fits.
        None => true,
    };
    if !small {
        ctx.body = BodyMode::Streaming { held: None };
        return Ok(());
    }
    session.enable_retry_buffering();
    let mut buf = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(piece)) => {
                ctx.body_seen += piece.len() as u64;
                if ctx.body_seen > ctx.body_limit {
                    session.set_keepalive(None);
                    return Err(too_large(ctx.body_limit));
                }
                buf.extend_from_slice(&piece);
                if buf.len() as u64 > PREREAD_MAX {
                    if session.is_body_done() {
                        // The replay buffer overflowed on the body's last piece: Pingora would
                        // forward nothing. Never seen with HTTP/1 chunked bodies (the end is read
                        // on a later call); refuse rather than send a truncated request.
                        session.set_keepalive(None);
                        return Err(Reply::error(
                            413,
                            "payload_too_large",
                            format!("a body of unknown length over {PREREAD_MAX} bytes cannot go through this route's body plugins"),
                        ));
                    }
                    ctx.body = BodyMode::Streaming {
                        held: Some(buf.freeze()),
                    };
                    return Ok(());
                }
            }
            Ok(None) => break,
            Err(e) => {
                session.set_keepalive(None);
                return Err(if matches!(e.etype(), ReadTimedout) {
                    super::reply::body_timed_out();
                    let (status, code, message) = super::reply::BODY_TIMEOUT;
                    Reply::error(status, code, message)
                } else {
                    Reply::error(400, "bad_request", "the request body could not be read")
                });
            }
        }
    }
    let mut body = Some(buf.freeze());
    for entry in &ctx.chains().request_body {
        entry.plugin.request_body(&mut body, true, &mut ctx.st).await?;
    }
    ctx.body = BodyMode::Whole(body.unwrap_or_default());
    Ok(())
}

/// Pingora's request-body hook: each piece on its way upstream.
pub async fn request_body(
    session: &Session,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    ctx: &mut Ctx,
) -> Result<()> {
    // After a WebSocket (or other) upgrade the bytes are frames of a conversation, not a
    // request body: no body limit, no body plugins.
    if session.was_upgraded() {
        return Ok(());
    }
    // What the request phase read ahead (streaming mode), or `None` without body plugins.
    let ahead = match &mut ctx.body {
        BodyMode::Whole(whole) => {
            // Pingora replays the original body (once per attempt); the upstream gets the
            // chain's version instead.
            *body = Some(if end_of_stream { whole.clone() } else { Bytes::new() });
            observe(body, end_of_stream, ctx);
            return Ok(());
        }
        BodyMode::Streaming { held } => Some(held.take()),
        BodyMode::Plain => None,
    };
    count(body, ctx)?;
    if let Some(ahead) = ahead {
        if let Some(ahead) = ahead {
            let mut joined = BytesMut::from(&ahead[..]);
            if let Some(b) = body.as_ref() {
                joined.extend_from_slice(b);
            }
            *body = Some(joined.freeze());
        }
        for entry in &ctx.chains().request_body {
            if let Err(reply) = entry.plugin.request_body(body, end_of_stream, &mut ctx.st).await {
                let status = reply.status;
                ctx.pending_reply = Some(reply);
                return Err(stop_proxying(status, "a body plugin answered instead"));
            }
        }
    }
    end_body_once(body, end_of_stream);
    observe(body, end_of_stream, ctx);
    Ok(())
}

/// Show the body going upstream to the plugins that observe it, each byte once.
fn observe(body: &Option<Bytes>, end_of_stream: bool, ctx: &mut Ctx) {
    let chains = ctx.chains();
    if chains.observe_request_body.is_empty() {
        return;
    }
    if let Some((piece, end)) = ctx.body_pos.fresh_out(body.as_ref(), end_of_stream) {
        for entry in &chains.observe_request_body {
            entry.plugin.observe_request_body(&piece, end, &mut ctx.st);
        }
    }
}

/// Enforce the body limit on the bytes actually received (chunked bodies declare nothing).
fn count(body: &mut Option<Bytes>, ctx: &mut Ctx) -> Result<()> {
    if let Some(b) = body {
        ctx.body_seen += ctx.body_pos.fresh_in(b.len() as u64);
        if ctx.body_seen > ctx.body_limit {
            *body = None;
            return Err(stop_proxying(413, "request body over the limit"));
        }
    }
    Ok(())
}

/// The error that ends the exchange when Portico answers `status` in place of the upstream,
/// marked as the client's side: Pingora's HTTP/2 upstream loop only stops (and resets the
/// upstream stream) for a downstream error — any other error from the body hook leaves it
/// waiting for the upstream's answer until the read timeout. HTTP/1 upstreams stop either way.
fn stop_proxying(status: u16, why: &'static str) -> Box<Error> {
    Error::explain(HTTPStatus(status), why).into_down()
}

/// An HTTP/2 request may end with an empty DATA frame. Pingora 0.9.1 writes an empty final
/// piece to an HTTP/1 upstream as a zero-size chunk and then ends the chunked body again: two
/// terminators, and the upstream reads a second request (a desync; Pingora issue #935). An
/// empty final piece therefore only ends the body. This runs after every plugin, since a
/// plugin may empty a piece too.
pub fn end_body_once(body: &mut Option<Bytes>, end_of_stream: bool) {
    if end_of_stream && body.as_ref().is_some_and(|b| b.is_empty()) {
        *body = None;
    }
}
