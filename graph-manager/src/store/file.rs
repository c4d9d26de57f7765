//! The on-disk form of the manager's state (`<state-dir>/state.json`,
//! replaced atomically after every change): reading it back with every rule
//! the API enforces, and writing it durably.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blkmesh_graph::{
    validate_export, validate_name, validate_node_limits, validate_socket_path, Graph,
};
use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, FaultRule, IoOp, IoUringOptions, NodeSpec, NullOptions,
    NvmeIoUringOptions, RawOptions, ThrottleLimits, ThrottleOptions, VhostUserBlkExport,
    VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions, ZonedOptions,
};
use serde::{Deserialize, Serialize};

use crate::core::state::{ExportRecord, State, WorkerRecord};
use crate::core::zoned;
use crate::error::ManagerError;

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

// ----- on-disk form -----

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    nodes: Vec<NodeJson>,
    exports: Vec<ExportJson>,
    workers: Vec<WorkerJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeJson {
    name: String,
    size: u64,
    driver: DriverJson,
    /// Added from a configuration file (absent: through the API).
    #[serde(default, skip_serializing_if = "is_false")]
    managed_by_config: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum DriverJson {
    IoUring {
        path: String,
        direct: bool,
        read_only: bool,
    },
    Null {
        size: u64,
        latency_ns: u64,
    },
    NvmeIoUring {
        path: String,
        read_only: bool,
    },
    VirtioBlkVhostUser {
        path: String,
        read_only: bool,
    },
    VirtioBlkVhostVdpa {
        path: String,
        read_only: bool,
    },
    Raw {
        child: String,
        offset: u64,
        size: u64,
    },
    Throttle {
        child: String,
        /// Absent when the spec had none (refused by validation on load).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limits: Option<LimitsJson>,
        group: String,
    },
    FaultInjection {
        child: String,
        rules: Vec<FaultRuleJson>,
        /// Limits imposed on the graph above (absent in older files: 0).
        #[serde(default, skip_serializing_if = "is_zero_u64")]
        max_transfer: u64,
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        max_segments: u32,
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        buf_alignment: u32,
    },
    /// Added with zoned block devices; files without zoned nodes load as before.
    Zoned {
        child: String,
        zone_size: u64,
        /// 0 (the zone size) is left out.
        #[serde(default, skip_serializing_if = "is_zero_u64")]
        zone_capacity: u64,
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        max_open_zones: u32,
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        max_active_zones: u32,
        metadata_path: String,
    },
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// A [`ThrottleLimits`]; absent buckets stay absent so specs round-trip exactly.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iops_total: Option<BucketJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iops_read: Option<BucketJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iops_write: Option<BucketJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bps_total: Option<BucketJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bps_read: Option<BucketJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bps_write: Option<BucketJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BucketJson {
    rate: u64,
    burst: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRuleJson {
    /// Op names as in the proto enum, e.g. `IO_OP_READ`.
    ops: Vec<String>,
    offset_start: u64,
    offset_end: u64,
    skip: u64,
    count: u64,
    probability: f64,
    /// Absent when the rule had none (refused by validation on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    action: Option<ActionJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum ActionJson {
    Errno(i32),
    DelayNs(u64),
}

fn bucket_to_json(b: &Option<Bucket>) -> Option<BucketJson> {
    b.map(|b| BucketJson {
        rate: b.rate,
        burst: b.burst,
    })
}

fn bucket_from_json(b: Option<BucketJson>) -> Option<Bucket> {
    b.map(|b| Bucket {
        rate: b.rate,
        burst: b.burst,
    })
}

fn limits_to_json(l: &ThrottleLimits) -> LimitsJson {
    LimitsJson {
        iops_total: bucket_to_json(&l.iops_total),
        iops_read: bucket_to_json(&l.iops_read),
        iops_write: bucket_to_json(&l.iops_write),
        bps_total: bucket_to_json(&l.bps_total),
        bps_read: bucket_to_json(&l.bps_read),
        bps_write: bucket_to_json(&l.bps_write),
    }
}

fn limits_from_json(l: LimitsJson) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: bucket_from_json(l.iops_total),
        iops_read: bucket_from_json(l.iops_read),
        iops_write: bucket_from_json(l.iops_write),
        bps_total: bucket_from_json(l.bps_total),
        bps_read: bucket_from_json(l.bps_read),
        bps_write: bucket_from_json(l.bps_write),
    }
}

