//! The admin listener: `/healthz`, `/metrics`, `/config`, `POST /reload`, and what live plugins
//! show through [`AdminState`] (`GET /canaries`, `POST /canaries/{route}/reset`).
//! It binds loopback by default and never shares a port with proxied traffic.
//!
//! A POST changes the gateway, so it must come from an operator, not from a web page: one that
//! carries an `Origin` (browsers add it to cross-site and fetch POSTs) or names another `Host`
//! (a DNS-rebinding page names its own) is refused with 403; with `admin.token` set, a POST also
//! needs `Authorization: Bearer <token>` (401 without it).

use crate::config::Snapshot;
use crate::plugin::{AdminState, Plugin};
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

fn refusal(status: u16, code: &str, message: &str) -> http::Response<Vec<u8>> {
    json(status, serde_json::json!({ "error": code, "message": message }))
}

impl AdminApp {
    /// Why a POST must be refused, if it must: cross-site or rebinding, then the token.
    fn refuse_post(&self, session: &ServerSession) -> Option<http::Response<Vec<u8>>> {
        let req = session.req_header();
        if req.headers.contains_key(http::header::ORIGIN) {
            return Some(refusal(
                403,
                "forbidden",
                "admin POSTs from a web page (with an Origin header) are refused",
            ));
        }
        if let Some(host) = req.headers.get(http::header::HOST) {
            let own = session.server_addr().and_then(|a| a.as_inet()).copied();
            if !own_host(
                host.as_bytes(),
                own,
                self.shared.snapshot().admin.as_ref().map(|a| a.address.as_str()),
            ) {
                return Some(refusal(
                    403,
                    "forbidden",
                    "the Host header does not name the admin listener",
                ));
            }
        }
        if let Some(token) = &self.shared.snapshot().admin_token {
            let given = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            // Compare digests, so the time taken says nothing about how close a guess was.
            use sha2::{Digest, Sha256};
            if Sha256::digest(given.as_bytes()) != Sha256::digest(token.as_bytes()) {
                return Some(
                    http::Response::builder()
                        .status(401)
                        .header(http::header::WWW_AUTHENTICATE, "Bearer")
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(
                            serde_json::json!({ "error": "unauthorized", "message": "this admin endpoint needs the admin token (Authorization: Bearer …)" })
                                .to_string()
                                .into_bytes(),
                        )
                        .expect("valid response"),
                );
            }
        }
        None
    }
}

/// Plugin collections the contract names: they answer `[]` when no live plugin reports there.
const COLLECTIONS: &[&str] = &["canaries"];

/// Every live plugin that shows admin state, with its route (`*` for a global plugin).
fn live_states(snap: &Snapshot) -> Vec<(Arc<str>, Arc<dyn Plugin>)> {
    let global: Vec<&Arc<dyn Plugin>> = snap.global.all.iter().map(|e| &e.plugin).collect();
    let mut out: Vec<(Arc<str>, Arc<dyn Plugin>)> = global
        .iter()
        .filter(|p| p.admin_state().is_some())
        .map(|p| (Arc::from("*"), Arc::clone(p)))
        .collect();
    for route in &snap.routes {
        for e in &route.chains.all {
            let inherited = global.iter().any(|g| Arc::ptr_eq(g, &e.plugin));
            if !inherited && e.plugin.admin_state().is_some() {
                out.push((route.name.clone(), e.plugin.clone()));
            }
        }
    }
    out
}

fn state_of(p: &Arc<dyn Plugin>) -> &dyn AdminState {
    p.admin_state().expect("filtered on admin_state")
}

/// `GET /{collection}` and `POST /{collection}/{route}/{action}` for plugins' admin state;
/// `None` when `path` names no such collection.
fn plugin_admin(snap: &Snapshot, method: &http::Method, path: &str) -> Option<http::Response<Vec<u8>>> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let collection = segments[0];
    let states: Vec<_> = live_states(snap)
        .into_iter()
        .filter(|(_, p)| state_of(p).collection() == collection)
        .collect();
    if states.is_empty() && !COLLECTIONS.contains(&collection) {
        return None;
    }
    let with_route = |route: &str, mut v: serde_json::Value| {
        if let Some(m) = v.as_object_mut() {
            m.insert("route".into(), route.into());
        }
        v
    };
    Some(match (method.as_str(), segments.as_slice()) {
        ("GET", [_]) => json(
            200,
            serde_json::Value::Array(
                states
                    .iter()
                    .map(|(route, p)| with_route(route, state_of(p).describe()))
                    .collect(),
            ),
        ),
        ("POST", [_, route, action]) => {
            let route = percent_encoding::percent_decode_str(route).decode_utf8_lossy();
            match states.iter().find(|(r, _)| **r == *route) {
                None => json(
                    404,
                    serde_json::json!({ "error": "not_found", "message": format!("no {collection} entry for route '{route}'") }),
                ),
                Some((r, p)) => match state_of(p).act(action) {
                    Some(v) => json(200, with_route(r, v)),
                    None => json(
                        404,
                        serde_json::json!({ "error": "not_found", "message": format!("no action '{action}' on {collection}") }),
                    ),
                },
            }
        }
        (_, [_]) | (_, [_, _, _]) => json(
            405,
            serde_json::json!({ "error": "method_not_allowed", "message": format!("{method} is not allowed on {path}") }),
        ),
        _ => json(
            404,
            serde_json::json!({ "error": "not_found", "message": format!("no admin endpoint {path}") }),
        ),
    })
}

/// Whether `host` names this admin listener: its configured address, the address the connection
/// arrived on, or `localhost` with that port.
fn own_host(host: &[u8], local: Option<std::net::SocketAddr>, configured: Option<&str>) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    if configured.is_some_and(|c| c.eq_ignore_ascii_case(&host)) {
        return true;
    }
    let Some(local) = local else {
        return false;
    };
    let port = local.port();
    host == local.to_string() || host == format!("localhost:{port}") || (port == 80 && host == "localhost")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        if method == http::Method::POST {
            if let Some(refused) = self.refuse_post(session) {
                return refused;
            }
        }
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
            _ => plugin_admin(&self.shared.snapshot(), &method, &path).unwrap_or_else(|| {
                json(
                    404,
                    serde_json::json!({ "error": "not_found", "message": format!("no admin endpoint {path}") }),
                )
            }),
        }
    }
}
