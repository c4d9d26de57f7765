//! The frontend's registration with the manager: a stream of export plans
//! that the frontend reconciles with the exports it serves. If the manager
//! goes away, running exports keep serving; the frontend re-registers and
//! gets a fresh snapshot when it is back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use blkmesh_proto::v1::frontend_event::Event;
use blkmesh_proto::v1::frontend_service_client::FrontendServiceClient;
use blkmesh_proto::v1::zone_command_done::Result as ZoneDone;
use blkmesh_proto::v1::{
    ExportPlan, ExportState, ExportStatus, FrontendHello, ZoneCommand, ZoneCommandDone,
    ZoneCommandError,
};
use tokio::sync::mpsc;

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
    frontend: String,
    reports: mpsc::UnboundedSender<ExportStatus>,
}

impl Exports {
    pub fn new(frontend: String, reports: mpsc::UnboundedSender<ExportStatus>) -> Self {
        Exports {
            servers: HashMap::new(),
            pending: HashMap::new(),
            frontend,
            reports,
        }
    }

    fn report(&self, plan: &ExportPlan, state: ExportState, message: String, size: u64) {
        let id = plan.export.as_ref().map_or(String::new(), |e| e.id.clone());
        // The receiver lives as long as the frontend's runtime.
        let _ = self.reports.send(ExportStatus {
            frontend: self.frontend.clone(),
            id,
            generation: plan.generation,
            state: state as i32,
            message,
            size,
        });
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
        let frontend = self.frontend.clone();
        std::sync::Arc::new(move |plan, state, message, size| {
            let _ = reports.send(ExportStatus {
                frontend: frontend.clone(),
                id: plan.export.as_ref().map_or(String::new(), |e| e.id.clone()),
                generation: plan.generation,
                state: state as i32,
                message,
                size,
            });
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
        let err = |errno, message: String| ZoneDone::Error(ZoneCommandError { errno, message });
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

    pub fn stop_all(&mut self) {
        self.pending.clear();
        for (_, s) in self.servers.drain() {
            s.stop();
        }
    }
}

/// Sends the frontend's export reports to the manager, in order. Reports
/// made while the manager is unreachable are dropped: the snapshot sent on
/// re-registration makes the frontend report every export again.
async fn send_reports(addr: String, mut reports: mpsc::UnboundedReceiver<ExportStatus>) {
    let mut client: Option<FrontendServiceClient<blkmesh_proto::client::ManagerChannel>> = None;
    while let Some(status) = reports.recv().await {
        if client.is_none() {
            client = blkmesh_proto::client::ClientConfig::for_process(addr.as_str())
                .connect()
                .await
                .ok()
                .map(FrontendServiceClient::new);
        }
        let Some(c) = client.as_mut() else {
            tracing::debug!(export = %status.id, "manager unreachable, report dropped");
            continue;
        };
        if let Err(e) = c.report_export(status).await {
            tracing::debug!("export report: {e}");
            client = None;
        }
    }
}

/// Sends the answers to zone commands to the manager. An answer that
/// cannot be delivered is dropped: the manager's call times out.
async fn send_zone_answers(addr: String, mut answers: mpsc::UnboundedReceiver<ZoneCommandDone>) {
    let mut client: Option<FrontendServiceClient<blkmesh_proto::client::ManagerChannel>> = None;
    while let Some(done) = answers.recv().await {
        for _ in 0..2 {
            if client.is_none() {
                client = blkmesh_proto::client::ClientConfig::for_process(addr.as_str())
                    .connect()
                    .await
                    .ok()
                    .map(FrontendServiceClient::new);
            }
            let Some(c) = client.as_mut() else {
                break;
            };
            match c.zone_command_done(done.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(request = done.request_id, "zone command answer: {e}");
                    client = None;
                }
            }
        }
    }
}

/// Runs a zone command on a blocking thread (the worker may take a while;
/// the registration stream goes on meanwhile) and queues the answer.
fn spawn_zone_command(
    exports: &std::sync::Arc<std::sync::Mutex<Exports>>,
    frontend: &str,
    answers: &mpsc::UnboundedSender<ZoneCommandDone>,
    cmd: ZoneCommand,
) {
    let ex = std::sync::Arc::clone(exports);
    let answers = answers.clone();
    let frontend = frontend.to_string();
    tokio::spawn(async move {
        let request_id = cmd.request_id;
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
            ZoneDone::Error(ZoneCommandError {
                errno: libc::EIO,
                message: format!("zone command failed in the frontend: {e}"),
            })
        });
        if let ZoneDone::Error(e) = &result {
            tracing::debug!(export = %export, request = request_id, errno = e.errno, "zone command failed: {}", e.message);
        }
        let _ = answers.send(ZoneCommandDone {
            frontend,
            request_id,
            result: Some(result),
        });
    });
}

