//! The Redis store against a real redis-server (started per test on a free port): shared
//! budgets, a dead or hung Redis, recovery, and agreement with the local store.

use portico::limiter::{
    BreakerConfig, Decision, GcraParams, LocalGcra, LocalQuota, Period, RedisBackend, RedisGcra, RedisOptions,
    RedisQuota, StoreError, SystemClock, DEFAULT_MAX_KEYS,
};
use portico::testing::RedisServer;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The deadline these tests give Redis, and the slack a busy 2-core machine may add to it.
const TIMEOUT: Duration = Duration::from_millis(100);
const SLACK: Duration = Duration::from_millis(400);

fn backend(redis: &RedisServer) -> Arc<RedisBackend> {
    let options = RedisOptions {
        timeout: TIMEOUT,
        breaker: BreakerConfig {
            failures: 3,
            cool_down: Duration::from_millis(500),
        },
        ..RedisOptions::new(redis.url())
    };
    Arc::new(RedisBackend::new(&options).expect("backend"))
}

fn params(requests: u64, per: Duration, burst: u64) -> GcraParams {
    GcraParams::new(requests, per, burst).expect("params")
}

fn store_errors(reason: &str) -> f64 {
    let text = String::from_utf8_lossy(&portico::metrics::render()).to_string();
    portico::testing::metric(&text, "portico_limit_store_errors_total", &[("reason", reason)])
}

/// Call until a decision comes back (Redis recovered), within `limit`; how long it took.
async fn until_ok(limiter: &RedisGcra, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if limiter.check("recover").await.is_ok() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "no decision from Redis within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_gateways_share_one_budget() {
    let redis = RedisServer::start();
    // Two backends: two connections, as two Portico processes would have.
    let (a, b) = (backend(&redis), backend(&redis));
    let p = params(6, Duration::from_secs(60), 4); // T = 10 s: no refill during the test
    let (ga, gb) = (RedisGcra::new(a.clone(), "api", p), RedisGcra::new(b.clone(), "api", p));
    let mut admitted = 0;
    for i in 0..10 {
        let g = if i % 2 == 0 { &ga } else { &gb };
        admitted += usize::from(g.check("10.0.0.1").await.expect("decision").admitted);
    }
    assert_eq!(admitted, 5, "burst + 1 for both gateways together");
    // Another namespace is another budget.
    let other = RedisGcra::new(a.clone(), "other", p);
    assert!(other.check("10.0.0.1").await.unwrap().admitted);

    let (qa, qb) = (
        RedisQuota::new(a, "api", 3, Period::Day, Arc::new(SystemClock)),
        RedisQuota::new(b, "api", 3, Period::Day, Arc::new(SystemClock)),
    );
    let mut used = Vec::new();
    for i in 0..6 {
        let q = if i % 2 == 0 { &qa } else { &qb };
        let d = q.check("alice").await.expect("decision");
        used.push((d.admitted, d.remaining));
    }
    assert_eq!(
        used,
        [(true, 2), (true, 1), (true, 0), (false, 0), (false, 0), (false, 0)]
    );
}

