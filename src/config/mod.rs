//! Config in three stages: [`raw`] (serde, as written) → `compile` → an immutable [`Snapshot`]
//! that request code uses. Every error names its place in the file.
//!
//! - `raw.rs`: the file as written; `units.rs`: durations and sizes;
//! - `bounds.rs`, `files.rs`: what Portico agrees to read (sizes, depth, aliases, file kinds);
//! - `compile/`: raw → snapshot, one file per section;
//! - `snapshot.rs`: the compiled config; `client_ip.rs`: who the client is;
//! - `source.rs`: where config text comes from (a file today; the mesh controller later).

pub mod bounds;
mod client_ip;
mod compile;
mod error;
pub mod files;
pub mod raw;
mod snapshot;
pub mod source;
pub mod units;

pub use client_ip::{canonical_ip, ClientIpResolver};
pub use compile::{compile, env_secret, load_file};
pub use error::{parse_value, ConfigError, ConfigErrors};
pub use snapshot::{Consumers, Limits, Meta, Rewrite, Route, RouteTimeouts, Snapshot};
pub use source::{ConfigSource, FileSource};
