//! The command line (see the README and the contract): `-c FILE`, `-t`, `-u`, `-d`, `demo`.

use crate::plugin::Registry;
use crate::server::{self, RunOptions};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "portico", version, about = "A programmable API gateway on Pingora")]
struct Cli {
    /// The config file (YAML).
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    conf: Option<PathBuf>,
    /// Validate the config and exit: prints `ok`, or each error with its location (exit 1).
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Start as the new process of a zero-downtime upgrade (take the old one's sockets).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
    /// Run in the background.
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start two demo upstreams and a gateway in front of them, and print what to try.
    Demo {
        /// The gateway's address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// The gateway's HTTPS address (TLS with the demo certificates; h2 by ALPN; mTLS).
        #[arg(long, default_value = "127.0.0.1:8443")]
        tls_listen: String,
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
    /// Mint a JWT (for trying routes protected by the jwt plugin).
    Jwt {
        /// HMAC secret (HS256/384/512).
        #[arg(long, conflicts_with = "key")]
        secret: Option<String>,
        /// PEM private key file (RS*/PS*/ES*/EdDSA).
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long, default_value = "HS256")]
        alg: String,
        #[arg(long, default_value = "demo-user")]
        sub: String,
        /// Lifetime, e.g. 1h.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Extra claims, `name=value` (value parsed as JSON when it can be).
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
        #[arg(long)]
        kid: Option<String>,
    },
    /// Ask a running gateway's admin `/healthz` (for container healthchecks): exit 0 when it
    /// answers 200, 1 otherwise. `--url` checks any HTTP URL the same way.
    Health {
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// Check this URL instead (`http://host:port/path`).
        #[arg(long)]
        url: Option<String>,
    },
    /// Run a standalone echo service (the demo's upstream), e.g. for docker-compose.
    Echo {
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "echo")]
        name: String,
    },
}

/// Run Portico's command line with this plugin registry (built-ins plus your own).
pub fn main_with(registry: Registry) -> ExitCode {
    server::guard_sighup();
    crate::memory::init();
    let cli = Cli::parse();
    crate::logging::init();
    if let Some(Command::Demo {
        listen,
        tls_listen,
        admin,
    }) = cli.command
    {
        return match crate::demo::run(&listen, &tls_listen, &admin, registry) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portico demo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Jwt {
        secret,
        key,
        alg,
        sub,
        ttl,
        claims,
        kid,
    }) = cli.command
    {
        return match mint(secret, key, &alg, &sub, &ttl, &claims, kid) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portico jwt: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::Health { admin, url }) = cli.command {
        let url = url.unwrap_or_else(|| format!("http://{admin}/healthz"));
        return match health(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portico health: {url}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Echo { listen, name }) = cli.command {
        return match crate::echo::EchoServer::start_on(listen, &name) {
            Ok(server) => {
                println!("echo service {name:?} on http://{}", server.addr);
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                eprintln!("portico echo: cannot listen on {listen}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(conf) = cli.conf else {
        eprintln!("portico: give a config file with -c FILE (or try `portico demo`)");
        return ExitCode::from(2);
    };
    if cli.test {
        return validate(&conf, &registry);
    }
    match server::run(RunOptions {
        config: conf,
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        registry,
        resources: None,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portico: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `portico health`: a GET that must answer 200 within 3 s.
fn health(url: &str) -> Result<(), String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(3))
        .build();
    match agent.get(url).call() {
        Ok(r) if r.status() == 200 => Ok(()),
        Ok(r) => Err(format!("status {}", r.status())),
        Err(ureq::Error::Status(code, _)) => Err(format!("status {code}")),
        // ureq's own text starts with the URL, which the caller prints already.
        Err(ureq::Error::Transport(t)) => {
            let mut text = t.kind().to_string();
            if let Some(m) = t.message() {
                text.push_str(&format!(": {m}"));
            }
            if let Some(source) = std::error::Error::source(&t) {
                text.push_str(&format!(": {source}"));
            }
            Err(text)
        }
    }
}

/// `portico -t`: compile offline (nothing is fetched) and report.
fn validate(conf: &std::path::Path, registry: &Registry) -> ExitCode {
    match crate::config::load_file(conf, registry, &crate::resources::Resources::offline()) {
        Ok(_) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Mint a token for `portico jwt`.
fn mint(
    secret: Option<String>,
    key: Option<PathBuf>,
    alg: &str,
    sub: &str,
    ttl: &str,
    claims: &[String],
    kid: Option<String>,
) -> Result<String, String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let alg: Algorithm = alg.parse().map_err(|_| format!("unknown algorithm '{alg}'"))?;
    let ttl = crate::config::units::parse_duration(ttl)?;
    let key = match (secret, key) {
        (Some(s), None) => EncodingKey::from_secret(s.as_bytes()),
        (None, Some(path)) => {
            let pem = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            match alg {
                Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                _ => EncodingKey::from_rsa_pem(&pem),
            }
            .map_err(|e| format!("{}: {e}", path.display()))?
        }
        _ => return Err("give --secret or --key".into()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut body = serde_json::json!({ "sub": sub, "iat": now, "exp": now + ttl.as_secs() });
    for c in claims {
        let (k, v) = c
            .split_once('=')
            .ok_or_else(|| format!("--claim {c}: write NAME=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        body[k] = value;
    }
    let mut header = Header::new(alg);
    header.kid = kid;
    jsonwebtoken::encode(&header, &body, &key).map_err(|e| e.to_string())
}
