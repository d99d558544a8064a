//! The aggregate's calls as a dependency graph: checked at load, run in stages.
//!
//! `calls: {KEY: {upstream, path, method?, depends_on?, timeout?}}`. A call may use the answer of
//! another one (`${user.id}` in its path) only if it lists it in `depends_on`: a reference to a
//! call that is not listed is a config error, not an implicit dependency, so the order of the
//! calls is always visible in the config. `depends_on` may also list calls whose answers are
//! not used, just to order them.
//!
//! Checked at load, each error located (`calls.a.depends_on: cycle a -> b -> a`): call names
//! (letters, digits, `_`, `-`; `query` and `errors` are reserved: the first names the client's
//! query string in templates, the second lists failures in a partial answer), known upstreams,
//! the method, the path template, `{param}`s the route captures, references to known calls in
//! `depends_on`, and no dependency cycle. At most [`MAX_CALLS`] calls.
//!
//! The plan runs in **stages**: stage 0 holds the calls that depend on nothing, and each
//! later stage the calls whose dependencies all ran in earlier stages (a call is in the stage
//! after its latest dependency). Calls in one stage are independent and run concurrently;
//! within a stage they are listed by name.

use super::template::PathTemplate;
use crate::config::ConfigError;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// More calls than this in one aggregate is a config error: each one is a request upstream for
/// every client request.
pub const MAX_CALLS: usize = 100;

/// Names a call may not have.
const RESERVED: [(&str, &str); 2] = [
    ("query", "it names the client's query string in templates"),
    ("errors", "a partial answer lists failed calls under it"),
];

/// One call as the config file writes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    pub upstream: String,
    pub path: String,
    /// Default `GET`.
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// This call's own bound (the aggregate's `timeout` when absent; never longer).
    #[serde(default)]
    pub timeout: Option<crate::config::units::Dur>,
}

/// One checked call.
#[derive(Debug, Clone)]
pub struct Call {
    pub key: String,
    pub upstream: String,
    pub method: http::Method,
    pub path: PathTemplate,
    /// Without duplicates, in the order written.
    pub depends_on: Vec<String>,
    pub timeout: Option<std::time::Duration>,
}

/// The checked calls and the order to run them in.
#[derive(Debug, Clone)]
pub struct CallPlan {
    /// By name.
    calls: Vec<Call>,
    /// Indexes into `calls`.
    stages: Vec<Vec<usize>>,
}

impl CallPlan {
    /// Check the calls against the route's `{param}` names and the config's upstreams. Errors
    /// are located relative to the plugin block (`calls.a.path`).
    pub fn compile(
        calls: &BTreeMap<String, CallConfig>,
        route_params: &[String],
        upstreams: &[String],
    ) -> Result<CallPlan, ConfigError> {
        if calls.is_empty() {
            return Err(ConfigError::new("calls", "at least one call is needed"));
        }
        if calls.len() > MAX_CALLS {
            return Err(ConfigError::new(
                "calls",
                format!("{} calls; at most {MAX_CALLS} are allowed", calls.len()),
            ));
        }
        let mut checked = Vec::with_capacity(calls.len());
        for (key, cfg) in calls {
            checked.push(check_call(key, cfg, calls, route_params, upstreams)?);
        }
        let index: HashMap<&str, usize> = checked.iter().enumerate().map(|(i, c)| (c.key.as_str(), i)).collect();
        let deps: Vec<Vec<usize>> = checked
            .iter()
            .map(|c| {
                c.depends_on
                    .iter()
                    .filter_map(|d| index.get(d.as_str()).copied())
                    .collect()
            })
            .collect();
        if let Some(cycle) = find_cycle(&deps) {
            let names: Vec<&str> = cycle.iter().map(|&i| checked[i].key.as_str()).collect();
            return Err(ConfigError::new(
                format!("calls.{}.depends_on", names[0]),
                format!("cycle {}", names.join(" -> ")),
            ));
        }
        let stages = stages(&deps);
        Ok(CallPlan { calls: checked, stages })
    }

