//! `api_key`: identify the consumer by an API key from `consumers`.
//!
//! Keys are looked up by their SHA-256 (configured as plain keys or as hashes), so no
//! comparison of secret bytes leaks timing. The key is removed before forwarding.

use crate::config::{ConfigError, Consumers};
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use http::HeaderName;
use pingora::http::RequestHeader;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Header carrying the key (default `x-api-key`).
    #[serde(default)]
    pub header: Option<String>,
    /// Query parameter carrying the key (optional; the header wins when both are sent).
    #[serde(default)]
    pub query: Option<String>,
    /// Consumers allowed on this route (default: any known consumer).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
}

pub struct ApiKey {
    header: HeaderName,
    query: Option<String>,
    allow: Option<Vec<String>>,
    consumers: Arc<Consumers>,
}

impl ApiKey {
    pub fn new(cfg: Config, ctx: &BuildContext) -> Result<Self, ConfigError> {
        let name = cfg.header.unwrap_or_else(|| "x-api-key".into());
        let header = crate::util::header_name(&name).map_err(|e| ConfigError::new("header", e))?;
        if let Some(allow) = &cfg.allow {
            for (i, c) in allow.iter().enumerate() {
                if !ctx.consumers.names.contains(c) {
                    return Err(ConfigError::new(
                        format!("allow[{i}]"),
                        format!("no consumer named '{c}'"),
                    ));
                }
            }
        }
        if cfg.query.as_deref() == Some("") {
            return Err(ConfigError::new("query", "must not be empty"));
        }
        Ok(ApiKey {
            header,
            query: cfg.query,
            allow: cfg.allow,
            consumers: ctx.consumers.clone(),
        })
    }
}

fn unauthorized(message: &str) -> Verdict {
    Verdict::Respond(Reply::error(401, "unauthorized", message))
}

#[async_trait]
impl Plugin for ApiKey {
    fn kind(&self) -> PluginKind {
        PluginKind::Authenticate
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn credential_query_params(&self) -> Vec<String> {
        self.query.iter().cloned().collect()
    }

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let mut from_header = req.headers.get_all(&self.header).iter();
        let key: Option<Vec<u8>> = match (from_header.next(), from_header.next()) {
            (Some(_), Some(_)) => return unauthorized("more than one API key header"),
            (Some(v), None) => Some(v.as_bytes().to_vec()),
            (None, _) => self
                .query
                .as_ref()
                .and_then(|q| crate::util::query_param(&req.uri, q))
                .map(String::into_bytes),
        };
        // The key is a secret between the client and the gateway: it never goes upstream.
        req.remove_header(&self.header);
        if let Some(q) = &self.query {
            if let Some(uri) = crate::util::without_query_param(&req.uri, q) {
                req.set_uri(uri);
            }
        }
        let Some(key) = key else {
            return unauthorized("an API key is required");
        };
        let Some(consumer) = self.consumers.by_key(&key) else {
            return unauthorized("the API key is not valid");
        };
        if self.allow.as_ref().is_some_and(|a| !a.iter().any(|c| c == consumer)) {
            return Verdict::Respond(Reply::error(403, "forbidden", "this consumer may not use this route"));
        }
        st.consumer = Some(consumer.to_string());
        Verdict::Continue
    }
}
