//! Rules of node changes over the state: throttle groups, read-only
//! nodes under writable exports, the size of a new node.

use blkmesh_graph::kinds::read_only_field;
use blkmesh_graph::{node_size, GraphError};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::NodeSpec;

use crate::core::error::ApiError;
use crate::core::state::State;

/// A committed node update or resize, kept to undo it.
#[derive(Debug, Clone)]
pub(crate) struct NodeChange {
    /// (spec before, spec after) of each node whose spec changed.
    pub specs: Vec<(NodeSpec, NodeSpec)>,
    /// (name, size before, size after) of each node whose size changed.
    pub sizes: Vec<(String, u64, u64)>,
    /// The exports over the changed nodes, with their new generation.
    pub targets: Vec<(String, u64)>,
}

/// For a grouped throttle `spec` (the node's new spec), every other node of
/// its group as (current spec, spec with `spec`'s limits).
pub(crate) fn group_members_with(state: &State, spec: &NodeSpec) -> Vec<(NodeSpec, NodeSpec)> {
    let Some(Driver::Throttle(o)) = &spec.driver else {
        return Vec::new();
    };
    if o.group.is_empty() {
        return Vec::new();
    }
    state
        .graph
        .throttle_group(&o.group)
        .filter(|member| member.name != spec.name)
        .map(|member| {
            let mut new = member.clone();
            if let Some(Driver::Throttle(m)) = &mut new.driver {
                m.limits = o.limits;
            }
            (member.clone(), new)
        })
        .collect()
}

/// The `node_updated` change of a group member updated through `spec`.
pub(crate) fn group_change(spec: &NodeSpec) -> String {
    match &spec.driver {
        Some(Driver::Throttle(o)) => format!(
            "throttle limits (group {:?}, via node {:?})",
            o.group, spec.name
        ),
        _ => "throttle limits".to_string(),
    }
}

/// Refuses a state in which a writable export is over a read-only node;
/// the error is about `spec`'s read-only option.
pub(crate) fn check_writable_exports(next: &State, spec: &NodeSpec) -> Result<(), ApiError> {
    for rec in next.exports.values() {
        if rec.export.writable && next.graph.is_read_only(&rec.export.node)? {
            return Err(GraphError::precondition(
                read_only_field(spec),
                format!(
                    "writable export {:?} is over node {:?}, which would become read-only \
                     (remove the export, or add it read-only, first)",
                    rec.export.id, spec.name
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// The size in bytes of a node being added to `next` (whose sizes hold its
/// children's), with `probed` the size [`crate::core::probe::probe_node_paths`] found. 0 = not
/// known until a worker opens the node (NodeInfo.size).
pub(crate) fn new_node_size(
    next: &State,
    spec: &NodeSpec,
    probed: Option<u64>,
) -> Result<u64, ApiError> {
    if spec.driver.is_none() {
        return Err(ApiError::Missing("node.driver"));
    }
    let child_size = |child: &str| next.sizes.get(child).copied().unwrap_or(0);
    Ok(node_size(spec, child_size, probed)?)
}

/// Bumps the plan generation of each export of `exports` in `next`:
/// returns each one (still there) with its new generation.
pub(crate) fn bump_generations(next: &mut State, exports: &[String]) -> Vec<(String, u64)> {
    let mut targets = Vec::with_capacity(exports.len());
    for id in exports {
        if let Some(rec) = next.exports.get_mut(id) {
            rec.generation += 1;
            targets.push((id.clone(), rec.generation));
        }
    }
    targets
}

#[cfg(test)]
mod tests;
