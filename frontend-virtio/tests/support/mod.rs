//! An export served in this process, on fake workers, driven by the
//! vhost-user-blk test driver over its socket: the whole frontend but
//! the manager and the worker processes, in milliseconds.

pub mod fake_worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkmesh_frontend::export::ExportServer;
use blkmesh_proto::v1::{ExportPlan, ExportState, QueueEndpoint, VhostUserBlkExport};
use blkmesh_vhost_user_client::{Options, VhostUserBlk};

pub use fake_worker::{disk, Disk, FakeWorker};

/// Bytes of the test disk.
pub const DISK_BYTES: usize = 1 << 20;

pub struct Harness {
    pub disk: Disk,
    pub export: ExportServer,
    pub socket: PathBuf,
}

/// A plan for `queues` queues, queue `q` on `workers[q % len]`.
pub fn plan(socket: &str, workers: &[&FakeWorker], queues: u32, generation: u64) -> ExportPlan {
    ExportPlan {
        commit_finish: String::new(),
        export: Some(VhostUserBlkExport {
            id: "disk0".into(),
            node: "root".into(),
            socket: socket.into(),
            num_queues: queues,
            queue_size: 128,
            logical_block_size: 512,
            writable: true,
            ..Default::default()
        }),
        nodes: vec![],
        queues: (0..queues)
            .map(|q| {
                let w = workers[q as usize % workers.len()];
                QueueEndpoint {
                    queue: q,
                    worker: w.name.clone(),
                    worker_socket: w.socket_str().to_string(),
                }
            })
            .collect(),
        generation,
    }
}

impl Harness {
    /// A temporary directory for the sockets (the test keeps it) and a
    /// disk for the workers to serve.
    pub fn dir() -> (tempfile::TempDir, Disk) {
        (tempfile::tempdir().expect("tempdir"), disk(DISK_BYTES))
    }

    /// Serves `plan` (see [`plan`]) in this process.
    pub fn serve(disk: Disk, plan: ExportPlan) -> Harness {
        // No manager to tell of the export's state.
        let sink = Arc::new(|_: &ExportPlan, _: ExportState, _: String, _: u64| {});
        let socket = PathBuf::from(&plan.export.as_ref().expect("export").socket);
        let export = ExportServer::start(plan, sink).expect("export starts");
        Harness {
            disk,
            export,
            socket,
        }
    }

    /// Where the export listens, for [`plan`].
    pub fn export_socket(dir: &tempfile::TempDir) -> String {
        dir.path()
            .join("export.sock")
            .to_str()
            .expect("utf-8")
            .into()
    }

    /// A worker socket path in the test directory.
    pub fn worker_socket(dir: &tempfile::TempDir, name: &str) -> PathBuf {
        dir.path().join(format!("{name}.sock"))
    }

    /// Connects the test driver (a VMM) with `queues` queues.
    pub fn connect(&self, queues: u16, inflight: bool) -> VhostUserBlk {
        VhostUserBlk::connect(
            &self.socket,
            Options::default()
                .queues(queues)
                .inflight(inflight)
                .timeout(Duration::from_secs(10)),
        )
        .expect("VMM connects")
    }
}

/// Waits up to 10 s for `cond`.
pub fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `len` bytes of a pattern that names `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(31))
        .collect()
}
