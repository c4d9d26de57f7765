//! Zoned nodes as the manager sees them: the rules a graph with a `zoned`
//! node must follow, the zone geometry a node shows its parent
//! (`NodeInfo.zones`), and the placement rule (one worker per export).
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

use blkmesh_graph::{Graph, GraphError};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeSpec, ZoneInfo, ZoneModel, ZonedOptions};

use crate::core::state::State;

/// `ZoneInfo.write_granularity` the manager reports: the sector size. The
/// export's logical block size is not known at node level (a node can be
/// exported with 512 or 4096); the frontend reports the export's own.
pub(crate) const ZONE_WRITE_GRANULARITY: u32 = 512;

/// Most zones of an emulated zoned node: the worker's limit (it keeps a
/// record per zone in memory and in the metadata file).
pub(crate) const MAX_ZONES: u64 = 1 << 20;

/// Largest zone append of an emulated zoned node (clamped to the zone
/// capacity, and to a fault-injection node's `max_transfer` above it). The
/// worker must report the same in `Limits.zones.max_append`.
pub(crate) const ZONE_MAX_APPEND: u64 = 1 << 20;

/// The zoned node whose zones `name` shows: `name` itself, or the zoned node
/// under its chain of raw windows and filters. `None`: `name` is not zoned.
pub(crate) fn zone_source<'a>(graph: &'a Graph, name: &str) -> Option<&'a NodeSpec> {
    let mut cur = name;
    // Each node has at most one parent and there are no cycles, but stay
    // bounded on any graph.
    for _ in 0..=graph.len() {
        let spec = graph.get(cur)?;
        cur = match &spec.driver {
            Some(Driver::Zoned(_)) => return Some(spec),
            Some(Driver::Raw(o)) => &o.child,
            Some(Driver::Throttle(o)) => &o.child,
            Some(Driver::FaultInjection(o)) => &o.child,
            None
            | Some(Driver::IoUring(_))
            | Some(Driver::Null(_))
            | Some(Driver::NvmeIoUring(_))
            | Some(Driver::VirtioBlkVhostUser(_))
            | Some(Driver::VirtioBlkVhostVdpa(_)) => return None,
        };
    }
    None
}

/// Size of a zoned node over a child of `child_size` bytes: the child in
/// whole zones (0 when the child's size is not known).
pub(crate) fn zoned_size(o: &ZonedOptions, child_size: u64) -> u64 {
    match o.zone_size {
        0 => 0,
        zs => child_size / zs * zs,
    }
}

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
        match &spec.driver {
            Some(Driver::Zoned(o)) => break o,
            Some(Driver::Raw(o)) => cur = &o.child,
            Some(Driver::Throttle(o)) => cur = &o.child,
            Some(Driver::FaultInjection(o)) => cur = &o.child,
            _ => return None,
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

/// The first zoned node (by depth-first order) in the graph rooted at `root`.
pub(crate) fn zoned_in_graph<'a>(graph: &'a Graph, root: &str) -> Option<&'a str> {
    let mut stack = vec![root];
    let mut steps = 0;
    while let Some(name) = stack.pop() {
        steps += 1;
        if steps > graph.len() + 1 {
            return None;
        }
        let spec = graph.get(name)?;
        if matches!(spec.driver, Some(Driver::Zoned(_))) {
            return Some(&spec.name);
        }
        stack.extend(graph.children_of(name));
    }
    None
}

/// Whether node `node` is in the graph rooted at `root`.
fn in_graph(graph: &Graph, root: &str, node: &str) -> bool {
    let mut cur = node;
    for _ in 0..=graph.len() {
        if cur == root {
            return true;
        }
        match graph.users_of(cur).first() {
            Some(parent) => cur = parent,
            None => return false,
        }
    }
    false
}

fn same_path(a: &str, b: &str) -> bool {
    // Lexical: `//` and `/./` do not matter; symlinks are not resolved.
    Path::new(a) == Path::new(b)
}

