//! The rules a new export must pass against the state.

use blkmesh_graph::{GraphError, ObjectKind};
use blkmesh_proto::v1::VhostUserBlkExport;

use crate::core::error::ApiError;
use crate::core::state::State;

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
    let exports: Vec<&VhostUserBlkExport> = state.exports.values().map(|r| &r.export).collect();
    Ok(blkmesh_graph::check_new_export(
        &state.graph,
        &exports,
        export,
    )?)
}

#[cfg(test)]
mod tests;
