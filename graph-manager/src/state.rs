//! The persistent part of the manager's state and its on-disk form
//! (`<state-dir>/state.json`, replaced atomically after every change).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blkmesh_graph::{validate_export, validate_name, validate_socket_path, Graph};
use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, FaultRule, IoOp, IoUringOptions, NodeSpec, NullOptions,
    NvmeIoUringOptions, RawOptions, ThrottleLimits, ThrottleOptions, VhostUserBlkExport,
    VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions, ZonedOptions,
};
use serde::{Deserialize, Serialize};

use crate::checks::validate_node_limits;
use crate::ManagerError;

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

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

impl State {
    fn to_file(&self) -> StateFile {
        StateFile {
            version: STATE_VERSION,
            nodes: self
                .graph
                .iter()
                .filter_map(|spec| {
                    Some(NodeJson {
                        name: spec.name.clone(),
                        size: self.sizes.get(&spec.name).copied().unwrap_or(0),
                        driver: driver_to_json(spec)?,
                        managed_by_config: self.config_nodes.contains(&spec.name),
                    })
                })
                .collect(),
            exports: self
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
                    managed_by_config: self.config_exports.contains(&r.export.id),
                })
                .collect(),
            workers: self
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
            let driver =
                driver_from_json(n.driver).map_err(|e| format!("node {:?}: {e}", n.name))?;
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
        crate::zoned::check_state(&state)?;
        Ok(state)
    }
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
    State::from_file(file).map_err(corrupt)
}

/// Writes the state to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub(crate) fn save(path: &Path, state: &State) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "state path has no parent"))?;
    let json = serde_json::to_vec_pretty(&state.to_file()).map_err(io::Error::other)?;
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
mod tests {
    use super::*;

    fn sample() -> State {
        let mut s = State::default();
        s.graph
            .add(NodeSpec {
                name: "n0".into(),
                driver: Some(Driver::Null(NullOptions {
                    size: 1 << 20,
                    latency_ns: 5,
                })),
            })
            .unwrap();
        s.graph
            .add(NodeSpec {
                name: "r0".into(),
                driver: Some(Driver::Raw(RawOptions {
                    child: "n0".into(),
                    offset: 512,
                    size: 0,
                })),
            })
            .unwrap();
        s.sizes.insert("n0".into(), 1 << 20);
        s.sizes.insert("r0".into(), (1 << 20) - 512);
        s.workers.insert(
            "w0".into(),
            WorkerRecord {
                socket: "/run/w0.sock".into(),
                pid: 42,
            },
        );
        let export = validate_export(&VhostUserBlkExport {
            id: "e0".into(),
            node: "r0".into(),
            socket: "/run/e0.sock".into(),
            num_queues: 2,
            ..Default::default()
        })
        .unwrap();
        s.exports.insert(
            "e0".into(),
            ExportRecord {
                export,
                queues: vec!["w0".into(), "w0".into()],
                generation: 7,
            },
        );
        s
    }

