//! One line per request (JSON or Apache's combined format), from a plain [`Record`] that the
//! proxy path and the edge layer fill alike. Lines are formatted on the request's task and
//! handed to one writer thread, which flushes only when it runs out of lines: no lock and no
//! flush per request on the hot path.
//!
//! The lines go to stdout, or to `access_log.path` (appended to). `SIGUSR1` reopens the file,
//! as nginx does, so logrotate can move it away: lines written before the reopen are in the
//! moved file, lines after it in the new one, none lost.

use crate::config::raw::LogFormat;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the access log says about one request. Fields the request never had (a head refused
/// before its request line was read) are empty.
#[derive(Debug, Clone, Default)]
pub struct Record<'a> {
    pub time: Option<SystemTime>,
    pub trace_id: &'a str,
    /// The W3C trace id (32 hex digits).
    pub traceparent_id: &'a str,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub host: &'a str,
    /// The request target as the client sent it (credentials in the query already removed).
    pub target: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0`, …
    pub protocol: &'a str,
    pub status: u16,
    /// The route's name, or `none`.
    pub route: &'a str,
    pub upstream: &'a str,
    pub endpoint: Option<&'a str>,
    pub consumer: Option<&'a str>,
    pub duration: Duration,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    pub user_agent: Option<&'a str>,
    pub referer: Option<&'a str>,
    /// Portico's error code, when Portico made the answer.
    pub error: Option<&'a str>,
}

pub struct AccessLog {
    /// Started on first use, so a daemonized process starts it after the fork.
    tx: OnceLock<SyncSender<String>>,
    target: Arc<Target>,
}

/// Where the writer writes, and when it must open it again.
#[derive(Default)]
struct Target {
    path: Mutex<Option<PathBuf>>,
    /// Set by SIGUSR1, or by a reload that names another file.
    reopen: Arc<AtomicBool>,
}

impl Default for AccessLog {
    fn default() -> Self {
        let target = Arc::new(Target::default());
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, target.reopen.clone()) {
            log::warn!("cannot listen for SIGUSR1, the access log will not be reopened by signal: {e}");
        }
        AccessLog {
            tx: OnceLock::new(),
            target,
        }
    }
}

fn open(target: &Target) -> Box<dyn Write + Send> {
    let path = target.path.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(p) = path {
        match std::fs::OpenOptions::new().create(true).append(true).open(&p) {
            Ok(f) => return Box::new(std::io::BufWriter::with_capacity(64 << 10, f)),
            Err(e) => log::error!("cannot open the access log {}: {e}; writing to stdout", p.display()),
        }
    }
    Box::new(std::io::BufWriter::with_capacity(64 << 10, std::io::stdout()))
}

fn writer(rx: Receiver<String>, target: Arc<Target>) {
    target.reopen.store(false, Ordering::SeqCst);
    let mut out = open(&target);
    while let Ok(line) = rx.recv() {
        if target.reopen.swap(false, Ordering::SeqCst) {
            let _ = out.flush();
            out = open(&target);
        }
        let _ = out.write_all(line.as_bytes());
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
    }
}

impl AccessLog {
    /// Write to this file from now on (`None`: stdout). A reload that names another file
    /// switches to it with the next line.
    pub fn set_path(&self, path: Option<PathBuf>) {
        let mut current = self.target.path.lock().unwrap_or_else(|p| p.into_inner());
        if *current != path {
            *current = path;
            self.target.reopen.store(true, Ordering::SeqCst);
        }
    }

    fn sender(&self) -> &SyncSender<String> {
        self.tx.get_or_init(|| {
            let (tx, rx) = sync_channel(16 * 1024);
            let target = self.target.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || writer(rx, target))
                .expect("spawn access log writer");
            tx
        })
    }

    /// Write one ready-made line (a newline is added).
    pub fn write_line(&self, mut line: String) {
        line.push('\n');
        // Never block a request on a slow log: a full queue drops the line (and says so).
        if let Err(TrySendError::Full(_)) = self.sender().try_send(line) {
            log::warn!("access log writer is behind; a line was dropped");
        }
    }

    pub fn write(&self, format: LogFormat, r: &Record<'_>) {
        self.write_line(format_line(format, r));
    }
}

/// The line for `r` in `format`.
pub fn format_line(format: LogFormat, r: &Record<'_>) -> String {
    let time = r.time.unwrap_or_else(SystemTime::now);
    let duration_ms = r.duration.as_secs_f64() * 1000.0;
    match format {
        LogFormat::Json => serde_json::json!({
            "time": humantime::format_rfc3339_millis(time).to_string(),
            "trace_id": r.trace_id,
            "traceparent_id": r.traceparent_id,
            "client_ip": r.client_ip.map(|ip| ip.to_string()),
            "method": r.method,
            "host": r.host,
            "path": r.target,
            "protocol": r.protocol,
            "status": r.status,
            "route": r.route,
            "upstream": r.upstream,
            "endpoint": r.endpoint,
            "consumer": r.consumer,
            "duration_ms": (duration_ms * 1000.0).round() / 1000.0,
            "bytes_sent": r.bytes_sent,
            "bytes_received": r.bytes_received,
            "user_agent": r.user_agent,
            "error": r.error,
        })
        .to_string()
        .one_line(),
        LogFormat::Combined => {
            // Apache's combined format, then Portico's own fields as key=value pairs (parsers
            // of the combined format ignore what follows the user agent). Every field a client
            // or a token controls is escaped as nginx does: one line per request, whatever they
            // hold, and unquoted fields without spaces.
            let quoted = |v: Option<&str>| v.map(|s| escape(s, true)).unwrap_or_else(|| "-".into());
            let word = |v: &str| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    escape(v, false)
                }
            };
            let request = if r.method.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{} {} {}",
                    escape(r.method, false),
                    escape(r.target, false),
                    escape(r.protocol, false)
                )
            };
            format!(
                "{} - {} [{}] \"{}\" {} {} \"{}\" \"{}\" trace_id={} route={} upstream={} duration_ms={:.3}",
                r.client_ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
                word(r.consumer.unwrap_or("")),
                apache_time(time),
                request,
                r.status,
                r.bytes_sent,
                quoted(r.referer),
                quoted(r.user_agent),
                word(r.trace_id),
                word(r.route),
                word(r.upstream),
                duration_ms
            )
        }
    }
}

/// Characters JSON lets stand raw that some line splitters (Python's `splitlines`, a few log
/// shippers) take for line ends: written as `\uXXXX` (they can only be inside strings), so a
/// JSON line is one line for every reader.
trait JsonLine {
    fn one_line(self) -> String;
}

impl JsonLine for String {
    fn one_line(self) -> String {
        if !self.contains(['\u{85}', '\u{2028}', '\u{2029}']) {
            return self;
        }
        self.replace('\u{85}', "\\u0085")
            .replace('\u{2028}', "\\u2028")
            .replace('\u{2029}', "\\u2029")
    }
}

/// nginx's `escape=default` for a combined-format field: `"`, `\`, and every byte below 0x20
/// or from 0x7F up (control characters, and all of UTF-8 beyond ASCII) become `\xHH`; outside
/// quotes (`quoted: false`) a space too, so the line still splits into its fields.
pub fn escape(s: &str, quoted: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\' || (b == b' ' && !quoted) {
            out.push_str(&format!("\\x{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// `target` with the values of the query parameters in `names` replaced by `REDACTED` (names
/// compared percent-decoded, as the plugins that read them do). Borrowed when there is nothing
/// to redact.
pub fn redact_query<'a>(target: &'a str, names: &[String]) -> std::borrow::Cow<'a, str> {
    let Some((path, query)) = target.split_once('?').filter(|_| !names.is_empty()) else {
        return std::borrow::Cow::Borrowed(target);
    };
    let secret = |kv: &str| {
        let k = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
        let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
        names.iter().any(|n| *n == k)
    };
    if !query.split('&').any(secret) {
        return std::borrow::Cow::Borrowed(target);
    }
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| {
            if secret(kv) {
                format!("{}=REDACTED", kv.split_once('=').map(|(k, _)| k).unwrap_or(kv))
            } else {
                kv.to_string()
            }
        })
        .collect();
    std::borrow::Cow::Owned(format!("{path}?{}", parts.join("&")))
}

/// `30/Nov/2026:14:40:45 +0000`: the timestamp Apache and nginx write (always UTC here).
pub fn apache_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attack-d #4: whatever the client or a token puts in a field, a line is one line, its
    /// fields are where a parser expects them, and the JSON line is valid JSON.
    #[test]
    fn hostile_fields_cannot_forge_lines() {
        let evil = "mallory - [01/Jan/2026:00:00:00 +0000] \"GET /admin HTTP/1.1\" 200 0 \"-\" \"forged\"\n6.6.6.6 - root\r\u{85}\u{2028}\\x0A\t";
        let r = Record {
            time: Some(UNIX_EPOCH),
            trace_id: "t\n1",
            client_ip: Some("10.0.0.1".parse().unwrap()),
            method: "GET",
            host: evil,
            target: "/a\"b\nc d",
            protocol: "HTTP/1.1\r",
            status: 200,
            route: "r 1",
            upstream: "u",
            consumer: Some(evil),
            user_agent: Some(evil),
            referer: Some(evil),
            ..Default::default()
        };
        let line = format_line(LogFormat::Combined, &r);
        assert!(!line.contains(['\n', '\r', '\u{85}', '\u{2028}']), "{line}");
        assert!(line.is_ascii(), "{line}");
        let fields: Vec<&str> = line.splitn(4, ' ').collect();
        assert_eq!(fields[0], "10.0.0.1");
        assert_eq!(fields[1], "-");
        assert!(fields[2].starts_with("mallory\\x20-\\x20[01/Jan/2026"), "{line}");
        assert!(
            fields[3].starts_with("[01/Jan/1970:00:00:00 +0000] \"GET /a\\x22b\\x0Ac\\x20d HTTP/1.1\\x0D\" 200 0 \""),
            "{line}"
        );
        // Exactly four quotes around the request and two around each of referer and agent.
        assert_eq!(line.matches('"').count(), 6, "{line}");
        assert!(line.contains("\\x5Cx0A"), "a literal backslash is escaped too: {line}");
        assert!(line.contains("trace_id=t\\x0A1 route=r\\x201 upstream=u"), "{line}");
        let json = format_line(LogFormat::Json, &r);
        assert!(!json.contains(['\n', '\r', '\u{85}', '\u{2028}']), "{json}");
        assert_eq!(json.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["consumer"], evil);
        assert_eq!(v["host"], evil);
        assert_eq!(v["path"], "/a\"b\nc d");
    }

    #[test]
    fn credentials_in_the_query_are_redacted() {
        let names = vec!["tok".to_string(), "api_key".to_string()];
        assert_eq!(
            redact_query("/a?x=1&tok=eyJ.x.y&y=2", &names),
            "/a?x=1&tok=REDACTED&y=2"
        );
        assert_eq!(
            redact_query("/a?t%6Fk=eyJ&tok&api_key=k", &names),
            "/a?t%6Fk=REDACTED&tok=REDACTED&api_key=REDACTED"
        );
        assert_eq!(redact_query("/a?token=1", &names), "/a?token=1");
        assert!(matches!(redact_query("/a?x=1", &names), std::borrow::Cow::Borrowed(_)));
        assert_eq!(redact_query("/a?tok=1", &[]), "/a?tok=1");
    }

    #[test]
    fn apache_timestamps() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_049_645); // 2026-11-30T14:40:45Z
        assert_eq!(apache_time(t), "30/Nov/2026:14:40:45 +0000");
        assert_eq!(apache_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(apache_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn combined_lines_parse_as_apache_writes_them() {
        let r = Record {
            time: Some(UNIX_EPOCH + Duration::from_secs(1_796_049_645)),
            trace_id: "abc",
            client_ip: Some("10.0.0.1".parse().unwrap()),
            method: "GET",
            target: "/x?a=1",
            protocol: "HTTP/1.1",
            status: 200,
            route: "r",
            upstream: "up",
            bytes_sent: 12,
            user_agent: Some("curl/8 \"x\""),
            ..Default::default()
        };
        let line = format_line(LogFormat::Combined, &r);
        assert!(
            line.starts_with(
                "10.0.0.1 - - [30/Nov/2026:14:40:45 +0000] \"GET /x?a=1 HTTP/1.1\" 200 12 \"-\" \"curl/8 \\x22x\\x22\" trace_id=abc"
            ),
            "{line}"
        );
        let refused = Record {
            status: 408,
            ..Default::default()
        };
        assert!(format_line(LogFormat::Combined, &refused).contains("\"-\" 408 0"));
    }
}
