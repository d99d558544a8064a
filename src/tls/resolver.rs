//! Which certificate a TLS listener serves: chosen by SNI among exact names and `*.example.com`
//! wildcards, else the default one — and swappable, so a reload serves new certificates to new
//! handshakes without a restart (Pingora builds a listener's rustls config once, at start; the
//! resolver inside it is the part that can change).
//!
//! Matching is what browsers do: case-insensitive, a trailing dot ignored, and a wildcard
//! covers exactly one label (`*.example.com` covers `a.example.com`, not `example.com` nor
//! `a.b.example.com`). An exact name wins over a wildcard. A client that sends no SNI, or one
//! that matches nothing, gets the default certificate.

use crate::config::raw::SniCert;
use crate::config::ConfigError;
use crate::tls::certs::{CertAndKey, Part};
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// One listener's certificates, immutable: a reload builds a new table.
#[derive(Clone)]
pub struct CertTable {
    default: Arc<CertifiedKey>,
    /// `api.example.com` → its certificate.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `example.com` → the certificate for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl fmt::Debug for CertTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<String> = self.exact.keys().cloned().collect();
        hosts.extend(self.wildcard.keys().map(|d| format!("*.{d}")));
        hosts.sort();
        f.debug_struct("CertTable").field("sni_hosts", &hosts).finish()
    }
}

impl CertTable {
    /// A table that serves `default` to every client.
    pub fn new(default: &CertAndKey) -> CertTable {
        CertTable {
            default: default.certified_key(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }

    /// Serve `cert` for `host` (`api.example.com` or `*.example.com`). Refuses a malformed
    /// name, a host listed twice, and a host the certificate does not name: a client that
    /// checks certificates would refuse it anyway, so it is a mistake in the config.
    pub fn insert(&mut self, host: &str, cert: &CertAndKey) -> Result<(), String> {
        let name = normalise(host);
        let (map, key) = match name.strip_prefix("*.") {
            Some(domain) => (&mut self.wildcard, domain),
            None => (&mut self.exact, name.as_str()),
        };
        if let Err(why) = check_host(&name) {
            return Err(format!("'{host}' {why}"));
        }
        if map.contains_key(key) {
            return Err(format!("'{host}' is listed twice"));
        }
        let names = cert.dns_names();
        if !covers(&names, &name) {
            let named = if names.is_empty() {
                "no DNS name".to_string()
            } else {
                names.join(", ")
            };
            return Err(format!("the certificate does not cover '{host}' (it names {named})"));
        }
        map.insert(key.to_string(), cert.certified_key());
        Ok(())
    }

    /// The certificate for a client that sent this SNI (or none).
    pub fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(sni) = sni else { return &self.default };
        let name = normalise(sni);
        if let Some(c) = self.exact.get(&name) {
            return c;
        }
        match name.split_once('.') {
            Some((label, parent)) if !label.is_empty() => self.wildcard.get(parent).unwrap_or(&self.default),
            _ => &self.default,
        }
    }

    /// Builds a listener's table from its `tls` block: `cert`/`key` are the default, `sni` the
    /// extra certificates. Paths are relative to `base_dir`; errors are located relative to the
    /// `tls` block (`key`, `sni[1].hosts[0]`) for the caller to prefix with `listeners[N].tls`.
    pub fn load(base_dir: &Path, cert: &str, key: &str, sni: &[SniCert]) -> Result<CertTable, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let default = CertAndKey::load_config(base_dir, cert, key)
            .map_err(|e| errs.push(ConfigError::new(part(&e.part, "cert", "key"), e.message)))
            .ok();
        let mut table = default.as_ref().map(CertTable::new);
        for (i, entry) in sni.iter().enumerate() {
            let loc = format!("sni[{i}]");
            if entry.hosts.is_empty() {
                errs.push(ConfigError::new(format!("{loc}.hosts"), "list at least one host"));
            }
            let ck = match CertAndKey::load_config(base_dir, &entry.cert, &entry.key) {
                Ok(ck) => ck,
                Err(e) => {
                    errs.push(ConfigError::new(
                        format!("{loc}.{}", part(&e.part, "cert", "key")),
                        e.message,
                    ));
                    continue;
                }
            };
            for (j, host) in entry.hosts.iter().enumerate() {
                // Without a default there is no table, but each host is still checked.
                let mut scratch;
                let t = match table.as_mut() {
                    Some(t) => t,
                    None => {
                        scratch = CertTable::new(&ck);
                        &mut scratch
                    }
                };
                if let Err(e) = t.insert(host, &ck) {
                    errs.push(ConfigError::new(format!("{loc}.hosts[{j}]"), e));
                }
            }
        }
        match table {
            Some(t) if errs.is_empty() => Ok(t),
            _ => Err(errs),
        }
    }
}

