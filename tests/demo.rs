//! Acceptance [1/9] #9: `portico demo` starts on a fresh machine and answers every curl
//! command it prints.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_answers_the_commands_it_prints() {
    let (listen, tls_listen, admin) = (free_addr(), free_addr(), free_addr());
    let dir = TempDir::new("demo");
    let out_path = dir.file("demo.out");
    let child = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            &listen,
            "--tls-listen",
            &tls_listen,
            "--admin",
            &admin,
        ])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Kill(child);
    wait_for("the demo gateway", Duration::from_secs(30), || {
        get(&admin, "/healthz").ok().filter(|r| r.status == 200)
    });
    let printed = std::fs::read_to_string(&out_path).unwrap();
    let commands: Vec<String> = printed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("$ "))
        .map(str::to_string)
        .collect();
    assert!(commands.len() >= 10, "too few commands in:\n{printed}");
    let mut outputs = Vec::new();
    for cmd in &commands {
        assert!(cmd.starts_with("curl "), "{cmd}");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} --max-time 10"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd} failed: {text}");
        assert!(!text.trim().is_empty(), "{cmd} printed nothing");
        assert!(!text.contains("\"error\":\"upstream"), "{cmd}: {text}");
        outputs.push((cmd.clone(), text.to_string()));
    }
    // The canary walkthrough: the failing canary is rolled back, then re-armed.
    let output = |needle: &str| {
        outputs
            .iter()
            .find(|(c, _)| c.contains(needle))
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("no command with {needle}"))
    };
    assert_eq!(output("status=500").trim(), "500 500 500 500 500 500");
    let rolled: serde_json::Value = serde_json::from_str(&output("/canaries")).unwrap();
    assert_eq!(rolled[0]["route"], "shop");
    assert_eq!(rolled[0]["rolled_back"], true, "{rolled}");
    assert_eq!(rolled[0]["effective_percent"], 0.0);
    let reset: serde_json::Value = serde_json::from_str(&output("/reset")).unwrap();
    assert_eq!(reset["rolled_back"], false, "{reset}");
    let metrics = output("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("portico_mirror_copies_total") && l.contains("route=\"shadow\"")),
        "{metrics}"
    );
    let run = |needle: &str| {
        let cmd = commands
            .iter()
            .find(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("no command with {needle}"));
        String::from_utf8_lossy(&Command::new("sh").arg("-c").arg(cmd).output().unwrap().stdout).to_string()
    };
    let secured: serde_json::Value = serde_json::from_str(&run("Bearer")).unwrap();
    assert_eq!(secured["headers"]["x-user"], "demo-user");
    let keyed: serde_json::Value = serde_json::from_str(&run("x-api-key")).unwrap();
    assert_eq!(keyed["headers"]["x-consumer"], "demo-app");
    assert!(run("-X OPTIONS").contains("access-control-allow-origin: https://app.example.com"));
    let packed = run("--compressed").to_ascii_lowercase();
    assert!(
        packed.contains("content-encoding: zstd") || packed.contains("content-encoding: gzip"),
        "{packed}"
    );
    assert!(packed.contains("\"path\":\"/packed/report\""), "decoded: {packed}");
    assert!(run("/office").contains("\"error\":\"forbidden\""));
    assert!(run("x-big").contains("\"error\":\"request_header_too_large\""));
    assert!(run("/upload").contains("\"error\":\"payload_too_large\""));
    // The rate-limited loop trips (the printed run above spent the budget already).
    let codes = run("/limited/[1-6]");
    assert!(
        codes.lines().all(|c| c == "200" || c == "429") && codes.contains("429"),
        "{codes}"
    );
    let refused = get(&listen, "/limited").unwrap();
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["error"], "rate_limited");
    assert!(refused.header("retry-after").is_some() && refused.header("ratelimit-limit") == Some("3"));
    let metered = get(&listen, "/metered").unwrap();
    assert_eq!(metered.status, 200);
    assert_eq!(metered.header("ratelimit-limit"), Some("100"));
    // HTTPS with the demo CA, h2 by ALPN, the SNI certificate, the mTLS identity.
    let https: serde_json::Value = serde_json::from_str(&run("--cacert")).unwrap();
    assert_eq!(https["headers"]["x-forwarded-proto"], "https");
    assert_eq!(run("http_version").trim(), "2");
    let sni = commands
        .iter()
        .find(|c| c.contains("--resolve"))
        .expect("an SNI command");
    let out = Command::new("sh").arg("-c").arg(sni).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("CN=api.example.com"));
    let mesh: serde_json::Value = serde_json::from_str(&run("--cert ")).unwrap();
    assert_eq!(mesh["path"], "/mesh/orders");
    assert_eq!(mesh["headers"]["x-client-identity"], "spiffe://mesh/orders");
    let plain = run(&format!("http://{tls_listen}/"));
    assert!(
        plain.starts_with("HTTP/1.1 400") && plain.contains("\"error\":\"bad_request\""),
        "{plain}"
    );
    let anonymous = commands
        .iter()
        .find(|c| c.contains("/mesh/orders") && !c.contains("--cert "))
        .unwrap();
    let out = Command::new("sh").arg("-c").arg(anonymous).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"error\":\"unauthorized\""));
    // What the walkthrough promises.
    let users = get(&listen, "/users/7").unwrap();
    assert_eq!(echoed(&users)["path"], "/v1/users/7");
    let traced = Request::get("/users/1")
        .header("x-request-id", "demo-123")
        .send(&listen)
        .unwrap();
    assert_eq!(traced.header("x-request-id"), Some("demo-123"));
    let missing = get(&listen, "/nowhere").unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["trace_id"].as_str(), missing.header("x-request-id"));
    let mediated = Request::get("/headers")
        .header("x-secret", "hunter2")
        .send(&listen)
        .unwrap();
    let e = echoed(&mediated);
    assert!(e["headers"].get("x-secret").is_none());
    assert_eq!(e["headers"]["x-client-ip"], "127.0.0.1");
    assert_eq!(mediated.header("x-route"), Some("mediated"));
    // Aggregation (depends_on) and XML→JSON, as the walkthrough shows them.
    let dash: serde_json::Value = serde_json::from_str(&run("/dashboard/42")).unwrap();
    assert_eq!(dash["user"]["path"], "/users/42");
    assert_eq!(dash["orders"]["service"], "v2");
    assert_eq!(dash["orders"]["query"], "user=42&seen_by=v1");
    assert!(dash["user"].get("headers").is_none());
    assert!(run("/users/1?format=xml").starts_with("<?xml"));
    let ranged: serde_json::Value = serde_json::from_str(&run("range: bytes")).unwrap();
    assert_eq!(ranged["data"]["echo"]["service"], "v2", "{ranged}");
    assert!(run("NaN").contains("\"error\":\"bad_request\""));
    let catalog = run("/catalog/items");
    assert!(
        catalog.to_ascii_lowercase().contains("content-type: application/json"),
        "{catalog}"
    );
    let json = catalog.split("\r\n\r\n").nth(1).unwrap_or("");
    let catalog: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        catalog,
        serde_json::json!({"data": {"echo": {"service": "v2", "path": "/catalog/items", "query": "format=xml"}}})
    );
    let intake: serde_json::Value = serde_json::from_str(&run("/intake")).unwrap();
    let sent: serde_json::Value = serde_json::from_str(intake["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["fullName"], "ann");
    assert!(sent.get("debug").is_none());
    assert!(sent["meta"]["trace"].as_str().is_some_and(|t| !t.is_empty()));

    // Ctrl-C ends the demo and removes its temporary config.
    let config = printed
        .lines()
        .find_map(|l| l.split("The config is in ").nth(1))
        .and_then(|rest| rest.split(';').next())
        .map(|p| std::path::PathBuf::from(p.trim()))
        .expect("the walkthrough names its config file");
    assert!(config.exists(), "{}", config.display());
    let pid = guard.0.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while guard.0.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < end, "the demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!config.exists(), "the demo removed {}", config.display());
}
