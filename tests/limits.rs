//! Issue 10, local store: `rate_limit` and `quota` through real sockets — the admitted rate at
//! twice the limit, the 429s and their headers, spoofed X-Forwarded-For, per-consumer budgets,
//! metrics, reloads that keep or reset counters, quota windows on an injected UTC clock, and
//! `portico -t` errors. The Redis store is in `tests/limits_redis.rs`.

mod common;
use common::*;
use portico::clock::{Clock, ManualClock};
use portico::resources::Resources;
use portico::Registry;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn upstream(up: &EchoServer) -> String {
    format!("upstreams:\n  up: {{ endpoints: [{}] }}\n", up.addr)
}

/// Every limited answer: 429, the contract's JSON error, and the limit headers.
fn assert_refusal(r: &Response, code: &str, limit: &str) {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(body["trace_id"].as_str(), r.header("x-request-id"), "{body}");
    let retry: u64 = r.header("retry-after").expect("retry-after").parse().expect("seconds");
    assert!(retry >= 1);
    assert_eq!(r.header("ratelimit-limit"), Some(limit));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let reset: u64 = r.header("ratelimit-reset").expect("ratelimit-reset").parse().unwrap();
    assert!(reset >= 1, "a refused key is not full again at once");
}

/// An admitted answer carries the headers too (no Retry-After); its remaining count.
fn admitted_remaining(r: &Response, limit: &str) -> u64 {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("ratelimit-limit"), Some(limit));
    assert!(r.header("ratelimit-reset").is_some_and(|v| v.parse::<u64>().is_ok()));
    assert_eq!(r.header("retry-after"), None);
    r.header("ratelimit-remaining").expect("remaining").parse().unwrap()
}

fn statuses(gw: &Gw, n: usize, req: impl Fn(usize) -> Request<'static>) -> Vec<u16> {
    (0..n).map(|i| gw.send(req(i)).status).collect()
}

fn count(s: &[u16], status: u16) -> usize {
    s.iter().filter(|&&x| x == status).count()
}

/// The `portico_limit_requests_total` series, which must exist (zeros included).
fn limit_metric(text: &str, route: &str, plugin: &str, result: &str) -> f64 {
    let labels = [("route", route), ("plugin", plugin), ("result", result)];
    let line = text.lines().find(|l| {
        l.starts_with("portico_limit_requests_total{")
            && labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
    });
    assert!(line.is_some(), "no series {labels:?} in:\n{text}");
    metric(text, "portico_limit_requests_total", &labels)
}

#[test]
fn at_twice_the_limit_the_admitted_rate_is_the_rate_plus_burst() {
    let up = EchoServer::start("up").unwrap();
    let (rate, burst) = (20.0, 5.0);
    let gw = Gw::start(&format!(
        "{}routes:\n  - name: limited\n    match: {{ path_prefix: /limited }}\n    upstream: up\n    plugins:\n      - rate_limit: {{ requests: 20, per: 1s, burst: 5 }}\n",
        upstream(&up)
    ));
    let before = gw.metrics();
    assert_eq!(limit_metric(&before, "limited", "rate_limit", "admitted"), 0.0);
    assert_eq!(limit_metric(&before, "limited", "rate_limit", "limited"), 0.0);

    // Two clients on one address, each at the limit, for 3 s: twice the limit together.
    let start = Arc::new(Barrier::new(2));
    let addr = gw.addr.clone();
    let clients: Vec<_> = (0..2u32)
        .map(|c| {
            let (start, addr) = (start.clone(), addr.clone());
            std::thread::spawn(move || {
                start.wait();
                let t0 = Instant::now() + Duration::from_millis(25 * u64::from(c));
                let mut out = Vec::new();
                for i in 0..60u32 {
                    let at = t0 + Duration::from_millis(50) * i;
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let sent = Instant::now();
                    let r = get(&addr, "/limited/x").expect("request");
                    out.push((sent, r));
                }
                out
            })
        })
        .collect();
    let results: Vec<(Instant, Response)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let first = results.iter().map(|(t, _)| *t).min().unwrap();
    let last = results.iter().map(|(t, _)| *t).max().unwrap();
    let span = (last - first).as_secs_f64();
    let offered = results.len() as f64 / span;
    assert!(offered > 1.5 * rate, "the clients only managed {offered:.1}/s");

    let mut admitted = 0.0;
    for (_, r) in &results {
        match r.status {
            200 => {
                admitted += 1.0;
                assert!(admitted_remaining(r, "6") <= 5);
            }
            _ => assert_refusal(r, "rate_limited", "6"),
        }
    }
    let expected = rate * span + burst + 1.0;
    eprintln!("{span:.2}s at {offered:.1}/s: admitted {admitted}, expected {expected:.1}");
    assert!(
        (admitted - expected).abs() <= 0.1 * expected,
        "admitted {admitted}, expected {expected:.1} ±10%"
    );
    let after = gw.metrics();
    assert_eq!(limit_metric(&after, "limited", "rate_limit", "admitted"), admitted);
    assert_eq!(
        limit_metric(&after, "limited", "rate_limit", "limited"),
        results.len() as f64 - admitted
    );
}

