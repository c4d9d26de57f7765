//! Zoned nodes as the manager sees them: the rules a graph with a `zoned`
//! node must follow (the graph rules are the schema crate's,
//! `blkmesh_graph::kinds::zoned`, applied here to the state), the zone
//! geometry a node shows its parent (`NodeInfo.zones`), and the placement
//! rule (one worker per export).
//!
//! A `zoned` node emulates a host-managed zoned device over a regular child:
//! its size is the child's in whole zones; raw windows, throttles and
//! fault-injection nodes above it pass the zones through (a raw window must
//! cover whole zones). The zone conditions and write pointers live in the
//! worker that opened the graph (and in the node's metadata file), so:
//!
//! - a zoned node cannot sit over another zoned node, and two nodes never
//!   share a metadata file (nor is it the file of an io_uring node);
//! - an export whose graph contains a zoned node keeps all its queues on one
//!   worker (no `spread_queues`, no MoveQueue splitting them; MoveNode, Drain
//!   and lost-worker reassignment move them together), and no other export's
//!   graph overlaps its graph (shares its zoned node, or a node under it);
//! - the zone layout is fixed: UpdateNode changes no zoned option and
//!   ResizeNode refuses zoned nodes and the nodes under and over them.
//!
//! What the manager reports as the geometry (see [`zone_info`]) is what it
//! knows without opening the graph; the worker's `Limits.zones` must agree.

use std::collections::BTreeMap;
use std::path::Path;

use blkmesh_graph::kinds::kind_of;
use blkmesh_graph::kinds::zoned;
use blkmesh_graph::{Graph, GraphError};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeSpec, VhostUserBlkExport, ZoneInfo, ZoneModel, ZonedOptions};

pub(crate) use blkmesh_graph::kinds::zoned::{check_structure, zoned_in_graph};

use crate::core::state::State;

/// `ZoneInfo.write_granularity` the manager reports: the sector size. The
/// export's logical block size is not known at node level (a node can be
/// exported with 512 or 4096); the frontend reports the export's own.
pub(crate) const ZONE_WRITE_GRANULARITY: u32 = 512;

/// Largest zone append of an emulated zoned node (clamped to the zone
/// capacity, and to a fault-injection node's `max_transfer` above it). The
/// worker must report the same in `Limits.zones.max_append`.
pub(crate) const ZONE_MAX_APPEND: u64 = 1 << 20;

/// The writable bytes of each zone (`zone_capacity` 0 = the zone size).
pub(crate) fn zone_capacity(o: &ZonedOptions) -> u64 {
    if o.zone_capacity == 0 {
        o.zone_size
    } else {
        o.zone_capacity
    }
}

fn nr_zones(size: u64, zone_size: u64) -> u32 {
    match zone_size {
        0 => 0,
        zs => u32::try_from(size / zs).unwrap_or(u32::MAX),
    }
}

/// The zone geometry node `name` shows its parent (`NodeInfo.zones`), from
/// the specs and the sizes the manager knows; `None` when it is not zoned.
///
/// - a zoned node: HOST_MANAGED, its zone size, capacity (0 resolved to the
///   zone size), limits, `nr_zones` = size / zone size (0 while its child's
///   size is unknown), write granularity [`ZONE_WRITE_GRANULARITY`], max
///   append [`ZONE_MAX_APPEND`] clamped to the capacity;
/// - a raw window: its child's, with `nr_zones` of the window;
/// - a throttle: its child's;
/// - a fault-injection node: its child's, with max append clamped to its
///   `max_transfer` (an append cannot be split);
/// - anything else: `None`.
pub(crate) fn zone_info(
    graph: &Graph,
    sizes: &BTreeMap<String, u64>,
    name: &str,
) -> Option<ZoneInfo> {
    // The chain from `name` down to its zone source.
    let mut chain: Vec<&NodeSpec> = Vec::new();
    let mut cur = name;
    let source = loop {
        if chain.len() > graph.len() {
            return None;
        }
        let spec = graph.get(cur)?;
        // Through single-child nodes, as `zone_source` walks.
        match &spec.driver {
            Some(Driver::Zoned(o)) => break o,
            Some(driver) => cur = kind_of(driver).children().first().copied()?,
            None => return None,
        }
        chain.push(spec);
    };
    let source_name = cur;
    let size_of = |n: &str| sizes.get(n).copied().unwrap_or(0);
    let capacity = zone_capacity(source);
    let mut info = ZoneInfo {
        model: ZoneModel::HostManaged as i32,
        zone_size: source.zone_size,
        zone_capacity: capacity,
        nr_zones: nr_zones(size_of(source_name), source.zone_size),
        max_open_zones: source.max_open_zones,
        max_active_zones: source.max_active_zones,
        write_granularity: ZONE_WRITE_GRANULARITY,
        max_append: ZONE_MAX_APPEND.min(capacity),
    };
    // Bottom-up, as the worker narrows its limits.
    for spec in chain.iter().rev() {
        match &spec.driver {
            Some(Driver::Raw(_)) => info.nr_zones = nr_zones(size_of(&spec.name), info.zone_size),
            Some(Driver::FaultInjection(o)) if o.max_transfer != 0 => {
                info.max_append = info.max_append.min(o.max_transfer);
            }
            _ => {}
        }
    }
    Some(info)
}

