use super::*;
use crate::config::snapshot::Rewrite;
use crate::config::ClientIpResolver;
use std::net::IpAddr;
use std::time::Duration;

fn check(yaml: &str) -> Result<Snapshot, ConfigErrors> {
    compile(
        yaml,
        Path::new("test.yaml"),
        &Registry::builtin(),
        &Resources::offline(),
    )
}

fn errors(yaml: &str) -> String {
    match check(yaml) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.to_string(),
    }
}

const BASE: &str = "listeners: [{address: 127.0.0.1:18080}]\nupstreams:\n  a: {endpoints: [127.0.0.1:9001]}\n";

#[test]
fn minimal_config_compiles() {
    let s = check(&format!("{BASE}routes:\n  - {{name: r, upstream: a}}\n")).unwrap();
    assert_eq!(s.routes.len(), 1);
    assert_eq!(s.limits.max_request_header_bytes, 32 << 10);
}

/// Portico's own defaults for Pingora's `server:` settings, each overridable; `~` gives
/// Pingora's `None` (for the timer threshold: Pingora's fast timers throughout).
#[test]
fn server_defaults_apply_unless_set() {
    let conf = |yaml: &str| -> pingora::server::configuration::ServerConf {
        let s = check(&format!("{BASE}{yaml}routes: []\n")).unwrap();
        serde_yaml::from_value(serde_yaml::Value::Mapping(s.server.clone())).unwrap()
    };
    let default = conf("");
    assert_eq!(default.fast_timeout_to_tokio_threshold_seconds, Some(0));
    assert_eq!(default.grace_period_seconds, Some(5));
    assert_eq!(default.pid_file, "/tmp/portico.pid");
    let set = conf("server: {fast_timeout_to_tokio_threshold_seconds: 120, grace_period_seconds: 1}\n");
    assert_eq!(set.fast_timeout_to_tokio_threshold_seconds, Some(120));
    assert_eq!(set.grace_period_seconds, Some(1));
    let none = conf("server: {fast_timeout_to_tokio_threshold_seconds: ~}\n");
    assert_eq!(none.fast_timeout_to_tokio_threshold_seconds, None);
}

#[test]
fn errors_are_located() {
    let e = errors(&format!(
        "{BASE}routes:\n  - {{name: r, upstream: a, match: {{path_prefx: /x}}}}\n"
    ));
    assert!(e.contains("routes[0].match: unknown field 'path_prefx'"), "{e}");
    let e = errors(&format!("{BASE}routes:\n  - {{name: r, upstream: b}}\n"));
    assert!(e.contains("routes[0].upstream: no upstream named 'b'"), "{e}");
    let e = errors(&format!(
        "{BASE}routes:\n  - {{name: r, upstream: a}}\n  - {{name: r, upstream: a}}\n"
    ));
    assert!(e.contains("routes[1].name: duplicate route name 'r'"), "{e}");
    let e = errors(&format!(
        "{BASE}routes:\n  - {{name: r, upstream: a, plugins: [nope: {{}}]}}\n"
    ));
    assert!(e.contains("routes[0].plugins[0]: unknown plugin 'nope'"), "{e}");
    let e = errors(&format!(
        "{BASE}client_ip: {{trusted_proxies: [10.0.0.0/33]}}\nroutes: []\n"
    ));
    assert!(e.contains("client_ip.trusted_proxies[0]"), "{e}");
    let e = errors(&format!("{BASE}limits: {{header_timeout: fast}}\nroutes: []\n"));
    assert!(
        e.contains("limits.header_timeout") && e.contains("invalid duration"),
        "{e}"
    );
    // A repeated top-level key, which serde_yaml does not locate: found in the text.
    let e = errors(&format!("{BASE}routes: []\nlimits: {{}}\nroutes: []\n"));
    assert!(e.contains("duplicate entry with key \"routes\" at line 6"), "{e}");
    let e = errors(&format!("{BASE}server: {{thread: 2}}\nroutes: []\n"));
    assert!(e.contains("server: unknown field 'thread'"), "{e}");
    let e = errors(&format!(
        "{BASE}routes:\n  - {{name: r, upstream: a, plugins: [headers: {{request: {{sett: {{}}}}}}]}}\n"
    ));
    assert!(
        e.contains("routes[0].plugins[0].headers.request: unknown field 'sett'"),
        "{e}"
    );
}

