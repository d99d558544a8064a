//! What every part of the running gateway shares: the live config snapshot, the health of
//! every endpoint, the plugin registry, the access log, the state of the proxy listeners.
//! Reload lives here: read → compile → atomic swap; any error keeps the old snapshot.

use crate::access_log::AccessLog;
use crate::config::{load_file, ConfigErrors, Snapshot};
use crate::plugin::Registry;
use crate::upstream::HealthRegistry;
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Shared {
    live: ArcSwap<Snapshot>,
    pub health: HealthRegistry,
    pub registry: Registry,
    pub config_path: PathBuf,
    pub access_log: AccessLog,
    pub listeners: ListenerStates,
    reload_lock: Mutex<()>,
}

/// What a successful reload reports.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Sections that changed but need a binary upgrade (`listeners`, `admin`, `server`).
    pub not_applied: Vec<&'static str>,
}

impl Shared {
    /// Load the config for the first time.
    pub fn load(path: &Path, registry: Registry) -> Result<Arc<Shared>, ConfigErrors> {
        let health = HealthRegistry::default();
        let snap = load_file(path, &registry, &health, false)?;
        let listeners = ListenerStates::new(snap.listeners.iter().map(|l| l.address.clone()).collect());
        Ok(Arc::new(Shared {
            live: ArcSwap::from_pointee(snap),
            health,
            registry,
            config_path: path.to_path_buf(),
            access_log: AccessLog::default(),
            listeners,
            reload_lock: Mutex::new(()),
        }))
    }

    /// The live snapshot (one atomic load).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// Re-read the config file and swap it in, or keep the old one and say why.
    /// Blocking (file, DNS): call it off the request path.
    pub fn reload(&self) -> Result<ReloadReport, ConfigErrors> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = load_file(&self.config_path, &self.registry, &self.health, false);
        let mut next = match result {
            Ok(s) => s,
            Err(e) => {
                crate::metrics::RELOADS.with_label_values(&["error"]).inc();
                log::error!("config reload rejected, the old config keeps serving:\n{e}");
                return Err(e);
            }
        };
        let old = self.snapshot();
        let mut report = ReloadReport::default();
        // Sockets, threads and the admin port belong to the process: they stay as they are.
        if next.listeners != old.listeners {
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
        self.live.store(Arc::new(next));
        self.health.retain(&self.snapshot().upstreams);
        crate::metrics::RELOADS.with_label_values(&["ok"]).inc();
        log::info!("config reloaded from {}", self.config_path.display());
        Ok(report)
    }
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
