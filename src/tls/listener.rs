//! A TLS listener's state: its certificates and its client-CA policy, each behind a swap, and
//! the Pingora `TlsSettings` built over them.
//!
//! Pingora builds a listener's rustls `ServerConfig` once, when the service starts, so what a
//! reload may change must live inside it: the listener is built with a [`CertResolver`] and a
//! [`ClientAuth`] (never with certificate paths), and a reload replaces what they hold.

use crate::config::raw::ListenerTls;
use crate::config::ConfigError;
use crate::tls::client_auth::{ClientAuth, ClientCa};
use crate::tls::identity::{has_verified_client_cert, IdentityCallbacks};
use crate::tls::resolver::{CertResolver, CertTable};
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::tls::SslDigest;
use std::path::Path;
use std::sync::Arc;

/// A `listeners[N].tls` block, compiled: loaded and checked, nothing swapped yet.
#[derive(Debug, Clone)]
pub struct ServerTlsConfig {
    pub certs: CertTable,
    pub client_ca: ClientCa,
}

impl ServerTlsConfig {
    /// Paths are relative to `base_dir`; errors are located relative to the `tls` block
    /// (`cert`, `sni[0].key`, `client_ca`) for the caller to prefix with `listeners[N].tls`.
    pub fn load(base_dir: &Path, tls: &ListenerTls) -> Result<ServerTlsConfig, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let certs = CertTable::load(base_dir, &tls.cert, &tls.key, &tls.sni)
            .map_err(|e| errs.extend(e))
            .ok();
        let client_ca = match &tls.client_ca {
            None if tls.require_client_cert => {
                errs.push(ConfigError::new(
                    "require_client_cert",
                    "needs 'client_ca' (the CA that signs the client certificates)",
                ));
                None
            }
            None => Some(ClientCa::disabled()),
            Some(path) => ClientCa::load_config(base_dir, path, tls.require_client_cert)
                .map_err(|e| errs.push(ConfigError::new("client_ca", e)))
                .ok(),
        };
        match (certs, client_ca) {
            (Some(certs), Some(client_ca)) if errs.is_empty() => Ok(ServerTlsConfig { certs, client_ca }),
            _ => Err(errs),
        }
    }
}

/// What a running TLS listener holds; shared by the listener (through Pingora) and the reload.
#[derive(Debug, Clone)]
pub struct ServerTls {
    resolver: Arc<CertResolver>,
    client_auth: Arc<ClientAuth>,
}

impl ServerTls {
    pub fn new(config: ServerTlsConfig) -> ServerTls {
        ServerTls {
            resolver: Arc::new(CertResolver::new(config.certs)),
            client_auth: Arc::new(ClientAuth::new(config.client_ca)),
        }
    }

    /// A reload: handshakes that start from now on use `config`; connections already open
    /// keep what they negotiated.
    pub fn apply(&self, config: ServerTlsConfig) {
        self.resolver.replace(config.certs);
        self.client_auth.replace(config.client_ca);
    }

    pub fn resolver(&self) -> &Arc<CertResolver> {
        &self.resolver
    }

    pub fn client_auth(&self) -> &Arc<ClientAuth> {
        &self.client_auth
    }

    /// Whether a connection may go on, given its TLS digest: with `require_client_cert`, only
    /// when the client's certificate is accepted by the current policy. The handshake already
    /// refuses a client without one — except a resumed TLS session, which skips the verifier;
    /// so the edge calls this on each new TLS connection and closes it on `false`.
    pub fn admits(&self, digest: Option<&SslDigest>) -> bool {
        !self.client_auth.current().is_required() || digest.is_some_and(has_verified_client_cert)
    }