#[test]
fn every_duration_and_size_has_a_bound() {
    let huge = "18446744073709551615s";
    for (yaml, want) in [
        (format!("limits: {{header_timeout: {huge}}}\nroutes: []\n"), "limits.header_timeout: invalid duration"),
        ("limits: {header_timeout: 2h}\nroutes: []\n".into(), "limits.header_timeout: must be at most 1h"),
        ("limits: {body_timeout: 2h}\nroutes: []\n".into(), "limits.body_timeout: must be at most 1h"),
        ("limits: {send_timeout: 2h}\nroutes: []\n".into(), "limits.send_timeout: must be at most 1h"),
        ("limits: {send_timeout: 10ms}\nroutes: []\n".into(), "limits.send_timeout: must be at least 100ms"),
        ("limits: {h2_idle_timeout: 2d}\nroutes: []\n".into(), "limits.h2_idle_timeout: must be at most 1d"),
        ("limits: {max_request_body_bytes: 2048GiB}\nroutes: []\n".into(), "limits.max_request_body_bytes: must be at most 1TiB"),
        (
            "routes:\n  - {name: r, upstream: a, timeouts: {read: 2d}}\n".into(),
            "routes[0].timeouts.read: must be at most 1d",
        ),
        (
            "routes:\n  - {name: r, upstream: a, max_request_body_bytes: 2048GiB}\n".into(),
            "routes[0].max_request_body_bytes: must be at most 1TiB",
        ),
        (
            "upstreams:\n  b: {endpoints: [127.0.0.1:9001], timeouts: {connect: 2h}}\nroutes: []\n".into(),
            "upstreams.b.timeouts.connect: must be at most 1h",
        ),
        (
            "upstreams:\n  b: {endpoints: [127.0.0.1:9001], timeouts: {write: 0s}}\nroutes: []\n".into(),
            "upstreams.b.timeouts.write: must be more than 0",
        ),
        (
            "upstreams:\n  b: {endpoints: [127.0.0.1:9001], passive: {eject_for: 400d}}\nroutes: []\n".into(),
            "upstreams.b.passive.eject_for: invalid duration '400d': at most 365d",
        ),
        (
            "upstreams:\n  b: {endpoints: [127.0.0.1:9001], passive: {eject_for: 2d}}\nroutes: []\n".into(),
            "upstreams.b.passive.eject_for: must be at most 1d",
        ),
        (
            "upstreams:\n  b: {endpoints: [127.0.0.1:9001], resolve_every: 2d}\nroutes: []\n".into(),
            "upstreams.b.resolve_every: must be at most 1d",
        ),
        (
            "upstreams:\n  b: {endpoints: [127.0.0.1:9001], health_check: {kind: tcp, interval: 2d, timeout: 1s}}\nroutes: []\n".into(),
            "upstreams.b.health_check.interval: must be at most 1d",
        ),
        (
            "routes:\n  - {name: r, upstream: a, plugins: [jwt: {secret: 0123456789abcdef0123456789abcdef, algorithms: [HS256], leeway: 2h}]}\n".into(),
            "routes[0].plugins[0].jwt.leeway: must be at most 1h",
        ),
        (
            "routes:\n  - {name: r, upstream: a, plugins: [cors: {origins: ['*'], max_age: 2d}]}\n".into(),
            "routes[0].plugins[0].cors.max_age: must be at most 1d",
        ),
    ] {
        let text = match yaml.strip_prefix("upstreams:\n") {
            Some(ups) => format!("{BASE}{ups}"),
            None => format!("{BASE}{yaml}"),
        };
        let e = errors(&text);
        assert!(e.contains(want), "expected `{want}` in:\n{e}");
    }
}

#[test]
fn unresolvable_host_is_a_config_error() {
    let yaml = "listeners: [{address: 127.0.0.1:1}]\nupstreams:\n  a: {endpoints: [no-such-host.invalid:80]}\n";
    let e = compile(yaml, Path::new("t.yaml"), &Registry::builtin(), &Resources::new(1))
        .err()
        .expect("an unresolvable name is an error at load")
        .to_string();
    assert!(e.contains("upstreams.a.endpoints[0]"), "{e}");
    assert!(check(yaml).is_ok(), "-t checks syntax only, offline");
}

#[test]
fn rewrite() {
    let rw = Rewrite {
        strip_prefix: Some("/users".into()),
        add_prefix: Some("/v1/users".into()),
    };
    assert_eq!(rw.apply("/users"), "/v1/users");
    assert_eq!(rw.apply("/users/7"), "/v1/users/7");
    assert_eq!(rw.apply("/users/"), "/v1/users/");
    let rw = Rewrite {
        strip_prefix: Some("/api".into()),
        add_prefix: None,
    };
    assert_eq!(rw.apply("/api/x"), "/x");
    assert_eq!(rw.apply("/api"), "/");
    assert_eq!(rw.apply("/apix"), "/apix");
}

