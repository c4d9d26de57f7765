//! Opening an export's node graph.
//!
//! The plan names a root node and carries its whole subtree. Opening walks it
//! from the root: format nodes (`raw`) narrow a byte window, and the protocol
//! leaf (`io_uring` through libblkio, or `null`) does the I/O. Limits propagate
//! from the leaf up to the export, as QEMU's refresh_limits does: a
//! fault-injection node's `max_transfer` / `max_segments` / `buf_alignment`
//! knobs make them stricter (the smallest non-zero maximum, the largest
//! alignment). The queue loop splits or bounces requests that break them
//! (see `split.rs`), so the limits are a promise to the frontend, not a
//! condition for success.
//!
//! A `qcow2` node is a format stage over its file, an io_uring leaf (see
//! `qcow2.rs`); its backing chain is opened through imago alone, each
//! layer as the plan names it.
//!
//! Zones propagate the same way (see `zoned/`): a `zoned` node emulates a
//! host-managed device over its regular child (whole zones of the child
//! only), an `io_uring` leaf on a Linux zoned block device is passed
//! through; raw windows above must be zone-aligned and filters pass zone
//! operations through. The export's [`Limits::zones`] says what it sees
//! (model NONE for a regular graph), and a zoned graph takes no discard.

mod blkio;
mod builder;
mod limits;
mod qcow2;
mod types;
mod zones;

use std::collections::HashMap;

use blkmesh_proto::v1::{node_spec::Driver, ExportPlan, NodeSpec};

use self::blkio::BlkioLeaf;
use self::builder::GraphBuilder;
pub use self::types::{
    Leaf, OpenedGraph, QueuePool, ZoneAccess, DEFAULT_MAX_APPEND, MAX_REPORT_ZONES,
};
pub use crate::errno::OpenError;

/// Deepest graph accepted (guards against cycles in a hostile plan).
const MAX_DEPTH: usize = 16;

/// Opens the plan's graph.
pub fn open(plan: &ExportPlan) -> Result<OpenedGraph, OpenError> {
    let export = plan
        .export
        .as_ref()
        .ok_or_else(|| OpenError::inval("plan has no export"))?;
    // The manager validated the plan; the worker trusts no plan it did
    // not check (its arithmetic relies on these bounds).
    for node in &plan.nodes {
        blkmesh_graph::validate_node(node)
            .map_err(|e| OpenError::inval(format!("node {:?}: {e}", node.name)))?;
    }
    let nodes: HashMap<&str, &NodeSpec> = plan.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let lbs = match export.logical_block_size {
        0 => 512,
        v @ (512 | 4096) => v,
        v => {
            return Err(OpenError::inval(format!(
                "logical block size {v} is not 512 or 4096"
            )))
        }
    };
    let num_queues = export.num_queues.clamp(1, 64);

    // Walk down from the root, collecting stages and narrowing the window.
    let mut graph = GraphBuilder::new(lbs, num_queues, !export.writable);
    let mut name = export.node.as_str();
    for _ in 0..MAX_DEPTH {
        let node = nodes
            .get(name)
            .ok_or_else(|| OpenError::inval(format!("plan lacks node {name}")))?;
        name = match &node.driver {
            Some(Driver::Raw(raw)) => graph.raw(name, raw)?,
            Some(Driver::Zoned(z)) => graph.zoned(name, z)?,
            Some(Driver::Qcow2(q)) => graph.qcow2(&nodes, node, q)?,
            Some(Driver::Throttle(t)) => graph.throttle(name, t)?,
            Some(Driver::FaultInjection(f)) => graph.fault_injection(name, f)?,
            leaf => {
                let found = match blkio_leaf(leaf) {
                    Some(blkio) => graph.blkio(name, blkio)?,
                    None => match leaf {
                        Some(Driver::Null(opts)) => graph.null(name, opts)?,
                        _ => return Err(OpenError::inval(format!("node {name} has no driver"))),
                    },
                };
                return graph.finish(found, export);
            }
        };
    }
    Err(OpenError::inval("graph deeper than 16 nodes (a cycle?)"))
}

/// How a libblkio protocol leaf is opened; `None` for other drivers.
fn blkio_leaf(driver: &Option<Driver>) -> Option<BlkioLeaf<'_>> {
    let (driver, path, direct, read_only) = match driver {
        Some(Driver::IoUring(o)) => ("io_uring", &o.path, Some(o.direct), o.read_only),
        Some(Driver::NvmeIoUring(o)) => ("nvme-io_uring", &o.path, None, o.read_only),
        Some(Driver::VirtioBlkVhostUser(o)) => {
            ("virtio-blk-vhost-user", &o.path, None, o.read_only)
        }
        Some(Driver::VirtioBlkVhostVdpa(o)) => {
            ("virtio-blk-vhost-vdpa", &o.path, None, o.read_only)
        }
        _ => return None,
    };
    Some(BlkioLeaf {
        driver,
        path,
        direct,
        read_only,
    })
}

#[cfg(test)]
use self::{builder::serial, zones::max_append};

#[cfg(test)]
mod tests;
