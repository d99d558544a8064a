//! Reading an HTTP/1 request head on Portico's terms (a deadline for the whole head, a size
//! limit) and the framing verdict on it.

use super::framing::{Body, Framing, RequestBounds};
use super::stream::EdgeStream;
use crate::config::Snapshot;
use crate::plugin::Reply;
use tokio::time::Instant;

/// More request headers than this → 431.
pub const MAX_HEADERS: usize = 128;

/// How reading a request head ended.
pub enum Head {
    /// A whole, well-framed head is buffered; the stream hands Pingora this request and no
    /// more (`framing.rs`).
    Ready,
    /// The peer closed, or stayed idle (between requests) until a timeout or shutdown.
    Closed,
    /// Answer this and close.
    Refuse(Reply),
}

/// Read until a whole head is buffered, within `deadline` and the size limit; then check its
/// framing.
pub async fn read_head(conn: &mut EdgeStream, deadline: Instant, snap: &Snapshot) -> Head {
    conn.bounds = None;
    let max = snap.limits.max_request_header_bytes;
    let mut scanned: usize = 0;
    let mut skip = 0;
    let mut end = None;
    let filled = loop {
        let filled = conn
            .fill_until(deadline, |b| {
                // Empty lines (CRLF) before the request line are skipped, as nginx does (RFC 9112
                // §2.2: a server should ignore at least one; some clients send one after a body):
                // dropped as they come, and counted toward no limit.
                skip = leading_empty_lines(b);
                if skip > 0 && skip == b.len() {
                    return true;
                }
                // Search only what is new (keeping 3 bytes of overlap for a split "\r\n\r\n"),
                // from one CR, LF or NUL to the next (memchr), not through every byte. A head
                // ended by bare LFs is found too, and so are bytes the framing check refuses
                // whatever follows (a NUL, a CR before anything but LF, a folded line): the head
                // "ends" there, to be refused at once rather than held until the header timeout.
                let from = scanned.saturating_sub(3).max(skip);
                end = memchr::memchr3_iter(b'\n', b'\r', 0, &b[from..]).find_map(|i| {
                    let at = from + i;
                    match (b[at], b.get(at + 1), b.get(at + 2)) {
                        (b'\n', Some(b'\n'), _) => Some(at + 2),
                        (b'\n', Some(b'\r'), Some(b'\n')) => Some(at + 3),
                        (b'\n', Some(b' ' | b'\t'), _) => Some(at + 2),
                        (b'\r', Some(&next), _) if next != b'\n' => Some(at + 2),
                        (0, _, _) => Some(at + 1),
                        _ => None,
                    }
                });
                scanned = b.len();
                end.is_some() || b.len() - skip > max
            })
            .await;
        if matches!(filled, Ok(true)) && end.is_none() && skip > 0 && skip == conn.prefix.len() {
            conn.prefix.clear();
            scanned = 0;
            continue;
        }
        break filled;
    };
    match filled {
        Err(_) => {
            crate::metrics::REJECTED_CONNECTIONS
                .with_label_values(&["header_timeout"])
                .inc();
            // Nothing but empty lines (and perhaps the CR of one more) came: no request started.
            let blank = leading_empty_lines(&conn.prefix) + usize::from(conn.prefix.ends_with(b"\r"));
            if conn.prefix.len() <= blank {
                // Closed without an answer, as a connection that sent nothing (and as nginx).
                return Head::Closed;
            }
            Head::Refuse(Reply::error(
                408,
                "request_timeout",
                "the request head did not arrive in time",
            ))
        }
        Ok(false) => Head::Closed,
        Ok(true) => match end {
            Some(end) if end - skip <= max => {
                conn.prefix.drain(..skip);
                let n = end - skip;
                let verdict = match check_framing(&conn.prefix[..n]) {
                    // `HTTP/1.2`…`HTTP/1.9`: read as HTTP/1.1, the highest minor version of the
                    // major one Portico speaks (RFC 9110 §2.5; nginx does the same). httparse
                    // knows only 1.0 and 1.1, so the digit is rewritten in the bytes Pingora
                    // replays — only after a refusal, at no cost to other requests.
                    Err(_) if read_as_http_1_1(&mut conn.prefix[..n]) => check_framing(&conn.prefix[..n]),
                    verdict => verdict,
                };
                match verdict {
                    Ok(framing) => {
                        conn.bounds = Some(RequestBounds::new(n, framing));
                        Head::Ready
                    }
                    Err(reply) => {
                        if reply.status == 505 && conn.prefix.starts_with(b"PRI * HTTP/2.0\r\n") {
                            log::info!("refused an HTTP/2 connection preface: this listener has no `http2: true`");
                        } else if reply.status == 505 {
                            log::info!("answered 505 to a request line naming HTTP/2 or later");
                        }
                        Head::Refuse(reply)
                    }
                }
            }
            _ => Head::Refuse(Reply::error(
                431,
                "request_header_too_large",
                format!("the request head is larger than {max} bytes"),
            )),
        },
    }
}

