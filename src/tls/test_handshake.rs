//! A real TLS handshake in memory (`tokio::io::duplex`) between a rustls server config built
//! from Portico's resolver and verifier and a rustls client, to see what each side got.

use crate::testing::tls::AnyServerCert;
use crate::tls::certs::provider;
use crate::tls::test_pki::{Leaf, TestCa};
use pingora::tls::{TlsAcceptor, TlsConnector};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, ServerConfig};
use std::sync::Arc;
use std::time::Duration;
use x509_parser::extensions::GeneralName;

/// What the server saw of a completed handshake.
#[derive(Debug)]
pub struct ServerSide {
    /// The client's leaf certificate, DER, when it sent one.
    pub client_cert: Option<Vec<u8>>,
    pub sni: Option<String>,
}

/// The two ends' results. In TLS 1.3 the client finishes before the server has checked the
/// client's certificate, so a refused client certificate shows on the server side.
pub struct Outcome {
    pub server: Result<ServerSide, String>,
    /// The DNS names of the certificate the server served.
    pub client: Result<Vec<String>, String>,
}

pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    Arc::new(builder.with_cert_resolver(resolver))
}

/// A client that accepts any server certificate (the tests look at which one was served) and,
/// if given one, presents `cert` (with the CA's certificate as its chain).
pub fn client_config(cert: Option<(&Leaf, &TestCa)>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert));
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((leaf, ca)) => {
            let chain = CertificateDer::pem_slice_iter(leaf.chain_pem(ca).as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("chain");
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client cert")
        }
    };
    Arc::new(config)
}

/// Runs one handshake; `sni: None` sends no server name.
pub async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>, sni: Option<&str>) -> Outcome {
    let (c_io, s_io) = tokio::io::duplex(64 * 1024);
    let client = match sni {
        Some(_) => client,
        None => {
            let mut c = (*client).clone();
            c.enable_sni = false;
            Arc::new(c)
        }
    };
    let name = ServerName::try_from(sni.unwrap_or("no-sni.invalid").to_string()).expect("server name");
    let server_fut = async move {
        let s = TlsAcceptor::from(server)
            .accept(s_io)
            .await
            .map_err(|e| e.to_string())?;
        let conn = s.get_ref().1;
        Ok::<_, String>((
            ServerSide {
                client_cert: conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()),
                sni: conn.server_name().map(str::to_string),
            },
            s,
        ))
    };
    let client_fut = async move {
        let s = TlsConnector::from(client)
            .connect(name, c_io)
            .await
            .map_err(|e| e.to_string())?;
        let served = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        Ok::<_, String>((served.map(|d| dns_names(&d)).unwrap_or_default(), s))
    };
    let both = async { tokio::join!(server_fut, client_fut) };
    let (server, client) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("handshake hung");
    // Both streams are dropped only now, so neither side saw the other hang up early.
    Outcome {
        server: server.map(|(side, _)| side),
        client: client.map(|(names, _)| names),
    }
}

pub fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}