    /// Every call, by name.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    pub fn get(&self, key: &str) -> Option<&Call> {
        self.calls.iter().find(|c| c.key == key)
    }

    /// The stages in the order to run them; the calls of one stage may run concurrently.
    pub fn stages(&self) -> impl Iterator<Item = Vec<&Call>> {
        self.stages.iter().map(|s| s.iter().map(|&i| &self.calls[i]).collect())
    }
}

fn check_call(
    key: &str,
    cfg: &CallConfig,
    all: &BTreeMap<String, CallConfig>,
    route_params: &[String],
    upstreams: &[String],
) -> Result<Call, ConfigError> {
    let here = |field: &str| format!("calls.{key}.{field}");
    if let Some((_, why)) = RESERVED.iter().find(|(r, _)| *r == key) {
        return Err(ConfigError::new(
            format!("calls.{key}"),
            format!("'{key}' cannot name a call: {why}"),
        ));
    }
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(ConfigError::new(
            format!("calls.{key}"),
            format!("bad call name '{key}': use letters, digits, '_' or '-'"),
        ));
    }
    if !upstreams.contains(&cfg.upstream) {
        return Err(ConfigError::new(
            here("upstream"),
            format!("unknown upstream '{}'", cfg.upstream),
        ));
    }
    let method = match &cfg.method {
        None => http::Method::GET,
        Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| ConfigError::new(here("method"), format!("'{m}' is not an HTTP method")))?,
    };
    let path = PathTemplate::parse(&cfg.path).map_err(|e| ConfigError::new(here("path"), e))?;
    for p in path.params() {
        if !route_params.iter().any(|r| r == p) {
            let known = if route_params.is_empty() {
                "the route's path has no {parameters}".to_string()
            } else {
                format!("the route has: {}", route_params.join(", "))
            };
            return Err(ConfigError::new(
                here("path"),
                format!("unknown route parameter '{{{p}}}' ({known})"),
            ));
        }
    }
    let mut depends_on: Vec<String> = Vec::new();
    for d in &cfg.depends_on {
        if !all.contains_key(d) {
            return Err(ConfigError::new(here("depends_on"), format!("unknown call '{d}'")));
        }
        if !depends_on.contains(d) {
            depends_on.push(d.clone());
        }
    }
    for r in path.references() {
        let shown = if r.path.is_empty() {
            format!("${{{}}}", r.key)
        } else {
            format!("${{{}.{}}}", r.key, r.path.join("."))
        };
        if r.key == key {
            return Err(ConfigError::new(
                here("path"),
                format!("'{shown}' refers to this call's own answer"),
            ));
        }
        if !all.contains_key(&r.key) {
            return Err(ConfigError::new(
                here("path"),
                format!("'{shown}' refers to unknown call '{}'", r.key),
            ));
        }
        if !depends_on.contains(&r.key) {
            return Err(ConfigError::new(
                here("path"),
                format!("'{shown}' uses the answer of call '{}': list it in depends_on", r.key),
            ));
        }
    }
    Ok(Call {
        key: key.to_string(),
        upstream: cfg.upstream.clone(),
        method,
        path,
        depends_on,
        timeout: cfg.timeout.map(|d| d.0),
    })
}

