//! A Portico process started from its binary, with stdout (access log) and stderr captured.

use super::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Portico process started from a binary, with stdout (access log) and stderr captured.
pub struct Portico {
    child: Option<Child>,
    pub dir: TempDir,
    pub config: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Portico {
    /// Write `yaml` to a temp file and start `bin -c FILE` (plus `extra` arguments).
    pub fn start(bin: &str, yaml: &str, extra: &[&str]) -> Portico {
        let dir = TempDir::new("gw");
        let config = dir.write("portico.yaml", yaml);
        Self::start_in(bin, dir, config, extra)
    }

    /// Start `bin -c config` with logs in `dir`.
    pub fn start_in(bin: &str, dir: TempDir, config: PathBuf, extra: &[&str]) -> Portico {
        let n: u32 = rand::random();
        let stdout = dir.file(&format!("stdout-{n}.log"));
        let stderr = dir.file(&format!("stderr-{n}.log"));
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start portico");
        Portico {
            child: Some(child),
            dir,
            config,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The address Portico bound for a listener configured as `spec` (e.g. `127.0.0.1:0`), read
    /// from its log (`bound proxy listener 127.0.0.1:0 at 127.0.0.1:41234`).
    pub fn bound(&mut self, what: &str, spec: &str) -> String {
        let needle = format!("bound {what} listener {spec} at ");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.stderr_text().lines().find(|l| l.contains(&needle)) {
                let at = line.split(&needle).nth(1).unwrap_or("").trim();
                return at.split_whitespace().next().unwrap_or("").to_string();
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("portico exited ({status}) before binding {spec}:\n{}", self.logs());
            }
            if Instant::now() > end {
                panic!("timed out waiting for portico to bind {spec}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the admin listener says every proxy listener is serving.
    pub fn wait_ready(&mut self, admin: &str) -> &mut Self {
        let what = format!("portico at {admin} to be ready");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = get(admin, "/healthz") {
                if r.status == 200 {
                    return self;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("portico exited ({status}) before it was ready:\n{}", self.logs());
            }
            if Instant::now() > end {
                panic!("timed out waiting for {what}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a signal by name (`HUP`, `QUIT`, `TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name} failed");
    }

    /// Replace the config file's text (then signal HUP or POST /reload).
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("replace config");
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Wait for the process to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s.code();
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-INT").arg(c.id().to_string()).status();
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A metric's value in Prometheus text (the sum over series whose labels contain `labels`).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
