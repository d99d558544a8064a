//! Open connections per client address, held for each connection's life (Pingora's
//! `ConnectionFilter` sees only the accept, not the close).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections per client address.
#[derive(Default)]
pub struct ConnectionCounts(Arc<Mutex<HashMap<IpAddr, u32>>>);

/// One open connection's place in [`ConnectionCounts`], given back on drop.
pub struct Slot(Arc<Mutex<HashMap<IpAddr, u32>>>, IpAddr);

impl ConnectionCounts {
    pub fn acquire(&self, ip: IpAddr, max: u32) -> Option<Slot> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.0.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}
