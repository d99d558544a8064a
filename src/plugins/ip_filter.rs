//! `ip_filter`: allow or deny by the client address `client_ip` resolved (never by a header a
//! client could forge). Deny wins; a non-empty allow list refuses everyone else.

use crate::config::{canonical_ip, ConfigError};
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, Reply, RequestState, Verdict};
use async_trait::async_trait;
use ipnet::IpNet;
use pingora::http::RequestHeader;
use serde::Deserialize;
use std::net::IpAddr;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

fn nets(list: &[String], field: &str) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            crate::util::parse_net(s).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}[{i}]"),
                    format!("'{s}' is not a CIDR (e.g. 10.0.0.0/8) or an IP address"),
                )
            })
        })
        .collect()
}

impl IpFilter {
    pub fn new(cfg: Config, _ctx: &BuildContext) -> Result<Self, ConfigError> {
        if cfg.allow.is_empty() && cfg.deny.is_empty() {
            return Err(ConfigError::new("", "give 'allow', 'deny' or both"));
        }
        Ok(IpFilter {
            allow: nets(&cfg.allow, "allow")?,
            deny: nets(&cfg.deny, "deny")?,
        })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        // An IPv4 client also matches IPv4-mapped IPv6 ranges written in the config.
        let mapped = match ip {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            _ => None,
        };
        let hit = |n: &IpNet| n.contains(&ip) || mapped.is_some_and(|m| n.contains(&m));
        if self.deny.iter().any(hit) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(hit)
    }
}

#[async_trait]
impl Plugin for IpFilter {
    fn kind(&self) -> PluginKind {
        PluginKind::Edge
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    async fn request(&self, _req: &mut RequestHeader, st: &mut RequestState) -> Verdict {
        if self.permits(st.client_ip) {
            Verdict::Continue
        } else {
            Verdict::Respond(Reply::error(
                403,
                "forbidden",
                "requests from this address are not allowed",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_allow_is_exclusive() {
        let f = IpFilter {
            allow: nets(&["127.0.0.0/24".into(), "::1".into()], "allow").unwrap(),
            deny: nets(&["127.0.0.9".into()], "deny").unwrap(),
        };
        assert!(f.permits("127.0.0.5".parse().unwrap()));
        assert!(!f.permits("127.0.0.9".parse().unwrap()));
        assert!(!f.permits("10.0.0.1".parse().unwrap()));
        assert!(f.permits("::ffff:127.0.0.5".parse().unwrap()));
        assert!(f.permits("::1".parse().unwrap()));
        let mapped_rule = IpFilter {
            allow: nets(&["::ffff:10.0.0.0/104".into()], "allow").unwrap(),
            deny: vec![],
        };
        assert!(mapped_rule.permits("10.1.2.3".parse().unwrap()));
    }
}
