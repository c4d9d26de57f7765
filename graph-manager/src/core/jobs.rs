//! Block jobs as the manager keeps them (memory only), and the checks and
//! state changes around them: what a stream or a commit may start on, the
//! state once a stream dropped its backing, and the state a commit's
//! switch-over commits.

use blkmesh_graph::kinds::qcow2::backing_conflict;
use blkmesh_graph::{validate_name, GraphError, ObjectKind};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{Job, JobKind, JobState};

use crate::core::state::State;

/// How many times a job starts again after its worker was lost (or its
/// node reopened) before it fails.
pub(crate) const MAX_RESTARTS: u32 = 10;

/// A job the manager runs.
#[derive(Debug, Clone)]
pub(crate) struct JobRecord {
    pub job: Job,
    /// CancelJob was called: the job ends CANCELLED, not restarted.
    pub cancelling: bool,
}

impl JobRecord {
    pub(crate) fn finished(&self) -> bool {
        matches!(
            self.job.state(),
            JobState::Completed | JobState::Cancelled | JobState::Failed
        )
    }
}

/// What job `kind` on export `export` works on: its top node and that
/// node's backing node, or why it may not start. `active`: the exports
/// that have a job that has not finished.
pub(crate) fn check_start(
    state: &State,
    id: &str,
    kind: JobKind,
    export: &str,
    active: &[&str],
) -> Result<(String, String), GraphError> {
    validate_name("id", id)?;
    if kind == JobKind::Unspecified {
        return Err(GraphError::invalid("kind", "must be stream or commit"));
    }
    let rec = state
        .exports
        .get(export)
        .ok_or_else(|| GraphError::NotFound {
            field: "export",
            kind: ObjectKind::Export,
            name: export.to_string(),
        })?;
    let top = rec.export.node.clone();
    let precondition = |why: String| GraphError::precondition("export", why);
    let base = match state.graph.get(&top).and_then(|s| s.driver.as_ref()) {
        Some(Driver::Qcow2(q)) if !q.backing.is_empty() => q.backing.clone(),
        _ => {
            return Err(precondition(format!(
                "export {export:?} is on node {top:?}, which is not a qcow2 node with a \
                 backing node"
            )))
        }
    };
    if !rec.export.writable || state.graph.is_read_only(&top)? {
        return Err(precondition(format!(
            "export {export:?} does not write its node {top:?}: a job changes the image"
        )));
    }
    if active.contains(&export) {
        return Err(precondition(format!(
            "a job already runs on export {export:?}"
        )));
    }
    if kind == JobKind::Commit {
        check_commit_base(state, export, &top, &base)?;
    }
    Ok((top, base))
}

/// A commit writes `base`: it must be writable, and read by nothing but
/// `top` (another overlay over it, or another export, would see it change).
fn check_commit_base(state: &State, export: &str, top: &str, base: &str) -> Result<(), GraphError> {
    let precondition = |why: String| GraphError::precondition("export", why);
    let others: Vec<&str> = state
        .graph
        .users_of(base)
        .into_iter()
        .filter(|u| *u != top)
        .collect();
    if !others.is_empty() {
        return Err(precondition(format!(
            "node {base:?} is also used by {}: a commit would change what they read",
            others.join(", ")
        )));
    }
    let exports: Vec<_> = state.exports.values().map(|r| &r.export).collect();
    if let Some((other, node)) = backing_conflict(&state.graph, &exports, base, true, export) {
        return Err(precondition(format!(
            "export {other:?} uses node {node:?}, which a commit into {base:?} writes"
        )));
    }
    if state.graph.is_read_only(base)? {
        return Err(precondition(format!(
            "node {base:?} is read-only (its own option or its file's): a commit writes it; \
             update it to read-write first"
        )));
    }
    Ok(())
}

/// `state` once stream job on `top` dropped its backing: the node names
/// no backing node any more (its image's header names no backing file).
pub(crate) fn streamed(state: &State, top: &str) -> Result<State, GraphError> {
    let mut next = state.clone();
    let mut spec = next
        .graph
        .get(top)
        .cloned()
        .ok_or_else(|| GraphError::NotFound {
            field: "top",
            kind: ObjectKind::Node,
            name: top.to_string(),
        })?;
    if let Some(Driver::Qcow2(q)) = &mut spec.driver {
        q.backing.clear();
        q.no_backing = false;
    }
    let replace = std::iter::once((top.to_string(), spec)).collect();
    next.graph = crate::core::reopen::replace_specs(&next.graph, &replace)?;
    Ok(next)
}

/// `state` once commit job of `export` switched over: the export is on
/// `base`, which it now writes; `top` stays, unused.
pub(crate) fn committed(state: &State, export: &str, base: &str) -> State {
    let mut next = state.clone();
    if let Some(rec) = next.exports.get_mut(export) {
        rec.export.node = base.to_string();
    }
    next
}

#[cfg(test)]
mod tests;
