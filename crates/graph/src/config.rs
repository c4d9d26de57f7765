//! The declarative configuration file: nodes and exports in TOML, applied
//! by the manager at start (`--config`) and reconciled with its persisted
//! state (the manager's `reconcile.rs`), checked offline by
//! `blkmeshctl config check` and `blkmesh up` ([`check`]).
//!
//! ```toml
//! [[node]]
//! name = "disk0"
//! io_uring = { path = "/var/lib/blkmesh/images/disk0.img", direct = false }
//! create = { size = "1G" }          # a sparse file, when it is missing
//!
//! [[node]]
//! name = "slow"
//! throttle = { child = "disk0", iops = 5000, bps = "200M", group = "tenant1" }
//!
//! [[export]]
//! id = "disk0"
//! node = "slow"
//! socket = "/run/blkmesh/disk0.sock"
//! writable = true
//! num_queues = 2
//! ```
//!
//! `deploy/config/blkmesh.toml` documents every key. Field names follow the
//! API (`proto/proto/blkmesh/v1/*.proto`), with the CLI's friendly forms:
//! sizes as `"1G"` or integers ([`crate::size`]), durations with a unit,
//! throttle limits as blkmeshctl's `iops`/`bps_read_burst`/..., fault rules
//! as blkmeshctl's `--rule` text or as a table of the same keys
//! ([`crate::rule`]).
//!
//! Every error names the file, the line and column, and the field as a path
//! in the file (`node[2].throttle.iops`, 0-based indices): syntax errors
//! from the TOML parser, type and key errors from this module, and the
//! API's own validation run by [`check`] (and by the manager at start),
//! whose field names (`node.throttle.limits.iops_total.rate`) are mapped to
//! the file's.

mod check;
mod document;
mod fields;
mod generic;
mod parse;
mod reader;

use std::path::Path;

pub use check::{check_file, check_new_node, FileCheck};
pub use document::{Config, ConfigError, ConfigErrors, ConfigExport, ConfigNode, MAX_CONFIG_LEN};
pub use fields::FieldError;
pub use parse::{load, parse};

/// Reads and parses the file at `path` and runs the API's validation on it
/// as a whole: every node and export as AddNode and AddExport would check
/// it against an empty manager (names, children, sizes, throttle groups,
/// zoned rules, duplicate names and sockets), without touching the
/// filesystem. What the manager checks at start besides: the paths (files,
/// devices, sockets) and the objects it already has.
pub fn check(path: &Path) -> Result<Config, ConfigErrors> {
    let config = load(path)?;
    check::validate(&config)?;
    Ok(config)
}

/// Like [`check`], for text.
pub fn check_str(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    let config = parse(file, text)?;
    check::validate(&config)?;
    Ok(config)
}

#[cfg(test)]
mod tests;
