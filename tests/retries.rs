//! Acceptance [8/12] #6: the retry policy. `on: [503]` hides a bad endpoint from GETs; a POST
//! that reached an upstream is never retried; with every endpoint down, the budget keeps
//! upstream attempts within 1.2 × requests (plus a small constant).

mod common;
use common::*;
use std::time::Duration;

#[test]
fn retry_policy() {
    let bad = FaultServer::start(Fault::Status(503));
    let good = FaultServer::start(Fault::Ok);
    let hang_up = FaultServer::start(Fault::CloseAfterRequest);
    let slow = FaultServer::start(Fault::SlowHead(Duration::from_secs(3)));
    let down1 = FaultServer::start(Fault::Status(503));
    let down2 = FaultServer::start(Fault::Status(503));
    let lone = FaultServer::start(Fault::Status(502));
    let body = format!(
        r#"
upstreams:
  on503:
    endpoints: ["{bad}", "{good}"]
    retries: {{ attempts: 1, on: [503] }}
  reset:
    endpoints: ["{hang_up}", "{good}"]
    retries: {{ attempts: 1, on: [reset] }}
  timeout:
    endpoints: ["{slow}", "{good}"]
    timeouts: {{ read: 500ms }}
    retries: {{ attempts: 1, on: [timeout] }}
  down:
    endpoints: ["{down1}", "{down2}"]
    retries: {{ attempts: 3, on: [503], budget: 0.2 }}
  lone:
    endpoints: ["{lone}"]
    retries: {{ attempts: 2, on: [502] }}
routes:
  - {{ name: on503, upstream: on503, match: {{ path_prefix: /on503 }} }}
  - {{ name: reset, upstream: reset, match: {{ path_prefix: /reset }} }}
  - {{ name: timeout, upstream: timeout, match: {{ path_prefix: /timeout }} }}
  - {{ name: down, upstream: down, match: {{ path_prefix: /down }} }}
  - {{ name: lone, upstream: lone, match: {{ path_prefix: /lone }} }}
"#,
        bad = bad.addr,
        good = good.addr,
        hang_up = hang_up.addr,
        slow = slow.addr,
        down1 = down1.addr,
        down2 = down2.addr,
        lone = lone.addr,
    );
    let gw = Gw::start(&body);

    // One endpoint of two answers 503: GET clients never see it.
    for _ in 0..60 {
        let r = gw.get("/on503/x");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(
        bad.request_count() >= 10,
        "the bad endpoint had its turns: {}",
        bad.request_count()
    );
    // A POST that reached the bad endpoint is not retried: its 503 goes to the client as is.
    let (good_before, bad_before) = (good.request_count(), bad.request_count());
    let statuses: Vec<u16> = (0..40)
        .map(|_| gw.send(Request::new("POST", "/on503/x").body("payload")).status)
        .collect();
    let got_503 = statuses.iter().filter(|s| **s == 503).count();
    assert!(got_503 >= 5, "{statuses:?}");
    assert_eq!(
        bad.request_count() - bad_before,
        got_503,
        "each POST reached one upstream once"
    );
    assert_eq!(good.request_count() - good_before, 40 - got_503);
    // The upstream's own answer, not a gateway error.
    let r = (0..20)
        .map(|_| gw.send(Request::new("POST", "/on503/x").body("p")))
        .find(|r| r.status == 503)
        .expect("a POST on the bad endpoint");
    assert_eq!(r.json()["fault"], true);

    // An upstream that hangs up: GETs are retried (on: [reset]), POSTs are not (502).
    for _ in 0..20 {
        assert_eq!(gw.get("/reset").status, 200);
    }
    let posts: Vec<u16> = (0..20)
        .map(|_| gw.send(Request::new("POST", "/reset").body("x")).status)
        .collect();
    assert!(
        posts.contains(&502) && posts.iter().all(|s| *s == 200 || *s == 502),
        "{posts:?}"
    );

    // A read timeout (on: [timeout]): the GET goes to the other endpoint after 500ms.
    for _ in 0..4 {
        let t = std::time::Instant::now();
        let r = gw.get("/timeout");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(t.elapsed() < Duration::from_millis(1500), "{:?}", t.elapsed());
    }

    // A lone endpoint: each retry goes to it again (attempts: 2 → three tries), and the last
    // answer reaches the client.
    let before = lone.request_count();
    let r = gw.get("/lone");
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["fault"], true);
    assert_eq!(lone.request_count() - before, 3);

    // Every endpoint down, attempts: 3, budget: 0.2. Without the budget that is 4 attempts per
    // request; with it, at most 1.2 × requests plus the window's floor of 3.
    let n = 200;
    for _ in 0..n {
        let r = gw.get("/down");
        assert_eq!(r.status, 503);
    }
    let attempts = down1.request_count() + down2.request_count();
    eprintln!("every endpoint down, budget 0.2: {attempts} upstream attempts for {n} requests");
    let bound = (1.2 * n as f64) as usize + 3 + 2;
    assert!(
        attempts <= bound,
        "{attempts} upstream attempts for {n} requests (bound {bound})"
    );
    assert!(attempts > n, "the budget allowed some retries: {attempts}");
}

/// The trial's "dead endpoint first" (nginx: `max_fails=1 fail_timeout=10s` by default): with
/// no `passive` block, an endpoint that drops SYNs costs one request its connect timeout, then
/// is skipped — the gauge says 0 and the ejection is counted. `passive: off` keeps the old
/// behaviour: every other request pays the timeout, but retries still never start every
/// request on the dead endpoint.
#[test]
fn a_dead_endpoint_is_skipped_after_one_failed_connect() {
    let dead = Unaccepting::start();
    let good = FaultServer::start(Fault::Ok);
    let body = format!(
        "upstreams:\n  up:\n    endpoints: [\"{good}\", \"{dead}\"]\n    timeouts: {{ connect: 300ms }}\n  off:\n    endpoints: [\"{good}\", \"{dead}\"]\n    timeouts: {{ connect: 300ms }}\n    passive: off\nroutes:\n  - {{ name: off, upstream: off, match: {{ path_prefix: /off }} }}\n  - {{ name: up, upstream: up }}\n",
        good = good.addr,
        dead = dead.addr,
    );
    let gw = Gw::start(&body);
    let dead_label = dead.addr.to_string();
    let mut slow = 0;
    for _ in 0..10 {
        let start = std::time::Instant::now();
        let r = gw.get("/x");
        assert_eq!(r.status, 200, "{}", r.text());
        if start.elapsed() >= Duration::from_millis(300) {
            slow += 1;
        }
    }
    assert!(slow <= 1, "{slow} of 10 requests waited on the dead endpoint");
    let m = gw.metrics();
    let labels = [("upstream", "up"), ("endpoint", dead_label.as_str())];
    assert_eq!(metric(&m, "portico_upstream_healthy", &labels), 0.0, "{m}");
    assert!(metric(&m, "portico_upstream_ejections_total", &labels) >= 1.0);
    // Switched off: the dead endpoint is tried by about half the requests (its turn), not all.
    let mut slow = 0;
    for _ in 0..10 {
        let start = std::time::Instant::now();
        assert_eq!(gw.get("/off/x").status, 200);
        if start.elapsed() >= Duration::from_millis(300) {
            slow += 1;
        }
    }
    assert!(
        (3..=7).contains(&slow),
        "{slow} of 10 requests met the dead endpoint first"
    );
}
