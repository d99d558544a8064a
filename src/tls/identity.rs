//! Who a client is, from the certificate it proved in the TLS handshake: the URI SAN
//! `spiffe://DOMAIN/SERVICE` (a mesh identity), else the subject's CN.
//!
//! Pingora hands a listener's `handshake_complete_callback` the peer's certificate chain after
//! the handshake; what the callback returns is stored in the connection's `SslDigest.extension`,
//! where every request on the connection finds it ([`identity_of`]).
//!
//! The chain is checked again there, against the client-CA policy current at that moment:
//! a *resumed* TLS session (rustls keeps 256 sessions and sends TLS 1.3 tickets by default, and
//! Pingora offers no way to turn that off) skips the verifier and carries the chain from when
//! it was first verified — so after a CA change, or once the certificate expired, a client
//! holding a ticket would otherwise keep its old identity.

use crate::tls::client_auth::ClientAuth;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::{SslDigest, TlsRef};
use std::any::Any;
use std::sync::Arc;
use x509_parser::extensions::GeneralName;

/// A calling service, as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `spiffe://mesh/orders`, when the certificate carries one.
    pub spiffe: Option<String>,
    /// `mesh`, lower case, with `spiffe`.
    pub trust_domain: Option<String>,
    /// `orders`: the SPIFFE path, or the CN.
    pub service: String,
}

/// The longest CN taken as a service name.
const MAX_CN: usize = 256;

impl Identity {
    /// From a verified certificate (DER). The first `spiffe://` URI SAN decides when there is
    /// one — a malformed one gives no identity rather than falling back to the CN, which would
    /// let a certificate with a broken mesh identity pass as a plain name. Without a SPIFFE
    /// URI, the first CN is the service.
    pub fn from_cert_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let uris = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            // A SAN extension that does not parse (or appears twice) is no identity at all.
            Err(_) => return None,
        };
        if let Some(uri) = uris.iter().find(|u| has_spiffe_scheme(u)) {
            return Identity::from_spiffe(uri);
        }
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        valid_cn(cn).then(|| Identity {
            spiffe: None,
            trust_domain: None,
            service: cn.to_string(),
        })
    }

    /// `spiffe://DOMAIN/SERVICE` with exactly one path segment, as `allow_services` names
    /// services. By the SPIFFE ID standard the scheme is `spiffe` and the trust domain
    /// lowercase (§2, §2.1: "The host part of the authority MUST be lowercase"), as go-spiffe
    /// enforces: `SPIFFE://MESH/orders` is not a SPIFFE ID (and, being a `spiffe` URI, it never
    /// falls back to the CN). The path is case-sensitive.
    pub fn from_spiffe(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (domain, service) = rest.split_once('/')?;
        let domain_ok = !domain.is_empty()
            && domain.len() <= 255
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let service_ok = !service.is_empty()
            && service != "."
            && service != ".."
            && service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        (domain_ok && service_ok).then(|| Identity {
            spiffe: Some(format!("spiffe://{domain}/{service}")),
            trust_domain: Some(domain.to_string()),
            service: service.to_string(),
        })
    }

    /// The string the request state carries and `allow_services` parses: the SPIFFE ID when
    /// there is one, else the bare service name.
    pub fn principal(&self) -> &str {
        self.spiffe.as_deref().unwrap_or(&self.service)
    }
}

fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..9).is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
}

/// A CN usable as a service name: printable, no `/` or `:` (which would read as a SPIFFE ID
/// or a URL), no surrounding spaces.
fn valid_cn(cn: &str) -> bool {
    !cn.is_empty()
        && cn.len() <= MAX_CN
        && cn.trim() == cn
        && !cn.chars().any(|c| c.is_control() || c == '/' || c == ':')
}

/// What [`IdentityCallbacks`] stores in `SslDigest.extension`: present only when the client
/// showed a certificate that the client-CA policy accepts as the connection starts.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// `None`: a valid certificate that names no usable service (no SPIFFE ID, no usable CN).
    pub identity: Option<Identity>,
}

/// The identity a TLS connection's client proved.
pub fn identity_of(digest: &SslDigest) -> Option<Identity> {
    digest.extension.get::<ClientCert>()?.identity.clone()
}

/// Whether the client showed a certificate the current policy accepts (with or without an
/// identity in it). A listener with `require_client_cert` closes connections without one: see
/// `ServerTls::admits`.
pub fn has_verified_client_cert(digest: &SslDigest) -> bool {
    digest.extension.get::<ClientCert>().is_some()
}

