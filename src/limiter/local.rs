//! The in-process store: one small value per key in a sharded, bounded table. Used by
//! `store: local` rate limits ([`LocalGcra`]) and quotas ([`LocalQuota`]).
//!
//! **Sharding.** A key is hashed once (SipHash with a per-table random seed, so clients cannot
//! aim keys at one shard or at each other); the hash picks a shard (64, more for big tables), each a
//! `Mutex<HashMap>`, and is itself the map key. Two threads on different keys almost never wait
//! for each other, and a decision holds its lock for a few dozen nanoseconds.
//!
//! **Keys are stored as their 64-bit hash**, not as text: an entry costs the same 16–24 bytes
//! whether the key is an address or an 8 KiB header, so `max_keys` bounds memory, not just a
//! count. Two keys share an entry only on a 64-bit collision of a seeded hash (about 3 in 10^8
//! for a full table of a million keys), which would merge their budgets; that is the price of
//! the bound.
//!
//! **Bounded memory.** Each shard holds at most its share of `max_keys` (default 1,000,000), so
//! the table holds at most `max_keys` keys (or one per shard when `max_keys` is below 64).
//! When a new key meets a full shard, the shard first drops its idle keys — a full bucket, or a
//! quota window that has ended — which is exact: a forgotten key decides as a full one. If that
//! frees less than a sixteenth of the shard, it also evicts the keys that have the least to
//! lose (the GCRA keys closest to a full bucket, the quota keys that used least) until a
//! sixteenth is free. An evicted key starts over with a full budget, so eviction errs towards
//! admitting, and only for the keys nearest to their limit's reset. Freeing a sixteenth at a time
//! keeps the O(shard) scan to once per shard/16 new keys. Evictions of live keys are counted in
//! `portico_limit_local_evictions_total`: a steady rate says `max_keys` is too small.
//!
//! (Over 500 lines because of its table of unit tests, kept beside the code they pin down.)

use super::decision::Decision;
use super::gcra::{self, GcraParams};
use super::metrics;
use super::quota::{self, Period};
use crate::clock::{micros, Clock};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

/// The default bound on keys per limiter.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// The fewest shards a table has.
const SHARDS: usize = 64;

/// The most keys per shard: a hash map of 16,384 buckets holds 14,336 (7/8 full) before it
/// doubles. Big tables get more shards rather than half-empty maps twice the size.
const SHARD_KEYS: usize = 14_336;

/// What a table stores per key.
pub(crate) trait Slot: Copy {
    /// True when forgetting this entry changes no decision (at `now`, µs).
    fn idle(&self, now: u64) -> bool;
    /// Entries with the lowest score are evicted first when a shard is full of live keys.
    fn keep_score(&self) -> u64;
}

/// A hasher for keys that are already hashes: the map uses the value as it is.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are ever hashed; this keeps the trait's contract for anything else.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map<V> = HashMap<u64, V, BuildHasherDefault<Prehashed>>;

/// One shard, on its own cache lines so neighbouring locks do not false-share.
#[repr(align(128))]
struct Shard<V> {
    map: Mutex<Map<V>>,
    cap: usize,
}

impl<V> Shard<V> {
    fn lock(&self) -> MutexGuard<'_, Map<V>> {
        // A panic while holding the lock cannot leave a half-written entry (values are Copy
        // and written whole), so a poisoned map is still a good map.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A sharded map from key hash to a [`Slot`], bounded to `max_keys` entries.
pub(crate) struct Table<V> {
    shards: Box<[Shard<V>]>,
    seed: RandomState,
}

impl<V: Slot> Table<V> {
    pub(crate) fn new(max_keys: usize) -> Self {
        Self::with_shards(max_keys, SHARDS.max(max_keys.div_ceil(SHARD_KEYS)))
    }

    /// `max_keys` split over `shards` (each gets at least one entry).
    pub(crate) fn with_shards(max_keys: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        let (each, extra) = (max_keys / shards, max_keys % shards);
        Table {
            shards: (0..shards)
                .map(|i| Shard {
                    map: Mutex::new(Map::default()),
                    cap: (each + usize::from(i < extra)).max(1),
                })
                .collect(),
            seed: RandomState::new(),
        }
    }

