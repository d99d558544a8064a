//! `rate_limit`: `requests` per `per`, plus `burst`, per key (client address, consumer, route,
//! everything, or a header), kept in this process or shared through Redis.
//!
//! One algorithm for both stores: GCRA with nginx `limit_req` semantics ([`crate::limiter::gcra`]),
//! so a fresh key passes `burst + 1` requests back to back, then one every `per / requests`.
//! Over the limit → 429 `rate_limited` with `Retry-After`; every decided response (admitted or
//! not) carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
//!
//! A local limiter lives in the plugin's reload-surviving state, so a reload that leaves the
//! block alone keeps the counters; a changed block starts fresh. With `store: redis` the keys
//! carry the block's hash, which gives the same two properties across processes.

use super::limit::{self, Counters, KeyForm, OnStoreError, StoreKind};
use crate::config::units::Dur;
use crate::config::ConfigError;
use crate::limiter::{GcraParams, LocalGcra, RateLimiter, RedisGcra};
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, RequestState, Verdict};
use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Requests allowed per `per` (at least 1).
    pub requests: i64,
    /// The period `requests` are counted over (`1s`, `1m`, …; more than 0).
    pub per: Dur,
    /// Extra requests a key may make back to back (default 0).
    #[serde(default)]
    pub burst: i64,
    /// `ip` (default) | `consumer` | `route` | `global` | `header:NAME`.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub store: StoreKind,
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// The most keys a local store holds (default 1,000,000); idle keys go first.
    #[serde(default)]
    pub max_keys: Option<i64>,
}

pub struct RateLimit {
    limiter: RateLimiter,
    key: KeyForm,
    on_store_error: OnStoreError,
    counters: Counters,
    /// "10 requests per 1s", for the 429's message.
    describe: String,
}

/// How often a local store drops the keys whose bucket is full again (it stays bounded
/// without this; sweeping gives the memory back after a burst of distinct keys).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl RateLimit {
    pub fn new(cfg: Config, ctx: &BuildContext) -> Result<Self, ConfigError> {
        // Every mistake of the block at once (`-t` shows them all).
        let mut wrong = Vec::new();
        if cfg.requests < 1 {
            wrong.push(ConfigError::new("requests", "must be at least 1"));
        }
        if cfg.per.0.is_zero() {
            wrong.push(ConfigError::new("per", "must be more than 0 (e.g. 1s or 1m)"));
        }
        if cfg.burst < 0 {
            wrong.push(ConfigError::new("burst", "must be 0 or more"));
        }
        let key = match &cfg.key {
            None => KeyForm::Ip,
            Some(k) => KeyForm::parse(k).unwrap_or_else(|e| {
                wrong.push(ConfigError::new("key", e));
                KeyForm::Ip
            }),
        };
        if let Some(e) = ConfigError::several(wrong) {
            return Err(e);
        }
        // Both are positive here.
        let (requests, burst) = (cfg.requests as u64, cfg.burst as u64);
        let params = GcraParams::new(requests, cfg.per.0, burst).map_err(|e| ConfigError::new("", e))?;
        let max_keys = limit::max_keys(cfg.max_keys, cfg.store)?;
        let limiter = match limit::redis_backend(ctx, cfg.store)? {
            Some(backend) => RateLimiter::Redis(RedisGcra::new(backend, &limit::namespace(ctx), params)),
            None => {
                let clock = ctx.clock();
                let local = ctx.state(|| LocalGcra::new(params, max_keys, clock));
                let swept = local.clone();
                ctx.every("rate_limit sweep", SWEEP_EVERY, move || {
                    let l = swept.clone();
                    async move {
                        let _ = tokio::task::spawn_blocking(move || l.sweep()).await;
                    }
                });
                RateLimiter::Local(local)
            }
        };
        Ok(RateLimit {
            limiter,
            key,
            on_store_error: cfg.on_store_error,
            counters: Counters::new(ctx, "rate_limit"),
            describe: format!(
                "{requests} request{} per {}",
                if requests == 1 { "" } else { "s" },
                humantime::format_duration(cfg.per.0)
            ),
        })
    }
}

#[async_trait]
impl Plugin for RateLimit {
    fn kind(&self) -> PluginKind {
        PluginKind::Limit
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::RESPONSE
    }

    async fn request(&self, req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let key = self.key.key(req, st);
        match self.limiter.check(&key).await {
            Ok(d) => {
                limit::remember(st, d);
                self.counters.count(st, d.admitted);
                if d.admitted {
                    return Verdict::Continue;
                }
                let message = format!("rate limit exceeded ({}); retry later", self.describe);
                Verdict::Respond(limit::refusal("rate_limited", message, &d))
            }
            Err(e) => limit::store_unavailable(
                &e,
                self.on_store_error,
                &self.counters,
                st,
                "rate_limited",
                "the rate limit",
            ),
        }
    }

