//! Test certificates, made at test time with rcgen (no private key is ever committed): a CA
//! and the server and client leaves it signs, and files of them for a config to name.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
}

/// A leaf certificate (PEM) and its PKCS#8 key (PEM).
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    key_der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(Some(name));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa { cert, key }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's certificate, DER.
    pub fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// Writes `NAME.crt` (leaf then CA) and `NAME.key` for a server certificate naming `names`
    /// into `dir`; returns the two paths as strings, for a config.
    pub fn write_server(&self, dir: &crate::testing::TempDir, name: &str, names: &[&str]) -> (String, String) {
        let leaf = self.server(names);
        leaf.write(self, dir, name)
    }

    /// Writes the CA's certificate as `NAME.crt` into `dir`; returns its path.
    pub fn write_ca(&self, dir: &crate::testing::TempDir, name: &str) -> String {
        dir.write(&format!("{name}.crt"), &self.cert_pem())
            .display()
            .to_string()
    }

    /// A server certificate for these DNS names (`*.example.com` allowed).
    pub fn server(&self, names: &[&str]) -> Leaf {
        let sans = names.iter().map(|n| SanType::DnsName(ia5(n))).collect();
        self.issue(names.first().copied(), sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with this CN and these URI SANs (`spiffe://mesh/orders`).
    pub fn client(&self, cn: Option<&str>, uris: &[&str]) -> Leaf {
        let sans = uris.iter().map(|u| SanType::URI(ia5(u))).collect();
        self.issue(cn, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate with arbitrary SANs (DNS names among URIs, say).
    pub fn client_with(&self, cn: Option<&str>, sans: Vec<SanType>) -> Leaf {
        self.issue(cn, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, cn: Option<&str>, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![eku];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }
}

impl Leaf {
    /// Writes `NAME.crt` (leaf then CA) and `NAME.key` into `dir`; returns the two paths.
    pub fn write(&self, ca: &TestCa, dir: &crate::testing::TempDir, name: &str) -> (String, String) {
        let cert = dir.write(&format!("{name}.crt"), &self.chain_pem(ca));
        let key = dir.write(&format!("{name}.key"), &self.key_pem);
        (cert.display().to_string(), key.display().to_string())
    }

    /// Leaf then CA, as a server sends its chain.
    pub fn chain_pem(&self, ca: &TestCa) -> String {
        format!("{}{}", self.cert_pem, ca.cert_pem())
    }

    pub fn der(&self) -> Vec<u8> {
        rustls::pki_types::pem::PemObject::from_pem_slice(self.cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .expect("leaf DER")
    }

    /// The same key as SEC1 (`EC PRIVATE KEY`): the ECPrivateKey that PKCS#8 wraps in its
    /// third field, an OCTET STRING.
    pub fn sec1_key_pem(&self) -> String {
        let (_, body) = tlv(&self.key_der); // PrivateKeyInfo SEQUENCE
        let (rest, _version) = tlv(body);
        let (rest, _algorithm) = tlv_raw(rest);
        let (_, sec1) = tlv(rest); // privateKey OCTET STRING
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sec1);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }
}

fn dn(cn: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(cn) = cn {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

fn ia5(s: &str) -> rcgen::Ia5String {
    rcgen::Ia5String::try_from(s).expect("IA5 string")
}

/// One DER element: (what follows it, its contents).
fn tlv(der: &[u8]) -> (&[u8], &[u8]) {
    let (len, hdr) = match der[1] {
        n if n < 0x80 => (n as usize, 2),
        0x81 => (der[2] as usize, 3),
        0x82 => (((der[2] as usize) << 8) | der[3] as usize, 4),
        _ => panic!("test DER too long"),
    };
    (&der[hdr + len..], &der[hdr..hdr + len])
}

/// One DER element: (what follows it, the element itself).
fn tlv_raw(der: &[u8]) -> (&[u8], &[u8]) {
    let (rest, _) = tlv(der);
    (rest, &der[..der.len() - rest.len()])
}