    #[test]
    fn state_round_trips_through_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let s = sample();
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), s);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn spread_flag_round_trips_and_defaults_to_false() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let mut s = sample();
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("spread_queues"), "{text}");
        s.workers.insert(
            "w1".into(),
            WorkerRecord {
                socket: "/run/w1.sock".into(),
                pid: 43,
            },
        );
        let e0 = s.exports.get_mut("e0").unwrap();
        e0.export.spread_queues = true;
        e0.queues = vec!["w0".into(), "w1".into()];
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"spread_queues\": true"), "{text}");
        assert_eq!(load(&path).unwrap(), s);
    }

    #[test]
    fn config_marks_round_trip_and_default_to_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let mut s = sample();
        save(&path, &s).unwrap();
        assert!(!fs::read_to_string(&path)
            .unwrap()
            .contains("managed_by_config"));
        s.config_nodes.insert("n0".into());
        s.config_exports.insert("e0".into());
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches("\"managed_by_config\": true").count(),
            2,
            "{text}"
        );
        assert_eq!(load(&path).unwrap(), s);
    }

    #[test]
    fn missing_state_file_is_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load(&dir.path().join(STATE_FILE)).unwrap(),
            State::default()
        );
    }

    #[test]
    fn rejects_state_with_unknown_worker_assignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let mut s = sample();
        s.workers.clear();
        save(&path, &s).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, ManagerError::CorruptState { .. }), "{e}");
        assert!(e.to_string().contains("unknown worker"), "{e}");
    }

    #[test]
    fn rejects_garbage_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        fs::write(&path, "{not json").unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{not json");
    }

    /// One node of every new kind: device leaves, throttle (with absent
    /// and present buckets, a group) and fault injection (every action).
    fn sample_new_kinds() -> State {
        let mut s = State::default();
        let leaves = [
            Driver::NvmeIoUring(NvmeIoUringOptions {
                path: "/dev/ng0n1".into(),
                read_only: true,
            }),
            Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
                path: "/run/qsd/vhost.sock".into(),
                read_only: false,
            }),
            Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
                path: "/dev/vhost-vdpa-0".into(),
                read_only: false,
            }),
        ];
        for (name, driver) in ["nvme", "vu", "vdpa"].into_iter().zip(leaves) {
            s.graph
                .add(NodeSpec {
                    name: name.into(),
                    driver: Some(driver),
                })
                .unwrap();
            s.sizes.insert(name.into(), 0);
        }
        let limits = ThrottleLimits {
            iops_total: Some(Bucket {
                rate: 1000,
                burst: 2000,
            }),
            bps_write: Some(Bucket {
                rate: 1 << 20,
                burst: 0,
            }),
            bps_read: Some(Bucket { rate: 0, burst: 0 }),
            ..Default::default()
        };
        for (name, child) in [("t1", "nvme"), ("t2", "vu")] {
            s.graph
                .add(NodeSpec {
                    name: name.into(),
                    driver: Some(Driver::Throttle(ThrottleOptions {
                        child: child.into(),
                        limits: Some(limits),
                        group: "g".into(),
                    })),
                })
                .unwrap();
            s.sizes.insert(name.into(), 0);
        }
        s.graph
            .add(NodeSpec {
                name: "fi".into(),
                driver: Some(Driver::FaultInjection(FaultInjectionOptions {
                    child: "vdpa".into(),
                    rules: vec![
                        FaultRule {
                            ops: vec![IoOp::Read as i32, IoOp::WriteZeroes as i32],
                            offset_start: 512,
                            offset_end: 1 << 20,
                            skip: 2,
                            count: 1,
                            probability: 0.25,
                            action: Some(Action::Errno(5)),
                        },
                        FaultRule {
                            action: Some(Action::DelayNs(10_000_000)),
                            ..Default::default()
                        },
                    ],
                    max_transfer: 64 << 10,
                    max_segments: 4,
                    buf_alignment: 4096,
                })),
            })
            .unwrap();
        s.sizes.insert("fi".into(), 0);
        s
    }

    #[test]
    fn state_with_new_node_kinds_round_trips_through_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let s = sample_new_kinds();
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"IO_OP_WRITE_ZEROES\""), "{text}");
        assert!(text.contains("\"delay_ns\": 10000000"), "{text}");
        assert_eq!(load(&path).unwrap(), s);
    }

    #[test]
    fn rejects_state_with_unknown_fault_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        save(&path, &sample_new_kinds()).unwrap();
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("IO_OP_WRITE_ZEROES", "IO_OP_FROB");
        fs::write(&path, text).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("unknown op \"IO_OP_FROB\""), "{e}");
    }

    #[test]
    fn rejects_state_with_throttle_group_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        save(&path, &sample_new_kinds()).unwrap();
        // Change the first bucket of one group member only.
        let text =
            fs::read_to_string(&path)
                .unwrap()
                .replacen("\"rate\": 1000,", "\"rate\": 999,", 1);
        fs::write(&path, text).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("throttle group \"g\""), "{e}");
    }

    /// Rewrites the state file at `path` through `edit` on its JSON.
    fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut v);
        fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }

    #[test]
    fn generation_round_trips_and_defaults_to_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let s = sample();
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"generation\": 7"), "{text}");
        assert_eq!(load(&path).unwrap(), s);
        // A file written before generations existed.
        edit_json(&path, |v| {
            v["exports"][0]
                .as_object_mut()
                .unwrap()
                .remove("generation");
        });
        assert!(!fs::read_to_string(&path).unwrap().contains("generation"));
        assert_eq!(load(&path).unwrap().exports["e0"].generation, 0);
    }

    #[test]
    fn fault_limits_round_trip_and_default_to_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let s = sample_new_kinds();
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"max_transfer\": 65536"), "{text}");
        assert!(text.contains("\"buf_alignment\": 4096"), "{text}");
        assert_eq!(load(&path).unwrap(), s);
        // Absent (an older file): zero.
        edit_json(&path, |v| {
            for n in v["nodes"].as_array_mut().unwrap() {
                let fi = n
                    .get_mut("driver")
                    .and_then(|d| d.get_mut("fault_injection"))
                    .and_then(|f| f.as_object_mut());
                if let Some(fi) = fi {
                    fi.remove("max_transfer");
                    fi.remove("max_segments");
                    fi.remove("buf_alignment");
                }
            }
        });
        assert!(!fs::read_to_string(&path).unwrap().contains("max_transfer"));
        let loaded = load(&path).unwrap();
        let Some(Driver::FaultInjection(o)) = &loaded.graph.get("fi").unwrap().driver else {
            panic!("fi is not a fault-injection node");
        };
        assert_eq!((o.max_transfer, o.max_segments, o.buf_alignment), (0, 0, 0));
    }

    /// `sample()` plus a zoned node over a null node, a raw window and a
    /// throttle over it, exported.
    fn sample_zoned(capacity: u64, max_open: u32) -> State {
        let mut s = sample();
        let nodes = [
            NodeSpec {
                name: "zn".into(),
                driver: Some(Driver::Null(NullOptions {
                    size: 64 << 20,
                    latency_ns: 0,
                })),
            },
            NodeSpec {
                name: "z".into(),
                driver: Some(Driver::Zoned(ZonedOptions {
                    child: "zn".into(),
                    zone_size: 4 << 20,
                    zone_capacity: capacity,
                    max_open_zones: max_open,
                    max_active_zones: max_open * 2,
                    metadata_path: "/var/lib/blkmesh/z.zones".into(),
                })),
            },
            NodeSpec {
                name: "zr".into(),
                driver: Some(Driver::Raw(RawOptions {
                    child: "z".into(),
                    offset: 8 << 20,
                    size: 0,
                })),
            },
        ];
        for spec in nodes {
            s.graph.add(spec).unwrap();
        }
        s.sizes.insert("zn".into(), 64 << 20);
        s.sizes.insert("z".into(), 64 << 20);
        s.sizes.insert("zr".into(), 56 << 20);
        let export = validate_export(&VhostUserBlkExport {
            id: "ez".into(),
            node: "zr".into(),
            socket: "/run/ez.sock".into(),
            num_queues: 2,
            ..Default::default()
        })
        .unwrap();
        s.exports.insert(
            "ez".into(),
            ExportRecord {
                export,
                queues: vec!["w0".into(), "w0".into()],
                generation: 1,
            },
        );
        s
    }

    #[test]
    fn zoned_nodes_round_trip_with_zero_fields_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let s = sample_zoned(3 << 20, 4);
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"zoned\""), "{text}");
        assert!(text.contains("\"zone_capacity\": 3145728"), "{text}");
        assert!(
            text.contains("\"metadata_path\": \"/var/lib/blkmesh/z.zones\""),
            "{text}"
        );
        assert_eq!(load(&path).unwrap(), s);

        let s = sample_zoned(0, 0);
        save(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        for absent in ["zone_capacity", "max_open_zones", "max_active_zones"] {
            assert!(!text.contains(absent), "{absent}: {text}");
        }
        assert_eq!(load(&path).unwrap(), s);
    }

    #[test]
    fn file_from_before_zoned_nodes_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        // As an older manager wrote it: no zoned driver, no zone fields.
        let old = r#"{
  "version": 1,
  "nodes": [
    { "name": "n0", "size": 1048576, "driver": { "null": { "size": 1048576, "latency_ns": 5 } } },
    { "name": "r0", "size": 1048064, "driver": { "raw": { "child": "n0", "offset": 512, "size": 0 } } }
  ],
  "exports": [
    { "id": "e0", "node": "r0", "socket": "/run/e0.sock", "num_queues": 2, "queue_size": 256,
      "logical_block_size": 512, "writable": false, "serial": "e0", "queues": ["w0", "w0"],
      "generation": 7 }
  ],
  "workers": [ { "name": "w0", "socket": "/run/w0.sock", "pid": 42 } ]
}"#;
        fs::write(&path, old).unwrap();
        assert_eq!(load(&path).unwrap(), sample());
    }

    #[test]
    fn rejects_state_breaking_zoned_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        // A spread export over a zoned node.
        let mut s = sample_zoned(0, 0);
        s.exports.get_mut("ez").unwrap().export.spread_queues = true;
        save(&path, &s).unwrap();
        let e = load(&path).unwrap_err();
        assert!(
            e.to_string().contains("spreads its queues over zoned node"),
            "{e}"
        );
        // A raw window that is not zone-aligned.
        save(&path, &sample_zoned(0, 0)).unwrap();
        edit_json(&path, |v| {
            for n in v["nodes"].as_array_mut().unwrap() {
                if n["name"] == "zr" {
                    n["driver"]["raw"]["offset"] = 4096.into();
                }
            }
        });
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("node.raw.offset"), "{e}");
        // Two zoned nodes sharing a metadata file.
        let mut s = sample_zoned(0, 0);
        // n0 becomes the child of z2 instead of r0.
        s.exports.clear();
        s.graph.remove("r0").unwrap();
        s.graph
            .add(NodeSpec {
                name: "z2".into(),
                driver: Some(Driver::Zoned(ZonedOptions {
                    child: "n0".into(),
                    zone_size: 1 << 20,
                    metadata_path: "/var/lib/blkmesh/z.zones".into(),
                    ..Default::default()
                })),
            })
            .unwrap();
        s.sizes.remove("r0");
        s.sizes.insert("z2".into(), 1 << 20);
        save(&path, &s).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("node.zoned.metadata_path"), "{e}");
    }

    #[test]
    fn rejects_state_with_bad_fault_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        save(&path, &sample_new_kinds()).unwrap();
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("\"buf_alignment\": 4096", "\"buf_alignment\": 3000");
        fs::write(&path, text).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("buf_alignment"), "{e}");
    }
}
