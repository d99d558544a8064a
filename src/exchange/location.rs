//! Redirects (nginx's `proxy_redirect default`, on for every proxied route): a `Location` or
//! `Content-Location` the upstream writes in its own terms — its own address, or a path under
//! the prefix the gateway added — is mapped back to what the client can follow: the client's
//! scheme and host, and the path through the route's rewrite in reverse. Locations elsewhere
//! pass unchanged.

use super::Ctx;
use crate::config::Rewrite;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};

/// Map the response's location headers back, if the route asks for it.
pub fn rewrite_locations(req: &RequestHeader, resp: &mut ResponseHeader, ctx: &Ctx) {
    let Some(route) = &ctx.route else { return };
    if !route.rewrite_location {
        return;
    }
    for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
        let Some(v) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(mapped) = map_location(v, req, route.rewrite.as_ref(), ctx) {
            if let Ok(v) = HeaderValue::from_str(&mapped) {
                let _ = resp.insert_header(name, v);
            }
        }
    }
}

/// The client-side form of `location`, or `None` to leave it as it is.
fn map_location(location: &str, req: &RequestHeader, rewrite: Option<&Rewrite>, ctx: &Ctx) -> Option<String> {
    let (origin, path) = if location.starts_with('/') && !location.starts_with("//") {
        (None, location)
    } else {
        // `//host/…` (protocol-relative) names a host as much as `http://host/…` does; it
        // stays protocol-relative.
        let relative_scheme = location.starts_with("//");
        let rest = location
            .strip_prefix("http://")
            .or_else(|| location.strip_prefix("https://"))
            .or_else(|| location.strip_prefix("//"))?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if !upstreams_own(authority, ctx) {
            return None;
        }
        let scheme = match (relative_scheme, ctx.st.tls) {
            (true, _) => "",
            (false, true) => "https:",
            (false, false) => "http:",
        };
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()))?;
        (
            Some(format!("{scheme}//{host}")),
            if path.is_empty() { "/" } else { path },
        )
    };
    let mapped_path = match rewrite {
        Some(rw) => map_path_back(rw, path)?,
        None => path.to_string(),
    };
    Some(format!("{}{mapped_path}", origin.unwrap_or_default()))
}

/// Whether `authority` names the upstream as the gateway addressed it (its `host`, or the
/// endpoint it connected to).
fn upstreams_own(authority: &str, ctx: &Ctx) -> bool {
    let Some(up) = &ctx.upstream else { return false };
    let matches = |name: &str| name.eq_ignore_ascii_case(authority);
    up.host.as_deref().is_some_and(matches)
        || ctx.endpoint.is_some_and(|i| matches(&up.endpoints[i].address))
        || up.endpoints.iter().any(|e| matches(&e.address))
}

/// The upstream-side path back through the rewrite: `add_prefix` removed, `strip_prefix`
/// restored. A path outside `add_prefix` is left alone (`None`).
fn map_path_back(rw: &Rewrite, path: &str) -> Option<String> {
    let (path_only, query) = match path.find(['?', '#']) {
        Some(i) => path.split_at(i),
        None => (path, ""),
    };
    let rest = match &rw.add_prefix {
        Some(add) => {
            let add = add.trim_end_matches('/');
            let rest = path_only.strip_prefix(add)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        }
        None => path_only,
    };
    let strip = rw.strip_prefix.as_deref().unwrap_or("").trim_end_matches('/');
    let joined = match (strip.is_empty(), rest.is_empty()) {
        (true, true) => "/".to_string(),
        (true, false) => rest.to_string(),
        (false, true) => strip.to_string(),
        (false, false) => format!("{strip}{rest}"),
    };
    Some(format!("{joined}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(strip: Option<&str>, add: Option<&str>) -> Rewrite {
        Rewrite {
            strip_prefix: strip.map(str::to_string),
            add_prefix: add.map(str::to_string),
        }
    }

    #[test]
    fn paths_map_back_through_the_rewrite() {
        let files = rw(Some("/files"), None);
        assert_eq!(map_path_back(&files, "/sub/").as_deref(), Some("/files/sub/"));
        assert_eq!(map_path_back(&files, "/").as_deref(), Some("/files/"));
        assert_eq!(map_path_back(&files, "/a?x=1").as_deref(), Some("/files/a?x=1"));
        let users = rw(Some("/users"), Some("/v1/users"));
        assert_eq!(map_path_back(&users, "/v1/users/7").as_deref(), Some("/users/7"));
        assert_eq!(map_path_back(&users, "/v1/users").as_deref(), Some("/users"));
        assert_eq!(map_path_back(&users, "/v1/usersx"), None, "segment-aware");
        assert_eq!(
            map_path_back(&users, "/elsewhere"),
            None,
            "outside the prefix: unchanged"
        );
        let added = rw(None, Some("/api"));
        assert_eq!(map_path_back(&added, "/api/x").as_deref(), Some("/x"));
    }
}
