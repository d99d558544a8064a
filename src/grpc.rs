//! gRPC on the gateway: the `grpc-timeout` a client sends bounds the upstream call.
//!
//! gRPC failures Portico makes itself are gRPC statuses (see [`crate::respond`]); trailers
//! pass through untouched (the `grpc-status` of the answer is recorded for the log and the
//! plugins' outcome).

use std::time::Duration;

/// The longest deadline taken from a client: beyond it the route's own timeouts decide.
const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The call's deadline from its `grpc-timeout` header: 1 to 8 digits and a unit (`H`ours,
/// `M`inutes, `S`econds, `m`illis, `u`micros, `n`anos), per the gRPC HTTP/2 protocol. A
/// malformed value is ignored (as gRPC servers do), and so is a repeated header.
pub fn timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let mut all = headers.get_all("grpc-timeout").iter();
    let v = all.next()?;
    if all.next().is_some() {
        return None;
    }
    parse_timeout(v.to_str().ok()?)
}

fn parse_timeout(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(d.min(MAX_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_timeout("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_timeout("0m"), Some(Duration::ZERO));
    }

    #[test]
    fn refuses_what_the_protocol_does_not_allow() {
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "1.5S", "5 S", "5SS", "0x5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        let mut h = http::HeaderMap::new();
        h.append("grpc-timeout", "1S".parse().unwrap());
        assert_eq!(timeout(&h), Some(Duration::from_secs(1)));
        h.append("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(timeout(&h), None, "two deadlines: neither is trusted");
    }
}
