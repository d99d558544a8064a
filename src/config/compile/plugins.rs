//! Plugin blocks, built through the registry: the global list, and each route's own (which may
//! replace a global plugin of the same name, or switch it off with `enabled: false`).

use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::raw;
use crate::plugin::{BuildContext, Entry, Registry};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The global plugins, in file order; a name listed twice is an error.
pub(super) fn global_entries(
    registry: &Registry,
    list: &[(usize, raw::PluginEntry)],
    ctx: &BuildContext,
    errs: &mut ConfigErrors,
) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, p) in list {
        if let Some(PluginSlot::On(e)) = build_plugin(registry, p, &format!("plugins[{i}]"), ctx, errs) {
            if entries.iter().any(|g| g.name == e.name) {
                errs.push(format!("plugins[{i}]"), format!("plugin '{}' is listed twice", e.name));
            }
            entries.push(e);
        }
    }
    entries
}

/// The block with every map's keys in sorted order, so a block rewritten with its keys in
/// another order (or in another YAML style) hashes the same: it is the same block, and a
/// reload keeps its state.
fn canonical(v: &serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Mapping(m) => {
            let mut entries: Vec<(String, Value, Value)> = m
                .iter()
                .map(|(k, v)| (serde_yaml::to_string(k).unwrap_or_default(), k.clone(), canonical(v)))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Mapping(entries.into_iter().map(|(_, k, v)| (k, v)).collect())
        }
        Value::Sequence(items) => Value::Sequence(items.iter().map(canonical).collect()),
        Value::Tagged(t) => Value::Tagged(Box::new(serde_yaml::value::TaggedValue {
            tag: t.tag.clone(),
            value: canonical(&t.value),
        })),
        other => other.clone(),
    }
}

pub(super) enum PluginSlot {
    On(Entry),
    /// `- NAME: { enabled: false }`: switches a global plugin off for a route.
    Off(Arc<str>),
}

pub(super) fn build_plugin(
    registry: &Registry,
    p: &raw::PluginEntry,
    loc: &str,
    ctx: &BuildContext,
    errs: &mut ConfigErrors,
) -> Option<PluginSlot> {
    let Some(factory) = registry.get(&p.name) else {
        errs.push(
            loc,
            format!("unknown plugin '{}' (known: {})", p.name, registry.names().join(", ")),
        );
        return None;
    };
    let ploc = format!("{loc}.{}", p.name);
    let mut config = p.config.clone();
    if let serde_yaml::Value::Mapping(m) = &mut config {
        if let Some(v) = m.remove("enabled") {
            match v.as_bool() {
                Some(false) => return Some(PluginSlot::Off(Arc::from(p.name.as_str()))),
                Some(true) => {}
                None => {
                    errs.push(format!("{ploc}.enabled"), "must be true or false");
                    return None;
                }
            }
        }
    }
    // The plugin's identity for state that survives reloads: its name and its block's hash.
    let mut ctx = ctx.clone();
    ctx.plugin = p.name.clone();
    ctx.block_hash = hex::encode(Sha256::digest(
        serde_yaml::to_string(&canonical(&config))
            .unwrap_or_default()
            .as_bytes(),
    ));
    match factory(&config, &ctx) {
        Ok(plugin) => Some(PluginSlot::On(Entry {
            name: Arc::from(p.name.as_str()),
            kind: plugin.kind(),
            plugin,
        })),
        Err(e) => {
            let location = match (e.location.is_empty(), e.location.starts_with('[')) {
                (true, _) => ploc,
                (false, true) => format!("{ploc}{}", e.location),
                (false, false) => format!("{ploc}.{}", e.location),
            };
            errs.0.push(ConfigError {
                location,
                message: e.message,
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn key_order_and_style_do_not_change_the_canonical_block() {
        let a: serde_yaml::Value =
            serde_yaml::from_str("{requests: 1, per: 1m, nested: {b: 1, a: [x, {d: 1, c: 2}]}}").unwrap();
        let b: serde_yaml::Value =
            serde_yaml::from_str("nested:\n  a: [x, {c: 2, d: 1}]\n  b: 1\nper: 1m\nrequests: 1\n").unwrap();
        let text = |v| serde_yaml::to_string(&canonical(v)).unwrap();
        assert_eq!(text(&a), text(&b));
        let c: serde_yaml::Value =
            serde_yaml::from_str("{requests: 2, per: 1m, nested: {b: 1, a: [x, {d: 1, c: 2}]}}").unwrap();
        assert_ne!(text(&a), text(&c));
        let order: serde_yaml::Value =
            serde_yaml::from_str("{nested: {b: 1, a: [{d: 1, c: 2}, x]}, per: 1m, requests: 1}").unwrap();
        assert_ne!(text(&a), text(&order), "list order is meaningful");
    }
}
