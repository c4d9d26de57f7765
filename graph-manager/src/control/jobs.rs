//! JobService: block jobs (stream, commit) run by the worker that holds
//! an export's graph, reached through the frontend serving the export
//! (a `job_command` on its session). The manager keeps each job's record
//! and watches it: it asks for its progress, starts it again when its
//! worker was lost (or its node reopened), finishes a stream by dropping
//! the node's backing, and switches a commit's export over on
//! CompleteJob. Records are memory only.

use std::sync::Arc;
use std::time::Duration;

use blkmesh_graph::{GraphError, ObjectKind};
use blkmesh_proto::agent::v1::job_answer::Result as JobDone;
use blkmesh_proto::agent::v1::JobCommand;
use blkmesh_proto::ipc::v1::{JobAction, JobRequest, JobStatus};
use blkmesh_proto::v1::{Job, JobKind, JobState};
use tokio::sync::oneshot;

use crate::control::hub::{Applied, Control};
use crate::core::error::ApiError;
use crate::core::jobs::{check_start, committed, streamed, JobRecord, MAX_RESTARTS};
use crate::core::reopen::exports_over;
use crate::core::state::State;
use crate::sessions::{serves, ToFrontend};

/// How often a job's progress is asked for.
const WATCH_PERIOD: Duration = Duration::from_millis(300);

/// How a job command went, as far as the manager cares.
enum Call {
    Status(JobStatus),
    /// The worker has no such job: it was lost, or a new graph opened the
    /// node (the job was interrupted).
    Missing,
    /// No frontend serves the export right now, or its worker is being
    /// replaced: ask again later.
    Later(String),
    /// Refused for good.
    Refused(String),
}

fn not_found(id: &str) -> ApiError {
    GraphError::NotFound {
        field: "id",
        kind: ObjectKind::Job,
        name: id.to_string(),
    }
    .into()
}

impl Control {
    /// Sends `request` about export `export` to the frontend serving it;
    /// the receiver gets the answer.
    fn send_job(
        &self,
        export: &str,
        request: JobRequest,
    ) -> Result<oneshot::Receiver<crate::sessions::JobAnswer>, String> {
        let inner = self.lock();
        let frontend = inner
            .sessions
            .export_rt
            .get(export)
            .and_then(|rt| rt.report.as_ref())
            .filter(|r| serves(r.state))
            .filter(|r| inner.sessions.frontend_live(&r.frontend))
            .map(|r| r.frontend.clone())
            .ok_or_else(|| format!("no frontend serves export {export:?}"))?;
        let (answer, rx) = oneshot::channel();
        let command = JobCommand {
            id: 0,
            export: export.to_string(),
            request: Some(request),
        };
        let sent = inner
            .sessions
            .frontends
            .get(&frontend)
            .and_then(|c| c.tx.as_ref())
            .is_some_and(|tx| tx.send(ToFrontend::Job { command, answer }).is_ok());
        if !sent {
            return Err(format!("frontend {frontend:?} went away"));
        }
        Ok(rx)
    }

    /// Runs `action` for job `id` on the worker holding `export`'s graph.
    async fn job_call(&self, export: &str, id: &str, action: JobAction, kind: JobKind) -> Call {
        let speed = self.with_job(id, |r| r.job.speed).unwrap_or(0);
        let request = JobRequest {
            job: id.to_string(),
            action: action as i32,
            kind: kind as i32,
            speed,
        };
        let rx = match self.send_job(export, request) {
            Ok(rx) => rx,
            Err(why) => return Call::Later(why),
        };
        match tokio::time::timeout(self.apply_timeout, rx).await {
            Ok(Ok(Some(JobDone::Status(st)))) => Call::Status(st),
            Ok(Ok(Some(JobDone::Error(e)))) if e.errno == libc::ENOENT => Call::Missing,
            Ok(Ok(Some(JobDone::Error(e)))) if e.errno == libc::EAGAIN => Call::Later(e.message),
            Ok(Ok(Some(JobDone::Error(e)))) => Call::Refused(e.message),
            Ok(Ok(None)) => Call::Refused("the frontend answered nothing".into()),
            Ok(Err(_)) => Call::Later("the frontend went away before answering".into()),
            Err(_) => Call::Later("no answer from the frontend in time".into()),
        }
    }

    fn with_job<T>(&self, id: &str, f: impl FnOnce(&mut JobRecord) -> T) -> Option<T> {
        self.lock().jobs.get_mut(id).map(f)
    }

