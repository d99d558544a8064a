//! The local rate limiter: the cost of one decision (alone, and with two threads on one key or
//! on two keys) and the process's memory after a million distinct keys.
//! `cargo bench --bench limiter`

use criterion::{black_box, criterion_group, Criterion};
use portico::limiter::{GcraParams, LocalGcra, ManualClock, SystemClock, DEFAULT_MAX_KEYS};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

// The gateway's allocator, so memory reads as it would in production.
#[global_allocator]
static ALLOC: portico::memory::Allocator = portico::memory::Allocator;

fn limiter() -> LocalGcra {
    let p = GcraParams::new(1000, Duration::from_secs(1), 100).expect("params");
    LocalGcra::new(p, DEFAULT_MAX_KEYS, Arc::new(SystemClock))
}

fn one_thread(c: &mut Criterion) {
    let l = limiter();
    let keys: Vec<String> = (0..1024).map(|i| format!("10.0.{}.{}", i >> 8, i & 255)).collect();
    let mut i = 0;
    c.bench_function("local_gcra/one_thread_1k_keys", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(l.check(&keys[i]))
        })
    });
    c.bench_function("local_gcra/one_thread_one_key", |b| {
        b.iter(|| black_box(l.check("10.0.0.1")))
    });
}

/// Two threads doing `iters` decisions each, at once; the wall time of the pair.
fn pair(l: &Arc<LocalGcra>, keys: [&'static str; 2], iters: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let (l, barrier) = (l.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    black_box(l.check(key));
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        let _ = t.join();
    }
    start.elapsed()
}

fn two_threads(c: &mut Criterion) {
    let l = Arc::new(limiter());
    c.bench_function("local_gcra/two_threads_one_key", |b| {
        b.iter_custom(|iters| pair(&l, ["hot", "hot"], iters))
    });
    c.bench_function("local_gcra/two_threads_two_keys", |b| {
        b.iter_custom(|iters| pair(&l, ["10.0.0.1", "10.9.9.9"], iters))
    });
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// RSS before and after a million distinct keys, then after two million more (the cap holds).
fn memory() {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(1_700_000_000)));
    let p = GcraParams::new(1, Duration::from_secs(3600), 0).expect("params");
    let l = LocalGcra::new(p, DEFAULT_MAX_KEYS, clock);
    let mut key = String::with_capacity(24);
    let mut insert = |range: std::ops::Range<u32>| {
        use std::fmt::Write;
        let start = Instant::now();
        for i in range.clone() {
            key.clear();
            let _ = write!(key, "2001:db8::{i:x}");
            l.check(&key);
        }
        start.elapsed().as_nanos() as f64 / f64::from(range.end - range.start)
    };
    let before = rss_kib();
    let ns = insert(0..1_000_000);
    let after = rss_kib();
    println!(
        "memory: RSS {before} KiB before, {after} KiB after 1,000,000 distinct keys ({} held, {:.0} bytes/key, {ns:.0} ns/new key)",
        l.len(),
        (after - before) as f64 * 1024.0 / l.len() as f64
    );
    let ns = insert(1_000_000..3_000_000);
    println!(
        "memory: RSS {} KiB after 2,000,000 more (cap {DEFAULT_MAX_KEYS}, {} held, {ns:.0} ns/new key with eviction)",
        rss_kib(),
        l.len()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = one_thread, two_threads
}

fn main() {
    // `cargo test --benches` runs each bench once as a smoke test: skip the memory run there.
    if !std::env::args().any(|a| a == "--test") {
        memory();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
