//! `mirror`: shadow traffic. A copy of each selected request — the head as it goes upstream,
//! and the body up to `max_body` — is sent to another upstream, fire-and-forget, with the
//! request's trace id; its answer is discarded. The client's answer and latency never depend on
//! it: the copy goes out on its own task once the body has been seen, through the upstream
//! client (balancing, health, timeouts of the mirror upstream).
//!
//! At most `max_in_flight` copies exist at once, counted from the moment a request is selected
//! (so the bodies held for copies are bounded too); past that, copies are dropped and counted,
//! never queued — a slow or dead mirror sheds load instead of accumulating it.
//!
//! The body is watched with [`Plugin::observe_request_body`], which changes nothing about how
//! Portico reads or frames the body: the real upstream gets exactly what it would get without
//! the mirror.

use crate::client::{SubError, SubRequest, UpstreamClient};
use crate::config::units::Size;
use crate::config::ConfigError;
use crate::metrics;
use crate::plugin::{BuildContext, Outcome, Phases, Plugin, PluginKind, RequestState, Verdict};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use serde::Deserialize;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub upstream: String,
    #[serde(default = "all")]
    pub percent: f64,
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_max_body")]
    pub max_body: Size,
}

fn all() -> f64 {
    100.0
}

fn default_in_flight() -> usize {
    64
}

fn default_max_body() -> Size {
    Size(1 << 20)
}

/// Headers the copy does not take from the proxied head: the upstream client sets Host, the
/// framing and the trace for the mirror's own hop; hop-by-hop headers are the connection's.
const NOT_COPIED: [&str; 10] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Answers of the mirror are read up to this size, then dropped with their connection.
const MAX_ANSWER: usize = 64 << 10;

pub struct Mirror {
    route: String,
    upstream: String,
    percent: f64,
    max_body: usize,
    /// Copies in flight: one permit each (kept across reloads that leave the block alone).
    slots: Arc<Semaphore>,
    client: Arc<UpstreamClient>,
    /// sent, failed, dropped: resolved on first use (a config that never goes live makes none).
    counters: OnceLock<[prometheus::IntCounter; 3]>,
}

/// Index of the `dropped` counter in [`Mirror::counters`].
const DROPPED: usize = 2;

/// A copy being put together for one request (in the request's vars; filled by later hooks).
#[derive(Clone)]
struct Copy(Arc<Mutex<Option<Pending>>>);

struct Pending {
    /// The head as it went upstream (set by the first attempt).
    head: Option<RequestHeader>,
    body: BytesMut,
    truncated: bool,
    /// This copy's place among `max_in_flight`, held until the mirror answered.
    permit: OwnedSemaphorePermit,
}

impl Mirror {
    pub fn new(cfg: Config, ctx: &BuildContext) -> Result<Self, ConfigError> {
        if !ctx.upstreams.contains(&cfg.upstream) {
            return Err(ConfigError::new(
                "upstream",
                format!("no upstream named '{}'", cfg.upstream),
            ));
        }
        if !(0.0..=100.0).contains(&cfg.percent) {
            return Err(ConfigError::new("percent", "must be between 0 and 100"));
        }
        if cfg.max_in_flight == 0 || cfg.max_in_flight > 100_000 {
            return Err(ConfigError::new("max_in_flight", "must be between 1 and 100000"));
        }
        if cfg.max_body.0 > 64 << 20 {
            return Err(ConfigError::new("max_body", "at most 64MiB"));
        }
        let in_flight = cfg.max_in_flight;
        Ok(Mirror {
            route: ctx.route.clone().unwrap_or_else(|| "*".into()),
            upstream: cfg.upstream,
            percent: cfg.percent,
            max_body: cfg.max_body.0 as usize,
            slots: ctx.state(|| Semaphore::new(in_flight)),
            client: ctx.upstream_client(),
            counters: OnceLock::new(),
        })
    }

    fn counters(&self) -> &[prometheus::IntCounter; 3] {
        self.counters.get_or_init(|| {
            ["sent", "failed", "dropped"].map(|r| metrics::MIRROR_COPIES.with_label_values(&[self.route.as_str(), r]))
        })
    }