    /// Read-modify-write the entry of `key` under its shard's lock. `f` gets the live entry
    /// (`None` for a new, forgotten or idle one) and returns the entry to keep and a result.
    pub(crate) fn update<R>(&self, key: &str, now: u64, f: impl FnOnce(Option<V>) -> (Option<V>, R)) -> R {
        let hash = self.seed.hash_one(key);
        // Shard by middle bits: the map itself uses the low bits (bucket) and the top 7 (tag),
        // which must stay varied within a shard.
        let shard = &self.shards[(hash >> 40) as usize % self.shards.len()];
        let mut map = shard.lock();
        let old = map.get(&hash).copied().filter(|v| !v.idle(now));
        let (new, result) = f(old);
        match new {
            Some(v) => {
                if let Some(slot) = map.get_mut(&hash) {
                    *slot = v;
                } else {
                    if map.len() >= shard.cap {
                        make_room(&mut map, shard.cap, now);
                    }
                    map.insert(hash, v);
                }
            }
            None => {
                map.remove(&hash);
            }
        }
        result
    }

    /// Entries held, idle ones included.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Drop every idle entry (for a background sweep; the table stays bounded without one).
    pub(crate) fn sweep(&self, now: u64) {
        for s in self.shards.iter() {
            let mut map = s.lock();
            let live = map.values().filter(|v| !v.idle(now)).count();
            if live == map.len() {
                continue; // nothing to drop: no rebuild, no allocation
            }
            let mut fresh = Map::with_capacity_and_hasher(live, Default::default());
            fresh.extend(map.drain().filter(|(_, v)| !v.idle(now)));
            *map = fresh;
        }
    }
}

/// Free at least a sixteenth of a full shard: idle entries first, then the lowest scores.
///
/// The shard is rebuilt rather than pruned in place: removals leave tombstones, and a map whose
/// free slots are used up by tombstones while it is more than half full doubles its buckets
/// instead of reusing them. Rebuilt at `cap`, a shard's map never outgrows its first size.
fn make_room<V: Slot>(map: &mut Map<V>, cap: usize, now: u64) {
    let target = cap - (cap / 16).max(1);
    let mut scores: Vec<u64> = map.values().filter(|v| !v.idle(now)).map(Slot::keep_score).collect();
    let evict = scores.len().saturating_sub(target);
    // Live entries scoring below `cut` go, then `at_cut` of those scoring `cut`.
    let (cut, mut at_cut) = if evict > 0 {
        let (_, &mut cut, _) = scores.select_nth_unstable(evict - 1);
        (cut, evict - scores.iter().filter(|&&s| s < cut).count())
    } else {
        (0, 0)
    };
    let mut fresh = Map::with_capacity_and_hasher(cap, Default::default());
    for (k, v) in map.drain() {
        if v.idle(now) {
            continue;
        }
        if evict > 0 {
            let s = v.keep_score();
            if s < cut {
                continue;
            }
            if s == cut && at_cut > 0 {
                at_cut -= 1;
                continue;
            }
        }
        fresh.insert(k, v);
    }
    *map = fresh;
    if evict > 0 {
        metrics::LOCAL_EVICTIONS.inc_by(evict as u64);
    }
}

/// A GCRA key's theoretical arrival time, µs since the epoch.
#[derive(Debug, Clone, Copy)]
struct Tat(u64);

impl Slot for Tat {
    fn idle(&self, now: u64) -> bool {
        self.0 <= now
    }
    fn keep_score(&self) -> u64 {
        self.0
    }
}

/// A rate limit kept in this process.
pub struct LocalGcra {
    params: GcraParams,
    table: Table<Tat>,
    clock: Arc<dyn Clock>,
}

impl LocalGcra {
    /// A limiter holding at most `max_keys` keys (see the module docs for what happens past it).
    pub fn new(params: GcraParams, max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        LocalGcra {
            params,
            table: Table::new(max_keys),
            clock,
        }
    }

    #[cfg(test)]
    fn with_shards(params: GcraParams, max_keys: usize, shards: usize, clock: Arc<dyn Clock>) -> Self {
        LocalGcra {
            params,
            table: Table::with_shards(max_keys, shards),
            clock,
        }
    }

    /// Decide one request of `key`.
    pub fn check(&self, key: &str) -> Decision {
        let now = micros(self.clock.now());
        self.table.update(key, now, |old| {
            let step = gcra::decide(old.map(|t| t.0), now, &self.params);
            let keep = if step.decision.admitted {
                Some(Tat(step.new_tat))
            } else {
                old
            };
            (keep, step.decision)
        })
    }

    pub fn params(&self) -> &GcraParams {
        &self.params
    }

    /// Keys held (idle ones included until a sweep or a full shard drops them).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop the keys whose bucket is full again.
    pub fn sweep(&self) {
        self.table.sweep(micros(self.clock.now()));
    }
}

/// A quota key's count in one window.
#[derive(Debug, Clone, Copy)]
struct Used {
    /// The window's end, µs since the epoch.
    end: u64,
    used: u64,
}

impl Slot for Used {
    fn idle(&self, now: u64) -> bool {
        self.end <= now
    }
    fn keep_score(&self) -> u64 {
        self.used
    }
}

/// A quota kept in this process.
pub struct LocalQuota {
    limit: u64,
    period: Period,
    table: Table<Used>,
    clock: Arc<dyn Clock>,
}

impl LocalQuota {
    pub fn new(limit: u64, period: Period, max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        LocalQuota {
            limit,
            period,
            table: Table::new(max_keys),
            clock,
        }
    }

