//! `job stream|commit|list|show|cancel|complete|wait`: block jobs on an
//! export's qcow2 chain.

use std::time::{Duration, Instant};

use blkmesh_graph::size::parse_size;
use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::job_service_client::JobServiceClient;
use blkmesh_proto::v1::{
    CancelJobRequest, CompleteJobRequest, GetJobRequest, JobKind, JobState, ListJobsRequest,
    StartJobRequest,
};
use clap::Subcommand;

use crate::failure::Failure;
use crate::view::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum JobCmd {
    /// Copy what the export's top image reads from its backing chain into
    /// it, then drop its backing node (QEMU's block-stream). Completes by
    /// itself.
    Stream {
        /// Job id (unique; same rules as node names).
        id: String,
        /// The export whose top node (a qcow2 node with a backing node) is
        /// streamed into.
        export: String,
        /// Go through at most this many bytes of the disk per second
        /// (k/M/G suffixes; 0 = no limit).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        speed: u64,
    },
    /// Copy the export's top image into its backing image and follow new
    /// writes (QEMU's block-commit of the active layer); `job complete`
    /// then switches the export to the backing node.
    Commit {
        /// Job id.
        id: String,
        /// The export whose top node is committed into its backing node.
        export: String,
        /// As for stream.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        speed: u64,
    },
    /// List the manager's jobs.
    List,
    /// Show one job.
    Show { id: String },
    /// Stop a running or ready job (what it copied stays); forget a
    /// finished one.
    Cancel { id: String },
    /// Switch a READY commit's export over to its backing node, live.
    Complete { id: String },
    /// Wait until a job is in STATE (ready, completed, ...) and show it;
    /// fails if it ends otherwise or the time runs out.
    Wait {
        id: String,
        /// ready, completed, cancelled or failed.
        #[arg(long, default_value = "completed")]
        state: String,
        /// Seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

fn state_named(name: &str) -> Result<JobState, Failure> {
    JobState::from_str_name(&format!("JOB_STATE_{}", name.to_uppercase())).ok_or_else(|| Failure {
        code: "INVALID_ARGUMENT",
        message: format!("--state: unknown job state {name:?}"),
    })
}

pub(crate) async fn job(cmd: JobCmd, channel: ManagerChannel, out: Output) -> Result<(), Failure> {
    let mut client = JobServiceClient::new(channel);
    let start = |id: String, export: String, kind: JobKind, speed: u64| StartJobRequest {
        id,
        kind: kind as i32,
        export,
        speed,
    };
    let job = match cmd {
        JobCmd::Stream { id, export, speed } => {
            client
                .start_job(start(id, export, JobKind::Stream, speed))
                .await?
                .into_inner()
                .job
        }
        JobCmd::Commit { id, export, speed } => {
            client
                .start_job(start(id, export, JobKind::Commit, speed))
                .await?
                .into_inner()
                .job
        }
        JobCmd::List => {
            let jobs = client
                .list_jobs(ListJobsRequest {})
                .await?
                .into_inner()
                .jobs;
            out.jobs(&jobs);
            return Ok(());
        }
        JobCmd::Show { id } => client.get_job(GetJobRequest { id }).await?.into_inner().job,
        JobCmd::Cancel { id } => {
            client
                .cancel_job(CancelJobRequest { id })
                .await?
                .into_inner()
                .job
        }
        JobCmd::Complete { id } => {
            client
                .complete_job(CompleteJobRequest { id })
                .await?
                .into_inner()
                .job
        }
        JobCmd::Wait { id, state, timeout } => {
            let want = state_named(&state)?;
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let j = client
                    .get_job(GetJobRequest { id: id.clone() })
                    .await?
                    .into_inner()
                    .job
                    .unwrap_or_default();
                let now = j.state();
                if now == want {
                    break Some(j);
                }
                let ended = matches!(
                    now,
                    JobState::Completed | JobState::Cancelled | JobState::Failed
                );
                if ended || Instant::now() > deadline {
                    return Err(Failure {
                        code: "FAILED_PRECONDITION",
                        message: format!(
                            "job {id:?} is {} ({}), not {state}",
                            j.state().as_str_name(),
                            j.message
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    out.jobs(&job.into_iter().collect::<Vec<_>>());
    Ok(())
}
