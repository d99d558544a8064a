//! `allow_services`: which service may call this route. The caller's identity comes from its
//! mTLS certificate (URI SAN `spiffe://DOMAIN/SERVICE`, else CN) or from a verified JWT claim.

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
    pub fn parse(s: &str) -> Option<Identity> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("spiffe://") {
            let (domain, name) = rest.split_once('/')?;
            if domain.is_empty() || name.is_empty() || name.contains('/') {
                return None;
            }
            return Some(Identity {
                domain: Some(domain.to_ascii_lowercase()),
                name: name.to_string(),
            });
        }
        (!s.is_empty() && !s.contains('/') && !s.contains(':')).then(|| Identity {
            domain: None,
            name: s.to_string(),
        })
    }
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
                    format!("'{s}' is not a service name or spiffe://DOMAIN/NAME"),
                )
            })?);
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
            trust_domain: cfg.trust_domain.map(|d| d.to_ascii_lowercase()),
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

    fn allows(&self, id: &Identity) -> bool {
        if let Some(td) = &self.trust_domain {
            if id.domain.as_deref() != Some(td.as_str()) {
                return false;
            }
        }
        self.allowed
            .iter()
            .any(|a| a.name == id.name && (a.domain.is_none() || a.domain == id.domain))
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
        if !self.allows(&id) {
            return Verdict::Respond(Reply::error(
                403,
                "service_not_allowed",
                format!("service '{}' may not call this route", id.name),
            ));
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
}
