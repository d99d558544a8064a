//! TLS to an upstream: an `upstreams.NAME.tls` block turned, once at load, into what Pingora's
//! rustls connector reads from an `HttpPeer`.
//!
//! Two Pingora behaviours shape the checks here:
//! - with rustls an empty `peer.sni` turns off SNI *and all certificate verification*, so
//!   `verify: true` (the default) needs `sni`;
//! - Pingora parses the CA certificates and the client key again on every connect and panics
//!   (`expect`/`unwrap`) on one it cannot parse, so both are parsed and checked here first.

use crate::config::files::read_config_file;
use crate::config::raw::{Protocol, UpstreamTls};
use crate::config::ConfigError;
use crate::tls::certs::{parse_cert_chain, CertAndKey, Part};
use pingora::protocols::tls::CaType;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::{HttpPeer, Scheme};
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

/// An upstream's TLS, checked and ready to apply to each of its peers.
#[derive(Clone)]
pub struct UpstreamTlsSettings {
    /// Empty only with `verify: false` and no `sni`: then no SNI is sent (the peer gets the
    /// endpoint's IP address as its name, which rustls never sends as SNI).
    sni: String,
    verify: bool,
    /// `None`: the connector's roots (`ServerConf.ca_file`, else the system's).
    ca: Option<Arc<CaType>>,
    client_cert_key: Option<Arc<CertKey>>,
    alpn: ALPN,
    h2: bool,
    /// Mixed into `peer.group_key`; see [`UpstreamTlsSettings::apply_to_peer`].
    reuse_key: u64,
}

impl fmt::Debug for UpstreamTlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTlsSettings")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("ca_certs", &self.ca.as_ref().map(|c| c.len()))
            .field("client_cert", &self.client_cert_key.is_some())
            .field("alpn", &self.alpn)
            .finish()
    }
}

impl UpstreamTlsSettings {
    /// From an upstream's `tls` block and `protocol`. Paths are relative to `base_dir`; errors
    /// are located relative to the upstream (`tls.sni`, `tls.client_key`, `protocol`) for the
    /// caller to prefix with `upstreams.NAME`.
    pub fn load(base_dir: &Path, tls: &UpstreamTls, protocol: Protocol) -> Result<Self, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let sni = tls.sni.clone().unwrap_or_default();
        if sni.is_empty() && tls.verify {
            errs.push(ConfigError::new(
                "tls.sni",
                "required when 'verify' is true: without a server name the certificate cannot be checked",
            ));
        } else if !sni.is_empty() && ServerName::try_from(sni.as_str()).is_err() {
            errs.push(ConfigError::new(
                "tls.sni",
                format!("'{sni}' is not a valid server name"),
            ));
        }
        let (alpn, h2) = match protocol {
            Protocol::Http1 => (ALPN::H1, false),
            Protocol::H2 => (ALPN::H2, true),
            Protocol::H2c => {
                errs.push(ConfigError::new(
                    "protocol",
                    "'h2c' is HTTP/2 without TLS; with a 'tls' block use 'h2'",
                ));
                (ALPN::H2, true)
            }
        };
        let ca = match &tls.ca {
            None => None,
            Some(path) => match load_ca(base_dir, path) {
                Ok(ca) => Some(ca),
                Err(e) => {
                    errs.push(ConfigError::new("tls.ca", e));
                    None
                }
            },
        };
        let client_cert_key = match (&tls.client_cert, &tls.client_key) {
            (None, None) => None,
            (Some(_), None) => {
                errs.push(ConfigError::new("tls.client_key", "required with 'client_cert'"));
                None
            }
            (None, Some(_)) => {
                errs.push(ConfigError::new("tls.client_cert", "required with 'client_key'"));
                None
            }
            (Some(cert), Some(key)) => match CertAndKey::load_config(base_dir, cert, key) {
                Ok(ck) => Some(ck),
                Err(e) => {
                    let at = match e.part {
                        Part::Cert => "tls.client_cert",
                        Part::Key => "tls.client_key",
                    };
                    errs.push(ConfigError::new(at, e.message));
                    None
                }
            },
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let reuse_key = reuse_key(ca.as_deref(), client_cert_key.as_ref(), &alpn);
        Ok(UpstreamTlsSettings {
            sni,
            verify: tls.verify,
            ca,
            client_cert_key: client_cert_key.map(|ck| Arc::new(ck.to_pingora())),
            alpn,
            h2,
            reuse_key,
        })
    }

