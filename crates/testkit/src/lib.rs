//! `blkmesh-testkit`: a harness for end-to-end tests that start the real
//! blkmesh processes (`blkmesh-manager`, `blkmesh-worker` ×N,
//! `blkmesh-frontend`) and drive them over the public gRPC API.
//!
//! Build the binaries first (`cargo build --bins`); [`bin_path`] finds them
//! next to the test executable, or in `$BLKMESH_BIN_DIR`.
//!
//! ```no_run
//! use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};
//!
//! let cluster = Cluster::start(ClusterOptions::default());
//! cluster.add_null("null0", 64 << 20).unwrap();
//! let socket = cluster.add_export(ExportOpts::new("disk0", "null0")).unwrap();
//! let out = cluster.run_tool("blkmesh-io", ["--socket", socket.to_str().unwrap(), "-c", "info"]);
//! assert!(out.status.success());
//! // Dropping the cluster stops every process (SIGTERM, then SIGKILL).
//! ```
//!
//! Every process writes stdout and stderr to `<cluster dir>/logs/<name>.log`
//! (restarts append to the same file). The logs are printed to stderr when a
//! cluster is dropped during a panic, i.e. when a test fails. Set
//! `BLKMESH_TEST_KEEP=1` to keep the directory (logs, state, images) afterwards.
//!
//! [`guest`] boots a real Linux guest (QEMU, TCG) on an export and runs
//! `blkmesh-guest-check` in it: [`GuestImage`], [`GuestVm`].
//!
//! The API is blocking: gRPC calls run on a private current-thread tokio
//! runtime, so plain `#[test]` functions can use it. Do not call it from
//! inside an async runtime.

#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed test, with its place"
)]

mod client;
mod cluster;
pub mod guest;
mod process;
mod tool;

use std::path::PathBuf;

pub use blkmesh_proto::v1::WorkerState;
pub use client::{BlockingClient, ClientError};
pub use cluster::{wait_for_path, Cluster, ClusterOptions, ExportOpts, KEEP_ENV};
pub use guest::{GuestError, GuestImage, GuestOptions, GuestOutcome, GuestVm};
pub use tool::{run_tool, run_tool_timeout, DEFAULT_TOOL_TIMEOUT};

/// Test data that differs per 512-byte sector and per `seed`, so a write
/// that lands in the wrong place, or an old one over a new one, shows.
pub fn sector_pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

/// A fault-injection node `name` over `child` that holds every request of
/// `ops` for `delay` (none when `delay` is zero): requests in flight for a
/// test to act on.
pub fn delay_node(
    name: &str,
    child: &str,
    ops: &[blkmesh_proto::v1::IoOp],
    delay: std::time::Duration,
) -> blkmesh_proto::v1::NodeSpec {
    use blkmesh_proto::v1::{fault_rule, node_spec::Driver, FaultInjectionOptions, FaultRule};
    let rules = if delay.is_zero() {
        Vec::new()
    } else {
        vec![FaultRule {
            ops: ops.iter().map(|&o| o as i32).collect(),
            action: Some(fault_rule::Action::DelayNs(delay.as_nanos() as u64)),
            ..Default::default()
        }]
    };
    blkmesh_proto::v1::NodeSpec {
        name: name.into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            rules,
            ..Default::default()
        })),
    }
}

/// Environment variable naming the directory of the blkmesh binaries.
pub const BIN_DIR_ENV: &str = "BLKMESH_BIN_DIR";

/// The directory holding the workspace binaries: `$BLKMESH_BIN_DIR` if set,
/// else the directory of the running executable, or its parent when that is
/// a `deps/` directory (where cargo puts test binaries).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("blkmesh-testkit: cannot locate the current executable: {e}"));
    bin_dir_from_exe(&exe)
}

/// The bin directory for an executable at `exe` (see [`bin_dir`]).
fn bin_dir_from_exe(exe: &std::path::Path) -> PathBuf {
    let mut dir = exe
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of the workspace binary `name` (e.g. `"blkmesh-manager"`).
///
/// # Panics
///
/// If the binary does not exist: build the binaries first
/// (`cargo build --bins`) or point `$BLKMESH_BIN_DIR` at them.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "blkmesh-testkit: binary {name:?} not found at {}; build the binaries first: \
             cargo build --bins (or set {BIN_DIR_ENV} to their directory)",
            path.display()
        );
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn bin_dir_skips_cargo_deps_directory() {
        assert_eq!(
            bin_dir_from_exe(Path::new("/ws/target/debug/deps/cluster_smoke-1234")),
            Path::new("/ws/target/debug")
        );
    }

    #[test]
    fn bin_dir_keeps_plain_directory() {
        assert_eq!(
            bin_dir_from_exe(Path::new("/ws/target/debug/blkmesh")),
            Path::new("/ws/target/debug")
        );
    }

    #[test]
    #[should_panic(expected = "build the binaries first")]
    fn bin_path_panics_with_hint_for_missing_binary() {
        bin_path("blkmesh-no-such-binary");
    }
}
