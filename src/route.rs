//! Request matching: hosts, path prefix / exact path / `{param}` template, methods, headers;
//! and the path normalisation every route decision (and the upstream) sees.
//!
//! (Over 500 lines because of its table of unit tests, kept beside the code they pin down.)

use http::{HeaderName, HeaderValue, Method};

/// Why a request path is refused before routing (answered 400 `bad_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadEscape,
    EncodedSlash,
    Forbidden(char),
    AboveRoot,
    /// `;` (raw or `%3B`): a path parameter, which Servlet containers strip before mapping.
    PathParameter,
    /// A segment ending in `.`, starting or ending with whitespace, or with `::$`.
    AmbiguousSegment,
}

impl PathError {
    pub fn message(&self) -> String {
        match self {
            PathError::NotAbsolute => "the request path must start with '/'".into(),
            PathError::BadEscape => "the request path has a malformed percent-escape".into(),
            PathError::EncodedSlash => "an encoded slash (%2F) or backslash (%5C) is not allowed in the path".into(),
            PathError::Forbidden(c) => format!("the character {:?} is not allowed in the path", c),
            PathError::AboveRoot => "the path climbs above '/' with '..'".into(),
            PathError::PathParameter => "a ';' (path parameter) is not allowed in the path".into(),
            PathError::AmbiguousSegment => {
                "a path segment may not end with '.', start or end with whitespace, or name an NTFS stream ('::$')"
                    .into()
            }
        }
    }
}

/// `b` as a percent-escape in upper-case hex (`%C3`): the one spelling paths are normalised to.
fn push_escape(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 15)] as char);
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalise a request path (no query): percent-decode unreserved characters, upper-case the
/// remaining escapes, merge `//`, resolve `.` and `..`. Encoded slashes and backslashes, NUL and
/// other control characters, and `..` above the root are refused: the path a route decision saw
/// is exactly the path the upstream receives.
///
/// Also refused: spellings that some upstreams read as another path, so a route (and its
/// ACL) on `/admin` would not see them as `/admin` while the upstream does (see
/// [`check_segments`]).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let path = normalize_segments(raw)?;
    check_segments(&path)?;
    Ok(path)
}

/// Refuse what the normalised `path` may mean to an upstream beyond what it says:
///
/// - `;` (raw, or `%3B`): Servlet containers (Tomcat, Jetty, Spring) strip `;parameters` from
///   each segment before mapping, so `/admin;x` is `/admin` and `/x/..;/admin` is `/admin` there
///   ("Breaking Parser Logic"); Spring Security's strict firewall refuses `;` for that reason.
/// - a segment ending in `.` (`/admin.`, `/admin..`, `/admin%2e`), or starting or ending with
///   a space or any other whitespace once decoded (`/admin%20`, `/admin%C2%A0`, U+3000, U+2028,
///   a zero-width space or BOM): Windows/IIS file mapping drops trailing dots and spaces, and
///   suffix-pattern or trimming frameworks (`strip()`, `trim()`) map them to the bare name;
/// - an NTFS stream suffix (`/admin::$DATA`), which IIS serves as the file itself.
///
/// Refusing (400) rather than rewriting keeps the rule "the upstream receives the path routing
/// saw" and leaves no spelling to guess.
fn check_segments(path: &str) -> Result<(), PathError> {
    for seg in path.split('/') {
        if seg.contains(';') || seg.contains("%3B") {
            return Err(PathError::PathParameter);
        }
        if seg.ends_with('.') || seg.starts_with("%20") || seg.ends_with("%20") {
            return Err(PathError::AmbiguousSegment);
        }
        if !seg.is_ascii() || seg.contains('%') || seg.contains(':') {
            let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
            let trimmable =
                |c: char| c.is_whitespace() || matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}');
            let edges = [decoded.chars().next(), decoded.chars().next_back()];
            if edges.into_iter().flatten().any(trimmable) || decoded.contains("::$") {
                return Err(PathError::AmbiguousSegment);
            }
        }
    }
    Ok(())
}