/// A dependency cycle, as the path that closes it (`[a, b, a]`), if there is one. Depth-first
/// from each call in name order, so the cycle reported is the same on every load.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(i: usize, deps: &[Vec<usize>], marks: &mut [Mark], path: &mut Vec<usize>) -> Option<Vec<usize>> {
        marks[i] = Mark::OnPath;
        path.push(i);
        for &d in &deps[i] {
            match marks[d] {
                Mark::OnPath => {
                    let start = path.iter().position(|&p| p == d).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(d);
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(d, deps, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; deps.len()];
    let mut path = Vec::new();
    (0..deps.len()).find_map(|i| {
        if marks[i] == Mark::New {
            visit(i, deps, &mut marks, &mut path)
        } else {
            None
        }
    })
}

/// Each call's stage is one more than its latest dependency's (the graph has no cycle, and at
/// most `MAX_CALLS` nodes bound the recursion).
fn stages(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    fn level(i: usize, deps: &[Vec<usize>], memo: &mut [Option<usize>]) -> usize {
        if let Some(l) = memo[i] {
            return l;
        }
        let l = deps[i].iter().map(|&d| level(d, deps, memo) + 1).max().unwrap_or(0);
        memo[i] = Some(l);
        l
    }
    let mut memo = vec![None; deps.len()];
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in 0..deps.len() {
        let l = level(i, deps, &mut memo);
        if out.len() <= l {
            out.resize_with(l + 1, Vec::new);
        }
        out[l].push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str, params: &[&str]) -> Result<CallPlan, ConfigError> {
        let calls: BTreeMap<String, CallConfig> = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        CallPlan::compile(&calls, &params, &["users".to_string(), "orders".to_string()])
    }

    fn stage_names(plan: &CallPlan) -> Vec<Vec<&str>> {
        plan.stages()
            .map(|s| s.iter().map(|c| c.key.as_str()).collect())
            .collect()
    }

    #[test]
    fn stages_table() {
        let cases: &[(&str, Vec<Vec<&str>>)] = &[
            ("{a: {upstream: users, path: /a}}", vec![vec!["a"]]),
            (
                "{b: {upstream: users, path: /b}, a: {upstream: orders, path: /a}}",
                vec![vec!["a", "b"]],
            ),
            (
                "{user: {upstream: users, path: '/u/{id}'},
                  orders: {upstream: orders, path: '/o?u=${user.id}', depends_on: [user]},
                  prefs: {upstream: users, path: '/p/{id}'}}",
                vec![vec!["prefs", "user"], vec!["orders"]],
            ),
            // A diamond: d waits for its latest dependency.
            (
                "{a: {upstream: users, path: /a},
                  b: {upstream: users, path: '/b/${a.x}', depends_on: [a]},
                  c: {upstream: users, path: '/c/${b.x}', depends_on: [b]},
                  d: {upstream: users, path: '/d/${a.x}/${c.y}', depends_on: [a, c, a]}}",
                vec![vec!["a"], vec!["b"], vec!["c"], vec!["d"]],
            ),
            // Ordering only, no reference.
            (
                "{a: {upstream: users, path: /a}, b: {upstream: users, path: /b, depends_on: [a]}}",
                vec![vec!["a"], vec!["b"]],
            ),
        ];
        for (yaml, want) in cases {
            let plan = compile(yaml, &["id"]).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(&stage_names(&plan), want, "{yaml}");
        }
    }

    #[test]
    fn call_fields() {
        let plan = compile(
            "{a: {upstream: users, path: /a, method: post}, b: {upstream: orders, path: /b, depends_on: [a, a], timeout: 250ms}}",
            &[],
        )
        .unwrap();
        let a = plan.get("a").unwrap();
        assert_eq!(a.method, http::Method::POST);
        assert_eq!(a.upstream, "users");
        assert_eq!(a.path.as_str(), "/a");
        assert_eq!(a.timeout, None);
        let b = plan.get("b").unwrap();
        assert_eq!(b.method, http::Method::GET);
        assert_eq!(b.depends_on, ["a"]);
        assert_eq!(b.timeout, Some(std::time::Duration::from_millis(250)));
        assert!(plan.get("c").is_none());
        assert_eq!(plan.calls().len(), 2);
    }

    #[test]
    fn errors_table() {
        let cases: &[(&str, &str)] = &[
            ("{}", "calls: at least one call is needed"),
            (
                "{query: {upstream: users, path: /a}}",
                "calls.query: 'query' cannot name a call: it names the client's query string in templates",
            ),
            (
                "{errors: {upstream: users, path: /a}}",
                "calls.errors: 'errors' cannot name a call: a partial answer lists failed calls under it",
            ),
            (
                "{'a.b': {upstream: users, path: /a}}",
                "calls.a.b: bad call name 'a.b': use letters, digits, '_' or '-'",
            ),
            (
                "{a: {upstream: nope, path: /a}}",
                "calls.a.upstream: unknown upstream 'nope'",
            ),
            (
                "{a: {upstream: users, path: /a, method: 'G T'}}",
                "calls.a.method: 'G T' is not an HTTP method",
            ),
            (
                "{a: {upstream: users, path: a}}",
                "calls.a.path: 'a' must start with '/'",
            ),
            (
                "{a: {upstream: users, path: '/u/{nope}'}}",
                "calls.a.path: unknown route parameter '{nope}' (the route has: id)",
            ),
            (
                "{a: {upstream: users, path: '/u/${b.id}'}}",
                "calls.a.path: '${b.id}' refers to unknown call 'b'",
            ),
            (
                "{a: {upstream: users, path: '/u/${a.id}'}}",
                "calls.a.path: '${a.id}' refers to this call's own answer",
            ),
            (
                "{a: {upstream: users, path: /a}, b: {upstream: users, path: '/u/${a.items.0.id}'}}",
                "calls.b.path: '${a.items.0.id}' uses the answer of call 'a': list it in depends_on",
            ),
            (
                "{a: {upstream: users, path: /a, depends_on: [x]}}",
                "calls.a.depends_on: unknown call 'x'",
            ),
            (
                "{a: {upstream: users, path: /a, depends_on: [a]}}",
                "calls.a.depends_on: cycle a -> a",
            ),
            (
                "{a: {upstream: users, path: /a, depends_on: [b]}, b: {upstream: users, path: /b, depends_on: [a]}}",
                "calls.a.depends_on: cycle a -> b -> a",
            ),
            (
                "{a: {upstream: users, path: /a},
                  b: {upstream: users, path: /b, depends_on: [a, d]},
                  c: {upstream: users, path: /c, depends_on: [b]},
                  d: {upstream: users, path: /d, depends_on: [c]}}",
                "calls.b.depends_on: cycle b -> d -> c -> b",
            ),
        ];
        for (yaml, want) in cases {
            let err = compile(yaml, &["id"]).expect_err(yaml);
            assert_eq!(err.to_string(), *want, "{yaml}");
        }
        let err = compile("{a: {upstream: users, path: '/u/{id}'}}", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "calls.a.path: unknown route parameter '{id}' (the route's path has no {parameters})"
        );
        assert!(
            serde_yaml::from_str::<BTreeMap<String, CallConfig>>("{a: {upstream: u, path: /a, dependson: []}}")
                .is_err()
        );
    }

    #[test]
    fn call_count_is_bounded() {
        let many: String = (0..=MAX_CALLS)
            .map(|i| format!("c{i}: {{upstream: users, path: /x}}, "))
            .collect();
        let err = compile(&format!("{{{many}}}"), &[]).unwrap_err();
        assert_eq!(err.location, "calls");
        // A chain of MAX_CALLS calls is fine and has as many stages.
        let chain: String = (0..MAX_CALLS)
            .map(|i| {
                if i == 0 {
                    "c0: {upstream: users, path: /x}, ".to_string()
                } else {
                    format!(
                        "c{i}: {{upstream: users, path: '/x/${{c{}.id}}', depends_on: [c{}]}}, ",
                        i - 1,
                        i - 1
                    )
                }
            })
            .collect();
        let plan = compile(&format!("{{{chain}}}"), &[]).unwrap();
        assert_eq!(plan.stages().count(), MAX_CALLS);
    }
}
