//! One line per request to stdout (JSON or the combined format). Lines are formatted on the
//! request's task and handed to one writer thread, which flushes only when it runs out of
//! lines: no lock and no flush per request on the hot path.

use crate::config::raw::LogFormat;
use crate::exchange::Ctx;
use pingora::prelude::*;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;

pub struct AccessLog {
    /// Started on first use, so a daemonized process starts it after the fork.
    tx: OnceLock<SyncSender<String>>,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog { tx: OnceLock::new() }
    }
}

fn writer(rx: Receiver<String>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 << 10, stdout.lock());
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
    }
}

impl AccessLog {
    fn sender(&self) -> &SyncSender<String> {
        self.tx.get_or_init(|| {
            let (tx, rx) = sync_channel(16 * 1024);
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || writer(rx))
                .expect("spawn access log writer");
            tx
        })
    }

    /// Write one ready-made line (a newline is added).
    pub fn write_line(&self, mut line: String) {
        line.push('\n');
        if let Err(TrySendError::Full(_)) = self.sender().try_send(line) {
            log::warn!("access log writer is behind; a line was dropped");
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        format: LogFormat,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        upstream: &str,
        endpoint: Option<&str>,
        error: Option<&pingora::Error>,
    ) {
        let req = session.req_header();
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let duration_ms = ctx.st.started.elapsed().as_secs_f64() * 1000.0;
        let target = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let line = match format {
            LogFormat::Json => serde_json::json!({
                "time": time.to_string(),
                "trace_id": ctx.st.trace.request_id,
                "traceparent_id": ctx.st.trace.trace_id,
                "client_ip": ctx.st.client_ip.to_string(),
                "method": req.method.as_str(),
                "host": ctx.st.host,
                "path": target,
                "status": status,
                "route": &*ctx.st.route,
                "upstream": upstream,
                "endpoint": endpoint,
                "consumer": ctx.st.consumer,
                "duration_ms": (duration_ms * 1000.0).round() / 1000.0,
                "bytes_sent": session.body_bytes_sent(),
                "error": ctx.error_code.or_else(|| error.map(|_| "proxy_error")),
            })
            .to_string(),
            LogFormat::Combined => {
                let header = |n: &str| {
                    req.headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .replace('"', "%22")
                };
                format!(
                    "{} - {} [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" trace_id={} route={} upstream={} duration_ms={:.3}",
                    ctx.st.client_ip,
                    ctx.st.consumer.as_deref().unwrap_or("-"),
                    time,
                    req.method,
                    target,
                    req.version,
                    status,
                    session.body_bytes_sent(),
                    header("referer"),
                    header("user-agent"),
                    ctx.st.trace.request_id,
                    if ctx.st.route.is_empty() { "-" } else { &ctx.st.route },
                    upstream,
                    duration_ms
                )
            }
        };
        // Never block a request on a slow stdout: a full queue drops the line (and says so).
        self.write_line(line);
    }
}
