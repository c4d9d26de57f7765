//! The version-1 state file, read once: it mirrored every node kind by
//! hand. Its node drivers and exports were already the API's fields under
//! the .proto names, so it is reshaped into version 2 as JSON: a node's
//! `name` goes into its driver object, which becomes the node's `spec`; a
//! fault rule's `action` object is flattened into the rule (a oneof in the
//! protobuf JSON mapping); an export's fields go into `export`, beside its
//! `queues`, `generation` and config mark. Everything else of the file
//! stays as it was; version 2's reader checks the result as a whole.

use serde_json::{Map, Value};

/// Version 2 of a version-1 state file (`v1`, parsed), or what in it is
/// not the version-1 shape.
pub(super) fn upgrade(v1: Value) -> Result<Value, String> {
    let mut top = object(v1, "the state file")?;
    let nodes = array(take(&mut top, "nodes", "the state file")?, "nodes")?;
    let exports = array(take(&mut top, "exports", "the state file")?, "exports")?;
    let workers = take(&mut top, "workers", "the state file")?;
    top.remove("version");
    no_other_field(&top, "the state file")?;
    let nodes = nodes.into_iter().map(node).collect::<Result<Vec<_>, _>>()?;
    let exports = exports
        .into_iter()
        .map(export)
        .collect::<Result<Vec<_>, _>>()?;
    let mut v2 = Map::new();
    v2.insert("version".into(), Value::from(2));
    v2.insert("nodes".into(), Value::Array(nodes));
    v2.insert("exports".into(), Value::Array(exports));
    v2.insert("workers".into(), workers);
    Ok(Value::Object(v2))
}

/// `{name, size, driver: {KIND: {..}}, managed_by_config?}` →
/// `{spec: {name, KIND: {..}}, size, managed_by_config?}`.
fn node(v: Value) -> Result<Value, String> {
    let mut n = object(v, "node")?;
    let name = take(&mut n, "name", "node")?;
    let what = format!("node {name}");
    let size = take(&mut n, "size", &what)?;
    let mut spec = object(take(&mut n, "driver", &what)?, &format!("{what}: driver"))?;
    let managed = n.remove("managed_by_config");
    no_other_field(&n, &what)?;
    if let Some(Value::Object(fi)) = spec.get_mut("fault_injection") {
        if let Some(Value::Array(rules)) = fi.get_mut("rules") {
            for rule in rules.iter_mut().filter_map(Value::as_object_mut) {
                if let Some(action) = rule.remove("action") {
                    rule.extend(object(action, &format!("{what}: rule action"))?);
                }
            }
        }
    }
    spec.insert("name".into(), name);
    let mut out = Map::new();
    out.insert("spec".into(), Value::Object(spec));
    out.insert("size".into(), size);
    if let Some(m) = managed {
        out.insert("managed_by_config".into(), m);
    }
    Ok(Value::Object(out))
}

/// `{id, .., queues, generation?, managed_by_config?}` →
/// `{export: {id, ..}, queues, generation?, managed_by_config?}`.
fn export(v: Value) -> Result<Value, String> {
    let mut e = object(v, "export")?;
    let what = format!("export {}", e.get("id").unwrap_or(&Value::Null));
    let queues = take(&mut e, "queues", &what)?;
    let mut out = Map::new();
    for key in ["generation", "managed_by_config"] {
        if let Some(v) = e.remove(key) {
            out.insert(key.into(), v);
        }
    }
    out.insert("queues".into(), queues);
    out.insert("export".into(), Value::Object(e));
    Ok(Value::Object(out))
}

fn object(v: Value, what: &str) -> Result<Map<String, Value>, String> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(format!("{what}: expected an object, got {other}")),
    }
}

fn array(v: Value, what: &str) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(format!("{what}: expected a list, got {other}")),
    }
}

fn take(m: &mut Map<String, Value>, key: &str, what: &str) -> Result<Value, String> {
    m.remove(key)
        .ok_or_else(|| format!("{what}: missing field `{key}`"))
}

fn no_other_field(m: &Map<String, Value>, what: &str) -> Result<(), String> {
    match m.keys().next() {
        Some(key) => Err(format!("{what}: unknown field `{key}`")),
        None => Ok(()),
    }
}
