//! What finding a request's route costs, with many routes: a scan in file order (what Portico
//! did before the index) against the route index (`portico::route::RouteIndex`), for a request
//! whose route is the last of 1,000 (100 hosts × 10 path prefixes), and for one that matches
//! none; and the single-route config both use the scan for.
//!
//! `cargo bench --bench routing`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method};
use portico::route::{HostPattern, Matcher, PathMatch, RequestKey, RouteIndex};

#[global_allocator]
static ALLOC: portico::memory::Allocator = portico::memory::Allocator;

fn routes(n: usize) -> Vec<Matcher> {
    (0..n)
        .map(|i| Matcher {
            hosts: vec![HostPattern::parse(&format!("svc{}.example.com", i / 10)).unwrap()],
            path: PathMatch::prefix(&format!("/api{}", i % 10)).unwrap(),
            methods: vec![],
            headers: vec![],
        })
        .collect()
}

fn routing(c: &mut Criterion) {
    let headers = HeaderMap::new();
    let method = Method::GET;
    let many = routes(1000);
    let index = RouteIndex::build(many.iter());
    for (name, host, path) in [
        ("last_of_1000", "svc99.example.com", "/api9/orders/7"),
        ("none_of_1000", "unknown.example.com", "/api9/orders/7"),
    ] {
        let key = RequestKey {
            host,
            path,
            method: &method,
            headers: &headers,
        };
        let mut params = Vec::new();
        c.bench_function(&format!("route/{name}/scan"), |b| {
            b.iter(|| black_box(many.iter().position(|r| r.matches(black_box(&key), &mut params))))
        });
        c.bench_function(&format!("route/{name}/index"), |b| {
            b.iter(|| {
                black_box(
                    index
                        .candidates(black_box(&key), many.len())
                        .find(|&i| many[i].matches(&key, &mut params)),
                )
            })
        });
    }
    let one = routes(1);
    let one_index = RouteIndex::build(one.iter());
    let key = RequestKey {
        host: "svc0.example.com",
        path: "/api0/x",
        method: &method,
        headers: &headers,
    };
    let mut params = Vec::new();
    c.bench_function("route/one_route/index", |b| {
        b.iter(|| {
            black_box(
                one_index
                    .candidates(black_box(&key), 1)
                    .find(|&i| one[i].matches(&key, &mut params)),
            )
        })
    });
}

criterion_group!(benches, routing);
criterion_main!(benches);
