//! Shared harness: a Portico process on free ports with the test's config body.
#![allow(dead_code, unused_imports)]

pub mod grpc;

pub use portico::echo::EchoServer;
pub use portico::testing::*;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_portico");

/// `portico -t` on a config with this text: its exit code and what it printed (stdout, then
/// stderr).
pub fn check(yaml: &str) -> (i32, String) {
    let dir = TempDir::new("check");
    let path = dir.write("c.yaml", yaml);
    let out = std::process::Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run portico -t");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A running gateway: its proxy address, admin address, and process.
pub struct Gw {
    pub p: Portico,
    pub addr: String,
    pub admin: String,
    /// Set by tests that stop the process on purpose (the upgrade hands over and exits).
    pub expect_exit: bool,
    /// The listener also speaks h2c.
    pub h2c: bool,
    /// Listeners of the test's own (YAML list items), instead of the one plain listener.
    pub listeners: Option<String>,
    /// Every listener's bound address, in the order of the specs it was started with.
    pub addrs: Vec<String>,
}

/// The parts every test config shares: fast shutdown, private pid and upgrade socket files.
pub fn head(dir: &std::path::Path, addr: &str, admin: &str) -> String {
    head_with_grace(dir, addr, admin, 0)
}

/// As [`head`], with a drain period for in-flight requests at shutdown.
pub fn head_with_grace(dir: &std::path::Path, addr: &str, admin: &str, grace: u64) -> String {
    head_full(dir, addr, admin, grace, false)
}

/// The shared head, with `http2: true` on the listener when `h2c` (HTTP/1.1 and h2c on one port).
pub fn head_full(dir: &std::path::Path, addr: &str, admin: &str, grace: u64, h2c: bool) -> String {
    format!(
        "server:\n  threads: 2\n  grace_period_seconds: {grace}\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {d}/portico.pid\n  upgrade_sock: {d}/upgrade.sock\nlisteners:\n  - address: {addr}\n{h2}admin:\n  address: {admin}\n",
        d = dir.display(),
        h2 = if h2c { "    http2: true\n" } else { "" }
    )
}

/// The shared head with listeners of the test's own (YAML list items).
pub fn head_listeners(dir: &std::path::Path, listeners: &str) -> String {
    format!(
        "server:\n  threads: 2\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {d}/portico.pid\n  upgrade_sock: {d}/upgrade.sock\nlisteners:\n{listeners}admin:\n  address: {ADMIN_SPEC}\n",
        d = dir.display(),
    )
}

impl Gw {
    /// Start a gateway whose config is `head` + `body`, and wait until it serves.
    pub fn start(body: &str) -> Gw {
        Gw::start_with_grace(body, 0)
    }

    /// Start with `grace_period_seconds: grace` (in-flight requests finish within it).
    pub fn start_with_grace(body: &str, grace: u64) -> Gw {
        Gw::start_full(body, grace, false)
    }

    /// Start with a listener that speaks HTTP/1.1 and h2c (prior knowledge) on one port.
    pub fn start_h2c(body: &str) -> Gw {
        Gw::start_full(body, 0, true)
    }

    /// Start on port 0: Portico binds and logs the ports it got.
    fn start_full(body: &str, grace: u64, h2c: bool) -> Gw {
        let dir = TempDir::new("gw");
        let config = dir.write(
            "portico.yaml",
            &format!("{}{body}", head_full(dir.path(), PROXY_SPEC, ADMIN_SPEC, grace, h2c)),
        );
        let mut p = Portico::start_in(BIN, dir, config, &[]);
        let addr = p.bound("proxy", PROXY_SPEC);
        let admin = p.bound("admin", ADMIN_SPEC);
        p.wait_ready(&admin);
        Gw {
            p,
            addrs: vec![addr.clone()],
            addr,
            admin,
            expect_exit: false,
            h2c,
            listeners: None,
        }
    }

    /// Start with `listeners` (YAML list items, e.g. `  - address: 127.0.0.3:0\n    tls: …`);
    /// `specs` are their addresses as written (distinct; not 127.0.0.2:0, the admin's), and
    /// `addrs` holds where each was bound, in that order.
    pub fn start_listeners(listeners: &str, specs: &[&str], body: &str) -> Gw {
        let dir = TempDir::new("gw");
        let config = dir.write(
            "portico.yaml",
            &format!("{}{body}", head_listeners(dir.path(), listeners)),
        );
        let mut p = Portico::start_in(BIN, dir, config, &[]);
        let addrs: Vec<String> = specs.iter().map(|s| p.bound("proxy", s)).collect();
        let admin = p.bound("admin", ADMIN_SPEC);
        p.wait_ready(&admin);
        Gw {
            p,
            addr: addrs[0].clone(),
            addrs,
            admin,
            expect_exit: false,
            h2c: false,
            listeners: Some(listeners.to_string()),
        }
    }

    /// The full config text for a new `body` (same listeners and files).
    pub fn config(&self, body: &str) -> String {
        match &self.listeners {
            Some(l) => format!("{}{body}", head_listeners(self.p.dir.path(), l)),
            None => format!(
                "{}{body}",
                head_full(self.p.dir.path(), PROXY_SPEC, ADMIN_SPEC, 0, self.h2c)
            ),
        }
    }

    /// Reload with new listener items (their certificates, say) and `body`, by SIGHUP.
    pub fn reload_listeners(&mut self, listeners: &str, body: &str) {
        self.listeners = Some(listeners.to_string());
        self.reload(body);
    }

    pub fn get(&self, path: &str) -> Response {
        get(&self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.p.logs()))
    }

    pub fn send(&self, req: Request<'_>) -> Response {
        req.send(&self.addr)
            .unwrap_or_else(|e| panic!("{} {}: {e}\n{}", req.method, req.path, self.p.logs()))
    }

    pub fn metrics(&self) -> String {
        get(&self.admin, "/metrics").expect("metrics").text()
    }

    /// The access log line of the request with this id (`x-request-id`), once it is written.
    pub fn access_line(&self, id: &str) -> String {
        wait_for("the access log line", Duration::from_secs(5), || {
            self.p
                .stdout_text()
                .lines()
                .find(|l| l.contains(id))
                .map(str::to_string)
        })
    }

    /// The active config's hash (changes when a reload takes effect).
    pub fn config_hash(&self) -> String {
        get(&self.admin, "/config").expect("config").json()["hash"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Rewrite the config, send SIGHUP, and wait until the new one is live.
    pub fn reload(&self, body: &str) {
        let before = self.config_hash();
        self.p.rewrite_config(&self.config(body));
        self.p.signal("HUP");
        wait_for("the reload to take effect", Duration::from_secs(10), || {
            (self.config_hash() != before).then_some(())
        });
    }
}

/// Every suite ends with the process alive and no panic counted.
impl Drop for Gw {
    fn drop(&mut self) {
        if std::thread::panicking() || self.expect_exit {
            return;
        }
        assert!(self.p.alive(), "portico died during the test:\n{}", self.p.logs());
        let panics = metric(&self.metrics(), "portico_panics_total", &[]);
        assert_eq!(panics, 0.0, "portico caught {panics} panic(s):\n{}", self.p.logs());
    }
}

/// The echo JSON a request produced upstream.
pub fn echoed(r: &Response) -> serde_json::Value {
    assert_eq!(r.status, 200, "expected 200, got {} {}", r.status, r.text());
    r.json()
}

/// Which echo service answered.
pub fn service(r: &Response) -> String {
    r.header("x-echo-service").unwrap_or("").to_string()
}

/// A keep-alive HTTP/1.1 client for tests that send thousands of requests: one connection,
/// reopened when the gateway closes it (after `keepalive_requests`).
pub struct KeepAlive {
    addr: String,
    from: Option<std::net::IpAddr>,
    stream: Option<std::net::TcpStream>,
}

impl KeepAlive {
    pub fn new(addr: &str) -> KeepAlive {
        KeepAlive {
            addr: addr.to_string(),
            from: None,
            stream: None,
        }
    }

    /// Connect from this loopback address (e.g. 127.0.0.7).
    pub fn from_ip(addr: &str, ip: &str) -> KeepAlive {
        KeepAlive {
            from: Some(ip.parse().expect("ip")),
            ..KeepAlive::new(addr)
        }
    }

    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        use std::io::Write;
        for attempt in 0..2 {
            if self.stream.is_none() {
                self.stream = Some(connect(&self.addr, self.from).expect("connect"));
            }
            let s = self.stream.as_mut().expect("connected");
            let mut head = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n", self.addr);
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let sent = s.write_all(head.as_bytes());
            match sent.and_then(|_| read_response(s, false)) {
                Ok(r) => {
                    if r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                        self.stream = None;
                    }
                    return r;
                }
                // The gateway closed an idle keep-alive connection: once more on a fresh one.
                Err(e) if attempt == 0 => {
                    let _ = e;
                    self.stream = None;
                }
                Err(e) => panic!("GET {path}: {e}"),
            }
        }
        unreachable!("the second attempt returns or panics")
    }
}

/// An HTTP/2 client with prior knowledge (h2c) connected to `addr`; its connection is driven by
/// a task on the current runtime until the last handle is dropped.
pub async fn h2c_client(addr: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}
