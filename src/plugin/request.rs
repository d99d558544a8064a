//! What every plugin knows about the request in flight.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// The W3C trace context and request id of one request.
#[derive(Debug, Clone, Default)]
pub struct TraceIds {
    /// The request id: the configured trace header's value, sent to the client and upstream,
    /// and written as `trace_id` in logs and error bodies.
    pub request_id: String,
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// This hop's span id, 16 hex digits (the upstream's parent).
    pub span_id: String,
    /// The trace flags to forward (`01` sampled).
    pub flags: String,
}

impl TraceIds {
    pub fn traceparent(&self) -> String {
        // By hand rather than format!: this runs for every proxied request.
        let mut s = String::with_capacity(6 + self.trace_id.len() + self.span_id.len() + self.flags.len());
        for part in ["00-", &self.trace_id, "-", &self.span_id, "-", &self.flags] {
            s.push_str(part);
        }
        s
    }
}

/// What every plugin knows about the request in flight.
pub struct RequestState {
    pub trace: TraceIds,
    /// The client address, resolved once from the peer and `client_ip.trusted_proxies`.
    pub client_ip: IpAddr,
    /// The matched route's name (empty before routing or when nothing matched).
    pub route: Arc<str>,
    /// Parameters captured by a `{param}` path template.
    pub params: Vec<(String, String)>,
    /// The authenticated consumer, set by an authenticate plugin.
    pub consumer: Option<String>,
    /// The calling service's identity (mTLS or a JWT claim), for `allow_services`.
    pub identity: Option<String>,
    /// An upstream chosen by a select plugin instead of the route's own.
    pub upstream_override: Option<String>,
    /// Lower-case host without port, as routing saw it.
    pub host: String,
    /// The normalised path, as routing saw it.
    pub path: String,
    /// True on TLS listeners.
    pub tls: bool,
    /// When the request arrived.
    pub started: Instant,
    /// Per-request data of plugins, keyed by type.
    pub vars: http::Extensions,
    /// The config the request runs on (the upstream client looks upstreams up in it).
    pub(crate) snapshot: Option<Arc<crate::config::Snapshot>>,
}

impl RequestState {
    pub fn new(client_ip: IpAddr) -> Self {
        RequestState {
            trace: TraceIds::default(),
            client_ip,
            route: Arc::from(""),
            params: Vec::new(),
            consumer: None,
            identity: None,
            upstream_override: None,
            host: String::new(),
            path: String::new(),
            tls: false,
            started: Instant::now(),
            vars: http::Extensions::new(),
            snapshot: None,
        }
    }

    /// A copy for work that outlives the request (a mirrored copy, a background call): the
    /// ids, the client, the route, the consumer and the config, without the per-request `vars`.
    pub fn detached(&self) -> RequestState {
        RequestState {
            trace: self.trace.clone(),
            client_ip: self.client_ip,
            route: self.route.clone(),
            params: self.params.clone(),
            consumer: self.consumer.clone(),
            identity: self.identity.clone(),
            upstream_override: self.upstream_override.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            tls: self.tls,
            started: self.started,
            vars: http::Extensions::new(),
            snapshot: self.snapshot.clone(),
        }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The verified claims of the request's token, when an authenticate plugin (`jwt`) put
    /// them there.
    pub fn claims(&self) -> Option<&Claims> {
        self.vars.get::<Claims>()
    }
}

/// A verified token's claims, as an authenticate plugin leaves them for the plugins after it
/// (`allow_services` with `from: jwt:CLAIM`, header templates, your own).
#[derive(Debug, Clone)]
pub struct Claims(pub Arc<serde_json::Map<String, serde_json::Value>>);

impl Claims {
    /// A claim as a string (strings as they are; numbers and booleans written out).
    pub fn text(&self, name: &str) -> Option<String> {
        match self.0.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
            _ => None,
        }
    }
}