#[test]
fn a_spoofed_forwarded_for_earns_nothing() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "client_ip: {{ trusted_proxies: [127.0.0.5/32] }}\n{}routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: up\n    plugins:\n      - rate_limit: {{ requests: 1, per: 1m, burst: 2, key: ip }}\n",
        upstream(&up)
    ));
    // An untrusted peer rotating X-Forwarded-For (one address, a list, two headers): one budget.
    let spoofed = statuses(&gw, 24, |i| {
        let r = Request::get("/").from_ip("127.0.0.1");
        match i % 3 {
            0 => r.header("x-forwarded-for", format!("198.51.100.{i}")),
            1 => r.header("x-forwarded-for", format!("203.0.113.{i}, 198.51.100.{i}")),
            _ => r
                .header("x-forwarded-for", format!("192.0.2.{i}"))
                .header("x-forwarded-for", format!("192.0.2.{}", i + 1)),
        }
    });
    assert_eq!(
        count(&spoofed, 200),
        3,
        "burst + 1 for the peer, whatever it claims: {spoofed:?}"
    );
    assert_eq!(count(&spoofed, 429), 21);
    // Another peer address is another client.
    let other = statuses(&gw, 4, |_| Request::get("/").from_ip("127.0.0.6"));
    assert_eq!(other, [200, 200, 200, 429]);
    // A trusted proxy's X-Forwarded-For does name the client (so `ip` is the resolved one).
    let proxied = statuses(&gw, 5, |i| {
        Request::get("/")
            .from_ip("127.0.0.5")
            .header("x-forwarded-for", format!("203.0.113.{i}"))
    });
    assert_eq!(proxied, [200; 5], "five clients behind the proxy");
    let again = statuses(&gw, 3, |_| {
        Request::get("/")
            .from_ip("127.0.0.5")
            .header("x-forwarded-for", "203.0.113.0")
    });
    assert_eq!(again, [200, 200, 429]);
}

#[test]
fn consumers_headers_and_the_route_have_their_own_budgets() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        r#"consumers:
  - {{ name: alice, api_keys: [k-alice] }}
  - {{ name: bob, api_keys: [k-bob] }}
{}routes:
  - name: keyed
    match: {{ path_prefix: /keyed }}
    upstream: up
    plugins:
      # Listed first, run after authentication (kind `limit` follows `authenticate`).
      - rate_limit: {{ requests: 1, per: 1m, burst: 1, key: consumer }}
      - api_key: {{}}
  - name: anonymous
    match: {{ path_prefix: /anonymous }}
    upstream: up
    plugins:
      - rate_limit: {{ requests: 1, per: 1m, burst: 1, key: consumer }}
  - name: tenants
    match: {{ path_prefix: /tenants }}
    upstream: up
    plugins:
      - rate_limit: {{ requests: 1, per: 1m, burst: 1, key: "header:x-tenant" }}
  - name: whole
    match: {{ path_prefix: /whole }}
    upstream: up
    plugins:
      - rate_limit: {{ requests: 1, per: 1m, burst: 2, key: route }}
