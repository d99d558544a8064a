//! What mediation and orchestration cost.
//!
//! - `mediate/*`: the transform's own work on a 10 KB body (parse, operations, serialise), and
//!   XML → JSON on a 10 KB document, without any I/O.
//! - `gateway/*`: one request at a time on a keep-alive connection to an in-process gateway,
//!   end to end (client, gateway, upstream all on this machine): a 10 KB JSON answer proxied
//!   plainly and through `transform`; a small answer proxied plainly and an aggregate of 3 calls.
//!
//! Each is measured twice: wall time (`…/wall`), and the CPU time of the whole process
//! (`…/cpu`: client, gateway and upstream threads together). On a shared 2-vCPU machine the
//! wall time depends on what else runs; CPU time per request does not, and the difference
//! between two gateway routes is what the plugin adds.
//!
//! `cargo bench --bench mediation`

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use portico::echo::EchoServer;
use portico::mediation::body::{BodyPolicy, Coding, Format, Transform};
use portico::mediation::json_ops::{JsonOps, NoVars, OpsConfig};
use portico::testing::{read_response, InProcess};
use portico::Registry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

#[global_allocator]
static ALLOC: portico::memory::Allocator = portico::memory::Allocator;

/// About 10 KB of JSON: a page of 66 items.
fn json_10k() -> Vec<u8> {
    let items: Vec<serde_json::Value> = (0..66)
        .map(|i| {
            serde_json::json!({
                "id": i, "sku": format!("SKU-{i:05}"), "name": format!("Item number {i}"),
                "price": {"amount": i * 100 + 99, "currency": "EUR"},
                "tags": ["a", "b", "c"], "internal": {"warehouse": "W1", "row": i}
            })
        })
        .collect();
    let doc = serde_json::json!({"items": items, "page": {"n": 1, "size": 66}, "debug": {"took_ms": 3}});
    let out = serde_json::to_vec(&doc).unwrap();
    assert!((9_000..12_000).contains(&out.len()), "{}", out.len());
    out
}

/// About 10 KB of XML.
fn xml_10k() -> Vec<u8> {
    let mut out = String::from("<?xml version=\"1.0\"?><catalog>");
    for i in 0..100 {
        out.push_str(&format!(
            "<item id=\"{i}\" sku=\"SKU-{i:05}\"><name>Item number {i}</name><price currency=\"EUR\">{}.99</price></item>",
            i * 3
        ));
    }
    out.push_str("</catalog>");
    assert!((9_000..12_000).contains(&out.len()), "{}", out.len());
    out.into_bytes()
}

const OPS: &str = "select: [items.id, items.name, items.price, page]\nremove: [items.price.currency]\nrename: {items.name: title}\nwrap: data";

/// The process's CPU time (every thread), in nanoseconds.
struct CpuTime;

fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        process_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        process_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (div, unit) = if typical < 1e3 {
            (1.0, "ns cpu")
        } else if typical < 1e6 {
            (1e3, "µs cpu")
        } else {
            (1e6, "ms cpu")
        };
        values.iter_mut().for_each(|v| *v /= div);
        unit
    }
    fn scale_throughputs(&self, _typical: f64, _t: &Throughput, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| *v = 1e9 / *v);
        "per cpu second"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn mediate<M: Measurement + 'static>(c: &mut Criterion<M>, tag: &str) {
    let cfg: OpsConfig = serde_yaml::from_str(OPS).unwrap();
    let ops = JsonOps::compile(&cfg, "response").unwrap();
    let policy = BodyPolicy {
        max_body: 1 << 20,
        xml_to_json: true,
    };
    let json = json_10k();
    let xml = xml_10k();
    let plain = |format| Transform {
        format,
        coding: Coding::Identity,
    };
    c.bench_function(&format!("mediate/json_10k_parse_and_serialise_only/{tag}"), |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&json)).unwrap();
            black_box(serde_json::to_vec(&v).unwrap())
        })
    });
    c.bench_function(&format!("mediate/json_10k_transform/{tag}"), |b| {
        b.iter(|| {
            black_box(
                policy
                    .mediate(black_box(&json), plain(Format::Json), &ops, &NoVars)
                    .unwrap(),
            )
        })
    });
    let none = JsonOps::default();
    c.bench_function(&format!("mediate/xml_10k_to_json/{tag}"), |b| {
        b.iter(|| {
            black_box(
                policy
                    .mediate(black_box(&xml), plain(Format::Xml), &none, &NoVars)
                    .unwrap(),
            )
        })
    });
}

