//! What a plugin may answer instead of the upstream.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// The body of a reply Portico writes itself.
#[derive(Debug, Clone)]
pub enum ReplyBody {
    /// The contract's JSON error (`{"error", "message", "trace_id"}`), or a gRPC status for
    /// gRPC requests. The core fills in the trace id.
    Error {
        code: &'static str,
        message: String,
    },
    /// Any other body, with its content type.
    Data {
        content_type: &'static str,
        bytes: Bytes,
    },
    Empty,
}

/// A response a plugin asks the core to write instead of proxying.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: ReplyBody,
}

impl Reply {
    /// A gateway error: `status`, a snake_case `code` from the contract, a human `message`.
    pub fn error(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Error {
                code,
                message: message.into(),
            },
        }
    }

    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Data {
                content_type: "application/json",
                bytes: body.into(),
            },
        }
    }

    pub fn empty(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Empty,
        }
    }

    /// Add a header (invalid values are dropped rather than breaking the reply).
    pub fn with_header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((HeaderName::from_static(name), v));
        }
        self
    }

    pub fn error_code(&self) -> Option<&'static str> {
        match &self.body {
            ReplyBody::Error { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A plugin's answer in the request phase.
#[derive(Debug)]
pub enum Verdict {
    Continue,
    Respond(Reply),
}