    /// Decide one request of `key` in the current window.
    pub fn check(&self, key: &str) -> Decision {
        let now = self.clock.now();
        let window = self.period.window(now);
        let (now, end) = (micros(now), window.end.saturating_mul(1_000_000));
        self.table.update(key, now, |old| {
            // An entry of another window (the clock stepped back) counts as a fresh start.
            let used = old.filter(|u| u.end == end).map_or(0, |u| u.used);
            let (decision, used) = quota::decide(used, self.limit, window, now);
            (Some(Used { end, used }), decision)
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn period(&self) -> Period {
        self.period
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop the counters of ended windows.
    pub fn sweep(&self) {
        self.table.sweep(micros(self.clock.now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::Duration;

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(Duration::from_secs(1_700_000_000)))
    }

    fn params(requests: u64, per: Duration, burst: u64) -> GcraParams {
        GcraParams::new(requests, per, burst).unwrap()
    }

    #[test]
    fn admits_burst_plus_one_then_one_per_interval() {
        let c = clock();
        let l = LocalGcra::new(params(10, Duration::from_secs(1), 4), DEFAULT_MAX_KEYS, c.clone());
        assert_eq!((0..10).filter(|_| l.check("k").admitted).count(), 5);
        for _ in 0..5 {
            c.advance(Duration::from_millis(100));
            assert!(l.check("k").admitted);
            assert!(!l.check("k").admitted);
        }
        c.advance(Duration::from_millis(99));
        let d = l.check("k");
        assert!(!d.admitted);
        assert_eq!(d.retry_after, Some(Duration::from_millis(1)));
    }

    #[test]
    fn keys_are_independent() {
        let l = LocalGcra::new(params(1, Duration::from_secs(60), 0), DEFAULT_MAX_KEYS, clock());
        assert!(l.check("a").admitted);
        assert!(!l.check("a").admitted);
        assert!(l.check("b").admitted);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn sustained_double_rate_gets_the_rate_plus_burst() {
        let c = clock();
        let l = LocalGcra::new(params(50, Duration::from_secs(1), 10), DEFAULT_MAX_KEYS, c.clone());
        let mut admitted = 0i64;
        for _ in 0..300 {
            admitted += i64::from(l.check("k").admitted);
            c.advance(Duration::from_millis(10)); // 100 a second for 3 s
        }
        let expected = 50 * 3 + 10 + 1;
        assert!(
            (admitted - expected).abs() <= 1,
            "admitted {admitted}, expected {expected}±1"
        );
    }

    #[test]
    fn concurrent_checks_on_one_key_lose_no_update() {
        let l = Arc::new(LocalGcra::new(
            params(1, Duration::from_secs(60), 99),
            DEFAULT_MAX_KEYS,
            clock(),
        ));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..1000).filter(|_| l.check("hot").admitted).count())
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn idle_keys_go_first_then_the_least_indebted() {
        let c = clock();
        // One shard of 8 so the test knows where every key lands.
        let l = LocalGcra::with_shards(params(1, Duration::from_secs(10), 5), 8, 1, c.clone());
        for i in 0..4 {
            assert!(l.check(&format!("idle-{i}")).admitted);
        }
        c.advance(Duration::from_secs(20)); // their buckets are full again
        for i in 0..4 {
            for _ in 0..6 {
                assert!(l.check(&format!("busy-{i}")).admitted); // 60 s of debt each
            }
        }
        assert_eq!(l.len(), 8);
        // A full shard: the four idle keys make room, the busy ones stay.
        assert!(l.check("new-0").admitted);
        assert_eq!(l.len(), 5);
        for i in 0..4 {
            assert!(!l.check(&format!("busy-{i}")).admitted, "busy-{i} kept its debt");
        }
        // Full of live keys: the one with the least debt (10 s, not 60 s) is evicted.
        for i in 1..4 {
            assert!(l.check(&format!("new-{i}")).admitted);
        }
        assert_eq!(l.len(), 8);
        assert!(l.check("new-4").admitted);
        assert!(l.len() <= 8);
        for i in 0..4 {
            assert!(!l.check(&format!("busy-{i}")).admitted, "busy-{i} survived eviction");
        }
    }

    #[test]
    fn a_full_shard_keeps_its_size_under_churn() {
        let table: Table<Tat> = Table::with_shards(1000, 1);
        let first_size = Map::<Tat>::with_capacity_and_hasher(1000, Default::default()).capacity();
        for i in 0..50_000u64 {
            // Every third key is idle at once; the rest live, with varied debts.
            let tat = if i % 3 == 0 { 1 } else { 1_000 + i % 997 };
            table.update(&i.to_string(), 100, |_| (Some(Tat(tat)), ()));
            let shard = table.shards[0].lock();
            assert!(shard.len() <= 1000);
            assert!(
                shard.capacity() <= first_size,
                "grew to {} at key {i}",
                shard.capacity()
            );
        }
    }

    #[test]
    fn big_tables_get_more_shards_not_bigger_maps() {
        assert_eq!(Table::<Tat>::new(1000).shards.len(), 64);
        let t = Table::<Tat>::new(DEFAULT_MAX_KEYS);
        assert_eq!(t.shards.len(), 70);
        assert!(t.shards.iter().all(|s| s.cap <= SHARD_KEYS));
        assert_eq!(t.shards.iter().map(|s| s.cap).sum::<usize>(), DEFAULT_MAX_KEYS);
    }

    #[test]
    fn sweep_drops_full_buckets() {
        let c = clock();
        let l = LocalGcra::new(params(1, Duration::from_secs(1), 0), DEFAULT_MAX_KEYS, c.clone());
        for i in 0..100 {
            l.check(&i.to_string());
        }
        c.advance(Duration::from_millis(500));
        l.sweep();
        assert_eq!(l.len(), 100, "not idle yet");
        c.advance(Duration::from_millis(500));
        l.sweep();
        assert!(l.is_empty());
    }

    #[test]
    fn a_million_distinct_keys_stay_within_the_cap() {
        let c = clock();
        let cap = 100_000;
        let l = LocalGcra::new(params(1, Duration::from_secs(3600), 0), cap, c.clone());
        let mut key = String::with_capacity(16);
        for i in 0..1_100_000u32 {
            use std::fmt::Write;
            key.clear();
            let _ = write!(key, "10.{}.{}", i >> 16, i & 0xffff);
            l.check(&key);
        }
        let n = l.len();
        assert!(n <= cap, "{n} entries for a cap of {cap}");
        assert!(n >= cap * 15 / 16 - 64, "the table is used, not emptied: {n}");
    }

    #[test]
    fn quota_counts_per_window_and_restarts() {
        // 2024-02-29T22:00:00Z, a leap day.
        let c = Arc::new(ManualClock::at(2024, 2, 29, 22, 0, 0));
        let q = LocalQuota::new(3, Period::Day, DEFAULT_MAX_KEYS, c.clone());
        for left in [2, 1, 0] {
            let d = q.check("alice");
            assert!(d.admitted);
            assert_eq!(d.remaining, left);
            assert_eq!(d.reset_after, Duration::from_secs(2 * 3600));
        }
        let d = q.check("alice");
        assert!(!d.admitted);
        assert_eq!(d.retry_after, Some(Duration::from_secs(2 * 3600)));
        assert!(q.check("bob").admitted, "keys count apart");
        // One second before midnight: still refused. At midnight (Mar 1): a new window.
        c.set(ManualClock::at(2024, 2, 29, 23, 59, 59).now());
        assert!(!q.check("alice").admitted);
        c.advance(Duration::from_secs(1));
        let d = q.check("alice");
        assert!(d.admitted);
        assert_eq!(d.remaining, 2);
        assert_eq!(d.reset_after, Duration::from_secs(86_400));
    }

    #[test]
    fn monthly_quota_across_new_year() {
        let c = Arc::new(ManualClock::at(2023, 12, 31, 23, 59, 0));
        let q = LocalQuota::new(1, Period::Month, DEFAULT_MAX_KEYS, c.clone());
        assert!(q.check("k").admitted);
        let d = q.check("k");
        assert!(!d.admitted);
        assert_eq!(d.retry_after, Some(Duration::from_secs(60)));
        c.advance(Duration::from_secs(60));
        let d = q.check("k");
        assert!(d.admitted, "January is a new window");
        assert_eq!(d.reset_after, Duration::from_secs(31 * 86_400));
    }

    #[test]
    fn quota_keys_of_ended_windows_are_idle() {
        let c = Arc::new(ManualClock::at(2024, 4, 30, 23, 0, 0));
        let q = LocalQuota::new(5, Period::Hour, DEFAULT_MAX_KEYS, c.clone());
        for i in 0..50 {
            q.check(&format!("k{i}"));
        }
        assert_eq!(q.len(), 50);
        c.advance(Duration::from_secs(3600));
        q.sweep();
        assert!(q.is_empty());
    }
}
