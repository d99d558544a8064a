//! JSON reshaping for `transform`: `select`, `remove`, `rename`, `set`, `wrap`.
//!
//! # Paths
//!
//! A path is object keys joined by dots: `user.address.city`. Every segment is a key (a
//! numeric segment such as `0` is the key `"0"`, not an index), and a key that itself holds a
//! dot cannot be addressed. Empty segments (`a..b`, `.a`, `a.`) are config errors.
//!
//! **Arrays fan out.** When a path meets an array, it applies to every element of it (arrays
//! of arrays too), so `items.price` means `price` in every item of `items`, and on a document
//! that is an array, `id` means `id` in every element. This holds for every operation.
//!
//! **Missing is a no-op.** A path that leads nowhere (a missing key, or a string where an
//! object was expected) changes nothing and is never an error. A document that is neither an
//! object nor an array is left alone by every operation except `wrap`.
//!
//! # Operations, applied in this fixed order
//!
//! 1. `select: [paths]` keeps only these fields. The objects and arrays along a selected path
//!    are kept, holding only what was selected: `select: [user.name]` on
//!    `{"user": {"name": "a", "age": 3}, "x": 1}` gives `{"user": {"name": "a"}}`. An object on
//!    the way that lacks the field stays as `{}`, so array elements keep their positions
//!    (`items.price` on `[{"price": 1}, {"sku": "b"}]` gives `[{"price": 1}, {}]`); a value that
//!    is not an object where the path goes on is dropped. Selecting a path and one inside it
//!    (`user`, `user.name`) keeps the whole of `user`.
//! 2. `remove: [paths]` deletes these fields.
//! 3. `rename: {path: new_name}` renames the last segment of the path, in the same object:
//!    `user.name: fullName`. `new_name` is one key (no dots). When the object already has a
//!    field called `new_name`, the renamed field replaces it. Renames apply in the order written,
//!    each seeing the result of the ones before.
//! 4. `set: {path: value}` sets a field to a JSON value, creating missing objects on the way
//!    (and replacing a `null` on the way by an object; any other non-object on the way makes it
//!    a no-op). Strings in the value may use `${consumer}`, `${client_ip}`, `${trace_id}` and
//!    `${route}`; a string that is exactly one variable whose value is unknown (no consumer)
//!    becomes `null`, and elsewhere an unknown value is the empty string. Applied in the order
//!    written.
//! 5. `wrap: key` puts the whole document under one key: `{"key": <document>}` (any document,
//!    arrays and scalars too). `key` is a single key, not a path.
//!
//! Each operation sees the document as the previous ones left it, so `set` and `rename` paths
//! name fields as they are after `select` and `remove`.
//!
//! **What is not touched stays as written**: object keys keep the document's order (a renamed
//! key takes the old one's place, a new `set` key goes last), and numbers are written exactly as
//! they came (`12345678901234567890123`, `1.50`, `1e400`; only an exponent gains its sign, `1e2`
//! → `1e+2`): serde_json runs with `preserve_order` and `arbitrary_precision`.
//!
//! (Over 500 lines because of its table of unit tests, kept beside the code they pin down.)

use crate::config::ConfigError;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// The operations as the config file writes them (a `transform` block's `response`, or a
/// request block). Maps keep the order they are written in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    #[serde(default)]
    pub select: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default, deserialize_with = "ordered_map")]
    pub rename: Vec<(String, String)>,
    #[serde(default, deserialize_with = "ordered_map")]
    pub set: Vec<(String, Value)>,
    #[serde(default)]
    pub wrap: Option<String>,
}

/// A YAML map as a list of its entries, in file order (the order of renames matters).
pub(crate) fn ordered_map<'de, D, V>(d: D) -> Result<Vec<(String, V)>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, V)> = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, V>()? {
                if out.iter().any(|(seen, _)| *seen == k) {
                    return Err(de::Error::custom(format!("duplicate key '{k}'")));
                }
                out.push((k, v));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Entries(std::marker::PhantomData))
}

/// A dot path, split once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(Vec<String>);

