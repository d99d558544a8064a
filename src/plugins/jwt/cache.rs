//! Verified tokens, per plugin instance (so a token accepted for one route's audience is still
//! checked against another route's), keyed by the token's SHA-256. Time claims are re-checked
//! on every hit; entries go when they expire and whenever the key set changes.

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(super) struct Verified {
    pub(super) claims: Arc<Map<String, Value>>,
    pub(super) exp: u64,
    pub(super) nbf: Option<u64>,
    pub(super) generation: u64,
}

pub(super) struct TokenCache {
    pub(super) map: Mutex<HashMap<[u8; 32], Arc<Verified>>>,
    pub(super) capacity: usize,
}

impl TokenCache {
    pub(super) fn get(&self, digest: &[u8; 32], generation: u64) -> Option<Arc<Verified>> {
        if self.capacity == 0 {
            return None;
        }
        let hit = self.map.lock().unwrap().get(digest).cloned()?;
        (hit.generation == generation).then_some(hit)
    }

    pub(super) fn put(&self, digest: [u8; 32], v: Verified, leeway: u64, now: u64) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap();
        if map.len() >= self.capacity {
            map.retain(|_, e| e.exp + leeway >= now);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(digest, Arc::new(v));
    }
}
