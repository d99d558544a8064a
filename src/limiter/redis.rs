//! The shared store: rate limits and quotas kept in Redis, so several Portico processes share
//! one budget. One atomic Lua script per decision, one round trip.
//!
//! **One client per process.** [`crate::plugin::BuildContext::redis`] keeps one backend per
//! URL in the process's plugin state, so every plugin (and every config reload that keeps the
//! `redis:` block) uses the same connection and the same circuit breaker. Creating a backend only parses the
//! URL: the connection is made on the first decision, inside the gateway's runtime, never by
//! `portico -t`. It is a `redis::aio::ConnectionManager`: one multiplexed connection shared by
//! all requests, which reconnects by itself after Redis went away.
//!
//! **Failure.** Each call has a deadline (`timeout`, default 100 ms) covering everything:
//! connecting, Lua, and reloading the script after a Redis restart. Errors and timeouts come
//! back as [`StoreError`] (the caller applies `on_store_error`) and count towards the circuit
//! breaker: after 3 in a row Redis is not called for 2 s, then one probe goes through. So no
//! request waits longer than the deadline, and an outage costs Redis one call per cool-down
//! per gateway, not one per request. Every error is counted in
//! `portico_limit_store_errors_total{reason}`.
//!
//! **Keys.** `portico:rl:<namespace>:k:<key>` (GCRA TAT) and
//! `portico:q:<namespace>:k:<key>:<window start>` (quota counter); the namespace is chosen by
//! the plugin so two limits never share keys. Keys longer than 128 bytes are replaced by
//! `h:<sha256>` so a client cannot make Redis store arbitrarily long keys.
//!
//! **Time.** GCRA uses Redis' `TIME`, so gateways with skewed clocks still agree; the key
//! expires when its bucket is full again. Quota windows are calendar windows computed from the
//! gateway's clock (NTP keeps them within a request or two of each other at a boundary);
//! a counter expires a minute after its window ends.

use super::breaker::{Breaker, BreakerConfig};
use super::decision::{Decision, StoreError};
use super::gcra::{self, GcraParams};
use super::metrics::STORE_ERRORS;
use super::quota::{self, Period};
use crate::clock::{micros, Clock, SystemClock};
use once_cell::sync::{Lazy, OnceCell};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};
use sha2::{Digest, Sha256};

use std::sync::Arc;
use std::time::Duration;

/// The deadline of one decision when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// Keys longer than this are stored as their hash.
const MAX_PLAIN_KEY: usize = 128;

/// How long a quota counter outlives its window, for gateways whose clocks run behind.
const QUOTA_GRACE_SECS: u64 = 60;

static GCRA_SCRIPT: Lazy<Script> = Lazy::new(|| Script::new(include_str!("gcra.lua")));
static QUOTA_SCRIPT: Lazy<Script> = Lazy::new(|| Script::new(include_str!("quota.lua")));

/// How to reach Redis and when to give up on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`
    pub url: String,
    /// The deadline of one decision.
    pub timeout: Duration,
    pub breaker: BreakerConfig,
}

impl RedisOptions {
    /// `url` with the default timeout and breaker.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            timeout: DEFAULT_TIMEOUT,
            breaker: BreakerConfig::default(),
        }
    }
}

/// A connection to Redis (made on first use), its deadline and its circuit breaker.
pub struct RedisBackend {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    timeout: Duration,
    breaker: Breaker,
}

/// The process's backends, by options. Weak, so a backend no config uses any more goes away.
impl RedisBackend {
    /// A backend of its own (tests, or two "gateways" in one process). Only parses the URL.
    pub fn new(options: &RedisOptions) -> Result<RedisBackend, String> {
        Self::with_clock(options, Arc::new(SystemClock))
    }

    /// Like [`RedisBackend::new`], with the breaker on `clock`.
    pub fn with_clock(options: &RedisOptions, clock: Arc<dyn Clock>) -> Result<RedisBackend, String> {
        // Client::open parses and validates; it does no I/O.
        let client = redis::Client::open(options.url.as_str()).map_err(|e| format!("invalid redis url: {e}"))?;
        if options.timeout.is_zero() {
            return Err("the redis timeout must be more than 0".into());
        }
        Ok(RedisBackend {
            client,
            conn: OnceCell::new(),
            timeout: options.timeout,
            breaker: Breaker::new(options.breaker, clock),
        })
    }

    /// True while the circuit breaker keeps calls from Redis.
    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// The connection, set up on first use. Must run inside a Tokio runtime (the manager
    /// spawns its connection task there); the gateway's request tasks always do.
    fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.conn
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    // One connection attempt per call that needs one: the breaker paces retries.
                    .set_number_of_retries(0);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .cloned()
    }

    /// Run `script` on `key` with `args` within the deadline, through the breaker.
    async fn run<T: FromRedisValue>(&self, script: &Script, key: &str, args: &[u64]) -> Result<T, StoreError> {
        let result = match self.breaker.admit() {
            None => Err(StoreError::CircuitOpen),
            Some(permit) => {
                let result = match tokio::time::timeout(self.timeout, self.invoke(script, key, args)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout(self.timeout)),
                    Ok(Err(e)) => Err(StoreError::Redis(e.to_string())),
                    Err(_) => Err(StoreError::Timeout(self.timeout)),
                };
                match result {
                    Ok(_) => permit.success(),
                    Err(_) => permit.failure(),
                }
                result
            }
        };
        if let Err(e) = &result {
            STORE_ERRORS.with_label_values(&[e.reason()]).inc();
        }
        result
    }

    async fn invoke<T: FromRedisValue>(&self, script: &Script, key: &str, args: &[u64]) -> redis::RedisResult<T> {
        let mut conn = self.connection()?;
        let mut call = script.prepare_invoke();
        call.key(key);
        for a in args {
            call.arg(*a);
        }
        match call.invoke_async(&mut conn).await {
            // Refused means the command was never sent: the manager held a connection attempt
            // that failed earlier and has just started a new one. Try that one once, so the
            // first call after Redis is back succeeds (the deadline still bounds it).
            Err(e) if e.is_connection_refusal() => call.invoke_async(&mut conn).await,
            other => other,
        }
    }
}

