//! Acceptance [1/9] #4: `portico -t` finds bad configs with their locations, and accepts every
//! file in conf/.

mod common;
use common::*;
use std::process::Command;

const BASE: &str = "listeners: [{ address: 127.0.0.1:18080 }]\nupstreams:\n  a: { endpoints: [127.0.0.1:9001] }\n";

#[test]
fn rejects_bad_configs_with_locations() {
    let cases: &[(&str, &str)] = &[
        ("routes:\n  - { name: r, upstream: a, match: { path_prefx: /x } }\n", "routes[0].match: unknown field 'path_prefx'"),
        ("routes:\n  - { name: r, upstream: a, plugins: [ { nope: {} } ] }\n", "routes[0].plugins[0]: unknown plugin 'nope'"),
        ("routes:\n  - { name: r, upstream: missing }\n", "routes[0].upstream: no upstream named 'missing'"),
        ("routes:\n  - { name: r, upstream: a }\n  - { name: r, upstream: a }\n", "routes[1].name: duplicate route name 'r'"),
        ("routes:\n  - { name: r, upstream: a, timeouts: { read: soon } }\n", "routes[0].timeouts.read"),
        ("client_ip: { trusted_proxies: [10.0.0.0/8, 300.1.1.1/8] }\nroutes: []\n", "client_ip.trusted_proxies[1]"),
        ("routes:\n  - { name: r, upstream: a, plugins: [ { headers: { request: { sett: {} } } } ] }\n", "routes[0].plugins[0].headers.request: unknown field 'sett'"),
        ("routes:\n  - { name: r, upstream: a, plugins: [ { headers: { response: { set: { x: '${nope}' } } } } ] }\n", "routes[0].plugins[0].headers.response.set.x"),
        ("plugins: [ { headers: { requests: {} } } ]\nroutes: []\n", "plugins[0].headers: unknown field 'requests'"),
        ("routes:\n  - { name: r, upstream: a, match: { path: \"/a/{id\" } }\n", "routes[0].match.path"),
        ("routes:\n  - { name: r, upstream: a, match: { methods: [G E T] } }\n", "routes[0].match.methods[0]"),
        ("limits: { max_request_body_bytes: 10 parsecs }\nroutes: []\n", "limits.max_request_body_bytes"),
        ("server: { thraeds: 4 }\nroutes: []\n", "server: unknown field 'thraeds'"),
        ("routes:\n  - { upstream: a }\n", "routes[0]: missing field 'name'"),
    ];
    for (body, want) in cases {
        let (code, out) = check(&format!("{BASE}{body}"));
        assert_eq!(code, 1, "{body}\n{out}");
        assert!(out.contains(want), "expected `{want}` in:\n{out}");
        assert!(!out.contains("panicked"), "{out}");
    }
    // Several errors at once are all reported.
    let (code, out) = check(&format!(
        "{BASE}routes:\n  - {{ name: r, upstream: x }}\n  - {{ name: r, upstream: y }}\n"
    ));
    assert_eq!(code, 1);
    assert!(
        out.contains("routes[0].upstream") && out.contains("routes[1].upstream") && out.contains("routes[1].name"),
        "{out}"
    );
    // Bad YAML and a missing file.
    assert_eq!(check("listeners: [").0, 1);
    let out = Command::new(BIN)
        .args(["-t", "-c", "/nonexistent/portico.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn accepts_every_file_in_conf() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let out = Command::new(BIN).arg("-t").arg("-c").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        n += 1;
    }
    assert!(n >= 2);
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("portico "));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("-t") && text.contains("demo"), "{text}");
}