impl Path {
    pub fn parse(s: &str) -> Result<Path, String> {
        if s.is_empty() {
            return Err("empty path".into());
        }
        let segs: Vec<String> = s.split('.').map(str::to_string).collect();
        if segs.iter().any(String::is_empty) {
            return Err("empty path segment".into());
        }
        Ok(Path(segs))
    }

    pub fn segments(&self) -> &[String] {
        &self.0
    }
}

/// A variable a `set` value may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    Consumer,
    ClientIp,
    TraceId,
    Route,
}

impl Var {
    fn parse(name: &str) -> Option<Var> {
        Some(match name {
            "consumer" => Var::Consumer,
            "client_ip" => Var::ClientIp,
            "trace_id" => Var::TraceId,
            "route" => Var::Route,
            _ => return None,
        })
    }
}

/// Where `set` values find their variables (the glue looks them up in the request's state).
/// Any `Fn(Var) -> Option<String>` is one.
pub trait Vars {
    /// The variable's value, or `None` when the request has none (no consumer).
    fn var(&self, var: Var) -> Option<String>;
}

impl<F: Fn(Var) -> Option<String>> Vars for F {
    fn var(&self, var: Var) -> Option<String> {
        self(var)
    }
}

/// No variables: every one is unknown.
pub struct NoVars;

impl Vars for NoVars {
    fn var(&self, _: Var) -> Option<String> {
        None
    }
}

/// A `set` value: JSON whose strings may hold `${var}`s, split once at load.
#[derive(Debug, Clone)]
enum ValueTemplate {
    Const(Value),
    Text(Vec<Part>),
    Array(Vec<ValueTemplate>),
    Object(Vec<(String, ValueTemplate)>),
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Var(Var),
}

impl ValueTemplate {
    fn compile(v: &Value) -> Result<ValueTemplate, String> {
        Ok(match v {
            Value::String(s) if s.contains("${") => ValueTemplate::Text(parse_text(s)?),
            Value::Array(items) if !is_const(v) => {
                ValueTemplate::Array(items.iter().map(ValueTemplate::compile).collect::<Result<_, _>>()?)
            }
            Value::Object(m) if !is_const(v) => ValueTemplate::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), ValueTemplate::compile(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => ValueTemplate::Const(other.clone()),
        })
    }

    fn render(&self, vars: &dyn Vars) -> Value {
        match self {
            ValueTemplate::Const(v) => v.clone(),
            ValueTemplate::Text(parts) => {
                if let [Part::Var(v)] = parts.as_slice() {
                    return vars.var(*v).map(Value::String).unwrap_or(Value::Null);
                }
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Lit(s) => out.push_str(s),
                        Part::Var(v) => out.push_str(&vars.var(*v).unwrap_or_default()),
                    }
                }
                Value::String(out)
            }
            ValueTemplate::Array(items) => Value::Array(items.iter().map(|t| t.render(vars)).collect()),
            ValueTemplate::Object(fields) => {
                Value::Object(fields.iter().map(|(k, t)| (k.clone(), t.render(vars))).collect())
            }
        }
    }
}

/// True when no string inside `v` holds a variable.
fn is_const(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.contains("${"),
        Value::Array(items) => items.iter().all(is_const),
        Value::Object(m) => m.values().all(is_const),
        _ => true,
    }
}

fn parse_text(s: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if i > 0 {
            parts.push(Part::Lit(rest[..i].to_string()));
        }
        let end = rest[i..].find('}').ok_or_else(|| format!("unclosed '${{' in '{s}'"))? + i;
        let name = &rest[i + 2..end];
        let var = Var::parse(name)
            .ok_or_else(|| format!("unknown variable '${{{name}}}' (known: consumer, client_ip, trace_id, route)"))?;
        parts.push(Part::Var(var));
        rest = &rest[end + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Lit(rest.to_string()));
    }
    Ok(parts)
}

/// The selected paths as a tree: `whole` keeps the value entirely.
#[derive(Debug, Default, Clone)]
struct Selection {
    whole: bool,
    children: BTreeMap<String, Selection>,
}

impl Selection {
    fn add(&mut self, segs: &[String]) {
        match segs.split_first() {
            None => self.whole = true,
            Some((first, rest)) => self.children.entry(first.clone()).or_default().add(rest),
        }
    }

