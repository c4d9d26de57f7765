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

mod bins;
mod client;
mod cluster;
mod fixtures;
pub mod guest;
mod process;
mod tool;

pub use bins::{bin_dir, bin_path, BIN_DIR_ENV};
pub use blkmesh_proto::v1::WorkerState;
pub use client::{BlockingClient, ClientError};
pub use cluster::{wait_for_path, Cluster, ClusterOptions, ExportOpts, KEEP_ENV};
pub use fixtures::{delay_node, sector_pattern};
pub use guest::{GuestError, GuestImage, GuestOptions, GuestOutcome, GuestVm};
pub use tool::{
    host_tool, output_text, qcow2_overlay, run_tool, run_tool_timeout, stdout_of, verify_load,
    DEFAULT_TOOL_TIMEOUT,
};