fn op_name(op: i32) -> String {
    match IoOp::try_from(op) {
        Ok(op) => op.as_str_name().to_string(),
        // Never in a validated spec; kept as a number so it is refused on load.
        Err(_) => op.to_string(),
    }
}

fn rule_to_json(r: &FaultRule) -> FaultRuleJson {
    FaultRuleJson {
        ops: r.ops.iter().map(|&op| op_name(op)).collect(),
        offset_start: r.offset_start,
        offset_end: r.offset_end,
        skip: r.skip,
        count: r.count,
        probability: r.probability,
        action: r.action.map(|a| match a {
            Action::Errno(e) => ActionJson::Errno(e),
            Action::DelayNs(d) => ActionJson::DelayNs(d),
        }),
    }
}

fn rule_from_json(r: FaultRuleJson) -> Result<FaultRule, String> {
    let ops = r
        .ops
        .iter()
        .map(|name| {
            IoOp::from_str_name(name)
                .map(|op| op as i32)
                .ok_or_else(|| format!("unknown op {name:?}"))
        })
        .collect::<Result<Vec<i32>, String>>()?;
    Ok(FaultRule {
        ops,
        offset_start: r.offset_start,
        offset_end: r.offset_end,
        skip: r.skip,
        count: r.count,
        probability: r.probability,
        action: r.action.map(|a| match a {
            ActionJson::Errno(e) => Action::Errno(e),
            ActionJson::DelayNs(d) => Action::DelayNs(d),
        }),
    })
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportJson {
    id: String,
    node: String,
    socket: String,
    num_queues: u32,
    queue_size: u32,
    logical_block_size: u32,
    writable: bool,
    serial: String,
    /// Queues spread over the workers (absent in older files: false).
    #[serde(default, skip_serializing_if = "is_false")]
    spread_queues: bool,
    /// Worker name per queue.
    queues: Vec<String>,
    /// Plan generation (absent in older files: 0).
    #[serde(default)]
    generation: u64,
    /// Added from a configuration file (absent: through the API).
    #[serde(default, skip_serializing_if = "is_false")]
    managed_by_config: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerJson {
    name: String,
    socket: String,
    pid: u32,
}

fn driver_to_json(spec: &NodeSpec) -> Option<DriverJson> {
    Some(match spec.driver.as_ref()? {
        Driver::IoUring(o) => DriverJson::IoUring {
            path: o.path.clone(),
            direct: o.direct,
            read_only: o.read_only,
        },
        Driver::Null(o) => DriverJson::Null {
            size: o.size,
            latency_ns: o.latency_ns,
        },
        Driver::NvmeIoUring(o) => DriverJson::NvmeIoUring {
            path: o.path.clone(),
            read_only: o.read_only,
        },
        Driver::VirtioBlkVhostUser(o) => DriverJson::VirtioBlkVhostUser {
            path: o.path.clone(),
            read_only: o.read_only,
        },
        Driver::VirtioBlkVhostVdpa(o) => DriverJson::VirtioBlkVhostVdpa {
            path: o.path.clone(),
            read_only: o.read_only,
        },
        Driver::Raw(o) => DriverJson::Raw {
            child: o.child.clone(),
            offset: o.offset,
            size: o.size,
        },
        Driver::Throttle(o) => DriverJson::Throttle {
            child: o.child.clone(),
            limits: o.limits.as_ref().map(limits_to_json),
            group: o.group.clone(),
        },
        Driver::FaultInjection(o) => DriverJson::FaultInjection {
            child: o.child.clone(),
            rules: o.rules.iter().map(rule_to_json).collect(),
            max_transfer: o.max_transfer,
            max_segments: o.max_segments,
            buf_alignment: o.buf_alignment,
        },
        Driver::Zoned(o) => DriverJson::Zoned {
            child: o.child.clone(),
            zone_size: o.zone_size,
            zone_capacity: o.zone_capacity,
            max_open_zones: o.max_open_zones,
            max_active_zones: o.max_active_zones,
            metadata_path: o.metadata_path.clone(),
        },
    })
}

fn driver_from_json(d: DriverJson) -> Result<Driver, String> {
    Ok(match d {
        DriverJson::IoUring {
            path,
            direct,
            read_only,
        } => Driver::IoUring(IoUringOptions {
            path,
            direct,
            read_only,
        }),
        DriverJson::Null { size, latency_ns } => Driver::Null(NullOptions { size, latency_ns }),
        DriverJson::Raw {
            child,
            offset,
            size,
        } => Driver::Raw(RawOptions {
            child,
            offset,
            size,
        }),
        DriverJson::NvmeIoUring { path, read_only } => {
            Driver::NvmeIoUring(NvmeIoUringOptions { path, read_only })
        }
        DriverJson::VirtioBlkVhostUser { path, read_only } => {
            Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions { path, read_only })
        }
        DriverJson::VirtioBlkVhostVdpa { path, read_only } => {
            Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions { path, read_only })
        }
        DriverJson::Throttle {
            child,
            limits,
            group,
        } => Driver::Throttle(ThrottleOptions {
            child,
            limits: limits.map(limits_from_json),
            group,
        }),
        DriverJson::FaultInjection {
            child,
            rules,
            max_transfer,
            max_segments,
            buf_alignment,
        } => Driver::FaultInjection(FaultInjectionOptions {
            child,
            rules: rules
                .into_iter()
                .map(rule_from_json)
                .collect::<Result<_, _>>()?,
            max_transfer,
            max_segments,
            buf_alignment,
        }),
        DriverJson::Zoned {
            child,
            zone_size,
            zone_capacity,
            max_open_zones,
            max_active_zones,
            metadata_path,
        } => Driver::Zoned(ZonedOptions {
            child,
            zone_size,
            zone_capacity,
            max_open_zones,
            max_active_zones,
            metadata_path,
        }),
    })
}