/// Hostile configs (contract § Bounds on what Portico reads): each is refused fast, with a
/// location, under a 4 GiB address-space limit — at `-t`, and by a running gateway on reload.
fn hostile_configs() -> Vec<(&'static str, String, &'static str)> {
    let route = "routes:\n  - name: r\n    upstream: a\n    plugins:\n";
    vec![
        (
            "nested brackets",
            format!(
                "{BASE}{route}      - headers: {}{}\n",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            "nests too deep at line 8",
        ),
        (
            "alias expansion",
            format!(
                "{BASE}{route}      - headers: [&s \"{}\"{}]\n",
                "x".repeat(1 << 20),
                ", *s".repeat(20_000)
            ),
            "aliases expand",
        ),
        (
            "a key file that never ends",
            format!("{BASE}{route}      - jwt: {{ public_key_file: /dev/zero }}\n"),
            "routes[0].plugins[0].jwt.public_key_file: /dev/zero is not a regular file",
        ),
        (
            // Accepted once, then every connection panicked computing `accept + header_timeout`.
            "an overflowing duration",
            format!("{BASE}limits: {{ header_timeout: 18446744073709551615s }}\nroutes: []\n"),
            "limits.header_timeout: invalid duration",
        ),
        (
            "a duration past its key's bound",
            format!("{BASE}limits: {{ body_timeout: 30d }}\nroutes: []\n"),
            "limits.body_timeout: must be at most 1h",
        ),
        (
            "a config over 16 MiB",
            format!("{BASE}routes: []\n# {}\n", "x".repeat(17 << 20)),
            "is larger than 16 MiB",
        ),
    ]
}

#[test]
fn hostile_configs_are_refused_fast_with_bounded_memory() {
    for (name, yaml, expect) in hostile_configs() {
        let dir = TempDir::new("hostile");
        let path = dir.write("c.yaml", &yaml);
        let start = std::time::Instant::now();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v 4194304; exec '{BIN}' -t -c '{}'", path.display()))
            .output()
            .expect("run portico -t");
        let took = start.elapsed();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {text}");
        assert!(text.contains(expect), "{name}: expected {expect:?} in {text}");
        assert!(took < std::time::Duration::from_secs(3), "{name}: took {took:?}");
    }
}

#[test]
fn a_running_gateway_rejects_hostile_configs_on_reload_and_keeps_serving() {
    let up = EchoServer::start("up").unwrap();
    let good = format!(
        "upstreams:\n  a: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: a }}\n",
        up.addr
    );
    let gw = Gw::start(&good);
    let hash = gw.config_hash();
    for (i, (name, yaml, _)) in hostile_configs().into_iter().enumerate() {
        // The hostile part, in place of the test's own upstream and routes.
        let body = yaml.replacen(
            BASE,
            &format!("upstreams:\n  a: {{ endpoints: [\"{}\"] }}\n", up.addr),
            1,
        );
        gw.p.rewrite_config(&gw.config(&body));
        gw.p.signal("HUP");
        wait_for(
            &format!("{name}: the reload to be refused"),
            std::time::Duration::from_secs(10),
            || {
                let errors = metric(&gw.metrics(), "portico_config_reloads_total", &[("result", "error")]);
                (errors >= (i + 1) as f64).then_some(())
            },
        );
        assert_eq!(gw.get("/x").status, 200, "{name}: still serving");
        assert_eq!(gw.config_hash(), hash, "{name}: the old config stays");
    }
}

fn version(v: &str) -> (u32, u32) {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The Docker image builds the lockfile: its Rust is at least the `rust-version` Cargo.toml
/// declares, which is at least what every locked dependency needs.
#[test]
fn the_docker_toolchain_builds_the_lockfile() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust build stage");
    let docker = version(image.split('-').next().unwrap());
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    let declared = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| version(v.trim_matches('"')))
        .expect("rust-version");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (needed, by) = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?.to_string())))
        .max()
        .unwrap();
    assert!(
        declared >= needed,
        "rust-version {declared:?} < {needed:?} needed by {by}"
    );
    assert!(
        docker >= declared,
        "the Dockerfile's rust:{image} is older than rust-version {declared:?}"
    );
}

#[test]
fn portico_health_asks_the_admin_listener() {
    let up = EchoServer::start("up").unwrap();
    let gw = Gw::start(&format!(
        "upstreams:\n  a: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: r, upstream: a }}\n",
        up.addr
    ));
    let health = |args: &[&str]| Command::new(BIN).arg("health").args(args).output().unwrap();
    assert!(health(&["--admin", &gw.admin]).status.success());
    let dead = free_addr();
    let out = health(&["--admin", &dead]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&dead));
    let url = format!("http://{}/healthz", up.addr);
    assert!(health(&["--url", &url]).status.success());
}
