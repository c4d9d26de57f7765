//! The frontend's agent session with the manager (`blkmesh.agent.v1`): a
//! stream of export plans down, which the frontend reconciles with the
//! exports it serves, and its reports, zone answers and statistics up. If
//! the manager goes away, running exports keep serving; the frontend opens
//! a new session and gets a fresh snapshot when it is back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use blkmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use blkmesh_proto::agent::v1::frontend_down::Msg as Down;
use blkmesh_proto::agent::v1::frontend_up::Msg as Up;
use blkmesh_proto::agent::v1::job_answer::Result as JobDone;
use blkmesh_proto::agent::v1::zone_answer::Result as ZoneDone;
use blkmesh_proto::agent::v1::{
    ExportStatus, FrontendHello, FrontendUp, JobAnswer, JobCommand, ZoneAnswer, ZoneCommand,
    ZoneError,
};
use blkmesh_proto::v1::{ExportPlan, ExportState};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::export::{ExportError, ExportServer};
use crate::workers::LinkError;

/// How often exports that could not be started are tried again (a worker
/// may not be listening yet, or may be restarting).
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// How long an export whose graph the workers refused to open waits
/// before it is tried again, at most (doubling from one second).
const FAILED_RETRY_MAX: Duration = Duration::from_secs(10);

/// A plan that could not be started yet.
struct Pending {
    plan: ExportPlan,
    state: ExportState,
    message: String,
    next_try: Instant,
    backoff: Duration,
}

/// The exports this frontend serves, by id, and the reports it owes the
/// manager about them.
pub struct Exports {
    servers: HashMap<String, ExportServer>,
    /// Plans that failed to start, retried until they start or go away.
    pending: HashMap<String, Pending>,
    reports: mpsc::UnboundedSender<ExportStatus>,
}

/// The report on `plan`.
fn status(plan: &ExportPlan, state: ExportState, message: String, size: u64) -> ExportStatus {
    ExportStatus {
        id: plan.export.as_ref().map_or(String::new(), |e| e.id.clone()),
        generation: plan.generation,
        state: state as i32,
        message,
        size,
    }
}

impl Exports {
    pub fn new(reports: mpsc::UnboundedSender<ExportStatus>) -> Self {
        Exports {
            servers: HashMap::new(),
            pending: HashMap::new(),
            reports,
        }
    }

    fn report(&self, plan: &ExportPlan, state: ExportState, message: String, size: u64) {
        // The receiver lives as long as the frontend's runtime.
        let _ = self.reports.send(status(plan, state, message, size));
    }

    /// Reports a started export: SERVING, or VMM_REFUSED while the last
    /// VMM that connected is refused.
    fn report_serving(&self, id: &str) {
        if let Some(s) = self.servers.get(id) {
            match s.vmm_refusal() {
                Some(why) => self.report(&s.plan, ExportState::VmmRefused, why, s.size()),
                None => self.report(&s.plan, ExportState::Serving, String::new(), s.size()),
            }
        }
    }

    /// Where an export reports what changes while it serves.
    fn sink(&self) -> crate::export::StatusSink {
        let reports = self.reports.clone();
        std::sync::Arc::new(move |plan, state, message, size| {
            let _ = reports.send(status(plan, state, message, size));
        })
    }

    /// Serves `plan`: moves queues or reopens the graph live when only
    /// those changed, restarts the export otherwise.
    pub fn upsert(&mut self, plan: ExportPlan) {
        let Some(id) = plan.export.as_ref().map(|e| e.id.clone()) else {
            tracing::warn!("manager sent a plan without an export");
            return;
        };
        if let Some(server) = self.servers.get_mut(&id) {
            if server.plan == plan {
                // A fresh snapshot after re-registering: say how it is.
                self.report_serving(&id);
                return;
            }
            if server.only_placement_changed(&plan) {
                match server.apply_placement(plan.clone()) {
                    Ok(()) => return self.report_serving(&id),
                    Err(e) => {
                        tracing::error!(export = %id, "live move failed, restarting the export: {e}")
                    }
                }
            } else if server.can_reopen(&plan) {
                match server.reopen(plan.clone()) {
                    Ok(()) => {
                        tracing::info!(export = %id, generation = plan.generation, size = server.size(), "graph reopened");
                        return self.report_serving(&id);
                    }
                    Err(e) => {
                        // Like a failed blockdev-reopen: the old graph
                        // keeps serving, and the manager rolls back.
                        tracing::error!(export = %id, "reopen failed, the old graph keeps serving: {e}");
                        return self.report(&plan, ExportState::Failed, e.to_string(), 0);
                    }
                }
            }
        }
        if let Some(old) = self.servers.remove(&id) {
            old.stop();
        }
        self.pending.remove(&id);
        self.start(id, plan, None);
    }

