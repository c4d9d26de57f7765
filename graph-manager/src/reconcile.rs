//! Applying a configuration file to the manager's state at start.
//!
//! The file is checked as a whole first, then compared with the state:
//!
//! - nodes and exports in the file but not in the state are added, as
//!   AddNode and AddExport would (an io_uring file marked `create` is
//!   created sparse when missing); exports wait for the first worker to
//!   register ([`Outcome::waiting`]);
//! - ones in both with the same settings are left alone: no reopen, no
//!   generation bump, no write of the state file;
//! - ones in both with other settings are changed when UpdateNode or
//!   ResizeNode could change them live (options such as throttle limits,
//!   fault rules, read-only, direct, null latency; growing a null node or a
//!   raw window with an explicit size), as those calls do: a throttle
//!   group's limits change for every member, the generation of every export
//!   over a changed node is bumped so frontends reopen it live. Anything else
//!   (a driver, a child, a path, a group, a shrink, any export field) is
//!   refused with the located error;
//! - ones in the state but not in the file are kept (they were added
//!   through the API, or by an earlier file) and logged, or removed with
//!   `prune` (exports first).
//!
//! Everything is planned on a copy of the state; the files to create are
//! created only when the whole plan holds, and the caller persists the
//! result. Errors are collected (one per object at most) and located in
//! the file. The checks of the file on its own (steps 1-4 below) are the
//! schema crate's (`blkmesh_graph::config::check_file`), which also runs
//! the whole file against an empty manager without touching the
//! filesystem: `blkmeshctl config check`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::path::Path;

use blkmesh_graph::config::{
    check_file, check_new_node, Config, ConfigErrors, ConfigExport, ConfigNode, FieldError,
    FileCheck,
};
use blkmesh_graph::validate_export;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeSpec, VhostUserBlkExport};

use crate::core::error::ApiError;
use crate::core::exports::check_new_export;
use crate::core::image::{image_chain, probe_image};
use crate::core::nodes::{check_writable_exports, group_members_with, new_node_size};
use crate::core::probe::probe_node_paths;
use crate::core::reopen::{self, exports_over, replace_specs};
use crate::core::state::{ExportRecord, State};

pub(crate) use summary::Summary;

mod summary;

/// How to reconcile.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Options {
    /// Look at the filesystem (probe paths, create images), as the manager
    /// does at start; off for an offline check.
    pub fs: bool,
    /// Remove the nodes and exports the file does not name.
    pub prune: bool,
    /// Give the images it creates to this uid and gid (the workers' user,
    /// when they run apart from the manager).
    pub image_owner: Option<(u32, u32)>,
}

/// The reconciled state and the exports waiting for a worker.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub state: State,
    /// New exports of the file, normalized and checked against `state`, in
    /// file order: placed when a worker registers.
    pub waiting: Vec<VhostUserBlkExport>,
    pub summary: Summary,
}

