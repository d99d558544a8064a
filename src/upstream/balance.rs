//! Choosing an endpoint: smooth weighted round robin, weighted random, weighted rendezvous
//! (consistent) hashing and least requests — all skipping tried and unusable endpoints.

use super::Upstream;
use crate::config::raw::Balance;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;

impl Upstream {
    /// Choose an endpoint index, skipping `tried` ones and, while any remain, unusable ones.
    /// When every untried endpoint is down the pick ignores health (a request that might work
    /// beats a certain 502). `None` when every endpoint was tried.
    ///
    /// Round robin moves its cursor once per request, on its first pick: a retry walks on
    /// from where the first pick left the cursor without taking another turn. (Were it to take
    /// one, with `[dead, good]` every request would start on the dead endpoint again.)
    pub fn select(&self, hash_key: Option<&[u8]>, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        if tried.len() >= n {
            return None;
        }
        let rr_start = match (self.balance, tried.is_empty()) {
            (Balance::RoundRobin, true) => self.rr_next.fetch_add(1, Ordering::Relaxed),
            (Balance::RoundRobin, false) => self.rr_next.load(Ordering::Relaxed),
            _ => 0,
        };
        let open = |i: usize| !tried.contains(&i);
        let good = |i: usize| open(i) && self.endpoints[i].health.usable();
        if let Some(i) = self.pick(hash_key, rr_start, &good) {
            return Some(i);
        }
        self.pick(hash_key, rr_start, &open)
    }

    fn pick(&self, hash_key: Option<&[u8]>, rr_start: usize, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        match self.balance {
            Balance::RoundRobin => {
                let len = self.rr_order.len();
                let start = rr_start;
                (0..len)
                    .map(|k| self.rr_order[(start + k) % len] as usize)
                    .find(|&i| ok(i))
            }
            Balance::Random => {
                let total = *self.cumulative.last().unwrap_or(&0);
                for _ in 0..3 {
                    let r = rand::random::<u64>() % total.max(1);
                    let i = self.cumulative.partition_point(|&c| c <= r);
                    if i < n && ok(i) {
                        return Some(i);
                    }
                }
                let start = rand::random::<usize>() % n;
                (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
            }
            Balance::ConsistentHash => {
                // Weighted rendezvous hashing: stable per key, moves only 1/n of keys when an
                // endpoint comes or goes, and falls back in a stable order.
                let key = hash_key.unwrap_or(b"");
                let mut best: Option<(f64, usize)> = None;
                for (i, e) in self.endpoints.iter().enumerate() {
                    if !ok(i) {
                        continue;
                    }
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    key.hash(&mut h);
                    e.address.hash(&mut h);
                    let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    let score = -(e.weight as f64) / u.ln();
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i));
                    }
                }
                best.map(|(_, i)| i)
            }
            Balance::LeastRequests => {
                let start = rand::random::<usize>() % n;
                (0..n).map(|k| (start + k) % n).filter(|&i| ok(i)).min_by_key(|&i| {
                    let e = &self.endpoints[i];
                    (e.health.in_flight() as u64 * 1_000_000) / e.weight.max(1) as u64
                })
            }
        }
    }
}

/// Nginx's smooth weighted round robin: weights 5,1,1 give a,a,b,a,c,a,a rather than bursts.
pub(super) fn smooth_weighted_order(weights: &[u64]) -> Vec<u16> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|x| (x / g) as i64).collect();
    let total: i64 = w.iter().sum();
    if total > 1 << 16 {
        // Too long to unroll: fall back to blocks in proportion (still exact over a cycle).
        return w
            .iter()
            .enumerate()
            .flat_map(|(i, &k)| std::iter::repeat_n(i as u16, k as usize))
            .collect();
    }
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u16);
    }
    order
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
