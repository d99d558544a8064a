//! Issue 10, `store: redis`: two Portico processes share one budget through a real
//! redis-server (started by each test on a free port, stopped by PID); killing Redis mid-test
//! follows `on_store_error` with no slow request, and restarting it resumes sharing without
//! restarting Portico; a changed block gets a fresh Redis namespace on reload.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// No request may wait longer than this, Redis up, down or coming back.
const SLOWEST: Duration = Duration::from_secs(1);

fn config(redis: &RedisServer, up: &EchoServer, routes: &str) -> String {
    format!(
        "redis: {{ url: '{}' }}\nupstreams:\n  up: {{ endpoints: [{}] }}\nroutes:\n{routes}",
        redis.url(),
        up.addr
    )
}

fn route(name: &str, plugin: &str) -> String {
    format!(
        "  - name: {name}\n    match: {{ path_prefix: /{name} }}\n    upstream: up\n    plugins:\n      - {plugin}\n"
    )
}

/// A request and how long it took.
fn timed(gw: &Gw, path: &'static str) -> (Response, Duration) {
    let start = Instant::now();
    let r = gw.get(path);
    (r, start.elapsed())
}

/// Issue 10 acceptance 2: two processes, one budget.
#[test]
fn two_gateways_share_one_budget() {
    let redis = RedisServer::start();
    let up = EchoServer::start("up").unwrap();
    let body = config(
        &redis,
        &up,
        &format!(
            "{}{}",
            route(
                "shared",
                "rate_limit: { requests: 20, per: 1s, burst: 5, store: redis }"
            ),
            route("quota", "quota: { limit: 5, period: day, key: ip, store: redis }")
        ),
    );
    let gws = [Gw::start(&body), Gw::start(&body)];

    // One client per gateway, each at the limit: twice the limit in all, for 3 s.
    let (rate, burst) = (20.0, 5.0);
    let start = Arc::new(Barrier::new(2));
    let clients: Vec<_> = gws
        .iter()
        .enumerate()
        .map(|(c, gw)| {
            let (start, addr) = (start.clone(), gw.addr.clone());
            std::thread::spawn(move || {
                start.wait();
                let t0 = Instant::now() + Duration::from_millis(25 * c as u64);
                let mut out = Vec::new();
                for i in 0..60u32 {
                    let at = t0 + Duration::from_millis(50) * i;
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let sent = Instant::now();
                    let r = get(&addr, "/shared").expect("request");
                    out.push((sent, sent.elapsed(), r));
                }
                out
            })
        })
        .collect();
    let results: Vec<(Instant, Duration, Response)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let first = results.iter().map(|r| r.0).min().unwrap();
    let last = results.iter().map(|r| r.0).max().unwrap();
    let span = (last - first).as_secs_f64();
    let admitted = results.iter().filter(|r| r.2.status == 200).count() as f64;
    for (_, took, r) in &results {
        assert!(*took < SLOWEST, "a request took {took:?}");
        assert!(matches!(r.status, 200 | 429), "{} {}", r.status, r.text());
        assert_eq!(r.header("ratelimit-limit"), Some("6"), "decided by Redis");
        if r.status == 429 {
            assert_eq!(r.json()["error"], "rate_limited");
            assert!(r.header("retry-after").is_some());
        }
    }
    let expected = rate * span + burst + 1.0;
    eprintln!("two gateways, {span:.2}s: admitted {admitted}, expected {expected:.1}");
    assert!(
        (admitted - expected).abs() <= 0.1 * expected,
        "admitted {admitted} in all, expected one budget: {expected:.1} ±10%"
    );
    for gw in &gws {
        let m = gw.metrics();
        let mine = metric(
            &m,
            "portico_limit_requests_total",
            &[("route", "shared"), ("result", "admitted")],
        );
        assert!(
            mine > 0.0 && mine < admitted,
            "each gateway admitted a share: {mine} of {admitted}"
        );
    }

    // A quota too: 5 a day between them.
    let quota: Vec<u16> = (0..10).map(|i| gws[i % 2].get("/quota").status).collect();
    assert_eq!(quota, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429]);
}

