//! A gateway running in the test process.

use super::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How test gateways write their listener and admin addresses: port 0, bound by Portico.
pub const PROXY_SPEC: &str = "127.0.0.1:0";
pub const ADMIN_SPEC: &str = "127.0.0.2:0";

/// A gateway running in this process (with a registry of the test's own plugins), on ports it
/// bound itself. Stopped when dropped. Reload it with [`InProcess::reload`] (POST /reload: a
/// signal would reach every gateway of the test process).
pub struct InProcess {
    pub addr: String,
    pub admin: String,
    pub dir: TempDir,
    config: PathBuf,
    stop: Option<tokio::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct StopSignal(tokio::sync::Mutex<tokio::sync::mpsc::Receiver<()>>);

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        self.0.lock().await.recv().await;
        pingora::server::ShutdownSignal::GracefulTerminate
    }
}

impl InProcess {
    /// The config head for a test gateway in `dir`: fast shutdown, its own pid and upgrade
    /// files, a listener (HTTP/1.1 and h2c) and an admin listener on port 0 (on two loopback
    /// addresses, since the address as written is the listener's identity).
    pub fn head(dir: &Path) -> String {
        format!(
            "server:\n  threads: 2\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {d}/portico.pid\n  upgrade_sock: {d}/upgrade.sock\nlisteners:\n  - address: {PROXY_SPEC}\n    http2: true\nadmin:\n  address: {ADMIN_SPEC}\naccess_log: {{ enabled: false }}\n",
            d = dir.display()
        )
    }

    /// Start a gateway on [`InProcess::head`] + `body`, with `registry`, and wait until it serves.
    pub fn start(body: &str, registry: crate::plugin::Registry) -> InProcess {
        InProcess::start_with(body, registry, None)
    }

    /// As [`InProcess::start`], with process resources of the test's own (a manual clock, a
    /// resolver table).
    pub fn start_with(
        body: &str,
        registry: crate::plugin::Registry,
        resources: Option<std::sync::Arc<crate::resources::Resources>>,
    ) -> InProcess {
        let dir = TempDir::new("inproc");
        let config = dir.write("portico.yaml", &format!("{}{body}", Self::head(dir.path())));
        let prepared = crate::server::prepare(crate::server::RunOptions {
            config: config.clone(),
            upgrade: false,
            daemon: false,
            registry,
            resources,
        })
        .unwrap_or_else(|e| panic!("the test gateway does not start: {e}"));
        let addr = prepared.shared.bound.local_addr(PROXY_SPEC).expect("bound").to_string();
        let admin = prepared.shared.bound.local_addr(ADMIN_SPEC).expect("bound").to_string();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let thread = std::thread::spawn(move || prepared.run(Box::new(StopSignal(tokio::sync::Mutex::new(rx)))));
        wait_for("the in-process gateway", Duration::from_secs(20), || {
            get(&admin, "/healthz").ok().filter(|r| r.status == 200)
        });
        InProcess {
            addr,
            admin,
            dir,
            config,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Replace the config's body and reload it; the reload's answer.
    pub fn reload(&self, body: &str) -> Response {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, format!("{}{body}", Self::head(self.dir.path()))).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("replace config");
        Request::new("POST", "/reload").send(&self.admin).expect("reload")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.blocking_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