    /// `None`: nothing can be selected in `v` (it is not an object or an array).
    fn apply(&self, v: Value) -> Option<Value> {
        if self.whole {
            return Some(v);
        }
        match v {
            Value::Object(m) => {
                // In the document's order (not the selection's).
                let mut out = Map::new();
                for (k, x) in m {
                    if let Some(kept) = self.children.get(&k).and_then(|sel| sel.apply(x)) {
                        out.insert(k, kept);
                    }
                }
                Some(Value::Object(out))
            }
            Value::Array(items) => Some(Value::Array(items.into_iter().filter_map(|x| self.apply(x)).collect())),
            _ => None,
        }
    }
}

/// The operations of one block, compiled. Cheap to apply; holds no per-request state.
#[derive(Debug, Clone, Default)]
pub struct JsonOps {
    select: Option<Selection>,
    remove: Vec<Path>,
    rename: Vec<(Path, String)>,
    set: Vec<(Path, ValueTemplate)>,
    wrap: Option<String>,
}

impl JsonOps {
    /// Check and compile `cfg`. `loc` is where the block sits (`response`), so errors read
    /// `response.rename.a..b: empty path segment`.
    pub fn compile(cfg: &OpsConfig, loc: &str) -> Result<JsonOps, ConfigError> {
        let at = |rest: String| if loc.is_empty() { rest } else { format!("{loc}.{rest}") };
        let mut select = None;
        for (i, p) in cfg.select.iter().enumerate() {
            let path =
                Path::parse(p).map_err(|e| ConfigError::new(at(format!("select[{i}]")), format!("'{p}': {e}")))?;
            select.get_or_insert_with(Selection::default).add(&path.0);
        }
        let remove = cfg
            .remove
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Path::parse(p).map_err(|e| ConfigError::new(at(format!("remove[{i}]")), format!("'{p}': {e}")))
            })
            .collect::<Result<_, _>>()?;
        let mut rename = Vec::new();
        for (p, new) in &cfg.rename {
            let here = at(format!("rename.{p}"));
            let path = Path::parse(p).map_err(|e| ConfigError::new(&here, e))?;
            single_key(new).map_err(|e| ConfigError::new(&here, format!("new name: {e}")))?;
            rename.push((path, new.clone()));
        }
        let mut set = Vec::new();
        for (p, v) in &cfg.set {
            let here = at(format!("set.{p}"));
            let path = Path::parse(p).map_err(|e| ConfigError::new(&here, e))?;
            set.push((path, ValueTemplate::compile(v).map_err(|e| ConfigError::new(&here, e))?));
        }
        let wrap = match &cfg.wrap {
            Some(k) => {
                single_key(k).map_err(|e| ConfigError::new(at("wrap".into()), e))?;
                Some(k.clone())
            }
            None => None,
        };
        Ok(JsonOps {
            select,
            remove,
            rename,
            set,
            wrap,
        })
    }

    /// True when applying changes nothing (the glue may skip buffering bodies).
    pub fn is_noop(&self) -> bool {
        self.select.is_none()
            && self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.wrap.is_none()
    }

    /// Apply every operation, in the documented order; `set` variables are all unknown.
    pub fn apply(&self, doc: Value) -> Value {
        self.apply_with(doc, &NoVars)
    }

    /// Apply every operation, in the documented order, with `vars` for `set` values.
    pub fn apply_with(&self, mut doc: Value, vars: &dyn Vars) -> Value {
        if let Some(sel) = &self.select {
            if doc.is_object() || doc.is_array() {
                doc = sel.apply(doc).unwrap_or(Value::Null);
            }
        }
        for p in &self.remove {
            remove(&mut doc, &p.0);
        }
        for (p, new) in &self.rename {
            rename(&mut doc, &p.0, new);
        }
        for (p, t) in &self.set {
            set(&mut doc, &p.0, &|| t.render(vars));
        }
        match &self.wrap {
            Some(k) => {
                let mut m = Map::new();
                m.insert(k.clone(), doc);
                Value::Object(m)
            }
            None => doc,
        }
    }
}