/// What AddNode checks for `spec` (not yet in `state`): the graph rules of
/// zoned nodes, and that a zoned node over a child of known size has at
/// least one zone and at most [`MAX_ZONES`](blkmesh_graph::kinds::zoned::MAX_ZONES).
pub(crate) fn check_add(state: &State, spec: &NodeSpec) -> Result<(), GraphError> {
    zoned::check_add(&state.graph, &state.sizes, spec)
}

/// Checks the zoned rules of a loaded state (as AddNode and AddExport
/// would have): every node's structure, no spread export over a zoned
/// node, no zoned node in two exports' graphs.
pub(crate) fn check_state(state: &State) -> Result<(), String> {
    for spec in state.graph.iter() {
        check_structure(&state.graph, spec).map_err(|e| format!("node {:?}: {e}", spec.name))?;
    }
    for rec in state.exports.values() {
        if let Some(zoned) = zoned_in_graph(&state.graph, &rec.export.node) {
            if rec.export.spread_queues {
                return Err(format!(
                    "export {:?}: spreads its queues over zoned node {zoned:?}",
                    rec.export.id
                ));
            }
        }
        if let Some((other, zoned)) = zoned_overlap(state, &rec.export.node, &rec.export.id) {
            return Err(format!(
                "export {:?}: its graph overlaps the graph of export {other:?} over zoned node \
                 {zoned:?}",
                rec.export.id
            ));
        }
    }
    Ok(())
}

/// Another export than `except` whose graph overlaps the graph rooted at
/// `root` over a zoned node: (that export, the zoned node); see
/// [`zoned::zoned_overlap`].
pub(crate) fn zoned_overlap<'a>(
    state: &'a State,
    root: &str,
    except: &str,
) -> Option<(&'a str, &'a str)> {
    let exports: Vec<&VhostUserBlkExport> = state.exports.values().map(|r| &r.export).collect();
    zoned::zoned_overlap(&state.graph, &exports, root, except)
}

/// Why node `name` cannot be resized: it is zoned, or under or over a
/// zoned node (the zone layout is fixed). `None`: no zoned node involved.
pub(crate) fn resize_conflict(graph: &Graph, name: &str) -> Option<String> {
    let spec = graph.get(name)?;
    if matches!(spec.driver, Some(Driver::Zoned(_))) {
        return Some(format!(
            "node {name:?} is zoned: a zoned node cannot be resized (its zone layout is fixed)"
        ));
    }
    if let Some(below) = zoned_in_graph(graph, name) {
        return Some(format!(
            "node {name:?} is over zoned node {below:?}: nodes over a zoned node cannot be \
             resized (the zone layout is fixed)"
        ));
    }
    let mut cur = name;
    for _ in 0..=graph.len() {
        let Some(parent) = graph.users_of(cur).first().copied() else {
            break;
        };
        if matches!(
            graph.get(parent).and_then(|s| s.driver.as_ref()),
            Some(Driver::Zoned(_))
        ) {
            return Some(format!(
                "node {name:?} is under zoned node {parent:?}: the child of a zoned node \
                 cannot be resized (the zone layout is fixed)"
            ));
        }
        cur = parent;
    }
    None
}

/// Checks the metadata path of a zoned node on the manager's host: its
/// directory must exist and the path, if it exists, must be a regular file
/// (the worker creates it when missing). Errors name `field`
/// (`node.zoned.metadata_path`).
pub(crate) fn probe_metadata_path(field: &'static str, path: &str) -> Result<(), GraphError> {
    let p = Path::new(path);
    match std::fs::metadata(p) {
        Ok(meta) if meta.is_file() => return Ok(()),
        Ok(_) => {
            return Err(GraphError::invalid(
                field,
                format!("{path:?} exists and is not a regular file"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(GraphError::invalid(
                field,
                format!("cannot stat {path:?}: {e}"),
            ))
        }
    }
    let dir = p.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(GraphError::invalid(
            field,
            format!("{} is not a directory", dir.display()),
        )),
        Err(e) => Err(GraphError::invalid(
            field,
            format!("directory {} of {path:?}: {e}", dir.display()),
        )),
    }
}

#[cfg(test)]
mod tests;
