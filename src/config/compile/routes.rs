//! `routes`: match rules, the upstream, rewrites, timeouts and body limits, and each route's
//! plugin chains (the global plugins, replaced or switched off per route).

use super::plugins::{build_plugin, PluginSlot};
use crate::config::error::ConfigErrors;
use crate::config::raw;
use crate::config::snapshot::{Limits, Rewrite, Route, RouteTimeouts};
use crate::plugin::{BuildContext, Chains, Entry, PluginKind, Registry};
use crate::route::{HostPattern, Matcher, PathMatch};
use crate::upstream::Upstream;
use http::{HeaderValue, Method};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// What every route's compile needs from the rest of the config.
pub(super) struct RouteInputs<'a> {
    pub registry: &'a Registry,
    pub global: &'a [Entry],
    pub upstreams: &'a HashMap<String, Arc<Upstream>>,
    /// Upstreams that failed to compile: routes naming them get no second error.
    pub broken_upstreams: &'a HashSet<String>,
    pub limits: &'a Limits,
    /// The global compression policy (a route may replace it or switch it off).
    pub compression: Option<&'a Arc<crate::compression::Policy>>,
    pub ctx: &'a BuildContext,
}

pub(super) fn compile_routes(
    list: &[(usize, raw::Route)],
    inp: &RouteInputs<'_>,
    errs: &mut ConfigErrors,
) -> Vec<Arc<Route>> {
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in list {
        let loc = format!("routes[{i}]");
        if r.name.trim().is_empty() {
            errs.push(format!("{loc}.name"), "a route needs a name");
        } else if !names.insert(r.name.clone()) {
            errs.push(format!("{loc}.name"), format!("duplicate route name '{}'", r.name));
        }
        if let Some(route) = compile_route(&loc, r, inp, errs) {
            routes.push(Arc::new(route));
        }
    }
    routes
}

fn compile_route(loc: &str, r: &raw::Route, inp: &RouteInputs<'_>, errs: &mut ConfigErrors) -> Option<Route> {
    let matcher = compile_match(&r.matcher, &format!("{loc}.match"), errs);
    let mut ctx = inp.ctx.clone();
    ctx.route = Some(r.name.clone());
    ctx.route_params = matcher.as_ref().map(|m| m.path.params()).unwrap_or_default();
    ctx.route_upstream = r.upstream.clone();

    let mut entries: Vec<Entry> = Vec::new();
    let mut replaced: HashSet<Arc<str>> = HashSet::new();
    for (j, p) in r.plugins.iter().enumerate() {
        let ploc = format!("{loc}.plugins[{j}]");
        match build_plugin(inp.registry, p, &ploc, &ctx, errs) {
            Some(PluginSlot::On(e)) => {
                if !replaced.insert(e.name.clone()) {
                    errs.push(ploc, format!("plugin '{}' is listed twice", e.name));
                }
                entries.push(e);
            }
            Some(PluginSlot::Off(name)) => {
                replaced.insert(name);
            }
            None => {}
        }
    }
    let mut all: Vec<Entry> = inp
        .global
        .iter()
        .filter(|g| !replaced.contains(&g.name))
        .cloned()
        .collect();
    all.extend(entries);
    let chains = Chains::build(all);
    let answers = chains.all.iter().any(|e| e.kind == PluginKind::Answer);

    let upstream = match &r.upstream {
        Some(u) => match inp.upstreams.get(u) {
            Some(up) => Some(up.clone()),
            None if inp.broken_upstreams.contains(u) => None, // its own error is already reported
            None => {
                errs.push(format!("{loc}.upstream"), format!("no upstream named '{u}'"));
                None
            }
        },
        None if answers => None,
        None => {
            errs.push(
                format!("{loc}.upstream"),
                "a route needs an upstream unless one of its plugins answers every request itself",
            );
            None
        }
    };

    let rewrite = r.rewrite.as_ref().map(|rw| {
        for (field, v) in [("strip_prefix", &rw.strip_prefix), ("add_prefix", &rw.add_prefix)] {
            if let Some(v) = v {
                if !v.starts_with('/') || crate::route::normalize_path(v).ok().as_deref() != Some(v.as_str()) {
                    errs.push(
                        format!("{loc}.rewrite.{field}"),
                        format!("'{v}' must be a normalised path starting with '/'"),
                    );
                }
            }
        }
        Rewrite {
            strip_prefix: rw.strip_prefix.clone().map(|s| {
                if s.len() > 1 {
                    s.trim_end_matches('/').to_string()
                } else {
                    s
                }
            }),
            add_prefix: rw.add_prefix.clone(),
        }
    });
    if let Some(t) = &r.timeouts {
        super::upstreams::check_timeouts(t, &format!("{loc}.timeouts"), errs);
    }
    if r.max_request_body_bytes
        .is_some_and(|s| s.0 > super::server::MAX_BODY_BYTES)
    {
        errs.push(format!("{loc}.max_request_body_bytes"), "must be at most 1TiB");
    }
    let timeouts = r
        .timeouts
        .as_ref()
        .map(|t| RouteTimeouts {
            connect: t.connect.map(|d| d.0),
            read: t.read.map(|d| d.0),
            write: t.write.map(|d| d.0),
            idle: t.idle.map(|d| d.0),
        })
        .unwrap_or_default();
    let max_request_body_bytes = r
        .max_request_body_bytes
        .map(|s| s.0)
        .unwrap_or(inp.limits.max_request_body_bytes);

    let compression = crate::compression::Policy::for_route(r.compression.as_ref(), inp.compression).unwrap_or_else(
        |(field, message)| {
            errs.push(format!("{loc}.compression.{field}"), message);
            None
        },
    );
    // `Location` mapping is on by default on every proxied route, as nginx's implicit
    // `proxy_redirect default` is on every `proxy_pass`: an app that redirects to its own
    // address (`request.host_url` behind a plain route) must not send clients there.
    let rewrite_location = r.rewrite_location.unwrap_or(true);

    Some(Route {
        name: Arc::from(r.name.as_str()),
        matcher: matcher?,
        upstream,
        rewrite,
        timeouts,
        max_request_body_bytes,
        compression,
        rewrite_location,
        chains,
        metrics: Default::default(),
    })
}

