//! Who the client is: the TCP peer, or — behind trusted proxies — the right-most untrusted hop
//! of `X-Forwarded-For`. Resolved once per request; every plugin uses the same answer.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// Finds the client's address: the peer, unless the peer is a trusted proxy; then the
/// right-most address of X-Forwarded-For that is not itself trusted.
#[derive(Debug, Clone, Default)]
pub struct ClientIpResolver {
    pub trusted: Vec<IpNet>,
}

/// `::ffff:10.0.0.1` is `10.0.0.1`.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl ClientIpResolver {
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    pub fn resolve(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        let peer = canonical_ip(peer);
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        // Walk the hops right to left; stop at the first address not ours to trust, or at junk.
        let values: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
            let hop = hop.trim();
            let Some(ip) = parse_forwarded_ip(hop) else {
                break;
            };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }
}

fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical_ip(ip));
    }
    // `1.2.3.4:5678` or `[::1]:5678`
    s.parse::<SocketAddr>().ok().map(|a| canonical_ip(a.ip()))
}
