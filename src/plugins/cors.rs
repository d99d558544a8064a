//! `cors`: Cross-Origin Resource Sharing. Preflights are answered by the gateway itself (an
//! edge plugin, so before authentication); CORS headers are added for allowed origins only, on
//! every response — Portico's own errors included, so a browser can read why it was refused.

use crate::config::units::{bounded, Dur};
use crate::config::ConfigError;
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use http::{HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Allowed origins: `https://app.example.com`, `https://*.example.com`, or `*`.
    pub origins: Vec<String>,
    /// Methods allowed cross-origin (default GET, HEAD, POST).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Request headers allowed cross-origin (`*` for any; default none beyond the safelisted).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response headers scripts may read.
    #[serde(default)]
    pub expose: Vec<String>,
    #[serde(default)]
    pub credentials: bool,
    /// How long browsers may cache a preflight.
    #[serde(default)]
    pub max_age: Option<Dur>,
}

enum OriginRule {
    Any,
    Exact(String),
    /// `https://*.example.com` → scheme `https://`, suffix `.example.com`.
    Subdomains(String, String),
}

pub struct Cors {
    origins: Vec<OriginRule>,
    methods: Vec<Method>,
    methods_text: String,
    headers: Vec<String>,
    any_header: bool,
    expose: Option<String>,
    credentials: bool,
    max_age: Option<String>,
}

impl Cors {
    pub fn new(cfg: Config, _ctx: &BuildContext) -> Result<Self, ConfigError> {
        if cfg.origins.is_empty() {
            return Err(ConfigError::new("origins", "list at least one origin (or '*')"));
        }
        let mut origins = Vec::new();
        for (i, o) in cfg.origins.iter().enumerate() {
            let o = o.trim().trim_end_matches('/').to_ascii_lowercase();
            let loc = format!("origins[{i}]");
            if o == "*" {
                if cfg.credentials {
                    return Err(ConfigError::new(
                        loc,
                        "'*' cannot be used with credentials: list the origins",
                    ));
                }
                origins.push(OriginRule::Any);
            } else if let Some((scheme, host)) = o.split_once("://*.") {
                origins.push(OriginRule::Subdomains(format!("{scheme}://"), format!(".{host}")));
            } else if o.contains("://") || o == "null" {
                origins.push(OriginRule::Exact(o));
            } else {
                return Err(ConfigError::new(
                    loc,
                    format!("'{o}' is not an origin like https://app.example.com"),
                ));
            }
        }
        let names = cfg
            .methods
            .unwrap_or_else(|| vec!["GET".into(), "HEAD".into(), "POST".into()]);
        let mut methods = Vec::new();
        for (i, m) in names.iter().enumerate() {
            methods.push(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| ConfigError::new(format!("methods[{i}]"), format!("'{m}' is not a method")))?,
            );
        }
        let methods_text = methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
        let any_header = cfg.headers.iter().any(|h| h == "*");
        let headers: Vec<String> = cfg
            .headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .filter(|h| h != "*")
            .collect();
        for (i, h) in headers.iter().chain(cfg.expose.iter()).enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    format!("headers[{i}]"),
                    format!("'{h}' is not a header name"),
                ));
            }
        }
        // Browsers cap it lower still (Chromium 2h, Firefox 24h).
        if let Some(Err(m)) = cfg
            .max_age
            .map(|d| bounded(d.0, Duration::ZERO, Duration::from_secs(86400)))
        {
            return Err(ConfigError::new("max_age", m));
        }
        Ok(Cors {
            origins,
            methods,
            methods_text,
            headers,
            any_header,
            expose: (!cfg.expose.is_empty()).then(|| cfg.expose.join(", ")),
            credentials: cfg.credentials,
            max_age: cfg.max_age.map(|d| d.0.as_secs().to_string()),
        })
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let o = origin.to_ascii_lowercase();
        self.origins.iter().any(|r| match r {
            OriginRule::Any => true,
            OriginRule::Exact(e) => *e == o,
            OriginRule::Subdomains(scheme, suffix) => o
                .strip_prefix(scheme.as_str())
                .is_some_and(|host| host.len() > suffix.len() && host.ends_with(suffix.as_str())),
        })
    }

    /// The request's Origin, when it is one this plugin allows.
    fn allowed_origin<'a>(&self, req: &'a RequestHeader) -> Option<&'a HeaderValue> {
        let mut all = req.headers.get_all(http::header::ORIGIN).iter();
        let (Some(origin), None) = (all.next(), all.next()) else {
            return None;
        };
        origin.to_str().ok().filter(|o| self.origin_allowed(o)).map(|_| origin)
    }

    fn allow_origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        if !self.credentials && self.origins.iter().any(|r| matches!(r, OriginRule::Any)) {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    fn preflight(&self, req: &RequestHeader) -> Reply {
        if self.allowed_origin(req).is_none() {
            return Reply::error(403, "forbidden", "this origin is not allowed (CORS)");
        }
        let method = req
            .headers
            .get("access-control-request-method")
            .and_then(|v| Method::from_bytes(v.as_bytes()).ok());
        if !method.is_some_and(|m| self.methods.contains(&m)) {
            return Reply::error(403, "forbidden", "this method is not allowed cross-origin (CORS)");
        }
        let requested: Vec<String> = req
            .headers
            .get_all("access-control-request-headers")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if !self.any_header && requested.iter().any(|h| !self.headers.contains(h)) {
            return Reply::error(
                403,
                "forbidden",
                "a requested header is not allowed cross-origin (CORS)",
            );
        }
        let mut reply = Reply::empty(204)
            .with_header("access-control-allow-methods", &self.methods_text)
            .with_header(
                "vary",
                "origin, access-control-request-method, access-control-request-headers",
            );
        if !requested.is_empty() {
            reply = reply.with_header("access-control-allow-headers", requested.join(", "));
        }
        if let Some(age) = &self.max_age {
            reply = reply.with_header("access-control-max-age", age);
        }
        // Access-Control-Allow-Origin (and credentials) are added by the response phase.
        reply
    }
}

fn is_preflight(req: &RequestHeader) -> bool {
    req.method == Method::OPTIONS
        && req.headers.contains_key(http::header::ORIGIN)
        && req.headers.contains_key("access-control-request-method")
}

#[async_trait]
impl Plugin for Cors {
    fn kind(&self) -> PluginKind {
        PluginKind::Edge
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::RESPONSE
    }

    async fn request(&self, req: &mut RequestHeader, _st: &mut RequestState) -> Verdict {
        if is_preflight(req) {
            return Verdict::Respond(self.preflight(req));
        }
        Verdict::Continue
    }

    fn response(&self, req: &RequestHeader, resp: &mut ResponseHeader, _st: &mut RequestState) {
        let Some(origin) = self.allowed_origin(req) else { return };
        let _ = resp.insert_header("access-control-allow-origin", self.allow_origin_value(origin));
        if self.credentials {
            let _ = resp.insert_header("access-control-allow-credentials", "true");
        }
        if let Some(expose) = &self.expose {
            if !is_preflight(req) {
                let _ = resp.insert_header("access-control-expose-headers", expose.as_str());
            }
        }
        crate::util::add_vary(resp, "origin");
    }
}