    fn start(&mut self, id: String, plan: ExportPlan, retry: Option<Pending>) {
        match ExportServer::start(plan.clone(), self.sink()) {
            Ok(s) => {
                if retry.is_some() {
                    tracing::info!(export = %id, "export started after retrying");
                }
                self.servers.insert(id.clone(), s);
                self.report_serving(&id);
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                // A worker that refused the graph will refuse it again
                // soon: say so, and back off. Anything else (a worker not
                // listening yet) is retried quickly.
                let refused = matches!(
                    e,
                    ExportError::Workers(LinkError::Refused { .. } | LinkError::LimitsDiffer)
                        | ExportError::Listen { .. }
                );
                let state = if refused {
                    ExportState::Failed
                } else {
                    ExportState::Pending
                };
                let backoff = match (&retry, refused) {
                    (_, false) => RETRY_INTERVAL,
                    (Some(p), true) if p.state == ExportState::Failed => {
                        (p.backoff * 2).min(FAILED_RETRY_MAX)
                    }
                    (_, true) => Duration::from_secs(1),
                };
                let changed = retry
                    .as_ref()
                    .is_none_or(|p| p.state != state || p.message != message);
                if changed {
                    tracing::warn!(export = %id, "cannot serve export yet, will retry: {message}");
                    self.report(&plan, state, message.clone(), 0);
                }
                self.pending.insert(
                    id,
                    Pending {
                        plan,
                        state,
                        message,
                        next_try: Instant::now() + backoff,
                        backoff,
                    },
                );
            }
        }
    }