/// `prefix` + the key, or its hash when it is long.
fn redis_key(prefix: &str, key: &str) -> String {
    if key.len() <= MAX_PLAIN_KEY {
        format!("{prefix}k:{key}")
    } else {
        format!("{prefix}h:{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

/// A rate limit kept in Redis.
pub struct RedisGcra {
    backend: Arc<RedisBackend>,
    prefix: String,
    params: GcraParams,
}

impl RedisGcra {
    /// `namespace` names this limit's keys (e.g. the route and the plugin's position).
    pub fn new(backend: Arc<RedisBackend>, namespace: &str, params: GcraParams) -> Self {
        RedisGcra {
            backend,
            prefix: format!("portico:rl:{namespace}:"),
            params,
        }
    }

    /// Decide one request of `key`, on Redis' clock.
    pub async fn check(&self, key: &str) -> Result<Decision, StoreError> {
        let args = [self.params.interval_us(), self.params.tolerance_us()];
        let (now, before, admitted): (u64, i64, u8) = self
            .backend
            .run(&GCRA_SCRIPT, &redis_key(&self.prefix, key), &args)
            .await?;
        let tat = u64::try_from(before).ok();
        let mut decision = gcra::decide(tat, now, &self.params).decision;
        // Same inputs, same comparison: they agree. Should they ever not, Redis decided.
        debug_assert_eq!(decision.admitted, admitted == 1);
        decision.admitted = admitted == 1;
        Ok(decision)
    }

    pub fn params(&self) -> &GcraParams {
        &self.params
    }
}

/// A quota kept in Redis.
pub struct RedisQuota {
    backend: Arc<RedisBackend>,
    prefix: String,
    limit: u64,
    period: Period,
    clock: Arc<dyn Clock>,
}

impl RedisQuota {
    pub fn new(backend: Arc<RedisBackend>, namespace: &str, limit: u64, period: Period, clock: Arc<dyn Clock>) -> Self {
        RedisQuota {
            backend,
            prefix: format!("portico:q:{namespace}:"),
            limit,
            period,
            clock,
        }
    }

    /// Decide one request of `key` in the current window.
    pub async fn check(&self, key: &str) -> Result<Decision, StoreError> {
        let now = self.clock.now();
        let window = self.period.window(now);
        let counter = format!("{}:{}", redis_key(&self.prefix, key), window.start);
        let expire_at_ms = window.end.saturating_add(QUOTA_GRACE_SECS).saturating_mul(1000);
        let used: u64 = self
            .backend
            .run(&QUOTA_SCRIPT, &counter, &[self.limit, expire_at_ms])
            .await?;
        Ok(quota::decide(used, self.limit, window, micros(now)).0)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn period(&self) -> Period {
        self.period
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_a_backend_does_no_io() {
        // Nothing listens on port 1; no runtime exists here. Only the URL is parsed.
        let b = RedisBackend::new(&RedisOptions::new("redis://127.0.0.1:1")).unwrap();
        assert!(!b.circuit_open());
        assert!(b.conn.get().is_none());
        assert!(RedisBackend::new(&RedisOptions::new("http://nope")).is_err());
        let zero = RedisOptions {
            timeout: Duration::ZERO,
            ..RedisOptions::new("redis://127.0.0.1:1")
        };
        assert!(RedisBackend::new(&zero).is_err());
    }

    #[test]
    fn long_keys_are_hashed() {
        assert_eq!(redis_key("p:", "10.0.0.1"), "p:k:10.0.0.1");
        let long = "x".repeat(200);
        let k = redis_key("p:", &long);
        assert!(k.starts_with("p:h:") && k.len() == 4 + 64, "{k}");
        assert_ne!(redis_key("p:", &"y".repeat(200)), k);
    }

    #[tokio::test]
    async fn unreachable_redis_fails_fast_then_opens_the_circuit() {
        let options = RedisOptions {
            timeout: Duration::from_millis(200),
            ..RedisOptions::new(format!("redis://{}", crate::testing::free_addr()))
        };
        let b = Arc::new(RedisBackend::new(&options).unwrap());
        let gcra = RedisGcra::new(b.clone(), "t", GcraParams::new(1, Duration::from_secs(1), 0).unwrap());
        for _ in 0..3 {
            let start = std::time::Instant::now();
            let err = gcra.check("k").await.unwrap_err();
            assert!(matches!(err, StoreError::Redis(_) | StoreError::Timeout(_)), "{err}");
            assert!(start.elapsed() < Duration::from_millis(400));
        }
        assert!(b.circuit_open());
        assert_eq!(gcra.check("k").await, Err(StoreError::CircuitOpen));
    }
}
