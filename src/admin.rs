//! The admin listener: `/healthz`, `/metrics`, `/config`, `POST /reload`.
//! It binds loopback by default and never shares a port with proxied traffic.

use crate::shared::Shared;
use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

pub struct AdminApp {
    pub shared: Arc<Shared>,
}

fn respond(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> http::Response<Vec<u8>> {
    let body = body.into();
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("valid response")
}

fn sorted_names<'a>(names: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut v: Vec<&String> = names.collect();
    v.sort();
    v
}

fn json(status: u16, v: serde_json::Value) -> http::Response<Vec<u8>> {
    respond(status, "application/json", v.to_string())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => {
                let down = self.shared.listeners.down();
                if down.is_empty() {
                    respond(200, "text/plain", "ok\n")
                } else {
                    respond(
                        503,
                        "text/plain",
                        format!("listeners not serving: {}\n", down.join(", ")),
                    )
                }
            }
            ("GET", "/metrics") => respond(200, "text/plain; version=0.0.4", crate::metrics::render()),
            ("GET", "/config") => {
                let s = self.shared.snapshot();
                json(
                    200,
                    serde_json::json!({
                        "path": s.meta.path.display().to_string(),
                        "hash": s.meta.hash,
                        "loaded_at": humantime::format_rfc3339_seconds(s.meta.loaded_at).to_string(),
                        "routes": s.routes.iter().map(|r| &*r.name).collect::<Vec<_>>(),
                        "upstreams": sorted_names(s.upstreams.keys()),
                        "listeners": s.listeners.iter().map(|l| &l.address).collect::<Vec<_>>(),
                    }),
                )
            }
            ("POST", "/reload") => {
                let shared = self.shared.clone();
                match tokio::task::spawn_blocking(move || shared.reload()).await {
                    Ok(Ok(report)) => json(
                        200,
                        serde_json::json!({ "result": "ok", "not_applied": report.not_applied }),
                    ),
                    Ok(Err(errors)) => json(
                        400,
                        serde_json::json!({
                            "result": "error",
                            "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                        }),
                    ),
                    Err(_) => json(
                        500,
                        serde_json::json!({ "result": "error", "errors": ["reload panicked"] }),
                    ),
                }
            }
            (_, "/healthz" | "/metrics" | "/config" | "/reload") => json(
                405,
                serde_json::json!({ "error": "method_not_allowed", "message": format!("{method} is not allowed on {path}") }),
            ),
            _ => json(
                404,
                serde_json::json!({ "error": "not_found", "message": format!("no admin endpoint {path}") }),
            ),
        }
    }
}