/// Issue 10 acceptance 2: Redis killed mid-test, then restarted.
#[test]
fn a_killed_redis_follows_on_store_error_and_a_restarted_one_is_shared_again() {
    let mut redis = RedisServer::start();
    let up = EchoServer::start("up").unwrap();
    let body = config(
        &redis,
        &up,
        &format!(
            "{}{}{}",
            route(
                "allow",
                "rate_limit: { requests: 1000, per: 1s, burst: 100, store: redis }"
            ),
            route(
                "deny",
                "rate_limit: { requests: 1000, per: 1s, burst: 100, store: redis, on_store_error: deny }"
            ),
            route(
                "after",
                "rate_limit: { requests: 1, per: 1m, burst: 2, store: redis, key: global }"
            )
        ),
    );
    let gws = Arc::new([Gw::start(&body), Gw::start(&body)]);
    for gw in gws.iter() {
        for path in ["/allow", "/deny"] {
            let r = gw.get(path);
            assert_eq!(r.status, 200);
            assert!(r.header("ratelimit-limit").is_some(), "Redis decides while it is up");
        }
    }

    // Traffic on both gateways and both routes, while Redis dies under it.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (gws, stop) = (gws.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let path = if i.is_multiple_of(2) { "/allow" } else { "/deny" };
                let sent = Instant::now();
                let (r, took) = timed(&gws[(i / 2) % 2], path);
                out.push((sent, path, r, took));
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            out
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    redis.kill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::SeqCst);
    let seen = traffic.join().unwrap();

    let (mut allowed, mut denied) = (0, 0);
    for (sent, path, r, took) in &seen {
        assert!(*took < SLOWEST, "{path} took {took:?}");
        // Requests sent after the kill: on_store_error decides.
        if *sent > killed + Duration::from_millis(50) {
            if *path == "/allow" {
                assert_eq!(r.status, 200, "allow: {}", r.text());
                assert_eq!(r.header("ratelimit-limit"), None, "no decision, no headers");
                allowed += 1;
            } else {
                assert_eq!(r.status, 429, "deny: {}", r.text());
                assert_eq!(r.json()["error"], "rate_limited");
                assert_eq!(r.header("retry-after"), Some("1"));
                denied += 1;
            }
        }
    }
    eprintln!(
        "{} requests, after the kill {allowed} allowed and {denied} denied",
        seen.len()
    );
    assert!(allowed >= 10 && denied >= 10, "{allowed} allowed, {denied} denied");
    for gw in gws.iter() {
        let m = gw.metrics();
        let errors = metric(&m, "portico_limit_store_errors_total", &[]);
        assert!(errors >= 1.0, "store errors counted:\n{m}");
        assert!(
            metric(
                &m,
                "portico_limit_requests_total",
                &[("route", "deny"), ("result", "limited")]
            ) >= 1.0
        );
    }

    // Same port, fresh and empty: both gateways go back to Redis by themselves.
    redis.restart();
    for (n, gw) in gws.iter().enumerate() {
        let took = Instant::now();
        wait_for(
            &format!("gateway {n} to use Redis again"),
            Duration::from_secs(15),
            || {
                let (r, t) = timed(gw, "/allow");
                assert!(t < SLOWEST, "a request took {t:?} while Redis came back");
                r.header("ratelimit-limit").map(|_| ())
            },
        );
        eprintln!("gateway {n}: Redis decides again after {:?}", took.elapsed());
    }
    // And they share one budget again: burst + 1 = 3 between them.
    let after: Vec<u16> = (0..8).map(|i| gws[i % 2].get("/after").status).collect();
    assert_eq!(after, [200, 200, 200, 429, 429, 429, 429, 429]);
}

/// Issue 10 acceptance 4 with Redis: an unchanged block keeps its Redis keys, a changed one
/// gets a new namespace (a fresh budget).
#[test]
fn a_reload_keeps_or_renews_the_redis_namespace_with_the_block() {
    let redis = RedisServer::start();
    let up = EchoServer::start("up").unwrap();
    let limited = |burst: u32| {
        route(
            "r",
            &format!("rate_limit: {{ requests: 1, per: 1m, burst: {burst}, store: redis }}"),
        )
    };
    let gw = Gw::start(&config(&redis, &up, &limited(1)));
    let statuses = |n: usize| (0..n).map(|_| gw.get("/r").status).collect::<Vec<_>>();
    assert_eq!(statuses(3), [200, 200, 429]);
    gw.reload(&config(
        &redis,
        &up,
        &format!(
            "{}{}",
            limited(1),
            route("other", "rate_limit: { requests: 100, per: 1s }")
        ),
    ));
    assert_eq!(gw.get("/other").status, 200);
    assert_eq!(statuses(1), [429], "the same block, the same budget");
    gw.reload(&config(&redis, &up, &limited(2)));
    assert_eq!(statuses(4), [200, 200, 200, 429], "a changed block starts fresh");
}