/// An upstream answering every request with the same bytes, keeping connections open.
fn fixed_upstream(content_type: &str, body: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut s: TcpStream = stream;
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    if s.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn gateway<M: Measurement + 'static>(c: &mut Criterion<M>, tag: &str) {
    let json = fixed_upstream("application/json", json_10k());
    let small = fixed_upstream("application/json", br#"{"id":7,"name":"ann"}"#.to_vec());
    let echo = EchoServer::start("e").unwrap();
    let body = format!(
        r#"access_log: {{ enabled: false }}
limits: {{ keepalive_requests: 4000000000 }}
upstreams:
  json: {{ endpoints: [{json}] }}
  small: {{ endpoints: [{small}] }}
  echo: {{ endpoints: [{}] }}
routes:
  - name: plain_10k
    match: {{ path: /plain_10k }}
    upstream: json
  - name: transform_10k
    match: {{ path: /transform_10k }}
    upstream: json
    plugins:
      - transform:
          response: {{ select: [items.id, items.name, items.price, page], remove: [items.price.currency], rename: {{ items.name: title }}, wrap: data }}
  - name: plain_small
    match: {{ path: /plain_small }}
    upstream: small
  - name: aggregate_3
    match: {{ path: "/aggregate_3/{{id}}" }}
    plugins:
      - aggregate:
          calls:
            a: {{ upstream: small, path: "/a/{{id}}" }}
            b: {{ upstream: small, path: "/b/{{id}}" }}
            c: {{ upstream: small, path: "/c/{{id}}" }}
  - name: aggregate_3_chain
    match: {{ path: "/aggregate_3_chain/{{id}}" }}
    plugins:
      - aggregate:
          calls:
            a: {{ upstream: small, path: "/a/{{id}}" }}
            b: {{ upstream: small, path: "/b/${{a.id}}", depends_on: [a] }}
            c: {{ upstream: small, path: "/c/${{b.id}}", depends_on: [b] }}
"#,
        echo.addr
    );
    let gw = InProcess::start(&body, Registry::builtin());
    let connect = || {
        let conn = TcpStream::connect(&gw.addr).unwrap();
        conn.set_nodelay(true).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        conn
    };
    let mut conn = connect();
    let mut one = |path: &str| {
        // One request on the keep-alive connection (a new one if the gateway closed it).
        for _ in 0..2 {
            let sent = write!(conn, "GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
            match sent.and_then(|_| read_response(&mut conn, false)) {
                Ok(r) => {
                    assert_eq!(r.status, 200, "{path}: {}", r.text());
                    return r.body.len();
                }
                Err(_) => conn = connect(),
            }
        }
        panic!("{path}: no answer");
    };
    // Sanity: the transform reshapes, the aggregate answers.
    assert!(one("/transform_10k") < one("/plain_10k"));
    assert!(one("/aggregate_3/1") > 0);
    let mut group = c.benchmark_group(format!("gateway_{tag}"));
    for path in [
        "/plain_10k",
        "/transform_10k",
        "/plain_small",
        "/aggregate_3/1",
        "/aggregate_3_chain/1",
    ] {
        let name = path.trim_start_matches('/').split('/').next().unwrap().to_string();
        group.bench_function(name, |b| b.iter(|| black_box(one(path))));
    }
    group.finish();
    drop(gw);
}

fn wall(c: &mut Criterion<WallTime>) {
    mediate(c, "wall");
    gateway(c, "wall");
}

fn cpu(c: &mut Criterion<CpuTime>) {
    mediate(c, "cpu");
    gateway(c, "cpu");
}

criterion_group!(wall_time, wall);
criterion_group! {
    name = cpu_time;
    config = Criterion::default().with_measurement(CpuTime);
    targets = cpu
}
criterion_main!(wall_time, cpu_time);
