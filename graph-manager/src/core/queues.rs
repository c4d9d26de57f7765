//! Where export queues go: placing a new export's queues on the live
//! workers and moving the queues of lost workers.

use std::collections::{BTreeMap, BTreeSet};

use blkmesh_proto::v1::{MovedQueue, VhostUserBlkExport};

use crate::core::error::ApiError;
use crate::core::state::State;

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
