//! `headers`: set, add and remove request and response headers. Values may use
//! `${trace_id}`, `${client_ip}`, `${consumer}`, `${identity}` and `${route}`.
//!
//! Request changes apply to the head going upstream, after Portico set its own headers, so a
//! rule may override anything (Host included). Response changes apply to every response the
//! client gets, Portico's own errors included.
//!
//! A value that renders empty (`${consumer}` without a consumer) is no header at all, as with
//! nginx's `proxy_set_header`: `set` then removes the header — a copy the client sent included,
//! so `set: { x-client-identity: "${identity}" }` can never pass a client's own value on — and
//! `add` adds nothing.

use crate::config::ConfigError;
use crate::plugin::{BuildContext, Phases, Plugin, PluginKind, RequestState};
use http::{HeaderName, HeaderValue};
use pingora::http::PreparedHeaderName;
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub request: Option<Rules>,
    #[serde(default)]
    pub response: Option<Rules>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header value with `${var}` placeholders, split once at load.
#[derive(Debug, Clone)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    TraceId,
    ClientIp,
    Consumer,
    Identity,
    Route,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            if i > 0 {
                parts.push(Part::Text(rest[..i].to_string()));
            }
            let end = rest[i..].find('}').ok_or_else(|| format!("unclosed '${{' in '{s}'"))? + i;
            parts.push(match &rest[i + 2..end] {
                "trace_id" => Part::TraceId,
                "client_ip" => Part::ClientIp,
                "consumer" => Part::Consumer,
                "identity" => Part::Identity,
                "route" => Part::Route,
                other => {
                    return Err(format!(
                        "unknown variable '${{{other}}}' (known: trace_id, client_ip, consumer, identity, route)"
                    ))
                }
            });
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        for p in &parts {
            if let Part::Text(t) = p {
                HeaderValue::from_str(t).map_err(|_| format!("'{s}' is not a valid header value"))?;
            }
        }
        Ok(Template(parts))
    }

    /// The value for this request; `None` when it renders empty (no header is sent) or would
    /// not be a valid header value.
    pub fn render(&self, st: &RequestState) -> Option<HeaderValue> {
        if let [Part::Text(t)] = self.0.as_slice() {
            return HeaderValue::from_str(t).ok().filter(|v| !v.is_empty());
        }
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::TraceId => out.push_str(&st.trace.request_id),
                Part::ClientIp => crate::util::push_ip(&mut out, st.client_ip),
                Part::Consumer => out.push_str(st.consumer.as_deref().unwrap_or("")),
                Part::Identity => out.push_str(st.identity.as_deref().unwrap_or("")),
                Part::Route => out.push_str(&st.route),
            }
        }
        if out.is_empty() {
            return None;
        }
        // Values come from validated sources, but never let one smuggle a CR/LF.
        HeaderValue::from_str(&out).ok()
    }
}

#[derive(Debug, Default)]
struct Compiled {
    remove: Vec<HeaderName>,
    // Names parsed once: they are set on every request or response.
    set: Vec<(PreparedHeaderName, Template)>,
    add: Vec<(PreparedHeaderName, Template)>,
}

