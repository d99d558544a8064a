//! The pure core of body mediation (`transform`) and orchestration (`aggregate`): no I/O, no
//! plugin glue, so every decision here is a function that unit tests call directly.
//!
//! - [`body`]: whether a response body is transformed (JSON, or XML converted to JSON) or passed
//!   through, and why; a bounded [`body::Buffer`] and bounded gzip decoding.
//! - [`xml`]: XML → JSON with a documented, predictable mapping and hard limits.
//! - [`json_ops`]: `select` / `remove` / `rename` / `set` / `wrap` on JSON with dot paths.
//! - [`template`]: an aggregate call's path template (`/users/{id}?u=${user.id}`) and its safe
//!   rendering (every substituted value is percent-encoded).
//! - [`calls`]: the aggregate calls as a checked dependency graph and its execution stages.
//! - [`merge`]: the answers of the calls merged into the aggregate's JSON document.

pub mod body;
pub mod calls;
pub mod json_ops;
pub mod merge;
pub mod template;
pub mod xml;
