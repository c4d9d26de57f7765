//! Block-job commands from the manager (the gRPC `JobService`), forwarded
//! as a `job_command` on the frontend's agent session: the frontend passes
//! the request to the worker that holds the export's graph (queue 0's;
//! a graph with a writable qcow2 node is on one worker) with the control
//! message `JobRequest`, and answers with a `job_answer` carrying the
//! command's id.

use std::sync::Arc;
use std::time::Duration;

use blkmesh_proto::agent::v1::job_answer::Result as JobDone;
use blkmesh_proto::agent::v1::ZoneError;
use blkmesh_proto::ipc::v1 as ipc;

use crate::workers::{LinkError, WorkerLinks};

/// How long a command waits for a worker that is being replaced.
const FAILOVER_WAIT: Duration = Duration::from_secs(3);

pub(crate) fn error(errno: i32, message: impl Into<String>) -> JobDone {
    JobDone::Error(ZoneError {
        errno,
        message: message.into(),
    })
}

/// Runs `req` on queue 0's worker of the export (`Err`: the export is not
/// served here) and returns the answer for the manager. Blocking.
pub fn run(links: Result<Arc<WorkerLinks>, JobDone>, req: Option<ipc::JobRequest>) -> JobDone {
    let links = match links {
        Ok(l) => l,
        Err(e) => return e,
    };
    let Some(req) = req else {
        return error(libc::EINVAL, "a job command without a request");
    };
    match links.job(0, req, FAILOVER_WAIT) {
        Ok(status) => JobDone::Status(status),
        Err(LinkError::Refused { errno, message, .. }) => error(errno, message),
        Err(e @ LinkError::Dead { .. }) => error(libc::EAGAIN, crate::error_chain(&e)),
        Err(e @ LinkError::Protocol { .. }) => error(libc::EPROTO, crate::error_chain(&e)),
        Err(e) => error(libc::EIO, crate::error_chain(&e)),
    }
}
