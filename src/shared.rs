//! What every part of the running gateway shares: the live config snapshot, the process
//! resources (endpoint health, plugin state, the upstream client, the clock), the plugin
//! registry, the access log, the state of the proxy listeners.
//! Reload lives here: read the source → compile → atomic swap; any error keeps the old snapshot.

use crate::access_log::AccessLog;
use crate::config::{compile, ConfigErrors, ConfigSource, FileSource, Snapshot};
use crate::plugin::Registry;
use crate::resources::Resources;
use crate::tls::ServerTls;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Shared {
    live: ArcSwap<Snapshot>,
    pub resources: Arc<Resources>,
    pub registry: Registry,
    pub source: Box<dyn ConfigSource>,
    pub access_log: AccessLog,
    pub listeners: ListenerStates,
    /// The sockets Portico bound at start (empty after an upgrade: the old process's are used).
    pub bound: crate::listen::Bound,
    /// Each TLS listener's certificates and client-CA policy as its handshakes use them, by
    /// listener address: made at start, updated in place by reloads.
    pub tls: HashMap<String, ServerTls>,
    reload_lock: Mutex<()>,
    /// True from the moment the process starts handing over (binary upgrade) or shutting down:
    /// see [`Shared::start_draining`].
    drain: tokio::sync::watch::Sender<bool>,
}

/// What a successful reload reports.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Sections that changed but need a binary upgrade (`listeners`, `admin`, `server`).
    pub not_applied: Vec<&'static str>,
}

impl Shared {
    /// Load the config file for the first time.
    pub fn load(path: &Path, registry: Registry) -> Result<Arc<Shared>, ConfigErrors> {
        Shared::load_from(Box::new(FileSource(path.to_path_buf())), registry, Resources::new(128))
    }

