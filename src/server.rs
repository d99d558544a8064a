//! Assemble and run the Pingora server: proxy listeners, admin, health checks, SIGHUP reload.

use crate::admin::AdminApp;
use crate::edge::{EdgeApp, TlsListener, TlsListeners};
use crate::health::HealthChecker;
use crate::listen::ListenerService;
use crate::plugin::Registry;
use crate::proxy::Gateway;
use crate::shared::Shared;
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service as Listening;
use std::path::PathBuf;
use std::sync::Arc;

pub struct RunOptions {
    pub config: PathBuf,
    /// Take the listening sockets from a running Portico (`-u`).
    pub upgrade: bool,
    pub daemon: bool,
    pub registry: Registry,
    /// The process resources to use (tests give their own clock or resolver); `None`: fresh.
    pub resources: Option<Arc<crate::resources::Resources>>,
}

/// Make SIGHUP harmless from the first instant: its default action kills the process, and the
/// reload service only installs its own handler once the server runs.
pub fn guard_sighup() {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGHUP, flag);
}

/// Run the gateway until a signal stops the process. Returns only if the config is bad or a
/// port cannot be bound.
pub fn run(opts: RunOptions) -> Result<(), String> {
    let prepared = prepare(opts)?;
    let pid_file = prepared.pid_file.clone();
    prepared.server.run(RunArgs::default());
    remove_pid_file(&pid_file);
    std::process::exit(0)
}

/// The live process named by the pid file (the one `-u` takes over), or why there is none.
fn old_process(pid_file: &str) -> Result<i32, String> {
    let text =
        std::fs::read_to_string(pid_file).map_err(|e| format!("its pid file {pid_file} cannot be read ({e})"))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("its pid file {pid_file} holds no pid"))?;
    // Binary upgrades are Linux-only (Pingora's socket hand-over): /proc says who runs.
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
    if pid <= 0 || !alive {
        return Err(format!("process {pid} of the pid file {pid_file} is not running"));
    }
    Ok(pid)
}

/// At exit, the pid file goes (as nginx's does) — unless it names another process: after a
/// binary upgrade it is the new process's.
fn remove_pid_file(path: &str) {
    let ours = std::fs::read_to_string(path).is_ok_and(|t| t.trim() == std::process::id().to_string());
    if ours {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("cannot remove the pid file {path}: {e}");
        }
    }
}

/// Run the gateway in this process until `shutdown` says so (for embedding and tests; no
/// process signals are taken over except SIGHUP for reload).
pub fn run_until(opts: RunOptions, shutdown: Box<dyn ShutdownSignalWatch>) -> Result<(), String> {
    prepare(opts)?.run(shutdown);
    Ok(())
}

/// A gateway whose config is loaded and whose ports are bound, ready to run.
pub struct Prepared {
    server: Server,
    pub shared: Arc<Shared>,
    pid_file: String,
}

impl Prepared {
    /// Run until `shutdown` says so.
    pub fn run(self, shutdown: Box<dyn ShutdownSignalWatch>) {
        self.server.run(RunArgs {
            shutdown_signal: shutdown,
        });
    }
}

