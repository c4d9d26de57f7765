//! The pure half of `UpdateNode` and `ResizeNode`: what an update changes
//! (and whether it may), how a resize walks down a node's chain, and the
//! sizes of a node and its ancestors afterwards. `control/nodes.rs` adds
//! locking, persistence, plan pushes and waiting.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};

use blkmesh_graph::kinds::{kind_of, Grow};
use blkmesh_graph::{Graph, GraphError, ObjectKind, SECTOR_SIZE};
use blkmesh_proto::v1::NodeSpec;

use crate::core::state::State;

pub(crate) use blkmesh_graph::update_changes;

/// `graph` with the specs in `replace` (by name) swapped in, checked by
/// the same rules as a loaded graph (validation, children, throttle groups).
pub(crate) fn replace_specs(
    graph: &Graph,
    replace: &BTreeMap<String, NodeSpec>,
) -> Result<Graph, GraphError> {
    Graph::from_specs(
        graph
            .iter()
            .map(|spec| replace.get(&spec.name).unwrap_or(spec).clone()),
    )
}

/// `nodes` and every node above them.
pub(crate) fn with_ancestors<'a>(
    graph: &'a Graph,
    nodes: impl IntoIterator<Item = &'a str>,
) -> BTreeSet<&'a str> {
    let mut above = BTreeSet::new();
    let mut stack: Vec<&str> = nodes.into_iter().collect();
    while let Some(name) = stack.pop() {
        if above.insert(name) {
            stack.extend(graph.users_of(name));
        }
    }
    above
}

/// The exports whose graph contains one of `nodes`, by id.
pub(crate) fn exports_over<'a>(
    state: &'a State,
    nodes: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let above = with_ancestors(&state.graph, nodes);
    state
        .exports
        .values()
        .filter(|r| above.contains(r.export.node.as_str()))
        .map(|r| r.export.id.clone())
        .collect()
}

/// The io_uring leaf at the bottom of a resize: its file is extended (or
/// its block device re-read) outside the manager's lock.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LeafGrow {
    /// The io_uring node.
    pub node: String,
    pub path: String,
    pub read_only: bool,
    /// Size in bytes it must have at least.
    pub size: u64,
}

/// What a resize changes: new specs (null and raw sizes) and possibly an
/// io_uring leaf to grow. `bottom` is the lowest node whose size changes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResizePlan {
    pub old_size: u64,
    /// Each changed node: (spec before, spec after).
    pub specs: Vec<(NodeSpec, NodeSpec)>,
    pub leaf: Option<LeafGrow>,
    pub bottom: String,
}

fn not_found(name: &str) -> GraphError {
    GraphError::NotFound {
        field: "name",
        kind: ObjectKind::Node,
        name: name.to_string(),
    }
}

/// Plans growing node `name` to `size` bytes (validated: a non-zero
/// multiple of 512). `None`: it already has that size.
pub(crate) fn plan_resize(
    state: &State,
    name: &str,
    size: u64,
) -> Result<Option<ResizePlan>, GraphError> {
    if !state.graph.contains(name) {
        return Err(not_found(name));
    }
    if let Some(why) = crate::core::zoned::resize_conflict(&state.graph, name) {
        return Err(GraphError::precondition("name", why));
    }
    let old_size = state.sizes.get(name).copied().unwrap_or(0);
    if size < old_size {
        return Err(GraphError::precondition(
            "size",
            format!(
                "node {name:?} is {old_size} bytes; it can only grow (got {size}); \
                 shrinking is not supported"
            ),
        ));
    }
    if size == old_size {
        return Ok(None);
    }
    let mut specs = Vec::new();
    let mut leaf = None;
    let mut cur = name.to_string();
    let mut target = size;
    let under = |cur: &str| {
        if cur == name {
            String::new()
        } else {
            format!(" (under node {name:?})")
        }
    };
    loop {
        let spec = state.graph.get(&cur).ok_or_else(|| not_found(&cur))?;
        let driver = spec
            .driver
            .as_ref()
            .ok_or_else(|| GraphError::invalid("node.driver", "must be set"))?;
        let kind = kind_of(driver);
        let child_size = kind
            .children()
            .first()
            .map_or(0, |c| state.sizes.get(*c).copied().unwrap_or(0));
        let at = format!("{cur:?}{}", under(&cur));
        let next_child = match kind.grow(target, child_size, &at)? {
            Grow::Options(driver) => {
                let mut new = spec.clone();
                new.driver = Some(driver);
                specs.push((spec.clone(), new));
                None
            }
            Grow::Child { child, size } => {
                target = size;
                Some(child)
            }
            Grow::File { path, read_only } => {
                leaf = Some(LeafGrow {
                    node: cur.clone(),
                    path,
                    read_only,
                    size: target,
                });
                None
            }
        };
        match next_child {
            // A child already big enough (sizes are kept consistent, so
            // only after an outside change) needs nothing.
            Some(child) if state.sizes.get(&child).copied().unwrap_or(0) >= target => break,
            Some(child) => cur = child,
            None => break,
        }
    }
    Ok(Some(ResizePlan {
        old_size,
        specs,
        leaf,
        bottom: cur,
    }))
}