/// Decode, merge and resolve (the first part of [`normalize_path`]).
fn normalize_segments(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Fast path: nothing to decode or encode, and no dot or empty segments.
    if raw.is_ascii()
        && !raw.contains(['%', '\\'])
        && !raw.contains("//")
        && !raw.contains("/.")
        && !bytes.iter().any(|b| b.is_ascii_control() || *b == b' ')
    {
        return Ok(raw.to_string());
    }
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (h, l) = match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => (h, l),
                _ => return Err(PathError::BadEscape),
            };
            let v = h << 4 | l;
            match v {
                b'/' | b'\\' => return Err(PathError::EncodedSlash),
                0..=0x1f | 0x7f => return Err(PathError::Forbidden(v as char)),
                v if is_unreserved(v) => decoded.push(v as char),
                v => push_escape(&mut decoded, v),
            }
            i += 3;
            continue;
        }
        if b == b'\\' || b == b' ' || b.is_ascii_control() {
            return Err(PathError::Forbidden(b as char));
        }
        // A raw byte outside ASCII (RFC 9112 allows none in a target, but clients send them) is
        // written as the escape a conforming client would have sent, so `/café` and
        // `/caf%C3%A9` are one path for routing, and the upstream receives one spelling.
        if !b.is_ascii() {
            push_escape(&mut decoded, b);
            i += 1;
            continue;
        }
        decoded.push(b as char);
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split('/').skip(1) {
        trailing_slash = false;
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if trailing_slash || path.is_empty() {
        path.push('/');
    }
    Ok(path)
}

/// A host pattern: `api.example.com` or `*.example.org` (any depth of subdomain, not the bare
/// domain). Stored lower-case.
#[derive(Debug, Clone)]
pub enum HostPattern {
    Exact(String),
    /// The suffix including the leading dot: `.example.org`.
    Wildcard(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() {
            return Err("a host must not be empty".into());
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(format!("bad wildcard host '{s}': use '*.example.com'"));
            }
            return Ok(HostPattern::Wildcard(format!(
                ".{}",
                rest.strip_suffix('.').unwrap_or(rest)
            )));
        }
        if s.contains('*') || s.contains('/') {
            return Err(format!("bad host '{s}': a wildcard is only allowed as a leading '*.'"));
        }
        let s = strip_port(&s);
        Ok(HostPattern::Exact(s.strip_suffix('.').unwrap_or(s).to_string()))
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

/// The host a request names (`Host`, or the authority), as routing compares it: lower-case,
/// without the port and without a trailing dot (`API.Test.:8080` → `api.test`). Anything that
/// is not a valid authority — userinfo (`@`), `/`, `#`, `?`, spaces, an empty or non-numeric
/// port, an empty label — is refused, so a request cannot slip past a host-restricted route by
/// spelling its host differently.
pub fn normalize_host(raw: &str) -> Result<String, &'static str> {
    check_host(raw).map(str::to_ascii_lowercase)
}

/// [`normalize_host`]'s checks without its copy: the part of `raw` that names the host (still
/// in the client's case), or why `raw` is not a valid authority. One pass over the bytes: it
/// runs twice on every request (the edge's head check and routing).
pub fn check_host(raw: &str) -> Result<&str, &'static str> {
    if raw.is_empty() || raw.len() > 262 {
        return Err("the host is empty or too long");
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']').ok_or("an IPv6 host lacks its ']'")?;
        let (v6, after) = (&rest[..end], &rest[end + 1..]);
        if v6.is_empty() || !v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return Err("the host is not a valid IPv6 literal");
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after an IPv6 host")?),
        };
        (&raw[..end + 2], port)
    } else {
        match raw.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        }
    };
    if let Some(p) = port {
        let mut value: u32 = 0;
        if p.is_empty() || p.len() > 5 {
            return Err("the host's port is not a number");
        }
        for b in p.bytes() {
            if !b.is_ascii_digit() {
                return Err("the host's port is not a number");
            }
            value = value * 10 + u32::from(b - b'0');
        }
        if value > 65535 {
            return Err("the host's port is not a number");
        }
    }
    if host.starts_with('[') {
        return Ok(host);
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err("the host name is empty or too long");
    }
    let mut label = 0usize;
    for b in name.bytes() {
        if b == b'.' {
            if label == 0 {
                return Err("the host has an empty or overlong label");
            }
            label = 0;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err("the host has a character a host name cannot have");
        }
        label += 1;
        if label > 63 {
            return Err("the host has an empty or overlong label");
        }
    }
    if label == 0 {
        return Err("the host has an empty or overlong label");
    }
    Ok(name)
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[derive(Debug, Clone)]
pub enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Any,
    /// Segment-aware: `/users` matches `/users` and `/users/7`, not `/usersX`.
    Prefix(String),
    Exact(String),
    Template(Vec<Segment>),
}

