//! A redis-server of the test's own.

use super::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of the test's own, on a free loopback port, persisting nothing, stopped
/// (by its PID) on drop. `REDIS_SERVER` names the binary when it is not `redis-server` on PATH.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    /// Start one and wait until it answers PING.
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let mut last = String::new();
        // Another process may take the free port before redis binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            match Self::spawn(port, &dir) {
                Ok(child) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        dir,
                    }
                }
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(port: u16, dir: &TempDir) -> Result<Child, String> {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let log = dir.file("redis.log");
        let mut child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {bin} ({e}): the Redis tests need redis-server \
                     (`./dev deps` installs it, or `apt-get install redis-server`)"
                )
            });
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_ping(port) {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("{bin} exited ({status}) on port {port}:\n{text}"));
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{bin} on port {port} did not answer PING within 10s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kill it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port (after [`RedisServer::kill`]), empty.
    pub fn restart(&mut self) {
        self.kill();
        match Self::spawn(self.port, &self.dir) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("redis-server did not restart: {e}"),
        }
    }

    /// Freeze it (SIGSTOP): connections stay open and nothing answers, like a hung server.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Undo [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.pid().expect("redis-server is running");
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when a Redis server answers PING on loopback `port`.
pub fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}
