//! Turning upstream host names into addresses. Pingora's `HttpPeer::new` panics on a name that
//! does not resolve, so names are resolved by Portico — at load, then again in the background
//! every `resolve_every` (Docker and Kubernetes move services) — and peers only ever get
//! addresses. The resolver is a resource of the process, so tests can give their own.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;

/// Resolves `host` (a name, not an IP literal) for `port`. Blocking: call it off the request
/// path.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system's resolver (`getaddrinfo`: /etc/hosts, then DNS).
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// A resolver answering from a table the caller controls (tests); it counts its lookups.
#[derive(Debug, Default)]
pub struct MapResolver {
    table: Mutex<std::collections::HashMap<String, std::net::IpAddr>>,
    lookups: std::sync::atomic::AtomicUsize,
}

impl MapResolver {
    pub fn set(&self, host: &str, ip: std::net::IpAddr) {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_ascii_lowercase(), ip);
    }

    /// The name stops resolving.
    pub fn remove(&self, host: &str) {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&host.to_ascii_lowercase());
    }

    pub fn lookups(&self) -> usize {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Resolve for MapResolver {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let map = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&host.to_ascii_lowercase()) {
            Some(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such name")),
        }
    }
}
