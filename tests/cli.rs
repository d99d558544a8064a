//! Acceptance [1/9] #4: `portico -t` finds bad configs with their locations, and accepts every
//! file in conf/.

mod common;
use common::*;
use std::process::Command;

fn check(yaml: &str) -> (i32, String) {
    let dir = TempDir::new("cli");
    let path = dir.write("c.yaml", yaml);
    let out = Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run portico -t");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

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
