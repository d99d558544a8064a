//! Helpers for testing Portico, and plugins built on it, against real sockets (the `testing`
//! feature): a raw HTTP/1.1 client, temp dirs, a Portico process or an in-process gateway that
//! binds port 0 and reports the ports it got, upstreams that record what they receive, and a
//! redis-server.
//! Readiness is always polled, never slept for.

//!
//! - here: waiting, temp dirs; `client.rs`: a raw HTTP/1.1 client;
//! - `process.rs`: a Portico process with its logs, metrics;
//! - `upstreams.rs`: upstreams that serve set content or record every byte they receive;
//! - `inprocess.rs`: a gateway in the test's own process, with the test's plugins;
//! - `redis.rs`: a redis-server of the test's own;
//! - `pki.rs`: a test CA and the certificates it signs (rcgen, made at test time);
//! - `tls.rs`: TLS clients and server configs over those certificates.

mod client;
mod fault;
mod inprocess;
pub mod pki;
mod process;
mod redis;
pub mod tls;
mod upstreams;

pub use client::*;
pub use fault::{refusing_addr, Fault, FaultRequest, FaultServer, Unaccepting};
pub use inprocess::*;
pub use process::*;
pub use redis::*;
pub use upstreams::*;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A port nothing listens on right now (bound and released; a tiny race, fine on loopback).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Poll `f` until it returns `Some`, or panic after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "portico-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.file(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