"#,
        upstream(&up)
    ));
    let as_consumer = |key: &'static str| move |_: usize| Request::get("/keyed").header("x-api-key", key);
    let alice = statuses(&gw, 4, as_consumer("k-alice"));
    assert_eq!(alice, [200, 200, 429, 429]);
    let bob = statuses(&gw, 4, as_consumer("k-bob"));
    assert_eq!(bob, [200, 200, 429, 429], "bob's budget is not alice's");
    let r = gw.send(Request::get("/keyed").header("x-api-key", "k-alice"));
    assert_refusal(&r, "rate_limited", "2");
    let r = gw.send(Request::get("/keyed").header("x-api-key", "wrong"));
    assert_eq!(r.status, 401, "authentication first: {}", r.text());

    // No consumer: the client address is the key.
    let first = statuses(&gw, 3, |_| Request::get("/anonymous").from_ip("127.0.0.1"));
    assert_eq!(first, [200, 200, 429]);
    let second = statuses(&gw, 3, |_| Request::get("/anonymous").from_ip("127.0.0.7"));
    assert_eq!(second, [200, 200, 429]);

    let tenant = |t: &'static str| move |_: usize| Request::get("/tenants").header("x-tenant", t);
    assert_eq!(statuses(&gw, 3, tenant("acme")), [200, 200, 429]);
    assert_eq!(statuses(&gw, 3, tenant("globex")), [200, 200, 429]);

    // key: route — every client of the route shares one budget.
    let mixed = statuses(&gw, 5, |i| {
        Request::get("/whole").from_ip(["127.0.0.1", "127.0.0.8"][i % 2])
    });
    assert_eq!(mixed, [200, 200, 200, 429, 429]);
}

#[test]
fn a_global_limit_counts_per_route_and_can_be_switched_off() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "{}plugins:\n  - rate_limit: {{ requests: 1, per: 1m, key: route }}\nroutes:\n  - name: a\n    match: {{ path_prefix: /a }}\n    upstream: up\n  - name: b\n    match: {{ path_prefix: /b }}\n    upstream: up\n  - name: free\n    match: {{ path_prefix: /free }}\n    upstream: up\n    plugins:\n      - rate_limit: {{ enabled: false }}\n",
        upstream(&up)
    ));
    let m = gw.metrics();
    for route in ["a", "b"] {
        for result in ["admitted", "limited"] {
            assert_eq!(limit_metric(&m, route, "rate_limit", result), 0.0, "{route} {result}");
        }
    }
    assert_eq!(statuses(&gw, 3, |_| Request::get("/a")), [200, 429, 429]);
    assert_eq!(statuses(&gw, 2, |_| Request::get("/b")), [200, 429]);
    let free: Vec<Response> = (0..5).map(|_| gw.get("/free")).collect();
    assert!(free
        .iter()
        .all(|r| r.status == 200 && r.header("ratelimit-limit").is_none()));
    let m = gw.metrics();
    assert_eq!(limit_metric(&m, "a", "rate_limit", "admitted"), 1.0);
    assert_eq!(limit_metric(&m, "a", "rate_limit", "limited"), 2.0);
    assert_eq!(limit_metric(&m, "b", "rate_limit", "limited"), 1.0);
}

/// Issue 10 acceptance 4.
#[test]
fn a_reload_keeps_the_counters_of_an_unchanged_block_and_resets_a_changed_one() {
    let up = EchoServer::start("up").unwrap();
    let body = |rl: &str, quota: &str, extra: &str| {
        format!(
            "{}routes:\n  - name: r\n    match: {{ path_prefix: /r }}\n    upstream: up\n    plugins:\n{rl}  - name: q\n    match: {{ path_prefix: /q }}\n    upstream: up\n    plugins:\n{quota}{extra}",
            upstream(&up)
        )
    };
    let flow = "      - rate_limit: { requests: 1, per: 1m, burst: 1 }\n";
    let block = "      - rate_limit:\n          burst: 1\n          per: 1m\n          requests: 1\n";
    let changed = "      - rate_limit: { requests: 1, per: 1m, burst: 3 }\n";
    let quota = "      - quota: { limit: 2, period: day, key: ip }\n";
    let more = "      - quota: { limit: 3, period: day, key: ip }\n";
    let other = "  - name: other\n    match: { path_prefix: /other }\n    upstream: up\n";
    let gw = Gw::start(&body(flow, quota, ""));
    assert_eq!(statuses(&gw, 3, |_| Request::get("/r")), [200, 200, 429]);
    assert_eq!(statuses(&gw, 3, |_| Request::get("/q")), [200, 200, 429]);

    // A route added, the block rewritten in another YAML style: the same blocks, same counters.
    gw.reload(&body(block, quota, other));
    assert_eq!(gw.get("/other").status, 200, "the reload took effect");
    assert_refusal(&gw.get("/r"), "rate_limited", "2");
    assert_refusal(&gw.get("/q"), "quota_exceeded", "2");

    // The rate limit changed: it starts fresh; the quota did not: it keeps counting.
    gw.reload(&body(changed, quota, other));
    assert_eq!(admitted_remaining(&gw.get("/r"), "4"), 3);
    assert_refusal(&gw.get("/q"), "quota_exceeded", "2");
    gw.reload(&body(changed, more, other));
    assert_eq!(
        admitted_remaining(&gw.get("/q"), "3"),
        2,
        "a changed quota starts fresh"
    );
    assert_eq!(
        admitted_remaining(&gw.get("/r"), "4"),
        2,
        "the unchanged rate limit kept counting"
    );
}