fn part(p: &Part, cert: &'static str, key: &'static str) -> &'static str {
    match p {
        Part::Cert => cert,
        Part::Key => key,
    }
}

/// Lower case, without one trailing dot: how names are compared.
fn normalise(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// A DNS name, or `*.` and a DNS name. SNI never carries an IP address (RFC 6066 §3).
fn check_host(name: &str) -> Result<(), &'static str> {
    let base = name.strip_prefix("*.").unwrap_or(name);
    if base.contains('*') {
        return Err("is not a host name: a wildcard is only allowed as a whole first label ('*.example.com')");
    }
    if base.parse::<std::net::IpAddr>().is_ok() {
        return Err("is an IP address: clients never send one as SNI, so only the default certificate can serve it");
    }
    let ok = !base.is_empty()
        && base.len() <= 253
        && base.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err("is not a valid host name")
    }
}

/// Whether a certificate naming `names` (its DNS SANs) is valid for `host` — a wildcard host
/// needs the same wildcard in the certificate.
fn covers(names: &[String], host: &str) -> bool {
    names.iter().any(|n| {
        let n = normalise(n);
        if n == host {
            return true;
        }
        match (n.strip_prefix("*."), host.split_once('.')) {
            (Some(domain), Some((label, parent))) => label != "*" && !label.is_empty() && domain == parent,
            _ => false,
        }
    })
}

/// The `ResolvesServerCert` a listener is built with; [`CertResolver::replace`] swaps its table
/// for the handshakes that start afterwards (those in progress finish with the old one).
#[derive(Debug)]
pub struct CertResolver {
    table: ArcSwap<CertTable>,
}

impl CertResolver {
    pub fn new(table: CertTable) -> CertResolver {
        CertResolver {
            table: ArcSwap::from_pointee(table),
        }
    }

    pub fn replace(&self, table: CertTable) {
        self.table.store(Arc::new(table));
    }

