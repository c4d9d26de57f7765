//! Nodes and exports: shortcuts to the gRPC calls tests make most, and
//! [`Cluster::add_export`]'s wait for the export's socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use blkmesh_proto::v1::{ExportInfo, NodeInfo, VhostUserBlkExport, WorkerInfo};

use super::options::{ClusterOptions, ExportOpts};
use super::{wait_for_path, Cluster};
use crate::client::ClientError;

/// How long [`Cluster::add_export`] waits for the socket file.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

impl Cluster {
    /// See [`BlockingClient::add_io_uring`](crate::BlockingClient::add_io_uring).
    pub fn add_io_uring(
        &self,
        name: &str,
        path: &Path,
        direct: bool,
        read_only: bool,
    ) -> Result<NodeInfo, ClientError> {
        self.client().add_io_uring(name, path, direct, read_only)
    }

    /// One worker serving a sparse image of `size` bytes as node `file`,
    /// under node `slow` that holds every request of `ops` for `delay`
    /// ([`crate::delay_node`]): requests in flight for a test to act on.
    /// Returns the cluster and the image path.
    pub fn with_delayed_file(
        size: u64,
        ops: &[blkmesh_proto::v1::IoOp],
        delay: Duration,
    ) -> (Cluster, PathBuf) {
        let cluster = Cluster::start(ClusterOptions::default().workers(1));
        let image = cluster.sparse_image("d.img", size);
        cluster.add_io_uring("file", &image, false, false).unwrap();
        cluster
            .client()
            .add_node(crate::fixtures::delay_node("slow", "file", ops, delay))
            .unwrap();
        (cluster, image)
    }

    /// See [`BlockingClient::add_null`](crate::BlockingClient::add_null).
    pub fn add_null(&self, name: &str, size: u64) -> Result<NodeInfo, ClientError> {
        self.client().add_null(name, size)
    }

    /// See [`BlockingClient::add_raw`](crate::BlockingClient::add_raw).
    pub fn add_raw(
        &self,
        name: &str,
        child: &str,
        offset: u64,
        size: u64,
    ) -> Result<NodeInfo, ClientError> {
        self.client().add_raw(name, child, offset, size)
    }

    /// Adds an export and waits (10 s) until its socket file exists. Only
    /// the file is checked: the frontend serves one vhost-user connection
    /// at a time, so a probe connection could get in a test's way.
    pub fn add_export(&self, opts: ExportOpts) -> Result<PathBuf, ClientError> {
        let socket = opts
            .socket
            .unwrap_or_else(|| self.run_dir().join(format!("{}.sock", opts.id)));
        self.client().add_export(VhostUserBlkExport {
            id: opts.id.clone(),
            node: opts.node,
            socket: socket.display().to_string(),
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            logical_block_size: opts.logical_block_size,
            writable: opts.writable,
            serial: opts.serial,
            spread_queues: opts.spread_queues,
        })?;
        if wait_for_path(&socket, true, SOCKET_TIMEOUT) {
            Ok(socket)
        } else {
            Err(ClientError::Timeout {
                what: format!(
                    "the frontend to create export {:?}'s socket {}",
                    opts.id,
                    socket.display()
                ),
                timeout: SOCKET_TIMEOUT,
            })
        }
    }

    /// Removes an export (no waiting for its socket to go).
    pub fn remove_export(&self, id: &str) -> Result<(), ClientError> {
        self.client().remove_export(id)
    }

    /// See [`BlockingClient::list_exports`](crate::BlockingClient::list_exports).
    pub fn list_exports(&self) -> Result<Vec<ExportInfo>, ClientError> {
        self.client().list_exports()
    }

    /// See [`BlockingClient::list_workers`](crate::BlockingClient::list_workers).
    pub fn list_workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        self.client().list_workers()
    }
}
