//! TLS for tests, on rustls (the same as Portico's): clients that trust a test CA (and may
//! present a client certificate), a client that accepts any certificate (to look at which one
//! was served), server configs for test upstreams, and one HTTPS exchange over a blocking
//! socket.

use super::pki::{Leaf, TestCa};
use super::{Request, Response};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// A blocking TLS connection.
pub type TlsConn = rustls::StreamOwned<ClientConnection, TcpStream>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    crate::tls::certs::provider()
}

fn chain(leaf: &Leaf, ca: &TestCa) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(leaf.chain_pem(ca).as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    (chain, key)
}

fn alpn_list(alpn: &[&str]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// A client that trusts `ca`, offers `alpn`, and presents `cert` when given. Its TLS session
/// cache is the config's: connections made with the same config may resume.
pub fn client(ca: &TestCa, cert: Option<(&Leaf, &TestCa)>, alpn: &[&str]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der())).expect("CA");
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match cert {
        None => builder.with_no_client_auth(),
        Some((leaf, issuer)) => {
            let (chain, key) = chain(leaf, issuer);
            builder.with_client_auth_cert(chain, key).expect("client cert")
        }
    };
    config.alpn_protocols = alpn_list(alpn);
    Arc::new(config)
}

/// A client that accepts any server certificate: to see which one a server chooses.
pub fn client_any(alpn: &[&str]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert))
        .with_no_client_auth();
    config.alpn_protocols = alpn_list(alpn);
    Arc::new(config)
}

/// A server config with a certificate for `names` from `ca`; with `client_ca`, a client
/// certificate from it is required. `alpn`: what it agrees to (`["h2"]` for gRPC).
pub fn server(ca: &TestCa, names: &[&str], client_ca: Option<&TestCa>, alpn: &[&str]) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(c.der())).expect("client CA");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let (chain, key) = chain(&ca.server(names), ca);
    let mut config = builder.with_single_cert(chain, key).expect("server cert");
    config.alpn_protocols = alpn_list(alpn);
    Arc::new(config)
}

/// Connect to `addr` and finish the handshake. `name` is the server name checked and sent as
/// SNI; an IP address (`127.0.0.1`) sends no SNI.
pub fn connect(addr: &str, name: &str, config: Arc<ClientConfig>) -> std::io::Result<TlsConn> {
    let sock = super::connect(addr, None)?;
    sock.set_read_timeout(Some(Duration::from_secs(15)))?;
    let name = ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    let conn = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// The DNS names of the certificate the server presented.
pub fn served_names(tls: &TlsConn) -> Vec<String> {
    let Some(leaf) = tls.conn.peer_certificates().and_then(|c| c.first()) else {
        return Vec::new();
    };
    crate::tls::CertAndKey::dns_names_of(leaf.as_ref())
}

/// The protocol ALPN chose (`h2`, `http/1.1`), if any.
pub fn alpn(tls: &TlsConn) -> Option<String> {
    tls.conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).to_string())
}

/// One HTTP/1.1 request on a TLS connection (`Connection: close`), and its response.
pub fn exchange(mut tls: TlsConn, host: &str, req: &Request<'_>) -> std::io::Result<Response> {
    tls.write_all(&req.to_bytes(host))?;
    tls.flush()?;
    super::read_response(&mut tls, req.method == "HEAD")
}

/// Connect, send one request, read its response.
pub fn send(addr: &str, name: &str, config: Arc<ClientConfig>, req: &Request<'_>) -> std::io::Result<Response> {
    let tls = connect(addr, name, config)?;
    exchange(tls, name, req)
}

/// A certificate verifier that accepts any server certificate (signatures are still checked),
/// to look at which certificate a server chose.
#[derive(Debug)]
pub struct AnyServerCert;

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
