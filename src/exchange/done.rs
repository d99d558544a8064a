//! The end of a request: its [`Outcome`], the metrics, the log chain, the access log line.

use super::Ctx;
use crate::access_log::Record;
use crate::plugin::Outcome;
use crate::shared::Shared;
use pingora::prelude::*;
use std::sync::Arc;

/// Once per request.
pub fn done(session: &Session, e: Option<&Error>, ctx: &mut Ctx, shared: &Shared) {
    let e = e.filter(|e| !super::reply::closed_after_answer(e, ctx));
    // The final status: an interim 1xx alone (the answer never came) is logged as 0 — or as
    // 499 (nginx's code) when the client went away before its answer.
    let status = match session.response_written().map(|h| h.status.as_u16()) {
        Some(s) if (100..200).contains(&s) && s != 101 => 0,
        Some(s) => s,
        None => 0,
    };
    let status = match status {
        0 if e.is_some_and(super::reply::client_went_away) => {
            ctx.error_code = Some("client_closed");
            499
        }
        // An HTTP/2 body reset at `body_timeout`: the stream is gone, the 408 could not go out.
        0 if e.is_some_and(crate::edge::h2_body_timed_out) => {
            ctx.error_code = Some("request_timeout");
            408
        }
        s => s,
    };
    let route = if ctx.st.route.is_empty() { "none" } else { &ctx.st.route };
    let upstream = ctx.upstream.as_ref().map(|u| u.name.as_str()).unwrap_or("none");
    let endpoint = ctx
        .endpoint
        .and_then(|i| ctx.upstream.as_ref().map(|u| u.endpoints[i].address.as_str()));
    let duration = ctx.st.started.elapsed();
    match &ctx.route {
        Some(r) => {
            let own_upstream = match (&ctx.upstream, &r.upstream) {
                (Some(used), Some(own)) => Arc::ptr_eq(used, own),
                (None, None) => true,
                _ => false,
            };
            r.metrics
                .record(route, upstream, own_upstream, status, duration.as_secs_f64());
        }
        None => {
            crate::metrics::REQUESTS
                .with_label_values(&[route, upstream, &status.to_string()])
                .inc();
            crate::metrics::DURATION
                .with_label_values(&[route])
                .observe(duration.as_secs_f64());
        }
    }
    let chains = ctx.chains();
    if !chains.log.is_empty() {
        let outcome = Outcome {
            status,
            upstream_status: ctx.upstream_status,
            upstream: ctx.upstream.as_ref().map(|u| Arc::from(u.name.as_str())),
            endpoint: endpoint.map(str::to_string),
            error: ctx.error_code,
            failure: ctx.failure,
            grpc_status: ctx.grpc_status,
            duration,
        };
        for entry in &chains.log {
            entry.plugin.log(&ctx.st, &outcome);
        }
    }
    if let Some(format) = ctx.snap.access_log {
        let req = session.req_header();
        // Free text a client may write in any bytes (obs-text): logged as UTF-8 with the
        // invalid bytes replaced, never dropped (each format then escapes what it must).
        let text = |n: &str| req.headers.get(n).map(|v| String::from_utf8_lossy(v.as_bytes()));
        let (user_agent, referer) = (text("user-agent"), text("referer"));
        let protocol = match req.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        };
        let record = Record {
            time: None,
            trace_id: &ctx.st.trace.request_id,
            traceparent_id: &ctx.st.trace.trace_id,
            client_ip: Some(ctx.st.client_ip),
            method: req.method.as_str(),
            host: &ctx.st.host,
            target: &crate::access_log::redact_query(
                req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                &ctx.snap.credential_query_params,
            ),
            protocol,
            status,
            route,
            upstream,
            endpoint,
            consumer: ctx.st.consumer.as_deref(),
            duration,
            bytes_sent: session.body_bytes_sent(),
            bytes_received: session.body_bytes_read(),
            user_agent: user_agent.as_deref(),
            referer: referer.as_deref(),
            error: ctx.error_code.or_else(|| e.map(super::reply::error_code)),
        };
        shared.access_log.write(format, &record);
    }
    ctx.in_flight = None;
}