    /// Load from any config source, with these process resources.
    pub fn load_from(
        source: Box<dyn ConfigSource>,
        registry: Registry,
        resources: Arc<Resources>,
    ) -> Result<Arc<Shared>, ConfigErrors> {
        let snap = compile(&source.read()?, source.origin(), &registry, &resources)?;
        resources.state.retain(&snap.state_keys);
        if let Some(n) = snap.server.get("upstream_keepalive_pool_size").and_then(|v| v.as_u64()) {
            resources.client.set_pool_size(n as usize);
        }
        let listeners = ListenerStates::new(snap.listeners.iter().map(|l| l.address.clone()).collect());
        let access_log = AccessLog::default();
        access_log.set_path(snap.access_log_path.clone());
        let tls = snap
            .listener_tls
            .iter()
            .map(|(address, config)| (address.clone(), ServerTls::new(config.clone())))
            .collect();
        crate::memory::set_timer_horizon(snap.longest_timeout());
        Ok(Arc::new(Shared {
            tls,
            live: ArcSwap::from_pointee(snap),
            resources,
            registry,
            source,
            access_log,
            listeners,
            bound: Default::default(),
            reload_lock: Mutex::new(()),
            drain: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// The process is handing its clients over (SIGQUIT: a new process serves on the same
    /// sockets) or shutting down (SIGTERM). From now on every answer on a kept-alive HTTP/1
    /// connection says `Connection: close` and HTTP/2 connections get GOAWAY, so clients move
    /// to the new process (or learn of the shutdown) between requests, instead of finding
    /// their idle connection closed under a request they just sent.
    pub fn start_draining(&self) {
        if self.drain.send_if_modified(|d| !std::mem::replace(d, true)) {
            log::info!("draining: answers close their connections, HTTP/2 connections get GOAWAY");
        }
    }

    pub fn draining(&self) -> bool {
        *self.drain.borrow()
    }

    /// A watch that turns true when draining starts (a Pingora shutdown watch, for HTTP/2's
    /// GOAWAY and HTTP/1's keep-alive decisions).
    pub fn drain_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// Where the config comes from (for `/config` and log lines).
    pub fn config_path(&self) -> &Path {
        self.source.origin()
    }

    /// The live snapshot (one atomic load).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// Re-read the config and swap it in, or keep the old one and say why.
    /// Blocking (file, DNS): call it off the request path.
    pub fn reload(&self) -> Result<ReloadReport, ConfigErrors> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = self
            .source
            .read()
            .and_then(|text| compile(&text, self.source.origin(), &self.registry, &self.resources));
        let mut next = match result {
            Ok(s) => s,
            Err(e) => {
                // State a rejected config's plugins created is not anyone's.
                self.resources.state.retain(&self.snapshot().state_keys);
                crate::metrics::RELOADS.with_label_values(&["error"]).inc();
                log::error!("config reload rejected, the old config keeps serving:\n{e}");
                return Err(e);
            }
        };
        let old = self.snapshot();
        let mut report = ReloadReport::default();
        // Sockets, threads and the admin port belong to the process: they stay as they are.
        // A TLS listener's certificates and client CA are not part of its socket: they apply.
        if socket_level(&next.listeners) != socket_level(&old.listeners) {
            report.not_applied.push("listeners");
            next.listeners = old.listeners.clone();
        }
        if next.admin.as_ref().map(|a| &a.address) != old.admin.as_ref().map(|a| &a.address) {
            report.not_applied.push("admin");
            next.admin = old.admin.clone();
        }
        if next.limits.h2_idle_timeout != old.limits.h2_idle_timeout {
            report.not_applied.push("limits.h2_idle_timeout");
            next.limits.h2_idle_timeout = old.limits.h2_idle_timeout;
        }
        if next.server != old.server {
            report.not_applied.push("server");
            next.server = old.server.clone();
        }
        if !report.not_applied.is_empty() {
            log::warn!(
                "config reload: changes to {} are not applied by a reload; use the binary upgrade (-u, then SIGQUIT)",
                report.not_applied.join(", ")
            );
        }
        self.access_log.set_path(next.access_log_path.clone());
        // New TLS handshakes use the new certificates and client CA from now on.
        for (address, running) in &self.tls {
            if let Some(config) = next.listener_tls.get(address) {
                running.apply(config.clone());
            }
        }
        crate::memory::set_timer_horizon(next.longest_timeout());
        self.live.store(Arc::new(next));
        let live = self.snapshot();
        self.resources.health.retain(&live.upstreams);
        self.resources.state.retain(&live.state_keys);
        crate::metrics::RELOADS.with_label_values(&["ok"]).inc();
        log::info!("config reloaded from {}", self.config_path().display());
        Ok(report)
    }
}

/// What of the listeners needs new sockets or a new service to change: the address, HTTP/2,
/// and whether it speaks TLS (its certificates and client CA do not).
fn socket_level(listeners: &[crate::config::raw::Listener]) -> Vec<(&str, bool, bool)> {
    listeners
        .iter()
        .map(|l| (l.address.as_str(), l.http2, l.tls.is_some()))
        .collect()
}

/// Whether each proxy listener is bound and its service is serving (for `/healthz`).
pub struct ListenerStates {
    pub addresses: Vec<String>,
    bound: Vec<AtomicBool>,
    serving: Vec<AtomicBool>,
}

impl ListenerStates {
    fn new(addresses: Vec<String>) -> Self {
        let n = addresses.len();
        ListenerStates {
            addresses,
            bound: (0..n).map(|_| AtomicBool::new(false)).collect(),
            serving: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn index(&self, address: &str) -> Option<usize> {
        self.addresses.iter().position(|a| a == address)
    }

    pub fn set_bound(&self, address: &str, v: bool) {
        if let Some(i) = self.index(address) {
            self.bound[i].store(v, Ordering::Relaxed);
        }
    }

    pub fn set_serving(&self, address: &str, v: bool) {
        if let Some(i) = self.index(address) {
            self.serving[i].store(v, Ordering::Relaxed);
        }
    }

    /// Listeners that are not (yet, or any more) bound and serving.
    pub fn down(&self) -> Vec<&str> {
        self.addresses
            .iter()
            .enumerate()
            .filter(|(i, _)| !(self.bound[*i].load(Ordering::Relaxed) && self.serving[*i].load(Ordering::Relaxed)))
            .map(|(_, a)| a.as_str())
            .collect()
    }
}