/// Registers with the manager and applies its events until `shutdown`
/// resolves. Export start/stop runs on blocking threads.
pub async fn run(addr: String, name: String, shutdown: impl std::future::Future<Output = ()>) {
    let (reports, report_rx) = mpsc::unbounded_channel();
    let exports = std::sync::Arc::new(std::sync::Mutex::new(Exports::new(name.clone(), reports)));
    tokio::spawn(send_reports(addr.clone(), report_rx));
    let (zone_answers, zone_answer_rx) = mpsc::unbounded_channel();
    tokio::spawn(send_zone_answers(addr.clone(), zone_answer_rx));
    blkmesh_stats::spawn_reporter(
        addr.clone(),
        format!("frontend/{name}"),
        crate::stats().clone(),
    );
    let work = {
        let exports = std::sync::Arc::clone(&exports);
        async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match session(&addr, &name, &exports, &zone_answers).await {
                    Ok(()) => tracing::warn!("manager closed the registration stream"),
                    Err(e) => tracing::warn!("registration with {addr}: {e}"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let retry = {
        let exports = std::sync::Arc::clone(&exports);
        async move {
            let mut tick = tokio::time::interval(RETRY_INTERVAL);
            loop {
                tick.tick().await;
                let ex = std::sync::Arc::clone(&exports);
                let _ = tokio::task::spawn_blocking(move || {
                    let mut ex = ex.lock().unwrap_or_else(|p| p.into_inner());
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
    let _ = tokio::task::spawn_blocking(move || {
        exports.lock().unwrap_or_else(|p| p.into_inner()).stop_all()
    })
    .await;
}

async fn session(
    addr: &str,
    name: &str,
    exports: &std::sync::Arc<std::sync::Mutex<Exports>>,
    zone_answers: &mpsc::UnboundedSender<ZoneCommandDone>,
) -> Result<(), tonic::Status> {
    let channel = blkmesh_proto::client::ClientConfig::for_process(addr)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = FrontendServiceClient::new(channel);
    let mut stream = client
        .register(FrontendHello {
            name: name.to_string(),
        })
        .await?
        .into_inner();
    tracing::info!("registered with the manager at {addr}");
    // The snapshot comes first; exports missing from it were removed while
    // we were away. We cannot tell where the snapshot ends, so collect ids
    // until the stream has been quiet briefly.
    let mut snapshot: Option<Vec<String>> = Some(Vec::new());
    loop {
        let next = if snapshot.is_some() {
            match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
                Ok(m) => m?,
                Err(_) => {
                    let ids = snapshot.take().unwrap_or_default();
                    let ex = std::sync::Arc::clone(exports);
                    let _ = tokio::task::spawn_blocking(move || {
                        ex.lock().unwrap_or_else(|p| p.into_inner()).retain(&ids)
                    })
                    .await;
                    continue;
                }
            }
        } else {
            stream.message().await?
        };
        let Some(ev) = next else { return Ok(()) };
        let ex = std::sync::Arc::clone(exports);
        match ev.event {
            Some(Event::Upsert(plan)) => {
                if let (Some(ids), Some(e)) = (snapshot.as_mut(), plan.export.as_ref()) {
                    ids.push(e.id.clone());
                }
                let _ = tokio::task::spawn_blocking(move || {
                    ex.lock().unwrap_or_else(|p| p.into_inner()).upsert(plan)
                })
                .await;
            }
            Some(Event::Remove(id)) => {
                let _ = tokio::task::spawn_blocking(move || {
                    ex.lock().unwrap_or_else(|p| p.into_inner()).remove(&id)
                })
                .await;
            }
            Some(Event::ZoneCommand(cmd)) => spawn_zone_command(&ex, name, zone_answers, cmd),
            None => {}
        }
    }
}