fn single_key(k: &str) -> Result<(), String> {
    if k.is_empty() {
        Err("must not be empty".into())
    } else if k.contains('.') {
        Err(format!("'{k}' must be a single key, not a path (no dots)"))
    } else {
        Ok(())
    }
}

/// Calls `f` on every object that `segs` (the path to it) leads to, fanning out over arrays.
fn for_each_object(v: &mut Value, segs: &[String], f: &mut dyn FnMut(&mut Map<String, Value>)) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|x| for_each_object(x, segs, f)),
        Value::Object(m) => match segs.split_first() {
            None => f(m),
            Some((first, rest)) => {
                if let Some(child) = m.get_mut(first) {
                    for_each_object(child, rest, f);
                }
            }
        },
        _ => {}
    }
}

fn remove(doc: &mut Value, segs: &[String]) {
    if let Some((last, parent)) = segs.split_last() {
        for_each_object(doc, parent, &mut |m| {
            // `shift_remove`: the other keys keep their order (`remove` would swap).
            m.shift_remove(last);
        });
    }
}

fn rename(doc: &mut Value, segs: &[String], new: &str) {
    if let Some((last, parent)) = segs.split_last() {
        if last == new {
            return;
        }
        for_each_object(doc, parent, &mut |m| {
            if !m.contains_key(last) {
                return;
            }
            // The renamed field takes the old one's place; a field already called `new` goes.
            let old = std::mem::take(m);
            for (k, v) in old {
                if k == *last {
                    m.insert(new.to_string(), v);
                } else if k != new {
                    m.insert(k, v);
                }
            }
        });
    }
}