impl PathMatch {
    pub fn prefix(p: &str) -> Result<Self, String> {
        let p = &config_path(p);
        check_config_path(p)?;
        if p == "/" {
            return Ok(PathMatch::Any);
        }
        Ok(PathMatch::Prefix(p.trim_end_matches('/').to_string()))
    }

    pub fn path(p: &str) -> Result<Self, String> {
        let p = &config_path(p);
        check_config_path(p)?;
        if !p.contains('{') {
            return Ok(PathMatch::Exact(p.to_string()));
        }
        let mut segs = Vec::new();
        let mut names = Vec::new();
        for s in p.split('/').skip(1) {
            if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "bad template parameter '{s}' in '{p}': use {{name}} with letters, digits or '_'"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("parameter '{name}' appears twice in '{p}'"));
                }
                names.push(name);
                segs.push(Segment::Param(name.to_string()));
            } else if s.contains('{') || s.contains('}') {
                return Err(format!(
                    "bad template segment '{s}' in '{p}': a parameter fills a whole segment"
                ));
            } else {
                segs.push(Segment::Literal(s.to_string()));
            }
        }
        Ok(PathMatch::Template(segs))
    }

    /// The template's parameter names (for plugins that refer to `{params}`).
    pub fn params(&self) -> Vec<String> {
        match self {
            PathMatch::Template(segs) => segs
                .iter()
                .filter_map(|s| match s {
                    Segment::Param(n) => Some(n.clone()),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    }

    fn matches(&self, path: &str, params: &mut Vec<(String, String)>) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str()) && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatch::Exact(p) => path == p,
            PathMatch::Template(segs) => {
                let mut parts = path.split('/').skip(1);
                for seg in segs {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    match seg {
                        Segment::Literal(l) if l == part => {}
                        Segment::Literal(_) => return false,
                        Segment::Param(_) if part.is_empty() => return false,
                        Segment::Param(n) => params.push((n.clone(), part.to_string())),
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// A path as written in the config, its non-ASCII characters written as upper-case escapes
/// (`/café` → `/caf%C3%A9`): the spelling requests are normalised to.
fn config_path(p: &str) -> std::borrow::Cow<'_, str> {
    if p.is_ascii() {
        return p.into();
    }
    let mut out = String::with_capacity(p.len() * 3);
    for b in p.bytes() {
        if b.is_ascii() {
            out.push(b as char);
        } else {
            push_escape(&mut out, b);
        }
    }
    out.into()
}

/// A path written in the config must already be in normal form, or it could never match. Its
/// non-ASCII characters are first written as escapes ([`config_path`]), as requests' are.
fn check_config_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("'{p}' must start with '/'"));
    }
    let probe = p.replace(['{', '}'], "");
    match normalize_path(&probe) {
        Ok(n) if n == probe => Ok(()),
        Ok(n) => Err(format!("'{p}' is not in normal form (it would match as '{n}')")),
        Err(e) => Err(format!("'{p}': {}", e.message())),
    }
}

/// A compiled `match:` block.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub hosts: Vec<HostPattern>,
    pub path: PathMatch,
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// What routing looks at, computed once per request.
pub struct RequestKey<'a> {
    /// Lower-case, without port.
    pub host: &'a str,
    /// Normalised.
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a http::HeaderMap,
}

