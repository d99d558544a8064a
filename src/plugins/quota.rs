//! `quota`: `limit` requests per calendar `period` (hour, day or month, in UTC) per key (by
//! default the consumer), kept in this process or shared through Redis.
//!
//! The window is the calendar's: a `day` quota starts again at 00:00 UTC whatever time the
//! first request came, and a `month` quota on the 1st (28 to 31 days later). The N+1-th request
//! of a window → 429 `quota_exceeded`, with `Retry-After` and `RateLimit-Reset` at the window's
//! end; admitted responses carry the `RateLimit-*` headers too. Time comes from the process
//! clock (`BuildContext::clock`), which tests replace with a manual one.

use super::limit::{self, Counters, KeyForm, OnStoreError, StoreKind};
use crate::config::ConfigError;
use crate::limiter::{LocalQuota, Period, QuotaLimiter, RedisQuota};
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, RequestState, Verdict};
use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Requests allowed per window (at least 1).
    pub limit: i64,
    /// `hour` | `day` | `month`, calendar windows in UTC.
    pub period: Period,
    /// `consumer` (default; the client address when there is none) | `ip` | `route` |
    /// `global` | `header:NAME`.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub store: StoreKind,
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// The most keys a local store holds (default 1,000,000); ended windows go first.
    #[serde(default)]
    pub max_keys: Option<i64>,
}

pub struct Quota {
    limiter: QuotaLimiter,
    key: KeyForm,
    on_store_error: OnStoreError,
    counters: Counters,
    limit: u64,
    period: Period,
}

/// How often a local store drops the counters of ended windows.
const SWEEP_EVERY: Duration = Duration::from_secs(300);

impl Quota {
    pub fn new(cfg: Config, ctx: &BuildContext) -> Result<Self, ConfigError> {
        // Every mistake of the block at once (`-t` shows them all).
        let mut wrong = Vec::new();
        if cfg.limit < 1 {
            wrong.push(ConfigError::new("limit", "must be at least 1"));
        }
        let key = match &cfg.key {
            None => KeyForm::Consumer,
            Some(k) => KeyForm::parse(k).unwrap_or_else(|e| {
                wrong.push(ConfigError::new("key", e));
                KeyForm::Consumer
            }),
        };
        if let Some(e) = ConfigError::several(wrong) {
            return Err(e);
        }
        let limit = cfg.limit as u64;
        let max_keys = limit::max_keys(cfg.max_keys, cfg.store)?;
        let clock = ctx.clock();
        let limiter = match limit::redis_backend(ctx, cfg.store)? {
            Some(backend) => QuotaLimiter::Redis(RedisQuota::new(
                backend,
                &limit::namespace(ctx),
                limit,
                cfg.period,
                clock,
            )),
            None => {
                let local = ctx.state(|| LocalQuota::new(limit, cfg.period, max_keys, clock));
                let swept = local.clone();
                ctx.every("quota sweep", SWEEP_EVERY, move || {
                    let q = swept.clone();
                    async move {
                        let _ = tokio::task::spawn_blocking(move || q.sweep()).await;
                    }
                });
                QuotaLimiter::Local(local)
            }
        };
        Ok(Quota {
            limiter,
            key,
            on_store_error: cfg.on_store_error,
            counters: Counters::new(ctx, "quota"),
            limit,
            period: cfg.period,
        })
    }
}

#[async_trait]
impl Plugin for Quota {
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
                let message = format!(
                    "quota of {} request{} per {} (UTC) used up",
                    self.limit,
                    if self.limit == 1 { "" } else { "s" },
                    self.period.name()
                );
                Verdict::Respond(limit::refusal("quota_exceeded", message, &d))
            }
            Err(e) => limit::store_unavailable(
                &e,
                self.on_store_error,
                &self.counters,
                st,
                "quota_exceeded",
                "the quota",
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
    use crate::clock::{Clock, ManualClock};
    use crate::resources::Resources;
    use std::sync::Arc;

    fn build(yaml: &str, ctx: &BuildContext) -> Result<Quota, ConfigError> {
        let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        Quota::new(ctx.parse(&value)?, ctx)
    }

    fn err(yaml: &str) -> ConfigError {
        match build(yaml, &BuildContext::standalone()) {
            Ok(_) => panic!("{yaml} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn config_errors_are_located() {
        assert_eq!(err("{limit: 0, period: day}").location, "limit");
        assert_eq!(err("{limit: -1, period: day}").location, "limit");
        assert_eq!(err("{limit: 5, period: week}").location, "period");
        assert_eq!(err("{limit: 5, period: day, key: session}").location, "key");
        assert_eq!(err("{limit: 5, period: day, store: redis}").location, "store");
        assert!(err("{limit: 5}").message.contains("period"));
    }

    async fn ask(q: &Quota, consumer: &str) -> (bool, ResponseHeader) {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        let mut st = RequestState::new("10.0.0.1".parse().unwrap());
        st.consumer = Some(consumer.into());
        let admitted = match q.request(&mut req, &mut st).await {
            Verdict::Continue => true,
            Verdict::Respond(r) => {
                assert_eq!((r.status, r.error_code()), (429, Some("quota_exceeded")));
                false
            }
        };
        let mut resp = ResponseHeader::build(if admitted { 200 } else { 429 }, None).unwrap();
        q.response(&req, &mut resp, &mut st);
        (admitted, resp)
    }

    #[tokio::test]
    async fn counts_per_consumer_and_resets_at_the_utc_boundary() {
        let clock = Arc::new(ManualClock::at(2023, 2, 28, 23, 0, 0));
        let ctx = BuildContext::with_resources(Resources::with_clock(clock.clone()));
        let q = build("{limit: 2, period: month}", &ctx).unwrap();
        for left in ["1", "0"] {
            let (ok, resp) = ask(&q, "alice").await;
            assert!(ok);
            assert_eq!(resp.headers["ratelimit-remaining"], left);
            assert_eq!(resp.headers["ratelimit-reset"], "3600", "February 2023 ends in an hour");
        }
        let (ok, resp) = ask(&q, "alice").await;
        assert!(!ok);
        assert_eq!(resp.headers["retry-after"], "3600");
        assert!(ask(&q, "bob").await.0, "bob has his own quota");
        clock.set(ManualClock::at(2023, 3, 1, 0, 0, 0).now());
        let (ok, resp) = ask(&q, "alice").await;
        assert!(ok, "March is a new window");
        assert_eq!(resp.headers["ratelimit-reset"], (31 * 86_400).to_string());
    }
}