/// How many bytes at the start of `b` are empty lines (CRLF pairs).
fn leading_empty_lines(b: &[u8]) -> usize {
    let mut n = 0;
    while b[n..].starts_with(b"\r\n") {
        n += 2;
    }
    n
}

/// A request line ending in `HTTP/1.2` to `HTTP/1.9` gets `HTTP/1.1` in its place (same length:
/// the head's bounds stand); `false` for any other line.
fn read_as_http_1_1(head: &mut [u8]) -> bool {
    let Some(eol) = memchr::memchr(b'\n', head) else {
        return false;
    };
    let line_end = if eol > 0 && head[eol - 1] == b'\r' {
        eol - 1
    } else {
        eol
    };
    let line = &mut head[..line_end];
    match line.len().checked_sub(9).map(|at| &mut line[at..]) {
        Some([b' ', b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor @ b'2'..=b'9']) => {
            *minor = b'1';
            true
        }
        _ => false,
    }
}

/// A request line naming HTTP/2 or later (`GET / HTTP/2.0`), which httparse calls a malformed
/// version: nginx answers 505, and so does Portico, with the reason.
fn names_a_later_version(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or(head);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or(b"");
    let Some(number) = version.strip_prefix(b"HTTP/") else {
        return false;
    };
    // `major[.minor]`, as nginx reads it (up to 3 digits each): 2.0, 3.0, 10.0, and a bare 2.
    let (major, minor) = match number.iter().position(|&b| b == b'.') {
        Some(dot) => (&number[..dot], Some(&number[dot + 1..])),
        None => (number, None),
    };
    let digits = |d: &[u8]| (1..=3).contains(&d.len()) && d.iter().all(u8::is_ascii_digit);
    digits(major)
        && minor.is_none_or(digits)
        && std::str::from_utf8(major).ok().and_then(|m| m.parse::<u32>().ok()) >= Some(2)
}

/// RFC 3986's path and query characters (unreserved, sub-delims, `:` `@` `/` `?` `%`).
const PATH_CHARS: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
                    | b'?'
                    | b'%'
            );
        b += 1;
    }
    table
};

/// An origin-form target of RFC 3986 path and query characters only — nearly every request's:
/// the `http` crate accepts every such target, so the full check (a copy and a URI parse, a
/// measurable share of a request's cost) runs only for the others.
fn plain_path(target: &str) -> bool {
    target.starts_with('/') && target.bytes().all(|b| PATH_CHARS[usize::from(b)])
}

fn bad(message: &str) -> Reply {
    Reply::error(400, "bad_request", message)
}

