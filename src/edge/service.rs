//! The listening service for proxy listeners: it tells `/healthz` whether each one is bound
//! and serving. Pingora's own service panics if a port cannot be bound and otherwise says
//! nothing.

use super::EdgeApp;
use crate::shared::Shared;
use async_trait::async_trait;
use futures::FutureExt;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::listening::Service as Listening;
use pingora::services::{Service as ServiceTrait, ServiceReadyNotifier, ServiceWithDependents};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

/// A listening service for proxy listeners that reports their state to `/healthz`.
pub struct ProxyService {
    inner: Option<Listening<EdgeApp>>,
    name: String,
    addresses: Vec<String>,
    shared: Arc<Shared>,
}

impl ProxyService {
    pub fn new(inner: Listening<EdgeApp>, addresses: Vec<String>, shared: Arc<Shared>) -> Self {
        ProxyService {
            name: ServiceTrait::name(&inner).to_string(),
            inner: Some(inner),
            addresses,
            shared,
        }
    }
}

#[async_trait]
impl ServiceWithDependents for ProxyService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        ready_notifier.notify_ready();
        let Some(mut inner) = self.inner.take() else { return };
        let states = &self.shared.listeners;
        for a in &self.addresses {
            states.set_serving(a, true);
        }
        // A listener is bound once its socket is in the table Pingora hands to a new process
        // on upgrade: that is the moment `accept` can succeed.
        let watcher = fds.clone().map(|fds| {
            let (shared, addresses) = (self.shared.clone(), self.addresses.clone());
            tokio::spawn(async move {
                loop {
                    let missing = {
                        let table = fds.lock();
                        addresses.iter().filter(|a| table.get(a).is_none()).count()
                    };
                    if missing == 0 {
                        for a in &addresses {
                            shared.listeners.set_bound(a, true);
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        });
        let run = ServiceTrait::start_service(&mut inner, fds, shutdown, listeners_per_fd);
        let result = AssertUnwindSafe(run).catch_unwind().await;
        if let Some(w) = watcher {
            w.abort();
        }
        for a in &self.addresses {
            states.set_serving(a, false);
        }
        if result.is_err() {
            log::error!(
                "proxy listener(s) {} stopped: the service failed (is the port in use, or a certificate unreadable?)",
                self.addresses.join(", ")
            );
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        self.inner.as_ref().and_then(ServiceTrait::threads)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.addresses.clone())
    }
}
