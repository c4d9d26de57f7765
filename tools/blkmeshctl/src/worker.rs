//! `worker list|move-queue|drain`.

use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::{DrainWorkerRequest, ListWorkersRequest, MoveQueueRequest};
use clap::Subcommand;

use crate::failure::Failure;
use crate::view::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum WorkerCmd {
    /// List workers.
    List,
    /// Move one queue of an export to another (live) worker, without
    /// failing any request. The queues of an export over a zoned node stay
    /// on one worker: move them all with `node move`.
    MoveQueue {
        /// Export id.
        export: String,
        /// Queue index (0-based).
        queue: u32,
        /// Destination worker.
        worker: String,
    },
    /// Move every queue off a worker to the least loaded other live
    /// workers (for maintenance).
    Drain {
        /// The worker to empty.
        worker: String,
    },
}

pub(crate) async fn worker(
    cmd: WorkerCmd,
    channel: ManagerChannel,
    out: Output,
) -> Result<(), Failure> {
    let mut client = WorkerServiceClient::new(channel);
    match cmd {
        WorkerCmd::List => {
            let workers = client
                .list_workers(ListWorkersRequest {})
                .await?
                .into_inner()
                .workers;
            out.workers(&workers);
        }
        WorkerCmd::MoveQueue {
            export,
            queue,
            worker,
        } => {
            let info = client
                .move_queue(MoveQueueRequest {
                    export,
                    queue,
                    worker,
                })
                .await?
                .into_inner()
                .export
                .unwrap_or_default();
            out.export(&info);
        }
        WorkerCmd::Drain { worker } => {
            let moved = client
                .drain_worker(DrainWorkerRequest {
                    worker: worker.clone(),
                })
                .await?
                .into_inner()
                .moved;
            out.moved(
                &moved,
                &format!("worker {worker} has no queues; nothing moved"),
            );
        }
    }
    Ok(())
}
