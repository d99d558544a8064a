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
//!
//! Before the handshake the first byte is peeked: a TLS connection opens with a handshake
//! record (0x16). A letter instead is a plain HTTP request sent to the TLS port; like nginx
//! ("400 The plain HTTP request was sent to HTTPS port"), it gets an HTTP/1.1 400 JSON error
//! with a trace id, logged, instead of a TLS alert the client cannot read.

use super::stream::EdgeStream;
use crate::plugin::Reply;
use crate::shared::Shared;
use crate::tls::ServerTls;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsStream;
use pingora::{Error, ErrorType};
use std::net::SocketAddr;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The TLS handshake of a connection on a TLS listener, within `deadline` (`Err(())`: the
/// deadline passed). A connection that opens with a letter instead of a TLS record is a plain
/// HTTP request: it is answered (400) and closed, and counts as a failed handshake.
pub(super) async fn handshake(
    acceptor: &Acceptor,
    mut tcp: L4Stream,
    deadline: Instant,
    shared: &Shared,
) -> Result<pingora::Result<TlsStream<L4Stream>>, ()> {
    let since = Instant::now();
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.read_exact(&mut first)).await {
        Err(_) => return Err(()),
        Ok(Err(e)) => {
            return Ok(Err(Error::because(
                ErrorType::ConnectionClosed,
                "before the TLS handshake",
                e,
            )))
        }
        Ok(Ok(_)) => tcp.rewind(&first),
    }
    if first[0] != TLS_HANDSHAKE_RECORD && first[0].is_ascii_alphabetic() {
        refuse_plain_http(tcp, shared, since, deadline).await;
        return Ok(Error::e_explain(
            ErrorType::TLSHandshakeFailure,
            "a plain HTTP request on a TLS port",
        ));
    }
    tokio::time::timeout_at(deadline, acceptor.tls_handshake(tcp))
        .await
        .map_err(|_| ())
}

/// Answer a plain HTTP request on a TLS port: read its head (within `deadline`, for the log and
/// the trace id), then 400 `bad_request` and close.
async fn refuse_plain_http(tcp: L4Stream, shared: &Shared, since: Instant, deadline: Instant) {
    let mut conn = EdgeStream::new(Box::new(tcp));
    let head_end = |b: &[u8]| b.windows(4).any(|w| w == b"\r\n\r\n") || b.len() >= 16 << 10;
    let _ = conn.fill_until(deadline, head_end).await;
    let reply = Reply::error(
        400,
        "bad_request",
        "a plain HTTP request was sent to a TLS port: use https://",
    );
    super::refuse::refuse(&mut conn, reply, &shared.snapshot(), shared, since).await;
}

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
