//! Acceptance [1/9] #2: weighted round robin, active health checks (also for upstreams added by
//! a reload), retries on a dead endpoint.

mod common;
use common::*;
use std::collections::HashMap;
use std::time::Duration;

fn spread(gw: &Gw, path: &str, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let r = gw.get(path);
        assert_eq!(r.status, 200, "{}", r.text());
        *m.entry(service(&r)).or_default() += 1;
    }
    m
}

fn healthy(gw: &Gw, upstream: &str, endpoint: &str) -> f64 {
    metric(
        &gw.metrics(),
        "portico_upstream_healthy",
        &[("upstream", upstream), ("endpoint", endpoint)],
    )
}

#[test]
fn weights_health_and_retries() {
    let (e1, e2) = (EchoServer::start("e1").unwrap(), EchoServer::start("e2").unwrap());
    let dead = free_addr();
    let body = format!(
        r#"
upstreams:
  weighted:
    endpoints: ["{e1}", {{ address: "{e2}", weight: 3 }}]
  checked:
    endpoints: ["{e1}", "{e2}"]
    health_check: {{ kind: http, path: /healthz, interval: 200ms, timeout: 150ms }}
  flaky:
    endpoints: ["{dead}", "{e1}"]
    retries: 1
  flaky_no_retry:
    endpoints: ["{dead}", "{e1}"]
    retries: 0
    passive: off
  ejecting:
    endpoints: ["{dead}", "{e1}"]
    retries: 0
routes:
  - {{ name: weighted, upstream: weighted, match: {{ path_prefix: /w }} }}
  - {{ name: checked, upstream: checked, match: {{ path_prefix: /h }} }}
  - {{ name: flaky, upstream: flaky, match: {{ path_prefix: /f }} }}
  - {{ name: flaky0, upstream: flaky_no_retry, match: {{ path_prefix: /n }} }}
  - {{ name: ejecting, upstream: ejecting, match: {{ path_prefix: /j }} }}
"#,
        e1 = e1.addr,
        e2 = e2.addr
    );
    let gw = Gw::start(&body);

    // Weights 1:3.
    let m = spread(&gw, "/w", 400);
    let share = m.get("e2").copied().unwrap_or(0) as f64 / 400.0;
    assert!((0.70..=0.80).contains(&share), "e2 share {share} of {m:?}");

    // An endpoint failing its health check stops getting traffic, and comes back.
    let e1_addr = e1.addr.to_string();
    e1.set_health(503);
    wait_for("e1 to be marked unhealthy", Duration::from_secs(10), || {
        (healthy(&gw, "checked", &e1_addr) == 0.0).then_some(())
    });
    let m = spread(&gw, "/h", 40);
    assert_eq!(m.get("e1"), None, "{m:?}");
    e1.set_health(200);
    wait_for("e1 to be healthy again", Duration::from_secs(10), || {
        (healthy(&gw, "checked", &e1_addr) == 1.0).then_some(())
    });
    let m = spread(&gw, "/h", 40);
    assert!(m.get("e1").copied().unwrap_or(0) >= 10, "{m:?}");

    // A dead endpoint with retries: every request still succeeds on the other one.
    let m = spread(&gw, "/f", 20);
    assert_eq!(m.get("e1"), Some(&20));
    // Without retries, and with passive ejection off, the dead endpoint's turns fail with the
    // contract's 502.
    let statuses: Vec<u16> = (0..20).map(|_| gw.get("/n").status).collect();
    let failed = statuses.iter().filter(|s| **s == 502).count();
    assert!(
        failed >= 5 && statuses.iter().all(|s| *s == 200 || *s == 502),
        "{statuses:?}"
    );
    let r = gw.get("/n");
    let r = if r.status == 502 { r } else { gw.get("/n") };
    assert_eq!(r.json()["error"], "upstream_unavailable");
    // By default (nginx's max_fails=1 fail_timeout=10s) its first failed connect ejects it:
    // one request fails, the others go to the live endpoint.
    let statuses: Vec<u16> = (0..20).map(|_| gw.get("/j").status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 502).count(), 1, "{statuses:?}");

    // An upstream added by a reload is health-checked too.
    let (n1, n2) = (EchoServer::start("n1").unwrap(), EchoServer::start("n2").unwrap());
    n1.set_health(500);
    let added = format!(
        "upstreams:\n  added:\n    endpoints: [\"{}\", \"{}\"]\n    health_check: {{ kind: http, path: /healthz, interval: 200ms, timeout: 150ms }}\n",
        n1.addr, n2.addr
    );
    let route = "  - { name: added, upstream: added, match: { path_prefix: /added } }\n";
    gw.reload(&format!("{}{route}", body.replacen("upstreams:\n", &added, 1)));
    let n1_addr = n1.addr.to_string();
    wait_for("n1 to be marked unhealthy", Duration::from_secs(10), || {
        (healthy(&gw, "added", &n1_addr) == 0.0).then_some(())
    });
    let m = spread(&gw, "/added", 30);
    assert_eq!(m.get("n2"), Some(&30), "{m:?}");
    assert_eq!(n1.requests(), 0);
}
