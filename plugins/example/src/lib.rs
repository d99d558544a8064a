//! An example of a plugin written outside Portico, against its public API.
//!
//! `deny_header` refuses requests that carry a given header (say, a debug switch that must
//! never reach production upstreams) with the gateway's own 403 JSON error, and marks the
//! responses of the routes it guards.
//!
//! ```yaml
//! routes:
//!   - name: api
//!     upstream: app
//!     plugins:
//!       - deny_header: { header: x-debug, message: "debug requests are not allowed here" }
//! ```

use portico::async_trait::async_trait;
use portico::config::ConfigError;
use portico::http::HeaderName;
use portico::{
    BuildContext, Phases, Plugin, PluginKind, Registry, Reply, RequestHeader, RequestState, ResponseHeader, Verdict,
};
use serde::Deserialize;

/// The plugin's YAML block. `deny_unknown_fields` makes a typo a located config error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The header whose presence is refused.
    pub header: String,
    /// What the client is told.
    #[serde(default = "default_message")]
    pub message: String,
}

fn default_message() -> String {
    "this request is not allowed".into()
}

pub struct DenyHeader {
    header: HeaderName,
    message: String,
}

impl DenyHeader {
    pub fn new(cfg: Config, _ctx: &BuildContext) -> Result<Self, ConfigError> {
        let header = HeaderName::from_bytes(cfg.header.to_ascii_lowercase().as_bytes())
            .map_err(|_| ConfigError::new("header", format!("'{}' is not a valid header name", cfg.header)))?;
        Ok(DenyHeader {
            header,
            message: cfg.message,
        })
    }
}

#[async_trait]
impl Plugin for DenyHeader {
    /// An edge plugin runs before authentication: a refused request costs nothing more.
    fn kind(&self) -> PluginKind {
        PluginKind::Edge
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::RESPONSE
    }

    async fn request(&self, req: &mut RequestHeader, _st: &mut RequestState) -> Verdict {
        if req.headers.contains_key(&self.header) {
            return Verdict::Respond(Reply::error(403, "forbidden", self.message.clone()));
        }
        Verdict::Continue
    }

    fn response(&self, _req: &RequestHeader, resp: &mut ResponseHeader, _st: &mut RequestState) {
        let _ = resp.insert_header("x-guarded-by", "deny_header");
    }
}

/// Add this crate's plugins to a registry.
pub fn register(registry: &mut Registry) {
    registry.register("deny_header", DenyHeader::new);
}
