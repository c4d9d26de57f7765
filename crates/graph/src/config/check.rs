//! The checks of a configuration file on its own: each node's fields,
//! names defined once, children defined in the file, no cycle, exports'
//! ids, sockets and nodes once ([`check_file`], which the manager's
//! reconcile starts from), and the whole file applied to an empty manager
//! as AddNode and AddExport would apply it ([`validate`]).

use std::collections::{BTreeMap, BTreeSet};

use blkmesh_proto::v1::{NodeSpec, VhostUserBlkExport};

use crate::config::document::{Config, ConfigError, ConfigErrors};
use crate::error::GraphError;
use crate::export::{check_new_export, validate_export};
use crate::graph::Graph;
use crate::kinds::fault::validate_node_limits;
use crate::kinds::{child_field, children, node_size, zoned};
use crate::validate::validate_node;

/// What the file says on its own, for the checks against a state.
#[derive(Debug)]
pub struct FileCheck<'c> {
    /// Index of each node by name (the first, when defined twice).
    pub by_name: BTreeMap<&'c str, usize>,
    /// Per node: no error so far (in it or below it).
    pub ok: Vec<bool>,
    /// The nodes that are `ok`, children before parents.
    pub order: Vec<usize>,
    /// Per export: no error so far.
    pub export_ok: Vec<bool>,
    /// Every error found, in the order found.
    pub errors: Vec<ConfigError>,
}

impl FileCheck<'_> {
    /// Whether a child of `spec` failed (its error says why).
    pub fn child_failed(&self, spec: &NodeSpec) -> bool {
        children(spec)
            .iter()
            .any(|c| self.by_name.get(c).is_some_and(|&k| !self.ok[k]))
    }

    /// Whether export `export`'s node is defined and passed.
    pub fn node_ok(&self, export: &VhostUserBlkExport) -> bool {
        self.by_name
            .get(export.node.as_str())
            .is_some_and(|&n| self.ok[n])
    }
}

/// Checks the file on its own (see the module docs); errors are collected,
/// at most one per object.
pub fn check_file(config: &Config) -> FileCheck<'_> {
    let nodes = config.nodes();
    let mut errors: Vec<ConfigError> = Vec::new();

    // 1. Each node on its own: the API's field validation.
    let mut ok = vec![true; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let checked = validate_node(&n.spec).and_then(|()| validate_node_limits(&n.spec));
        if let Err(e) = checked {
            errors.push(config.node_error(n, &e));
            ok[i] = false;
        }
    }

    // 2. Names defined once; children defined in the file.
    let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        match by_name.get(n.spec.name.as_str()) {
            Some(&first) => {
                errors.push(config.error_in(
                    &n.at,
                    "name",
                    format!(
                        "node {:?} is defined twice (first at line {})",
                        n.spec.name,
                        config.line_of(&nodes[first].at)
                    ),
                ));
                ok[i] = false;
            }
            None => {
                by_name.insert(&n.spec.name, i);
            }
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        if !ok[i] {
            continue;
        }
        for child in children(&n.spec) {
            if !by_name.contains_key(child) {
                let e = GraphError::invalid(
                    child_field(&n.spec),
                    format!(
                        "node {child:?} is not defined in this file (the nodes of a \
                         configuration file are built only from each other)"
                    ),
                );
                errors.push(config.node_error(n, &e));
                ok[i] = false;
            }
        }
    }

    let order = order_and_cycles(config, &by_name, &mut ok, &mut errors);
    let export_ok = check_exports(config, &by_name, &ok, &mut errors);
    FileCheck {
        by_name,
        ok,
        order,
        export_ok,
        errors,
    }
}

