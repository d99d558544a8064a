//! Plugins by name, and the chains a route walks per phase.

use super::{BuildContext, Phases, Plugin, PluginKind};
use crate::config::ConfigError;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Arc;

/// Builds a plugin from its YAML block. Errors are located relative to the block
/// (`issuer`, `keys[1]`); the core prefixes `routes[N].plugins[M].NAME`.
pub type Factory = Arc<dyn Fn(&serde_yaml::Value, &BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> + Send + Sync>;

/// Plugins by name. [`Registry::builtin`] has Portico's own; add yours with [`Registry::register`].
#[derive(Clone, Default)]
pub struct Registry {
    factories: HashMap<String, Factory>,
}

impl Registry {
    pub fn empty() -> Self {
        Registry::default()
    }

    /// Every built-in plugin.
    pub fn builtin() -> Self {
        let mut r = Registry::empty();
        crate::plugins::register_builtins(&mut r);
        r
    }

    /// Register a plugin whose config type `C` is parsed from its block (give `C`
    /// `#[serde(deny_unknown_fields)]` so typos are errors).
    pub fn register<C, P, F>(&mut self, name: &str, build: F) -> &mut Self
    where
        C: DeserializeOwned,
        P: Plugin,
        F: Fn(C, &BuildContext) -> Result<P, ConfigError> + Send + Sync + 'static,
    {
        let f: Factory = Arc::new(move |value, ctx| {
            let cfg: C = ctx.parse(value)?;
            Ok(Arc::new(build(cfg, ctx)?) as Arc<dyn Plugin>)
        });
        self.factories.insert(name.to_string(), f);
        self
    }

    /// Register a raw factory that reads the YAML value itself.
    pub fn register_factory(&mut self, name: &str, factory: Factory) -> &mut Self {
        self.factories.insert(name.to_string(), factory);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Factory> {
        self.factories.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.factories.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }
}

/// One plugin in a compiled chain.
#[derive(Clone)]
pub struct Entry {
    pub name: Arc<str>,
    pub kind: PluginKind,
    pub plugin: Arc<dyn Plugin>,
}

/// A route's plugins, split per phase and ordered by kind, then global before route, then file
/// order. Built once per config; walked per request.
#[derive(Clone, Default)]
pub struct Chains {
    pub all: Vec<Entry>,
    pub request: Vec<Entry>,
    pub request_body: Vec<Entry>,
    pub upstream_request: Vec<Entry>,
    pub response: Vec<Entry>,
    pub response_body: Vec<Entry>,
    pub response_trailers: Vec<Entry>,
    pub observe_request_body: Vec<Entry>,
    pub log: Vec<Entry>,
}

impl Chains {
    /// `entries` must list global plugins first, then route plugins, each in file order.
    pub fn build(mut entries: Vec<Entry>) -> Self {
        entries.sort_by_key(|e| e.kind); // stable: keeps global-before-route and file order
        let pick = |p: Phases| -> Vec<Entry> {
            entries
                .iter()
                .filter(|e| e.plugin.phases().contains(p))
                .cloned()
                .collect()
        };
        Chains {
            request: pick(Phases::REQUEST),
            request_body: pick(Phases::REQUEST_BODY),
            upstream_request: pick(Phases::UPSTREAM_REQUEST),
            response: pick(Phases::RESPONSE),
            response_body: pick(Phases::RESPONSE_BODY),
            response_trailers: pick(Phases::RESPONSE_TRAILERS),
            observe_request_body: pick(Phases::OBSERVE_REQUEST_BODY),
            log: pick(Phases::LOG),
            all: entries,
        }
    }
}