/// The on-disk form of `state`.
fn to_file(state: &State) -> StateFile {
    StateFile {
        version: STATE_VERSION,
        nodes: state
            .graph
            .iter()
            .filter_map(|spec| {
                Some(NodeJson {
                    name: spec.name.clone(),
                    size: state.sizes.get(&spec.name).copied().unwrap_or(0),
                    driver: driver_to_json(spec)?,
                    managed_by_config: state.config_nodes.contains(&spec.name),
                })
            })
            .collect(),
        exports: state
            .exports
            .values()
            .map(|r| ExportJson {
                id: r.export.id.clone(),
                node: r.export.node.clone(),
                socket: r.export.socket.clone(),
                num_queues: r.export.num_queues,
                queue_size: r.export.queue_size,
                logical_block_size: r.export.logical_block_size,
                writable: r.export.writable,
                serial: r.export.serial.clone(),
                spread_queues: r.export.spread_queues,
                queues: r.queues.clone(),
                generation: r.generation,
                managed_by_config: state.config_exports.contains(&r.export.id),
            })
            .collect(),
        workers: state
            .workers
            .iter()
            .map(|(name, w)| WorkerJson {
                name: name.clone(),
                socket: w.socket.clone(),
                pid: w.pid,
            })
            .collect(),
    }
}

