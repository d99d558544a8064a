//! Certificate material: a PEM chain and its private key, loaded, checked and kept in the two
//! shapes Pingora wants — a rustls [`CertifiedKey`] for listeners and a [`CertKey`] for
//! upstream mTLS.
//!
//! Everything that could make Pingora panic later (it `expect`s parseable X.509 in `CertKey`,
//! `unwrap`s the key's DER at connect time and panics on an unloadable listener certificate)
//! is checked here, once, at load — where a mistake is a located config error instead.

use crate::config::files::{read_bounded, read_config_file, MAX_CONFIG_FILE_BYTES};
use pingora::utils::tls::CertKey;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use x509_parser::extensions::GeneralName;

/// The crypto Portico's TLS uses: ring, as Pingora's rustls build does. Passed explicitly so
/// that nothing depends on which process-wide default was installed first.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which file of a cert/key pair an error is about, so the caller can locate it at `.cert`
/// or `.key` (or `client_cert` / `client_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialError {
    pub part: Part,
    pub message: String,
}

impl MaterialError {
    fn cert(message: String) -> Self {
        MaterialError {
            part: Part::Cert,
            message,
        }
    }
    fn key(message: String) -> Self {
        MaterialError {
            part: Part::Key,
            message,
        }
    }
}

impl fmt::Display for MaterialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A certificate chain (leaf first) and the private key that matches its leaf.
#[derive(Clone)]
pub struct CertAndKey {
    certified: Arc<CertifiedKey>,
    key_der: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for CertAndKey {
    // Never the key: only what names the certificate.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAndKey")
            .field("chain_len", &self.certified.cert.len())
            .field("dns_names", &self.dns_names())
            .finish()
    }
}

impl CertAndKey {
    /// Reads `cert` (a PEM chain, leaf first) and `key` (PKCS#8, PKCS#1 RSA or SEC1 EC, PEM),
    /// each a regular file of at most 1 MiB, and checks that the key is the leaf's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, MaterialError> {
        let cert_pem = read_bounded(cert, MAX_CONFIG_FILE_BYTES).map_err(MaterialError::cert)?;
        let key_pem = read_bounded(key, MAX_CONFIG_FILE_BYTES).map_err(MaterialError::key)?;
        Self::from_pem(
            &cert_pem,
            &cert.display().to_string(),
            &key_pem,
            &key.display().to_string(),
        )
    }

    /// Paths as written in the config, relative to `base_dir`; errors name them as written.
    pub fn load_config(base_dir: &Path, cert: &str, key: &str) -> Result<Self, MaterialError> {
        let cert_pem = read_config_file(base_dir, cert).map_err(MaterialError::cert)?;
        let key_pem = read_config_file(base_dir, key).map_err(MaterialError::key)?;
        Self::from_pem(&cert_pem, cert, &key_pem, key)
    }

    /// The same from PEM held in memory (a certificate issued by the mesh controller, a test).
    /// `cert_origin` and `key_origin` name where the bytes came from, for the errors.
    pub fn from_pem(
        cert_pem: &[u8],
        cert_origin: &str,
        key_pem: &[u8],
        key_origin: &str,
    ) -> Result<Self, MaterialError> {
        let chain = parse_cert_chain(cert_pem, cert_origin).map_err(MaterialError::cert)?;
        let key = parse_private_key(key_pem, key_origin).map_err(MaterialError::key)?;
        Self::new(chain, key, cert_origin, key_origin)
    }

    /// From parsed DER: loads the key with ring and checks it against the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, MaterialError> {
        if chain.is_empty() {
            return Err(MaterialError::cert(format!("no certificate found in {cert_origin}")));
        }
        let signing = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| MaterialError::key(format!("{key_origin}: unsupported private key ({e})")))?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(MaterialError::key(format!(
                    "the private key in {key_origin} does not match the certificate in {cert_origin}"
                )))
            }
            // ring's keys always know their public half, so this is a key rustls cannot
            // compare: refuse rather than serve a pair that may fail every handshake.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                return Err(MaterialError::key(format!(
                    "cannot check that the private key in {key_origin} matches the certificate in {cert_origin}"
                )))
            }
            Err(e) => {
                return Err(MaterialError::cert(format!(
                    "{cert_origin}: unusable certificate ({e})"
                )))
            }
        }
        Ok(CertAndKey {
            certified: Arc::new(certified),
            key_der: Arc::new(key),
        })
    }

    /// For a listener (`ResolvesServerCert`).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// For an upstream's client certificate (`HttpPeer::client_cert_key`). Pingora re-parses
    /// the key's DER on every TLS connect; it was checked to parse when this was loaded.
    pub fn to_pingora(&self) -> CertKey {
        CertKey::new(
            self.chain().iter().map(|c| c.as_ref().to_vec()).collect(),
            self.key_der.secret_der().to_vec(),
        )
    }

    /// The leaf's DNS names (subjectAltName), lower case, wildcards as written (`*.example.com`).
    pub fn dns_names(&self) -> Vec<String> {
        match self.chain().first() {
            Some(leaf) => Self::dns_names_of(leaf.as_ref()),
            None => Vec::new(),
        }
    }

    /// The DNS names (subjectAltName) of a certificate (DER), lower case.
    pub fn dns_names_of(der: &[u8]) -> Vec<String> {
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
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect()
    }
}