impl Compiled {
    fn build(r: &Rules, loc: &str) -> Result<Self, ConfigError> {
        let name = |n: &str, field: &str| {
            crate::util::header_name(n).map_err(|e| ConfigError::new(format!("{loc}.{field}"), e))
        };
        let pairs =
            |m: &BTreeMap<String, String>, field: &str| -> Result<Vec<(PreparedHeaderName, Template)>, ConfigError> {
                m.iter()
                    .map(|(k, v)| {
                        let t = Template::parse(v).map_err(|e| ConfigError::new(format!("{loc}.{field}.{k}"), e))?;
                        Ok((PreparedHeaderName::new(name(k, field)?), t))
                    })
                    .collect()
            };
        Ok(Compiled {
            remove: r.remove.iter().map(|n| name(n, "remove")).collect::<Result<_, _>>()?,
            set: pairs(&r.set, "set")?,
            add: pairs(&r.add, "add")?,
        })
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

pub struct Headers {
    request: Compiled,
    response: Compiled,
}

impl Headers {
    pub fn new(cfg: Config, _ctx: &BuildContext) -> Result<Self, ConfigError> {
        let request = cfg
            .request
            .as_ref()
            .map(|r| Compiled::build(r, "request"))
            .transpose()?
            .unwrap_or_default();
        let response = cfg
            .response
            .as_ref()
            .map(|r| Compiled::build(r, "response"))
            .transpose()?
            .unwrap_or_default();
        Ok(Headers { request, response })
    }
}

macro_rules! apply_rules {
    ($rules:expr, $head:expr, $st:expr) => {{
        for n in &$rules.remove {
            $head.remove_header(n);
        }
        // Room for every header set or added, made at once (past a head's room, inserts would
        // regrow its two maps, values and case-preserving names, one after another).
        $head.reserve($rules.set.len() + $rules.add.len());
        for (n, t) in &$rules.set {
            match t.render($st) {
                Some(v) => {
                    let _ = $head.insert_header(n, v);
                }
                // Nothing to set: no header of that name at all (never the client's copy).
                None if $head.headers.contains_key(n.name()) => {
                    $head.remove_header(n.name());
                }
                None => {}
            }
        }
        for (n, t) in &$rules.add {
            if let Some(v) = t.render($st) {
                let _ = $head.append_header(n, v);
            }
        }
    }};
}

impl Plugin for Headers {
    fn kind(&self) -> PluginKind {
        PluginKind::Mediate
    }

    fn phases(&self) -> Phases {
        let mut p = Phases::NONE;
        if !self.request.is_empty() {
            p = p | Phases::UPSTREAM_REQUEST;
        }
        if !self.response.is_empty() {
            p = p | Phases::RESPONSE;
        }
        p
    }

    fn upstream_request(&self, req: &mut RequestHeader, st: &RequestState) {
        apply_rules!(self.request, req, st);
    }

    fn response(&self, _req: &RequestHeader, resp: &mut ResponseHeader, st: &mut RequestState) {
        apply_rules!(self.response, resp, &*st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let mut st = RequestState::new("10.1.2.3".parse().unwrap());
        st.trace.request_id = "rid".into();
        st.route = "users".into();
        let t = Template::parse("id=${trace_id} ip=${client_ip} r=${route} c=${consumer} i=${identity}").unwrap();
        assert_eq!(t.render(&st).unwrap(), "id=rid ip=10.1.2.3 r=users c= i=");
        st.identity = Some("spiffe://mesh/orders".into());
        assert_eq!(
            Template::parse("${identity}").unwrap().render(&st).unwrap(),
            "spiffe://mesh/orders"
        );
        // Empty renders are no value at all.
        assert_eq!(Template::parse("${consumer}").unwrap().render(&st), None);
        assert_eq!(Template::parse("").unwrap().render(&st), None);
        assert!(Template::parse("${nope}").is_err());
        assert!(Template::parse("${trace_id").is_err());
        assert!(Template::parse("a\nb").is_err());
    }

    #[test]
    fn rules_apply_in_order() {
        let ctx = BuildContext::standalone();
        let cfg: Config = ctx
            .parse(
                &serde_yaml::from_str("response: {remove: [server], set: {x-a: '1'}, add: {x-b: '${route}'}}").unwrap(),
            )
            .unwrap();
        let p = Headers::new(cfg, &ctx).unwrap();
        assert_eq!(p.phases(), Phases::RESPONSE);
        let mut st = RequestState::new("127.0.0.1".parse().unwrap());
        st.route = "r1".into();
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("server", "x").unwrap();
        p.response(&RequestHeader::build("GET", b"/", None).unwrap(), &mut resp, &mut st);
        assert!(resp.headers.get("server").is_none());
        assert_eq!(resp.headers.get("x-a").unwrap(), "1");
        assert_eq!(resp.headers.get("x-b").unwrap(), "r1");
    }

    #[test]
    fn an_empty_value_is_no_header() {
        let ctx = BuildContext::standalone();
        let yaml = "request: {set: {x-consumer-name: '${consumer}', x-id: '${identity}'}, add: {x-c: '${consumer}'}}";
        let cfg: Config = ctx.parse(&serde_yaml::from_str(yaml).unwrap()).unwrap();
        let p = Headers::new(cfg, &ctx).unwrap();
        let mut st = RequestState::new("127.0.0.1".parse().unwrap());
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-id", "spoofed").unwrap();
        req.insert_header("x-consumer-name", "spoofed").unwrap();
        p.upstream_request(&mut req, &st);
        assert!(
            req.headers.get("x-id").is_none(),
            "set replaces: a client's copy never passes"
        );
        assert!(req.headers.get("x-consumer-name").is_none());
        assert!(req.headers.get("x-c").is_none());
        st.identity = Some("frontend".into());
        req.insert_header("x-id", "spoofed").unwrap();
        p.upstream_request(&mut req, &st);
        assert_eq!(req.headers.get_all("x-id").iter().collect::<Vec<_>>(), ["frontend"]);
    }
}
