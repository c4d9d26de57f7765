//! Block jobs on a graph's qcow2 node (the gRPC `JobService`, through the
//! frontend's `JobRequest`): **stream** copies what the image reads from
//! its backing chain into it, then drops the backing file from its header;
//! **commit** copies what the image holds into its backing image, follows
//! the writes that come after ([`DirtyMap`]), and once the frontend
//! switches the export to the backing node, makes the last copy while no
//! request runs ([`finish_commit`]).
//!
//! A job runs on its own thread and holds its node's layer. Jobs are this
//! process's: a worker that dies takes its jobs with it, and the manager
//! starts them again where the export went (both are idempotent: a stream
//! skips what it copied, a commit copies again).

mod copy;
mod dirty;

pub use self::dirty::DirtyMap;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blkmesh_proto::ipc::v1::{JobAction, JobRequest, JobStatus};
use blkmesh_proto::v1::{JobKind, JobState};

use crate::errno::Errno;
use crate::qcow2::Qcow2Layer;

/// Why a job step was refused: an errno and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub errno: Errno,
    pub message: String,
}

fn refuse(errno: Errno, message: impl Into<String>) -> JobError {
    JobError {
        errno,
        message: message.into(),
    }
}

/// A job of this process.
#[derive(Debug)]
struct Job {
    id: String,
    kind: JobKind,
    node: String,
    /// Bytes per second the copy goes through at most (0: no limit).
    speed: u64,
    cancel: AtomicBool,
    /// Cancelled because a new graph opens the node ([`release_node`]).
    interrupted: AtomicBool,
    /// A commit's final copy is asked for (the export is switching over).
    finish: AtomicBool,
    progress: Mutex<Progress>,
    changed: Condvar,
}

#[derive(Debug, Clone)]
struct Progress {
    state: JobState,
    done: u64,
    total: u64,
    message: String,
}

impl Job {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self) -> JobStatus {
        let p = self.progress().clone();
        JobStatus {
            job: self.id.clone(),
            kind: self.kind as i32,
            state: p.state as i32,
            done: p.done,
            total: p.total,
            message: p.message,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress());
        self.changed.notify_all();
    }

    fn active(&self) -> bool {
        matches!(
            self.progress().state,
            JobState::Running | JobState::Ready | JobState::Completing
        )
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Sleeps until `timeout` passed or the job was told something.
    fn wait(&self, timeout: Duration) {
        let p = self.progress();
        if !self.cancelled() && !self.finish.load(Ordering::Relaxed) {
            let _ = self.changed.wait_timeout(p, timeout);
        }
    }
}

static JOBS: Mutex<BTreeMap<String, Arc<Job>>> = Mutex::new(BTreeMap::new());

fn jobs() -> MutexGuard<'static, BTreeMap<String, Arc<Job>>> {
    JOBS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Longest job id.
const MAX_ID: usize = 128;

/// Runs a job request on the graph's qcow2 node `layer` (`None`: the
/// graph has none); `read_only`: the graph is opened read-only.
pub fn request(
    layer: Option<&Arc<Qcow2Layer>>,
    read_only: bool,
    req: &JobRequest,
) -> Result<JobStatus, JobError> {
    if req.job.is_empty() || req.job.len() > MAX_ID {
        return Err(refuse(
            Errno::EINVAL,
            format!("a job id is 1 to {MAX_ID} bytes"),
        ));
    }
    match JobAction::try_from(req.action) {
        Ok(JobAction::Status) => status(&req.job),
        Ok(JobAction::Cancel) => {
            let job = find(&req.job)?;
            job.cancel.store(true, Ordering::Relaxed);
            job.changed.notify_all();
            Ok(job.status())
        }
        Ok(JobAction::Start) => {
            let kind = JobKind::try_from(req.kind)
                .ok()
                .filter(|k| *k != JobKind::Unspecified)
                .ok_or_else(|| refuse(Errno::EINVAL, format!("unknown job kind {}", req.kind)))?;
            let layer = layer
                .ok_or_else(|| refuse(Errno::EINVAL, "the export's graph has no qcow2 node"))?;
            if read_only {
                return Err(refuse(Errno::EROFS, "the export's graph is read-only"));
            }
            start(&req.job, kind, req.speed, layer)
        }
        Err(_) => Err(refuse(
            Errno::EINVAL,
            format!("unknown job action {}", req.action),
        )),
    }
}

fn find(id: &str) -> Result<Arc<Job>, JobError> {
    jobs()
        .get(id)
        .cloned()
        .ok_or_else(|| refuse(Errno::ENOENT, format!("no job {id:?} in this worker")))
}

fn status(id: &str) -> Result<JobStatus, JobError> {
    find(id).map(|j| j.status())
}

