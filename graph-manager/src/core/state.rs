//! The manager's persistent state in memory: the node graph with sizes,
//! the exports with their queue → worker assignment, the workers seen.
//! Its on-disk form is `crate::store::file`.

use std::collections::{BTreeMap, BTreeSet};

use blkmesh_graph::Graph;
use blkmesh_proto::v1::VhostUserBlkExport;

/// An export with its queue → worker assignment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExportRecord {
    /// The normalized export (defaults applied).
    pub export: VhostUserBlkExport,
    /// Worker name per queue; `queues.len() == export.num_queues`.
    pub queues: Vec<String>,
    /// Plan generation: bumped whenever a node of the export's graph is
    /// updated or resized (`ExportPlan.generation`).
    pub generation: u64,
}

/// A worker the manager has seen.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkerRecord {
    pub socket: String,
    pub pid: u32,
}

/// Everything the manager persists.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct State {
    pub graph: Graph,
    /// Size in bytes of every node in `graph`.
    pub sizes: BTreeMap<String, u64>,
    pub exports: BTreeMap<String, ExportRecord>,
    pub workers: BTreeMap<String, WorkerRecord>,
    /// Nodes that came from a configuration file (`managed_by_config` in
    /// the file); a subset of the graph's nodes.
    pub config_nodes: BTreeSet<String>,
    /// Exports that came from a configuration file; a subset of `exports`.
    pub config_exports: BTreeSet<String>,
}

impl State {
    /// Number of queues assigned to each worker (workers with none included).
    pub fn queue_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts: BTreeMap<&str, usize> =
            self.workers.keys().map(|w| (w.as_str(), 0)).collect();
        for rec in self.exports.values() {
            for w in &rec.queues {
                *counts.entry(w.as_str()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The exports whose root is `node`.
    pub fn exports_of_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.exports
            .values()
            .filter(move |r| r.export.node == node)
            .map(|r| r.export.id.as_str())
    }
}