    /// Take the request's copy out of its slot, if it is still there.
    fn take(st: &RequestState) -> Option<Pending> {
        let copy = st.vars.get::<Copy>()?;
        copy.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Send a copy on its own task (a copy whose request never went upstream is let go).
    fn send(&self, pending: Pending, st: &RequestState) {
        let Some(head) = pending.head else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let sub = copy_of(&head, pending.body.freeze(), pending.truncated);
        let st = st.detached();
        let client = self.client.clone();
        let upstream = self.upstream.clone();
        let permit = pending.permit;
        let [sent, failed, _] = self.counters().clone();
        runtime.spawn(async move {
            match client.send(&st, &upstream, sub).await {
                // The mirror answered (an answer too large to read is still an answer).
                Ok(_) | Err(SubError::TooLarge) => sent.inc(),
                Err(e) => {
                    log::debug!("mirror of route '{}' to '{upstream}': {e}", st.route);
                    failed.inc();
                }
            }
            drop(permit);
        });
    }
}

/// The copy of a request whose head went upstream as `head`. The upstream client sets Host, the
/// framing, `traceparent` (a child span) and the trace header for the mirror's own hop.
fn copy_of(head: &RequestHeader, body: Bytes, truncated: bool) -> SubRequest {
    let mut headers: Vec<(HeaderName, HeaderValue)> = head
        .headers
        .iter()
        .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if truncated {
        headers.push((
            HeaderName::from_static("x-portico-mirror-truncated"),
            HeaderValue::from_static("true"),
        ));
    }
    SubRequest {
        method: head.method.clone(),
        path: head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string(),
        headers,
        body,
        timeout: None,
        max_body: MAX_ANSWER,
    }
}

#[async_trait]
impl Plugin for Mirror {
    fn kind(&self) -> PluginKind {
        PluginKind::Select
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::UPSTREAM_REQUEST | Phases::OBSERVE_REQUEST_BODY | Phases::LOG
    }

    /// Select the request, and take a place among `max_in_flight` (or drop the copy).
    async fn request(&self, _req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        if self.percent < 100.0 && rand::random::<f64>() * 100.0 >= self.percent {
            return Verdict::Continue;
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                st.vars.insert(Copy(Arc::new(Mutex::new(Some(Pending {
                    head: None,
                    body: BytesMut::new(),
                    truncated: false,
                    permit,
                })))));
            }
            Err(_) => self.counters()[DROPPED].inc(),
        }
        Verdict::Continue
    }