impl Matcher {
    pub fn matches(&self, req: &RequestKey<'_>, params: &mut Vec<(String, String)>) -> bool {
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| h.matches(req.host)) {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(req.method) {
            return false;
        }
        for (name, value) in &self.headers {
            if !req.headers.get_all(name).iter().any(|v| v == value) {
                return false;
            }
        }
        params.clear();
        self.path.matches(req.path, params)
    }
}

/// Where a request's route is looked for, so that finding it does not try every route: routes
/// are filed by exact host and by the first segment of the path they match, and a request
/// tries, in file order, only those filed under its host and first segment and those that
/// accept any (no `hosts`, a wildcard host, a path matching any first segment). The first
/// match in file order still wins: each list is in file order and they are merged.
#[derive(Debug, Default)]
pub struct RouteIndex {
    hosts: std::collections::HashMap<String, Buckets>,
    any_host: Buckets,
    /// Below this many routes a scan is cheaper than two hash lookups, and is used instead.
    scan: bool,
}

/// Up to this many routes, [`RouteIndex`] scans them all.
const SCAN_UP_TO: usize = 8;

#[derive(Debug, Default)]
struct Buckets {
    by_segment: std::collections::HashMap<String, Vec<u32>>,
    any_segment: Vec<u32>,
}

impl Buckets {
    fn file(&mut self, segment: Option<&str>, i: u32) {
        let list = match segment {
            Some(s) => self.by_segment.entry(s.to_string()).or_default(),
            None => &mut self.any_segment,
        };
        // A route that names the same host twice is filed once.
        if list.last() != Some(&i) {
            list.push(i);
        }
    }

    fn lists(&self, segment: &str) -> [&[u32]; 2] {
        [
            self.by_segment.get(segment).map_or(&[][..], Vec::as_slice),
            &self.any_segment,
        ]
    }
}

/// The first segment of a normalised path: `/users/7` → `users`, `/` → ``.
fn first_segment(path: &str) -> &str {
    let rest = path.strip_prefix('/').unwrap_or(path);
    rest.split('/').next().unwrap_or("")
}

impl PathMatch {
    /// The first segment every path this matches has, when there is one.
    fn first_segment(&self) -> Option<&str> {
        match self {
            PathMatch::Any => None,
            PathMatch::Prefix(p) | PathMatch::Exact(p) => Some(first_segment(p)),
            PathMatch::Template(segs) => match segs.first() {
                Some(Segment::Literal(l)) => Some(l),
                _ => None,
            },
        }
    }
}