    /// Tries the pending exports whose time has come again.
    pub fn retry_pending(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next_try <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(p) = self.pending.remove(&id) {
                self.start(id, p.plan.clone(), Some(p));
            }
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn remove(&mut self, id: &str) {
        self.pending.remove(id);
        if let Some(s) = self.servers.remove(id) {
            tracing::info!(export = %id, "export removed");
            s.stop();
        }
    }

    /// Keeps only the exports in `ids` (after a fresh snapshot).
    pub fn retain(&mut self, ids: &[String]) {
        let stale: Vec<String> = self
            .servers
            .keys()
            .chain(self.pending.keys())
            .filter(|k| !ids.contains(k))
            .cloned()
            .collect();
        for id in stale {
            self.remove(&id);
        }
    }

    /// What a zone command for export `id` runs against, or the answer
    /// when it cannot run: ENOENT for an export this frontend does not
    /// serve (or not yet), ENOTSUP when its graph is not zoned.
    pub fn zone_target(&self, id: &str) -> Result<crate::zones::ZoneTarget, ZoneDone> {
        let err = |errno, message: String| ZoneDone::Error(ZoneError { errno, message });
        match self.servers.get(id) {
            Some(s) => s
                .zone_target()
                .ok_or_else(|| err(libc::ENOTSUP, format!("export {id:?} is not zoned"))),
            None if self.pending.contains_key(id) => Err(err(
                libc::ENOENT,
                format!("export {id:?} is not serving yet"),
            )),
            None => Err(err(
                libc::ENOENT,
                format!("export {id:?} is not served by this frontend"),
            )),
        }
    }

    /// The worker links of export `id`, for a job command (ENOENT: not
    /// served by this frontend, or not yet).
    pub fn job_links(
        &self,
        id: &str,
    ) -> Result<std::sync::Arc<crate::workers::WorkerLinks>, JobDone> {
        match self.servers.get(id) {
            Some(s) => Ok(s.links()),
            None => Err(crate::jobs::error(
                libc::ENOENT,
                format!("export {id:?} is not served by this frontend (or not yet)"),
            )),
        }
    }

    pub fn stop_all(&mut self) {
        self.pending.clear();
        for (_, s) in self.servers.drain() {
            s.stop();
        }
    }
}

/// Runs a zone command on a blocking thread (the worker may take a while;
/// the session goes on meanwhile) and sends the answer, with the command's
/// id, up the session the command came on (`up`).
fn spawn_zone_command(
    exports: &std::sync::Arc<std::sync::Mutex<Exports>>,
    up: &mpsc::UnboundedSender<FrontendUp>,
    cmd: ZoneCommand,
) {
    let ex = std::sync::Arc::clone(exports);
    let up = up.clone();
    tokio::spawn(async move {
        let id = cmd.id;
        let export = cmd.export.clone();
        let result = tokio::task::spawn_blocking(move || {
            let target = ex
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .zone_target(&cmd.export);
            crate::zones::run(target, &cmd)
        })
        .await
        .unwrap_or_else(|e| {
            ZoneDone::Error(ZoneError {
                errno: libc::EIO,
                message: format!("zone command failed in the frontend: {e}"),
            })
        });
        if let ZoneDone::Error(e) = &result {
            tracing::debug!(export = %export, id, errno = e.errno, "zone command failed: {}", e.message);
        }
        // A session that ended meanwhile took its commands with it.
        let _ = up.send(FrontendUp {
            msg: Some(Up::ZoneAnswer(ZoneAnswer {
                id,
                result: Some(result),
            })),
        });
    });
}

/// Runs a job command on a blocking thread, as [`spawn_zone_command`].
fn spawn_job_command(
    exports: &std::sync::Arc<std::sync::Mutex<Exports>>,
    up: &mpsc::UnboundedSender<FrontendUp>,
    cmd: JobCommand,
) {
    let ex = std::sync::Arc::clone(exports);
    let up = up.clone();
    tokio::spawn(async move {
        let id = cmd.id;
        let result = tokio::task::spawn_blocking(move || {
            let links = ex
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .job_links(&cmd.export);
            crate::jobs::run(links, cmd.request)
        })
        .await
        .unwrap_or_else(|e| {
            crate::jobs::error(
                libc::EIO,
                format!("job command failed in the frontend: {e}"),
            )
        });
        let _ = up.send(FrontendUp {
            msg: Some(Up::JobAnswer(JobAnswer {
                id,
                result: Some(result),
            })),
        });
    });
}

/// Runs `f` on the exports, on a blocking thread.
async fn with_exports(
    exports: &std::sync::Arc<std::sync::Mutex<Exports>>,
    f: impl FnOnce(&mut Exports) + Send + 'static,
) {
    let ex = std::sync::Arc::clone(exports);
    let _ =
        tokio::task::spawn_blocking(move || f(&mut ex.lock().unwrap_or_else(|p| p.into_inner())))
            .await;
}

/// The exports a session's snapshot names, until its explicit end.
#[derive(Debug)]
struct Snapshot {
    /// `None` once the snapshot ended.
    ids: Option<Vec<String>>,
}

impl Snapshot {
    fn new() -> Snapshot {
        Snapshot {
            ids: Some(Vec::new()),
        }
    }

