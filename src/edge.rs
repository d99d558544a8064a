//! The layer between Pingora's listeners and the proxy.
//!
//! [`EdgeApp`] wraps the proxy's `ServerApp`: Pingora hands it each accepted connection once
//! (the HTTP/1 keep-alive loop runs inside), so per-connection work lives here.
//! [`ProxyService`] wraps Pingora's listening service to know whether each proxy listener is
//! bound and serving: Pingora's service panics if a port cannot be bound and otherwise says
//! nothing, while `/healthz` must tell the truth about the proxy ports.

use crate::proxy::Gateway;
use crate::shared::Shared;
use async_trait::async_trait;
use futures::FutureExt;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::listening::Service as Listening;
use pingora::services::{Service as ServiceTrait, ServiceReadyNotifier, ServiceWithDependents};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct EdgeApp {
    proxy: Arc<HttpProxy<Gateway>>,
    shared: Arc<Shared>,
    /// Connections accepted whose first bytes have not arrived yet.
    awaiting_first_bytes: AtomicUsize,
}

/// How long shutdown waits for just-accepted connections to send their request.
const FIRST_BYTES_DRAIN: Duration = Duration::from_secs(2);

impl EdgeApp {
    pub fn new(proxy: HttpProxy<Gateway>, shared: Arc<Shared>) -> Self {
        EdgeApp {
            proxy: Arc::new(proxy),
            shared,
            awaiting_first_bytes: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // Wait for the connection's first bytes before handing it to the proxy. At shutdown
        // (an upgrade's hand-over, or SIGTERM) Pingora drops every connection still waiting for
        // a request head, so a client that had just connected would lose its request. Knowing
        // which connections have not spoken yet lets `cleanup` wait for them. A connection
        // that says nothing within `header_timeout` is closed.
        let header_timeout = self.shared.snapshot().limits.header_timeout;
        self.awaiting_first_bytes.fetch_add(1, Ordering::AcqRel);
        let first = tokio::time::timeout(header_timeout, stream.try_peek(&mut [0u8; 1])).await;
        self.awaiting_first_bytes.fetch_sub(1, Ordering::AcqRel);
        match first {
            Ok(Ok(_)) => ServerApp::process_new(&self.proxy, stream, shutdown).await,
            Ok(Err(_)) => None,
            Err(_) => {
                crate::metrics::REJECTED_CONNECTIONS
                    .with_label_values(&["header_timeout"])
                    .inc();
                None
            }
        }
    }

    async fn cleanup(&self) {
        let end = tokio::time::Instant::now() + FIRST_BYTES_DRAIN;
        while self.awaiting_first_bytes.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ServerApp::cleanup(&*self.proxy).await;
    }
}

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
        let Some(mut inner) = self.inner.take() else {
            return;
        };
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
