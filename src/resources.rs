//! What the running process owns beside its config, and hands to plugins through
//! [`crate::plugin::BuildContext`]: endpoint health, plugin state that survives reloads, the
//! clock, the upstream client, the Redis connection, and periodic tasks.
//!
//! A snapshot is rebuilt whole on every reload; these are not. A plugin asks for its state by a
//! key (by default: its route, its name and a hash of its block) and gets the same `Arc` back
//! from the next compile while the key is unchanged — so a reload that does not touch a
//! `rate_limit` block hands out no fresh budget. Entries the live snapshot no longer uses are
//! dropped after each reload.

use crate::client::UpstreamClient;
use crate::clock::{Clock, SystemClock};
use crate::upstream::HealthRegistry;
use futures::future::BoxFuture;
use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Resources {
    pub health: HealthRegistry,
    pub state: StateStore,
    pub clock: Arc<dyn Clock>,
    pub client: Arc<UpstreamClient>,
    /// True under `portico -t`: nothing may touch the network.
    pub offline: bool,
    /// Upstream host names to addresses (the system's; a table in tests).
    pub resolver: Arc<dyn crate::resolver::Resolve>,
}

impl Resources {
    /// The running gateway's.
    pub fn new(upstream_pool_size: usize) -> Arc<Resources> {
        Arc::new(Resources {
            health: HealthRegistry::default(),
            state: StateStore::default(),
            clock: Arc::new(SystemClock),
            client: Arc::new(UpstreamClient::new(upstream_pool_size)),
            offline: false,
            resolver: Arc::new(crate::resolver::SystemResolver),
        })
    }

    /// For `portico -t`: a throwaway set that creates no connection.
    pub fn offline() -> Arc<Resources> {
        Arc::new(Resources {
            offline: true,
            ..Arc::into_inner(Resources::new(1)).expect("fresh")
        })
    }

    /// The same, with a resolver of the caller's (tests).
    pub fn with_resolver(resolver: Arc<dyn crate::resolver::Resolve>) -> Arc<Resources> {
        Arc::new(Resources {
            resolver,
            ..Arc::into_inner(Resources::new(128)).expect("fresh")
        })
    }

    /// The same, with a clock of the caller's (tests).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Arc<Resources> {
        Arc::new(Resources {
            clock,
            ..Arc::into_inner(Resources::new(128)).expect("fresh")
        })
    }
}

/// Plugin state by key, kept across snapshots.
#[derive(Default)]
pub struct StateStore {
    entries: Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>,
}

impl StateStore {
    /// The state under `key`, made by `init` if there is none (or it has another type).
    pub fn get_or_init<T: Any + Send + Sync>(&self, key: &str, init: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = map.get(key) {
            if let Ok(t) = existing.clone().downcast::<T>() {
                return t;
            }
        }
        let fresh = Arc::new(init());
        map.insert(key.to_string(), fresh.clone());
        fresh
    }

    /// Drop every entry whose key is not in `live` (the keys the live snapshot asked for).
    pub fn retain(&self, live: &HashSet<String>) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| live.contains(k));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A task a plugin runs every `period` while its snapshot is live (see [`crate::scheduler`]).
pub struct Periodic {
    pub name: String,
    pub period: Duration,
    pub run: Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
    pub(crate) last: Mutex<Option<Instant>>,
}

/// What one compile collects from the plugins it builds.
#[derive(Default)]
pub struct CompileScope {
    pub(crate) state_keys: Mutex<HashSet<String>>,
    pub(crate) tasks: Mutex<Vec<Arc<Periodic>>>,
}