    fn upsert(&mut self, plan: &ExportPlan) {
        if let (Some(ids), Some(e)) = (self.ids.as_mut(), plan.export.as_ref()) {
            ids.push(e.id.clone());
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(ids) = self.ids.as_mut() {
            ids.retain(|i| i != id);
        }
    }

    /// The end of the snapshot: the exports to keep serving (the others
    /// were removed while the frontend was away); `None` if it had ended.
    fn end(&mut self) -> Option<Vec<String>> {
        self.ids.take()
    }
}

/// Opens sessions with the manager, one at a time, and applies what comes
/// down until `shutdown` resolves. Export start/stop runs on blocking threads.
pub async fn run(addr: String, name: String, shutdown: impl std::future::Future<Output = ()>) {
    let (reports, report_rx) = mpsc::unbounded_channel();
    // Held by one session at a time.
    let report_rx = tokio::sync::Mutex::new(report_rx);
    let exports = std::sync::Arc::new(std::sync::Mutex::new(Exports::new(reports)));
    let work = {
        let exports = std::sync::Arc::clone(&exports);
        async move {
            blkmesh_proto::session::keep_open(&addr, || session(&addr, &name, &exports, &report_rx))
                .await
        }
    };
    let retry = {
        let exports = std::sync::Arc::clone(&exports);
        async move {
            let mut tick = tokio::time::interval(RETRY_INTERVAL);
            loop {
                tick.tick().await;
                with_exports(&exports, |ex| {
                    if ex.has_pending() {
                        ex.retry_pending();
                    }
                })
                .await;
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = retry => {}
        _ = shutdown => {}
    }
    with_exports(&exports, Exports::stop_all).await;
}

/// One session: the hello; the snapshot up to its explicit end (the
/// exports it does not name were removed while we were away); then changes
/// and zone commands down, and reports, zone answers and statistics up,
/// until it ends. `Ok` once an accepted session ended.
async fn session(
    addr: &str,
    name: &str,
    exports: &std::sync::Arc<std::sync::Mutex<Exports>>,
    reports: &tokio::sync::Mutex<mpsc::UnboundedReceiver<ExportStatus>>,
) -> Result<(), tonic::Status> {
    let mut reports = reports.lock().await;
    let channel = blkmesh_proto::client::ClientConfig::for_process(addr)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    // Reports made while the manager was unreachable are dropped: the
    // snapshot makes the frontend report on every export again.
    while reports.try_recv().is_ok() {}
    let (up, up_rx) = mpsc::unbounded_channel();
    let send = |msg| up.send(FrontendUp { msg: Some(msg) }).is_ok();
    send(Up::Hello(FrontendHello {
        name: name.to_string(),
    }));
    let mut down = AgentServiceClient::new(channel)
        .frontend_session(UnboundedReceiverStream::new(up_rx))
        .await?
        .into_inner();
    blkmesh_proto::session::accepted(down.message().await?, |m| {
        matches!(m.msg, Some(Down::Accepted(_)))
    })?;
    tracing::info!("registered with the manager at {addr}");
    let source = format!("frontend/{name}");
    let mut snapshot = Snapshot::new();
    let mut tick = tokio::time::interval(blkmesh_stats::REPORT_INTERVAL);
    loop {
        tokio::select! {
            m = down.message() => {
                let Some(m) = m? else { return Ok(()) };
                match m.msg {
                    Some(Down::Upsert(plan)) => {
                        snapshot.upsert(&plan);
                        with_exports(exports, move |ex| ex.upsert(plan)).await;
                    }
                    Some(Down::SnapshotEnd(_)) => match snapshot.end() {
                        Some(ids) => with_exports(exports, move |ex| ex.retain(&ids)).await,
                        None => tracing::warn!("a second snapshot end from the manager; ignored"),
                    },
                    Some(Down::Remove(id)) => {
                        snapshot.remove(&id);
                        with_exports(exports, move |ex| ex.remove(&id)).await;
                    }
                    Some(Down::ZoneCommand(cmd)) => spawn_zone_command(exports, &up, cmd),
                    Some(Down::JobCommand(cmd)) => spawn_job_command(exports, &up, cmd),
                    other @ (Some(Down::Accepted(_)) | None) => {
                        tracing::warn!("unexpected {other:?} from the manager; ignored")
                    }
                }
            }
            Some(st) = reports.recv() => {
                if !send(Up::ExportStatus(st)) {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                if !send(Up::Stats(crate::stats().report(&source))) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use blkmesh_proto::v1::VhostUserBlkExport;

    use super::*;

    fn plan(id: &str) -> ExportPlan {
        ExportPlan {
            commit_finish: String::new(),
            export: Some(VhostUserBlkExport {
                id: id.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_snapshot_keeps_what_it_names_until_its_end() {
        let mut s = Snapshot::new();
        s.upsert(&plan("a"));
        s.upsert(&plan("b"));
        s.upsert(&ExportPlan::default());
        s.remove("a");
        assert_eq!(s.end(), Some(vec!["b".to_string()]));
        // After the end, changes are changes, and a second end keeps
        // everything (it is ignored).
        s.upsert(&plan("c"));
        assert_eq!(s.end(), None);
    }

    #[test]
    fn an_empty_snapshot_keeps_nothing() {
        assert_eq!(Snapshot::new().end(), Some(Vec::new()));
    }
}
