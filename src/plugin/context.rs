//! What a plugin factory gets while building a plugin.

use crate::config::ConfigError;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::sync::Arc;

/// What a plugin factory may look at while building a plugin, and the process resources it
/// may keep (state that survives reloads, the clock, the upstream client, periodic tasks).
#[derive(Clone)]
pub struct BuildContext {
    /// True under `portico -t`: check syntax only, touch no network.
    pub offline: bool,
    /// Where relative file paths in the config resolve from.
    pub base_dir: PathBuf,
    /// The route this block belongs to, or `None` for a global plugin.
    pub route: Option<String>,
    /// Parameter names of the route's `{param}` template.
    pub route_params: Vec<String>,
    /// The route's own upstream, by name (`None` for a global plugin, or a route without one).
    pub route_upstream: Option<String>,
    /// Names of every upstream in the config.
    pub upstreams: Vec<String>,
    /// Names of every route in the config (e.g. for a global plugin's per-route metrics).
    pub routes: Vec<String>,
    /// The config's consumers (names, and API keys by hash).
    pub consumers: std::sync::Arc<crate::config::Consumers>,
    /// The config's `redis.url`, if any.
    pub redis_url: Option<String>,
    /// The plugin being built, by name, and the SHA-256 of its block (set by the core).
    pub plugin: String,
    pub block_hash: String,
    pub(crate) resources: Arc<crate::resources::Resources>,
    pub(crate) scope: Arc<crate::resources::CompileScope>,
}

impl BuildContext {
    /// A context for building plugins outside a config (unit tests, benches): offline, no
    /// route, no upstreams or consumers, with its own throwaway resources.
    pub fn standalone() -> Self {
        BuildContext::with_resources(crate::resources::Resources::offline())
    }

    /// As [`BuildContext::standalone`], with these resources (e.g. a manual clock).
    pub fn with_resources(resources: Arc<crate::resources::Resources>) -> Self {
        BuildContext {
            offline: resources.offline,
            base_dir: std::env::current_dir().unwrap_or_default(),
            route: None,
            route_params: Vec::new(),
            route_upstream: None,
            upstreams: Vec::new(),
            routes: Vec::new(),
            consumers: Default::default(),
            redis_url: None,
            plugin: String::new(),
            block_hash: String::new(),
            resources,
            scope: Default::default(),
        }
    }

    /// Parse a plugin block into its config type (errors carry the field's location).
    /// A bare `- NAME` parses as an empty block.
    pub fn parse<C: DeserializeOwned>(&self, value: &serde_yaml::Value) -> Result<C, ConfigError> {
        crate::config::parse_value(value, "")
    }

    /// This plugin's own state, kept across reloads while its route, name and block stay the
    /// same (so a reload that does not touch a `rate_limit` block keeps its counters); `init`
    /// makes it the first time, or after the block changed.
    pub fn state<T: std::any::Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let key = format!(
            "{}/{}/{}",
            self.route.as_deref().unwrap_or("*"),
            self.plugin,
            self.block_hash
        );
        self.shared_state(&key, init)
    }

    /// State under a key of the plugin's choosing (e.g. a JWKS shared by every route that names
    /// the same URL); kept while some plugin of the live config asks for it.
    pub fn shared_state<T: std::any::Any + Send + Sync>(&self, key: &str, init: impl FnOnce() -> T) -> Arc<T> {
        self.scope
            .state_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        self.resources.state.get_or_init(key, init)
    }

    /// Run `task` every `period` while this config is live (it stops when a reload retires the
    /// config; a run in progress finishes on its own and never holds a reload).
    pub fn every<F, Fut>(&self, name: &str, period: std::time::Duration, task: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        use futures::FutureExt;
        let task = Arc::new(task);
        self.scope
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(crate::resources::Periodic {
                name: format!("{}/{}", self.route.as_deref().unwrap_or("*"), name),
                period,
                run: Arc::new(move || task().boxed()),
                last: std::sync::Mutex::new(None),
            }));
    }

    /// The process's Redis backend for the config's `redis.url` (`None` without a `redis`
    /// section): one per URL, shared by every plugin and kept across reloads. Creating it only
    /// parses the URL; the connection is made on first use (never by `portico -t`).
    pub fn redis(&self) -> Result<Option<Arc<crate::limiter::RedisBackend>>, String> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let options = crate::limiter::RedisOptions::new(url.clone());
        let fresh = crate::limiter::RedisBackend::with_clock(&options, self.clock())?;
        Ok(Some(self.shared_state(&format!("redis/{url}"), || fresh)))
    }

    /// The process's clock (a manual one in tests).
    pub fn clock(&self) -> Arc<dyn crate::clock::Clock> {
        self.resources.clock.clone()
    }

    /// The process's client for calling upstreams of the request's config.
    pub fn upstream_client(&self) -> Arc<crate::client::UpstreamClient> {
        self.resources.client.clone()
    }

    /// Read a file the block names (a key, a certificate, a JWKS): a regular file of at most
    /// 1 MiB, relative to `base_dir`. The error names the file; the caller locates it.
    pub fn read_file(&self, p: &str) -> Result<Vec<u8>, String> {
        crate::config::files::read_config_file(&self.base_dir, p)
    }

    /// A config file path, relative to `base_dir`.
    pub fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }
}