/// The graph rules of zoned nodes for `spec` in `graph` (which may already
/// contain it): a zoned node is not over another zoned node and has a
/// metadata file of its own; an io_uring node's file is no zone metadata
/// file; a raw window over a zoned node covers whole zones.
pub(crate) fn check_structure(graph: &Graph, spec: &NodeSpec) -> Result<(), GraphError> {
    match &spec.driver {
        Some(Driver::Zoned(o)) => {
            if let Some(below) = zone_source(graph, &o.child) {
                let what = if below.name == o.child {
                    format!("node {:?} is zoned", o.child)
                } else {
                    format!("node {:?} is over zoned node {:?}", o.child, below.name)
                };
                return Err(GraphError::invalid(
                    "node.zoned.child",
                    format!("{what}; a zoned node cannot be stacked on another zoned node"),
                ));
            }
            for other in graph.iter().filter(|s| s.name != spec.name) {
                match &other.driver {
                    Some(Driver::Zoned(x)) if same_path(&x.metadata_path, &o.metadata_path) => {
                        return Err(GraphError::Duplicate {
                            field: "node.zoned.metadata_path",
                            problem: format!(
                                "{:?} is already the zone metadata file of zoned node {:?}",
                                o.metadata_path, other.name
                            ),
                        });
                    }
                    Some(Driver::IoUring(x)) if same_path(&x.path, &o.metadata_path) => {
                        return Err(GraphError::Duplicate {
                            field: "node.zoned.metadata_path",
                            problem: format!(
                                "{:?} is the file of io_uring node {:?}",
                                o.metadata_path, other.name
                            ),
                        });
                    }
                    _ => {}
                }
            }
        }
        Some(Driver::IoUring(o)) => {
            let zoned = graph.iter().find(|other| {
                matches!(&other.driver, Some(Driver::Zoned(x)) if same_path(&x.metadata_path, &o.path))
            });
            if let Some(other) = zoned {
                return Err(GraphError::Duplicate {
                    field: "node.io_uring.path",
                    problem: format!(
                        "{:?} is the zone metadata file of zoned node {:?}",
                        o.path, other.name
                    ),
                });
            }
        }
        Some(Driver::Raw(o)) => {
            let source = zone_source(graph, &o.child);
            if let Some((source, Some(Driver::Zoned(z)))) = source.map(|s| (&s.name, &s.driver)) {
                let zs = z.zone_size;
                if zs != 0 && o.offset % zs != 0 {
                    return Err(GraphError::invalid(
                        "node.raw.offset",
                        format!(
                            "must be a multiple of the zone size {zs} of zoned node {source:?} \
                             (got {})",
                            o.offset
                        ),
                    ));
                }
                if zs != 0 && o.size % zs != 0 {
                    return Err(GraphError::invalid(
                        "node.raw.size",
                        format!(
                            "must be 0 (to the end) or a multiple of the zone size {zs} of \
                             zoned node {source:?} (got {})",
                            o.size
                        ),
                    ));
                }
            }
        }
        None
        | Some(Driver::Null(_))
        | Some(Driver::NvmeIoUring(_))
        | Some(Driver::VirtioBlkVhostUser(_))
        | Some(Driver::VirtioBlkVhostVdpa(_))
        | Some(Driver::Throttle(_))
        | Some(Driver::FaultInjection(_)) => {}
    }
    Ok(())
}

