//! Where export queues go: placing a new export's queues on the live
//! workers and moving the queues of lost workers.

use std::collections::{BTreeMap, BTreeSet};

use blkmesh_graph::kinds::qcow2::writable_qcow2_in_graph;
use blkmesh_graph::GraphError;
use blkmesh_proto::v1::{MovedQueue, VhostUserBlkExport};

use crate::core::error::ApiError;
use crate::core::state::State;
use crate::core::zoned;

/// Where the queues of the `lost` workers go: to the live workers (not
/// lost), least loaded first counting the moves so far, ties by name. The
/// lost queues of an export that is not spread stay together: on the live
/// worker that already serves most of its queues, else on the least loaded
/// one (as AddExport would place it). Spread exports move queue by queue.
pub(crate) fn plan_reassign(
    state: &State,
    live: &BTreeMap<String, u64>,
    lost: &BTreeSet<String>,
) -> Vec<MovedQueue> {
    let counts = state.queue_counts();
    let mut load: BTreeMap<String, usize> = live
        .keys()
        .filter(|w| !lost.contains(*w))
        .map(|w| (w.clone(), counts.get(w.as_str()).copied().unwrap_or(0)))
        .collect();
    // First minimum in name order: least loaded, ties by name.
    let least_loaded = |load: &BTreeMap<String, usize>| {
        load.iter().min_by_key(|(_, n)| **n).map(|(w, _)| w.clone())
    };
    let mut moved = Vec::new();
    for rec in state.exports.values() {
        let lost_queues: Vec<usize> = (0..rec.queues.len())
            .filter(|&i| lost.contains(&rec.queues[i]))
            .collect();
        if lost_queues.is_empty() {
            continue;
        }
        let together = if rec.export.spread_queues {
            None
        } else {
            let mut here: BTreeMap<&str, usize> = BTreeMap::new();
            for w in &rec.queues {
                if load.contains_key(w) {
                    *here.entry(w.as_str()).or_insert(0) += 1;
                }
            }
            // Most of the export's queues, then least loaded, then name.
            here.into_iter()
                .min_by_key(|(w, n)| (usize::MAX - n, load.get(*w).copied().unwrap_or(0), *w))
                .map(|(w, _)| w.to_string())
                .or_else(|| least_loaded(&load))
        };
        for i in lost_queues {
            let Some(to) = together.clone().or_else(|| least_loaded(&load)) else {
                return moved;
            };
            if let Some(n) = load.get_mut(&to) {
                *n += 1;
            }
            moved.push(MovedQueue {
                export: rec.export.id.clone(),
                queue: i as u32,
                from: rec.queues[i].clone(),
                to,
            });
        }
    }
    moved
}

/// The worker of each queue of a new export: all on the live worker with
/// the fewest queues (ties by name), or round robin over the live workers
/// in that order when the export spreads its queues.
pub(crate) fn place_queues(
    state: &State,
    live_workers: &BTreeMap<String, u64>,
    export: &VhostUserBlkExport,
) -> Result<Vec<String>, ApiError> {
    let counts = state.queue_counts();
    let mut live: Vec<(usize, &String)> = live_workers
        .keys()
        .map(|w| (counts.get(w.as_str()).copied().unwrap_or(0), w))
        .collect();
    live.sort();
    if live.is_empty() {
        return Err(ApiError::NoLiveWorker);
    }
    let n = export.num_queues as usize;
    Ok(if export.spread_queues {
        (0..n).map(|i| live[i % live.len()].1.clone()).collect()
    } else {
        vec![live[0].1.clone(); n]
    })
}

/// Applies `moved` to the queue assignments of `next`.
pub(crate) fn apply_moves(next: &mut State, moved: &[MovedQueue]) {
    for m in moved {
        if let Some(r) = next.exports.get_mut(&m.export) {
            if let Some(slot) = r.queues.get_mut(m.queue as usize) {
                *slot = m.to.clone();
            }
        }
    }
}