    /// The head as the upstream gets it (rewritten path, forwarded headers), once.
    fn upstream_request(&self, req: &mut RequestHeader, st: &RequestState) {
        if let Some(copy) = st.vars.get::<Copy>() {
            if let Some(p) = copy.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                if p.head.is_none() {
                    p.head = Some(req.clone());
                }
            }
        }
    }

    /// Keep the body up to `max_body`; send the copy when it ends (or outgrows the bound).
    fn observe_request_body(&self, piece: &Bytes, end_of_stream: bool, st: &mut RequestState) {
        let ready = {
            let Some(copy) = st.vars.get::<Copy>() else { return };
            let mut slot = copy.0.lock().unwrap_or_else(|p| p.into_inner());
            let Some(p) = slot.as_mut() else { return };
            let room = self.max_body.saturating_sub(p.body.len());
            if piece.len() > room {
                p.truncated = true;
            }
            p.body.extend_from_slice(&piece[..piece.len().min(room)]);
            end_of_stream || p.truncated
        };
        if ready {
            if let Some(p) = Self::take(st) {
                self.send(p, st);
            }
        }
    }

    /// A request whose body was never seen to end (the client went away mid-body, the
    /// exchange broke): send what there is, marked as cut short if it had a body.
    fn log(&self, st: &RequestState, _outcome: &Outcome) {
        if let Some(mut p) = Self::take(st) {
            p.truncated |= !p.body.is_empty();
            self.send(p, st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> BuildContext {
        let mut ctx = BuildContext::standalone();
        ctx.route = Some("shop".into());
        ctx.upstreams = vec!["v1".into(), "shadow".into()];
        ctx.plugin = "mirror".into();
        ctx.block_hash = "h".into();
        ctx
    }

    fn build(yaml: &str) -> Result<Mirror, ConfigError> {
        let ctx = ctx();
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        Mirror::new(ctx.parse(&v)?, &ctx)
    }

    fn state() -> RequestState {
        RequestState::new("192.0.2.1".parse().unwrap())
    }

    fn pending(st: &RequestState) -> Option<(bool, usize, bool)> {
        let copy = st.vars.get::<Copy>()?;
        let slot = copy.0.lock().unwrap();
        slot.as_ref().map(|p| (p.head.is_some(), p.body.len(), p.truncated))
    }

    #[test]
    fn config_errors_are_located() {
        let loc = |yaml: &str| build(yaml).err().expect("an error").location;
        assert_eq!(loc("{upstream: nope}"), "upstream");
        assert_eq!(loc("{upstream: shadow, percent: 101}"), "percent");
        assert_eq!(loc("{upstream: shadow, max_in_flight: 0}"), "max_in_flight");
        assert_eq!(loc("{upstream: shadow, max_body: 1GiB}"), "max_body");
        let m = build("{upstream: shadow}").unwrap();
        assert_eq!(
            (m.percent, m.max_body, m.slots.available_permits()),
            (100.0, 1 << 20, 64)
        );
    }

    #[tokio::test]
    async fn copies_past_max_in_flight_are_dropped() {
        let m = build("{upstream: shadow, max_in_flight: 2}").unwrap();
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        let mut states: Vec<RequestState> = (0..3).map(|_| state()).collect();
        for st in &mut states {
            m.request(&mut req, st).await;
        }
        assert!(pending(&states[0]).is_some() && pending(&states[1]).is_some());
        assert!(pending(&states[2]).is_none(), "the third copy is dropped, not queued");
        assert_eq!(m.counters()[DROPPED].get(), 1);
        // A finished copy gives its place back.
        drop(states.remove(0));
        let mut st = state();
        m.request(&mut req, &mut st).await;
        assert!(pending(&st).is_some());
    }

    #[tokio::test]
    async fn percent_zero_copies_nothing() {
        let m = build("{upstream: shadow, percent: 0}").unwrap();
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        let mut st = state();
        m.request(&mut req, &mut st).await;
        assert!(pending(&st).is_none());
        assert_eq!(m.slots.available_permits(), 64);
    }

    #[test]
    fn the_body_is_kept_up_to_max_body() {
        let m = build("{upstream: shadow, max_body: 10}").unwrap();
        let mut st = state();
        let permit = m.slots.clone().try_acquire_owned().unwrap();
        st.vars.insert(Copy(Arc::new(Mutex::new(Some(Pending {
            head: None,
            body: BytesMut::new(),
            truncated: false,
            permit,
        })))));
        let mut head = RequestHeader::build("POST", b"/v1/orders?x=1", None).unwrap();
        m.upstream_request(&mut head, &st);
        m.observe_request_body(&Bytes::from_static(b"12345"), false, &mut st);
        assert_eq!(pending(&st), Some((true, 5, false)));
        // Past the bound the copy is complete: it leaves (no runtime here, so it is let go).
        m.observe_request_body(&Bytes::from_static(b"6789abc"), false, &mut st);
        assert_eq!(pending(&st), None);
        assert_eq!(m.slots.available_permits(), 64);
    }

    #[test]
    fn a_copy_keeps_the_head_but_not_its_framing() {
        let mut head = RequestHeader::build("PUT", b"/v1/items/7?full=1", None).unwrap();
        for (k, v) in [
            ("host", "users.internal"),
            ("content-length", "3"),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive"),
            ("x-request-id", "abc"),
            ("x-forwarded-for", "192.0.2.1"),
            ("authorization", "Bearer t"),
        ] {
            head.append_header(k, v).unwrap();
        }
        let sub = copy_of(&head, Bytes::from_static(b"abc"), true);
        assert_eq!((sub.method.as_str(), sub.path.as_str()), ("PUT", "/v1/items/7?full=1"));
        let mut names: Vec<&str> = sub.headers.iter().map(|(k, _)| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "authorization",
                "x-forwarded-for",
                "x-portico-mirror-truncated",
                "x-request-id"
            ]
        );
        assert_eq!(&sub.body[..], b"abc");
    }
}
