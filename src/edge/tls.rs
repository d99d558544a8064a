//! TLS on the edge: the edge layer does the handshake itself.
//!
//! Pingora would do it in its accept loop, with a fixed 60 s timeout, before
//! [`super::EdgeApp`] sees the connection — so a client that opens TCP and never finishes
//! its handshake would hold a socket for a minute, outside every limit Portico keeps. So TLS
//! listeners are given to Pingora as plain TCP, and the edge layer counts the connection
//! against its per-address cap at accept, then runs Pingora's own rustls acceptor (built from
//! [`ServerTls::tls_settings`]) under `limits.header_timeout`. The `Stream` that comes out
//! is the one Pingora would have made: it carries the TLS digest (with the client's identity)
//! and the ALPN choice that the proxy reads.

use crate::tls::ServerTls;
use pingora::listeners::tls::Acceptor;
use std::net::SocketAddr;

/// One TLS listener: where it listens, its acceptor, and the state a reload updates.
pub struct TlsListener {
    /// The address it was bound at (its real port when the config said 0).
    pub at: SocketAddr,
    pub acceptor: Acceptor,
    pub state: ServerTls,
}

/// The TLS listeners one proxy service serves, found by the local address a connection
/// arrived on.
#[derive(Default)]
pub struct TlsListeners(pub Vec<TlsListener>);

impl TlsListeners {
    /// The listener a connection to `local` was accepted by: the same port, and the same IP
    /// unless the listener is bound to every address (`0.0.0.0`, `[::]`).
    pub fn find(&self, local: SocketAddr) -> Option<&TlsListener> {
        let same_ip = |at: &SocketAddr| {
            at.ip().is_unspecified() || crate::config::canonical_ip(at.ip()) == crate::config::canonical_ip(local.ip())
        };
        // An exact address wins over a wildcard one on the same port.
        self.0
            .iter()
            .filter(|l| l.at.port() == local.port() && same_ip(&l.at))
            .min_by_key(|l| l.at.ip().is_unspecified())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{CertAndKey, CertTable, ClientCa, ServerTlsConfig};

    fn listener(at: &str) -> TlsListener {
        let ca = crate::testing::pki::TestCa::new("CA");
        let leaf = ca.server(&["gw.test"]);
        let ck = CertAndKey::from_pem(leaf.cert_pem.as_bytes(), "c", leaf.key_pem.as_bytes(), "k").unwrap();
        let state = ServerTls::new(ServerTlsConfig {
            certs: CertTable::new(&ck),
            client_ca: ClientCa::disabled(),
        });
        TlsListener {
            at: at.parse().unwrap(),
            acceptor: state.tls_settings(false).unwrap().build(),
            state,
        }
    }

    #[test]
    fn finds_the_listener_by_port_and_address() {
        let ls = TlsListeners(vec![
            listener("0.0.0.0:8443"),
            listener("127.0.0.2:8443"),
            listener("127.0.0.1:9443"),
        ]);
        let at = |a: &str| ls.find(a.parse().unwrap()).map(|l| l.at.to_string());
        assert_eq!(at("127.0.0.2:8443").as_deref(), Some("127.0.0.2:8443"));
        assert_eq!(at("10.1.2.3:8443").as_deref(), Some("0.0.0.0:8443"));
        assert_eq!(at("127.0.0.1:9443").as_deref(), Some("127.0.0.1:9443"));
        assert_eq!(at("127.0.0.3:9443"), None);
        assert_eq!(at("[::ffff:127.0.0.1]:9443").as_deref(), Some("127.0.0.1:9443"));
        assert_eq!(at("127.0.0.1:80"), None);
    }
}