/// The listener callbacks that put [`ClientCert`] into `SslDigest.extension`.
///
/// With rustls, Pingora calls `handshake_complete_callback` once the handshake succeeded, with a
/// `TlsRef` whose `peer_cert_chain_der()` is the client's chain (leaf first) — present only when
/// the listener asked for one. It is verified again here against `client_auth`'s current policy
/// (see the module's note on resumed sessions).
pub struct IdentityCallbacks {
    client_auth: Arc<ClientAuth>,
}

impl IdentityCallbacks {
    pub fn new(client_auth: Arc<ClientAuth>) -> IdentityCallbacks {
        IdentityCallbacks { client_auth }
    }
}

#[async_trait]
impl TlsAccept for IdentityCallbacks {
    async fn handshake_complete_callback(&self, tls: &TlsRef) -> Option<Arc<dyn Any + Send + Sync>> {
        let (leaf, intermediates) = tls.peer_cert_chain_der()?.split_first()?;
        if let Err(e) = self.client_auth.accepts(leaf, intermediates) {
            log::info!("TLS client certificate no longer accepted (resumed session?): {e}");
            return None;
        }
        Some(Arc::new(ClientCert {
            identity: Identity::from_cert_der(leaf),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_pki::TestCa;
    use rcgen::SanType;

    fn of(cn: Option<&str>, uris: &[&str]) -> Option<Identity> {
        let ca = TestCa::new("Mesh CA");
        Identity::from_cert_der(&ca.client(cn, uris).der())
    }

    #[test]
    fn a_spiffe_uri_names_the_service_and_its_domain() {
        let id = of(Some("ignored"), &["spiffe://mesh/orders"]).unwrap();
        assert_eq!(
            id,
            Identity {
                spiffe: Some("spiffe://mesh/orders".into()),
                trust_domain: Some("mesh".into()),
                service: "orders".into(),
            }
        );
        assert_eq!(id.principal(), "spiffe://mesh/orders");
    }

    #[test]
    fn the_first_spiffe_uri_wins_and_other_uris_are_skipped() {
        let id = of(
            None,
            &[
                "https://orders.example",
                "spiffe://mesh/orders",
                "spiffe://mesh/billing",
            ],
        )
        .unwrap();
        assert_eq!(id.service, "orders");
    }

    #[test]
    fn without_a_spiffe_uri_the_cn_is_the_service() {
        let id = of(Some("frontend"), &["https://frontend.example"]).unwrap();
        assert_eq!(
            id,
            Identity {
                spiffe: None,
                trust_domain: None,
                service: "frontend".into()
            }
        );
        assert_eq!(id.principal(), "frontend");
        // DNS SANs do not count either.
        let ca = TestCa::new("CA");
        let leaf = ca.client_with(Some("web"), vec![SanType::DnsName("web.mesh".try_into().unwrap())]);
        assert_eq!(Identity::from_cert_der(&leaf.der()).unwrap().service, "web");
    }

    #[test]
    fn malformed_gives_no_identity() {
        assert_eq!(of(None, &[]), None, "no SAN, no CN");
        assert_eq!(
            of(Some("frontend"), &["spiffe://mesh/a/b"]),
            None,
            "a broken SPIFFE ID never falls back"
        );
        assert_eq!(of(None, &["spiffe://mesh/"]), None);
        assert_eq!(of(None, &["spiffe:///orders"]), None);
        assert_eq!(of(None, &["spiffe://me:sh/orders"]), None);
        assert_eq!(of(None, &["spiffe://mesh/orders?x=1"]), None);
        assert_eq!(
            of(Some("spiffe://mesh/orders"), &[]),
            None,
            "a CN cannot pose as a SPIFFE ID"
        );
        assert_eq!(of(Some(" padded"), &[]), None);
        assert_eq!(Identity::from_cert_der(b"not a certificate"), None);
    }

    #[test]
    fn scheme_and_trust_domain_must_be_lowercase() {
        for bad in ["SPIFFE://mesh/orders", "spiffe://Mesh/orders", "SPIFFE://MESH/orders"] {
            assert_eq!(Identity::from_spiffe(bad), None, "{bad}");
            // A spiffe URI in any case is a (broken) SPIFFE ID: no fallback to the CN.
            assert_eq!(of(Some("orders"), &[bad]), None, "{bad}");
        }
        let id = Identity::from_spiffe("spiffe://mesh/Orders").unwrap();
        assert_eq!(id.principal(), "spiffe://mesh/Orders", "the path keeps its case");
    }
}
