//! Where config text comes from. Loading at start and every reload read through a
//! [`ConfigSource`] and then take the same compile-and-swap path: today a file; the mesh
//! sidecar will supply its config from the controller the same way.

use super::error::{ConfigError, ConfigErrors};
use std::path::{Path, PathBuf};

pub trait ConfigSource: Send + Sync + 'static {
    /// The current config text. Blocking is allowed (callers run it off the request path).
    fn read(&self) -> Result<String, ConfigErrors>;
    /// What `/config` and log lines name as the config's origin.
    fn origin(&self) -> &Path;
}

/// A YAML file on disk (at most 16 MiB, UTF-8).
pub struct FileSource(pub PathBuf);

impl ConfigSource for FileSource {
    fn read(&self) -> Result<String, ConfigErrors> {
        let bytes = super::files::read_bounded(&self.0, super::bounds::MAX_CONFIG_BYTES)
            .map_err(|e| ConfigError::new("", e))?;
        Ok(String::from_utf8(bytes).map_err(|_| ConfigError::new("", format!("{} is not UTF-8", self.0.display())))?)
    }

    fn origin(&self) -> &Path {
        &self.0
    }
}
