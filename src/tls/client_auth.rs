//! Client certificates (mTLS) on a listener: a rustls `WebPkiClientVerifier` built from the
//! `client_ca` bundle, held behind a swap so that a new CA — from a reload, or later from the
//! mesh controller — applies to the handshakes that start afterwards.
//!
//! `require_client_cert: false` asks for a certificate but lets a client without one finish the
//! handshake (it then has no identity); `true` refuses it. A certificate that does not chain to
//! the CA is refused either way: a client that shows a bad certificate is not anonymous.

use crate::config::files::read_config_file;
use crate::tls::certs::{parse_cert_chain, provider};
use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One client-CA policy, immutable: a reload builds a new one.
#[derive(Clone)]
pub struct ClientCa {
    /// `None`: client certificates are not asked for.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The CA subjects sent to clients to help them pick a certificate (see [`intern_hints`]).
    hints: &'static [DistinguishedName],
    required: bool,
}

impl fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCa")
            .field("enabled", &self.verifier.is_some())
            .field("ca_subjects", &self.hints.len())
            .field("required", &self.required)
            .finish()
    }
}

impl ClientCa {
    /// No client certificates: the listener does not ask for one.
    pub fn disabled() -> ClientCa {
        ClientCa {
            verifier: None,
            hints: &[],
            required: false,
        }
    }

    /// From a PEM bundle of CA certificates; `origin` names it in errors.
    pub fn from_pem(pem: &[u8], origin: &str, require_client_cert: bool) -> Result<ClientCa, String> {
        let mut roots = RootCertStore::empty();
        for (i, cert) in parse_cert_chain(pem, origin)?.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|e| format!("{origin}: certificate {} cannot be a trust anchor ({e})", i + 1))?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let builder = if require_client_cert {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let verifier = builder
            .build()
            .map_err(|e| format!("{origin}: cannot verify client certificates with it ({e})"))?;
        Ok(ClientCa {
            hints: intern_hints(verifier.root_hint_subjects()),
            verifier: Some(verifier),
            required: require_client_cert,
        })
    }

    /// `client_ca` as written in the config, relative to `base_dir`.
    pub fn load_config(base_dir: &Path, client_ca: &str, require_client_cert: bool) -> Result<ClientCa, String> {
        let pem = read_config_file(base_dir, client_ca)?;
        Self::from_pem(&pem, client_ca, require_client_cert)
    }

    pub fn is_enabled(&self) -> bool {
        self.verifier.is_some()
    }

    pub fn is_required(&self) -> bool {
        self.required
    }
}

/// The `ClientCertVerifier` a listener is built with. Every method forwards to the CA policy
/// current at the call; [`ClientAuth::replace`] swaps it for handshakes that start afterwards.
#[derive(Debug)]
pub struct ClientAuth {
    current: ArcSwap<ClientCa>,
}

impl ClientAuth {
    pub fn new(ca: ClientCa) -> ClientAuth {
        ClientAuth {
            current: ArcSwap::from_pointee(ca),
        }
    }

    pub fn replace(&self, ca: ClientCa) {
        self.current.store(Arc::new(ca));
    }

    pub fn current(&self) -> Arc<ClientCa> {
        self.current.load_full()
    }

    /// Whether the current policy accepts this chain now — for a chain that did not go through
    /// the verifier in this handshake (a resumed session carries the one verified back then).
    pub fn accepts(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        self.verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
    }
}

/// Why a certificate is refused when none is accepted: the policy was swapped to "disabled"
/// while a handshake that had asked for one was under way.
fn not_accepted() -> rustls::Error {
    rustls::Error::General("client certificates are not accepted on this listener".into())
}