/// Extends the regular file at `leaf.path` to at least `leaf.size` bytes,
/// or checks that the block device there has grown to at least that; returns
/// the new size in bytes (whole sectors).
pub(crate) fn grow_io_uring_path(leaf: &LeafGrow) -> Result<u64, GraphError> {
    const FIELD: &str = "name";
    let path = &leaf.path;
    let meta = std::fs::metadata(path).map_err(|e| {
        GraphError::precondition(
            FIELD,
            format!("node {:?}: cannot stat {path:?}: {e}", leaf.node),
        )
    })?;
    let ft = meta.file_type();
    let size = if ft.is_file() {
        if meta.len() < leaf.size {
            if leaf.read_only {
                return Err(GraphError::precondition(
                    FIELD,
                    format!(
                        "node {:?} is read-only: its file {path:?} is not extended",
                        leaf.node
                    ),
                ));
            }
            let f = OpenOptions::new().write(true).open(path).map_err(|e| {
                GraphError::precondition(
                    FIELD,
                    format!(
                        "node {:?}: cannot open {path:?} to extend it: {e}",
                        leaf.node
                    ),
                )
            })?;
            f.set_len(leaf.size).map_err(|e| {
                GraphError::precondition(
                    FIELD,
                    format!(
                        "node {:?}: cannot extend {path:?} to {} bytes: {e}",
                        leaf.node, leaf.size
                    ),
                )
            })?;
            f.sync_all().map_err(|e| {
                GraphError::precondition(
                    FIELD,
                    format!("node {:?}: cannot sync {path:?}: {e}", leaf.node),
                )
            })?;
        }
        std::fs::metadata(path)
            .map_err(|e| {
                GraphError::precondition(
                    FIELD,
                    format!("node {:?}: cannot stat {path:?}: {e}", leaf.node),
                )
            })?
            .len()
    } else {
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_block_device() {
            return Err(GraphError::precondition(
                FIELD,
                format!(
                    "node {:?}: {path:?} is no longer a regular file or block device",
                    leaf.node
                ),
            ));
        }
        let mut f = File::open(path).map_err(|e| {
            GraphError::precondition(
                FIELD,
                format!("node {:?}: cannot open {path:?}: {e}", leaf.node),
            )
        })?;
        let size = f.seek(SeekFrom::End(0)).map_err(|e| {
            GraphError::precondition(
                FIELD,
                format!("node {:?}: cannot get the size of {path:?}: {e}", leaf.node),
            )
        })?;
        if size < leaf.size {
            return Err(GraphError::precondition(
                "size",
                format!(
                    "node {:?}: block device {path:?} is {size} bytes, smaller than {}; \
                     grow the device first",
                    leaf.node, leaf.size
                ),
            ));
        }
        size
    };
    Ok(size - size % SECTOR_SIZE)
}

/// Recomputes the sizes of `bottom` and every node above it from their
/// children (io_uring and device leaves keep theirs). Returns the nodes
/// whose size changed: (name, old, new), bottom first.
pub(crate) fn recompute_sizes(
    state: &mut State,
    bottom: &str,
) -> Result<Vec<(String, u64, u64)>, GraphError> {
    let mut changed = Vec::new();
    let mut cur = Some(bottom.to_string());
    // At most one parent each and no cycles: the walk ends at a root.
    let mut steps = 0;
    while let Some(name) = cur {
        steps += 1;
        if steps > state.graph.len() + 1 {
            break;
        }
        let spec = state.graph.get(&name).ok_or_else(|| not_found(&name))?;
        let old = state.sizes.get(&name).copied().unwrap_or(0);
        let child_size = |child: &str| state.sizes.get(child).copied().unwrap_or(0);
        let new = match spec.driver.as_ref().map(kind_of) {
            None => old,
            Some(kind) => {
                let children = kind.children();
                let child = children.first().map_or(0, |c| child_size(c));
                // A leaf keeps the size known of its file or device.
                let known = children.is_empty().then_some(old);
                kind.size(child, known).map_err(|e| {
                    GraphError::precondition("size", format!("{} node {name:?}: {e}", kind.name()))
                })?
            }
        };
        if new != old {
            state.sizes.insert(name.clone(), new);
            changed.push((name.clone(), old, new));
        }
        cur = state.graph.users_of(&name).first().map(|s| s.to_string());
    }
    Ok(changed)
}

#[cfg(test)]
mod tests;