fn compile_match(m: &raw::Match, loc: &str, errs: &mut ConfigErrors) -> Option<Matcher> {
    let mut ok = true;
    let mut hosts = Vec::new();
    for (i, h) in m.hosts.iter().enumerate() {
        match HostPattern::parse(h) {
            Ok(p) => hosts.push(p),
            Err(e) => {
                errs.push(format!("{loc}.hosts[{i}]"), e);
                ok = false;
            }
        }
    }
    let path = match (&m.path_prefix, &m.path) {
        (Some(_), Some(_)) => {
            errs.push(loc, "give either 'path_prefix' or 'path', not both");
            ok = false;
            PathMatch::Any
        }
        (Some(p), None) => PathMatch::prefix(p).unwrap_or_else(|e| {
            errs.push(format!("{loc}.path_prefix"), e);
            ok = false;
            PathMatch::Any
        }),
        (None, Some(p)) => PathMatch::path(p).unwrap_or_else(|e| {
            errs.push(format!("{loc}.path"), e);
            ok = false;
            PathMatch::Any
        }),
        (None, None) => PathMatch::Any,
    };
    let mut methods = Vec::new();
    for (i, name) in m.methods.iter().enumerate() {
        let upper = name.to_ascii_uppercase();
        match Method::from_bytes(upper.as_bytes()) {
            Ok(me) if upper.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(me),
            _ => {
                errs.push(format!("{loc}.methods[{i}]"), format!("'{name}' is not an HTTP method"));
                ok = false;
            }
        }
    }
    let mut headers = Vec::new();
    for (k, v) in &m.headers {
        match (crate::util::header_name(k), HeaderValue::from_str(v)) {
            (Ok(k), Ok(v)) => headers.push((k, v)),
            _ => {
                errs.push(format!("{loc}.headers.{k}"), "not a valid header name and value");
                ok = false;
            }
        }
    }
    ok.then_some(Matcher {
        hosts,
        path,
        methods,
        headers,
    })
}