/// Every certificate in a PEM file, in order. Each must be valid X.509; other sections (a key
/// in a combined file) are skipped.
pub fn parse_cert_chain(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut chain = Vec::new();
    for (kind, der) in sections(pem, origin)? {
        if kind != SectionKind::Certificate {
            continue;
        }
        if let Err(e) = x509_parser::parse_x509_certificate(&der) {
            return Err(format!(
                "{origin}: certificate {} is not valid X.509 ({e})",
                chain.len() + 1
            ));
        }
        chain.push(CertificateDer::from(der));
    }
    if chain.is_empty() {
        let hint = if has_private_key(pem) {
            " (it holds a private key: are cert and key swapped?)"
        } else {
            ""
        };
        return Err(format!("no certificate found in {origin}{hint}"));
    }
    Ok(chain)
}

/// The first private key in a PEM file: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`)
/// or SEC1 (`EC PRIVATE KEY`).
pub fn parse_private_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, String> {
    for (kind, der) in sections(pem, origin)? {
        let key = match kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(der.into()),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
            _ => continue,
        };
        // Pingora turns the DER back into a key by sniffing its structure (and unwraps the
        // result on every upstream connect): make sure that sniffing succeeds.
        if PrivateKeyDer::try_from(key.secret_der()).is_err() {
            return Err(format!("{origin}: the private key is not valid DER"));
        }
        return Ok(key);
    }
    if contains(pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(format!(
            "the private key in {origin} is encrypted; give an unencrypted key (and protect the file)"
        ));
    }
    let hint = if contains(pem, b"-----BEGIN CERTIFICATE-----") {
        " (it holds a certificate: are cert and key swapped?)"
    } else {
        ""
    };
    Err(format!("no private key found in {origin}{hint}"))
}

/// Every PEM section rustls knows, with readable errors (rustls' own print byte arrays).
fn sections(pem: &[u8], origin: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            let why = match e {
                pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_string(),
                pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_string(),
                pem::Error::Base64Decode(_) => "a PEM section is not valid base64".to_string(),
                other => other.to_string(),
            };
            format!("{origin}: {why}")
        })
}

