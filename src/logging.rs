//! Portico's own log lines (stderr, or `server.error_log` when daemonized): env_logger
//! (`RUST_LOG`, default `info`), with one change. The TLS library (rustls) writes a warning for
//! things a peer sent — an IP address as SNI, a warning alert, an out-of-place message — once
//! per handshake, so any client could fill the error log at its own pace (nginx logs handshake
//! trouble at `info`). Those warnings are written at `debug` instead (`RUST_LOG=rustls=debug`
//! shows them) and counted in `portico_tls_peer_warnings_total`.

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Install the logger (once per process; later calls change nothing).
pub fn init() {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .build();
    // The warnings reach this logger even when the filter would hide them, to be counted.
    let max = inner.filter().max(LevelFilter::Warn);
    if log::set_boxed_logger(Box::new(Demoting { inner })).is_ok() {
        log::set_max_level(max);
    }
}

struct Demoting {
    inner: env_logger::Logger,
}

/// A warning rustls writes about what its peer sent.
fn from_peer(m: &Metadata<'_>) -> bool {
    m.level() == Level::Warn && (m.target() == "rustls" || m.target().starts_with("rustls::"))
}

impl Log for Demoting {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        from_peer(m) || self.inner.enabled(m)
    }

    fn log(&self, r: &Record<'_>) {
        if !from_peer(r.metadata()) {
            return self.inner.log(r);
        }
        crate::metrics::TLS_PEER_WARNINGS.inc();
        // env_logger's own filter decides whether the demoted line is written.
        self.inner.log(
            &Record::builder()
                .args(*r.args())
                .level(Level::Debug)
                .target(r.target())
                .module_path(r.module_path())
                .file(r.file())
                .line(r.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush();
    }
}