/// Issue 10 acceptance 3, on a clock the test moves: calendar windows in UTC.
#[test]
fn quota_windows_follow_the_utc_calendar() {
    let up = EchoServer::start("up").unwrap();
    let clock = Arc::new(ManualClock::at(2024, 2, 28, 23, 59, 58));
    let gw = InProcess::start_with(
        &format!(
            r#"consumers:
  - {{ name: alice, api_keys: [k-alice] }}
  - {{ name: bob, api_keys: [k-bob] }}
{}routes:
  - name: daily
    match: {{ path_prefix: /daily }}
    upstream: up
    plugins:
      - api_key: {{}}
      - quota: {{ limit: 3, period: day }}
  - name: monthly
    match: {{ path_prefix: /monthly }}
    upstream: up
    plugins:
      - quota: {{ limit: 2, period: month, key: ip }}
  - name: hourly
    match: {{ path_prefix: /hourly }}
    upstream: up
    plugins:
      - quota: {{ limit: 1, period: hour, key: global }}
"#,
            upstream(&up)
        ),
        Registry::builtin(),
        Some(Resources::with_clock(clock.clone())),
    );
    let send = |path: &'static str, key: Option<&'static str>| {
        let mut r = Request::get(path);
        if let Some(k) = key {
            r = r.header("x-api-key", k);
        }
        r.send(&gw.addr).expect("request")
    };
    let set = |y, mo, d, h, mi, s| clock.set(ManualClock::at(y, mo, d, h, mi, s).now());

    // 2024-02-28T23:59:58Z: three each, the fourth refused until midnight (2 s away).
    for consumer in ["k-alice", "k-bob"] {
        for left in [2, 1, 0] {
            let r = send("/daily", Some(consumer));
            assert_eq!(admitted_remaining(&r, "3"), left);
            assert_eq!(r.header("ratelimit-reset"), Some("2"));
        }
        let r = send("/daily", Some(consumer));
        assert_refusal(&r, "quota_exceeded", "3");
        assert_eq!(r.header("retry-after"), Some("2"));
    }
    clock.advance(Duration::from_secs(1));
    let r = send("/daily", Some("k-alice"));
    assert_refusal(&r, "quota_exceeded", "3");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Midnight UTC: Feb 29 (2024 is a leap year) is a new day.
    clock.advance(Duration::from_secs(1));
    let r = send("/daily", Some("k-alice"));
    assert_eq!(admitted_remaining(&r, "3"), 2);
    assert_eq!(r.header("ratelimit-reset"), Some("86400"));

    // Month windows: the reset is the end of the calendar month, whatever its length.
    let day = 86_400u64;
    for ((y, mo, d), left) in [
        ((2024, 2, 1), 29 * day),
        ((2023, 2, 1), 28 * day),
        ((2100, 2, 1), 28 * day), // not a leap year
        ((2024, 4, 1), 30 * day),
        ((2024, 12, 1), 31 * day),
    ] {
        set(y, mo, d, 0, 0, 0);
        let r = send("/monthly", None);
        assert_eq!(admitted_remaining(&r, "2"), 1, "{y}-{mo}");
        assert_eq!(r.header("ratelimit-reset"), Some(left.to_string().as_str()), "{y}-{mo}");
    }
    // The last second of February 2024, then March. (A local store keeps each key's latest
    // window only: the clock jumping between years above started each window afresh.)
    set(2024, 2, 29, 23, 59, 59);
    assert_eq!(admitted_remaining(&send("/monthly", None), "2"), 1);
    assert_eq!(admitted_remaining(&send("/monthly", None), "2"), 0);
    let r = send("/monthly", None);
    assert_refusal(&r, "quota_exceeded", "2");
    assert_eq!(r.header("retry-after"), Some("1"));
    set(2024, 3, 1, 0, 0, 0);
    let r = send("/monthly", None);
    assert_eq!(admitted_remaining(&r, "2"), 1, "March: a new window");
    assert_eq!(r.header("ratelimit-reset"), Some((31 * day).to_string().as_str()));

    // Hour windows are clock hours, not an hour from the first request.
    set(2024, 3, 1, 10, 30, 0);
    assert_eq!(send("/hourly", None).header("ratelimit-reset"), Some("1800"));
    let r = send("/hourly", None);
    assert_refusal(&r, "quota_exceeded", "1");
    assert_eq!(r.header("retry-after"), Some("1800"));
    set(2024, 3, 1, 11, 0, 0);
    assert_eq!(send("/hourly", None).status, 200);
    let panics = metric(&get(&gw.admin, "/metrics").unwrap().text(), "portico_panics_total", &[]);
    assert_eq!(panics, 0.0);
}

