//! Acceptance [8/12] #1–#4: canary splits, stickiness, force_header, and the guard that rolls a
//! failing canary back (visible in /metrics and /canaries, kept across an untouched reload,
//! re-armed by a changed block or the admin reset).

mod common;
use common::*;
use std::collections::HashMap;
use std::time::Duration;

/// Send `n` GETs to `path` over `threads` keep-alive connections; how many each service answered.
fn split(gw: &Gw, path: &str, n: usize, threads: usize) -> HashMap<String, usize> {
    let per = n / threads;
    let counts: Vec<HashMap<String, usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut c = KeepAlive::new(&gw.addr);
                    let mut m = HashMap::new();
                    for _ in 0..per {
                        let r = c.get(path, &[]);
                        assert_eq!(r.status, 200, "{}", r.text());
                        *m.entry(service(&r)).or_insert(0) += 1;
                    }
                    m
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = HashMap::new();
    for m in counts {
        for (k, v) in m {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

fn share(m: &HashMap<String, usize>, side: &str) -> f64 {
    let n: usize = m.values().sum();
    m.get(side).copied().unwrap_or(0) as f64 / n as f64
}

fn routes(v1: &EchoServer, v2: &EchoServer, sticky_percent: u32) -> String {
    let route = |name: &str, canary: &str| {
        format!(
            "  - {{ name: {name}, upstream: v1, match: {{ path_prefix: /{name} }}, plugins: [canary: {canary}] }}\n"
        )
    };
    format!(
        "upstreams:\n  v1: {{ endpoints: [\"{}\"] }}\n  v2: {{ endpoints: [\"{}\"] }}\nroutes:\n{}{}{}{}{}{}{}",
        v1.addr,
        v2.addr,
        route("p10", "{ upstream: v2, percent: 10 }"),
        route("p05", "{ upstream: v2, percent: 0.5 }"),
        route("p0", "{ upstream: v2, percent: 0, force_header: x-canary }"),
        route("p100", "{ upstream: v2, percent: 100, force_header: x-canary }"),
        route(
            "sticky",
            &format!("{{ upstream: v2, percent: {sticky_percent}, sticky: 'header:x-user' }}")
        ),
        route("cookie", "{ upstream: v2, percent: 30, sticky: 'cookie:session' }"),
        route("ip", "{ upstream: v2, percent: 30, sticky: ip }"),
    )
}

#[test]
fn splits_stickiness_and_force_header() {
    let (v1, v2) = (EchoServer::start("v1").unwrap(), EchoServer::start("v2").unwrap());
    let gw = Gw::start(&routes(&v1, &v2, 10));

    // #1: the canary's share over 10,000 requests.
    let m = split(&gw, "/p10", 10_000, 2);
    let s = share(&m, "v2");
    eprintln!("percent 10: canary share {s} over 10,000");
    assert!((0.091..=0.109).contains(&s), "10%: {s} {m:?}");
    let m = split(&gw, "/p05", 10_000, 2);
    let s = share(&m, "v2");
    eprintln!("percent 0.5: canary share {s} over 10,000");
    assert!((0.003..=0.007).contains(&s), "0.5%: {s} {m:?}");
    assert_eq!(split(&gw, "/p0", 1000, 2).get("v2"), None, "0% sends nothing");
    assert_eq!(split(&gw, "/p100", 1000, 2).get("v1"), None, "100% sends everything");

    // #3: force_header both ways, also at 0%.
    let mut c = KeepAlive::new(&gw.addr);
    for v in ["1", "true"] {
        assert_eq!(service(&c.get("/p0", &[("x-canary", v)])), "v2");
    }
    for v in ["0", "false"] {
        assert_eq!(service(&c.get("/p100", &[("x-canary", v)])), "v1");
    }

    // #2: sticky by header, 1,000 keys × 20 requests: each key always on one side.
    let sides = |gw: &Gw, keys: std::ops::Range<usize>, per_key: usize| -> HashMap<usize, String> {
        let mut c = KeepAlive::new(&gw.addr);
        let mut out = HashMap::new();
        for k in keys {
            let key = format!("user-{k}");
            let first = service(&c.get("/sticky", &[("x-user", &key)]));
            for _ in 1..per_key {
                let again = service(&c.get("/sticky", &[("x-user", &key)]));
                assert_eq!(again, first, "{key} changed sides");
            }
            out.insert(k, first);
        }
        out
    };
    let at10: HashMap<usize, String> = std::thread::scope(|s| {
        let a = s.spawn(|| sides(&gw, 0..500, 20));
        let b = s.spawn(|| sides(&gw, 500..1000, 20));
        let mut m = a.join().unwrap();
        m.extend(b.join().unwrap());
        m
    });
    let canary_keys = at10.values().filter(|s| *s == "v2").count();
    eprintln!("sticky at 10%: {canary_keys} of 1000 keys on the canary");
    assert!(
        (70..=130).contains(&canary_keys),
        "{canary_keys} of 1000 keys on the canary at 10% (±3 points)"
    );
    // Raising 10 → 20 moves no key from the canary back to stable.
    gw.reload(&routes(&v1, &v2, 20));
    let at20 = sides(&gw, 0..1000, 2);
    let moved_back: Vec<_> = at10
        .iter()
        .filter(|(k, s)| *s == "v2" && at20[*k] != "v2")
        .map(|(k, _)| *k)
        .collect();
    assert!(moved_back.is_empty(), "keys moved back to stable: {moved_back:?}");
    let canary20 = at20.values().filter(|s| *s == "v2").count();
    assert!((170..=230).contains(&canary20), "{canary20} of 1000 keys at 20%");

    // Sticky by cookie and by client address (smaller runs).
    let mut c = KeepAlive::new(&gw.addr);
    let mut on_canary = 0;
    for k in 0..200 {
        let cookie = format!("theme=dark; session=s{k}");
        let first = service(&c.get("/cookie", &[("cookie", &cookie)]));
        for _ in 0..4 {
            assert_eq!(service(&c.get("/cookie", &[("cookie", &cookie)])), first);
        }
        on_canary += usize::from(first == "v2");
    }
    assert!((30..=90).contains(&on_canary), "{on_canary} of 200 cookies at 30%");
    let mut on_canary = 0;
    for x in 2..102 {
        let mut c = KeepAlive::from_ip(&gw.addr, &format!("127.0.0.{x}"));
        let first = service(&c.get("/ip", &[]));
        for _ in 0..4 {
            assert_eq!(service(&c.get("/ip", &[])), first, "127.0.0.{x} changed sides");
        }
        on_canary += usize::from(first == "v2");
    }
    assert!((12..=50).contains(&on_canary), "{on_canary} of 100 addresses at 30%");

    // Per-side counts.
    let m = gw.metrics();
    assert!(
        metric(
            &m,
            "portico_canary_requests_total",
            &[("route", "p10"), ("side", "canary")]
        ) > 800.0
    );
    assert_eq!(metric(&m, "portico_canary_failures_total", &[("route", "p10")]), 0.0);
}

fn canaries(gw: &Gw) -> serde_json::Value {
    get(&gw.admin, "/canaries").expect("canaries").json()
}

fn entry(gw: &Gw, route: &str) -> serde_json::Value {
    canaries(gw)
        .as_array()
        .expect("a list")
        .iter()
        .find(|c| c["route"] == route)
        .cloned()
        .unwrap_or_else(|| panic!("no canary for {route} in {}", canaries(gw)))
}

/// Send GETs until the route's canary is rolled back; the statuses the clients saw.
fn until_rolled_back(gw: &Gw, path: &str, max: usize) -> Vec<u16> {
    let mut c = KeepAlive::new(&gw.addr);
    let mut statuses = Vec::new();
    for _ in 0..max {
        statuses.push(c.get(path, &[]).status);
        let route = path.trim_start_matches('/');
        if entry(gw, route)["rolled_back"] == true {
            return statuses;
        }
    }
    panic!(
        "{path}: not rolled back after {max} requests: {statuses:?}\n{}",
        gw.p.logs()
    );
}

fn guard_config(v1: &EchoServer, canary: &str, dead: &str, percent: u32, extra: &str) -> String {
    format!(
        r#"upstreams:
  v1: {{ endpoints: ["{v1}"] }}
  v2: {{ endpoints: ["{canary}"] }}
  dead: {{ endpoints: ["{dead}"] }}
routes:
  - name: shop
    match: {{ path_prefix: /shop }}
    upstream: v1
    plugins:
      - canary: {{ upstream: v2, percent: {percent}, guard: {{ max_error_rate: 0.2, min_requests: 10, window: 60s }} }}
  - name: dead
    match: {{ path_prefix: /dead }}
    upstream: v1
    plugins:
      - canary: {{ upstream: dead, percent: 50, guard: {{ max_error_rate: 0.2, min_requests: 10, window: 60s }} }}
{extra}"#,
        v1 = v1.addr
    )
}

#[test]
fn guard_rolls_back_a_failing_canary() {
    let v1 = EchoServer::start("v1").unwrap();
    let canary = FaultServer::start(Fault::Ok);
    let dead = refusing_addr();
    let config = |percent: u32, extra: &str| guard_config(&v1, &canary.addr.to_string(), &dead, percent, extra);
    let gw = Gw::start(&config(50, ""));
    wait_for("the canary percent metric", Duration::from_secs(10), || {
        (metric(&gw.metrics(), "portico_canary_percent", &[("route", "shop")]) == 50.0).then_some(())
    });

    // Both sides serve.
    let mut c = KeepAlive::new(&gw.addr);
    let served: Vec<String> = (0..40).map(|_| service(&c.get("/shop", &[]))).collect();
    assert!(
        served.iter().any(|s| s == "v1") && served.iter().any(|s| s.is_empty()),
        "{served:?}"
    );
    let before = entry(&gw, "shop");
    assert_eq!(before["rolled_back"], false);
    assert_eq!(before["stable"], "v1");
    assert_eq!(before["canary"], "v2");
    assert_eq!(before["effective_percent"], 50.0);

    // #4: the canary starts answering 500. Within min_requests plus a few it gets 0%, and
    // clients see no error beyond those counted.
    canary.set(Fault::Status(500));
    let statuses = until_rolled_back(&gw, "/shop", 200);
    let errors = statuses.iter().filter(|s| **s == 500).count();
    eprintln!(
        "guard: rolled back after {} requests, {errors} client-visible 500s",
        statuses.len()
    );
    assert!(errors <= 10 + 3, "{errors} client-visible errors: {statuses:?}");
    let after = entry(&gw, "shop");
    assert_eq!(after["effective_percent"], 0.0);
    assert_eq!(after["percent"], 50.0);
    assert!(after["guard"]["rollback"]["failures"].as_u64().unwrap() >= 3);
    assert_eq!(after["failures"]["canary"].as_u64().unwrap() as usize, errors);
    for _ in 0..200 {
        let r = c.get("/shop", &[]);
        assert_eq!(
            (r.status, service(&r).as_str()),
            (200, "v1"),
            "stable serves everything"
        );
    }
    let m = gw.metrics();
    assert_eq!(metric(&m, "portico_canary_rollbacks_total", &[("route", "shop")]), 1.0);
    assert_eq!(metric(&m, "portico_canary_percent", &[("route", "shop")]), 0.0);
    assert_eq!(
        metric(
            &m,
            "portico_canary_failures_total",
            &[("route", "shop"), ("side", "canary")]
        ) as usize,
        errors
    );
    // Logged once, with the numbers.
    let lines: Vec<String> =
        gw.p.stderr_text()
            .lines()
            .filter(|l| l.contains("canary of route 'shop' rolled back"))
            .map(str::to_string)
            .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("of its last") && lines[0].contains("max_error_rate 20.0%"),
        "{}",
        lines[0]
    );

    // A reload that does not touch the block keeps it rolled back.
    let untouched = config(
        50,
        "  - { name: other, upstream: v1, match: { path_prefix: /other } }\n",
    );
    gw.reload(&untouched);
    assert_eq!(entry(&gw, "shop")["rolled_back"], true);
    assert!((0..50).all(|_| service(&c.get("/shop", &[])) == "v1"));

    // The admin reset re-arms it (POSTs pass the admin's Origin/Host checks).
    let refused = Request::new("POST", "/canaries/shop/reset")
        .header("origin", "https://evil.example")
        .send(&gw.admin)
        .unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(entry(&gw, "shop")["rolled_back"], true);
    canary.set(Fault::Ok);
    let reset = Request::new("POST", "/canaries/shop/reset").send(&gw.admin).unwrap();
    assert_eq!(reset.status, 200, "{}", reset.text());
    assert_eq!(reset.json()["rolled_back"], false);
    assert_eq!(reset.json()["route"], "shop");
    let served: Vec<String> = (0..40).map(|_| service(&c.get("/shop", &[]))).collect();
    assert!(
        served.iter().any(|s| s.is_empty()),
        "the canary gets traffic again: {served:?}"
    );
    assert_eq!(
        Request::new("POST", "/canaries/nowhere/reset")
            .send(&gw.admin)
            .unwrap()
            .status,
        404
    );

    // Rolled back again, then a changed block re-arms it.
    canary.set(Fault::Status(500));
    until_rolled_back(&gw, "/shop", 200);
    assert_eq!(
        metric(&gw.metrics(), "portico_canary_rollbacks_total", &[("route", "shop")]),
        2.0
    );
    gw.reload(&config(40, ""));
    let rearmed = entry(&gw, "shop");
    assert_eq!(rearmed["rolled_back"], false);
    assert_eq!(rearmed["effective_percent"], 40.0);
    wait_for("the re-armed percent metric", Duration::from_secs(10), || {
        (metric(&gw.metrics(), "portico_canary_percent", &[("route", "shop")]) == 40.0).then_some(())
    });

    // A canary whose endpoint is dead: connection failures roll it back the same way.
    let statuses = until_rolled_back(&gw, "/dead", 200);
    let errors = statuses.iter().filter(|s| **s == 502).count();
    assert!(errors <= 10 + 3, "{errors} client-visible errors: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 502), "{statuses:?}");
    assert!((0..100).all(|_| c.get("/dead", &[]).status == 200));
    let d = entry(&gw, "dead");
    assert_eq!(d["rolled_back"], true);
    assert_eq!(d["guard"]["rollback"]["failures"].as_u64().unwrap() as usize, errors);
    assert_eq!(
        metric(&gw.metrics(), "portico_canary_rollbacks_total", &[("route", "dead")]),
        1.0
    );

    // Canaries removed by a reload leave /canaries and their percent gauge (once no connection
    // holds the old config: an idle keep-alive connection keeps the one it last served).
    drop(c);
    gw.reload(&format!(
        "upstreams:\n  v1: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: shop, upstream: v1, match: {{ path_prefix: /shop }} }}\n",
        v1.addr
    ));
    assert_eq!(canaries(&gw), serde_json::json!([]));
    wait_for("the gauge of a removed canary to go", Duration::from_secs(10), || {
        (!gw.metrics().contains("portico_canary_percent{route=\"shop\"}")).then_some(())
    });
}

#[test]
fn canary_config_errors() {
    let dir = TempDir::new("canary-t");
    let file = dir.write(
        "bad.yaml",
        "listeners: [{address: 127.0.0.1:18080}]\nupstreams:\n  v1: {endpoints: [127.0.0.1:9001]}\n  v2: {endpoints: [127.0.0.1:9002]}\nplugins:\n  - canary: { upstream: v2, percent: 10 }\nroutes:\n  - name: r\n    upstream: v1\n    plugins:\n      - canary: { upstream: v2, percent: 10, guard: { max_error_rate: 2 } }\n",
    );
    let out = std::process::Command::new(BIN)
        .args(["-t", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("plugins[0].canary: canary is route-level only"), "{text}");
    assert!(
        text.contains("routes[0].plugins[0].canary.guard.max_error_rate"),
        "{text}"
    );
}

/// Attack-d #5: `force_header` is open to every client, so forced requests never feed the
/// guard — anonymous clients can neither roll a canary back for everyone nor hide its failures.
#[test]
fn forced_requests_do_not_feed_the_guard() {
    let v1 = EchoServer::start("v1").unwrap();
    let v2 = EchoServer::start("v2").unwrap();
    let gw = Gw::start(&format!(
        r#"upstreams:
  v1: {{ endpoints: ["{}"] }}
  v2: {{ endpoints: ["{}"] }}
routes:
  - name: shop
    match: {{ path_prefix: /shop }}
    upstream: v1
    plugins:
      - canary: {{ upstream: v2, percent: 100, force_header: x-canary, guard: {{ max_error_rate: 0.5, min_requests: 5, window: 60s }} }}
"#,
        v1.addr, v2.addr
    ));
    let mut c = KeepAlive::new(&gw.addr);
    // The report's roll-back: forced requests to a URL the new version answers with a 500.
    for _ in 0..20 {
        assert_eq!(c.get("/shop/cart?status=500", &[("x-canary", "1")]).status, 500);
    }
    // The log hook runs once the answer is out: wait for it to have counted them all.
    let e = wait_for("20 forced failures counted", Duration::from_secs(10), || {
        let e = entry(&gw, "shop");
        (e["failures"]["canary"] == 20).then_some(e)
    });
    assert_eq!(e["rolled_back"], false, "{e}");
    assert_eq!(e["effective_percent"], 100.0);
    assert_eq!(e["guard"]["window_requests"], 0, "counted in the metrics, not guarded");
    // Forced successes do not dilute real failures either: 4 real failures are not enough
    // (min_requests 5), the 5th rolls it back.
    for _ in 0..50 {
        assert_eq!(c.get("/shop/cart", &[("x-canary", "true")]).status, 200);
    }
    for _ in 0..4 {
        assert_eq!(c.get("/shop/cart?status=500", &[]).status, 500);
    }
    let e = wait_for("4 real failures in the window", Duration::from_secs(10), || {
        let e = entry(&gw, "shop");
        (e["guard"]["window_requests"] == 4).then_some(e)
    });
    assert_eq!(e["rolled_back"], false, "{e}");
    assert_eq!(c.get("/shop/cart?status=500", &[]).status, 500);
    wait_for("the rollback", Duration::from_secs(10), || {
        (entry(&gw, "shop")["rolled_back"] == true).then_some(())
    });
    assert_eq!(entry(&gw, "shop")["guard"]["rollback"]["requests"], 5);
    assert_eq!(metric(&gw.metrics(), "portico_panics_total", &[]), 0.0);
}
