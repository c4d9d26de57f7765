//! Exports: the checks of an export's own fields, with its defaults, and
//! of a new export against the nodes and the other exports.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::VhostUserBlkExport;

use crate::error::{GraphError, ObjectKind};
use crate::fields::{validate_name, validate_socket_path};
use crate::graph::Graph;
use crate::kinds::qcow2::{backing_conflict, writable_qcow2_in_graph};
use crate::kinds::zoned::{zoned_in_graph, zoned_overlap};

/// Most virtqueues per export.
pub const MAX_NUM_QUEUES: u32 = 64;
/// Default number of virtqueues.
pub const DEFAULT_NUM_QUEUES: u32 = 1;
/// Smallest virtqueue size.
pub const MIN_QUEUE_SIZE: u32 = 64;
/// Largest virtqueue size.
pub const MAX_QUEUE_SIZE: u32 = 1024;
/// Default virtqueue size.
pub const DEFAULT_QUEUE_SIZE: u32 = 256;
/// Default logical block size.
pub const DEFAULT_LOGICAL_BLOCK_SIZE: u32 = 512;
/// Longest GET_ID serial (virtio-blk `VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;

/// Checks an export's fields and returns it with defaults applied:
/// `num_queues` 0 → 1, `queue_size` 0 → 256, `logical_block_size` 0 → 512,
/// empty `serial` → the export id (cut to 20 bytes).
pub fn validate_export(e: &VhostUserBlkExport) -> Result<VhostUserBlkExport, GraphError> {
    validate_name("export.id", &e.id)?;
    validate_name("export.node", &e.node)?;
    validate_socket_path("export.socket", &e.socket)?;

    let num_queues = match e.num_queues {
        0 => DEFAULT_NUM_QUEUES,
        n if n <= MAX_NUM_QUEUES => n,
        n => {
            return Err(GraphError::invalid(
                "export.num_queues",
                format!("must be 1-{MAX_NUM_QUEUES} (got {n})"),
            ))
        }
    };
    let queue_size = match e.queue_size {
        0 => DEFAULT_QUEUE_SIZE,
        n if n.is_power_of_two() && (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&n) => n,
        n => {
            return Err(GraphError::invalid(
                "export.queue_size",
                format!("must be a power of two in {MIN_QUEUE_SIZE}..={MAX_QUEUE_SIZE} (got {n})"),
            ))
        }
    };
    let logical_block_size = match e.logical_block_size {
        0 => DEFAULT_LOGICAL_BLOCK_SIZE,
        n @ (512 | 4096) => n,
        n => {
            return Err(GraphError::invalid(
                "export.logical_block_size",
                format!("must be 512 or 4096 (got {n})"),
            ))
        }
    };
    let serial = if e.serial.is_empty() {
        // The id is ASCII (validated above), so any byte index is a char boundary.
        e.id[..e.id.len().min(MAX_SERIAL_LEN)].to_string()
    } else {
        if e.serial.len() > MAX_SERIAL_LEN {
            return Err(GraphError::invalid(
                "export.serial",
                format!(
                    "must be at most {MAX_SERIAL_LEN} bytes (got {})",
                    e.serial.len()
                ),
            ));
        }
        if let Some(bad) = e.serial.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(GraphError::invalid(
                "export.serial",
                format!("must be printable ASCII (got {bad:?})"),
            ));
        }
        e.serial.clone()
    };
    Ok(VhostUserBlkExport {
        id: e.id.clone(),
        node: e.node.clone(),
        socket: e.socket.clone(),
        num_queues,
        queue_size,
        logical_block_size,
        writable: e.writable,
        serial,
        spread_queues: e.spread_queues,
    })
}

/// Every check AddExport makes of a new export against the nodes of
/// `graph` and the `exports` there are, but the live workers: returns it
/// normalized. Errors name the request field.
pub fn check_new_export(
    graph: &Graph,
    exports: &[&VhostUserBlkExport],
    export: &VhostUserBlkExport,
) -> Result<VhostUserBlkExport, GraphError> {
    let export = validate_export(export)?;
    if exports.iter().any(|e| e.id == export.id) {
        return Err(GraphError::AlreadyExists {
            field: "export.id",
            kind: ObjectKind::Export,
            name: export.id,
        });
    }
    if let Some(other) = exports.iter().find(|e| e.socket == export.socket) {
        return Err(GraphError::Duplicate {
            field: "export.socket",
            problem: format!(
                "socket {:?} is already used by export {:?}",
                export.socket, other.id
            ),
        });
    }
    if !graph.contains(&export.node) {
        return Err(GraphError::NotFound {
            field: "export.node",
            kind: ObjectKind::Node,
            name: export.node,
        });
    }
    if let Some(other) = exports.iter().find(|e| e.node == export.node) {
        return Err(GraphError::precondition(
            "export.node",
            format!(
                "node {:?} is already exported by export {:?}",
                export.node, other.id
            ),
        ));
    }
    if export.writable && graph.is_read_only(&export.node)? {
        return Err(GraphError::precondition(
            "export.writable",
            format!(
                "node {:?} is read-only; a writable export needs a writable node",
                export.node
            ),
        ));
    }
    if let Some(zoned) = zoned_in_graph(graph, &export.node) {
        if export.spread_queues {
            return Err(GraphError::precondition(
                "export.spread_queues",
                format!(
                    "node {zoned:?} is zoned: its zone state lives in the one worker \
                     that serves the export, so the queues cannot be spread"
                ),
            ));
        }
    }
    if let Some(qcow2) = writable_qcow2_in_graph(graph, &export.node) {
        if export.spread_queues {
            return Err(GraphError::precondition(
                "export.spread_queues",
                format!(
                    "node {qcow2:?} is a writable qcow2 node: its metadata cache lives in \
                     the one worker that serves the export, so the queues cannot be spread"
                ),
            ));
        }
    }
    if export.spread_queues {
        if let Some(node) = graph
            .subtree(&export.node)?
            .iter()
            .find(|spec| matches!(&spec.driver, Some(Driver::Throttle(o)) if o.group.is_empty()))
        {
            return Err(GraphError::precondition(
                "export.spread_queues",
                format!(
                    "node {:?} is a throttle without a group: its buckets are per \
                     worker, so spreading the queues would multiply its limits \
                     (give it a group, or do not spread)",
                    node.name
                ),
            ));
        }
    }
    if let Some((other, node)) =
        backing_conflict(graph, exports, &export.node, export.writable, &export.id)
    {
        return Err(GraphError::precondition(
            "export.node",
            format!(
                "node {node:?} is written by one of export {:?} and export {other:?} and read \
                 as a backing image by the other: the reader would not see the writes",
                export.id
            ),
        ));
    }
    if let Some((other, zoned)) = zoned_overlap(graph, exports, &export.node, &export.id) {
        return Err(GraphError::precondition(
            "export.node",
            format!(
                "node {:?} shares nodes with the graph of export {other:?}, and zoned node \
                 {zoned:?} is among them or below: a zoned node's graph is served by one \
                 export only",
                export.node
            ),
        ));
    }
    Ok(export)
}