/// Issue 10 acceptance 6.
#[test]
fn portico_t_rejects_bad_limit_blocks_with_locations() {
    let base = "listeners: [{ address: 127.0.0.1:18080 }]\nupstreams:\n  a: { endpoints: [127.0.0.1:9001] }\n";
    let route = |plugin: &str| format!("routes:\n  - {{ name: r, upstream: a, plugins: [ {plugin} ] }}\n");
    let cases = [
        (
            route("rate_limit: { requests: 10, per: 0s }"),
            "routes[0].plugins[0].rate_limit.per: must be more than 0",
        ),
        (
            route("rate_limit: { requests: 0, per: 1s }"),
            "routes[0].plugins[0].rate_limit.requests: must be at least 1",
        ),
        (
            route("rate_limit: { requests: -5, per: 1s }"),
            "routes[0].plugins[0].rate_limit.requests: must be at least 1",
        ),
        (
            route("rate_limit: { requests: 5, per: 1s, burst: -1 }"),
            "routes[0].plugins[0].rate_limit.burst",
        ),
        (
            route("rate_limit: { requests: 5, per: 1s, key: 'cookie:sid' }"),
            "routes[0].plugins[0].rate_limit.key: unknown key 'cookie:sid'",
        ),
        (
            route("rate_limit: { requests: 5, per: 1s, store: redis }"),
            "routes[0].plugins[0].rate_limit.store: store: redis needs the top-level 'redis' section",
        ),
        (
            route("rate_limit: { requests: 5, per: 1s, on_store_error: retry }"),
            "routes[0].plugins[0].rate_limit.on_store_error",
        ),
        (
            route("rate_limit: { requests: 5, per: 1s, burts: 1 }"),
            "routes[0].plugins[0].rate_limit: unknown field 'burts'",
        ),
        (
            route("rate_limit: { requests: 5 }"),
            "routes[0].plugins[0].rate_limit: missing field 'per'",
        ),
        (
            route("quota: { limit: 0, period: day }"),
            "routes[0].plugins[0].quota.limit: must be at least 1",
        ),
        (
            route("quota: { limit: 5, period: week }"),
            "routes[0].plugins[0].quota.period",
        ),
        (
            route("quota: { limit: 5, period: day, key: user }"),
            "routes[0].plugins[0].quota.key: unknown key 'user'",
        ),
        (
            route("quota: { limit: 5, period: day, store: redis }"),
            "routes[0].plugins[0].quota.store: store: redis needs",
        ),
        (
            "plugins:\n  - rate_limit: { requests: 1, per: 0s }\nroutes: []\n".to_string(),
            "plugins[0].rate_limit.per: must be more than 0",
        ),
    ];
    for (body, want) in &cases {
        let (code, out) = check(&format!("{base}{body}"));
        assert_eq!(code, 1, "{body}\n{out}");
        assert!(out.contains(want), "expected `{want}` in:\n{out}");
        assert!(!out.contains("panicked"), "{out}");
    }
    // With a `redis` section, `store: redis` is valid — and -t connects to nothing.
    let ok = format!(
        "{base}redis: {{ url: 'redis://127.0.0.1:1' }}\n{}",
        route("rate_limit: { requests: 5, per: 1s, store: redis, on_store_error: deny }")
    );
    let (code, out) = check(&ok);
    assert_eq!((code, out.trim()), (0, "ok"));
}