    fn response(&self, _req: &RequestHeader, resp: &mut ResponseHeader, st: &mut RequestState) {
        limit::apply(st, resp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::resources::Resources;
    use std::sync::Arc;

    fn build(yaml: &str, ctx: &BuildContext) -> Result<RateLimit, ConfigError> {
        let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        RateLimit::new(ctx.parse(&value)?, ctx)
    }

    fn err(yaml: &str) -> ConfigError {
        match build(yaml, &BuildContext::standalone()) {
            Ok(_) => panic!("{yaml} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn config_errors_are_located() {
        assert_eq!(err("{requests: 0, per: 1s}").location, "requests");
        assert_eq!(err("{requests: -3, per: 1s}").location, "requests");
        assert_eq!(err("{requests: 1, per: 0s}").location, "per");
        assert_eq!(err("{requests: 1, per: 1s, burst: -1}").location, "burst");
        assert_eq!(err("{requests: 1, per: 1s, key: cookie:sid}").location, "key");
        assert_eq!(err("{requests: 1, per: 1s, store: redis}").location, "store");
        assert_eq!(err("{requests: 1, per: 1s, store: memcached}").location, "store");
        assert_eq!(
            err("{requests: 1, per: 1s, on_store_error: maybe}").location,
            "on_store_error"
        );
        assert_eq!(err("{requests: 1, per: 1s, max_keys: 0}").location, "max_keys");
        assert!(err("{requests: 1, per: 1s, burts: 1}")
            .message
            .contains("unknown field"));
        assert!(err("{per: 1s}").message.contains("requests"));
        let e = err("{requests: 2000000, per: 1s}");
        assert!(e.message.contains("microsecond"), "{e:?}");
        // Several mistakes: all of them, each with its field.
        let e = err("{requests: 0, per: 0s, key: bogus}");
        assert_eq!(e.location, "", "{e:?}");
        for field in [
            "requests: must be at least 1",
            "per: must be more than 0",
            "key: unknown key 'bogus'",
        ] {
            assert!(e.message.contains(field), "{field} in {e:?}");
        }
    }

    #[test]
    fn redis_needs_the_redis_section() {
        let mut ctx = BuildContext::standalone();
        ctx.redis_url = Some("redis://127.0.0.1:6379".into());
        assert!(build("{requests: 1, per: 1s, store: redis}", &ctx).is_ok());
        let e = build("{requests: 1, per: 1s, store: redis, max_keys: 10}", &ctx)
            .err()
            .unwrap();
        assert_eq!(e.location, "max_keys");
        ctx.redis_url = Some("http://not-redis".into());
        assert_eq!(
            build("{requests: 1, per: 1s, store: redis}", &ctx)
                .err()
                .unwrap()
                .location,
            "store"
        );
    }

    #[tokio::test]
    async fn admits_burst_plus_one_then_refuses_with_headers() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1_700_000_000)));
        let ctx = BuildContext::with_resources(Resources::with_clock(clock.clone()));
        let rl = build("{requests: 2, per: 1s, burst: 1}", &ctx).unwrap();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        let mut admitted = 0;
        for i in 0..4 {
            let mut st = RequestState::new("10.0.0.1".parse().unwrap());
            match rl.request(&mut req, &mut st).await {
                Verdict::Continue => admitted += 1,
                Verdict::Respond(reply) => {
                    assert_eq!(reply.status, 429);
                    assert_eq!(reply.error_code(), Some("rate_limited"));
                    let names: Vec<&str> = reply.headers.iter().map(|(k, _)| k.as_str()).collect();
                    for h in [
                        "retry-after",
                        "ratelimit-limit",
                        "ratelimit-remaining",
                        "ratelimit-reset",
                    ] {
                        assert!(names.contains(&h), "request {i}: {names:?}");
                    }
                }
            }
            let mut resp = ResponseHeader::build(200, None).unwrap();
            rl.response(&req, &mut resp, &mut st);
            assert_eq!(resp.headers["ratelimit-limit"], "2");
        }
        assert_eq!(admitted, 2);
        // Another address has its own budget; half a second refills one request.
        let mut other = RequestState::new("10.0.0.2".parse().unwrap());
        assert!(matches!(rl.request(&mut req, &mut other).await, Verdict::Continue));
        clock.advance(Duration::from_millis(500));
        let mut st = RequestState::new("10.0.0.1".parse().unwrap());
        assert!(matches!(rl.request(&mut req, &mut st).await, Verdict::Continue));
    }

    #[test]
    fn an_unchanged_block_keeps_its_limiter() {
        let ctx = BuildContext::standalone();
        let mut a = ctx.clone();
        a.route = Some("r".into());
        a.plugin = "rate_limit".into();
        a.block_hash = "h1".into();
        let first = build("{requests: 1, per: 1m}", &a).unwrap();
        let again = build("{requests: 1, per: 1m}", &a).unwrap();
        let mut b = a.clone();
        b.block_hash = "h2".into();
        let changed = build("{requests: 1, per: 1m}", &b).unwrap();
        let local = |r: &RateLimit| match &r.limiter {
            RateLimiter::Local(l) => l.clone(),
            RateLimiter::Redis(_) => unreachable!(),
        };
        assert!(Arc::ptr_eq(&local(&first), &local(&again)));
        assert!(!Arc::ptr_eq(&local(&first), &local(&changed)));
    }
}
