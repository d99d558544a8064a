//! Listening sockets. At start (not at an upgrade, where the old process hands its sockets
//! over) Portico binds every proxy and admin address itself, before Pingora runs: a port that
//! cannot be bound is a one-line error and a non-zero exit at once — Pingora alone retries for
//! 30 s, then its service panics while the process lives on serving nothing — and an address
//! with port 0 gets an ephemeral port that Portico can report. The sockets go to Pingora through
//! its own table of inherited listeners (the one a binary upgrade fills).
//!
//! [`ListenerService`] wraps a Pingora listening service to hand those sockets over and to tell
//! `/healthz` whether each proxy listener is bound and serving.

use crate::shared::Shared;
use async_trait::async_trait;
use futures::FutureExt;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::listening::Service as Listening;
use pingora::services::{Service as ServiceTrait, ServiceReadyNotifier, ServiceWithDependents};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sockets bound at start, by the address as the config writes it (Pingora's key for them).
#[derive(Default, Clone)]
pub struct Bound(Arc<Mutex<HashMap<String, (RawFd, SocketAddr)>>>);

impl Bound {
    /// Bind each address (`what` names it in the error: "proxy listener", "admin listener").
    pub fn bind_all<'a>(&self, addresses: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(), String> {
        let bound = self;
        for (address, what) in addresses {
            let listener = std::net::TcpListener::bind(address)
                .map_err(|e| format!("cannot listen on {address} ({what}): {e}"))?;
            let local = listener.local_addr().map_err(|e| format!("{address}: {e}"))?;
            // Pingora adopts it into tokio, which needs a non-blocking socket.
            listener.set_nonblocking(true).map_err(|e| format!("{address}: {e}"))?;
            log::info!("bound {what} {address} at {local}");
            // Ownership passes to Pingora, which adopts the socket from its table.
            let fd = listener.into_raw_fd();
            bound
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(address.to_string(), (fd, local));
        }
        Ok(())
    }

    /// The address a configured address was bound at (its real port when it said 0).
    pub fn local_addr(&self, address: &str) -> Option<SocketAddr> {
        self.0.lock().ok()?.get(address).map(|(_, a)| *a)
    }

    /// Put this service's sockets in Pingora's table, unless an upgrade already did.
    fn hand_to(&self, fds: &ListenFds, addresses: &[String]) {
        let mut table = fds.lock();
        let mine = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for a in addresses {
            if let (None, Some((fd, _))) = (table.get(a), mine.get(a)) {
                table.add(a.clone(), *fd);
            }
        }
    }
}

/// A listening service whose sockets Portico bound, and whose state `/healthz` reports.
pub struct ListenerService<A> {
    inner: Option<Listening<A>>,
    name: String,
    addresses: Vec<String>,
    shared: Arc<Shared>,
    bound: Bound,
}

impl<A> ListenerService<A> {
    pub fn new(inner: Listening<A>, addresses: Vec<String>, shared: Arc<Shared>, bound: Bound) -> Self
    where
        A: pingora::apps::ServerApp + Send + Sync + 'static,
    {
        ListenerService {
            name: ServiceTrait::name(&inner).to_string(),
            inner: Some(inner),
            addresses,
            shared,
            bound,
        }
    }
}

#[async_trait]
impl<A> ServiceWithDependents for ListenerService<A>
where
    A: pingora::apps::ServerApp + Send + Sync + 'static,
{
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        ready_notifier.notify_ready();
        let Some(mut inner) = self.inner.take() else { return };
        if let Some(fds) = &fds {
            self.bound.hand_to(fds, &self.addresses);
        }
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
                "listener(s) {} stopped: the service failed (a certificate unreadable?)",
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