/// MoveNode: every queue of every export whose graph contains `node`, to
/// `worker`. Queues already there are not listed.
pub(crate) fn plan_move_node(state: &State, node: &str, worker: &str) -> Vec<MovedQueue> {
    // `node` and everything above it: an export's graph contains `node`
    // iff its root is one of these.
    let mut above: BTreeSet<&str> = BTreeSet::new();
    let mut stack = vec![node];
    while let Some(name) = stack.pop() {
        if above.insert(name) {
            stack.extend(state.graph.users_of(name));
        }
    }
    state
        .exports
        .values()
        .filter(|r| above.contains(r.export.node.as_str()))
        .flat_map(|r| {
            r.queues
                .iter()
                .enumerate()
                .filter(|(_, w)| w.as_str() != worker)
                .map(|(i, from)| MovedQueue {
                    export: r.export.id.clone(),
                    queue: i as u32,
                    from: from.clone(),
                    to: worker.to_string(),
                })
        })
        .collect()
}

/// DrainWorker: every queue of `worker` to the other live workers, least
/// loaded first counting the moves so far (ties by name); the queues of an
/// export over a zoned node move together. Fails when there are queues to
/// move and no other live worker.
pub(crate) fn plan_drain(
    state: &State,
    live_workers: &BTreeMap<String, u64>,
    worker: &str,
) -> Result<Vec<MovedQueue>, ApiError> {
    let on_worker: Vec<(String, usize)> = state
        .exports
        .values()
        .flat_map(|r| {
            r.queues
                .iter()
                .enumerate()
                .filter(|(_, w)| w.as_str() == worker)
                .map(|(i, _)| (r.export.id.clone(), i))
        })
        .collect();
    if on_worker.is_empty() {
        return Ok(Vec::new());
    }
    let counts = state.queue_counts();
    let mut targets: Vec<(usize, String)> = live_workers
        .keys()
        .filter(|w| w.as_str() != worker)
        .map(|w| (counts.get(w.as_str()).copied().unwrap_or(0), w.clone()))
        .collect();
    if targets.is_empty() {
        return Err(GraphError::precondition(
            "worker",
            format!(
                "no other live worker to take the {} queues of worker {worker:?}",
                on_worker.len()
            ),
        )
        .into());
    }
    let mut moved = Vec::with_capacity(on_worker.len());
    // Exports over a zoned node or a writable qcow2 node move whole:
    // export → its one target.
    let mut whole: BTreeMap<String, String> = BTreeMap::new();
    for (id, queue) in on_worker {
        let zoned_rec = state.exports.get(&id).filter(|r| {
            zoned::zoned_in_graph(&state.graph, &r.export.node).is_some()
                || writable_qcow2_in_graph(&state.graph, &r.export.node).is_some()
        });
        let pinned = match (whole.get(&id), zoned_rec) {
            (Some(to), _) => Some(to.clone()),
            // Where its other queues are, if that is a target (they
            // should all be on `worker`); else the least loaded.
            (None, Some(r)) => r
                .queues
                .iter()
                .find(|w| targets.iter().any(|(_, t)| t == *w))
                .cloned()
                .or_else(|| targets.iter().min().map(|(_, t)| t.clone())),
            (None, None) => None,
        };
        let target = match &pinned {
            Some(to) => targets.iter_mut().find(|(_, t)| t == to),
            // Least loaded first, counting the queues moved so far; ties by name.
            None => targets.iter_mut().min(),
        };
        let Some(target) = target else {
            break;
        };
        target.0 += 1;
        let to = target.1.clone();
        if zoned_rec.is_some() {
            whole.insert(id.clone(), to.clone());
        }
        moved.push(MovedQueue {
            export: id,
            queue: queue as u32,
            from: worker.to_string(),
            to,
        });
    }
    Ok(moved)
}

#[cfg(test)]
mod tests;
