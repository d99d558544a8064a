//! What a limiter answers, in the terms of the IETF RateLimit header fields draft
//! (`RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`) plus `Retry-After`.

use pingora::http::PreparedHeaderName;
use std::time::Duration;

/// One limiter decision, whatever the algorithm (GCRA or quota) and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub admitted: bool,
    /// The most requests the key may make at once: `burst + 1` for a rate limit (the bucket's
    /// capacity, as Envoy's token bucket reports it), `limit` for a quota.
    pub limit: u64,
    /// Requests the key could still make right now, this one counted.
    pub remaining: u64,
    /// Until `remaining` is back to `limit`: the bucket is full again, or the quota window ends.
    pub reset_after: Duration,
    /// Set when refused: until the next request would pass.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// The response headers for this decision, names in lower case (as HTTP/2 needs and
    /// `HeaderName::from_static` accepts). Seconds are rounded up, so a client that waits
    /// them is never early; `retry-after` is at least 1.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        self.prepared_headers()
            .into_iter()
            .map(|(name, value)| (name.name().as_str(), value))
            .collect()
    }

    /// As [`Self::headers`], with names parsed once (for the response of every limited
    /// request).
    pub fn prepared_headers(&self) -> Vec<(&'static PreparedHeaderName, String)> {
        use crate::util::u64_text;
        static LIMIT: PreparedHeaderName = PreparedHeaderName::from_static("ratelimit-limit");
        static REMAINING: PreparedHeaderName = PreparedHeaderName::from_static("ratelimit-remaining");
        static RESET: PreparedHeaderName = PreparedHeaderName::from_static("ratelimit-reset");
        static RETRY_AFTER: PreparedHeaderName = PreparedHeaderName::from_static("retry-after");
        let mut h = Vec::with_capacity(4);
        h.push((&LIMIT, u64_text(self.limit)));
        h.push((&REMAINING, u64_text(self.remaining)));
        h.push((&RESET, u64_text(ceil_secs(self.reset_after))));
        if let Some(retry) = self.retry_after {
            h.push((&RETRY_AFTER, u64_text(ceil_secs(retry).max(1))));
        }
        h
    }
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Why a shared store could not decide. The caller applies `on_store_error` (allow or deny);
/// each error has already been counted in `portico_limit_store_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis is not called for a while after repeated failures (circuit open)")]
    CircuitOpen,
}

impl StoreError {
    /// The metric label: `timeout`, `error` or `circuit_open`.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Redis(_) => "error",
            StoreError::CircuitOpen => "circuit_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn admitted_has_no_retry_after() {
        let d = Decision {
            admitted: true,
            limit: 10,
            remaining: 9,
            reset_after: Duration::from_millis(100),
            retry_after: None,
        };
        let h = d.headers();
        assert_eq!(find(&h, "ratelimit-limit"), Some("10"));
        assert_eq!(find(&h, "ratelimit-remaining"), Some("9"));
        assert_eq!(find(&h, "ratelimit-reset"), Some("1"), "rounded up");
        assert_eq!(find(&h, "retry-after"), None);
    }

    #[test]
    fn refused_has_retry_after_of_at_least_one_second() {
        let d = Decision {
            admitted: false,
            limit: 1,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: Some(Duration::from_millis(1)),
        };
        let h = d.headers();
        assert_eq!(find(&h, "ratelimit-reset"), Some("0"));
        assert_eq!(find(&h, "retry-after"), Some("1"));
        let d = Decision {
            retry_after: Some(Duration::from_millis(2001)),
            ..d
        };
        assert_eq!(find(&d.headers(), "retry-after"), Some("3"));
    }

    #[test]
    fn header_names_are_valid_static_names() {
        let d = Decision {
            admitted: false,
            limit: 1,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: Some(Duration::from_secs(1)),
        };
        for (name, value) in d.headers() {
            // from_static panics on upper case: the plugin glue relies on this.
            let _ = http::HeaderName::from_static(name);
            assert!(http::HeaderValue::from_str(&value).is_ok());
        }
    }
}
