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
