//! How a request ended, for the `log` hook; how a body transform gives up.

use std::sync::Arc;

/// How a request ended, for the `log` hook (metrics, canary guards, audit).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The status sent to the client (0 if the client got nothing, e.g. it went away).
    pub status: u16,
    /// The upstream's own status, when an upstream answered.
    pub upstream_status: Option<u16>,
    /// The upstream the request went to (or would have), by name.
    pub upstream: Option<Arc<str>>,
    /// The endpoint of the last attempt, as written in the config.
    pub endpoint: Option<String>,
    /// Portico's error code when Portico wrote the answer (`no_route`, `upstream_timeout`, …).
    pub error: Option<&'static str>,
    /// Why the exchange with the upstream failed, when it did.
    pub failure: Option<Failure>,
    /// The gRPC status, from the trailers or a trailers-only answer.
    pub grpc_status: Option<u32>,
    /// From the request's arrival to the end of the response.
    pub duration: std::time::Duration,
}

/// A failed exchange with an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, TLS handshake).
    Connect,
    /// A connect, read or write timeout.
    Timeout,
    /// The connection broke, or the upstream's answer could not be read.
    Broken,
}

impl Outcome {
    /// 5xx, a failed exchange, or a gRPC status that means the server failed (UNKNOWN,
    /// DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE): what a canary guard counts against a side.
    pub fn is_failure(&self) -> bool {
        self.status >= 500 || self.failure.is_some() || matches!(self.grpc_status, Some(2 | 4 | 13 | 14))
    }
}

/// A response body transform that cannot go on: the response ends here (closed, so the client
/// can tell it is incomplete) rather than carrying a half-rewritten body. When its head has not
/// gone out yet (Pingora writes a head together with the body pieces that arrived with it), the
/// client gets a 502 `transform_failed` error with this message instead.
#[derive(Debug, Clone)]
pub struct Abort(pub String);
