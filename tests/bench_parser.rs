//! The benchmark's parsers (bench/bench.py) read recorded wrk and h2load outputs
//! (bench/samples/) as they should: a silent misreading would put wrong figures in the README.

use std::process::Command;

fn parsed() -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/bench/bench.py"))
        .arg("--parse-samples")
        .arg(format!("{root}/bench/samples"))
        .output()
        .expect("python3 runs (./dev deps installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the parsers print JSON")
}

#[test]
fn recorded_outputs_are_read_exactly() {
    let p = parsed();
    let wrk = &p["wrk-throughput.txt"];
    assert_eq!(wrk["requests"], 347311);
    assert_eq!(wrk["rps"], 165409.74);
    assert_eq!(wrk["seconds"], 2.1);
    assert_eq!(
        (wrk["socket_errors"].as_u64(), wrk["non_2xx"].as_u64()),
        (Some(0), Some(0))
    );
    // --latency: the distribution, in microseconds (wrk prints us and ms).
    let lat = &p["wrk-latency.txt"];
    assert_eq!(
        [&lat["p50_us"], &lat["p75_us"], &lat["p90_us"], &lat["p99_us"]].map(|v| v.as_f64().unwrap()),
        [8.0, 10.0, 16.0, 2250.0]
    );
    assert_eq!(lat["rps"], 101054.18);
    // Errors are counted, never dropped: a run with errors must not read as a clean one.
    assert_eq!(p["wrk-socket-errors.txt"]["socket_errors"], 8);
    assert_eq!(p["wrk-socket-errors.txt"]["seconds"], 8.03);
    let h2 = &p["h2load-h1.txt"];
    assert_eq!(
        (h2["requests"].as_u64(), h2["succeeded"].as_u64()),
        (Some(2000), Some(2000))
    );
    assert_eq!((h2["failed"].as_u64(), h2["non_2xx"].as_u64()), (Some(0), Some(0)));
    assert_eq!(h2["rps"], 87435.52);
    assert_eq!(h2["seconds"], 0.02287);
}
