//! The config file as written: plain serde structs, `deny_unknown_fields` everywhere.
//! Nothing here is used by request code; `compile` turns it into a [`crate::Snapshot`].
//!
//! (Over 500 lines: one serde struct per config section, kept together so the file reads as
//! the config's schema.)

use super::units::{Dur, Size};
use serde::{de, Deserialize, Deserializer};
use std::collections::BTreeMap;

/// The whole file, assembled section by section (`compile` parses each on its own, so one
/// mistake does not hide the next). List items keep their index in the file, for locations.
#[derive(Debug, Default)]
pub struct RawConfig {
    /// Pingora's own server settings, passed through (keys checked against `ServerConf`).
    pub server: serde_yaml::Mapping,
    pub listeners: Vec<(usize, Listener)>,
    pub client_ip: ClientIp,
    pub limits: Limits,
    pub access_log: AccessLog,
    pub compression: Option<Compression>,
    pub admin: Option<Admin>,
    pub redis: Option<Redis>,
    pub consumers: Vec<(usize, Consumer)>,
    pub upstreams: BTreeMap<String, Upstream>,
    pub trace: Trace,
    pub plugins: Vec<(usize, PluginEntry)>,
    pub routes: Vec<(usize, Route)>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: String,
    #[serde(default)]
    pub http2: bool,
    #[serde(default)]
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub sni: Vec<SniCert>,
    #[serde(default)]
    pub client_ca: Option<String>,
    #[serde(default)]
    pub require_client_cert: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    pub hosts: Vec<String>,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIp {
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_request_header_bytes: Size,
    pub max_request_body_bytes: Size,
    pub header_timeout: Dur,
    pub max_connections_per_ip: u32,
    pub keepalive_requests: u32,
    pub body_timeout: Dur,
    pub h2_idle_timeout: Dur,
    pub send_timeout: Dur,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_header_bytes: Size(32 << 10),
            max_request_body_bytes: Size(10 << 20),
            header_timeout: Dur::secs(10),
            max_connections_per_ip: 0,
            keepalive_requests: 1000,
            body_timeout: Dur::secs(30),
            h2_idle_timeout: Dur::secs(60),
            send_timeout: Dur::secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Combined,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    pub enabled: bool,
    pub format: LogFormat,
    /// A file (appended to, reopened on SIGUSR1); stdout when absent.
    pub path: Option<String>,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            enabled: true,
            format: LogFormat::Json,
            path: None,
        }
    }
}

/// `compression:` (global, or a route's own): compress responses at the gateway.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Offered in this order of preference, by the client's Accept-Encoding.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Smaller bodies (by Content-Length) are sent as they are.
    #[serde(default = "default_min_length")]
    pub min_length: Size,
    /// Media types to compress (`text/*` matches every text type).
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// Compression level (each algorithm's own scale); a sensible default per algorithm.
    #[serde(default)]
    pub level: Option<u32>,
}

fn default_algorithms() -> Vec<String> {
    vec!["zstd".into(), "br".into(), "gzip".into()]
}

fn default_min_length() -> Size {
    Size(1024)
}

fn default_content_types() -> Vec<String> {
    [
        "text/*",
        "application/json",
        "application/javascript",
        "application/xml",
        "image/svg+xml",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A route's `compression`: `off` (or `false`), or a block that replaces the global one.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteCompression {
    Off,
    On(Compression),
}

impl<'de> Deserialize<'de> for RouteCompression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        match &v {
            serde_yaml::Value::String(s) if s == "off" => Ok(RouteCompression::Off),
            serde_yaml::Value::Bool(false) => Ok(RouteCompression::Off),
            serde_yaml::Value::Mapping(_) => serde_yaml::from_value(v)
                .map(RouteCompression::On)
                .map_err(de::Error::custom),
            _ => Err(de::Error::custom("write `compression: off` or a compression block")),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: String,
    /// When set, POST endpoints need `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    pub name: String,
    #[serde(default)]
    pub api_keys: Vec<String>,
    #[serde(default)]
    pub api_keys_env: Option<String>,
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub hash_on: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub preserve_host: bool,
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive ejection: a block, or `off`. Absent: failed connects eject for 10 s.
    #[serde(default)]
    pub passive: Option<PassiveSetting>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: Option<Retries>,
    /// How often host names among the endpoints are resolved again (default 30s).
    #[serde(default)]
    pub resolve_every: Option<Dur>,
}

/// `- 127.0.0.1:9001` or `- { address: 127.0.0.1:9002, weight: 3 }`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub address: String,
    pub weight: u32,
}

