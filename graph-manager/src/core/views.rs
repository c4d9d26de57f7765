//! What the services show of the state: node views and export plans.

use blkmesh_proto::v1::{ExportPlan, NodeInfo, NodeSpec, QueueEndpoint};

use crate::core::state::{ExportRecord, State};
use crate::core::zoned;

/// What NodeService shows of node `spec`.
pub(crate) fn node_info(state: &State, spec: &NodeSpec) -> NodeInfo {
    let mut used_by: Vec<String> = state
        .graph
        .users_of(&spec.name)
        .into_iter()
        .map(str::to_string)
        .collect();
    used_by.extend(state.exports_of_node(&spec.name).map(str::to_string));
    NodeInfo {
        spec: Some(spec.clone()),
        size: state.sizes.get(&spec.name).copied().unwrap_or(0),
        read_only: state.graph.is_read_only(&spec.name).unwrap_or(false),
        used_by,
        zones: zoned::zone_info(&state.graph, &state.sizes, &spec.name),
    }
}

/// The plan frontends get for export `rec` (`None`: its graph is broken, logged).
pub(crate) fn export_plan(state: &State, rec: &ExportRecord) -> Option<ExportPlan> {
    let nodes = match state.graph.subtree(&rec.export.node) {
        Ok(nodes) => nodes,
        Err(e) => {
            tracing::error!(export = %rec.export.id, "cannot build plan: {e}");
            return None;
        }
    };
    Some(ExportPlan {
        commit_finish: String::new(),
        export: Some(rec.export.clone()),
        nodes,
        queues: rec
            .queues
            .iter()
            .enumerate()
            .map(|(i, w)| QueueEndpoint {
                queue: i as u32,
                worker: w.clone(),
                worker_socket: state
                    .workers
                    .get(w)
                    .map(|r| r.socket.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        generation: rec.generation,
    })
}

#[cfg(test)]
mod tests;