    /// `StartJob`: checks, starts the job on the export's worker, and
    /// watches it.
    pub(crate) async fn start_job(
        self: &Arc<Self>,
        id: &str,
        kind: JobKind,
        export: &str,
        speed: u64,
    ) -> Result<Job, ApiError> {
        let job = {
            let mut inner = self.lock();
            if let Some(r) = inner.jobs.get(id) {
                if !r.finished() {
                    return Err(GraphError::AlreadyExists {
                        field: "id",
                        kind: ObjectKind::Job,
                        name: id.to_string(),
                    }
                    .into());
                }
            }
            let active: Vec<&str> = inner
                .jobs
                .values()
                .filter(|r| !r.finished())
                .map(|r| r.job.export.as_str())
                .collect();
            let (top, base) = check_start(&inner.state, id, kind, export, &active)?;
            let job = Job {
                id: id.to_string(),
                kind: kind as i32,
                export: export.to_string(),
                top,
                base,
                speed,
                state: JobState::Running as i32,
                ..Default::default()
            };
            // Reserved while the worker is asked: a second start waits its turn.
            inner.jobs.insert(
                id.to_string(),
                JobRecord {
                    job: job.clone(),
                    cancelling: false,
                },
            );
            job
        };
        let refused = |why: String| {
            self.lock().jobs.remove(id);
            Err(ApiError::from(GraphError::precondition("export", why)))
        };
        match self.job_call(export, id, JobAction::Start, kind).await {
            Call::Status(st) => self.with_job(id, |r| progress(r, &st)),
            Call::Later(why) => return refused(why),
            Call::Missing | Call::Refused(_) => {
                let why = match self.job_call(export, id, JobAction::Status, kind).await {
                    Call::Refused(w) | Call::Later(w) => w,
                    _ => "the worker refused the job".to_string(),
                };
                return refused(why);
            }
        };
        tracing::info!(job = id, export, kind = kind.as_str_name(), top = %job.top, base = %job.base, "job started");
        let watched = Arc::clone(self);
        let job_id = id.to_string();
        tokio::spawn(async move { watched.watch_job(&job_id).await });
        self.get_job(id)
    }

    pub(crate) fn get_job(&self, id: &str) -> Result<Job, ApiError> {
        self.with_job(id, |r| r.job.clone())
            .ok_or_else(|| not_found(id))
    }

    pub(crate) fn list_jobs(&self) -> Vec<Job> {
        self.lock().jobs.values().map(|r| r.job.clone()).collect()
    }

    /// `CancelJob`: see the proto.
    pub(crate) async fn cancel_job(self: &Arc<Self>, id: &str) -> Result<Job, ApiError> {
        let (export, kind) = {
            let mut inner = self.lock();
            let r = inner.jobs.get_mut(id).ok_or_else(|| not_found(id))?;
            if r.finished() {
                let job = r.job.clone();
                inner.jobs.remove(id);
                return Ok(job);
            }
            if r.job.state() == JobState::Completing {
                return Err(GraphError::precondition(
                    "id",
                    format!("job {id:?} is switching over; it can no longer be cancelled"),
                )
                .into());
            }
            r.cancelling = true;
            (r.job.export.clone(), r.job.kind())
        };
        match self.job_call(&export, id, JobAction::Cancel, kind).await {
            Call::Status(st) => {
                self.with_job(id, |r| progress(r, &st));
            }
            Call::Missing => {
                self.with_job(id, |r| r.job.state = JobState::Cancelled as i32);
            }
            Call::Later(_) | Call::Refused(_) => {}
        }
        self.get_job(id)
    }

    /// Watches job `id` until it finished: progress, restarts, and the
    /// end of a stream.
    async fn watch_job(self: &Arc<Self>, id: &str) {
        loop {
            tokio::time::sleep(WATCH_PERIOD).await;
            let Some((export, kind, state, cancelling)) = self.with_job(id, |r| {
                (
                    r.job.export.clone(),
                    r.job.kind(),
                    r.job.state(),
                    r.cancelling || r.finished(),
                )
            }) else {
                return;
            };
            if matches!(
                state,
                JobState::Completed | JobState::Cancelled | JobState::Failed
            ) {
                return;
            }
            if state == JobState::Completing {
                continue;
            }
            match self.job_call(&export, id, JobAction::Status, kind).await {
                Call::Status(st) => match st.state() {
                    JobState::Completed if kind == JobKind::Stream => {
                        self.with_job(id, |r| r.job.done = st.done);
                        self.finish_stream(id).await;
                    }
                    JobState::Failed if !cancelling && st.message.starts_with("interrupted") => {
                        self.restart_job(id, &export, kind).await
                    }
                    _ => {
                        self.with_job(id, |r| progress(r, &st));
                    }
                },
                Call::Missing if cancelling => {
                    self.with_job(id, |r| r.job.state = JobState::Cancelled as i32);
                }
                Call::Missing => self.restart_job(id, &export, kind).await,
                Call::Later(why) => {
                    self.with_job(id, |r| r.job.message = format!("waiting: {why}"));
                }
                Call::Refused(why) => self.fail_job(id, why),
            }
        }
    }

    fn fail_job(&self, id: &str, why: String) {
        tracing::warn!(job = id, %why, "job failed");
        self.with_job(id, |r| {
            r.job.state = JobState::Failed as i32;
            r.job.message = why;
        });
    }

