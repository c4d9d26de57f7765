//! `zoned`: emulates a host-managed zoned device over a regular child,
//! and the graph rules a zoned node imposes (the manager's
//! `core/zoned.rs` has the geometry it reports and the placement rule).
//!
//! Its size is the child's in whole zones; raw windows, throttles and
//! fault-injection nodes above it pass the zones through (a raw window must
//! cover whole zones). The zone conditions and write pointers live in the
//! worker that opened the graph (and in the node's metadata file), so a
//! zoned node cannot sit over another zoned node, two nodes never share a
//! metadata file (nor is it the file of an io_uring node), and no two
//! exports' graphs overlap over a zoned node.

use std::collections::BTreeMap;
use std::path::Path;

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeSpec, VhostUserBlkExport, ZonedOptions};

use crate::error::GraphError;
use crate::fields::{validate_abs_path, validate_child, MAX_PATH_LEN};
use crate::graph::Graph;
use crate::kinds::{kind_of, other_kind, Grow, HostPath, NodeKind, PathKind};

/// Smallest emulated zone.
pub const MIN_ZONE_SIZE: u64 = 64 * 1024;

/// Most zones of an emulated zoned node: the worker's limit (it keeps a
/// record per zone in memory and in the metadata file).
pub const MAX_ZONES: u64 = 1 << 20;

impl NodeKind for ZonedOptions {
    fn name(&self) -> &'static str {
        "zoned"
    }

    fn children(&self) -> Vec<&str> {
        vec![self.child.as_str()]
    }

    fn child_field(&self) -> &'static str {
        "node.zoned.child"
    }

    fn summary(&self) -> String {
        format!("zoned over {}", self.child)
    }

    fn validate(&self, node: &str) -> Result<(), GraphError> {
        validate_zoned(node, self)
    }

    /// The zone metadata file (the worker creates it when missing).
    fn host_path(&self) -> Option<HostPath<'_>> {
        Some(HostPath {
            field: "node.zoned.metadata_path",
            path: &self.metadata_path,
            kind: PathKind::NewOrRegularFile,
        })
    }

    fn size(&self, child_size: u64, _probed: Option<u64>) -> Result<u64, GraphError> {
        Ok(zoned_size(self, child_size))
    }

    /// Its zone state is one worker's, its metadata file locked.
    fn exclusive(&self) -> bool {
        true
    }

    /// Never: the zone layout is fixed (the manager refuses resizing a
    /// zoned node, and the nodes under and over it, before asking).
    fn grow(&self, _size: u64, _child_size: u64, at: &str) -> Result<Grow, GraphError> {
        Err(GraphError::precondition(
            "name",
            format!("node {at} is zoned: it cannot be resized"),
        ))
    }

    /// Nothing changes: every zoned option is fixed ([`update_conflict`]).
    fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError> {
        let Driver::Zoned(b) = new else {
            return Err(other_kind(self, new));
        };
        update_conflict(self, b)?;
        Ok(Vec::new())
    }
}

fn validate_zoned(node: &str, o: &ZonedOptions) -> Result<(), GraphError> {
    validate_child("node.zoned.child", &o.child, node)?;
    if o.zone_size < MIN_ZONE_SIZE || !o.zone_size.is_power_of_two() {
        return Err(GraphError::invalid(
            "node.zoned.zone_size",
            format!(
                "must be a power of two of at least {MIN_ZONE_SIZE} bytes (got {})",
                o.zone_size
            ),
        ));
    }
    if o.zone_capacity % 4096 != 0 || o.zone_capacity > o.zone_size {
        return Err(GraphError::invalid(
            "node.zoned.zone_capacity",
            format!(
                "must be a multiple of 4096 of at most zone_size {} (got {}; 0 = zone_size)",
                o.zone_size, o.zone_capacity
            ),
        ));
    }
    if o.max_active_zones != 0 && o.max_open_zones > o.max_active_zones {
        return Err(GraphError::invalid(
            "node.zoned.max_open_zones",
            format!(
                "must not exceed max_active_zones {} (got {})",
                o.max_active_zones, o.max_open_zones
            ),
        ));
    }
    if o.max_open_zones == 0 && o.max_active_zones != 0 {
        return Err(GraphError::invalid(
            "node.zoned.max_open_zones",
            "must be set (at most max_active_zones) when max_active_zones is",
        ));
    }
    validate_abs_path("node.zoned.metadata_path", &o.metadata_path, MAX_PATH_LEN)
}

/// The zoned node whose zones `name` shows: `name` itself, or the zoned node
/// under its chain of single-child nodes (raw windows and filters). `None`:
/// `name` is not zoned.
pub fn zone_source<'a>(graph: &'a Graph, name: &str) -> Option<&'a NodeSpec> {
    let mut cur = name;
    // Each node has at most one parent and there are no cycles, but stay
    // bounded on any graph.
    for _ in 0..=graph.len() {
        let spec = graph.get(cur)?;
        let driver = spec.driver.as_ref()?;
        if matches!(driver, Driver::Zoned(_)) {
            return Some(spec);
        }
        cur = kind_of(driver).children().first().copied()?;
    }
    None
}

/// Size of a zoned node over a child of `child_size` bytes: the child in
/// whole zones (0 when the child's size is not known).
pub fn zoned_size(o: &ZonedOptions, child_size: u64) -> u64 {
    match o.zone_size {
        0 => 0,
        zs => child_size / zs * zs,
    }
}

/// The first zoned node (by depth-first order) in the graph rooted at `root`.
pub fn zoned_in_graph<'a>(graph: &'a Graph, root: &str) -> Option<&'a str> {
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
pub fn check_structure(graph: &Graph, spec: &NodeSpec) -> Result<(), GraphError> {
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
        // No other kind shares a file with a zoned node or cuts its zones;
        // a single-child kind passes them through (`zone_source`).
        _ => {}
    }
    Ok(())
}

/// What AddNode checks for `spec` (not yet in `graph`, whose nodes have
/// `sizes`): [`check_structure`],
/// and that a zoned node over a child of known size has at least one zone
/// and at most [`MAX_ZONES`].
pub fn check_add(
    graph: &Graph,
    sizes: &BTreeMap<String, u64>,
    spec: &NodeSpec,
) -> Result<(), GraphError> {
    check_structure(graph, spec)?;
    if let Some(Driver::Zoned(o)) = &spec.driver {
        let child_size = sizes.get(&o.child).copied().unwrap_or(0);
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

/// Another export than `except` whose graph overlaps the graph rooted at
/// `root` (graphs are trees: one then contains the other's root) when the
/// larger of the two contains a zoned node: (that export, the zoned node).
/// Such a pair would let two exports, possibly on two workers, drive one
/// zone state (or one of them write under it).
pub fn zoned_overlap<'a>(
    graph: &'a Graph,
    exports: &[&'a VhostUserBlkExport],
    root: &str,
    except: &str,
) -> Option<(&'a str, &'a str)> {
    for export in exports.iter().filter(|e| e.id != except) {
        let other = export.node.as_str();
        let larger = if in_graph(graph, root, other) {
            root
        } else if in_graph(graph, other, root) {
            other
        } else {
            continue;
        };
        if let Some(zoned) = zoned_in_graph(graph, larger) {
            return Some((&export.id, zoned));
        }
    }
    None
}

/// Why UpdateNode cannot take `new` over `old` (both zoned): every zoned
/// option is fixed. `Ok` when nothing changes.
pub fn update_conflict(old: &ZonedOptions, new: &ZonedOptions) -> Result<(), GraphError> {
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
