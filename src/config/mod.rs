//! Config in three stages: [`raw`] (serde, as written) → [`compile`] → an immutable
//! [`Snapshot`] that request code uses. Every error names its place in the file.

pub mod bounds;
mod compile;
mod error;
pub mod files;
pub mod raw;
pub mod units;

pub use compile::{
    canonical_ip, compile, env_secret, load_file, ClientIpResolver, Consumers, Limits, Meta, Rewrite, Route,
    RouteTimeouts, Snapshot,
};
pub use error::{ConfigError, ConfigErrors};
