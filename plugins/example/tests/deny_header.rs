//! The example plugin registers, validates and runs in a real gateway built with it.

use portico::echo::EchoServer;
use portico::testing::*;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portico-example");

fn config(dir: &TempDir, addr: &str, admin: &str, upstream: &str, plugin: &str) -> String {
    format!(
        r#"server: {{ grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, upgrade_sock: {d}/u.sock }}
listeners: [{{ address: {addr} }}]
admin: {{ address: {admin} }}
upstreams:
  app: {{ endpoints: ["{upstream}"] }}
routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    plugins:
      - {plugin}
"#,
        d = dir.path().display()
    )
}

#[test]
fn deny_header_guards_a_route() {
    let app = EchoServer::start("app").unwrap();
    let (addr, admin) = (free_addr(), free_addr());
    let dir = TempDir::new("example");
    let yaml = config(
        &dir,
        &addr,
        &admin,
        &app.addr.to_string(),
        "deny_header: { header: x-debug, message: no debugging here }",
    );
    let path = dir.write("portico.yaml", &yaml);
    let mut gw = Portico::start_in(BIN, dir, path, &[]);
    gw.wait_ready(&admin);

    let ok = get(&addr, "/api/x").unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-guarded-by"), Some("deny_header"));

    let denied = Request::get("/api/x").header("x-debug", "1").send(&addr).unwrap();
    assert_eq!(denied.status, 403);
    let body = denied.json();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["message"], "no debugging here");
    assert_eq!(body["trace_id"].as_str(), denied.header("x-request-id"));
    assert_eq!(
        denied.header("x-guarded-by"),
        Some("deny_header"),
        "response plugins run on denials too"
    );
    assert_eq!(app.requests(), 1, "the denied request never reached the upstream");
}

#[test]
fn deny_header_config_errors_are_located() {
    let dir = TempDir::new("example-t");
    let yaml = config(
        &dir,
        "127.0.0.1:1",
        "127.0.0.1:2",
        "127.0.0.1:3",
        "deny_header: { hedaer: x-debug }",
    );
    let path = dir.write("bad.yaml", &yaml);
    let out = Command::new(BIN).arg("-t").arg("-c").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("routes[0].plugins[0].deny_header: unknown field 'hedaer'"),
        "{text}"
    );
}