impl<'de> Deserialize<'de> for EndpointSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            address: String,
            #[serde(default = "one")]
            weight: u32,
        }
        fn one() -> u32 {
            1
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Short(String),
            Full(Full),
        }
        match Either::deserialize(d)
            .map_err(|_| de::Error::custom("an endpoint is `host:port` or `{ address: host:port, weight: N }`"))?
        {
            Either::Short(address) => Ok(EndpointSpec { address, weight: 1 }),
            Either::Full(f) => Ok(EndpointSpec {
                address: f.address,
                weight: f.weight,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    ConsistentHash,
    LeastRequests,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http1,
    H2c,
    H2,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default = "yes")]
    pub verify: bool,
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: CheckKind,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub healthy_status: Option<Vec<u16>>,
    /// Consecutive successes that make an unhealthy endpoint healthy again (default 1).
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
    /// Consecutive failures that make a healthy endpoint unhealthy (default 1).
    #[serde(default)]
    pub unhealthy_threshold: Option<u32>,
}

/// An upstream's `passive`: `off` (or `false`), or a block.
#[derive(Debug, Clone, PartialEq)]
pub enum PassiveSetting {
    Off,
    On(Passive),
}

impl<'de> Deserialize<'de> for PassiveSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Setting;
        const EXPECTED: &str = "`passive: off` or a passive block";
        impl<'de> de::Visitor<'de> for Setting {
            type Value = PassiveSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PassiveSetting, E> {
                match s {
                    "off" => Ok(PassiveSetting::Off),
                    _ => Err(E::custom(format!("write {EXPECTED}"))),
                }
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<PassiveSetting, E> {
                match b {
                    false => Ok(PassiveSetting::Off),
                    true => Err(E::custom(format!("write {EXPECTED}"))),
                }
            }
            // The block through the same map access, so its errors keep their location
            // (`passive.eject_for: …`).
            fn visit_map<M: de::MapAccess<'de>>(self, map: M) -> Result<PassiveSetting, M::Error> {
                Passive::deserialize(de::value::MapAccessDeserializer::new(map)).map(PassiveSetting::On)
            }
        }
        d.deserialize_any(Setting)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    #[serde(default)]
    pub consecutive_failures: Option<u32>,
    #[serde(default)]
    pub eject_for: Option<Dur>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default)]
    pub connect: Option<Dur>,
    #[serde(default)]
    pub read: Option<Dur>,
    #[serde(default)]
    pub write: Option<Dur>,
    #[serde(default)]
    pub idle: Option<Dur>,
}

/// `retries: 2` or `retries: { attempts: 2, on: [...], budget: 0.2 }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retries {
    pub attempts: u32,
    pub on: Option<Vec<String>>,
    pub budget: Option<f64>,
}

impl<'de> Deserialize<'de> for Retries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            attempts: u32,
            #[serde(default)]
            on: Option<Vec<StatusOrName>>,
            #[serde(default)]
            budget: Option<f64>,
        }
        let v = serde_yaml::Value::deserialize(d)?;
        if let Some(n) = v.as_u64() {
            return Ok(Retries {
                attempts: u32::try_from(n).map_err(de::Error::custom)?,
                on: None,
                budget: None,
            });
        }
        let f: Full = serde_yaml::from_value(v).map_err(de::Error::custom)?;
        Ok(Retries {
            attempts: f.attempts,
            on: f.on.map(|v| v.into_iter().map(|c| c.0).collect()),
            budget: f.budget,
        })
    }
}

/// A retry condition as written: a name (`reset`) or a status (`503`, unquoted in YAML).
struct StatusOrName(String);

impl<'de> Deserialize<'de> for StatusOrName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(s) => Ok(StatusOrName(s)),
            serde_yaml::Value::Number(n) => Ok(StatusOrName(n.to_string())),
            _ => Err(de::Error::custom("a retry condition is a name or a status code")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trace {
    pub header: String,
    pub trust_incoming: bool,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            header: "x-request-id".into(),
            trust_incoming: true,
        }
    }
}

/// A plugin entry: `- NAME: { config }` or `- NAME`.
#[derive(Debug, Clone)]
pub struct PluginEntry {
    pub name: String,
    pub config: serde_yaml::Value,
}

impl<'de> Deserialize<'de> for PluginEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        match v {
            serde_yaml::Value::String(name) => Ok(PluginEntry {
                name,
                config: serde_yaml::Value::Null,
            }),
            serde_yaml::Value::Mapping(m) if m.len() == 1 => {
                let (k, config) = m.into_iter().next().expect("one entry");
                let name = k
                    .as_str()
                    .ok_or_else(|| de::Error::custom("a plugin name must be a string"))?
                    .to_string();
                Ok(PluginEntry { name, config })
            }
            _ => Err(de::Error::custom(
                "a plugin entry is a one-key map `- NAME: { config }` or a bare `- NAME`",
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: Match,
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    #[serde(default)]
    pub max_request_body_bytes: Option<Size>,
    #[serde(default)]
    pub compression: Option<RouteCompression>,
    /// Map `Location`/`Content-Location` from the upstream back through the rewrite and to the
    /// client's host (default: on, as nginx's implicit `proxy_redirect default`).
    #[serde(default)]
    pub rewrite_location: Option<bool>,
    #[serde(default)]
    pub plugins: Vec<PluginEntry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub add_prefix: Option<String>,
}