/// Checks a parsed state file against every rule the API enforces.
fn from_file(f: StateFile) -> Result<State, String> {
    if f.version != STATE_VERSION {
        return Err(format!(
            "unsupported version {} (expected {STATE_VERSION})",
            f.version
        ));
    }
    let mut sizes = BTreeMap::new();
    let mut specs = Vec::new();
    let mut config_nodes = BTreeSet::new();
    let mut config_exports = BTreeSet::new();
    for n in f.nodes {
        if n.managed_by_config {
            config_nodes.insert(n.name.clone());
        }
        let driver = driver_from_json(n.driver).map_err(|e| format!("node {:?}: {e}", n.name))?;
        let spec = NodeSpec {
            name: n.name,
            driver: Some(driver),
        };
        validate_node_limits(&spec).map_err(|e| format!("node {:?}: {e}", spec.name))?;
        sizes.insert(spec.name.clone(), n.size);
        specs.push(spec);
    }
    let graph = Graph::from_specs(specs).map_err(|e| format!("nodes: {e}"))?;

    let mut workers = BTreeMap::new();
    for w in f.workers {
        validate_name("name", &w.name).map_err(|e| format!("workers: {e}"))?;
        validate_socket_path("socket", &w.socket)
            .map_err(|e| format!("worker {:?}: {e}", w.name))?;
        let rec = WorkerRecord {
            socket: w.socket,
            pid: w.pid,
        };
        if workers.insert(w.name.clone(), rec).is_some() {
            return Err(format!("workers: duplicate worker {:?}", w.name));
        }
    }

    let mut exports = BTreeMap::new();
    let mut sockets = BTreeSet::new();
    let mut roots = BTreeSet::new();
    for e in f.exports {
        if e.managed_by_config {
            config_exports.insert(e.id.clone());
        }
        let export = VhostUserBlkExport {
            id: e.id,
            node: e.node,
            socket: e.socket,
            num_queues: e.num_queues,
            queue_size: e.queue_size,
            logical_block_size: e.logical_block_size,
            writable: e.writable,
            serial: e.serial,
            spread_queues: e.spread_queues,
        };
        let ctx = format!("export {:?}", export.id);
        let normalized = validate_export(&export).map_err(|e| format!("{ctx}: {e}"))?;
        if normalized != export {
            return Err(format!("{ctx}: fields are not normalized"));
        }
        if !graph.contains(&export.node) {
            return Err(format!("{ctx}: unknown node {:?}", export.node));
        }
        if !roots.insert(export.node.clone()) {
            return Err(format!("{ctx}: node {:?} exported twice", export.node));
        }
        if !sockets.insert(export.socket.clone()) {
            return Err(format!("{ctx}: duplicate socket {:?}", export.socket));
        }
        if e.queues.len() != export.num_queues as usize {
            return Err(format!(
                "{ctx}: {} queue assignments for {} queues",
                e.queues.len(),
                export.num_queues
            ));
        }
        if let Some(w) = e.queues.iter().find(|w| !workers.contains_key(*w)) {
            return Err(format!("{ctx}: queue assigned to unknown worker {w:?}"));
        }
        let id = export.id.clone();
        let rec = ExportRecord {
            export,
            queues: e.queues,
            generation: e.generation,
        };
        if exports.insert(id.clone(), rec).is_some() {
            return Err(format!("exports: duplicate export {id:?}"));
        }
    }
    let state = State {
        graph,
        sizes,
        exports,
        workers,
        config_nodes,
        config_exports,
    };
    zoned::check_state(&state)?;
    Ok(state)
}

/// Loads the state from `path`; a missing file is an empty state.
pub(crate) fn load(path: &Path) -> Result<State, ManagerError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(ManagerError::CorruptState {
                path: path.to_path_buf(),
                reason: "not valid UTF-8".into(),
            })
        }
        Err(source) => {
            return Err(ManagerError::ReadState {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |reason: String| ManagerError::CorruptState {
        path: path.to_path_buf(),
        reason,
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    from_file(file).map_err(corrupt)
}

/// Writes the state to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub(crate) fn save(path: &Path, state: &State) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "state path has no parent"))?;
    let json = serde_json::to_vec_pretty(&to_file(state)).map_err(io::Error::other)?;
    let tmp: PathBuf = dir.join(format!(".{STATE_FILE}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