impl RouteIndex {
    /// The index of routes whose match blocks are `matchers`, in file order.
    pub fn build<'a>(matchers: impl ExactSizeIterator<Item = &'a Matcher>) -> Self {
        let mut index = RouteIndex {
            scan: matchers.len() <= SCAN_UP_TO,
            ..RouteIndex::default()
        };
        for (i, m) in matchers.enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 routes (the config bounds them)");
            let segment = m.path.first_segment();
            let exact_only = !m.hosts.is_empty() && m.hosts.iter().all(|h| matches!(h, HostPattern::Exact(_)));
            if !exact_only {
                index.any_host.file(segment, i);
                continue;
            }
            for host in &m.hosts {
                if let HostPattern::Exact(h) = host {
                    index.hosts.entry(h.clone()).or_default().file(segment, i);
                }
            }
        }
        index
    }

    /// The routes worth trying for `key` (by position, in file order), given `count` routes.
    pub fn candidates<'a>(&'a self, key: &RequestKey<'_>, count: usize) -> impl Iterator<Item = usize> + 'a {
        let mut scan = if self.scan { 0..count } else { 0..0 };
        let segment = first_segment(key.path);
        let none: [&[u32]; 2] = [&[], &[]];
        let [a, b] = match self.hosts.get(key.host) {
            Some(buckets) if !self.scan => buckets.lists(segment),
            _ => none,
        };
        let [c, d] = if self.scan { none } else { self.any_host.lists(segment) };
        let mut lists = [a, b, c, d];
        std::iter::from_fn(move || {
            if let Some(i) = scan.next() {
                return Some(i);
            }
            // The lowest position at the head of a list: a merge keeps file order.
            let (k, first) = lists
                .iter()
                .enumerate()
                .filter_map(|(k, l)| l.first().map(|f| (k, *f)))
                .min_by_key(|(_, f)| *f)?;
            lists[k] = &lists[k][1..];
            Some(first as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        let ok = |a: &str, b: &str| assert_eq!(normalize_path(a).unwrap(), b, "{a}");
        ok("/", "/");
        ok("/users/7", "/users/7");
        ok("//admin", "/admin");
        ok("/./admin", "/admin");
        ok("/x/../admin", "/admin");
        ok("/%61dmin", "/admin");
        ok("/a/%2e%2e/admin", "/admin");
        ok("/a/b/..", "/a/");
        ok("/a/./", "/a/");
        ok("/a%7eb", "/a~b");
        ok("/a%3fb", "/a%3Fb");
        ok("/.well-known/x", "/.well-known/x");
        ok("/v1.2/a..b/my%20file", "/v1.2/a..b/my%20file");
        ok("/%252f", "/%252f");
        ok("/users/", "/users/");
        // Raw non-ASCII bytes and their escapes are one path (attack-v3 D1).
        ok("/caf\u{e9}", "/caf%C3%A9");
        ok("/caf%c3%a9", "/caf%C3%A9");
        ok("/caf%C3%A9/x", "/caf%C3%A9/x");
        let bad = |a: &str| assert!(normalize_path(a).is_err(), "{a}");
        bad("/%2fadmin");
        bad("/a%2Fb");
        bad("/%5cadmin");
        bad("/a\\b");
        bad("/..");
        bad("/a/../../b");
        bad("/%2e%2e/x");
        bad("/a%00");
        bad("/a%zz");
        bad("/a%2");
        bad("admin");
        bad("*");
    }

    /// Spellings an upstream may read as `/admin` while routing would not (attack-c D3).
    #[test]
    fn ambiguous_spellings_of_a_segment_are_refused() {
        for (path, why) in [
            ("/admin;x", PathError::PathParameter),
            ("/admin;/x", PathError::PathParameter),
            ("/;/admin", PathError::PathParameter),
            ("/x/..;/admin", PathError::PathParameter),
            ("/admin%3B", PathError::PathParameter),
            ("/admin%3bx", PathError::PathParameter),
            ("/admin;jsessionid=1", PathError::PathParameter),
            ("/admin.", PathError::AmbiguousSegment),
            ("/admin..", PathError::AmbiguousSegment),
            ("/admin%2e", PathError::AmbiguousSegment),
            ("/admin%2E%2e/x", PathError::AmbiguousSegment),
            ("/admin./x", PathError::AmbiguousSegment),
            ("/admin%20", PathError::AmbiguousSegment),
            ("/%20admin", PathError::AmbiguousSegment),
            ("/%20/admin", PathError::AmbiguousSegment),
            // Whitespace a trimming upstream drops (`strip()`, `trim()`), and NTFS streams.
            ("/admin%C2%A0", PathError::AmbiguousSegment),
            ("/%C2%A0/admin", PathError::AmbiguousSegment),
            ("/admin%E3%80%80", PathError::AmbiguousSegment),
            ("/admin%E2%80%A8", PathError::AmbiguousSegment),
            ("/admin%EF%BB%BF", PathError::AmbiguousSegment),
            ("/%E2%80%8Badmin", PathError::AmbiguousSegment),
            ("/admin%C2%85", PathError::AmbiguousSegment),
            ("/admin%09", PathError::Forbidden('\t')),
            ("/admin::$DATA", PathError::AmbiguousSegment),
            ("/admin%3A%3A$DATA", PathError::AmbiguousSegment),
        ] {
            assert_eq!(normalize_path(path), Err(why), "{path}");
        }
        // What is not ambiguous still passes: inner spaces and dots, UTF-8, colons.
        for path in ["/my%20file", "/v1.2/x", "/caf%C3%A9", "/v1/projects/p:run", "/a%C2%A0b"] {
            assert!(normalize_path(path).is_ok(), "{path}");
        }
    }

    fn key<'a>(path: &'a str, host: &'a str, m: &'a Method, h: &'a http::HeaderMap) -> RequestKey<'a> {
        RequestKey {
            host,
            path,
            method: m,
            headers: h,
        }
    }

    /// The index finds exactly the route a scan in file order finds, for every request, with
    /// few routes (scanned) and many (indexed): hosts exact, wildcard and absent, paths by
    /// prefix, exact, template and any, and method conditions.
    #[test]
    fn the_index_finds_the_route_a_scan_in_file_order_finds() {
        let hosts: [&[&str]; 5] = [
            &[],
            &["a.test"],
            &["b.test", "a.test"],
            &["*.c.test"],
            &["a.test", "*.c.test"],
        ];
        let paths = [
            PathMatch::Any,
            PathMatch::prefix("/users").unwrap(),
            PathMatch::prefix("/users/admin").unwrap(),
            PathMatch::path("/").unwrap(),
            PathMatch::path("/users").unwrap(),
            PathMatch::path("/users/{id}").unwrap(),
            PathMatch::path("/{x}/orders").unwrap(),
            PathMatch::prefix("/orders").unwrap(),
        ];
        let methods: [&[Method]; 3] = [&[], &[Method::GET], &[Method::POST, Method::PUT]];
        let mut seed: u32 = 7;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) as usize % n
        };
        let mut all: Vec<Matcher> = Vec::new();
        for _ in 0..60 {
            all.push(Matcher {
                hosts: hosts[next(hosts.len())]
                    .iter()
                    .map(|h| HostPattern::parse(h).unwrap())
                    .collect(),
                path: paths[next(paths.len())].clone(),
                methods: methods[next(methods.len())].to_vec(),
                headers: vec![],
            });
        }
        let none = http::HeaderMap::new();
        for count in [1, 3, 8, 9, 20, 60] {
            let routes = &all[..count];
            let index = RouteIndex::build(routes.iter());
            for host in ["a.test", "b.test", "x.c.test", "c.test", "other.test", ""] {
                for path in [
                    "/",
                    "/users",
                    "/users/7",
                    "/users/admin/x",
                    "/orders",
                    "/orders/1",
                    "/x/orders",
                    "/usersX",
                ] {
                    for m in [Method::GET, Method::POST, Method::DELETE] {
                        let k = key(path, host, &m, &none);
                        let (mut p1, mut p2) = (vec![], vec![]);
                        let scanned = routes.iter().position(|r| r.matches(&k, &mut p1));
                        let indexed = index.candidates(&k, count).find(|&i| routes[i].matches(&k, &mut p2));
                        assert_eq!(indexed, scanned, "{count} routes: {m} {host}{path}");
                        if scanned.is_some() {
                            assert_eq!(p1, p2, "{count} routes: {m} {host}{path}");
                        }
                    }
                }
            }
        }
        // With many routes, a request tries only its own: one host's routes are not tried for
        // another's requests.
        let many: Vec<Matcher> = (0..100)
            .map(|i| Matcher {
                hosts: vec![HostPattern::parse(&format!("h{i}.test")).unwrap()],
                path: PathMatch::prefix(&format!("/s{}", i % 10)).unwrap(),
                methods: vec![],
                headers: vec![],
            })
            .collect();
        let index = RouteIndex::build(many.iter());
        let k = key("/s7/x", "h57.test", &Method::GET, &none);
        assert_eq!(index.candidates(&k, many.len()).collect::<Vec<_>>(), vec![57]);
    }

    /// A route written with non-ASCII characters, or with their escapes, matches both spellings
    /// of a request (a route on `/café` could be skipped with `/caf%C3%A9`).
    #[test]
    fn non_ascii_paths_match_in_either_spelling() {
        let none = http::HeaderMap::new();
        for written in ["/caf\u{e9}", "/caf%C3%A9"] {
            let m = PathMatch::prefix(written).unwrap();
            for sent in ["/caf\u{e9}", "/caf%C3%A9", "/caf%c3%a9", "/caf\u{e9}/menu"] {
                let path = normalize_path(sent).unwrap();
                let k = key(&path, "", &Method::GET, &none);
                assert!(m.matches(k.path, &mut vec![]), "{written} vs {sent}");
            }
            assert!(PathMatch::path(&format!("{written}/{{id}}")).is_ok());
        }
    }

    #[test]
    fn prefix_is_segment_aware() {
        let p = PathMatch::prefix("/users").unwrap();
        let mut params = vec![];
        assert!(p.matches("/users", &mut params));
        assert!(p.matches("/users/7", &mut params));
        assert!(!p.matches("/usersX", &mut params));
        assert!(!p.matches("/Users", &mut params));
        assert!(PathMatch::prefix("/").unwrap().matches("/anything", &mut params));
    }

    #[test]
    fn templates_capture_params() {
        let p = PathMatch::path("/profile/{id}/posts/{post}").unwrap();
        let mut params = vec![];
        assert!(p.matches("/profile/42/posts/9", &mut params));
        assert_eq!(params, vec![("id".into(), "42".into()), ("post".into(), "9".into())]);
        params.clear();
        assert!(!p.matches("/profile/42/posts", &mut params));
        params.clear();
        assert!(!p.matches("/profile//posts/9", &mut params));
        assert!(PathMatch::path("/a/{x").is_err());
        assert!(PathMatch::path("/a/{x}{y}").is_err());
        assert!(PathMatch::path("/a/{x}/{x}").is_err());
        assert!(PathMatch::prefix("/a//b").is_err());
    }

    #[test]
    fn hosts_and_methods() {
        let h = http::HeaderMap::new();
        let m = Matcher {
            hosts: vec![
                HostPattern::parse("API.example.com").unwrap(),
                HostPattern::parse("*.example.org").unwrap(),
            ],
            path: PathMatch::Any,
            methods: vec![Method::GET],
            headers: vec![],
        };
        let mut p = vec![];
        assert!(m.matches(&key("/", "api.example.com", &Method::GET, &h), &mut p));
        assert!(m.matches(&key("/", "a.b.example.org", &Method::GET, &h), &mut p));
        assert!(!m.matches(&key("/", "example.org", &Method::GET, &h), &mut p));
        assert!(!m.matches(&key("/", "api.example.com", &Method::POST, &h), &mut p));
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn hosts_normalise_or_are_refused() {
        for (raw, want) in [
            ("api.test", "api.test"),
            ("api.test.", "api.test"),
            ("API.TEST:8080", "api.test"),
            ("Api.Test.:443", "api.test"),
            ("127.0.0.1:80", "127.0.0.1"),
            ("[::1]:8080", "[::1]"),
            ("[::FFFF:10.0.0.1]", "[::ffff:10.0.0.1]"),
            ("svc_internal", "svc_internal"),
        ] {
            assert_eq!(normalize_host(raw).as_deref(), Ok(want), "{raw}");
        }
        for bad in [
            "",
            "api.test/x",
            "api.test#",
            "api.test:abc",
            "a b",
            "api.test:",
            "user@api.test",
            "api..test",
            ".api.test",
            "api.test?x",
            "[::1",
            "[::1]x",
            "[zz]",
            "api.test:99999",
            "a\\b",
            "api.test:8080:1",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }
}