impl ClientCertVerifier for ClientAuth {
    fn offer_client_auth(&self) -> bool {
        self.current
            .load()
            .verifier
            .as_ref()
            .is_some_and(|v| v.offer_client_auth())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current
            .load()
            .verifier
            .as_ref()
            .is_some_and(|v| v.client_auth_mandatory())
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.current.load().hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.current.load().verifier {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(not_accepted()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.current.load().verifier {
            Some(v) => v.verify_tls12_signature(message, cert, dss),
            None => Err(not_accepted()),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.current.load().verifier {
            Some(v) => v.verify_tls13_signature(message, cert, dss),
            None => Err(not_accepted()),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match &self.current.load().verifier {
            Some(v) => v.supported_verify_schemes(),
            None => provider().signature_verification_algorithms.supported_schemes(),
        }
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.current
            .load()
            .verifier
            .as_ref()
            .is_some_and(|v| v.requires_raw_public_keys())
    }
}

/// How many distinct hint lists are kept for the life of the process (see [`intern_hints`]).
const MAX_HINT_LISTS: usize = 64;

/// `root_hint_subjects` must return a slice that lives as long as the verifier, but the
/// verifier's CA changes on a swap, and a borrow cannot outlive the swap's guard. So each
/// distinct hint list is kept for the life of the process and shared by every policy with the
/// same CA subjects — a reload with an unchanged `client_ca` keeps nothing new. Past
/// [`MAX_HINT_LISTS`] distinct lists (a CA rotated that many times in one process), new
/// policies send no hints, which TLS allows (the client then offers any certificate it has).
fn intern_hints(hints: &[DistinguishedName]) -> &'static [DistinguishedName] {
    static KEPT: Mutex<Vec<&'static [DistinguishedName]>> = Mutex::new(Vec::new());
    if hints.is_empty() {
        return &[];
    }
    let mut kept = KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let same =
        |k: &[DistinguishedName]| k.len() == hints.len() && k.iter().zip(hints).all(|(a, b)| a.as_ref() == b.as_ref());
    if let Some(k) = kept.iter().copied().find(|k| same(k)) {
        return k;
    }
    if kept.len() >= MAX_HINT_LISTS {
        return &[];
    }
    let leaked: &'static [DistinguishedName] = Box::leak(hints.to_vec().into_boxed_slice());
    kept.push(leaked);
    leaked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::CertAndKey;
    use crate::tls::resolver::{CertResolver, CertTable};
    use crate::tls::test_handshake::{client_config, handshake, server_config, Outcome};
    use crate::tls::test_pki::{Leaf, TestCa};

    struct Setup {
        ca: TestCa,
        resolver: Arc<CertResolver>,
    }

    fn setup() -> Setup {
        let ca = TestCa::new("Client CA");
        let leaf = ca.server(&["gw.test"]);
        let ck = CertAndKey::from_pem(leaf.cert_pem.as_bytes(), "s.crt", leaf.key_pem.as_bytes(), "s.key").unwrap();
        Setup {
            resolver: Arc::new(CertResolver::new(CertTable::new(&ck))),
            ca,
        }
    }

    async fn connect(s: &Setup, auth: &Arc<ClientAuth>, cert: Option<(&Leaf, &TestCa)>) -> Outcome {
        let server = server_config(s.resolver.clone(), Some(auth.clone()));
        handshake(server, client_config(cert), Some("gw.test")).await
    }

    fn auth(ca: &TestCa, required: bool) -> Arc<ClientAuth> {
        Arc::new(ClientAuth::new(
            ClientCa::from_pem(ca.cert_pem().as_bytes(), "ca.crt", required).unwrap(),
        ))
    }

    #[tokio::test]
    async fn required_refuses_a_client_without_a_certificate() {
        let s = setup();
        let out = connect(&s, &auth(&s.ca, true), None).await;
        let e = out.server.unwrap_err();
        assert!(e.contains("peer sent no certificates"), "{e}");
    }

    #[tokio::test]
    async fn optional_accepts_a_client_without_a_certificate_and_without_identity() {
        let s = setup();
        let out = connect(&s, &auth(&s.ca, false), None).await;
        assert!(out.server.unwrap().client_cert.is_none());
    }

    #[tokio::test]
    async fn a_certificate_from_the_ca_is_accepted_and_seen() {
        let s = setup();
        let leaf = s.ca.client(Some("orders"), &["spiffe://mesh/orders"]);
        for required in [true, false] {
            let out = connect(&s, &auth(&s.ca, required), Some((&leaf, &s.ca))).await;
            assert_eq!(out.server.unwrap().client_cert, Some(leaf.der()));
        }
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_even_when_optional() {
        let s = setup();
        let other = TestCa::new("Other CA");
        let leaf = other.client(Some("orders"), &[]);
        for required in [true, false] {
            let out = connect(&s, &auth(&s.ca, required), Some((&leaf, &other))).await;
            let e = out.server.unwrap_err();
            assert!(e.contains("UnknownIssuer"), "{e}");
        }
    }

    #[tokio::test]
    async fn replace_applies_a_new_ca_to_the_next_handshake() {
        let s = setup();
        let next = TestCa::new("Next CA");
        let a = auth(&s.ca, true);
        let old_leaf = s.ca.client(Some("orders"), &[]);
        let new_leaf = next.client(Some("orders"), &[]);
        assert!(connect(&s, &a, Some((&old_leaf, &s.ca))).await.server.is_ok());

        a.replace(ClientCa::from_pem(next.cert_pem().as_bytes(), "next.crt", true).unwrap());
        assert!(connect(&s, &a, Some((&old_leaf, &s.ca))).await.server.is_err());
        assert!(connect(&s, &a, Some((&new_leaf, &next))).await.server.is_ok());

        // Switched off: no certificate is asked for, so a client with one connects anonymously.
        a.replace(ClientCa::disabled());
        let out = connect(&s, &a, Some((&new_leaf, &next))).await;
        assert!(out.server.unwrap().client_cert.is_none());
    }

    #[test]
    fn forwards_what_the_webpki_verifier_says() {
        let ca = TestCa::new("Hint CA");
        let webpki = WebPkiClientVerifier::builder_with_provider(
            Arc::new({
                let mut r = RootCertStore::empty();
                r.add_parsable_certificates(parse_cert_chain(ca.cert_pem().as_bytes(), "ca").unwrap());
                r
            }),
            provider(),
        )
        .build()
        .unwrap();
        let a = auth(&ca, true);
        let hints: Vec<Vec<u8>> = a.root_hint_subjects().iter().map(|d| d.as_ref().to_vec()).collect();
        let want: Vec<Vec<u8>> = webpki
            .root_hint_subjects()
            .iter()
            .map(|d| d.as_ref().to_vec())
            .collect();
        assert_eq!(hints, want);
        assert_eq!(hints.len(), 1);
        assert_eq!(a.supported_verify_schemes(), webpki.supported_verify_schemes());
        assert!(a.offer_client_auth() && a.client_auth_mandatory());
        let optional = auth(&ca, false);
        assert!(optional.offer_client_auth() && !optional.client_auth_mandatory());
        let off = ClientAuth::new(ClientCa::disabled());
        assert!(!off.offer_client_auth() && !off.client_auth_mandatory());
        assert!(off.root_hint_subjects().is_empty());
        // The same CA twice shares one kept hint list.
        assert!(std::ptr::eq(
            auth(&ca, true).root_hint_subjects(),
            a.root_hint_subjects()
        ));
    }

    #[test]
    fn a_bad_bundle_is_a_sentence() {
        assert_eq!(
            ClientCa::from_pem(b"", "conf/ca.crt", true).unwrap_err(),
            "no certificate found in conf/ca.crt"
        );
        let e = ClientCa::load_config(Path::new("/"), "dev/zero", false).unwrap_err();
        assert_eq!(e, "dev/zero is not a regular file");
    }
}
