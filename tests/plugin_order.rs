//! Acceptance [1/9] #8: plugins run by kind whatever the file order; a route replaces a global
//! plugin of the same name, or switches it off. The gateway runs in this process with a
//! registry extended by test plugins (the library API a custom build uses).

mod common;
use common::*;
use portico::async_trait::async_trait;
use portico::config::ConfigError;
use portico::pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use portico::server::{run_until, RunOptions};
use portico::{BuildContext, Phases, Plugin, PluginKind, Registry, RequestHeader, RequestState, Verdict};
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeConfig {
    kind: String,
    label: String,
}

/// Appends its label to `x-order` on the request, so the upstream sees the order plugins ran.
struct Probe {
    kind: PluginKind,
    label: String,
}

#[async_trait]
impl Plugin for Probe {
    fn kind(&self) -> PluginKind {
        self.kind
    }
    fn phases(&self) -> Phases {
        Phases::REQUEST
    }
    async fn request(&self, req: &mut RequestHeader, _st: &mut RequestState) -> Verdict {
        let order = match req.headers.get("x-order").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev},{}", self.label),
            None => self.label.clone(),
        };
        req.insert_header("x-order", order).unwrap();
        Verdict::Continue
    }
}

fn probe(cfg: ProbeConfig, _ctx: &BuildContext) -> Result<Probe, ConfigError> {
    let kind = match cfg.kind.as_str() {
        "edge" => PluginKind::Edge,
        "authenticate" => PluginKind::Authenticate,
        "authorize" => PluginKind::Authorize,
        "limit" => PluginKind::Limit,
        "select" => PluginKind::Select,
        "mediate" => PluginKind::Mediate,
        other => return Err(ConfigError::new("kind", format!("unknown kind '{other}'"))),
    };
    Ok(Probe { kind, label: cfg.label })
}

struct Stop(tokio::sync::Mutex<tokio::sync::mpsc::Receiver<()>>);

#[async_trait]
impl ShutdownSignalWatch for Stop {
    async fn recv(&self) -> ShutdownSignal {
        self.0.lock().await.recv().await;
        ShutdownSignal::GracefulTerminate
    }
}

#[test]
fn plugins_run_by_kind_and_routes_replace_or_disable_globals() {
    let up = EchoServer::start("up").unwrap();
    let (addr, admin) = (free_addr(), free_addr());
    let dir = TempDir::new("order");
    let body = format!(
        r#"
upstreams:
  up: {{ endpoints: ["{up}"] }}
plugins:
  - probe_a: {{ kind: mediate, label: global-mediate }}
  - probe_b: {{ kind: edge, label: global-edge }}
  - headers: {{ response: {{ set: {{ x-global: global }} }} }}
routes:
  - name: mixed
    match: {{ path_prefix: /mixed }}
    upstream: up
    plugins:
      - probe_c: {{ kind: authenticate, label: route-authenticate }}
      - probe_d: {{ kind: limit, label: route-limit }}
      - probe_e: {{ kind: edge, label: route-edge }}
  - name: replaced
    match: {{ path_prefix: /replaced }}
    upstream: up
    plugins:
      - probe_a: {{ kind: select, label: route-select }}
      - headers: {{ response: {{ set: {{ x-global: route }} }} }}
  - name: disabled
    match: {{ path_prefix: /disabled }}
    upstream: up
    plugins:
      - probe_b: {{ enabled: false }}
      - headers: {{ enabled: false }}
"#,
        up = up.addr
    );
    let config = dir.write("portico.yaml", &format!("{}{body}", head(dir.path(), &addr, &admin)));
    let mut registry = Registry::builtin();
    for name in ["probe_a", "probe_b", "probe_c", "probe_d", "probe_e"] {
        registry.register(name, probe);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let server = std::thread::spawn(move || {
        run_until(
            RunOptions {
                config,
                upgrade: false,
                daemon: false,
                registry,
                resources: None,
            },
            Box::new(Stop(tokio::sync::Mutex::new(rx))),
        )
    });
    wait_for("the in-process gateway", Duration::from_secs(20), || {
        get(&admin, "/healthz").ok().filter(|r| r.status == 200)
    });

    let r = get(&addr, "/mixed").unwrap();
    assert_eq!(
        echoed(&r)["headers"]["x-order"],
        "global-edge,route-edge,route-authenticate,route-limit,global-mediate"
    );
    assert_eq!(r.header("x-global"), Some("global"));

    let r = get(&addr, "/replaced").unwrap();
    assert_eq!(echoed(&r)["headers"]["x-order"], "global-edge,route-select");
    assert_eq!(r.header("x-global"), Some("route"));

    let r = get(&addr, "/disabled").unwrap();
    assert_eq!(echoed(&r)["headers"]["x-order"], "global-mediate");
    assert_eq!(r.header("x-global"), None);

    // Global plugins' response phase also runs on Portico's own answers.
    let r = get(&addr, "/none").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-global"), Some("global"));

    tx.blocking_send(()).unwrap();
    server.join().unwrap().unwrap();
    drop(dir);
}