    /// Makes `peer` a TLS peer with these settings: scheme, SNI, verification, CA, client
    /// certificate, ALPN (`h2` only for `protocol: h2`, with up to 100 streams per connection).
    ///
    /// Pingora's connection pool tells peers apart by address, SNI, client-certificate serial
    /// and verify flags — not by CA or ALPN. Two upstreams on one address with different CAs
    /// would share pooled connections, each checked against only one of the CAs; so these
    /// settings are also mixed into `peer.group_key`, which the pool does compare.
    pub fn apply_to_peer(&self, peer: &mut HttpPeer) {
        peer.scheme = Scheme::HTTPS;
        peer.sni = if self.sni.is_empty() {
            // `verify: false` without a name. Pingora's rustls connector cannot parse an empty
            // server name (the connect fails); the endpoint's IP address parses, and rustls
            // sends no SNI for an IP address. Verification is off either way (`verify_cert`).
            peer._address.as_inet().map(|a| a.ip().to_string()).unwrap_or_default()
        } else {
            self.sni.clone()
        };
        peer.client_cert_key = self.client_cert_key.clone();
        peer.group_key ^= self.reuse_key;
        let o = &mut peer.options;
        o.verify_cert = self.verify;
        o.verify_hostname = self.verify;
        o.ca = self.ca.clone();
        o.alpn = self.alpn.clone();
        if self.h2 {
            o.max_h2_streams = o.max_h2_streams.max(100);
        }
    }
}

/// A PEM bundle as Pingora's per-peer CA list. Each certificate must also be a usable rustls
/// trust anchor: Pingora adds them to a root store on every connect and fails that connect
/// (not the load) if one is not.
fn load_ca(base_dir: &Path, path: &str) -> Result<Arc<CaType>, String> {
    let pem = read_config_file(base_dir, path)?;
    let certs = parse_cert_chain(&pem, path)?;
    let mut check = RootCertStore::empty();
    let mut list = Vec::with_capacity(certs.len());
    for (i, c) in certs.into_iter().enumerate() {
        check
            .add(c.clone())
            .map_err(|e| format!("{path}: certificate {} cannot be a trust anchor ({e})", i + 1))?;
        // parse_cert_chain checked that this parses, so Pingora's `expect` inside cannot fire.
        list.push(WrappedX509::new(c.to_vec(), parse_x509));
    }
    Ok(Arc::from(list))
}