/// Load the config, bind the ports (unless upgrading) and assemble the services.
pub fn prepare(opts: RunOptions) -> Result<Prepared, String> {
    crate::metrics::init();
    crate::metrics::install_panic_hook();
    let resources = opts.resources.unwrap_or_else(|| crate::resources::Resources::new(128));
    let shared = Shared::load_from(
        Box::new(crate::config::FileSource(opts.config.clone())),
        opts.registry,
        resources,
    )
    .map_err(|e| format!("the config is not valid:\n{e}"))?;
    let snap = shared.snapshot();
    let conf: ServerConf =
        serde_yaml::from_value(serde_yaml::Value::Mapping(snap.server.clone())).map_err(|e| format!("server: {e}"))?;
    let mut args = vec!["portico"];
    if opts.upgrade {
        args.push("-u");
    }
    if opts.daemon {
        args.push("-d");
    }
    // At start the ports are Portico's to bind (a taken one is an error now, not a Pingora
    // retry loop); at an upgrade they come from the old process.
    if !opts.upgrade {
        let proxies = snap.listeners.iter().map(|l| (l.address.as_str(), "proxy listener"));
        let admin = snap.admin.iter().map(|a| (a.address.as_str(), "admin listener"));
        shared.bound.bind_all(proxies.chain(admin))?;
    }
    let pid_file = conf.pid_file.clone();
    if opts.upgrade {
        // Pingora waits ~5 s for sockets that will never come and exits with "EAGAIN": say
        // what is wrong instead, at once.
        old_process(&pid_file)
            .map_err(|why| format!("-u takes over a running Portico, but {why}; start without -u to bind the ports"))?;
        log::info!("waiting for the running Portico to hand over its sockets: send it SIGQUIT now");
    }
    let mut server = Server::new_with_opt_and_conf(Some(Opt::parse_from_args(args)), conf);
    server.bootstrap();
    if !opts.daemon {
        // Pingora writes the pid file only when it daemonizes; the upgrade steps need it in the
        // foreground too (and after an upgrade, the new process owns it).
        if let Err(e) = std::fs::write(&pid_file, format!("{}\n", std::process::id())) {
            log::warn!("cannot write the pid file {pid_file}: {e}");
        }
    }
    add_services(&mut server, &shared)?;
    log::info!(
        "portico {} serving {} with {} route(s)",
        env!("CARGO_PKG_VERSION"),
        snap.listeners
            .iter()
            .map(|l| l.address.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        snap.routes.len()
    );
    Ok(Prepared {
        server,
        shared,
        pid_file,
    })
}

/// Starts draining as soon as Pingora starts a hand-over or a shutdown. Pingora's own
/// shutdown watch turns true only when a binary upgrade's 5 s hand-over window is over;
/// connections told to close during that window reconnect to the new process. A background
/// service, not a thread of its own: with `-d` Pingora forks after `prepare`, and only its
/// services run in the daemon.
struct DrainOnPhase {
    shared: Arc<Shared>,
    phases: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>>>,
}

#[async_trait]
impl BackgroundService for DrainOnPhase {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use pingora::server::ExecutionPhase as P;
        use tokio::sync::broadcast::error::RecvError;
        let Some(mut phases) = self.phases.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        loop {
            tokio::select! {
                phase = phases.recv() => match phase {
                    Ok(P::GracefulUpgradeTransferringFds | P::GracefulUpgradeCloseTimeout | P::GracefulTerminate) => {
                        self.shared.start_draining();
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                _ = shutdown.changed() => {
                    self.shared.start_draining();
                    return;
                }
            }
        }
    }
}

fn add_services(server: &mut Server, shared: &Arc<Shared>) -> Result<(), String> {
    let snap = shared.snapshot();
    // One proxy service per protocol setting (h2c is a per-service option in Pingora), and one
    // for the TLS listeners (no h2c: ALPN decides; the edge does their handshakes).
    for kind in [Kind::Plain, Kind::H2c, Kind::Tls] {
        let listeners: Vec<&crate::config::raw::Listener> = snap
            .listeners
            .iter()
            .filter(|l| match kind {
                Kind::Tls => l.tls.is_some(),
                Kind::Plain => l.tls.is_none() && !l.http2,
                Kind::H2c => l.tls.is_none() && l.http2,
            })
            .collect();
        if listeners.is_empty() {
            continue;
        }
        let addresses: Vec<String> = listeners.iter().map(|l| l.address.clone()).collect();
        let mut proxy = pingora::proxy::http_proxy(&server.configuration, Gateway { shared: shared.clone() });
        let mut options = HttpServerOptions::default();
        options.h2c = kind == Kind::H2c;
        // Fixed for the life of the service: a reload that changes it says so (shared.rs).
        options.h2_idle_timeout = Some(snap.limits.h2_idle_timeout);
        proxy.server_options = Some(options);
        // HTTP/2 gets the same head limit as HTTP/1 (which the edge layer enforces itself).
        let mut h2 = pingora::protocols::http::v2::server::H2Options::new();
        h2.max_header_list_size(snap.limits.max_request_header_bytes as u32);
        h2.max_concurrent_streams(100);
        proxy.h2_options = Some(h2);
        let (name, app, read_buffer) = match kind {
            // No L4 read buffer on plain listeners (Pingora's default is 64 KiB per connection,
            // ~80 KB of RSS per idle keep-alive connection): the edge layer reads each head into
            // a buffer of its own, held only while bytes arrive, and bodies go straight from
            // the socket into Pingora's body buffers. HTTP/2 frames are buffered by h2 itself.
            Kind::Plain => ("proxy", EdgeApp::new(proxy, shared.clone()), 0),
            Kind::H2c => ("proxy h2c", EdgeApp::new(proxy, shared.clone()), 0),
            // A TLS record is up to 16 KiB: a smaller buffer splits every full record read.
            Kind::Tls => {
                let mut tls = Vec::new();
                for l in &listeners {
                    let state = shared
                        .tls
                        .get(&l.address)
                        .ok_or_else(|| format!("{}: no TLS state (a bug)", l.address))?
                        .clone();
                    let settings = state
                        .tls_settings(l.http2)
                        .map_err(|e| format!("{}: cannot set up TLS: {e}", l.address))?;
                    let at = shared
                        .bound
                        .local_addr(&l.address)
                        .or_else(|| l.address.parse().ok())
                        .ok_or_else(|| format!("'{}' is not ip:port", l.address))?;
                    tls.push(TlsListener {
                        at,
                        acceptor: settings.build(),
                        state,
                    });
                }
                (
                    "proxy tls",
                    EdgeApp::with_tls(proxy, shared.clone(), TlsListeners(tls)),
                    16 * 1024,
                )
            }
        };
        let mut svc = Listening::new(name.to_string(), app);
        for a in &addresses {
            // Given to Pingora as plain TCP, TLS listeners included (see edge/tls.rs).
            svc.add_listener(ListenerConfig::tcp(a.as_str()).l4_buffer(L4BufferSettings::default().read(read_buffer)));
        }
        server.add_service(ListenerService::new(
            svc,
            addresses,
            shared.clone(),
            shared.bound.clone(),
        ));
    }
    if let Some(admin) = &snap.admin {
        let mut svc = Listening::new(
            "admin".to_string(),
            HttpServer::new_app(AdminApp { shared: shared.clone() }),
        );
        svc.add_tcp(&admin.address);
        svc.threads = Some(1);
        server.add_service(ListenerService::new(
            svc,
            vec![admin.address.clone()],
            shared.clone(),
            shared.bound.clone(),
        ));
    }
    server.add_service(background_service(
        "health checks",
        HealthChecker { shared: shared.clone() },
    ));
    server.add_service(background_service(
        "plugin tasks",
        crate::scheduler::Scheduler { shared: shared.clone() },
    ));
    let phases = server.watch_execution_phase();
    server.add_service(background_service(
        "drain",
        DrainOnPhase {
            shared: shared.clone(),
            phases: std::sync::Mutex::new(Some(phases)),
        },
    ));
    server.add_service(background_service(
        "sighup reload",
        ReloadOnSighup { shared: shared.clone() },
    ));
    Ok(())
}

/// Which proxy service a listener belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    H2c,
    Tls,
}

/// SIGHUP → reload (validate → compile → swap; a bad file keeps the old config).
pub struct ReloadOnSighup {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for ReloadOnSighup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP, reload by signal is off: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    log::info!("SIGHUP: reloading {}", self.shared.config_path().display());
                    let shared = self.shared.clone();
                    let _ = tokio::task::spawn_blocking(move || shared.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