/// Portico's verdict on HTTP/1 framing: anything a server and an upstream could read two ways
/// is refused (the stricter, Envoy-like choice), so the upstream never sees a request the client
/// did not send. An accepted head says how its body is framed.
pub fn check_framing(head: &[u8]) -> Result<Framing, Reply> {
    // An HTTP/2 client with prior knowledge (`curl --http2-prior-knowledge`) on a listener
    // without `http2: true`: nginx answers 505 to a request line of version 2.0; so does
    // Portico, with the reason (the client cannot parse it, but `-v` and the log show it).
    if head.starts_with(b"PRI * HTTP/2.0\r\n") {
        return Err(Reply::error(
            505,
            "http_version_not_supported",
            "HTTP/2 without TLS (h2c) is not enabled on this listener (set `http2: true`)",
        ));
    }
    // Only NUL, CR and LF matter here: jump from one to the next (memchr) instead of matching
    // every byte of the head.
    for i in memchr::memchr3_iter(0, b'\r', b'\n', head) {
        match head[i] {
            0 => return Err(bad("NUL in the request head")),
            b'\r' if head.get(i + 1) != Some(&b'\n') => return Err(bad("a bare CR in the request head")),
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Err(bad("a bare LF in the request head")),
            b'\n' if matches!(head.get(i + 1), Some(b' ' | b'\t')) => {
                return Err(bad("obsolete line folding in the request head"))
            }
            _ => {}
        }
    }
    // Uninitialised slots: httparse fills only as many as the head has (zeroing all 128 was
    // 4 KiB written per request).
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("the request head is incomplete")),
        Err(httparse::Error::Version) if names_a_later_version(head) => {
            return Err(Reply::error(
                505,
                "http_version_not_supported",
                "HTTP/2 and later have their own framing, not an HTTP/1 request line \
                 (HTTP/2: TLS with ALPN, or h2c on a listener with `http2: true`)",
            ))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reply::error(
                431,
                "request_header_too_large",
                format!("the request has more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Err(bad(&format!("the request head is malformed ({e})"))),
    }
    // The request target (RFC 9112 §3.2): origin-form, or absolute-form with an http(s) scheme;
    // authority-form only for CONNECT (answered 405), `*` only for OPTIONS. Anything else would
    // be forwarded as `/`.
    let target = req.path.unwrap_or("");
    let method = req.method.unwrap_or("");
    let absolute = target.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        || target.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://"));
    let origin_form = target.starts_with('/');
    if !(origin_form || absolute || method == "CONNECT" || (method == "OPTIONS" && target == "*")) {
        return Err(bad(
            "the request target must be a path starting with '/' (or an http(s) URL)",
        ));
    }
    // Pingora builds its request head from the target with the `http` crate, which refuses
    // bytes httparse lets through (a `"`, for one) with a bare 400 of its own — no JSON, no
    // trace id, no access-log line. The same check here refuses them the contract's way.
    if !plain_path(target) && pingora::http::RequestHeader::build_no_case(method, target.as_bytes(), Some(0)).is_err() {
        return Err(bad("the request target is not a valid URI"));
    }
    let mut lengths = Vec::new();
    let mut encodings = Vec::new();
    let mut hosts = 0;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    for h in req.headers.iter() {
        // Lower-cased on the stack: only names up to `transfer-encoding`'s length matter here.
        let mut lower = [0u8; 17];
        let name: &[u8] = match lower.get_mut(..h.name.len()) {
            Some(room) => {
                room.copy_from_slice(h.name.as_bytes());
                room.make_ascii_lowercase();
                room
            }
            None => b"",
        };
        match name {
            b"content-length" => lengths.push(h.value),
            b"transfer-encoding" => encodings.push(h.value),
            b"host" => {
                hosts += 1;
                // Pingora answers some invalid hosts (userinfo) with a bare 400 of its own:
                // refuse them all here, with the contract's JSON error.
                let valid = std::str::from_utf8(h.value)
                    .ok()
                    .is_some_and(|v| crate::route::check_host(v).is_ok());
                if !valid {
                    return Err(bad("the Host header is not a valid host"));
                }
            }
            b"upgrade" => upgrade = true,
            b"connection" => {
                connection_upgrade |= h
                    .value
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
            }
            b"content_length" | b"transfer_encoding" | b"host_" => {
                return Err(bad("an underscore variant of a framing header"))
            }
            _ => {}
        }
    }
    if hosts > 1 {
        return Err(bad("more than one Host header"));
    }
    // An absolute-form target names its own authority: it must be the Host.
    if let Some(rest) = req
        .path
        .and_then(|p| p.strip_prefix("http://").or_else(|| p.strip_prefix("https://")))
    {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .map(|h| h.value);
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_bytes())) {
            return Err(bad("the request target's authority and the Host header disagree"));
        }
    }
    if !lengths.is_empty() && !encodings.is_empty() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    if lengths.len() > 1 {
        return Err(bad("more than one Content-Length"));
    }
    if let Some(v) = lengths.first() {
        if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return Err(bad("a malformed Content-Length"));
        }
    }
    if encodings.len() > 1 {
        return Err(bad("more than one Transfer-Encoding"));
    }
    if let Some(v) = encodings.first() {
        if req.version == Some(0) {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !v.eq_ignore_ascii_case(b"chunked") {
            return Err(bad("a Transfer-Encoding other than a lone 'chunked'"));
        }
    }
    let body = match (encodings.is_empty(), lengths.first()) {
        (false, _) => Body::Chunked,
        // At most 19 digits: checked above.
        (true, Some(v)) => Body::Length(std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()).unwrap_or(0)),
        (true, None) => Body::None,
    };
    Ok(Framing {
        body,
        // As Pingora and `exchange` see it: HTTP/1.1, Upgrade, and Connection naming it.
        upgrade: req.version == Some(1) && upgrade && connection_upgrade,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(head: &str) -> u16 {
        check_framing(head.as_bytes()).err().map(|r| r.status).unwrap_or(200)
    }

    #[test]
    fn later_http_1_minor_versions_read_as_1_1() {
        for (line, read) in [
            (
                "GET / HTTP/1.2\r\nHost: a\r\n\r\n",
                Some("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            ),
            ("GET / HTTP/1.9\nHost: a\n\n", Some("GET / HTTP/1.1\nHost: a\n\n")),
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
            ("GET / HTTP/1.0\r\n\r\n", None),
            ("GET / HTTP/1.10\r\n\r\n", None),
            ("GET / HTTP/2.2\r\n\r\n", None),
            ("GET / XHTTP/1.2\r\n\r\n", None),
            ("HTTP/1.2\r\n\r\n", None),
        ] {
            let mut head = line.as_bytes().to_vec();
            assert_eq!(read_as_http_1_1(&mut head), read.is_some(), "{line:?}");
            assert_eq!(head, read.unwrap_or(line).as_bytes(), "{line:?}");
        }
    }

    #[test]
    fn framing_verdicts() {
        assert_eq!(verdict("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(verdict("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"), 200);
        assert_eq!(
            verdict("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            200
        );
        for bad in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\ncontent_length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            // Request targets that are neither a path nor an http(s) URL.
            "GET admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET secret.test:80 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a?x=\"b HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(verdict(bad), 400, "{bad:?}");
        }
        assert_eq!(verdict("PRI * HTTP/2.0\r\n\r\n"), 505, "h2c prior knowledge");
        assert_eq!(verdict("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(verdict("GET / HTTP/3.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(verdict("GET / HTTP/10.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(verdict("GET / HTTP/2\r\nHost: a\r\n\r\n"), 505);
        for not_later in [
            "GET / HTTP/1.2",
            "GET / HTTP/0.9",
            "GET / HTTX/2.0",
            "GET /HTTP/2.0",
            "GET / HTTP/2.",
            "GET / HTTP/2.0x",
            "GET / HTTP/1000.0",
            "GET / http/2.0",
        ] {
            assert_eq!(verdict(&format!("{not_later}\r\nHost: a\r\n\r\n")), 400, "{not_later}");
        }
        assert_eq!(leading_empty_lines(b"\r\n\r\nGET"), 4);
        assert_eq!(leading_empty_lines(b"\r\n\r"), 2);
        assert_eq!(leading_empty_lines(b"\n\r\nGET"), 0, "a bare LF is no empty line");
        assert_eq!(leading_empty_lines(b"GET"), 0);
        assert_eq!(verdict("GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        let framing = |h: &str| check_framing(h.as_bytes()).unwrap();
        assert_eq!(framing("GET / HTTP/1.1\r\nHost: a\r\n\r\n").body, Body::None);
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n").body,
            Body::Length(12)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").body,
            Body::Chunked
        );
        // An upgrade needs HTTP/1.1 and Connection naming it.
        let ws = "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n";
        assert!(framing(&format!("GET / HTTP/1.1\r\nHost: a\r\n{ws}\r\n")).upgrade);
        assert!(!framing("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(!framing(&format!("GET / HTTP/1.0\r\nHost: a\r\n{ws}\r\n")).upgrade);
        let many: String = (0..200).map(|i| format!("x-{i}: y\r\n")).collect();
        assert_eq!(verdict(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")), 431);
    }

    /// The fast path skips the full target check only for targets the full check accepts.
    #[test]
    fn plain_paths_are_valid_targets() {
        let chars: Vec<u8> = (0..=255u8).filter(|&b| PATH_CHARS[usize::from(b)]).collect();
        assert_eq!(chars.len(), 62 + 20);
        // Every character after a '/', alone, in pairs, and all at once (path and query).
        let mut targets: Vec<Vec<u8>> = chars.iter().map(|&c| vec![b'/', c]).collect();
        targets.extend(chars.iter().flat_map(|&a| chars.iter().map(move |&b| vec![b'/', a, b])));
        targets.push([b"/".as_slice(), &chars].concat());
        targets.push([b"/a?".as_slice(), &chars, b"?", &chars].concat());
        for t in targets {
            let t = String::from_utf8(t).unwrap();
            assert!(plain_path(&t), "{t}");
            assert!(
                pingora::http::RequestHeader::build_no_case("GET", t.as_bytes(), Some(0)).is_ok(),
                "{t}"
            );
        }
        for not_plain in ["/a b", "/a\"b", "/a#f", "/a{", "/é", "*", "http://a/"] {
            assert!(!plain_path(not_plain), "{not_plain}");
        }
    }
}