impl FieldError for ApiError {
    fn field_and_problem(&self) -> (String, String) {
        match self {
            ApiError::Graph(g) => g.field_and_problem(),
            ApiError::Missing(f) => ((*f).to_string(), "must be set".to_string()),
            ApiError::Invalid { field, problem } => (field.clone(), problem.clone()),
            other => (String::new(), other.to_string()),
        }
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// `e`, a change the file makes that cannot be made live, in the file's
/// words, with how to make it.
fn not_live(e: ApiError, kind: &str, name: &str) -> ApiError {
    let (field, problem) = e.field_and_problem();
    let problem = problem
        .replace("cannot be changed by UpdateNode", "cannot change live")
        .replace("; only options can", "")
        .replace(", got ", ", the file says ")
        .replace("(got ", "(the file says ");
    let other = if kind == "export" { "id" } else { "name" };
    invalid(
        &field,
        format!(
            "{problem}: remove {kind} {name:?} first (start the manager without --config \
             and run `blkmeshctl {kind} remove {name}`), or give the file's {kind} another \
             {other}"
        ),
    )
}

/// What a node of the file changes on its namesake in the state.
#[derive(Debug, Clone, PartialEq)]
struct NodeChange {
    /// The new spec with the current size (UpdateNode), if options change.
    update: Option<(NodeSpec, Vec<String>)>,
    /// The new size (ResizeNode), if it grows.
    resize: Option<u64>,
}

/// How `desired` differs from `current` (same name), or why that cannot
/// change live. `None`: nothing changes.
fn plan_change(current: &NodeSpec, desired: &NodeSpec) -> Result<Option<NodeChange>, ApiError> {
    if current == desired {
        return Ok(None);
    }
    let mut sized = desired.clone();
    let mut resize = None;
    match (&current.driver, &mut sized.driver) {
        (Some(Driver::Null(a)), Some(Driver::Null(b))) if a.size != b.size => {
            resize = Some(b.size);
            b.size = a.size;
        }
        (Some(Driver::Raw(a)), Some(Driver::Raw(b)))
            if a.size != b.size && a.size != 0 && b.size != 0 =>
        {
            resize = Some(b.size);
            b.size = a.size;
        }
        (Some(Driver::Raw(a)), Some(Driver::Raw(b))) if a.size != b.size => {
            return Err(invalid(
                "node.raw.size",
                format!(
                    "cannot change live (is {}, the file says {}; 0 = to the end of the \
                     child): a window changes between an explicit size and the end of its \
                     child only by adding it again",
                    a.size, b.size
                ),
            ));
        }
        _ => {}
    }
    let changes = reopen::update_changes(current, &sized)?;
    let update = (!changes.is_empty()).then_some((sized, changes));
    if update.is_none() && resize.is_none() {
        return Ok(None);
    }
    Ok(Some(NodeChange { update, resize }))
}

/// Applies a configuration file to `state` (see the module docs).
pub(crate) fn reconcile(
    state: &State,
    config: &Config,
    opts: Options,
) -> Result<Outcome, ConfigErrors> {
    let nodes = config.nodes();
    let exports = config.exports();
    let mut summary = Summary::default();

    // 1.-4. The file on its own: each node's fields, names, children,
    // cycles, exports' ids, sockets and nodes.
    let FileCheck {
        by_name,
        mut ok,
        order,
        export_ok,
        mut errors,
    } = check_file(config);

    // 5. The state: what the file does not name.
    let mut next = state.clone();
    let (node_names, export_ids) = config.names();
    let extra_exports: Vec<String> = state
        .exports
        .keys()
        .filter(|id| !export_ids.contains(*id))
        .cloned()
        .collect();
    let mut extra_nodes: Vec<String> = state
        .graph
        .iter()
        .map(|s| s.name.clone())
        .filter(|n| !node_names.contains(n))
        .collect();
    if opts.prune {
        for id in &extra_exports {
            next.exports.remove(id);
            next.config_exports.remove(id);
            summary.pruned_exports.push(id.clone());
        }
        // Users before the nodes they use.
        loop {
            let removable = extra_nodes.iter().position(|n| {
                next.graph.users_of(n).is_empty() && next.exports_of_node(n).next().is_none()
            });
            let Some(pos) = removable else {
                break;
            };
            let name = extra_nodes.remove(pos);
            if next.graph.remove(&name).is_ok() {
                next.sizes.remove(&name);
                next.config_nodes.remove(&name);
                summary.pruned_nodes.push(name);
            }
        }
        // What is left is used by a node of the file: its error says why.
        for n in extra_nodes {
            summary
                .kept_nodes
                .push((n.clone(), state.config_nodes.contains(&n)));
        }
    } else {
        for id in extra_exports {
            let managed = state.config_exports.contains(&id);
            summary.kept_exports.push((id, managed));
        }
        for n in extra_nodes {
            let managed = state.config_nodes.contains(&n);
            summary.kept_nodes.push((n, managed));
        }
    }

    // 6. Nodes, children first: added, left alone or changed live.
    let mut creations: Vec<(usize, String, u64)> = Vec::new();
    let mut touched: BTreeSet<String> = BTreeSet::new();
    let mut updated: Vec<usize> = Vec::new();
    for &i in &order {
        let n = &nodes[i];
        // A node over one that failed here fails silently: its child's error says why.
        let child_failed = blkmesh_graph::children(&n.spec)
            .iter()
            .any(|c| by_name.get(c).is_some_and(|&k| !ok[k]));
        if !ok[i] || child_failed {
            ok[i] = false;
            continue;
        }
        let result = match next.graph.get(&n.spec.name).cloned() {
            None => add_node(&mut next, i, n, opts, &mut creations).map(|()| {
                summary.added_nodes.push(n.spec.name.clone());
            }),
            Some(current) => {
                change_node(&mut next, &current, n, &mut summary, &mut touched).map(|changed| {
                    if changed {
                        updated.push(i);
                    } else {
                        summary.unchanged_nodes.push(n.spec.name.clone());
                    }
                })
            }
        };
        if let Err(e) = result {
            errors.push(config.node_error(n, &e));
            ok[i] = false;
        }
    }
    // Read-only changes against the writable exports, once all are made.
    for &i in &updated {
        let n = &nodes[i];
        if let Some(spec) = next.graph.get(&n.spec.name).cloned() {
            if let Err(e) = check_writable_exports(&next, &spec) {
                errors.push(config.node_error(n, &e));
            }
        }
    }

    // 7. Exports: left alone, or checked as AddExport would and queued.
    let mut waiting = Vec::new();
    let mut scratch = next.clone();
    for (i, e) in exports.iter().enumerate() {
        let node_ok = by_name.get(e.export.node.as_str()).is_some_and(|&n| ok[n]);
        if !export_ok[i] || !node_ok {
            continue;
        }
        match check_export(&next, &mut scratch, e) {
            Ok(Some(export)) => waiting.push(export),
            Ok(None) => summary.unchanged_exports.push(e.export.id.clone()),
            Err(err) => errors.push(config.export_error(e, &err)),
        }
    }

    if !errors.is_empty() {
        errors.sort_by_key(|e| e.position);
        return Err(ConfigErrors(errors));
    }

    // 8. Marks and generations.
    next.config_nodes.extend(node_names);
    next.config_exports.extend(
        export_ids
            .into_iter()
            .filter(|id| next.exports.contains_key(id)),
    );
    let bumped = exports_over(&next, touched.iter().map(String::as_str));
    for id in &bumped {
        if let Some(rec) = next.exports.get_mut(id) {
            rec.generation += 1;
        }
    }
    summary.bumped = bumped;

    // 9. The files to create, now that the whole plan holds.
    for (i, path, size) in creations {
        let n = &nodes[i];
        if let Err(e) = create_image(Path::new(&path), size, opts.image_owner) {
            errors.push(config.node_error_at(n, "create", format!("cannot create {path:?}: {e}")));
            continue;
        }
        summary.created.push((n.spec.name.clone(), path, size));
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Outcome {
        state: next,
        waiting,
        summary,
    })
}

/// Adds a node of the file to `next` as AddNode would.
fn add_node(
    next: &mut State,
    index: usize,
    n: &ConfigNode,
    opts: Options,
    creations: &mut Vec<(usize, String, u64)>,
) -> Result<(), ApiError> {
    let spec = &n.spec;
    check_new_node(&next.graph, &next.sizes, spec)?;
    let probed = match image_chain(&next.graph, spec)? {
        Some(layers) if opts.fs => Some(probe_image(layers)?),
        _ if opts.fs => probe(index, n, creations)?,
        _ => None,
    };
    let size = new_node_size(next, spec, probed)?;
    next.graph.add(spec.clone())?;
    next.sizes.insert(spec.name.clone(), size);
    Ok(())
}

/// The filesystem checks of AddNode; an io_uring file marked `create` that
/// is missing is planned for creation (and has the size it will have).
fn probe(
    index: usize,
    n: &ConfigNode,
    creations: &mut Vec<(usize, String, u64)>,
) -> Result<Option<u64>, ApiError> {
    if let Some(Driver::IoUring(o)) = &n.spec.driver {
        let missing = matches!(
            std::fs::symlink_metadata(&o.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound
        );
        if missing {
            return match n.create {
                Some(size) => {
                    creations.push((index, o.path.clone(), size));
                    Ok(Some(size))
                }
                None => Err(invalid(
                    "node.io_uring.path",
                    format!(
                        "{:?} does not exist (add `create = {{ size = \"1G\" }}` to the \
                         node to have it created as a sparse file)",
                        o.path
                    ),
                )),
            };
        }
    }
    Ok(probe_node_paths(&n.spec)?)
}

/// Creates a sparse file of `size` bytes (and its directory), owned by
/// `owner` if given.
fn create_image(path: &Path, size: u64, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    let made = file.set_len(size).and_then(|()| match owner {
        Some((uid, gid)) => std::os::unix::fs::fchown(&file, Some(uid), Some(gid)),
        None => Ok(()),
    });
    if let Err(e) = made {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Changes node `current` in `next` into the file's (live, as UpdateNode
/// and ResizeNode do); `false` when they are the same.
fn change_node(
    next: &mut State,
    current: &NodeSpec,
    n: &ConfigNode,
    summary: &mut Summary,
    touched: &mut BTreeSet<String>,
) -> Result<bool, ApiError> {
    let name = &n.spec.name;
    let change = plan_change(current, &n.spec).map_err(|e| not_live(e, "node", name))?;
    let Some(change) = change else {
        return Ok(false);
    };
    if let Some((sized, changes)) = &change.update {
        let limits_changed = changes.iter().any(|c| c == "throttle limits");
        let mut specs = vec![(current.clone(), sized.clone())];
        if limits_changed {
            specs.extend(group_members_with(next, sized));
        }
        let replace: BTreeMap<String, NodeSpec> = specs
            .iter()
            .map(|(_, new)| (new.name.clone(), new.clone()))
            .collect();
        next.graph = replace_specs(&next.graph, &replace)?;
        for (_, new) in &specs {
            touched.insert(new.name.clone());
            if &new.name != name {
                summary.updated_nodes.push((
                    new.name.clone(),
                    vec![format!("throttle limits (group, via node {name:?})")],
                ));
            }
        }
        summary.updated_nodes.push((name.clone(), changes.clone()));
    }
    if let Some(size) = change.resize {
        let plan =
            reopen::plan_resize(next, name, size).map_err(|e| not_live(e.into(), "node", name))?;
        if let Some(plan) = plan {
            let replace: BTreeMap<String, NodeSpec> = plan
                .specs
                .iter()
                .map(|(_, new)| (new.name.clone(), new.clone()))
                .collect();
            next.graph = replace_specs(&next.graph, &replace)?;
            touched.extend(replace.keys().cloned());
            for (node, old, new) in reopen::recompute_sizes(next, &plan.bottom)? {
                touched.insert(node.clone());
                summary.resized_nodes.push((node, old, new));
            }
        }
    }
    Ok(true)
}

/// An export of the file against `next`: `None` when it exists with the
/// same settings, the normalized export when it is new (and passes
/// AddExport's checks against `scratch`, the state plus the file's new
/// exports so far), or why not.
fn check_export(
    next: &State,
    scratch: &mut State,
    e: &ConfigExport,
) -> Result<Option<VhostUserBlkExport>, ApiError> {
    let desired = validate_export(&e.export)?;
    if let Some(rec) = next.exports.get(&desired.id) {
        let cur = &rec.export;
        let differs: [(&str, String, String); 8] = [
            (
                "export.node",
                format!("{:?}", cur.node),
                format!("{:?}", desired.node),
            ),
            (
                "export.socket",
                format!("{:?}", cur.socket),
                format!("{:?}", desired.socket),
            ),
            (
                "export.num_queues",
                cur.num_queues.to_string(),
                desired.num_queues.to_string(),
            ),
            (
                "export.queue_size",
                cur.queue_size.to_string(),
                desired.queue_size.to_string(),
            ),
            (
                "export.logical_block_size",
                cur.logical_block_size.to_string(),
                desired.logical_block_size.to_string(),
            ),
            (
                "export.writable",
                cur.writable.to_string(),
                desired.writable.to_string(),
            ),
            (
                "export.serial",
                format!("{:?}", cur.serial),
                format!("{:?}", desired.serial),
            ),
            (
                "export.spread_queues",
                cur.spread_queues.to_string(),
                desired.spread_queues.to_string(),
            ),
        ];
        if let Some((field, is, wants)) = differs.into_iter().find(|(_, a, b)| a != b) {
            return Err(not_live(
                invalid(
                    field,
                    format!("cannot change live (is {is}, the file says {wants})"),
                ),
                "export",
                &desired.id,
            ));
        }
        return Ok(None);
    }
    let export = check_new_export(scratch, &desired)?;
    scratch.exports.insert(
        export.id.clone(),
        ExportRecord {
            export: export.clone(),
            queues: Vec::new(),
            generation: 0,
        },
    );
    Ok(Some(export))
}

#[cfg(test)]
mod tests;