fn has_private_key(pem: &[u8]) -> bool {
    contains(pem, b"PRIVATE KEY-----")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use crate::tls::test_pki::TestCa;

    #[test]
    fn loads_a_chain_and_its_key() {
        let ca = TestCa::new("Test CA");
        let leaf = ca.server(&["api.example.com", "*.example.org"]);
        let dir = TempDir::new("tls-certs");
        let (cert, key) = (
            dir.write("s.crt", &leaf.chain_pem(&ca)),
            dir.write("s.key", &leaf.key_pem),
        );
        let ck = CertAndKey::load(&cert, &key).unwrap();
        assert_eq!(ck.chain().len(), 2, "leaf and CA");
        assert_eq!(ck.dns_names(), vec!["api.example.com", "*.example.org"]);
        // The Pingora shape keeps the chain and a key it can parse back.
        let pk = ck.to_pingora();
        assert_eq!(pk.intermediates().len(), 1);
        assert!(PrivateKeyDer::try_from(pk.key().as_slice()).is_ok());
    }

    #[test]
    fn a_combined_file_serves_as_both() {
        let ca = TestCa::new("Test CA");
        let leaf = ca.server(&["a.test"]);
        let both = format!("{}{}", leaf.key_pem, leaf.cert_pem);
        let ck = CertAndKey::from_pem(both.as_bytes(), "both.pem", both.as_bytes(), "both.pem").unwrap();
        assert_eq!(ck.chain().len(), 1);
    }

    #[test]
    fn sec1_and_pkcs8_keys_load() {
        let ca = TestCa::new("Test CA");
        let leaf = ca.server(&["a.test"]);
        let sec1 = leaf.sec1_key_pem();
        assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
        let ck = CertAndKey::from_pem(leaf.cert_pem.as_bytes(), "a.crt", sec1.as_bytes(), "a.key").unwrap();
        assert_eq!(ck.dns_names(), vec!["a.test"]);
        assert!(matches!(
            parse_private_key(leaf.key_pem.as_bytes(), "k").unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));
    }

    #[test]
    fn a_key_that_does_not_match_the_cert_is_refused() {
        let ca = TestCa::new("Test CA");
        let a = ca.server(&["a.test"]);
        let b = ca.server(&["b.test"]);
        let e =
            CertAndKey::from_pem(a.cert_pem.as_bytes(), "conf/a.crt", b.key_pem.as_bytes(), "conf/b.key").unwrap_err();
        assert_eq!(e.part, Part::Key);
        assert_eq!(
            e.message,
            "the private key in conf/b.key does not match the certificate in conf/a.crt"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_part() {
        let ca = TestCa::new("Test CA");
        let a = ca.server(&["a.test"]);
        let e = CertAndKey::from_pem(a.cert_pem.as_bytes(), "conf/x.crt", b"", "conf/x.key").unwrap_err();
        assert_eq!(
            (e.part, e.message.as_str()),
            (Part::Key, "no private key found in conf/x.key")
        );

        let e = CertAndKey::from_pem(a.cert_pem.as_bytes(), "x.crt", a.cert_pem.as_bytes(), "x.key").unwrap_err();
        assert_eq!(
            e.message,
            "no private key found in x.key (it holds a certificate: are cert and key swapped?)"
        );

        let e = CertAndKey::from_pem(a.key_pem.as_bytes(), "x.crt", a.key_pem.as_bytes(), "x.key").unwrap_err();
        assert_eq!(e.part, Part::Cert);
        assert_eq!(
            e.message,
            "no certificate found in x.crt (it holds a private key: are cert and key swapped?)"
        );

        let enc = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = parse_private_key(enc, "x.key").unwrap_err();
        assert!(e.contains("is encrypted"), "{e}");

        let bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = parse_cert_chain(bad, "x.crt").unwrap_err();
        assert!(e.starts_with("x.crt: certificate 1 is not valid X.509"), "{e}");

        let cut = &a.cert_pem[..a.cert_pem.len() / 2];
        let e = parse_cert_chain(cut.as_bytes(), "x.crt").unwrap_err();
        assert_eq!(e, "x.crt: a PEM section has no END line");

        let e = CertAndKey::load(Path::new("/dev/zero"), Path::new("/dev/null")).unwrap_err();
        assert_eq!(
            (e.part, e.message.as_str()),
            (Part::Cert, "/dev/zero is not a regular file")
        );
    }
}
