//! The one `ProxyHttp` implementation. Each hook walks the matching plugin chain in a few lines;
//! the work lives in `exchange/` (per-request steps) and the plugins.

use crate::exchange::{self, Ctx};
use crate::plugin::Verdict;
use crate::shared::Shared;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use std::sync::Arc;
use std::time::Duration;

/// A response a body plugin ended (`Err(Abort)`).
const PLUGIN_ABORT: ErrorType = ErrorType::Custom("plugin ended the response");

pub struct Gateway {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context inside each request's future (more than once, across
    /// its phases), and that future is copied whole into its heap allocation per request; a
    /// pointer there instead of ~800 bytes shrinks every such copy.
    type CTX = Box<Ctx>;

    fn new_ctx(&self) -> Box<Ctx> {
        let mut ctx = Box::new(Ctx::new(self.shared.snapshot()));
        ctx.drain = Some(self.shared.drain_watch());
        ctx
    }

    /// Trace ids, client address, host and path checks, routing, compression negotiation:
    /// before Pingora's modules see the request.
    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<()> {
        exchange::early(session, ctx);
        Ok(())
    }

    /// The request-phase plugins, the upstream, and (on routes with body plugins) a small body
    /// read whole. `Ok(true)` means Portico answered the request itself.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<bool> {
        let mut step = ctx.early.take().unwrap_or(Ok(()));
        if step.is_ok() {
            for entry in &ctx.chains().request {
                if let Verdict::Respond(reply) = entry.plugin.request(session.req_header_mut(), &mut ctx.st).await {
                    step = Err(reply);
                    break;
                }
            }
        }
        let step = step.and_then(|_| exchange::choose_upstream(session, ctx));
        if step.is_ok() {
            exchange::answer_expect_continue(session).await;
        }
        let step = match step {
            Ok(()) if !ctx.chains().request_body.is_empty() => exchange::read_small_body(session, ctx).await,
            other => other,
        };
        match step {
            Ok(()) => Ok(false),
            Err(reply) => {
                exchange::send_reply(session, ctx, reply).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<Box<HttpPeer>> {
        exchange::pick_peer(session, ctx)
    }

    fn fail_to_connect(&self, _s: &mut Session, _peer: &HttpPeer, ctx: &mut Box<Ctx>, mut e: Box<Error>) -> Box<Error> {
        let retry = exchange::connect_failed(ctx, &e);
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<Ctx>,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let retry = exchange::proxy_failed(session, ctx, &e, client_reused);
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        exchange::prepare_upstream_request(session, req, ctx);
        for entry in &ctx.chains().upstream_request {
            entry.plugin.upstream_request(req, &ctx.st);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        exchange::request_body(session, body, end_of_stream, ctx).await
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        exchange::upstream_answered(session, resp.status.as_u16(), ctx)?;
        if resp.status.as_u16() == 101 {
            exchange::upgraded(session, ctx);
        }
        exchange::upstream_head(session.req_header(), resp, ctx);
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        exchange::finish_response_head(session.req_header(), resp, ctx);
        exchange::close_after_refused_upgrade(session, resp.status.as_u16());
        exchange::compress_or_not(session, resp, ctx);
        exchange::client_framing(session, resp, ctx);
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<Option<Duration>> {
        ctx.response_ended |= end_of_stream;
        if exchange::past_deadline(ctx) && !end_of_stream {
            // A gRPC stream still running at its deadline (grpc-timeout) is ended.
            ctx.failure = Some(crate::plugin::Failure::Timeout);
            return Error::e_explain(ReadTimedout, "the gRPC deadline (grpc-timeout) passed");
        }
        for entry in &ctx.chains().response_body {
            if let Err(abort) = entry.plugin.response_body(body, end_of_stream, &mut ctx.st) {
                // A client can cause these (a transform that cannot reshape a body it asked
                // for): the plugin counts them; a log line each would let it flood the log.
                log::debug!("plugin {} ended the response: {}", entry.name, abort.0);
                // Pingora writes a head together with the body pieces that came with it: when
                // it has not gone out yet, the client gets the contract's error instead.
                ctx.error_code = Some(crate::plugins::transform::FAILED_CODE);
                ctx.pending_reply = Some(crate::plugin::Reply::error(
                    502,
                    crate::plugins::transform::FAILED_CODE,
                    abort.0,
                ));
                return Error::e_explain(PLUGIN_ABORT, "a body plugin ended the response");
            }
        }
        Ok(None)
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        exchange::trailers_arrived(trailers, ctx);
        for entry in &ctx.chains().response_trailers {
            entry.plugin.response_trailers(trailers, &mut ctx.st);
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Box<Ctx>) -> FailToProxy {
        let error_code = exchange::fail(session, e, ctx).await;
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<Ctx>) {
        exchange::done(session, e, ctx, &self.shared);
    }

    /// Pingora logs every final error at ERROR. What a client did — went away, sent too much
    /// or too slowly, was refused with a 4xx — is routine and in the access log; ERROR is kept
    /// for what an operator must act on (upstreams failing, Portico's own faults).
    fn suppress_error_log(&self, _session: &Session, _ctx: &Box<Ctx>, e: &Error) -> bool {
        matches!(e.esource(), ErrorSource::Downstream)
            || matches!(e.etype(), HTTPStatus(code) if *code < 500)
            || *e.etype() == PLUGIN_ABORT
    }
}