#[tokio::test]
async fn keys_expire_when_they_are_idle_again() {
    let redis = RedisServer::start();
    let b = backend(&redis);
    let p = params(1, Duration::from_secs(2), 2); // T = 2 s, a full bucket 6 s after 3 requests
    let g = RedisGcra::new(b.clone(), "ttl", p);
    for _ in 0..3 {
        g.check("k").await.unwrap();
    }
    let q = RedisQuota::new(b, "ttl", 5, Period::Hour, Arc::new(SystemClock));
    q.check("k").await.unwrap();

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("portico:rl:ttl:k:k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 5_000 && ttl <= 6_000,
        "the TAT expires with a full bucket, PTTL {ttl}"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("portico:q:ttl:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut conn).await.unwrap();
    assert!(
        ttl > 60_000 && ttl <= 3_660_000,
        "the counter expires a minute after its hour, PTTL {ttl}"
    );
}

#[tokio::test]
async fn a_killed_redis_fails_fast_opens_the_circuit_and_sharing_resumes() {
    let mut redis = RedisServer::start();
    let b = backend(&redis);
    let g = RedisGcra::new(b.clone(), "kill", params(100, Duration::from_secs(1), 10));
    assert!(g.check("k").await.unwrap().admitted);

    redis.kill();
    let open_before = store_errors("circuit_open");
    for i in 0..3 {
        let start = Instant::now();
        let err = g.check("k").await.expect_err("redis is gone");
        let took = start.elapsed();
        assert!(
            matches!(err, StoreError::Redis(_) | StoreError::Timeout(_)),
            "call {i}: {err}"
        );
        assert!(took < TIMEOUT + SLACK, "call {i} took {took:?}");
        eprintln!("killed redis, call {i}: {err} after {took:?}");
    }
    assert!(b.circuit_open(), "three failures open the circuit");
    for _ in 0..20 {
        let start = Instant::now();
        assert_eq!(g.check("k").await, Err(StoreError::CircuitOpen));
        assert!(
            start.elapsed() < Duration::from_millis(20),
            "an open circuit answers at once"
        );
    }
    assert!(store_errors("circuit_open") >= open_before + 20.0);

    // Same port, same store object: decisions come back by themselves after the cool-down.
    redis.restart();
    let took = until_ok(&g, Duration::from_secs(10)).await;
    eprintln!("restarted redis: decisions resumed after {took:?}");
    assert!(took < Duration::from_secs(3), "resumed after {took:?}");
    assert!(!b.circuit_open());
    assert!(g.check("k").await.unwrap().admitted);
}

#[tokio::test]
async fn a_hung_redis_costs_one_deadline_per_call_until_the_circuit_opens() {
    let redis = RedisServer::start();
    let b = backend(&redis);
    let g = RedisGcra::new(b.clone(), "hang", params(100, Duration::from_secs(1), 10));
    assert!(g.check("k").await.unwrap().admitted);

    redis.pause();
    let timeouts_before = store_errors("timeout");
    for i in 0..3 {
        let start = Instant::now();
        let err = g.check("k").await.expect_err("redis is frozen");
        let took = start.elapsed();
        assert_eq!(err, StoreError::Timeout(TIMEOUT), "call {i}");
        assert!(
            took >= TIMEOUT - Duration::from_millis(5),
            "call {i} gave up early: {took:?}"
        );
        assert!(took < TIMEOUT + SLACK, "call {i} took {took:?}");
        eprintln!("hung redis, call {i}: {err} after {took:?}");
    }
    assert!(store_errors("timeout") >= timeouts_before + 3.0);
    let start = Instant::now();
    assert_eq!(g.check("k").await, Err(StoreError::CircuitOpen));
    assert!(start.elapsed() < Duration::from_millis(20));

    redis.resume();
    let took = until_ok(&g, Duration::from_secs(10)).await;
    eprintln!("resumed redis: decisions resumed after {took:?}");
    assert!(took < Duration::from_secs(3), "resumed after {took:?}");
}

/// Local and Redis decisions of one sequence, side by side.
async fn both(local: &LocalGcra, shared: &RedisGcra, key: &str) -> (Decision, Decision) {
    (local.check(key), shared.check(key).await.expect("redis decision"))
}

fn assert_alike(l: &Decision, r: &Decision, what: &str) {
    // Redis runs on real time too, a few ms apart: counts must match, durations nearly.
    let near = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => a.abs_diff(b) < Duration::from_millis(150),
        (a, b) => a == b,
    };
    assert_eq!(
        (l.admitted, l.limit, l.remaining),
        (r.admitted, r.limit, r.remaining),
        "{what}"
    );
    assert!(
        near(Some(l.reset_after), Some(r.reset_after)),
        "{what}: reset {l:?} vs {r:?}"
    );
    assert!(near(l.retry_after, r.retry_after), "{what}: retry-after {l:?} vs {r:?}");
}

#[tokio::test]
async fn redis_and_local_stores_decide_alike() {
    let redis = RedisServer::start();
    let p = params(60, Duration::from_secs(60), 3); // T = 1 s, τ = 3 s
    let local = LocalGcra::new(p, DEFAULT_MAX_KEYS, Arc::new(SystemClock));
    let shared = RedisGcra::new(backend(&redis), "parity", p);

    let mut last = None;
    for i in 0..6 {
        let (l, r) = both(&local, &shared, "k").await;
        assert_alike(&l, &r, &format!("request {i}"));
        assert_eq!(l.admitted, i < 4, "burst + 1 = 4 pass, request {i}");
        last = Some(l);
    }
    // Wait out the refusal (Redis uses real time): then exactly one more passes in both.
    let wait = last.and_then(|d| d.retry_after).expect("refused with a retry-after");
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    for i in 0..2 {
        let (l, r) = both(&local, &shared, "k").await;
        assert_alike(&l, &r, &format!("after the wait, request {i}"));
        assert_eq!(l.admitted, i == 0);
    }

    let clock = Arc::new(SystemClock);
    let local = LocalQuota::new(3, Period::Month, DEFAULT_MAX_KEYS, clock.clone());
    let shared = RedisQuota::new(backend(&redis), "parity", 3, Period::Month, clock);
    for i in 0..5 {
        let (l, r) = (local.check("k"), shared.check("k").await.unwrap());
        assert_alike(&l, &r, &format!("quota request {i}"));
        assert_eq!(l.admitted, i < 3);
    }
}
