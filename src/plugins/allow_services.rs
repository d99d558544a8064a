//! `allow_services`: which service may call this route. The caller's identity comes from its
//! mTLS certificate (URI SAN `spiffe://DOMAIN/SERVICE`, else CN) or from a verified JWT claim.
//!
//! SPIFFE IDs follow the SPIFFE ID standard: the scheme is `spiffe` and the trust domain is
//! lowercase (§2, §2.1), as go-spiffe enforces. An ID written otherwise (`SPIFFE://MESH/orders`)
//! is not a SPIFFE ID — no identity, from a certificate or a claim — and in the config it is an
//! error, so the same rule holds on both sides and nothing is matched case-insensitively.

use crate::config::ConfigError;
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use pingora::http::RequestHeader;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub services: Vec<String>,
    /// `mtls` (default) or `jwt:CLAIM`.
    #[serde(default)]
    pub from: Option<String>,
    /// Only identities of this trust domain count.
    #[serde(default)]
    pub trust_domain: Option<String>,
}

enum Source {
    Mtls,
    Claim(String),
}

/// A service identity: `spiffe://DOMAIN/NAME`, or a bare `NAME`.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub domain: Option<String>,
    pub name: String,
}

impl Identity {
    /// `spiffe://DOMAIN/NAME` (by the rules of [`crate::tls::Identity::from_spiffe`]: one path
    /// segment, a lowercase `spiffe` scheme and trust domain), or a bare `NAME`.
    pub fn parse(s: &str) -> Option<Identity> {
        let s = s.trim();
        if s.contains("://") {
            let id = crate::tls::Identity::from_spiffe(s)?;
            return Some(Identity {
                domain: id.trust_domain,
                name: id.service,
            });
        }
        (!s.is_empty() && !s.contains('/') && !s.contains(':')).then(|| Identity {
            domain: None,
            name: s.to_string(),
        })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.domain {
            Some(d) => write!(f, "spiffe://{d}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Why an identity may not call the route.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Not of the route's `trust_domain` (or of none: a bare name).
    OtherDomain,
    /// Of the right domain, but not among `services`.
    NotListed,
}

pub struct AllowServices {
    allowed: Vec<Identity>,
    from: Source,
    trust_domain: Option<String>,
}

impl AllowServices {
    pub fn new(cfg: Config, _ctx: &BuildContext) -> Result<Self, ConfigError> {
        if cfg.services.is_empty() {
            return Err(ConfigError::new("services", "list at least one service"));
        }
        let mut allowed = Vec::new();
        for (i, s) in cfg.services.iter().enumerate() {
            allowed.push(Identity::parse(s).ok_or_else(|| {
                ConfigError::new(
                    format!("services[{i}]"),
                    format!(
                        "'{s}' is not a service name or spiffe://DOMAIN/NAME (a SPIFFE ID is lowercase \
                         up to its path, with one path segment of letters, digits, '-', '.', '_')"
                    ),
                )
            })?);
        }
        if let Some(td) = &cfg.trust_domain {
            let valid = crate::tls::Identity::from_spiffe(&format!("spiffe://{td}/x"))
                .is_some_and(|id| id.trust_domain.as_deref() == Some(td.as_str()));
            if !valid {
                return Err(ConfigError::new(
                    "trust_domain",
                    format!(
                        "'{td}' is not a SPIFFE trust domain (lowercase letters, digits, '-', '.', '_': \
                         SPIFFE ID standard §2.1)"
                    ),
                ));
            }
        }
        let from = match cfg.from.as_deref() {
            None | Some("mtls") => Source::Mtls,
            Some(f) => match f.strip_prefix("jwt:") {
                Some(claim) if !claim.is_empty() => Source::Claim(claim.to_string()),
                _ => return Err(ConfigError::new("from", "use 'mtls' or 'jwt:CLAIM'")),
            },
        };
        Ok(AllowServices {
            allowed,
            from,
            trust_domain: cfg.trust_domain,
        })
    }

    fn identity(&self, st: &RequestState) -> Option<Identity> {
        let raw = match &self.from {
            Source::Mtls => st.identity.clone()?,
            Source::Claim(c) => {
                let claims = st.claims()?;
                claims.0.get(c)?.as_str()?.to_string()
            }
        };
        Identity::parse(&raw)
    }

    fn check(&self, id: &Identity) -> Result<(), Refusal> {
        if let Some(td) = &self.trust_domain {
            if id.domain.as_deref() != Some(td.as_str()) {
                return Err(Refusal::OtherDomain);
            }
        }
        let listed = self
            .allowed
            .iter()
            .any(|a| a.name == id.name && (a.domain.is_none() || a.domain == id.domain));
        if listed {
            Ok(())
        } else {
            Err(Refusal::NotListed)
        }
    }

    #[cfg(test)]
    fn allows(&self, id: &Identity) -> bool {
        self.check(id).is_ok()
    }

    /// The 403's message: the caller's whole identity, and the real reason.
    fn message(&self, id: &Identity, why: Refusal) -> String {
        match (why, &self.trust_domain, &id.domain) {
            (Refusal::OtherDomain, Some(td), Some(_)) => {
                format!("'{id}' is not of trust domain '{td}', the only one this route accepts")
            }
            (Refusal::OtherDomain, Some(td), None) => {
                format!("'{id}' has no trust domain; this route accepts SPIFFE IDs of '{td}' only")
            }
            _ => format!("'{id}' is not among the services that may call this route"),
        }
    }
}

#[async_trait]
impl Plugin for AllowServices {
    fn kind(&self) -> PluginKind {
        PluginKind::Authorize
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    async fn request(&self, _req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        let Some(id) = self.identity(st) else {
            return Verdict::Respond(Reply::error(
                401,
                "unauthorized",
                "the calling service did not identify itself",
            ));
        };
        if let Err(why) = self.check(&id) {
            return Verdict::Respond(Reply::error(403, "service_not_allowed", self.message(&id, why)));
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(services: &[&str], td: Option<&str>) -> AllowServices {
        AllowServices {
            allowed: services.iter().map(|s| Identity::parse(s).unwrap()).collect(),
            from: Source::Mtls,
            trust_domain: td.map(str::to_string),
        }
    }

    #[test]
    fn names_domains_and_trust() {
        let r = rule(&["frontend", "spiffe://other/billing"], None);
        assert!(r.allows(&Identity::parse("spiffe://mesh/frontend").unwrap()));
        assert!(r.allows(&Identity::parse("frontend").unwrap()));
        assert!(!r.allows(&Identity::parse("spiffe://mesh/billing").unwrap()));
        assert!(r.allows(&Identity::parse("spiffe://other/billing").unwrap()));
        let td = rule(&["frontend"], Some("mesh"));
        assert!(td.allows(&Identity::parse("spiffe://mesh/frontend").unwrap()));
        assert!(!td.allows(&Identity::parse("spiffe://evil/frontend").unwrap()));
        assert!(!td.allows(&Identity::parse("frontend").unwrap()));
        assert!(Identity::parse("spiffe://mesh/a/b").is_none());
        assert!(Identity::parse("").is_none());
    }

    #[test]
    fn spiffe_ids_are_lowercase_up_to_the_path() {
        assert_eq!(
            Identity::parse("spiffe://mesh/Orders"),
            Some(Identity {
                domain: Some("mesh".into()),
                name: "Orders".into()
            }),
            "the path is case-sensitive and may have capitals"
        );
        for bad in [
            "SPIFFE://mesh/orders",
            "Spiffe://mesh/orders",
            "spiffe://MESH/orders",
            "spiffe://Mesh/orders",
        ] {
            assert_eq!(Identity::parse(bad), None, "{bad}");
        }
        let r = rule(&["orders"], None);
        assert!(!r.allows(&Identity::parse("spiffe://mesh/orders2").unwrap()));
        assert!(
            !r.allows(&Identity::parse("spiffe://mesh/ORDERS").unwrap()),
            "paths compare exactly"
        );
    }

    #[test]
    fn refusals_name_the_whole_identity_and_the_reason() {
        let r = rule(&["orders", "spiffe://mesh/frontend"], Some("mesh"));
        let id = |s: &str| Identity::parse(s).unwrap();
        let msg = |s: &str| r.message(&id(s), r.check(&id(s)).unwrap_err());
        assert_eq!(
            msg("spiffe://othermesh/orders"),
            "'spiffe://othermesh/orders' is not of trust domain 'mesh', the only one this route accepts"
        );
        assert_eq!(
            msg("orders"),
            "'orders' has no trust domain; this route accepts SPIFFE IDs of 'mesh' only"
        );
        assert_eq!(
            msg("spiffe://mesh/billing"),
            "'spiffe://mesh/billing' is not among the services that may call this route"
        );
        assert!(r.check(&id("spiffe://mesh/orders")).is_ok());
    }

    #[test]
    fn config_spiffe_ids_and_trust_domains_must_be_lowercase() {
        let ctx = BuildContext::standalone();
        let build = |yaml: &str| {
            let cfg: Config = ctx.parse(&serde_yaml::from_str(yaml).unwrap()).unwrap();
            AllowServices::new(cfg, &ctx).err().map(|e| e.to_string())
        };
        assert_eq!(
            build("services: [orders, 'spiffe://mesh/billing']\ntrust_domain: mesh"),
            None
        );
        let e = build("services: ['spiffe://Mesh/billing']").unwrap();
        assert!(
            e.starts_with("services[0]: 'spiffe://Mesh/billing' is not a service name"),
            "{e}"
        );
        let e = build("services: [orders]\ntrust_domain: Mesh").unwrap();
        assert!(
            e.starts_with("trust_domain: 'Mesh' is not a SPIFFE trust domain"),
            "{e}"
        );
    }
}
