//! The test PKI lives in the harness (`portico::testing::pki`), shared with integration tests.
pub use crate::testing::pki::*;