/// Step 3: children before parents; cycles; a node over a failed one
/// fails silently (its child's error says why).
fn order_and_cycles(
    config: &Config,
    by_name: &BTreeMap<&str, usize>,
    ok: &mut [bool],
    errors: &mut Vec<ConfigError>,
) -> Vec<usize> {
    let nodes = config.nodes();
    let mut order: Vec<usize> = Vec::new();
    let mut placed = vec![false; nodes.len()];
    loop {
        let mut progress = false;
        for (i, n) in nodes.iter().enumerate() {
            if placed[i] || !ok[i] {
                continue;
            }
            let kids: Vec<usize> = children(&n.spec)
                .iter()
                .filter_map(|c| by_name.get(c).copied())
                .collect();
            if kids.iter().any(|&k| !ok[k]) {
                ok[i] = false;
                progress = true;
            } else if kids.iter().all(|&k| placed[k]) {
                placed[i] = true;
                order.push(i);
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    let mut in_cycle = BTreeSet::new();
    for start in 0..nodes.len() {
        if placed[start] || !ok[start] || in_cycle.contains(&start) {
            continue;
        }
        // Walk down until a node repeats: that closes the cycle.
        let mut seen = vec![start];
        let mut cur = start;
        while let Some(&next) = children(&nodes[cur].spec)
            .first()
            .and_then(|c| by_name.get(c))
        {
            // Into a cycle reported already.
            if in_cycle.contains(&next) || !ok[next] {
                break;
            }
            if let Some(pos) = seen.iter().position(|&s| s == next) {
                let cycle = &seen[pos..];
                let first = *cycle.iter().min().unwrap_or(&next);
                let at = cycle.iter().position(|&c| c == first).unwrap_or(0);
                let mut path: Vec<String> = cycle[at..]
                    .iter()
                    .chain(&cycle[..at])
                    .map(|&c| nodes[c].spec.name.clone())
                    .collect();
                path.push(nodes[first].spec.name.clone());
                let n = &nodes[first];
                errors.push(config.node_error(
                    n,
                    &GraphError::invalid(
                        child_field(&n.spec),
                        format!("nodes form a cycle: {}", path.join(" -> ")),
                    ),
                ));
                in_cycle.extend(cycle.iter().copied());
                break;
            }
            seen.push(next);
            cur = next;
        }
        for s in seen {
            ok[s] = false;
        }
    }
    order
}

/// Step 4, exports: ids, sockets and nodes once; nodes of the file.
fn check_exports(
    config: &Config,
    by_name: &BTreeMap<&str, usize>,
    ok: &[bool],
    errors: &mut Vec<ConfigError>,
) -> Vec<bool> {
    let exports = config.exports();
    let mut export_ok = vec![true; exports.len()];
    let mut first_id: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_socket: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_node: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, e) in exports.iter().enumerate() {
        let x = &e.export;
        let twice = |key: &str, what: String, first: usize| {
            config.error_in(
                &e.at,
                key,
                format!(
                    "{what} (first at line {})",
                    config.line_of(&exports[first].at)
                ),
            )
        };
        if let Some(&f) = first_id.get(x.id.as_str()) {
            errors.push(twice(
                "id",
                format!("export {:?} is defined twice", x.id),
                f,
            ));
            export_ok[i] = false;
            continue;
        }
        first_id.insert(&x.id, i);
        if let Some(&f) = first_socket.get(x.socket.as_str()) {
            errors.push(twice(
                "socket",
                format!(
                    "socket {:?} is already used by export {:?}",
                    x.socket, exports[f].export.id
                ),
                f,
            ));
            export_ok[i] = false;
            continue;
        }
        first_socket.insert(&x.socket, i);
        match by_name.get(x.node.as_str()) {
            None => {
                errors.push(config.error_in(
                    &e.at,
                    "node",
                    format!(
                        "node {:?} is not defined in this file (an export of a \
                         configuration file serves one of its nodes)",
                        x.node
                    ),
                ));
                export_ok[i] = false;
                continue;
            }
            Some(&n) if !ok[n] => {
                export_ok[i] = false;
                continue;
            }
            Some(_) => {}
        }
        if let Some(&f) = first_node.get(x.node.as_str()) {
            errors.push(twice(
                "node",
                format!(
                    "node {:?} is already exported by export {:?}",
                    x.node, exports[f].export.id
                ),
                f,
            ));
            export_ok[i] = false;
            continue;
        }
        first_node.insert(&x.node, i);
    }
    export_ok
}

/// What AddNode checks of a new node against `graph` (whose nodes have
/// `sizes`) before it looks at the filesystem: the graph rules and the
/// zoned rules.
pub fn check_new_node(
    graph: &Graph,
    sizes: &BTreeMap<String, u64>,
    spec: &NodeSpec,
) -> Result<(), GraphError> {
    graph.check_add(spec)?;
    zoned::check_add(graph, sizes, spec)
}

/// Applies the file to an empty manager as AddNode and AddExport would,
/// without the filesystem: `blkmeshctl config check`.
pub(crate) fn validate(config: &Config) -> Result<(), ConfigErrors> {
    let mut file = check_file(config);
    let nodes = config.nodes();
    let mut graph = Graph::new();
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for i in file.order.clone() {
        let n = &nodes[i];
        if !file.ok[i] || file.child_failed(&n.spec) {
            file.ok[i] = false;
            continue;
        }
        let added = check_new_node(&graph, &sizes, &n.spec)
            .and_then(|()| node_size(&n.spec, |c| sizes.get(c).copied().unwrap_or(0), None))
            .and_then(|size| {
                graph.add(n.spec.clone())?;
                sizes.insert(n.spec.name.clone(), size);
                Ok(())
            });
        if let Err(e) = added {
            file.errors.push(config.node_error(n, &e));
            file.ok[i] = false;
        }
    }
    let mut added: Vec<VhostUserBlkExport> = Vec::new();
    for (i, e) in config.exports().iter().enumerate() {
        if !file.export_ok[i] || !file.node_ok(&e.export) {
            continue;
        }
        let checked = validate_export(&e.export).and_then(|desired| {
            let others: Vec<&VhostUserBlkExport> = added.iter().collect();
            check_new_export(&graph, &others, &desired)
        });
        match checked {
            Ok(export) => added.push(export),
            Err(err) => file.errors.push(config.export_error(e, &err)),
        }
    }
    if file.errors.is_empty() {
        return Ok(());
    }
    file.errors.sort_by_key(|e| e.position);
    Err(ConfigErrors(file.errors))
}
