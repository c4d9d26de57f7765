//! The on-disk form of the manager's state (`<state-dir>/state.json`,
//! replaced atomically after every change): reading it back with every rule
//! the API enforces, and writing it durably.
//!
//! Version 2 keeps each node and export as the API takes it, in the
//! protobuf JSON mapping of its message (`blkmesh_proto`'s pbjson serde
//! impls, with the .proto field names), inside a small envelope of what the
//! manager adds: sizes, queue placement, generations, config marks and the
//! workers seen. A node kind added to the .proto is stored without a change
//! here. Version 1 (a hand-written mirror of every kind) is read once
//! ([`v1`]); the next save writes version 2.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blkmesh_graph::{
    validate_export, validate_name, validate_node_limits, validate_socket_path, Graph,
};
use blkmesh_proto::v1::{NodeSpec, VhostUserBlkExport};
use serde::{Deserialize, Serialize};

use crate::core::state::{ExportRecord, State, WorkerRecord};
use crate::core::zoned;
use crate::error::ManagerError;

mod v1;

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// The version [`save`] writes.
const STATE_VERSION: u32 = 2;

// ----- on-disk form -----

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    nodes: Vec<StoredNode>,
    exports: Vec<StoredExport>,
    workers: Vec<StoredWorker>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredNode {
    /// The node as the API takes it.
    spec: NodeSpec,
    /// Its size in bytes (0: not known until a worker opens it).
    size: u64,
    /// Added from a configuration file (absent: through the API).
    #[serde(default, skip_serializing_if = "is_false")]
    managed_by_config: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredExport {
    /// The normalized export, as the API takes it.
    export: VhostUserBlkExport,
    /// Worker name per queue.
    queues: Vec<String>,
    /// Plan generation.
    #[serde(default)]
    generation: u64,
    /// Added from a configuration file (absent: through the API).
    #[serde(default, skip_serializing_if = "is_false")]
    managed_by_config: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredWorker {
    name: String,
    socket: String,
    pid: u32,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The on-disk form of `state`.
fn to_file(state: &State) -> StateFile {
    StateFile {
        version: STATE_VERSION,
        nodes: state
            .graph
            .iter()
            // Never in a validated graph.
            .filter(|spec| spec.driver.is_some())
            .map(|spec| StoredNode {
                spec: spec.clone(),
                size: state.sizes.get(&spec.name).copied().unwrap_or(0),
                managed_by_config: state.config_nodes.contains(&spec.name),
            })
            .collect(),
        exports: state
            .exports
            .values()
            .map(|r| StoredExport {
                export: r.export.clone(),
                queues: r.queues.clone(),
                generation: r.generation,
                managed_by_config: state.config_exports.contains(&r.export.id),
            })
            .collect(),
        workers: state
            .workers
            .iter()
            .map(|(name, w)| StoredWorker {
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
        let spec = n.spec;
        if n.managed_by_config {
            config_nodes.insert(spec.name.clone());
        }
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
            config_exports.insert(e.export.id.clone());
        }
        let export = e.export;
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

/// Reads a state file's text: version 1 is reshaped into version 2 first.
fn parse(text: &str) -> Result<StateFile, String> {
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if value.get("version") == Some(&serde_json::Value::from(1)) {
        value = v1::upgrade(value)?;
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
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
    let file = parse(&text).map_err(corrupt)?;
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
