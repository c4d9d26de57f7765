//! The rules a new export must pass against the state.

use blkmesh_graph::{validate_export, GraphError, ObjectKind};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::VhostUserBlkExport;

use crate::core::error::ApiError;
use crate::core::state::State;
use crate::core::zoned;

/// Refuses an API export whose id, socket or node is taken by an export of
/// the configuration file that waits for a worker.
pub(crate) fn check_waiting_conflict(
    waiting: &[VhostUserBlkExport],
    export: &VhostUserBlkExport,
) -> Result<(), ApiError> {
    for w in waiting {
        if w.id == export.id {
            return Err(GraphError::AlreadyExists {
                field: "export.id",
                kind: ObjectKind::Export,
                name: export.id.clone(),
            }
            .into());
        }
        if w.socket == export.socket {
            return Err(GraphError::Duplicate {
                field: "export.socket",
                problem: format!(
                    "socket {:?} is already used by export {:?} (from the configuration \
                     file, waiting for a worker)",
                    export.socket, w.id
                ),
            }
            .into());
        }
        if w.node == export.node {
            return Err(GraphError::precondition(
                "export.node",
                format!(
                    "node {:?} is already exported by export {:?} (from the configuration \
                     file, waiting for a worker)",
                    export.node, w.id
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// Every check AddExport makes of a new export against `state` but the
/// live workers: returns it normalized. Errors name the request field.
pub(crate) fn check_new_export(
    state: &State,
    export: &VhostUserBlkExport,
) -> Result<VhostUserBlkExport, ApiError> {
    let export = validate_export(export)?;
    if state.exports.contains_key(&export.id) {
        return Err(GraphError::AlreadyExists {
            field: "export.id",
            kind: ObjectKind::Export,
            name: export.id,
        }
        .into());
    }
    if let Some(other) = state
        .exports
        .values()
        .find(|r| r.export.socket == export.socket)
    {
        return Err(GraphError::Duplicate {
            field: "export.socket",
            problem: format!(
                "socket {:?} is already used by export {:?}",
                export.socket, other.export.id
            ),
        }
        .into());
    }
    if !state.graph.contains(&export.node) {
        return Err(GraphError::NotFound {
            field: "export.node",
            kind: ObjectKind::Node,
            name: export.node,
        }
        .into());
    }
    if let Some(other) = state.exports_of_node(&export.node).next() {
        return Err(GraphError::precondition(
            "export.node",
            format!(
                "node {:?} is already exported by export {other:?}",
                export.node
            ),
        )
        .into());
    }
    if export.writable && state.graph.is_read_only(&export.node)? {
        return Err(GraphError::precondition(
            "export.writable",
            format!(
                "node {:?} is read-only; a writable export needs a writable node",
                export.node
            ),
        )
        .into());
    }
    if let Some(zoned) = zoned::zoned_in_graph(&state.graph, &export.node) {
        if export.spread_queues {
            return Err(GraphError::precondition(
                "export.spread_queues",
                format!(
                    "node {zoned:?} is zoned: its zone state lives in the one worker \
                     that serves the export, so the queues cannot be spread"
                ),
            )
            .into());
        }
    }
    if export.spread_queues {
        if let Some(node) =
            state.graph.subtree(&export.node)?.iter().find(
                |spec| matches!(&spec.driver, Some(Driver::Throttle(o)) if o.group.is_empty()),
            )
        {
            return Err(GraphError::precondition(
                "export.spread_queues",
                format!(
                    "node {:?} is a throttle without a group: its buckets are per \
                     worker, so spreading the queues would multiply its limits \
                     (give it a group, or do not spread)",
                    node.name
                ),
            )
            .into());
        }
    }
    if let Some((other, zoned)) = zoned::zoned_overlap(state, &export.node, &export.id) {
        return Err(GraphError::precondition(
            "export.node",
            format!(
                "node {:?} shares nodes with the graph of export {other:?}, and zoned node \
                 {zoned:?} is among them or below: a zoned node's graph is served by one \
                 export only",
                export.node
            ),
        )
        .into());
    }
    Ok(export)
}

#[cfg(test)]
mod tests;