/// What AddNode checks for `spec` (not yet in `state`): [`check_structure`],
/// and that a zoned node over a child of known size has at least one zone
/// and at most [`MAX_ZONES`].
pub(crate) fn check_add(state: &State, spec: &NodeSpec) -> Result<(), GraphError> {
    check_structure(&state.graph, spec)?;
    if let Some(Driver::Zoned(o)) = &spec.driver {
        let child_size = state.sizes.get(&o.child).copied().unwrap_or(0);
        if child_size != 0 && o.zone_size != 0 {
            if child_size < o.zone_size {
                return Err(GraphError::invalid(
                    "node.zoned.zone_size",
                    format!(
                        "must not exceed the size of child {:?} ({child_size} bytes), or the \
                         node has no zone (got {})",
                        o.child, o.zone_size
                    ),
                ));
            }
            if child_size / o.zone_size > MAX_ZONES {
                return Err(GraphError::invalid(
                    "node.zoned.zone_size",
                    format!(
                        "child {:?} of {child_size} bytes would have more than {} zones of {} \
                         bytes; use larger zones",
                        o.child, MAX_ZONES, o.zone_size
                    ),
                ));
            }
        }
    }
    Ok(())
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
/// `root` (graphs are trees: one then contains the other's root) when the
/// larger of the two contains a zoned node: (that export, the zoned node).
/// Such a pair would let two exports, possibly on two workers, drive one
/// zone state (or one of them write under it).
pub(crate) fn zoned_overlap<'a>(
    state: &'a State,
    root: &str,
    except: &str,
) -> Option<(&'a str, &'a str)> {
    for rec in state.exports.values().filter(|r| r.export.id != except) {
        let other = rec.export.node.as_str();
        let larger = if in_graph(&state.graph, root, other) {
            root
        } else if in_graph(&state.graph, other, root) {
            other
        } else {
            continue;
        };
        if let Some(zoned) = zoned_in_graph(&state.graph, larger) {
            return Some((&rec.export.id, zoned));
        }
    }
    None
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

/// Why UpdateNode cannot take `new` over `old` (both zoned): every zoned
/// option is fixed. `Ok` when nothing changes.
pub(crate) fn update_conflict(old: &ZonedOptions, new: &ZonedOptions) -> Result<(), GraphError> {
    let fixed = |field: &'static str, is: String, got: String| {
        Err(GraphError::invalid(
            field,
            format!(
                "cannot be changed by UpdateNode (is {is}, got {got}): the zone layout of a \
                 zoned node is fixed; add a new node instead"
            ),
        ))
    };
    if old.child != new.child {
        return fixed(
            "node.zoned.child",
            format!("{:?}", old.child),
            format!("{:?}", new.child),
        );
    }
    if old.zone_size != new.zone_size {
        return fixed(
            "node.zoned.zone_size",
            old.zone_size.to_string(),
            new.zone_size.to_string(),
        );
    }
    if old.zone_capacity != new.zone_capacity {
        return fixed(
            "node.zoned.zone_capacity",
            old.zone_capacity.to_string(),
            new.zone_capacity.to_string(),
        );
    }
    if old.max_open_zones != new.max_open_zones {
        return fixed(
            "node.zoned.max_open_zones",
            old.max_open_zones.to_string(),
            new.max_open_zones.to_string(),
        );
    }
    if old.max_active_zones != new.max_active_zones {
        return fixed(
            "node.zoned.max_active_zones",
            old.max_active_zones.to_string(),
            new.max_active_zones.to_string(),
        );
    }
    if old.metadata_path != new.metadata_path {
        return fixed(
            "node.zoned.metadata_path",
            format!("{:?}", old.metadata_path),
            format!("{:?}", new.metadata_path),
        );
    }
    Ok(())
}

/// Checks the metadata path of a zoned node on the manager's host: its
/// directory must exist and the path, if it exists, must be a regular file
/// (the worker creates it when missing). Errors name
/// `node.zoned.metadata_path`.
pub(crate) fn probe_metadata_path(path: &str) -> Result<(), GraphError> {
    const FIELD: &str = "node.zoned.metadata_path";
    let p = Path::new(path);
    match std::fs::metadata(p) {
        Ok(meta) if meta.is_file() => return Ok(()),
        Ok(_) => {
            return Err(GraphError::invalid(
                FIELD,
                format!("{path:?} exists and is not a regular file"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(GraphError::invalid(
                FIELD,
                format!("cannot stat {path:?}: {e}"),
            ))
        }
    }
    let dir = p.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(GraphError::invalid(
            FIELD,
            format!("{} is not a directory", dir.display()),
        )),
        Err(e) => Err(GraphError::invalid(
            FIELD,
            format!("directory {} of {path:?}: {e}", dir.display()),
        )),
    }
}

#[cfg(test)]
mod tests;
