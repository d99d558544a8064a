//! Portico: a programmable API gateway on Pingora.
//!
//! The library holds the gateway and its public plugin API; the `portico` binary is a thin
//! command line over [`cli::main_with`]. To ship your own plugins, build a binary that
//! registers them and hands the registry to [`cli::main_with`] (see `plugins/` in the repo).

// One audited exception: the allocator call in memory.rs.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod client;
pub mod clock;
pub mod compression;
pub mod config;
pub mod demo;
pub mod echo;
pub mod edge;
pub mod exchange;
pub mod grpc;
pub mod health;
pub mod limiter;
pub mod listen;
pub mod logging;
pub mod mediation;
pub mod memory;
pub mod metrics;
pub mod plugin;
pub mod plugins;
pub mod proxy;
pub mod resolver;
pub mod resources;
pub mod respond;
pub mod route;
pub mod scheduler;
pub mod server;
pub mod shared;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod util;

pub use config::{ConfigError, ConfigErrors, Snapshot};
/// Re-exported so plugin crates use the same types Portico does.
pub use pingora::http::{RequestHeader, ResponseHeader};
pub use plugin::{
    BuildContext, Phases, Plugin, PluginKind, Registry, Reply, ReplyBody, RequestState, TraceIds, Verdict,
};
pub use {async_trait, bytes, http, pingora, serde, serde_yaml};