    /// The table new handshakes use.
    pub fn current(&self) -> Arc<CertTable> {
        self.table.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.table.load().pick(hello.server_name()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use crate::tls::test_handshake::{client_config, handshake, server_config};
    use crate::tls::test_pki::TestCa;

    fn ck(ca: &TestCa, names: &[&str]) -> CertAndKey {
        let leaf = ca.server(names);
        CertAndKey::from_pem(leaf.cert_pem.as_bytes(), "c.crt", leaf.key_pem.as_bytes(), "c.key").unwrap()
    }

    fn table(ca: &TestCa) -> CertTable {
        let mut t = CertTable::new(&ck(ca, &["default.test"]));
        t.insert("api.example.com", &ck(ca, &["api.example.com"])).unwrap();
        t.insert("*.example.com", &ck(ca, &["*.example.com"])).unwrap();
        t
    }

    async fn served(resolver: &Arc<CertResolver>, sni: Option<&str>) -> Vec<String> {
        let server = server_config(resolver.clone(), None);
        handshake(server, client_config(None), sni).await.client.unwrap()
    }

    #[tokio::test]
    async fn picks_exact_then_wildcard_then_default_in_a_real_handshake() {
        let ca = TestCa::new("Test CA");
        let r = Arc::new(CertResolver::new(table(&ca)));
        assert_eq!(served(&r, Some("api.example.com")).await, ["api.example.com"]);
        assert_eq!(served(&r, Some("API.Example.COM")).await, ["api.example.com"]);
        assert_eq!(served(&r, Some("www.example.com")).await, ["*.example.com"]);
        // One label deep only, and the bare domain is not covered by its wildcard.
        assert_eq!(served(&r, Some("a.b.example.com")).await, ["default.test"]);
        assert_eq!(served(&r, Some("example.com")).await, ["default.test"]);
        assert_eq!(served(&r, Some("other.test")).await, ["default.test"]);
        assert_eq!(served(&r, None).await, ["default.test"]);
        let none = handshake(server_config(r.clone(), None), client_config(None), None).await;
        assert_eq!(none.server.unwrap().sni, None, "the client really sent no SNI");
    }

    #[tokio::test]
    async fn replace_applies_to_the_next_handshake() {
        let ca = TestCa::new("Test CA");
        let r = Arc::new(CertResolver::new(table(&ca)));
        // One server config for both handshakes, as a listener keeps its config for its life.
        let server = server_config(r.clone(), None);
        let before = handshake(server.clone(), client_config(None), Some("api.example.com")).await;
        assert_eq!(before.client.unwrap(), ["api.example.com"]);
        assert_eq!(before.server.unwrap().sni.as_deref(), Some("api.example.com"));

        let mut next = CertTable::new(&ck(&ca, &["default2.test"]));
        next.insert("api.example.com", &ck(&ca, &["api.example.com", "v2.example.com"]))
            .unwrap();
        r.replace(next);
        let after = handshake(server.clone(), client_config(None), Some("api.example.com")).await;
        assert_eq!(after.client.unwrap(), ["api.example.com", "v2.example.com"]);
        let after = handshake(server, client_config(None), Some("www.example.com")).await;
        assert_eq!(after.client.unwrap(), ["default2.test"], "the old wildcard is gone");
    }

    #[test]
    fn pick_normalises_the_sni() {
        let ca = TestCa::new("Test CA");
        let t = table(&ca);
        let api = t.exact["api.example.com"].clone();
        assert!(Arc::ptr_eq(t.pick(Some("api.example.com.")), &api));
        assert!(Arc::ptr_eq(t.pick(Some("API.EXAMPLE.COM")), &api));
        assert!(Arc::ptr_eq(t.pick(Some("")), &t.default));
        assert!(Arc::ptr_eq(t.pick(Some(".example.com")), &t.default));
    }

    #[test]
    fn insert_refuses_bad_duplicate_and_uncovered_hosts() {
        let ca = TestCa::new("Test CA");
        let mut t = table(&ca);
        let wild = ck(&ca, &["*.example.org", "example.org"]);
        assert!(
            t.insert("a.example.org", &wild).is_ok(),
            "a wildcard SAN covers one label"
        );
        assert!(t.insert("Example.ORG.", &wild).is_ok());
        let e = t.insert("API.example.com", &ck(&ca, &["api.example.com"])).unwrap_err();
        assert_eq!(e, "'API.example.com' is listed twice");
        let e = t.insert("x.y.example.org", &wild).unwrap_err();
        assert_eq!(
            e,
            "the certificate does not cover 'x.y.example.org' (it names *.example.org, example.org)"
        );
        assert!(
            t.insert("*.example.org", &ck(&ca, &["a.example.org"])).is_err(),
            "a wildcard host needs a wildcard SAN"
        );
        assert!(t
            .insert("a*.example.net", &wild)
            .unwrap_err()
            .contains("whole first label"));
        assert!(t.insert("10.0.0.1", &wild).unwrap_err().contains("IP address"));
        assert!(t
            .insert("bad host", &wild)
            .unwrap_err()
            .contains("not a valid host name"));
        assert!(t.insert("*", &wild).unwrap_err().contains("whole first label"));
    }

    #[test]
    fn load_locates_each_error_in_the_tls_block() {
        let ca = TestCa::new("Test CA");
        let dir = TempDir::new("tls-resolver");
        let a = ca.server(&["default.test"]);
        let b = ca.server(&["api.example.com"]);
        dir.write("a.crt", &a.cert_pem);
        dir.write("a.key", &a.key_pem);
        dir.write("b.crt", &b.cert_pem);
        dir.write("b.key", &b.key_pem);
        let sni = |hosts: &[&str], cert: &str, key: &str| SniCert {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            cert: cert.into(),
            key: key.into(),
        };

        let ok = CertTable::load(
            dir.path(),
            "a.crt",
            "a.key",
            &[sni(&["api.example.com"], "b.crt", "b.key")],
        )
        .unwrap();
        assert_eq!(format!("{ok:?}"), r#"CertTable { sni_hosts: ["api.example.com"] }"#);

        let errs = CertTable::load(
            dir.path(),
            "a.crt",
            "b.key",
            &[
                sni(&["api.example.com", "nope.example.com"], "b.crt", "b.key"),
                sni(&[], "b.crt", "missing.key"),
            ],
        )
        .unwrap_err();
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "key: the private key in b.key does not match the certificate in a.crt",
                "sni[0].hosts[1]: the certificate does not cover 'nope.example.com' (it names api.example.com)",
                "sni[1].hosts: list at least one host",
                "sni[1].key: cannot read missing.key: No such file or directory",
            ]
        );
    }
}