    /// The worker lost job `id` (with itself, or to a new graph of its
    /// node): starts it again where the export is now.
    async fn restart_job(&self, id: &str, export: &str, kind: JobKind) {
        let restarts = self.with_job(id, |r| {
            r.job.restarts += 1;
            r.job.restarts
        });
        if restarts.is_some_and(|n| n > MAX_RESTARTS) {
            return self.fail_job(id, format!("lost {MAX_RESTARTS} times; given up"));
        }
        tracing::info!(
            job = id,
            export,
            "job lost with its worker or graph; starting it again"
        );
        match self.job_call(export, id, JobAction::Start, kind).await {
            Call::Status(st) => {
                self.with_job(id, |r| progress(r, &st));
            }
            Call::Missing | Call::Later(_) => {}
            Call::Refused(why) => self.fail_job(id, format!("starting again: {why}")),
        }
    }

    /// Commits the state `change` makes of the current one (with the
    /// exports it touches), pushes their plans and waits for the
    /// frontends: why it failed, if it did.
    async fn apply_change<F>(self: &Arc<Self>, change: F) -> Option<String>
    where
        F: FnOnce(&State) -> Result<(State, Vec<String>), GraphError> + Send + 'static,
    {
        let rx = self.watch_reports();
        let changed = self
            .run_change(move |control| async move {
                let ticket = control.begin_change().await;
                let (next, exports) = change(&control.lock().state)?;
                let (mut inner, targets) = control.commit_bumped(&ticket, next, &exports).await?;
                control.announce(&mut inner, &exports);
                Ok(targets)
            })
            .await;
        match changed {
            Err(e) => Some(e.to_string()),
            Ok(targets) => self
                .wait_applied(&targets, rx)
                .await
                .into_values()
                .find_map(|a| match a {
                    Applied::Failed(reason) => Some(reason),
                    _ => None,
                }),
        }
    }

    /// A stream's worker copied everything and dropped the backing file
    /// from the header: the node drops its backing node, live.
    async fn finish_stream(self: &Arc<Self>, id: &str) {
        let Some(top) = self.with_job(id, |r| {
            r.job.state = JobState::Completing as i32;
            r.job.top.clone()
        }) else {
            return;
        };
        let t = top.clone();
        let failed = self
            .apply_change(move |state| {
                let next = streamed(state, &t)?;
                let exports = exports_over(&next, std::iter::once(t.as_str()));
                Ok((next, exports))
            })
            .await;
        match failed {
            None => {
                tracing::info!(job = id, node = %top, "stream completed: the node has no backing node");
                self.with_job(id, |r| r.job.state = JobState::Completed as i32);
            }
            Some(why) => self.fail_job(
                id,
                format!(
                    "the image holds everything, but dropping node {top:?}'s backing node \
                     failed: {why}"
                ),
            ),
        }
    }

    /// `CompleteJob`: switches a ready commit's export to its base node.
    /// The plan carries the job, so the worker makes the last copy once
    /// the old graph let go of the image; if the switch fails, the export
    /// goes back to its top node (whose image is whole) and the job fails.
    pub(crate) async fn complete_job(self: &Arc<Self>, id: &str) -> Result<Job, ApiError> {
        let (export, top, base) = {
            let mut inner = self.lock();
            let r = inner.jobs.get_mut(id).ok_or_else(|| not_found(id))?;
            if r.job.kind() != JobKind::Commit || r.job.state() != JobState::Ready {
                return Err(GraphError::precondition(
                    "id",
                    format!(
                        "job {id:?} is a {} job, {}: only a READY commit completes",
                        r.job.kind().as_str_name(),
                        r.job.state().as_str_name()
                    ),
                )
                .into());
            }
            r.job.state = JobState::Completing as i32;
            let (export, top, base) = (r.job.export.clone(), r.job.top.clone(), r.job.base.clone());
            inner.finishing.insert(export.clone(), id.to_string());
            (export, top, base)
        };
        let (e, b) = (export.clone(), base.clone());
        let reason = self
            .apply_change(move |state| Ok((committed(state, &e, &b), vec![e.clone()])))
            .await;
        self.lock().finishing.remove(&export);
        let Some(reason) = reason else {
            tracing::info!(job = id, %export, from = %top, to = %base, "commit completed: the export is on its base node");
            self.with_job(id, |r| {
                r.job.state = JobState::Completed as i32;
                r.job.done = r.job.total;
            });
            return self.get_job(id);
        };
        let (e, t) = (export.clone(), top.clone());
        let undone = match self
            .apply_change(move |state| Ok((committed(state, &e, &t), vec![e.clone()])))
            .await
        {
            None => format!("the export is back on node {top:?}"),
            Some(e) => format!("switching back failed too: {e}"),
        };
        self.fail_job(id, format!("switching over failed: {reason}; {undone}"));
        Err(ApiError::NotApplied {
            export,
            what: format!("switch to the commit's base node {base:?}"),
            reason,
            undone,
        })
    }
}

/// Takes a worker's status into the record (a ready job the manager
/// completes stays COMPLETING until the switch is done).
fn progress(r: &mut JobRecord, st: &JobStatus) {
    r.job.done = st.done;
    r.job.total = st.total;
    r.job.message.clone_from(&st.message);
    if r.job.state() != JobState::Completing {
        r.job.state = st.state;
    }
}
