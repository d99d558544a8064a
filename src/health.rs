//! Active health checks: one background service probes every endpoint of the *live* snapshot
//! at its upstream's interval, so upstreams added by a reload are checked too. Verdicts are
//! kept in the [`crate::upstream::HealthRegistry`], which outlives snapshots.
//!
//! The same loop resolves endpoint host names again every `resolve_every` (off the request
//! path, through the process's resolver): a new address is used for new connections; when the
//! name does not resolve, the last good address stays.

use crate::config::raw::CheckKind;
use crate::shared::Shared;
use crate::upstream::{EndpointHealth, HealthCheckSpec};
use async_trait::async_trait;
use pingora::connectors::TransportConnector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct HealthChecker {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // HTTP probes of TLS upstreams connect as proxied requests do (SNI, CA, client cert).
        let tls = Arc::new(TransportConnector::new(None));
        loop {
            tokio::select! {
                _ = tick.tick() => self.round(&tls),
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl HealthChecker {
    /// Start the probes and resolutions that are due.
    fn round(&self, tls: &Arc<TransportConnector>) {
        let snap = self.shared.snapshot();
        for up in snap.upstreams.values() {
            // Passive ejections that ran out end here, so the health gauge shows them over.
            for ep in &up.endpoints {
                ep.health.end_ejection();
            }
            if let Some(every) = up.resolve_every {
                for ep in up.endpoints.iter().filter(|e| e.name.is_some()) {
                    {
                        let mut at = ep.resolved_at.lock().unwrap_or_else(|p| p.into_inner());
                        if at.elapsed() < every {
                            continue;
                        }
                        *at = Instant::now();
                    }
                    let (snap, up_name, address) = (snap.clone(), up.name.clone(), ep.address.clone());
                    let resolver = self.shared.resources.resolver.clone();
                    tokio::task::spawn_blocking(move || {
                        let Some(ep) = snap
                            .upstreams
                            .get(&up_name)
                            .and_then(|u| u.endpoints.iter().find(|e| e.address == address))
                        else {
                            return;
                        };
                        let Some((host, port)) = &ep.name else { return };
                        match resolver.resolve(host, *port).map(|a| a.into_iter().next()) {
                            Ok(Some(addr)) => {
                                if ep.set_addr(addr) {
                                    log::info!("upstream {up_name}: endpoint {address} now resolves to {addr}");
                                }
                            }
                            Ok(None) | Err(_) => log::warn!(
                                "upstream {up_name}: endpoint {address} does not resolve; keeping {}",
                                ep.addr()
                            ),
                        }
                    });
                }
            }
            let Some(spec) = &up.health_check else {
                continue;
            };
            for (i, ep) in up.endpoints.iter().enumerate() {
                {
                    let mut last = ep.health.last_probe.lock().unwrap();
                    if last.is_some_and(|t| t.elapsed() < spec.interval) {
                        continue;
                    }
                    *last = Some(Instant::now());
                }
                let (spec, health, addr) = (spec.clone(), ep.health.clone(), ep.addr());
                let host = spec.host.clone().unwrap_or_else(|| ep.address.clone());
                let label = (up.name.clone(), ep.address.clone());
                let over_tls = (up.tls.is_some() && spec.kind == CheckKind::Http).then(|| {
                    let mut peer = up.peer(i, &up.timeouts);
                    // A probe speaks HTTP/1.1 whatever the upstream's protocol.
                    peer.options.alpn = pingora::protocols::ALPN::H1;
                    (tls.clone(), peer)
                });
                tokio::spawn(async move {
                    let check = async {
                        match over_tls {
                            Some((connector, peer)) => {
                                let stream = connector
                                    .new_stream(&*peer)
                                    .await
                                    .map_err(|e| format!("connect: {e}"))?;
                                http_probe(stream, &host, &spec).await
                            }
                            None => probe(addr, &host, &spec).await,
                        }
                    };
                    let result = tokio::time::timeout(spec.timeout, check).await;
                    let ok = matches!(result, Ok(Ok(())));
                    report(&health, &spec, ok, &label, result);
                });
            }
        }
    }
}

fn report(
    health: &EndpointHealth,
    spec: &HealthCheckSpec,
    ok: bool,
    (upstream, endpoint): &(String, String),
    result: Result<Result<(), String>, tokio::time::error::Elapsed>,
) {
    if health.record_probe(ok, spec.healthy_threshold, spec.unhealthy_threshold) {
        if ok {
            log::warn!("upstream {upstream}: endpoint {endpoint} is healthy again");
        } else {
            let why = match result {
                Err(_) => format!("no answer within {:?}", spec.timeout),
                Ok(Err(e)) => e,
                Ok(Ok(())) => String::new(),
            };
            log::warn!("upstream {upstream}: endpoint {endpoint} is unhealthy: {why}");
        }
    }
}

/// One probe: a TCP connect, or an HTTP GET whose status must be in `healthy_status`.
pub async fn probe(addr: SocketAddr, host: &str, spec: &HealthCheckSpec) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    if spec.kind == CheckKind::Tcp {
        return Ok(());
    }
    http_probe(stream, host, spec).await
}

/// An HTTP/1.1 GET of `spec.path` on a connected stream (plain or TLS): the status must be in
/// `healthy_status`.
async fn http_probe<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    spec: &HealthCheckSpec,
) -> Result<(), String> {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portico-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        spec.path
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 || buf.len() > 1024 {
            return Err("no status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| "malformed status line".to_string())?;
    if spec.healthy_status.contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}
