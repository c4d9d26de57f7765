//! Small states for the unit tests of the core rules.

use blkmesh_graph::Graph;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, NodeSpec, NullOptions, RawOptions, ThrottleLimits,
    ThrottleOptions, VhostUserBlkExport, ZonedOptions,
};

use crate::core::state::{ExportRecord, State, WorkerRecord};

pub(crate) const MIB: u64 = 1 << 20;

pub(crate) fn null(name: &str, size: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Null(NullOptions {
            size,
            latency_ns: 0,
        })),
    }
}

/// A window of `size` bytes (0: the rest) at `offset` of `child`.
pub(crate) fn raw(name: &str, child: &str, offset: u64, size: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Raw(RawOptions {
            child: child.into(),
            offset,
            size,
        })),
    }
}

/// A fault injection node over `child` without rules.
pub(crate) fn faults(name: &str, child: &str, max_transfer: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            max_transfer,
            ..Default::default()
        })),
    }
}

/// A throttle over `child` at `iops`, in `group` (empty: none).
pub(crate) fn throttle(name: &str, child: &str, iops: u64, group: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: child.into(),
            limits: Some(ThrottleLimits {
                iops_total: Some(Bucket {
                    rate: iops,
                    burst: 0,
                }),
                ..Default::default()
            }),
            group: group.into(),
        })),
    }
}

pub(crate) fn zoned(name: &str, child: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Zoned(ZonedOptions {
            child: child.into(),
            zone_size: MIB,
            zone_capacity: 0,
            max_open_zones: 4,
            max_active_zones: 8,
            metadata_path: format!("/var/lib/blkmesh/{name}.zones"),
        })),
    }
}

/// An export request (not normalized) of `node` with `num_queues` queues.
pub(crate) fn export(id: &str, node: &str, num_queues: u32, spread: bool) -> VhostUserBlkExport {
    VhostUserBlkExport {
        id: id.into(),
        node: node.into(),
        socket: format!("/run/blkmesh/{id}.sock"),
        num_queues,
        spread_queues: spread,
        ..Default::default()
    }
}

/// A state of the graph of `specs` with `sizes`, nothing else.
pub(crate) fn sized_state(specs: Vec<NodeSpec>, sizes: &[(&str, u64)]) -> State {
    State {
        graph: Graph::from_specs(specs).expect("a valid graph"),
        sizes: sizes.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        ..Default::default()
    }
}

/// A state of `nodes` (sizes as the null nodes say) and `workers`.
pub(crate) fn state(nodes: Vec<NodeSpec>, workers: &[&str]) -> State {
    let sizes = nodes
        .iter()
        .map(|n| match &n.driver {
            Some(Driver::Null(o)) => (n.name.clone(), o.size),
            _ => (n.name.clone(), 0),
        })
        .collect();
    State {
        graph: Graph::from_specs(nodes).expect("a valid graph"),
        sizes,
        workers: workers
            .iter()
            .map(|w| {
                let rec = WorkerRecord {
                    socket: format!("/run/blkmesh/{w}.sock"),
                    pid: 1,
                };
                (w.to_string(), rec)
            })
            .collect(),
        ..Default::default()
    }
}

/// Adds export `id` of `node` with one queue per entry of `queues`, on
/// those workers.
pub(crate) fn with_export(state: &mut State, id: &str, node: &str, queues: &[&str], spread: bool) {
    let export = blkmesh_graph::validate_export(&export(id, node, queues.len() as u32, spread))
        .expect("a valid export");
    state.exports.insert(
        id.to_string(),
        ExportRecord {
            export,
            queues: queues.iter().map(|w| w.to_string()).collect(),
            generation: 1,
        },
    );
}

/// Live workers as the sessions keep them (name → session).
pub(crate) fn live(names: &[&str]) -> std::collections::BTreeMap<String, u64> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), i as u64 + 1))
        .collect()
}