    /// The settings for `Service::add_tls_with_settings`: certificates from the resolver, client
    /// certificates through the verifier (always installed, so a reload can also switch mTLS on
    /// or off), the client's identity into `SslDigest.extension`, and ALPN `h2, http/1.1` when
    /// `http2` (without it Pingora offers no ALPN and speaks HTTP/1.1 only).
    pub fn tls_settings(&self, http2: bool) -> pingora::Result<TlsSettings> {
        let callbacks = IdentityCallbacks::new(self.client_auth.clone());
        let mut settings = TlsSettings::with_callbacks(Box::new(callbacks))?;
        settings.set_cert_resolver(self.resolver.clone());
        settings.set_client_cert_verifier(self.client_auth.clone());
        if http2 {
            settings.enable_h2();
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::SniCert;
    use crate::testing::TempDir;
    use crate::tls::identity::{has_verified_client_cert, identity_of};
    use crate::tls::test_handshake::client_config;
    use crate::tls::test_pki::TestCa;
    use pingora::protocols::ALPN;
    use pingora::tls::TlsConnector;
    use rustls::pki_types::ServerName;

    struct Files {
        dir: TempDir,
        ca: TestCa,
    }

    fn files() -> Files {
        let ca = TestCa::new("Listener CA");
        let dir = TempDir::new("tls-listener");
        let server = ca.server(&["gw.test"]);
        let api = ca.server(&["api.example.com"]);
        dir.write("server.crt", &server.chain_pem(&ca));
        dir.write("server.key", &server.key_pem);
        dir.write("api.crt", &api.cert_pem);
        dir.write("api.key", &api.key_pem);
        dir.write("ca.crt", &ca.cert_pem());
        Files { dir, ca }
    }

    fn block(client_ca: Option<&str>, require: bool) -> ListenerTls {
        ListenerTls {
            cert: "server.crt".into(),
            key: "server.key".into(),
            sni: vec![SniCert {
                hosts: vec!["api.example.com".into()],
                cert: "api.crt".into(),
                key: "api.key".into(),
            }],
            client_ca: client_ca.map(str::to_string),
            require_client_cert: require,
        }
    }

    /// Pingora's own acceptor, built from `tls_settings`, over an in-memory stream: the
    /// handshake_complete_callback runs as on a real listener.
    #[tokio::test]
    async fn pingora_acceptor_serves_by_sni_and_records_the_identity() {
        let f = files();
        let cfg = ServerTlsConfig::load(f.dir.path(), &block(Some("ca.crt"), true)).unwrap();
        let state = ServerTls::new(cfg);
        let acceptor = state.tls_settings(true).unwrap().build();

        let leaf = f.ca.client(Some("orders"), &["spiffe://mesh/orders"]);
        let (c_io, s_io) = tokio::io::duplex(64 * 1024);
        let client = async {
            let mut config = (*client_config(Some((&leaf, &f.ca)))).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let name = ServerName::try_from("api.example.com").unwrap();
            TlsConnector::from(Arc::new(config)).connect(name, c_io).await
        };
        let (server, client) = tokio::join!(acceptor.tls_handshake(s_io), client);
        let client = client.unwrap();
        let served = client.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        assert_eq!(crate::tls::test_handshake::dns_names(&served), ["api.example.com"]);
        let server = server.unwrap();
        use pingora::protocols::Ssl;
        assert_eq!(server.selected_alpn_proto(), Some(ALPN::H2));
        let digest = server.ssl_digest().unwrap();
        let id = identity_of(&digest).unwrap();
        assert_eq!(
            (id.trust_domain.as_deref(), id.service.as_str()),
            (Some("mesh"), "orders")
        );
    }

    #[tokio::test]
    async fn an_anonymous_client_has_no_identity() {
        let f = files();
        let cfg = ServerTlsConfig::load(f.dir.path(), &block(Some("ca.crt"), false)).unwrap();
        let acceptor = ServerTls::new(cfg).tls_settings(false).unwrap().build();
        let (c_io, s_io) = tokio::io::duplex(64 * 1024);
        let client = TlsConnector::from(client_config(None)).connect(ServerName::try_from("gw.test").unwrap(), c_io);
        let (server, client) = tokio::join!(acceptor.tls_handshake(s_io), client);
        assert!(client.is_ok());
        assert!(identity_of(&server.unwrap().ssl_digest().unwrap()).is_none());
    }

    #[test]
    fn load_checks_the_whole_block() {
        let f = files();
        let errs = ServerTlsConfig::load(f.dir.path(), &block(None, true)).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "require_client_cert: needs 'client_ca' (the CA that signs the client certificates)"
        );
        let mut b = block(Some("nope.crt"), false);
        b.key = "api.key".into();
        let shown: Vec<String> = ServerTlsConfig::load(f.dir.path(), &b)
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            shown,
            [
                "key: the private key in api.key does not match the certificate in server.crt",
                "client_ca: cannot read nope.crt: No such file or directory",
            ]
        );
        let ok = ServerTlsConfig::load(f.dir.path(), &block(None, false)).unwrap();
        assert!(!ok.client_ca.is_enabled());
    }

    /// One handshake through Pingora's acceptor with a client that reads a byte, so that TLS 1.3
    /// session tickets reach it and its next connection (same config) resumes.
    async fn pingora_session(
        acceptor: &pingora::listeners::tls::Acceptor,
        client: &Arc<rustls::ClientConfig>,
    ) -> Result<Arc<SslDigest>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (c_io, s_io) = tokio::io::duplex(64 * 1024);
        let client = async {
            let name = ServerName::try_from("gw.test").unwrap();
            let mut s = TlsConnector::from(client.clone()).connect(name, c_io).await?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(s)
        };
        let server = async {
            let mut s = acceptor.tls_handshake(s_io).await.map_err(|e| e.to_string())?;
            s.write_all(b"x").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        };
        let (server, _client) = tokio::join!(server, client);
        Ok(server?.ssl_digest().expect("digest"))
    }

    #[tokio::test]
    async fn a_resumed_session_is_checked_against_the_current_ca() {
        let f = files();
        let state = ServerTls::new(ServerTlsConfig::load(f.dir.path(), &block(Some("ca.crt"), true)).unwrap());
        let acceptor = state.tls_settings(false).unwrap().build();
        let leaf = f.ca.client(Some("orders"), &[]);
        let client = client_config(Some((&leaf, &f.ca)));

        let first = pingora_session(&acceptor, &client).await.unwrap();
        assert_eq!(identity_of(&first).unwrap().service, "orders");
        assert!(state.admits(Some(&first)));
        // Same policy: the resumed session keeps its identity.
        let again = pingora_session(&acceptor, &client).await.unwrap();
        assert_eq!(identity_of(&again).unwrap().service, "orders");

        // A new CA that did not sign the client's certificate. rustls resumes the session
        // without asking the verifier, so the handshake succeeds — but the identity is gone and
        // the edge is told to close the connection.
        let next = TestCa::new("Next CA");
        state
            .client_auth()
            .replace(ClientCa::from_pem(next.cert_pem().as_bytes(), "next.crt", true).unwrap());
        let resumed = pingora_session(&acceptor, &client).await.unwrap();
        assert!(identity_of(&resumed).is_none());
        assert!(!has_verified_client_cert(&resumed));
        assert!(!state.admits(Some(&resumed)));
        assert!(!state.admits(None));
    }

    #[test]
    fn an_optional_policy_admits_anyone() {
        let f = files();
        let state = ServerTls::new(ServerTlsConfig::load(f.dir.path(), &block(Some("ca.crt"), false)).unwrap());
        assert!(state.admits(None));
    }
}
