//! TLS for Portico, on the rustls (0.23, ring) that Pingora's `rustls` feature uses.
//!
//! - files are read through [`crate::config::files`] (regular files within a size bound);
//! - [`certs`]: a PEM chain and its key, checked to match;
//! - [`resolver`]: the listener's certificate chosen by SNI, swappable on reload;
//! - [`client_auth`]: the listener's client-certificate verifier (mTLS), swappable on reload;
//! - [`identity`]: the calling service named by its certificate, carried in `SslDigest`;
//! - [`listener`]: the above assembled into Pingora `TlsSettings`;
//! - [`upstream`]: TLS to an upstream, applied to an `HttpPeer`.

pub mod certs;
pub mod client_auth;
pub mod identity;
pub mod listener;
pub mod resolver;
pub mod upstream;

#[cfg(test)]
mod test_handshake;
#[cfg(test)]
mod test_pki;

pub use certs::{CertAndKey, MaterialError, Part};
pub use client_auth::{ClientAuth, ClientCa};
pub use identity::{has_verified_client_cert, identity_of, ClientCert, Identity, IdentityCallbacks};
pub use listener::{ServerTls, ServerTlsConfig};
pub use resolver::{CertResolver, CertTable};
pub use upstream::UpstreamTlsSettings;