fn reuse_key(ca: Option<&CaType>, client: Option<&CertAndKey>, alpn: &ALPN) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    "portico-upstream-tls".hash(&mut h);
    for c in ca.into_iter().flatten() {
        c.borrow_raw_cert().hash(&mut h);
    }
    for c in client.map(|ck| ck.chain()).unwrap_or_default() {
        c.as_ref().hash(&mut h);
    }
    alpn.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use crate::tls::test_pki::TestCa;

    fn tls(sni: Option<&str>, verify: bool) -> UpstreamTls {
        UpstreamTls {
            sni: sni.map(str::to_string),
            ca: None,
            verify,
            client_cert: None,
            client_key: None,
        }
    }

    fn errors(r: Result<UpstreamTlsSettings, Vec<ConfigError>>) -> Vec<String> {
        r.unwrap_err().iter().map(|e| e.to_string()).collect()
    }

    fn peer() -> HttpPeer {
        HttpPeer::new("127.0.0.1:8443", false, String::new())
    }

    #[test]
    fn verify_needs_sni() {
        let e = errors(UpstreamTlsSettings::load(
            Path::new("."),
            &tls(None, true),
            Protocol::Http1,
        ));
        assert_eq!(
            e,
            ["tls.sni: required when 'verify' is true: without a server name the certificate cannot be checked"]
        );
        let e = errors(UpstreamTlsSettings::load(
            Path::new("."),
            &tls(Some(""), true),
            Protocol::Http1,
        ));
        assert_eq!(e.len(), 1);
        let e = errors(UpstreamTlsSettings::load(
            Path::new("."),
            &tls(Some("bad name"), true),
            Protocol::Http1,
        ));
        assert_eq!(e, ["tls.sni: 'bad name' is not a valid server name"]);
        // Without verification no SNI is fine: none is sent.
        let s = UpstreamTlsSettings::load(Path::new("."), &tls(None, false), Protocol::Http1).unwrap();
        let mut p = peer();
        s.apply_to_peer(&mut p);
        assert!(p.is_tls() && !p.options.verify_cert && !p.options.verify_hostname);
        assert_eq!(p.sni, "127.0.0.1", "an IP address: rustls sends no SNI for it");
    }

    #[test]
    fn cert_and_key_come_together() {
        let mut t = tls(Some("u.internal"), true);
        t.client_cert = Some("gw.crt".into());
        let e = errors(UpstreamTlsSettings::load(Path::new("."), &t, Protocol::Http1));
        assert_eq!(e, ["tls.client_key: required with 'client_cert'"]);
        let mut t = tls(Some("u.internal"), true);
        t.client_key = Some("gw.key".into());
        let e = errors(UpstreamTlsSettings::load(Path::new("."), &t, Protocol::Http1));
        assert_eq!(e, ["tls.client_cert: required with 'client_key'"]);
    }

    #[test]
    fn h2c_with_tls_is_refused() {
        let e = errors(UpstreamTlsSettings::load(
            Path::new("."),
            &tls(Some("u.internal"), true),
            Protocol::H2c,
        ));
        assert_eq!(
            e,
            ["protocol: 'h2c' is HTTP/2 without TLS; with a 'tls' block use 'h2'"]
        );
    }

    #[test]
    fn applies_everything_to_the_peer() {
        let ca = TestCa::new("Upstream CA");
        let gw = ca.client(Some("gateway"), &[]);
        let dir = TempDir::new("tls-upstream");
        dir.write("ca.crt", &ca.cert_pem());
        dir.write("gw.crt", &gw.cert_pem);
        dir.write("gw.key", &gw.key_pem);
        let t = UpstreamTls {
            sni: Some("users.internal".into()),
            ca: Some("ca.crt".into()),
            verify: true,
            client_cert: Some("gw.crt".into()),
            client_key: Some("gw.key".into()),
        };
        let s = UpstreamTlsSettings::load(dir.path(), &t, Protocol::H2).unwrap();
        let mut p = peer();
        s.apply_to_peer(&mut p);
        assert!(p.is_tls());
        assert_eq!(p.sni, "users.internal");
        assert!(p.options.verify_cert && p.options.verify_hostname);
        assert_eq!(p.options.ca.as_ref().map(|c| c.len()), Some(1));
        assert_eq!(p.options.alpn, ALPN::H2);
        assert_eq!(p.options.max_h2_streams, 100);
        let ck = p.client_cert_key.as_ref().unwrap();
        assert_eq!(ck.leaf().borrow_raw_cert(), &gw.der());
        assert_ne!(p.group_key, 0);

        // Another CA on the same address: a different pool group.
        let other = TestCa::new("Other CA");
        dir.write("other.crt", &other.cert_pem());
        let t2 = UpstreamTls {
            ca: Some("other.crt".into()),
            ..t.clone()
        };
        let mut p2 = peer();
        UpstreamTlsSettings::load(dir.path(), &t2, Protocol::H2)
            .unwrap()
            .apply_to_peer(&mut p2);
        assert_ne!(p.group_key, p2.group_key);

        let s1 = UpstreamTlsSettings::load(dir.path(), &UpstreamTls { ca: None, ..t }, Protocol::Http1).unwrap();
        let mut p3 = peer();
        s1.apply_to_peer(&mut p3);
        assert_eq!(p3.options.alpn, ALPN::H1);
        assert!(p3.options.ca.is_none());
    }

    /// A TLS upstream on loopback that requires a client certificate from `ca` and serves one
    /// for `users.internal`; answers each connection with the identity it saw (or `anonymous`).
    async fn upstream(ca: &TestCa) -> std::net::SocketAddr {
        use crate::tls::{ClientCa, ServerTls, ServerTlsConfig};
        use tokio::io::AsyncWriteExt;
        let leaf = ca.server(&["users.internal"]);
        let ck = CertAndKey::from_pem(leaf.cert_pem.as_bytes(), "u.crt", leaf.key_pem.as_bytes(), "u.key").unwrap();
        let state = ServerTls::new(ServerTlsConfig {
            certs: crate::tls::CertTable::new(&ck),
            client_ca: ClientCa::from_pem(ca.cert_pem().as_bytes(), "ca.crt", true).unwrap(),
        });
        let acceptor = Arc::new(state.tls_settings(false).unwrap().build());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let stream: pingora::protocols::l4::stream::Stream = tcp.into();
                    if let Ok(mut tls) = acceptor.tls_handshake(stream).await {
                        let who = tls
                            .ssl_digest()
                            .and_then(|d| crate::tls::identity_of(&d))
                            .map(|i| i.service)
                            .unwrap_or_else(|| "anonymous".into());
                        let _ = tls.write_all(who.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    /// Connects through Pingora's own connector with `tls` applied to the peer; what the
    /// upstream said, or the connect error.
    async fn call(addr: std::net::SocketAddr, dir: &TempDir, tls: &UpstreamTls) -> Result<String, String> {
        use tokio::io::AsyncReadExt;
        let settings = UpstreamTlsSettings::load(dir.path(), tls, Protocol::Http1).map_err(|e| format!("{e:?}"))?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        settings.apply_to_peer(&mut peer);
        let connector = pingora::connectors::TransportConnector::new(None);
        let mut stream = connector.new_stream(&peer).await.map_err(|e| e.to_string())?;
        let mut said = String::new();
        stream.read_to_string(&mut said).await.map_err(|e| e.to_string())?;
        Ok(said)
    }

    #[tokio::test]
    async fn pingora_connects_with_the_ca_the_sni_and_the_client_certificate() {
        let ca = TestCa::new("Upstream CA");
        let other = TestCa::new("Other CA");
        let gw = ca.client(Some("gateway"), &[]);
        let dir = TempDir::new("tls-upstream");
        dir.write("ca.crt", &ca.cert_pem());
        dir.write("other.crt", &other.cert_pem());
        dir.write("gw.crt", &gw.cert_pem);
        dir.write("gw.key", &gw.key_pem);
        let addr = upstream(&ca).await;
        let good = UpstreamTls {
            sni: Some("users.internal".into()),
            ca: Some("ca.crt".into()),
            verify: true,
            client_cert: Some("gw.crt".into()),
            client_key: Some("gw.key".into()),
        };
        assert_eq!(call(addr, &dir, &good).await.unwrap(), "gateway");

        let wrong_ca = UpstreamTls {
            ca: Some("other.crt".into()),
            ..good.clone()
        };
        let e = call(addr, &dir, &wrong_ca).await.unwrap_err();
        assert!(
            e.contains("UnknownIssuer"),
            "the upstream's certificate is not from that CA: {e}"
        );
        let wrong_name = UpstreamTls {
            sni: Some("billing.internal".into()),
            ..good.clone()
        };
        let e = call(addr, &dir, &wrong_name).await.unwrap_err();
        assert!(
            e.contains("not valid for name"),
            "the certificate does not name that SNI: {e}"
        );
        let unverified = UpstreamTls {
            ca: Some("other.crt".into()),
            verify: false,
            ..wrong_name
        };
        assert_eq!(call(addr, &dir, &unverified).await.unwrap(), "gateway");
        let anonymous = UpstreamTls {
            client_cert: None,
            client_key: None,
            ..good
        };
        let e = call(addr, &dir, &anonymous).await.unwrap_err();
        assert!(
            e.contains("CertificateRequired"),
            "the upstream wants a client certificate: {e}"
        );
    }

    #[test]
    fn file_errors_are_located() {
        let dir = TempDir::new("tls-upstream");
        let ca = TestCa::new("CA");
        let a = ca.client(Some("a"), &[]);
        let b = ca.client(Some("b"), &[]);
        dir.write("a.crt", &a.cert_pem);
        dir.write("b.key", &b.key_pem);
        let t = UpstreamTls {
            sni: Some("u.internal".into()),
            ca: Some("missing.crt".into()),
            verify: true,
            client_cert: Some("a.crt".into()),
            client_key: Some("b.key".into()),
        };
        let e = errors(UpstreamTlsSettings::load(dir.path(), &t, Protocol::Http1));
        assert_eq!(
            e,
            [
                "tls.ca: cannot read missing.crt: No such file or directory",
                "tls.client_key: the private key in b.key does not match the certificate in a.crt",
            ]
        );
    }
}