/// Unlike the others, `set` creates the objects it needs on its way.
fn set(v: &mut Value, segs: &[String], value: &dyn Fn() -> Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|x| set(x, segs, value)),
        Value::Object(m) => match segs.split_first() {
            None => {}
            Some((last, [])) => {
                m.insert(last.clone(), value());
            }
            Some((first, rest)) => {
                let child = m.entry(first.clone()).or_insert(Value::Null);
                if child.is_null() {
                    *child = Value::Object(Map::new());
                }
                set(child, rest, value);
            }
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ops(yaml: &str) -> JsonOps {
        let cfg: OpsConfig = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        JsonOps::compile(&cfg, "response").unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    fn doc() -> Value {
        json!({
            "id": 7,
            "user": {"name": "ann", "age": 41, "address": {"city": "Oslo", "zip": "0150"}},
            "items": [
                {"sku": "a", "price": 1, "tags": [{"k": "x", "v": 1}]},
                {"sku": "b", "price": 2, "tags": []},
                {"sku": "c"},
                "stray",
                [{"price": 3}]
            ],
            "meta": null
        })
    }

    #[test]
    fn select_table() {
        let cases: &[(&str, Value)] = &[
            ("[id]", json!({"id": 7})),
            ("[user.name]", json!({"user": {"name": "ann"}})),
            (
                "[user.address.city, id]",
                json!({"id": 7, "user": {"address": {"city": "Oslo"}}}),
            ),
            ("[user, user.name]", json!({"user": doc()["user"]})),
            ("[user.name, user]", json!({"user": doc()["user"]})),
            // A leaf inside an array: every element keeps its place; scalars drop out.
            (
                "[items.price]",
                json!({"items": [{"price": 1}, {"price": 2}, {}, [{"price": 3}]]}),
            ),
            (
                "[items.tags.k]",
                json!({"items": [{"tags": [{"k": "x"}]}, {"tags": []}, {}, [{}]]}),
            ),
            // Missing fields select nothing; the containers on the way stay.
            ("[nope]", json!({})),
            ("[user.nope]", json!({"user": {}})),
            ("[id.deeper]", json!({})),
            ("[meta.x]", json!({})),
            ("[meta]", json!({"meta": null})),
        ];
        for (sel, want) in cases {
            let got = ops(&format!("select: {sel}")).apply(doc());
            assert_eq!(&got, want, "select {sel}");
        }
    }

    #[test]
    fn remove_table() {
        // (remove, the field to look at or "" for the whole document, what it should be)
        let cases: &[(&str, &str, Value)] = &[
            ("[id, meta, items]", "", json!({"user": doc()["user"]})),
            (
                "[user.address.zip, user.age]",
                "user",
                json!({"name": "ann", "address": {"city": "Oslo"}}),
            ),
            ("[nope, user.nope.deeper, id.deeper]", "", doc()),
        ];
        for (rm, field, want) in cases {
            let got = ops(&format!("remove: {rm}")).apply(doc());
            let got = if field.is_empty() { got } else { got[*field].clone() };
            assert_eq!(&got, want, "remove {rm}");
        }
        // Through arrays: every element, nested arrays too; strays are untouched.
        let got = ops("remove: [items.price, items.tags]").apply(doc());
        assert_eq!(
            got["items"],
            json!([{"sku": "a"}, {"sku": "b"}, {"sku": "c"}, "stray", [{}]])
        );
    }

    #[test]
    fn rename_table() {
        let cases: &[(&str, &str, Value)] = &[
            ("{id: key}", "", json!(7)),
            (
                "{user.name: fullName}",
                "user",
                json!({"fullName": "ann", "age": 41, "address": doc()["user"]["address"]}),
            ),
            // A collision: the renamed field wins.
            (
                "{user.name: age}",
                "user",
                json!({"age": "ann", "address": doc()["user"]["address"]}),
            ),
            // Missing: nothing happens (the target field is not clobbered either).
            ("{user.nope: age}", "user", doc()["user"].clone()),
            ("{user.name: name}", "user", doc()["user"].clone()),
            // In order: the second sees the first's result.
            (
                "{user: person, person.name: n}",
                "person",
                json!({"n": "ann", "age": 41, "address": doc()["user"]["address"]}),
            ),
        ];
        for (rn, field, want) in cases {
            let got = ops(&format!("rename: {rn}")).apply(doc());
            let got = if field.is_empty() {
                got["key"].clone()
            } else {
                got[*field].clone()
            };
            assert_eq!(&got, want, "rename {rn}");
        }
        let got = ops("rename: {items.price: cost}").apply(doc());
        assert_eq!(
            got["items"][0],
            json!({"sku": "a", "cost": 1, "tags": [{"k": "x", "v": 1}]})
        );
        assert_eq!(got["items"][2], json!({"sku": "c"}));
        assert_eq!(got["items"][4], json!([{"cost": 3}]));
    }

    #[test]
    fn set_with_variables() {
        let o = ops(
            "set: {by: '${consumer}', meta.ip: '${client_ip}', audit.t: 'id-${trace_id}-${consumer}', \
             items.seen: true, user.address.city.x: 1, fixed: {a: [1, '${route}']}}",
        );
        let vars = |v: Var| match v {
            Var::Consumer => None,
            Var::ClientIp => Some("10.0.0.1".to_string()),
            Var::TraceId => Some("t1".to_string()),
            Var::Route => Some("r".to_string()),
        };
        let got = o.apply_with(doc(), &vars);
        assert_eq!(got["by"], Value::Null, "a lone unknown variable is null");
        assert_eq!(
            got["meta"],
            json!({"ip": "10.0.0.1"}),
            "null on the way becomes an object"
        );
        assert_eq!(got["audit"], json!({"t": "id-t1-"}), "missing objects are created");
        assert_eq!(got["items"][0]["seen"], json!(true));
        assert_eq!(got["items"][3], json!("stray"));
        assert_eq!(got["items"][4], json!([{"price": 3, "seen": true}]));
        assert_eq!(
            got["user"]["address"]["city"],
            json!("Oslo"),
            "a string on the way: no-op"
        );
        assert_eq!(got["fixed"], json!({"a": [1, "r"]}));
        // Without variables.
        assert_eq!(o.apply(json!({}))["audit"]["t"], json!("id--"));
    }

    #[test]
    fn untouched_numbers_and_key_order_pass_as_written() {
        let text = r#"{"z":1,"id":18446744073709551616,"a":-9223372036854775809,"big":12345678901234567890123,"h":1e2,"f":1.50,"n":{"y":2,"x":1e400},"drop":0}"#;
        let parse = || serde_json::from_str::<Value>(text).unwrap();
        let out = ops("remove: [drop]\nrename: {a: b}\nset: {new: 1}").apply(parse());
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"z":1,"id":18446744073709551616,"b":-9223372036854775809,"big":12345678901234567890123,"h":1e+2,"f":1.50,"n":{"y":2,"x":1e+400},"new":1}"#
        );
        let out = ops("select: [n.x, z, h]").apply(parse());
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"z":1,"h":1e+2,"n":{"x":1e+400}}"#
        );
        // A rename onto an existing key: the renamed field takes its own place.
        let out = ops("rename: {h: z}").apply(parse());
        assert_eq!(
            out.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["id", "a", "big", "z", "f", "n", "drop"]
        );
        assert_eq!(
            out["z"].to_string(),
            "1e+2",
            "serde_json spells an exponent with its sign"
        );
    }

    #[test]
    fn wrap_anything() {
        let o = ops("wrap: data");
        assert_eq!(o.apply(json!({"a": 1})), json!({"data": {"a": 1}}));
        assert_eq!(o.apply(json!([1, 2])), json!({"data": [1, 2]}));
        assert_eq!(o.apply(json!("s")), json!({"data": "s"}));
        assert_eq!(o.apply(Value::Null), json!({"data": null}));
    }

    #[test]
    fn order_is_select_remove_rename_set_wrap() {
        let o = ops(
            "wrap: data\nset: {user.by: '${consumer}'}\nrename: {user.name: n}\nremove: [user.age]\nselect: [user, id]",
        );
        let got = o.apply_with(doc(), &|_| Some("c".to_string()));
        assert_eq!(
            got,
            json!({"data": {"id": 7, "user": {"n": "ann", "by": "c", "address": doc()["user"]["address"]}}})
        );
    }

    #[test]
    fn scalar_and_array_documents() {
        let o = ops("select: [a]\nremove: [b]\nrename: {c: d}\nset: {e: 1}");
        assert_eq!(o.apply(json!(5)), json!(5));
        assert_eq!(o.apply(json!("x")), json!("x"));
        assert_eq!(o.apply(Value::Null), Value::Null);
        assert_eq!(
            o.apply(json!([{"a": 1, "b": 2, "c": 3}, {"x": 1}, 4])),
            json!([{"a": 1, "e": 1}, {"e": 1}])
        );
        assert!(ops("{}").is_noop());
        assert_eq!(ops("{}").apply(doc()), doc());
    }

    #[test]
    fn config_errors_are_located() {
        let cases: &[(&str, &str)] = &[
            ("select: [a, 'a..b']", "response.select[1]: 'a..b': empty path segment"),
            ("select: ['']", "response.select[0]: '': empty path"),
            ("remove: ['.a']", "response.remove[0]: '.a': empty path segment"),
            ("rename: {'a..b': c}", "response.rename.a..b: empty path segment"),
            (
                "rename: {a: 'b.c'}",
                "response.rename.a: new name: 'b.c' must be a single key, not a path (no dots)",
            ),
            ("rename: {a: ''}", "response.rename.a: new name: must not be empty"),
            ("set: {'a.': 1}", "response.set.a.: empty path segment"),
            (
                "set: {a: '${nope}'}",
                "response.set.a: unknown variable '${nope}' (known: consumer, client_ip, trace_id, route)",
            ),
            (
                "set: {a: {b: ['${consumer']}}",
                "response.set.a: unclosed '${' in '${consumer'",
            ),
            (
                "wrap: 'a.b'",
                "response.wrap: 'a.b' must be a single key, not a path (no dots)",
            ),
            ("wrap: ''", "response.wrap: must not be empty"),
        ];
        for (yaml, want) in cases {
            let cfg: OpsConfig = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let err = JsonOps::compile(&cfg, "response").expect_err(yaml);
            assert_eq!(err.to_string(), *want, "{yaml}");
        }
        assert!(serde_yaml::from_str::<OpsConfig>("selct: [a]").is_err());
        assert!(serde_yaml::from_str::<OpsConfig>("rename: [a]").is_err());
        let cfg: OpsConfig = serde_yaml::from_str("rename: {z: a, b: c, a: d}").unwrap();
        assert_eq!(
            cfg.rename.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["z", "b", "a"]
        );
    }
}
