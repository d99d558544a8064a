//! Small HTTP helpers shared by the core and plugins.

use http::{HeaderMap, HeaderName};

/// An IP address as text, appended to `out`. IPv4 by hand: `Display` goes through the
/// formatting machinery, a measurable share of a request's cost where this runs per request
/// (`X-Forwarded-For`, rate-limit keys, header templates).
pub fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            // Into a stack buffer, octet by octet (at most three digits, no division of a u64).
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    text[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    text[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                text[len] = b'0' + octet % 10;
                len += 1;
            }
            out.push_str(std::str::from_utf8(&text[..len]).expect("ASCII digits and dots"));
        }
        v6 => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// A number in decimal, appended to `out` (by hand, as [`push_ip`]).
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
}

/// A number in decimal (see [`push_u64`]).
pub fn u64_text(n: u64) -> String {
    let mut out = String::with_capacity(20);
    push_u64(&mut out, n);
    out
}

/// A header name as written in the config (any case), or why it is not one.
pub fn header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes()).map_err(|_| format!("'{s}' is not a valid header name"))
}

/// A CIDR (`10.0.0.0/8`) or a single address (`10.1.2.3`, as a /32 or /128).
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Add `token` to the response's `Vary`, keeping a single header with every value (a cache
/// reads several `Vary` headers as one list, but some clients and tests read only the first).
pub fn add_vary(resp: &mut pingora::http::ResponseHeader, token: &str) {
    let mut tokens: Vec<String> = resp
        .headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.iter().any(|t| t == "*" || t.eq_ignore_ascii_case(token)) {
        if resp.headers.get_all(http::header::VARY).iter().count() <= 1 {
            return;
        }
    } else {
        tokens.push(token.to_string());
    }
    let _ = resp.insert_header(http::header::VARY, tokens.join(", "));
}

/// Remove cookie `name` from the request's `Cookie` headers (the others stay, in order).
pub fn remove_cookie(req: &mut pingora::http::RequestHeader, name: &str) {
    let kept: Vec<String> = req
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split_once('=').map(|(k, _)| k) != Some(name))
        .map(str::to_string)
        .collect();
    if req.headers.contains_key(http::header::COOKIE) {
        req.remove_header(&http::header::COOKIE);
    }
    if !kept.is_empty() {
        let _ = req.insert_header(http::header::COOKIE, kept.join("; "));
    }
}

/// The (percent-decoded) value of query parameter `name`.
pub fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    let q = uri.query()?;
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| percent_encoding::percent_decode_str(k).decode_utf8_lossy() == name)
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// How many times query parameter `name` appears (names compared percent-decoded).
pub fn query_params(uri: &http::Uri, name: &str) -> usize {
    uri.query().map_or(0, |q| {
        q.split('&')
            .filter(|kv| {
                percent_encoding::percent_decode_str(kv.split_once('=').map_or(*kv, |(k, _)| k)).decode_utf8_lossy()
                    == name
            })
            .count()
    })
}

/// `uri` without query parameter `name` (every occurrence).
pub fn without_query_param(uri: &http::Uri, name: &str) -> Option<http::Uri> {
    let q = uri.query()?;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| {
            let k = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
            percent_encoding::percent_decode_str(k).decode_utf8_lossy() != name
        })
        .collect();
    let pq = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    http::Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_and_addresses_read_as_display_does() {
        for n in [0, 7, 10, 99, 1000, 65535, u64::MAX] {
            assert_eq!(super::u64_text(n), n.to_string());
        }
        for ip in [
            "0.0.0.0",
            "10.0.0.255",
            "255.255.255.255",
            "1.22.199.200",
            "100.9.10.99",
            "::1",
            "2001:db8::7",
        ] {
            let mut out = String::from("ip:");
            super::push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, format!("ip:{ip}"));
        }
    }

    use super::*;

    #[test]
    fn query_helpers() {
        let uri: http::Uri = "/a?x=1&key=s%20e&y=2&key=again".parse().unwrap();
        assert_eq!(query_param(&uri, "key").as_deref(), Some("s e"));
        assert_eq!(without_query_param(&uri, "key").unwrap().to_string(), "/a?x=1&y=2");
        let only: http::Uri = "/a?key=1".parse().unwrap();
        assert_eq!(without_query_param(&only, "key").unwrap().to_string(), "/a");
    }

    #[test]
    fn vary_stays_one_header() {
        let mut r = pingora::http::ResponseHeader::build(200, None).unwrap();
        r.append_header("vary", "Origin, Access-Control-Request-Method")
            .unwrap();
        add_vary(&mut r, "origin");
        add_vary(&mut r, "accept-encoding");
        let all: Vec<_> = r.headers.get_all("vary").iter().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0], "Origin, Access-Control-Request-Method, accept-encoding");
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1; session=xyz".parse().unwrap());
        assert_eq!(cookie(&h, "session"), Some("xyz"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