#[test]
fn client_ip_walks_trusted_hops() {
    let r = ClientIpResolver {
        trusted: vec!["10.0.0.0/8".parse().unwrap()],
    };
    let mut h = http::HeaderMap::new();
    h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2, 10.0.0.5".parse().unwrap());
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    assert_eq!(r.resolve(peer, &h), "2.2.2.2".parse::<IpAddr>().unwrap());
    assert_eq!(
        r.resolve("9.9.9.9".parse().unwrap(), &h),
        "9.9.9.9".parse::<IpAddr>().unwrap()
    );
    let mut junk = http::HeaderMap::new();
    junk.append("x-forwarded-for", "1.1.1.1, junk".parse().unwrap());
    assert_eq!(r.resolve(peer, &junk), peer);
    assert_eq!(
        r.resolve("::ffff:9.9.9.9".parse().unwrap(), &h),
        "9.9.9.9".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn retry_policies() {
    let s = check(
        "listeners: [{address: 127.0.0.1:18080}]\nupstreams:\n  a:\n    endpoints: [127.0.0.1:9001]\n    retries: { attempts: 2, on: [connect_failure, reset, 502, 503, 504, timeout], budget: 0.2 }\n  b: {endpoints: [127.0.0.1:9002], retries: 3}\n  c: {endpoints: [127.0.0.1:9003]}\nroutes: []\n",
    )
    .unwrap();
    let a = &s.upstreams["a"].retries;
    assert_eq!(a.attempts, 2);
    assert!(a.on_connect_failure && a.on_reset && a.on_timeout);
    assert_eq!(a.on_status, vec![502, 503, 504]);
    assert_eq!(a.budget.as_ref().map(|b| b.ratio), Some(0.2));
    let b = &s.upstreams["b"].retries;
    assert!(b.attempts == 3 && b.on_connect_failure && !b.on_reset && b.budget.is_none());
    let c = &s.upstreams["c"].retries;
    assert!(c.attempts == 1 && c.on_connect_failure && c.on_status.is_empty());

    let e = errors(
        "upstreams:\n  a:\n    endpoints: [127.0.0.1:9001]\n    retries: { attempts: 11, on: [500, resets], budget: -1 }\nroutes: []\n",
    );
    assert!(e.contains("upstreams.a.retries.attempts: at most 10"), "{e}");
    assert!(
        e.contains("upstreams.a.retries.on[0]: unknown retry condition '500'"),
        "{e}"
    );
    assert!(
        e.contains("upstreams.a.retries.on[1]: unknown retry condition 'resets'"),
        "{e}"
    );
    assert!(e.contains("upstreams.a.retries.budget"), "{e}");
}

/// A listener that does not parse is reported once: no "at least one listener" on top of it.
#[test]
fn a_broken_listener_is_reported_once() {
    let e = errors("listeners: [{address: 127.0.0.1:18080, htp2: true}]\nupstreams:\n  a: {endpoints: [127.0.0.1:9001]}\nroutes:\n  - {name: r, upstream: a}\n");
    assert!(e.contains("listeners[0]: unknown field 'htp2'"), "{e}");
    assert!(!e.contains("at least one listener"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let e = errors("upstreams:\n  a: {endpoints: [127.0.0.1:9001]}\nroutes:\n  - {name: r, upstream: a}\n");
    assert!(e.contains("at least one listener"), "{e}");
}

/// Every mistake of a plugin block at once, not the first alone.
#[test]
fn every_error_of_a_plugin_block_is_reported() {
    let e = errors(&format!(
        "{BASE}routes:\n  - {{name: r, upstream: a, plugins: [rate_limit: {{requests: 0, per: 0s, key: bogus}}]}}\n"
    ));
    for field in [
        "requests: must be at least 1",
        "per: must be more than 0",
        "key: unknown key",
    ] {
        assert!(e.contains(field), "{field} missing in: {e}");
    }
    assert!(e.starts_with("routes[0].plugins[0]"), "{e}");
}

/// Passive ejection: on for failed connects with no block (nginx's max_fails=1
/// fail_timeout=10s), a block as written, or `off`.
#[test]
fn passive_ejection_defaults_and_off() {
    let s = check(&format!(
        "{BASE}  b: {{endpoints: [127.0.0.1:9002], passive: off}}\n  c: {{endpoints: [127.0.0.1:9003], passive: {{consecutive_failures: 3}}}}\nroutes:\n  - {{name: r, upstream: a}}\n"
    ))
    .unwrap();
    let a = s.upstreams["a"].passive.clone().unwrap();
    assert_eq!(
        (a.consecutive_failures, a.eject_for, a.connect_only),
        (1, Duration::from_secs(10), true)
    );
    assert!(s.upstreams["b"].passive.is_none());
    let c = s.upstreams["c"].passive.clone().unwrap();
    assert_eq!((c.consecutive_failures, c.connect_only), (3, false));
    let e = errors(&format!(
        "{BASE}  b: {{endpoints: [127.0.0.1:9002], passive: maybe}}\nroutes:\n  - {{name: r, upstream: a}}\n"
    ));
    assert!(e.contains("upstreams.b"), "{e}");
}

/// `Location` mapping is on for every proxied route unless switched off.
#[test]
fn location_mapping_is_on_by_default() {
    let s = check(&format!(
        "{BASE}routes:\n  - {{name: plain, upstream: a, match: {{path_prefix: /p}}}}\n  - {{name: off, upstream: a, rewrite_location: false}}\n"
    ))
    .unwrap();
    assert!(s.routes[0].rewrite_location);
    assert!(!s.routes[1].rewrite_location);
}