/// Starts job `id` on `layer`; a job of that id that is still active is
/// left as it is (the manager may ask twice).
fn start(
    id: &str,
    kind: JobKind,
    speed: u64,
    layer: &Arc<Qcow2Layer>,
) -> Result<JobStatus, JobError> {
    let mut all = jobs();
    if let Some(j) = all.get(id).filter(|j| j.active()) {
        return Ok(j.status());
    }
    if let Some(other) = all.values().find(|j| j.node == layer.node() && j.active()) {
        return Err(refuse(
            Errno::EBUSY,
            format!("job {:?} already runs on node {}", other.id, layer.node()),
        ));
    }
    if layer.backing().is_empty() {
        return Err(refuse(
            Errno::EINVAL,
            format!("node {} has no backing node", layer.node()),
        ));
    }
    let job = Arc::new(Job {
        id: id.to_string(),
        kind,
        node: layer.node().to_string(),
        speed,
        cancel: AtomicBool::new(false),
        interrupted: AtomicBool::new(false),
        finish: AtomicBool::new(false),
        progress: Mutex::new(Progress {
            state: JobState::Running,
            done: 0,
            total: layer.size(),
            message: String::new(),
        }),
        changed: Condvar::new(),
    });
    let (j, l) = (Arc::clone(&job), Arc::clone(layer));
    std::thread::Builder::new()
        .name(format!("job-{}", id.chars().take(10).collect::<String>()))
        .spawn(move || run(&j, l))
        .map_err(|e| refuse(Errno::EAGAIN, format!("cannot start the job's thread: {e}")))?;
    tracing::info!(job = id, node = layer.node(), ?kind, "job started");
    all.insert(id.to_string(), Arc::clone(&job));
    Ok(job.status())
}

/// The job's thread: runs it to its end and records how it ended.
fn run(job: &Job, layer: Arc<Qcow2Layer>) {
    let result = match job.kind {
        JobKind::Commit => copy::commit(job, layer),
        _ => copy::stream(job, &layer),
    };
    let (state, message) = match result {
        Ok(()) if job.interrupted.load(Ordering::Relaxed) => (
            JobState::Failed,
            "interrupted: a new graph opens the node".to_string(),
        ),
        Ok(()) if job.cancelled() => (JobState::Cancelled, String::new()),
        Ok(()) => (JobState::Completed, String::new()),
        Err(m) => (JobState::Failed, m),
    };
    tracing::info!(job = %job.id, state = state.as_str_name(), %message, "job ended");
    job.set(|p| {
        p.state = state;
        p.message = message;
    });
}

/// Before a new graph opens qcow2 node `node`: stops the jobs that run on
/// its old image (a layer the old graph let go of, whose caches the new
/// image's would not see) and forgets them, so the manager starts them
/// again on the new graph. EBUSY when one does not stop in time.
pub fn release_node(node: &str) -> Result<(), JobError> {
    let on_node: Vec<Arc<Job>> = jobs()
        .values()
        .filter(|j| j.node == node)
        .cloned()
        .collect();
    let deadline = Instant::now() + FINISH_WAIT;
    for job in on_node {
        if job.active() {
            job.interrupted.store(true, Ordering::Relaxed);
            job.cancel.store(true, Ordering::Relaxed);
            job.changed.notify_all();
            let mut p = job.progress();
            while matches!(
                p.state,
                JobState::Running | JobState::Ready | JobState::Completing
            ) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(refuse(
                        Errno::EBUSY,
                        format!("job {:?} on node {node} has not stopped yet", job.id),
                    ));
                }
                p = job
                    .changed
                    .wait_timeout(p, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            drop(p);
            tracing::info!(job = %job.id, node, "job interrupted: a new graph opens its node");
        }
        let mut all = jobs();
        if all.get(&job.id).is_some_and(|j| Arc::ptr_eq(j, &job))
            && job.interrupted.load(Ordering::Relaxed)
        {
            all.remove(&job.id);
        }
    }
    Ok(())
}

/// How long [`finish_commit`] waits for the old graph to let go of the
/// image and for the final copy.
pub const FINISH_WAIT: Duration = Duration::from_secs(2);

/// Before a plan that completes commit job `id` opens: the job's final
/// copy, once the export's old graph let go of its image (so that no
/// request can write it any more). Refused when this process does not run
/// the job (it was lost with another worker), or it is not READY.
pub fn finish_commit(id: &str) -> Result<(), JobError> {
    let job = find(id).map_err(|_| {
        refuse(
            Errno::ESTALE,
            format!(
                "commit job {id:?} does not run in this worker (lost with its worker?): \
                 the export stays on its top node"
            ),
        )
    })?;
    if job.kind != JobKind::Commit {
        return Err(refuse(Errno::EINVAL, format!("job {id:?} is not a commit")));
    }
    let deadline = Instant::now() + FINISH_WAIT;
    {
        let mut p = job.progress();
        match p.state {
            JobState::Completed => return Ok(()),
            JobState::Ready | JobState::Completing => {}
            s => {
                return Err(refuse(
                    Errno::EINVAL,
                    format!("commit job {id:?} is {}, not ready", s.as_str_name()),
                ))
            }
        }
        p.state = JobState::Completing;
        job.finish.store(true, Ordering::Relaxed);
        job.changed.notify_all();
        while matches!(p.state, JobState::Completing) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(refuse(
                    Errno::EBUSY,
                    format!("commit job {id:?}: the old graph still holds the image"),
                ));
            }
            p = job
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match p.state {
            JobState::Completed => Ok(()),
            _ => Err(refuse(
                Errno::EIO,
                format!("commit job {id:?}: final copy failed: {}", p.message),
            )),
        }
    }
}

#[cfg(test)]
mod tests;
